//! `snapship verify --replica STORE`: checks an object store's copy of a snapshot against
//! the store's own manifests (docs/object-storage.md), without restoring it.
//!
//! The copy is the chain of streams that rebuilds the snapshot. By default each stream's
//! data object is looked up and its size compared with the sum of the sealed parts its
//! manifest lists (cheap: no download; it finds an object lost, cut or replaced by one of
//! another size). With `full`, every part is also downloaded, opened under the key (which
//! fails for a changed byte) and hashed against its manifest, and each whole stream's size
//! and BLAKE3 are checked, as a restore would. Every finding names its object (and part);
//! only a store that cannot be read makes the verify fail.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as Key;

use super::chain::{self, Manifest};
use super::{ObjectReplica, list_keys, seal};
use crate::snapshot;

/// What a verify of a store's copy found.
#[derive(Debug)]
pub struct StoreVerified {
    pub snapshot: String,
    /// Streams in the snapshot's chain, and parts downloaded and checked (`full` only).
    pub streams: usize,
    pub parts: usize,
    /// Plain bytes downloaded and hashed (`full` only).
    pub bytes: u64,
    pub full: bool,
    /// Each finding in words, naming the object: empty when the copy is intact.
    pub differences: Vec<String>,
    pub elapsed: Duration,
}

impl StoreVerified {
    /// How it was checked, for the one-line report.
    pub fn how(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        if self.full {
            format!(
                "{} streams, {} parts downloaded, decrypted and hashed against their manifests ({:.1} MB), {secs:.1}s",
                self.streams,
                self.parts,
                self.bytes as f64 / 1e6
            )
        } else {
            format!("{} streams: objects present with their manifests' sizes; --full downloads and hashes every part, {secs:.1}s", self.streams)
        }
    }
}

/// Verifies `store`'s copy of the snapshot named `which` (with or without the `snapship-`
/// prefix), or of the newest it holds.
pub async fn verify(store: &ObjectReplica, which: Option<&str>, full: bool) -> Result<StoreVerified> {
    let started = Instant::now();
    let (manifests, mut differences) = readable_manifests(store).await?;
    let held = chain::held(&manifests);
    let chosen = match which {
        Some(text) => {
            let prefixed = format!("{}{text}", snapshot::name::PREFIX);
            held.iter().find(|s| s.name.as_str() == text || s.name.as_str() == prefixed)
        }
        None => held.last(),
    };
    let Some(chosen) = chosen else {
        if !differences.is_empty() {
            // What could not be read may be what the snapshot needed: that is the finding.
            let snapshot = which.unwrap_or("(newest)").to_string();
            return Ok(StoreVerified { snapshot, streams: 0, parts: 0, bytes: 0, full, differences, elapsed: started.elapsed() });
        }
        match which {
            Some(text) => bail!("{} holds no snapshot named `{text}` (`snapship list` shows what it holds)", store.what()),
            None => bail!("{} holds no snapshot yet: run `snapship sync` first", store.what()),
        }
    };
    let steps = chain::chain(&manifests, &chosen.identity).ok_or_else(|| anyhow!("the chain of {} is incomplete", chosen.name))?;
    let mut parts = 0;
    let mut bytes = 0;
    for m in &steps {
        let found = check_stream(store, m, full).await?;
        parts += found.parts;
        bytes += found.bytes;
        differences.extend(found.differences);
    }
    Ok(StoreVerified { snapshot: chosen.name.to_string(), streams: steps.len(), parts, bytes, full, differences, elapsed: started.elapsed() })
}

/// The manifests that open under our key and belong to this file set, and a finding for
/// each one that does not. Only a failure to read the store is an error.
async fn readable_manifests(store: &ObjectReplica) -> Result<(Vec<Manifest>, Vec<String>)> {
    let o = store.opened().await?;
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for key in list_keys(o, &format!("{}manifests/", o.root)).await.with_context(|| format!("cannot list {}", store.what()))? {
        let blob = o.s3.get(&key).await.with_context(|| format!("cannot read {key}"))?.bytes().await.with_context(|| format!("cannot read {key}"))?;
        let m = match o.key.open(&blob, key.as_ref().as_bytes()) {
            Ok(plain) => serde_json::from_slice::<Manifest>(&plain).map_err(|e| format!("{key}: opens, but is not a snapship manifest ({e})")),
            Err(e) => Err(format!("{key}: {e:#}")),
        };
        match m {
            Ok(m) if m.fileset == store.policy.fileset.0 && chain::key_safe(&m.identity) && m.base.as_deref().is_none_or(chain::key_safe) => good.push(m),
            Ok(_) => bad.push(format!("{key}: not a manifest of file set `{}`", store.policy.fileset)),
            Err(finding) => bad.push(finding),
        }
    }
    Ok((good, bad))
}

/// What checking one stream found.
struct StreamCheck {
    parts: usize,
    bytes: u64,
    differences: Vec<String>,
}

/// Checks the data object of the stream `m`: present with the size its manifest gives and,
/// when `full`, each part and the whole against the manifest.
async fn check_stream(store: &ObjectReplica, m: &Manifest, full: bool) -> Result<StreamCheck> {
    let o = store.opened().await?;
    let object = format!("{}{}", o.root, m.object);
    let key = Key::from(object.as_str());
    let mut out = StreamCheck { parts: 0, bytes: 0, differences: Vec::new() };
    let expected: u64 = m.parts.iter().map(|p| p.sealed).sum();
    match o.s3.head(&key).await {
        Ok(meta) if meta.size == expected => {}
        Ok(meta) => {
            out.differences.push(format!("{object}: {} bytes in the store, its manifest lists {expected} in {} parts", meta.size, m.parts.len()));
            return Ok(out);
        }
        Err(object_store::Error::NotFound { .. }) => {
            out.differences.push(format!("{object}: missing from the store (its manifest lists {} parts, {expected} bytes)", m.parts.len()));
            return Ok(out);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot look up {object} in {}", store.what())),
    }
    if !full {
        return Ok(out);
    }
    // Each part in its place, two at a time, checked on a blocking thread.
    let ranges = m.sealed_ranges();
    let n = m.parts.len();
    let mut checked = futures::stream::iter(ranges)
        .map(|(i, range, part)| {
            let (s3, seal_key, key, object) = (o.s3.clone(), o.key.clone(), key.clone(), object.clone());
            async move {
                let sealed = s3.get_range(&key, range).await.with_context(|| format!("cannot read part {} of {object}", i + 1))?;
                tokio::task::spawn_blocking(move || {
                    let plain = match seal_key.open(&sealed, &seal::part_context(&object, i)) {
                        Ok(plain) => plain,
                        Err(e) => return Ok((None, Some(format!("{object} part {} of {n}: {e:#}", i + 1)))),
                    };
                    let finding = if plain.len() as u64 != part.plain {
                        Some(format!("{object} part {} of {n}: {} plain bytes, its manifest says {}", i + 1, plain.len(), part.plain))
                    } else if blake3::hash(&plain).to_hex().as_str() != part.blake3 {
                        Some(format!("{object} part {} of {n}: its BLAKE3 differs from its manifest's", i + 1))
                    } else {
                        None
                    };
                    Ok::<_, anyhow::Error>((Some(plain), finding))
                })
                .await
                .context("the checking task panicked")?
            }
        })
        .buffered(2);
    let mut whole = blake3::Hasher::new();
    let mut size = 0u64;
    while let Some(result) = checked.next().await {
        let (plain, finding) = result?;
        out.parts += 1;
        if let Some(plain) = plain {
            whole.update(&plain);
            size += plain.len() as u64;
        }
        out.differences.extend(finding);
    }
    out.bytes = size;
    if out.differences.is_empty() && (size != m.size || whole.finalize().to_hex().as_str() != m.blake3) {
        out.differences.push(format!("{object}: the stream read back ({size} bytes) differs from its manifest (size {} or BLAKE3)", m.size));
    }
    Ok(out)
}
