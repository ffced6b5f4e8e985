//! The btrfs backend.
//!
//! Snapshots, subvolume facts and deletion go through libbtrfsutil (blocking ioctls, so each
//! call runs on a blocking thread); send and receive have no library API and run the `btrfs`
//! command through the runner, streamed.
//!
//! Origin: read-only snapshots in `snapshot_dir`, named by [`SnapshotName`]; identity = uuid.
//!
//! Replica: `<path>/<name>` are complete received snapshots (read-only, `received_uuid` set:
//! identity = received_uuid) and `<path>/latest` links to the newest. A stream is received
//! into `<path>/.snapship-staging/`, checked, then renamed into place, so an interrupted
//! receive is never visible as a snapshot; leftovers in staging are removed before the next
//! receive (see [`BtrfsReplica::publish`] for how a read-only subvolume gets moved). A lock
//! file in staging keeps two receives from sharing it.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use chrono::Utc;
use libbtrfsutil::{CreateSnapshotOptions, DeleteSubvolumeOptions};
use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::runner::{Cmd, Pipe};
use super::{Incoming, Kind, OriginSide, ReplicaSide, SendStream, Snapshot, SnapshotName};

pub const STAGING_DIR: &str = ".snapship-staging";
pub const LATEST: &str = "latest";
/// Prefix of the hidden name a snapshot has for a moment while being moved into place.
const PUBLISHING: &str = ".snapship-publishing-";

/// Runs a blocking libbtrfsutil call off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("blocking btrfs task panicked")?
}

/// libbtrfsutil's messages omit errno; add it.
fn util_error(what: String, e: libbtrfsutil::Error) -> anyhow::Error {
    anyhow!("{what}: {e} ({})", e.os_error())
}

/// Names in `dir` that are snapship snapshot names, oldest first. A missing dir is empty.
fn our_names(dir: &Path) -> Result<Vec<SnapshotName>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if let Some(name) = entry.file_name().to_str().and_then(SnapshotName::parse) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Facts of the subvolume at `path`, as a [`Snapshot`] named `name`. `received` selects the
/// replica's view (identity = received_uuid; `None` when the subvolume is not a complete receive).
fn describe(path: &Path, name: SnapshotName, received: bool) -> Result<Option<Snapshot>> {
    let info = libbtrfsutil::subvolume_info(path).map_err(|e| util_error(format!("cannot read subvolume {}", path.display()), e))?;
    let read_only = libbtrfsutil::subvolume_read_only(path).map_err(|e| util_error(format!("cannot read flags of {}", path.display()), e))?;
    let identity = if received {
        match info.received_uuid() {
            Some(uuid) if read_only => uuid.to_string(),
            _ => return Ok(None),
        }
    } else {
        if !read_only {
            return Ok(None);
        }
        info.uuid().to_string()
    };
    Ok(Some(Snapshot { name, identity, local_id: Some(info.uuid().to_string()), parent_local_id: info.parent_uuid().map(|u| u.to_string()) }))
}

fn delete_subvolume(path: &Path) -> Result<()> {
    DeleteSubvolumeOptions::new().delete(path).map_err(|e| util_error(format!("cannot delete subvolume {}", path.display()), e))
}

/// Whether btrfs-progs here can receive protocol 2 (it came with `--force-decompress`).
async fn receive_v2_supported() -> bool {
    static SUPPORTED: OnceCell<bool> = OnceCell::const_new();
    *SUPPORTED
        .get_or_init(|| async { Cmd::new("btrfs").arg("receive").arg("--help").output().await.is_ok_and(|help| help.contains("--force-decompress")) })
        .await
}

/// Whether this kernel and btrfs-progs can send protocol 2 with compressed data.
async fn send_v2_supported() -> bool {
    static SUPPORTED: OnceCell<bool> = OnceCell::const_new();
    *SUPPORTED
        .get_or_init(|| async {
            let kernel =
                std::fs::read_to_string("/sys/fs/btrfs/features/send_stream_version").ok().and_then(|v| v.trim().parse::<u32>().ok()).is_some_and(|v| v >= 2);
            // `btrfs send --help` exits 0 and lists the option where it exists.
            let progs = Cmd::new("btrfs").arg("send").arg("--help").output().await.is_ok_and(|help| help.contains("--compressed-data"));
            tracing::debug!(kernel, progs, "btrfs send protocol 2 support");
            kernel && progs
        })
        .await
}

pub struct BtrfsOrigin {
    subvolume: PathBuf,
    snapshot_dir: PathBuf,
    /// Generations of read-only snapshots (they never change): one ioctl less per poll.
    generations: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl BtrfsOrigin {
    pub fn new(subvolume: PathBuf, snapshot_dir: PathBuf) -> Self {
        BtrfsOrigin { subvolume, snapshot_dir, generations: Default::default() }
    }

    fn path_of(&self, snapshot: &Snapshot) -> PathBuf {
        self.snapshot_dir.join(snapshot.name.as_str())
    }
}

#[async_trait]
impl OriginSide for BtrfsOrigin {
    async fn take_snapshot(&self, kind: Kind) -> Result<Snapshot> {
        let (src, dir) = (self.subvolume.clone(), self.snapshot_dir.clone());
        blocking(move || {
            match libbtrfsutil::is_subvolume(&src) {
                Ok(true) => {}
                Ok(false) => bail!("{} is not a btrfs subvolume; create it with `btrfs subvolume create {}`", src.display(), src.display()),
                Err(e) => return Err(util_error(format!("cannot use {} as a btrfs subvolume", src.display()), e)),
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create snapshot directory {}", dir.display()))?;
            let mut name = SnapshotName::next(Utc::now(), our_names(&dir)?.last(), kind);
            loop {
                let target = dir.join(name.as_str());
                match CreateSnapshotOptions::new().readonly(true).create(&src, &target) {
                    Ok(()) => break,
                    Err(e) if e.errno() == nix::errno::Errno::EEXIST as i32 => name = name.successor(),
                    Err(e) if e.errno() == nix::errno::Errno::EXDEV as i32 => bail!(
                        "cannot snapshot {} into {}: not on the same btrfs filesystem; set `origin.snapshot_dir` to a directory on it",
                        src.display(),
                        dir.display()
                    ),
                    Err(e) => return Err(util_error(format!("cannot snapshot {} to {}", src.display(), target.display()), e)),
                }
            }
            let path = dir.join(name.as_str());
            describe(&path, name, false)?.ok_or_else(|| anyhow!("new snapshot {} is not read-only", path.display()))
        })
        .await
    }

    async fn changed_since(&self, snapshot: &Snapshot, flush: bool) -> Result<bool> {
        let (src, snap) = (self.subvolume.clone(), self.path_of(snapshot));
        let known = self.generations.lock().expect("generations lock").get(snapshot.name.as_str()).copied();
        let (now, then) = blocking(move || {
            // Generations move at transaction commit; commit what is dirty first, so a change
            // shows now rather than within 30 s.
            if flush {
                sync_fs(&src)?;
            }
            let now = libbtrfsutil::subvolume_info(&src).map_err(|e| util_error(format!("cannot read subvolume {}", src.display()), e))?;
            let then = match known {
                Some(g) => g,
                None => libbtrfsutil::subvolume_info(&snap).map_err(|e| util_error(format!("cannot read snapshot {}", snap.display()), e))?.generation(),
            };
            Ok((now.generation(), then))
        })
        .await?;
        let mut cache = self.generations.lock().expect("generations lock");
        if cache.len() > 16 {
            cache.clear();
        }
        cache.insert(snapshot.name.to_string(), then);
        // Taking the snapshot left both at the same generation.
        Ok(now > then)
    }

    async fn list(&self) -> Result<Vec<Snapshot>> {
        let dir = self.snapshot_dir.clone();
        blocking(move || {
            let mut out = Vec::new();
            for name in our_names(&dir)? {
                let path = dir.join(name.as_str());
                match describe(&path, name, false) {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => tracing::warn!(path = %path.display(), "ignoring a writable subvolume with a snapshot name"),
                    Err(e) => tracing::warn!(path = %path.display(), "ignoring what is not a snapshot: {e:#}"),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn send(&self, snapshot: &Snapshot, base: Option<&Snapshot>, compact: bool) -> Result<SendStream> {
        let mut cmd = Cmd::new("btrfs").arg("send").arg("-q");
        if compact && send_v2_supported().await {
            cmd = cmd.arg("--proto").arg("2").arg("--compressed-data");
        }
        if let Some(base) = base {
            cmd = cmd.arg("-p").arg(self.path_of(base));
        }
        let mut process = cmd.arg(self.path_of(snapshot)).spawn(Pipe::Out)?;
        Ok(SendStream::new(Box::new(process.stdout()), process))
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        let path = self.path_of(snapshot);
        blocking(move || delete_subvolume(&path)).await
    }
}

pub struct BtrfsReplica {
    dir: PathBuf,
}

impl BtrfsReplica {
    pub fn new(dir: PathBuf) -> Self {
        BtrfsReplica { dir }
    }

    fn staging(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    /// Creates the replica and staging directories, takes the receive lock and removes
    /// whatever an interrupted receive left in staging.
    fn prepare(&self) -> Result<Flock<File>> {
        let staging = self.staging();
        std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        let lock_path = staging.join(".lock");
        let file = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| super::ReceiveBusy(self.dir.display().to_string()))?;
        for entry in std::fs::read_dir(&staging).with_context(|| format!("cannot list {}", staging.display()))? {
            let path = entry?.path();
            if path == lock_path {
                continue;
            }
            tracing::info!(path = %path.display(), "removing what an interrupted receive left");
            remove_any(&path)?;
        }
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(PUBLISHING) {
                tracing::info!(path = %entry.path().display(), "removing a snapshot whose move into place was interrupted");
                remove_any(&entry.path())?;
            }
        }
        Ok(lock)
    }

    /// Points `latest` at the newest complete snapshot (or removes it), atomically.
    fn update_latest(&self) -> Result<()> {
        let latest = self.dir.join(LATEST);
        let newest = self.complete()?.pop();
        match newest {
            None => match std::fs::remove_file(&latest) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e).with_context(|| format!("cannot remove {}", latest.display())),
                _ => Ok(()),
            },
            Some(s) => {
                static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tmp = self.dir.join(format!(".{LATEST}.tmp-{}-{n}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(s.name.as_str(), &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
                std::fs::rename(&tmp, &latest).with_context(|| format!("cannot replace {}", latest.display()))
            }
        }
    }

    /// Complete received snapshots, oldest first (blocking).
    fn complete(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for name in our_names(&self.dir)? {
            let path = self.dir.join(name.as_str());
            match describe(&path, name, true) {
                Ok(Some(s)) => out.push(s),
                Ok(None) => tracing::warn!(path = %path.display(), "ignoring a subvolume that is not a complete received snapshot"),
                Err(e) => tracing::warn!(path = %path.display(), "ignoring what is not a snapshot: {e:#}"),
            }
        }
        Ok(out)
    }
}

fn remove_any(path: &Path) -> Result<()> {
    if libbtrfsutil::is_subvolume(path).unwrap_or(false) {
        delete_subvolume(path)
    } else if path.is_dir() {
        std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
    } else {
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
    }
}

fn set_read_only(path: &Path, read_only: bool) -> Result<()> {
    libbtrfsutil::set_subvolume_read_only(path, read_only).map_err(|e| util_error(format!("cannot set read-only={read_only} on {}", path.display()), e))
}

fn sync_fs(path: &Path) -> Result<()> {
    libbtrfsutil::sync(path).map_err(|e| util_error(format!("cannot sync the filesystem of {}", path.display()), e))
}

#[async_trait]
impl ReplicaSide for BtrfsReplica {
    async fn list(&self) -> Result<Vec<Snapshot>> {
        let me = BtrfsReplica::new(self.dir.clone());
        blocking(move || me.complete()).await
    }

    async fn accepts_compact(&self) -> bool {
        receive_v2_supported().await
    }

    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot> {
        let me = BtrfsReplica::new(self.dir.clone());
        let lock = blocking(move || me.prepare()).await?;
        let staged = self.staging().join(incoming.name.as_str());
        let result = self.receive_into_staging(incoming, stream, &staged).await;
        let me = BtrfsReplica::new(self.dir.clone());
        let (name, identity) = (incoming.name.clone(), incoming.identity.clone());
        blocking(move || {
            let outcome = result.and_then(|()| me.publish(&staged, name, &identity));
            if outcome.is_err() && staged.exists() {
                if let Err(e) = remove_any(&staged) {
                    tracing::error!("cannot remove the partial receive {}: {e:#}", staged.display());
                }
            }
            drop(lock);
            outcome
        })
        .await
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        let me = BtrfsReplica::new(self.dir.clone());
        let path = self.dir.join(snapshot.name.as_str());
        blocking(move || {
            delete_subvolume(&path)?;
            me.update_latest()
        })
        .await
    }
}

impl BtrfsReplica {
    async fn receive_into_staging(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin), staged: &Path) -> Result<()> {
        // --chroot: whatever paths the stream names, the receive cannot write outside staging.
        let mut process = Cmd::new("btrfs").arg("receive").arg("-q").arg("-e").arg("--chroot").arg(self.staging()).spawn(Pipe::In)?;
        let mut stdin = process.stdin();
        let copied = tokio::io::copy_buf(&mut tokio::io::BufReader::with_capacity(super::PIPE_BUFFER, stream), &mut stdin).await;
        let flushed = match copied {
            Ok(_) => stdin.shutdown().await.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        drop(stdin);
        if let Err(e) = flushed {
            let cmdline = process.cmdline().to_string();
            let receive = process.wait().await;
            let broken_pipe = e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == ErrorKind::BrokenPipe);
            return match receive {
                // `btrfs receive` gave up first (a missing parent, a full disk): its message is the cause.
                Err(pe) if broken_pipe => Err(pe.into()),
                // Otherwise the stream's error is the cause (checksum, cut, abort); the receive,
                // which failed on the broken stream, only adds detail.
                Err(pe) => Err(e.context(format!("stream into `{cmdline}` broke ({pe})"))),
                Ok(()) => Err(e.context(format!("stream into `{cmdline}` broke"))),
            };
        }
        process.wait().await?;
        if !staged.exists() {
            bail!("the stream did not contain snapshot {} (wrong stream for this file set?)", incoming.name);
        }
        Ok(())
    }

    /// Checks the staged snapshot and moves it into place (blocking).
    ///
    /// btrfs refuses to move a read-only subvolume to another directory (its `..` would
    /// change), so the snapshot is made writable for one rename into a hidden name beside its
    /// final place, made read-only again, and then renamed within that directory, which btrfs
    /// allows. The kernel keeps `received_uuid` and the send transid across the flip (it is
    /// `btrfs property set ro false` that clears them), so later incremental receives still
    /// find it as their parent. It is never visible while writable.
    fn publish(&self, staged: &Path, name: SnapshotName, identity: &str) -> Result<Snapshot> {
        let got = describe(staged, name.clone(), true)?
            .ok_or_else(|| anyhow!("received {} is incomplete: not read-only or without received_uuid", staged.display()))?;
        if got.identity != identity {
            bail!("received {} has identity {}, expected {identity}", staged.display(), got.identity);
        }
        let target = self.dir.join(name.as_str());
        if target.exists() {
            bail!("{} already exists and is a different snapshot; move it away to receive this one", target.display());
        }
        let hidden = self.dir.join(format!("{PUBLISHING}{name}"));
        set_read_only(staged, false)?;
        std::fs::rename(staged, &hidden).with_context(|| format!("cannot move {} to {}", staged.display(), hidden.display()))?;
        let placed = set_read_only(&hidden, true).and_then(|()| {
            describe(&hidden, name.clone(), true)?
                .filter(|s| s.identity == identity)
                .ok_or_else(|| anyhow!("{} lost its received identity while being moved into place", hidden.display()))?;
            std::fs::rename(&hidden, &target).with_context(|| format!("cannot move {} to {}", hidden.display(), target.display()))
        });
        if let Err(e) = placed {
            let _ = remove_any(&hidden);
            return Err(e);
        }
        self.update_latest()?;
        // One commit makes the received data, the rename and `latest` durable together:
        // btrfs transactions are atomic and ordered, so the rename can never be on disk
        // without the data received before it.
        sync_fs(&self.dir)?;
        Ok(Snapshot { name, ..got })
    }
}
