//! The btrfs backend.
//!
//! Snapshots, subvolume facts and deletion go through libbtrfsutil (blocking ioctls, so each
//! call runs on a blocking thread); send and receive have no library API and run the `btrfs`
//! command through the runner, streamed.
//!
//! Origin: read-only snapshots in `snapshot_dir`, named by [`SnapshotName`].
//!
//! Replica: `<path>/<name>` are complete received snapshots and `<path>/latest` links to
//! the newest.
//!
//! Identity, on both sides, is what every copy of a snapshot shares: `received_uuid` for a
//! received snapshot, the uuid for one taken here. After a promotion the new origin's
//! received snapshots and the old origin's own ones are bases on both sides: `btrfs send -p`
//! of a received parent names it by its `received_uuid`, and `btrfs receive` finds a parent
//! by `received_uuid` and falls back to the uuid. Each stream is received
//! into a new directory of its own in `<path>/.snapship-staging/`, checked, then renamed into
//! place, so an interrupted receive is never visible as a snapshot; leftovers in staging are
//! removed before the next receive (see [`Transfer::publish`] for what is accepted and how a
//! read-only subvolume gets moved). A lock file in staging keeps two receives from sharing it.
//!
//! The stream is shaped by the origin, which may be hostile: it can make any names, symlinks
//! or several subvolumes. So the replica side never follows a symlink in its directories and
//! refuses a replica path that others could change; it works on directory fds
//! ([`safe_dir`]).

mod safe_dir;
mod stream_check;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use chrono::Utc;
use libbtrfsutil::{CreateSnapshotOptions, DeleteSubvolumeOptions};
use nix::fcntl::{Flock, FlockArg};
use rustix::fs::FileType;
use safe_dir::{Role, SafeDir};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::runner::{Cmd, Pipe};
use super::{Incoming, Kind, OriginSide, ReplicaSide, SendStream, Snapshot, SnapshotName};

pub const STAGING_DIR: &str = ".snapship-staging";
pub const LATEST: &str = "latest";
/// The receive lock, in staging.
const LOCK: &str = ".lock";
/// Prefix of the hidden name a snapshot has for a moment while being moved into place.
const PUBLISHING: &str = ".snapship-publishing-";
/// Prefix of the temporary symlink that is renamed over `latest`.
const LATEST_TMP: &str = ".latest.tmp-";
/// Prefix of a transfer's own directory in staging.
const RECEIVING: &str = "receive-";
/// Beside the received snapshots: per snapshot, its `ctransid` once published (its seal).
/// A received snapshot never changes; one whose `ctransid` moved was made writable behind
/// snapship's back (a raw ioctl keeps its received UUID) and changed ([`TAMPERED`]).
const SEALS: &str = ".snapship-seals";
/// The prefix a received snapshot changed after it was published has on its identity: it
/// then matches no origin snapshot, so it is never a common base; verify still finds it by
/// name and shows what differs. A new receive of the same name moves it aside under
/// [`TAMPERED_ASIDE`] (kept, never deleted by snapship).
pub const TAMPERED: &str = "tampered:";
const TAMPERED_ASIDE: &str = "tampered-";

/// How many blocking btrfs calls run at a time, node-wide. Thousands of file sets starting
/// together (each listing its snapshots, then its first check or snapshot) would otherwise
/// take tokio's blocking pool to its 512 threads, each in the kernel on the same filesystem:
/// the calls queue here instead, as tasks, and the pool stays small.
const BLOCKING_AT_ONCE: usize = 16;

/// Runs a blocking libbtrfsutil call off the async workers, at most [`BLOCKING_AT_ONCE`]
/// at a time.
///
/// # Cancel safety
/// Dropped while waiting for a slot, nothing ran. Dropped once the call started, the call
/// runs to its end on its thread (outside the bound: its slot is given back at once).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BLOCKING_AT_ONCE);
    let _slot = SLOTS.acquire().await.context("the btrfs call slots are closed")?;
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
    let names = entries.map(|entry| entry.map(|e| e.file_name())).collect::<std::io::Result<Vec<_>>>();
    Ok(snapshot_names(names.with_context(|| format!("cannot list {}", dir.display()))?))
}

/// Those of `entries` that are snapship snapshot names, oldest first.
fn snapshot_names(entries: Vec<OsString>) -> Vec<SnapshotName> {
    let mut names: Vec<SnapshotName> = entries.iter().filter_map(|e| e.to_str().and_then(SnapshotName::parse)).collect();
    names.sort();
    names
}

/// Facts of the subvolume at `path` (named `shown` in messages: `path` may be a
/// `/proc/self/fd/N` path), as a [`Snapshot`] named `name`; `None` unless it is read-only.
/// Its identity is what every copy of it shares: its `received_uuid` when it was received,
/// else its own uuid (a snapshot taken here). So a former replica's received snapshots and a
/// former origin's own snapshots match the copies on the other members, whichever node is
/// the origin now.
fn describe(path: &Path, shown: &Path, name: SnapshotName) -> Result<Option<Snapshot>> {
    let info = libbtrfsutil::subvolume_info(path).map_err(|e| util_error(format!("cannot read subvolume {}", shown.display()), e))?;
    let read_only = libbtrfsutil::subvolume_read_only(path).map_err(|e| util_error(format!("cannot read flags of {}", shown.display()), e))?;
    if !read_only {
        return Ok(None);
    }
    Ok(Some(snapshot_of(name, info.uuid(), info.parent_uuid(), info.received_uuid())))
}

/// Snapshot `name` of the subvolume with these uuids, its identity as [`describe`] says.
fn snapshot_of(name: SnapshotName, uuid: uuid::Uuid, parent_uuid: Option<uuid::Uuid>, received_uuid: Option<uuid::Uuid>) -> Snapshot {
    Snapshot {
        name,
        identity: received_uuid.unwrap_or(uuid).to_string(),
        local_id: Some(uuid.to_string()),
        parent_local_id: parent_uuid.map(|u| u.to_string()),
    }
}

/// [`describe`] of the root directory `sub` of a subvolume, with its `ctransid` (for the
/// seal): one ioctl on the open directory ([`SafeDir::subvolume_info`]).
fn describe_dir(sub: &SafeDir, name: SnapshotName) -> Result<Option<(Snapshot, u64)>> {
    let info = sub.subvolume_info()?;
    Ok(info.read_only.then(|| (snapshot_of(name, info.uuid, info.parent_uuid, info.received_uuid), info.ctransid)))
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
    async fn make_live_from(&self, snapshot: &Snapshot) -> Result<()> {
        let (src, live) = (self.path_of(snapshot), self.subvolume.clone());
        blocking(move || {
            if std::fs::symlink_metadata(&live).is_ok() {
                // A live file set frozen when this node stepped down (its content is kept as
                // diverged data) is moved aside, in its own directory; anything else is
                // someone's data.
                let frozen = libbtrfsutil::is_subvolume(&live).unwrap_or(false) && libbtrfsutil::subvolume_read_only(&live).unwrap_or(false);
                if !frozen {
                    bail!("{} already exists; move it away (or set `promote_path:` on this replica) and promote again", live.display());
                }
                let name = live.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let aside = live.with_file_name(format!(".{name}.frozen-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ")));
                std::fs::rename(&live, &aside).with_context(|| format!("cannot move the frozen {} aside to {}", live.display(), aside.display()))?;
                tracing::warn!(frozen = %aside.display(), "moved the live file set frozen at the last step-down aside");
            }
            if let Some(parent) = live.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            // A writable snapshot, never `ro=false` on the received one: the received one keeps
            // its identity and stays a base for the other members.
            CreateSnapshotOptions::new().create(&src, &live).map_err(|e| util_error(format!("cannot make {} writable at {}", src.display(), live.display()), e))
        })
        .await
    }

    async fn remove_diverged(&self, name: &str) -> Result<()> {
        if !name.starts_with("diverged-") || name.contains('/') {
            bail!("{name:?} is not the name of diverged data (diverged-TIME)");
        }
        let path = self.snapshot_dir.join(name);
        blocking(move || libbtrfsutil::delete_subvolume(&path).map_err(|e| util_error(format!("cannot delete {}", path.display()), e))).await
    }

    async fn freeze(&self, frozen: bool) -> Result<()> {
        let live = self.subvolume.clone();
        blocking(move || {
            libbtrfsutil::set_subvolume_read_only(&live, frozen).map_err(|e| util_error(format!("cannot set {} read-only={frozen}", live.display()), e))
        })
        .await
    }

    async fn step_down(&self) -> Result<String> {
        let (live, dir) = (self.subvolume.clone(), self.snapshot_dir.clone());
        blocking(move || {
            let name = format!("diverged-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
            let kept = dir.join(&name);
            CreateSnapshotOptions::new()
                .readonly(true)
                .create(&live, &kept)
                .map_err(|e| util_error(format!("cannot keep {} as {}", live.display(), kept.display()), e))?;
            libbtrfsutil::set_subvolume_read_only(&live, true).map_err(|e| util_error(format!("cannot make {} read-only", live.display()), e))?;
            Ok(name)
        })
        .await
    }

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
            describe(&path, &path, name)?.ok_or_else(|| anyhow!("new snapshot {} is not read-only", path.display()))
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
                sync_fs(&src, &src)?;
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

    fn change_counter(&self) -> Option<super::ChangeCounter> {
        let src = self.subvolume.clone();
        // The generation moves at every transaction commit that changed the subvolume.
        Some(std::sync::Arc::new(move || {
            Ok(libbtrfsutil::subvolume_info(&src).map_err(|e| util_error(format!("cannot read subvolume {}", src.display()), e))?.generation())
        }))
    }

    async fn list(&self) -> Result<Vec<Snapshot>> {
        let dir = self.snapshot_dir.clone();
        blocking(move || {
            let mut out = Vec::new();
            for name in our_names(&dir)? {
                let path = dir.join(name.as_str());
                match describe(&path, &path, name) {
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

/// One receive under way: the replica and staging directories, open and checked, the
/// receive lock, and the fresh directory in staging this transfer alone receives into.
struct Transfer {
    replica: SafeDir,
    staging: SafeDir,
    /// The name of `dir` in `staging`.
    dir_name: OsString,
    dir: SafeDir,
    _lock: Flock<File>,
}

impl BtrfsReplica {
    pub fn new(dir: PathBuf) -> Self {
        BtrfsReplica { dir }
    }

    /// The replica directory, reached without following symlinks and checked with every
    /// directory above it (see [`safe_dir::open_trusted`]). `None`: it does not exist (yet)
    /// and `create` is false.
    fn open(&self, create: bool) -> Result<Option<SafeDir>> {
        safe_dir::open_trusted(&self.dir, create)
    }

    /// Opens (creating them if needed) the replica and staging directories, takes the receive
    /// lock, removes whatever an interrupted receive left, and makes this transfer's directory.
    fn prepare(&self, name: &SnapshotName) -> Result<Transfer> {
        let replica = self.open(true)?.ok_or_else(|| anyhow!("cannot create {}", self.dir.display()))?;
        let staging_name = OsStr::new(STAGING_DIR);
        replica.mkdir(staging_name, 0o700)?;
        let staging = replica.open_dir(staging_name)?.ok_or_else(|| anyhow!("{} vanished", replica.shown(staging_name).display()))?;
        staging.check(Role::Own)?;
        let lock = staging.open_file(OsStr::new(LOCK))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|_| super::ReceiveBusy(self.dir.display().to_string()))?;
        for entry in staging.entries()? {
            if entry != LOCK {
                tracing::info!(path = %staging.shown(&entry).display(), "removing what an interrupted receive left");
                staging.remove_all(&entry)?;
            }
        }
        for entry in replica.entries()? {
            let text = entry.to_string_lossy();
            if text.starts_with(PUBLISHING) || stale_latest_tmp(&text) {
                tracing::info!(path = %replica.shown(&entry).display(), "removing what an interrupted move into place left");
                replica.remove_all(&entry)?;
            }
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for _ in 0..100 {
            let dir_name = OsString::from(transfer_dir_name(name, COUNTER.fetch_add(1, Ordering::Relaxed)));
            if let Some(dir) = staging.fresh_dir(&dir_name)? {
                return Ok(Transfer { replica, staging, dir_name, dir, _lock: lock });
            }
        }
        bail!("cannot make a fresh directory to receive into in {}: every name tried is taken", staging.path().display())
    }
}

/// The name of the directory in staging that one transfer receives into: the snapshot's name
/// (for whoever looks), this process and a counter. It is created new: a name that exists
/// already is skipped, never reused.
fn transfer_dir_name(name: &SnapshotName, n: u64) -> String {
    format!("{RECEIVING}{name}-{}-{n}", std::process::id())
}

/// Whether `name` is a temporary `latest` symlink left by a process that is gone, which may
/// be removed. Its name carries the pid of the process that made it: a live one (this
/// process, deleting a snapshot while a receive starts; or another snapship) may be about to
/// rename it over `latest`.
fn stale_latest_tmp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(LATEST_TMP) else { return false };
    match rest.split('-').next().and_then(|pid| pid.parse::<i32>().ok()) {
        Some(pid) if pid > 0 => {
            pid != std::process::id() as i32 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
        }
        _ => true,
    }
}

/// Points `latest` in `replica` at the newest complete snapshot (or removes it), atomically:
/// a fresh symlink under a temporary name, renamed over `latest` (a rename replaces a symlink
/// there, never follows it).
fn update_latest(replica: &SafeDir) -> Result<()> {
    update_latest_to(replica, None)
}

/// [`update_latest`], told that snapshot `published` was just published complete: if no
/// entry has a newer snapshot name, it is the newest, found without describing the others.
fn update_latest_to(replica: &SafeDir, published: Option<&SnapshotName>) -> Result<()> {
    let latest = OsStr::new(LATEST);
    let newest = match published {
        Some(name) if snapshot_names(replica.entries()?).last() == Some(name) => Some(name.clone()),
        _ => complete_in(replica)?.pop().map(|s| s.name),
    };
    let Some(newest) = newest else {
        return match replica.stat_of(latest)? {
            None => Ok(()),
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => replica.unlink(latest),
            Some(_) => bail!("{} is not the symlink snapship keeps there; move it away", replica.shown(latest).display()),
        };
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..10_000 {
        let tmp = OsString::from(format!("{LATEST_TMP}{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        // A name that is taken (a leftover, or planted) is neither reused nor touched here.
        if replica.symlink(OsStr::new(newest.as_str()), &tmp)? {
            return replica.rename_over(&tmp, latest).inspect_err(|_| {
                let _ = replica.unlink(&tmp);
            });
        }
    }
    bail!("cannot update {}: every temporary name tried is taken", replica.shown(latest).display())
}

/// Complete received snapshots in `replica`, oldest first (blocking). Entries that are not
/// read-only received subvolumes (a symlink, a plain directory) are skipped with a warning.
fn complete_in(replica: &SafeDir) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let seals = replica.open_dir(OsStr::new(SEALS))?;
    for name in snapshot_names(replica.entries()?) {
        let shown = replica.shown(name.as_str());
        let found = replica.open_dir(OsStr::new(name.as_str())).and_then(|sub| match sub {
            Some(sub) if sub.is_subvolume_root()? => match describe_dir(&sub, name.clone())? {
                Some((mut s, ctransid)) => {
                    if !sealed_intact(replica, seals.as_ref(), &name, ctransid, &shown)? {
                        s.identity = format!("{TAMPERED}{}", s.identity);
                    }
                    Ok(Some(s))
                }
                None => Ok(None),
            },
            Some(_) => bail!("a plain directory, not a subvolume"),
            None => Ok(None),
        });
        match found {
            Ok(Some(s)) => out.push(s),
            Ok(None) => tracing::warn!(path = %shown.display(), "ignoring a subvolume that is not a complete received snapshot"),
            Err(e) => tracing::warn!(path = %shown.display(), "ignoring what is not a snapshot: {e:#}"),
        }
    }
    Ok(out)
}

/// Records `ctransid` as the seal of snapshot `name` (a fresh file renamed into place). The
/// `ctransid` is the transaction that last changed the snapshot's content (a flip of its
/// read-only flag or a balance leaves it alone), as [`describe_dir`] reads it. Until the
/// data a receive wrote is written back (by the publisher's commit), that write back still
/// moves it; so the publisher seals after its commit and replaces any seal, and a listing
/// that seals on first sight only adds a missing one (it may have read it before).
fn seal(replica: &SafeDir, name: &SnapshotName, ctransid: u64, replace: bool) -> Result<()> {
    use std::io::Write;
    replica.mkdir(OsStr::new(SEALS), 0o700)?;
    let seals = replica.open_dir(OsStr::new(SEALS))?.ok_or_else(|| anyhow!("{} vanished", replica.shown(SEALS).display()))?;
    seals.check(Role::Own)?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = OsString::from(format!(".tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let mut file = seals.open_file(&tmp)?;
    file.set_len(0)?;
    file.write_all(ctransid.to_string().as_bytes())?;
    if replace {
        return seals.rename_over(&tmp, OsStr::new(name.as_str())).inspect_err(|_| {
            let _ = seals.unlink(&tmp);
        });
    }
    if seals.rename_new(&tmp, &seals, OsStr::new(name.as_str())).is_err() {
        let _ = seals.unlink(&tmp); // sealed meanwhile
    }
    Ok(())
}

/// Whether snapshot `name` (whose `ctransid` is `now`) is as it was published: its seal
/// matches. A snapshot without a readable seal (received before seals existed, or a crash
/// between its publish and the commit of the seal) is sealed now. A broken seal is logged
/// as an error each time it is seen.
fn sealed_intact(replica: &SafeDir, seals: Option<&SafeDir>, name: &SnapshotName, now: u64, shown: &Path) -> Result<bool> {
    let recorded = match seals {
        Some(seals) => seals.read_small(OsStr::new(name.as_str())).ok().flatten().and_then(|text| text.trim().parse::<u64>().ok()),
        None => None,
    };
    let Some(recorded) = recorded else {
        if let Err(e) = seal(replica, name, now, false) {
            tracing::warn!(path = %shown.display(), "cannot seal the received snapshot: {e:#}");
        }
        return Ok(true);
    };
    if now == recorded {
        return Ok(true);
    }
    tracing::error!(
        path = %shown.display(),
        "received snapshot {name} was changed after it was received (its ctransid moved from {recorded} to {now}: made writable behind snapship's back?): \
         it is never used as a base; `snapship verify --snapshot {name}` on the origin shows what differs, and the next transfer of it moves it aside"
    );
    Ok(false)
}

/// Moves received snapshot `name`, changed after it was published, out of the way of a new
/// receive of it: renamed to `tampered-NAME` (kept; snapship never deletes it).
fn move_tampered_aside(replica: &SafeDir, name: &SnapshotName) -> Result<()> {
    let entry = OsStr::new(name.as_str());
    for n in 0..1000 {
        let aside = OsString::from(if n == 0 { format!("{TAMPERED_ASIDE}{name}") } else { format!("{TAMPERED_ASIDE}{name}-{n}") });
        if replica.stat_of(&aside)?.is_none() {
            replica.rename_new(entry, replica, &aside)?;
            if let Some(seals) = replica.open_dir(OsStr::new(SEALS))? {
                let _ = seals.unlink(entry);
            }
            tracing::warn!(path = %replica.shown(&aside).display(), "moved the changed copy of {name} aside (kept for you to look at); receiving it anew");
            return Ok(());
        }
    }
    bail!("cannot move the changed copy of {name} aside: every name tried is taken")
}

/// `shown` names `path` in messages (`path` may be a `/proc/self/fd/N` path).
fn set_read_only(path: &Path, shown: &Path, read_only: bool) -> Result<()> {
    libbtrfsutil::set_subvolume_read_only(path, read_only).map_err(|e| util_error(format!("cannot set read-only={read_only} on {}", shown.display()), e))
}

/// `shown` names `path` in messages (`path` may be a `/proc/self/fd/N` path).
fn sync_fs(path: &Path, shown: &Path) -> Result<()> {
    libbtrfsutil::sync(path).map_err(|e| util_error(format!("cannot sync the filesystem of {}", shown.display()), e))
}

#[async_trait]
impl ReplicaSide for BtrfsReplica {
    async fn list(&self) -> Result<Vec<Snapshot>> {
        let me = BtrfsReplica::new(self.dir.clone());
        blocking(move || match me.open(false)? {
            Some(replica) => complete_in(&replica),
            None => Ok(Vec::new()),
        })
        .await
    }

    async fn accepts_compact(&self) -> bool {
        receive_v2_supported().await
    }

    /// What the filesystem holding the replica directory (or its nearest existing parent)
    /// has available to this node, by `statvfs` (btrfs's estimate: data and metadata
    /// profiles make it approximate).
    async fn free_space(&self) -> Option<u64> {
        let dir = self.dir.clone();
        blocking(move || {
            let at = dir.ancestors().find(|p| p.exists()).ok_or_else(|| anyhow::anyhow!("no existing ancestor"))?;
            let st = rustix::fs::statvfs(at)?;
            Ok(st.f_bavail.saturating_mul(st.f_frsize))
        })
        .await
        .ok()
    }

    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot> {
        let me = BtrfsReplica::new(self.dir.clone());
        let name = incoming.name.clone();
        let transfer = blocking(move || me.prepare(&name)).await?;
        let check = stream_check::StreamCheck::new(&incoming.identity, incoming.base.as_deref());
        let result = receive_into(transfer.dir.path(), stream, check).await;
        let (name, identity) = (incoming.name.clone(), incoming.identity.clone());
        blocking(move || {
            let outcome = result.and_then(|()| transfer.publish(name, &identity));
            // Whatever the stream made goes with the transfer's directory (after a publish it
            // is empty); should that fail, the next receive removes it.
            if let Err(e) = transfer.staging.remove_all(&transfer.dir_name) {
                tracing::error!("cannot remove the partial receive {}: {e:#}", transfer.dir.path().display());
            }
            outcome
        })
        .await
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        let me = BtrfsReplica::new(self.dir.clone());
        let name = snapshot.name.clone();
        blocking(move || {
            let replica = me.open(false)?.ok_or_else(|| anyhow!("replica directory {} does not exist", me.dir.display()))?;
            let entry = OsStr::new(name.as_str());
            let shown = replica.shown(entry);
            let sub = replica.open_dir(entry)?.ok_or_else(|| anyhow!("cannot delete {}: it does not exist", shown.display()))?;
            if !sub.is_subvolume_root()? {
                bail!("cannot delete {}: it is not a subvolume, so not a snapshot snapship received; leaving it alone", shown.display());
            }
            replica.delete_subvolume(entry, &sub)?;
            if let Some(seals) = replica.open_dir(OsStr::new(SEALS))? {
                let _ = seals.unlink(entry);
            }
            update_latest(&replica)
        })
        .await
    }
}

/// Runs `btrfs receive` into `dir`, feeding it `stream` to its end.
///
/// `dir` is passed as a path (the command takes no fd). That is safe because every directory
/// on it was opened without following symlinks and checked to be changeable by nobody but
/// root and us ([`safe_dir::open_trusted`]; the transfer's directory is new and 0700), so
/// nobody else can swap a component between our check and the command's `chroot`.
async fn receive_into(dir: &Path, stream: &mut (dyn AsyncRead + Send + Unpin), mut check: stream_check::StreamCheck) -> Result<()> {
    // --chroot: whatever paths the stream names, the receive cannot write outside `dir`. (It
    // still finds parents and clone sources anywhere on the filesystem: `check` holds back
    // any command that names one the replica did not agree to.)
    let mut process = Cmd::new("btrfs").arg("receive").arg("-q").arg("-e").arg("--chroot").arg(dir).spawn(Pipe::In)?;
    let mut stdin = process.stdin();
    let copied = async {
        // What the check lets through goes to the pipe as ranges of `buf` (one vectored
        // write), not copied once more.
        let (mut buf, mut pieces) = (vec![0u8; super::PIPE_BUFFER], Vec::new());
        loop {
            let n = tokio::io::AsyncReadExt::read(stream, &mut buf).await?;
            if n == 0 {
                check.finish()?;
                return Ok::<_, anyhow::Error>(());
            }
            pieces.clear();
            check.push(&buf[..n], &mut pieces)?;
            let mut slices: Vec<std::io::IoSlice<'_>> = pieces.iter().map(|p| std::io::IoSlice::new(p.bytes(&buf[..n]))).collect();
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let written = stdin.write_vectored(slices).await?;
                if written == 0 {
                    return Err(std::io::Error::from(ErrorKind::WriteZero).into());
                }
                std::io::IoSlice::advance_slices(&mut slices, written);
            }
        }
    }
    .await;
    let flushed = match copied {
        Ok(()) => stdin.shutdown().await.map_err(anyhow::Error::from),
        Err(e) => Err(e),
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
    Ok(())
}

impl Transfer {
    /// Checks what the stream made and moves it into place (blocking).
    ///
    /// The stream is the origin's to shape, so what it left in the transfer's directory is
    /// accepted only if it is exactly one entry, named `name`, a directory that is the root of
    /// a subvolume holding no other subvolume, read-only, with received_uuid `identity`.
    /// Anything else is refused (and the caller removes it with the directory).
    ///
    /// btrfs refuses to move a read-only subvolume to another directory (its `..` would
    /// change), so the snapshot is made writable for one rename into a hidden name beside its
    /// final place, made read-only again, and then renamed within that directory, which btrfs
    /// allows. The kernel keeps `received_uuid` and the send transid across the flip (it is
    /// `btrfs property set ro false` that clears them), so later incremental receives still
    /// find it as their parent. It is never visible while writable. All of it goes through the
    /// fd of the subvolume opened here, which stays that subvolume across the renames.
    fn publish(&self, name: SnapshotName, identity: &str) -> Result<Snapshot> {
        let expected = OsStr::new(name.as_str());
        match self.dir.entries()?.as_slice() {
            [one] if one == expected => {}
            [] => bail!("the stream did not contain snapshot {name} (wrong stream for this file set?)"),
            [one] => bail!("refusing the received stream: it made {one:?}, not snapshot {name} (wrong stream for this file set?)"),
            many => bail!(
                "refusing the received stream: a snapshot stream makes one subvolume, this one made {} entries ({})",
                many.len(),
                // The names are the origin's: quoted, and only the first few.
                many.iter().take(5).map(|n| format!("{n:?}")).chain((many.len() > 5).then(|| "...".to_string())).collect::<Vec<_>>().join(", ")
            ),
        }
        let shown = self.dir.shown(expected);
        let staged = self.dir.open_dir(expected).context("refusing the received stream")?.ok_or_else(|| anyhow!("{} vanished", shown.display()))?;
        if !staged.is_subvolume_root()? {
            bail!("refusing the received stream: {} is a plain directory, not a subvolume", shown.display());
        }
        if staged.has_nested_subvolumes()? {
            bail!("refusing the received stream: {} holds other subvolumes", shown.display());
        }
        let (got, _) = describe_dir(&staged, name.clone())?
            .ok_or_else(|| anyhow!("received {} is incomplete: not read-only or without received_uuid", shown.display()))?;
        if got.identity != identity {
            bail!("received {} has identity {}, expected {identity}", shown.display(), got.identity);
        }
        let target = self.replica.shown(expected);
        if self.replica.stat_of(expected)?.is_some() {
            let tampered = complete_in(&self.replica)?.iter().any(|s| s.name == name && s.identity.starts_with(TAMPERED));
            if !tampered {
                bail!("{} already exists and is a different snapshot; move it away to receive this one", target.display());
            }
            move_tampered_aside(&self.replica, &name)?;
        }
        let hidden = OsString::from(format!("{PUBLISHING}{name}"));
        let hidden_shown = self.replica.shown(&hidden);
        set_read_only(&staged.proc_path(), &shown, false)?;
        self.dir.rename_new(expected, &self.replica, &hidden)?;
        let placed = set_read_only(&staged.proc_path(), &hidden_shown, true).and_then(|()| {
            describe_dir(&staged, name.clone())?
                .filter(|(s, _)| s.identity == identity)
                .ok_or_else(|| anyhow!("{} lost its received identity while being moved into place", hidden_shown.display()))?;
            self.replica.rename_new(&hidden, &self.replica, expected)
        });
        if let Err(e) = placed {
            if let Err(re) = self.replica.remove_all(&hidden) {
                tracing::error!("cannot remove {}: {re:#}", hidden_shown.display());
            }
            return Err(e);
        }
        // One commit makes the received data and the rename durable together: btrfs
        // transactions are atomic and ordered, so the rename can never be on disk without
        // the data received before it. Then the seal, and `latest`, made durable by a second
        // commit. The seal must wait for the first: the data `btrfs receive` wrote is still
        // being written back, and each write back moves the snapshot's `ctransid` (read
        // before the commit, it is not yet the snapshot's final one).
        sync_fs(&self.replica.proc_path(), self.replica.path())?;
        let (_, ctransid) = describe_dir(&staged, name.clone())?.ok_or_else(|| anyhow!("{} is no longer read-only", target.display()))?;
        seal(&self.replica, &name, ctransid, true)?;
        update_latest_to(&self.replica, Some(&name))?;
        sync_fs(&self.replica.proc_path(), self.replica.path())?;
        Ok(Snapshot { name, ..got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_dirs_are_plain_names_that_are_never_taken_for_snapshots() {
        let name = SnapshotName::parse("snapship-20260101T000000.000Z").unwrap();
        let (a, b) = (transfer_dir_name(&name, 0), transfer_dir_name(&name, 1));
        assert_ne!(a, b);
        for dir in [&a, &b] {
            assert!(dir.starts_with(RECEIVING) && dir.contains(name.as_str()), "{dir}");
            assert!(!dir.contains('/'));
            assert!(SnapshotName::parse(dir).is_none(), "{dir} would be listed as a snapshot");
            assert!(!dir.starts_with(PUBLISHING) && !dir.starts_with(LATEST_TMP) && dir != LOCK);
        }
    }

    #[test]
    fn only_temporary_latest_links_of_gone_processes_are_stale() {
        assert!(!stale_latest_tmp(&format!("{LATEST_TMP}{}-3", std::process::id())), "ours may be in flight");
        assert!(!stale_latest_tmp(&format!("{LATEST_TMP}1-0")), "pid 1 is alive");
        // Above any pid_max: gone.
        assert!(stale_latest_tmp(&format!("{LATEST_TMP}4194999-0")));
        assert!(stale_latest_tmp(&format!("{LATEST_TMP}junk")));
        assert!(stale_latest_tmp(&format!("{LATEST_TMP}0-0")));
        assert!(!stale_latest_tmp(LATEST) && !stale_latest_tmp(NAME_FOR_TESTS));
    }

    const NAME_FOR_TESTS: &str = "snapship-20260101T000000.000Z";

    #[test]
    fn only_snapshot_names_are_listed_oldest_first() {
        let entries = ["snapship-20260101T010000.000Z", "latest", ".snapship-staging", "snapship-20260101T000000.000Z", ".latest.tmp-1-0", "notes"];
        let names = snapshot_names(entries.iter().map(OsString::from).collect());
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["snapship-20260101T000000.000Z", "snapship-20260101T010000.000Z"]);
    }
}
