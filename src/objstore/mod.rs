//! Object-storage replicas: a file set's send streams kept in an S3-compatible store
//! (docs/object-storage.md), as one more kind of [`ReplicaEndpoint`], so the origin's
//! scheduler, retries, status and resume drive it like a node replica.
//!
//! Under `PREFIX/FILESET/` the store holds, per send stream (full, or incremental from a
//! base, keyed by [`chain::stream_key`]):
//! - `streams/KEY`: the stream as one multipart object, each part sealed on its own
//!   ([`seal`]: the store never sees plaintext);
//! - `manifests/KEY`: written, sealed, only after the object is complete: snapshot, identity,
//!   base, size, BLAKE3, parts ([`chain::Manifest`]). Nothing counts as held without it;
//! - `pending/KEY`: while an upload is under way, the upload's id and the parts stored so far
//!   with the BLAKE3 of the stream up to them: a cut upload resumes after them, once the
//!   origin's regenerated stream hashes the same up to there (as a QUIC resume is checked).
//!
//! Listing ([`ObjectReplica::list`]) reports the snapshots whose chain of streams is
//! complete, except when a new full stream is due (`full_every`, `full_ratio`): then it
//! reports none, and the origin sends a full stream. After each upload, retention
//! (`retention.replica`) picks the snapshots to keep and deletes only the streams none of
//! their chains use. [`restore`] gets a snapshot back; [`verify`] checks the store's copy of
//! one against the manifests.

pub mod chain;
pub mod restore;
pub mod seal;
pub mod verify;

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::OnceCell;

use crate::config::Policy;
use crate::config::object_store::StoreReplica;
use crate::schedule::retention::{Reason, SidePlan};
use crate::ship::transfer::Pacer;
use crate::ship::{Listing, Partial, ReplicaEndpoint, Start, StreamStart};
use crate::snapshot::{Incoming, Snapshot};
use chain::{Manifest, Part};
use seal::SealKey;

/// An upload under way, as recorded (sealed) in `pending/KEY` after each stored part.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    snapshot: String,
    identity: String,
    base: Option<String>,
    compact: bool,
    object: String,
    upload_id: String,
    parts: Vec<Part>,
    /// The store's ids (ETags) of the parts, in order.
    etags: Vec<String>,
    /// Plain bytes stored so far, and the BLAKE3 of the stream up to there.
    offset: u64,
    prefix_blake3: String,
}

/// One object-storage replica of one file set, as the origin reaches it (and `list` and
/// `restore` read it). The key and credentials are read on first use, so a missing file is
/// that replica's error, not the daemon's.
pub struct ObjectReplica {
    name: String,
    policy: Policy,
    spec: StoreReplica,
    open: OnceCell<Opened>,
}

struct Opened {
    s3: Arc<AmazonS3>,
    key: SealKey,
    /// `PREFIX/FILESET/`.
    root: String,
}

impl ObjectReplica {
    pub fn new(policy: &Policy, spec: &StoreReplica) -> ObjectReplica {
        ObjectReplica { name: spec.name.0.clone(), policy: policy.clone(), spec: spec.clone(), open: OnceCell::new() }
    }

    /// The replicas of `policy` that are object stores.
    pub fn all_of(policy: &Policy) -> Vec<ObjectReplica> {
        policy.object_stores.iter().map(|s| ObjectReplica::new(policy, s)).collect()
    }

    async fn opened(&self) -> Result<&Opened> {
        self.open
            .get_or_try_init(|| async {
                let key = SealKey::load(&self.spec.encryption_key)?;
                let (id, secret) = credentials(&self.spec)?;
                let os = &self.spec.object_store;
                let s3 = AmazonS3Builder::new()
                    .with_endpoint(&os.endpoint)
                    .with_allow_http(os.endpoint.starts_with("http://"))
                    .with_bucket_name(&os.bucket)
                    .with_region(&os.region)
                    .with_access_key_id(id)
                    .with_secret_access_key(secret)
                    .build()
                    .with_context(|| format!("cannot set up object store `{}` ({})", self.name, os.endpoint))?;
                let prefix = os.prefix.trim_matches('/');
                let root = if prefix.is_empty() { format!("{}/", self.policy.fileset) } else { format!("{prefix}/{}/", self.policy.fileset) };
                Ok::<_, anyhow::Error>(Opened { s3: Arc::new(s3), key, root })
            })
            .await
            .with_context(|| format!("object-storage replica `{}`", self.name))
    }

    fn what(&self) -> String {
        let os = &self.spec.object_store;
        format!("object store `{}` ({} bucket {})", self.name, os.endpoint, os.bucket)
    }

    /// Every manifest in the store, checked (sealed under our key, for this file set).
    pub async fn manifests(&self) -> Result<Vec<Manifest>> {
        let o = self.opened().await?;
        let mut out = Vec::new();
        for key in list_keys(o, &format!("{}manifests/", o.root)).await.with_context(|| format!("cannot list {}", self.what()))? {
            let m: Manifest = get_sealed(o, &key).await?;
            if m.fileset != self.policy.fileset.0 || !chain::key_safe(&m.identity) || !m.base.as_deref().is_none_or(chain::key_safe) {
                bail!("{key} in {} is not a manifest of file set `{}`", self.what(), self.policy.fileset);
            }
            out.push(m);
        }
        Ok(out)
    }

    async fn pendings(&self) -> Result<Vec<(Key, Pending)>> {
        let o = self.opened().await?;
        let mut out = Vec::new();
        for key in list_keys(o, &format!("{}pending/", o.root)).await? {
            let p: Pending = get_sealed(o, &key).await?;
            out.push((key, p));
        }
        Ok(out)
    }

    /// The snapshots the store can restore, oldest first.
    pub async fn held(&self) -> Result<Vec<Snapshot>> {
        Ok(chain::held(&self.manifests().await?))
    }

    /// The plain bytes of the stream `m`, read part by part (two at a time) and checked: each
    /// part must open under our key in its place and hash as the manifest says, and the whole
    /// must have the manifest's size and BLAKE3, or the read fails before its end.
    pub async fn download(&self, m: &Manifest) -> Result<impl AsyncRead + Send + Unpin + use<>> {
        let o = self.opened().await?;
        let (s3, key, object) = (o.s3.clone(), o.key.clone(), format!("{}{}", o.root, m.object));
        let ranges = m.sealed_ranges();
        let parts = futures::stream::iter(ranges)
            .map(move |(i, range, part)| {
                let (s3, key, object) = (s3.clone(), key.clone(), object.clone());
                async move {
                    let sealed =
                        s3.get_range(&Key::from(object.as_str()), range).await.map_err(|e| std::io::Error::other(format!("cannot read {object}: {e}")))?;
                    let plain = tokio::task::spawn_blocking(move || {
                        let plain = key.open(&sealed, &seal::part_context(&object, i)).map_err(|e| format!("part {} of {object}: {e}", i + 1))?;
                        if blake3::hash(&plain).to_hex().as_str() != part.blake3 || plain.len() as u64 != part.plain {
                            return Err(format!("part {} of {object} does not hash as its manifest says", i + 1));
                        }
                        Ok(plain)
                    })
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(Bytes::from(plain))
                }
            })
            .buffered(2);
        let (size, blake3) = (m.size, m.blake3.clone());
        let mut whole = Some((blake3::Hasher::new(), 0u64));
        let checked = parts.map_ok(move |b| b).chain(futures::stream::once(async { Ok(Bytes::new()) })).map(move |item| {
            let b = item?;
            let (hasher, n) = whole.as_mut().expect("checked once");
            if b.is_empty() {
                // The end: the whole stream must be the one the manifest describes.
                if *n != size || hasher.finalize().to_hex().as_str() != blake3 {
                    return Err(std::io::Error::other("the stream read back differs from its manifest (size or BLAKE3)"));
                }
                return Ok(b);
            }
            hasher.update(&b);
            *n += b.len() as u64;
            Ok(b)
        });
        Ok(tokio_util::io::StreamReader::new(Box::pin(checked)))
    }

    /// Stops an upload and forgets it.
    async fn drop_pending(&self, key: &Key, p: &Pending) {
        let Ok(o) = self.opened().await else { return };
        let object = Key::from(format!("{}{}", o.root, p.object));
        if let Err(e) = o.s3.abort_multipart(&object, &p.upload_id.clone()).await {
            tracing::debug!(replica = self.name, "aborting upload of {object}: {e}");
        }
        if let Err(e) = o.s3.delete(key).await {
            tracing::warn!(replica = self.name, "cannot delete {key}: {e}");
        }
    }

    /// Deletes the streams no kept snapshot needs (retention.replica), and data objects left
    /// by uploads that neither finished nor are under way. Manifests go first, so a snapshot
    /// is never listed without its data.
    pub async fn prune(&self) -> Result<usize> {
        let o = self.opened().await?;
        let manifests = self.manifests().await?;
        let held = chain::held(&manifests);
        let pendings = self.pendings().await?;
        let protect: Vec<_> =
            held.iter().filter(|s| pendings.iter().any(|(_, p)| p.base.as_deref() == Some(&s.identity))).map(|s| (s.name.clone(), Reason::InFlight)).collect();
        let plan = SidePlan::new(held.clone(), &self.policy, &self.policy.retention.replica, &protect, Utc::now());
        let doomed: Vec<&Snapshot> = plan.doomed().collect();
        let keep: Vec<String> = held.iter().filter(|s| !doomed.contains(s)).map(|s| s.identity.clone()).collect();
        let mut n = 0;
        for m in chain::unneeded(&manifests, &keep) {
            let key = m.object.strip_prefix("streams/").unwrap_or(&m.object);
            o.s3.delete(&Key::from(format!("{}manifests/{key}", o.root))).await.with_context(|| format!("cannot delete from {}", self.what()))?;
            o.s3.delete(&Key::from(format!("{}{}", o.root, m.object))).await.with_context(|| format!("cannot delete from {}", self.what()))?;
            tracing::info!(replica = self.name, snapshot = m.snapshot, "pruned a stream from the object store");
            n += 1;
        }
        let live: Vec<String> = manifests.iter().map(|m| m.object.clone()).chain(pendings.iter().map(|(_, p)| p.object.clone())).collect();
        for key in list_keys(o, &format!("{}streams/", o.root)).await? {
            let rel = key.as_ref().strip_prefix(o.root.as_str()).unwrap_or(key.as_ref()).to_string();
            if !live.contains(&rel) {
                o.s3.delete(&key).await.with_context(|| format!("cannot delete {key} from {}", self.what()))?;
            }
        }
        Ok(n)
    }

    /// Uploads `stream` as the stream `incoming`, after the parts a cut upload stored when
    /// `start` resumes it.
    async fn upload(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        let o = self.opened().await?;
        let name = incoming.name.to_string();
        if !chain::key_safe(&incoming.identity) || !incoming.base.as_deref().is_none_or(chain::key_safe) {
            bail!("identity {:?} cannot name an object", incoming.identity);
        }
        let skey = chain::stream_key(&name, &incoming.identity, incoming.base.as_deref());
        let pending_key = Key::from(format!("{}pending/{skey}", o.root));
        let object_rel = format!("streams/{skey}");
        let object = Key::from(format!("{}{object_rel}", o.root));
        let (mut p, mut hasher) = match start.start {
            Start::Resume(r) => {
                let found = self.pendings().await?.into_iter().find(|(k, _)| *k == pending_key);
                match found {
                    Some((_, p)) if p.offset == r.offset => {
                        tracing::info!(
                            replica = self.name,
                            snapshot = name,
                            "resumed an upload after {} bytes already stored ({} parts)",
                            p.offset,
                            p.parts.len()
                        );
                        (p, r.hasher)
                    }
                    _ => bail!("the upload to resume is no longer recorded in {}; it starts over next time", self.what()),
                }
            }
            Start::FromToken => bail!("an object store takes no ZFS resume token"),
            Start::Fresh => {
                // One upload at a time per replica: any other cut one is given up.
                for (k, old) in self.pendings().await? {
                    self.drop_pending(&k, &old).await;
                }
                let upload_id = o.s3.create_multipart(&object).await.with_context(|| format!("cannot start an upload to {}", self.what()))?;
                let p = Pending {
                    snapshot: name.clone(),
                    identity: incoming.identity.clone(),
                    base: incoming.base.clone(),
                    compact: start.compact,
                    object: object_rel.clone(),
                    upload_id,
                    parts: Vec::new(),
                    etags: Vec::new(),
                    offset: 0,
                    prefix_blake3: blake3::Hasher::new().finalize().to_hex().to_string(),
                };
                (p, blake3::Hasher::new())
            }
        };
        let part_size = self.spec.part_size.0 as usize;
        let mut pacer = Pacer::new(self.policy.transfer.bandwidth_limit);
        let mut buf = vec![0u8; part_size];
        let object_name = object.to_string();
        let resumed_from = p.offset;
        loop {
            let n = read_full(stream, &mut buf).await.context("reading the send stream")?;
            if n == 0 && !p.parts.is_empty() {
                break;
            }
            hasher.update(&buf[..n]);
            let index = p.parts.len();
            let (key, ctx) = (o.key.clone(), seal::part_context(&object_name, index));
            let (sealed, plain_hash, back) = tokio::task::spawn_blocking(move || {
                let hash = blake3::hash(&buf[..n]).to_hex().to_string();
                (key.seal(&buf[..n], &ctx), hash, buf)
            })
            .await
            .context("sealing task panicked")?;
            buf = back;
            pacer.wait(sealed.len()).await;
            let sealed_len = sealed.len() as u64;
            let part: PartId = match o.s3.put_part(&object, &p.upload_id, index, sealed.into()).await {
                Ok(id) => id,
                Err(e @ object_store::Error::NotFound { .. }) => {
                    // The store dropped the upload: forget it, so the next attempt starts over.
                    self.drop_pending(&pending_key, &p).await;
                    return Err(e).with_context(|| format!("the upload to {} was dropped by the store", self.what()));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot upload part {} to {}", index + 1, self.what())),
            };
            p.parts.push(Part { plain: n as u64, sealed: sealed_len, blake3: plain_hash });
            p.etags.push(part.content_id);
            p.offset += n as u64;
            p.prefix_blake3 = hasher.finalize().to_hex().to_string();
            put_sealed(o, &pending_key, &p).await?;
            if n < part_size {
                break;
            }
        }
        let ids = p.etags.iter().map(|e| PartId { content_id: e.clone() }).collect();
        o.s3.complete_multipart(&object, &p.upload_id, ids).await.with_context(|| format!("cannot complete the upload to {}", self.what()))?;
        let manifest = Manifest {
            fileset: self.policy.fileset.0.clone(),
            snapshot: name,
            identity: p.identity.clone(),
            base: p.base.clone(),
            compact: p.compact,
            size: p.offset,
            blake3: hasher.finalize().to_hex().to_string(),
            object: object_rel,
            parts: p.parts.clone(),
            uploaded: Utc::now(),
        };
        put_sealed(o, &Key::from(format!("{}manifests/{skey}", o.root)), &manifest).await?;
        if let Err(e) = o.s3.delete(&pending_key).await {
            tracing::warn!(replica = self.name, "cannot delete the finished upload's record {pending_key}: {e}");
        }
        tracing::info!(
            replica = self.name,
            "{}: uploaded {} bytes in this attempt; {} bytes in {} parts stored in the object store",
            manifest.snapshot,
            manifest.size - resumed_from,
            manifest.size,
            manifest.parts.len()
        );
        Ok(())
    }
}

#[async_trait]
impl ReplicaEndpoint for ObjectReplica {
    fn node(&self) -> &str {
        &self.name
    }

    async fn list(&self) -> Result<Listing> {
        let manifests = self.manifests().await?;
        let mut snapshots = chain::held(&manifests);
        if !snapshots.is_empty() && chain::full_due(&manifests, Utc::now(), self.spec.full_every.0, self.spec.full_ratio) {
            tracing::info!(replica = self.name, "a new full stream is due (full_every / full_ratio): offering no base");
            snapshots.clear();
        }
        let resumable = self.pendings().await?.into_iter().map(|(_, p)| p).filter(|p| p.offset > 0).max_by(|a, b| a.snapshot.cmp(&b.snapshot)).map(|p| {
            Partial { snapshot: p.snapshot, identity: p.identity, base: p.base, compact: p.compact, offset: p.offset, blake3: p.prefix_blake3, token: None }
        });
        // Streams are stored in the classic format, which any btrfs can receive at restore.
        Ok(Listing { snapshots, accepts_compact: false, resumable, downstream: Vec::new(), free: None })
    }

    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        self.upload(incoming, start, stream).await?;
        // A failed prune must not turn a good upload into a failed one.
        if let Err(e) = self.prune().await {
            tracing::error!(replica = self.name, "pruning the object store failed: {e:#}");
        }
        Ok(())
    }
}

/// What `snapship check` (and `run`, before it starts) finds wrong with the files an object
/// store needs on this node, without asking the store: (key, message) pairs.
pub fn check_files(spec: &StoreReplica) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let key = |k: &str| format!("replicas[{}].{k}", spec.index);
    if let Err(e) = SealKey::load(&spec.encryption_key) {
        out.push((key("encryption_key"), format!("{e:#}")));
    }
    if let Err(e) = credentials(spec) {
        out.push((key("object_store.credentials"), format!("{e:#}")));
    }
    out
}

/// Reads until `buf` is full or the stream ends; how much was read.
async fn read_full(stream: &mut (dyn AsyncRead + Send + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

/// The access key id and secret: from the replica's credentials file, else from the
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
fn credentials(spec: &StoreReplica) -> Result<(String, String)> {
    let (mut id, mut secret) = (None, None);
    match &spec.object_store.credentials {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read the credentials file {}: {e}", path.display()))?;
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let line = line.strip_prefix("export ").unwrap_or(line);
                let Some((k, v)) = line.split_once('=') else { continue };
                let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
                match k.trim() {
                    "AWS_ACCESS_KEY_ID" => id = Some(v),
                    "AWS_SECRET_ACCESS_KEY" => secret = Some(v),
                    _ => {}
                }
            }
            match (id, secret) {
                (Some(i), Some(s)) => Ok((i, s)),
                _ => bail!("{} needs an AWS_ACCESS_KEY_ID=… and an AWS_SECRET_ACCESS_KEY=… line", path.display()),
            }
        }
        None => match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(i), Ok(s)) => Ok((i, s)),
            _ => bail!(
                "no credentials for object store `{}`: name a file under `object_store.credentials`, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                spec.name
            ),
        },
    }
}

async fn list_keys(o: &Opened, prefix: &str) -> Result<Vec<Key>> {
    let prefix = Key::from(prefix.trim_end_matches('/'));
    let metas: Vec<_> = o.s3.list(Some(&prefix)).try_collect().await?;
    let mut keys: Vec<Key> = metas.into_iter().map(|m| m.location).collect();
    keys.sort();
    Ok(keys)
}

async fn get_sealed<T: serde::de::DeserializeOwned>(o: &Opened, key: &Key) -> Result<T> {
    let blob = o.s3.get(key).await.with_context(|| format!("cannot read {key}"))?.bytes().await.with_context(|| format!("cannot read {key}"))?;
    let plain = o.key.open(&blob, key.as_ref().as_bytes()).with_context(|| format!("{key}"))?;
    serde_json::from_slice(&plain).with_context(|| format!("{key} is not a snapship record"))
}

async fn put_sealed<T: Serialize>(o: &Opened, key: &Key, value: &T) -> Result<()> {
    let plain = serde_json::to_vec(value).expect("records serialize");
    let blob = o.key.seal(&plain, key.as_ref().as_bytes());
    o.s3.put(key, blob.into()).await.with_context(|| format!("cannot write {key}"))?;
    Ok(())
}
