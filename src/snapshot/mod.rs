//! Snapshot backends: the filesystems snapshot, send and receive.
//!
//! A file set is seen from two sides. The origin side ([`OriginSide`]) takes snapshots, lists
//! them with their identity and opens send streams; the replica side ([`ReplicaSide`]) lists
//! what it received and receives a stream so that the new snapshot only becomes visible once
//! it is complete and checked. Each backend (btrfs, zfs) implements both; the
//! replication logic in `replicate` only speaks these traits.

pub mod btrfs;
pub mod copy;
pub mod name;
pub mod runner;
pub mod tree;
pub mod zfs;

use std::path::PathBuf;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::{AsyncRead, ReadBuf};

use crate::config::{BackendKind, Policy, ReplicaSpec};
pub use name::{Kind, SnapshotName};

/// Bytes moved per write into a receiving process (`tokio::io::copy` would use 8 KiB, and
/// the syscalls would show).
pub const PIPE_BUFFER: usize = 1 << 20;

/// A snapshot that snapship made, as one side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: SnapshotName,
    /// What the origin snapshot and every copy received from it share: on btrfs the origin
    /// snapshot's uuid (a replica's `received_uuid`), on ZFS the guid. Common bases are
    /// found by this, never by name.
    pub identity: String,
    /// This copy's own identity on its filesystem (btrfs uuid), where known.
    pub local_id: Option<String>,
    /// The local snapshot this one was created from, if any (btrfs parent uuid): on a
    /// replica, an incremental receive has the base's local id here.
    pub parent_local_id: Option<String>,
}

/// Whether `snapshot`, a received copy, was changed after it was received (btrfs: its
/// `ctransid` moved past its seal): never a common base, never pruned, flagged in status.
pub fn is_tampered(snapshot: &Snapshot) -> bool {
    snapshot.identity.starts_with(btrfs::TAMPERED)
}

/// The wait for a sending process's exit, once its output ended.
type ExitWait = Pin<Box<dyn Future<Output = Result<(), runner::CommandError>> + Send>>;

/// An open send stream. It reads as the stream's bytes, and its end (EOF) is only reported
/// once the sending process has exited successfully: a reader that saw EOF saw the whole
/// stream, and a failed send surfaces as a read error, never as a short stream. Dropping it
/// early kills the sending process.
pub struct SendStream {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    process: Option<runner::Running>,
    exit: Option<ExitWait>,
    /// A failed send stays failed: later reads repeat the error instead of a clean end.
    failed: Option<String>,
    /// How long a read may wait for the process to produce anything, and the timer of the
    /// current wait.
    stall: Option<(std::time::Duration, Option<Pin<Box<tokio::time::Sleep>>>)>,
    cmdline: String,
}

impl SendStream {
    pub fn new(reader: Box<dyn AsyncRead + Send + Unpin>, process: runner::Running) -> Self {
        let cmdline = process.cmdline().to_string();
        SendStream { reader, process: Some(process), exit: None, failed: None, stall: None, cmdline }
    }

    /// A sending process that produces nothing for `limit` while it is read is stuck: it is
    /// killed and the read fails.
    pub fn with_stall_timeout(mut self, limit: std::time::Duration) -> Self {
        self.stall = Some((limit, None));
        self
    }

    /// Polls the stall timer of a read that is waiting; the error once it expired.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let (limit, timer) = self.stall.as_mut()?;
        let limit = *limit;
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        let why = format!("`{}` produced no data for {}s (stall timeout); killed it", self.cmdline, limit.as_secs());
        // Dropping the process (or the wait that owns it) kills it.
        self.process = None;
        self.exit = None;
        self.failed = Some(why.clone());
        Some(std::io::Error::new(std::io::ErrorKind::TimedOut, why))
    }
}

impl AsyncRead for SendStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(why) = &self.failed {
            return Poll::Ready(Err(std::io::Error::other(why.clone())));
        }
        if self.exit.is_none() {
            let before = buf.filled().len();
            let read = Pin::new(&mut self.reader).poll_read(cx, buf);
            if read.is_pending() {
                return match self.stalled(cx) {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Pending,
                };
            }
            if let Some((_, timer)) = &mut self.stall {
                *timer = None;
            }
            ready!(read)?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            match self.process.take() {
                Some(process) => self.exit = Some(Box::pin(process.wait())),
                None => return Poll::Ready(Ok(())), // already reported the end
            }
        }
        let exit = self.exit.as_mut().expect("set above");
        let Poll::Ready(status) = exit.as_mut().poll(cx) else {
            // A process that closed its output but does not exit is stuck too.
            return match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            };
        };
        self.exit = None;
        if let Err(e) = &status {
            self.failed = Some(e.to_string());
        }
        Poll::Ready(status.map_err(std::io::Error::other))
    }
}

/// Another receive into the same replica is running.
#[derive(Debug, thiserror::Error)]
#[error("another receive into {0} is running")]
pub struct ReceiveBusy(pub String);

/// What the receiver is told about an incoming stream.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub name: SnapshotName,
    /// The identity the received snapshot must end up with.
    pub identity: String,
    /// The identity of the base it is incremental from, if any.
    pub base: Option<String>,
    /// The stream continues a partial receive the filesystem kept (ZFS resume token).
    pub from_token: bool,
    /// This node asked for the stream (a fetch from another member: `restore --from`,
    /// `promote`): it is received only where it fits the copy as it is. Nothing is set aside,
    /// rolled back or replaced to make room for it (ZFS: no `receive -F`, no rollback to the
    /// base, no full stream over an existing dataset); the receive is refused instead.
    pub fetched: bool,
}

/// A cheap reading that moves whenever the file set's committed data may have changed
/// (btrfs: the subvolume's generation). It blocks (an ioctl): the poll of continuous mode
/// calls it from its own thread (`schedule::triggers`).
pub type ChangeCounter = std::sync::Arc<dyn Fn() -> Result<u64> + Send + Sync>;

/// The origin's side of a file set.
#[async_trait]
pub trait OriginSide: Send + Sync {
    /// Takes a read-only snapshot of the file set now.
    async fn take_snapshot(&self, kind: Kind) -> Result<Snapshot>;
    /// Whether the file set changed after `snapshot` was taken (btrfs: the subvolume's
    /// generation moved past the snapshot's). `flush`: commit dirty data first, so that a
    /// change made a moment ago counts (continuous mode, woken by a write); without it the
    /// check is cheaper and sees what the filesystem committed by itself (the safety poll).
    async fn changed_since(&self, snapshot: &Snapshot, flush: bool) -> Result<bool>;
    /// A [`ChangeCounter`] of the live file set, where the backend has a cheap one: the poll
    /// then wakes the snapshot loop only when it moved. `None`: every poll wakes it.
    fn change_counter(&self) -> Option<ChangeCounter> {
        None
    }
    /// Every snapshot snapship made of this file set, oldest first.
    async fn list(&self) -> Result<Vec<Snapshot>>;
    /// Opens a stream of `snapshot`, incremental from `base` when given. `compact`: the
    /// receiver accepts the backend's newer, compact stream format (btrfs: protocol 2 with
    /// compressed extents sent as they are on disk).
    async fn send(&self, snapshot: &Snapshot, base: Option<&Snapshot>, compact: bool) -> Result<SendStream>;
    async fn delete(&self, snapshot: &Snapshot) -> Result<()>;
    /// Opens the stream that resumes a partial receive from the replica's resume token
    /// (modern ZFS: `zfs send -t`). The token comes from the replica and may name anything:
    /// it must resume `snapshot` incremental from `base` (full when `None`), the stream the
    /// origin planned, or it is refused with an error (the caller then sends from the start).
    async fn send_resumed(&self, _token: &str, _snapshot: &Snapshot, _base: Option<&Snapshot>) -> Result<SendStream> {
        anyhow::bail!("this backend cannot resume a receive from a token")
    }
    /// `base` is now the common base with `replica` (replacing `previous`): guard it where
    /// the filesystem can (ZFS: a hold, and a bookmark on modern ZFS). Our own pruning
    /// protects bases anyway; this keeps other tools from destroying them.
    async fn keep_base(&self, _replica: &str, _base: &SnapshotName, _previous: Option<&SnapshotName>) -> Result<()> {
        Ok(())
    }
    /// Promotion: makes the live file set a writable copy of `snapshot`, which this node
    /// received (btrfs: a writable snapshot of it, never `ro=false`, which would break the
    /// received-uuid chain). The live path must not exist yet.
    async fn make_live_from(&self, _snapshot: &Snapshot) -> Result<()> {
        anyhow::bail!("this backend cannot promote a replica yet")
    }
    /// Stepping down: keeps the live file set's current content read-only under a name that
    /// no retention ever deletes (returned), and makes the live file set read-only.
    async fn step_down(&self) -> Result<String> {
        anyhow::bail!("this backend cannot step down yet")
    }
    /// Deletes diverged data kept by [`step_down`](Self::step_down), by the name it returned.
    async fn remove_diverged(&self, _name: &str) -> Result<()> {
        anyhow::bail!("this backend keeps no diverged data")
    }
    /// Makes the live file set read-only (`true`: a planned switchover freezes writes) or
    /// writable again (`false`: the switchover failed before the other node took over).
    async fn freeze(&self, _frozen: bool) -> Result<()> {
        anyhow::bail!("this backend cannot freeze its live file set yet")
    }
    /// A planned switchover, once the final snapshot reached the member taking over: `true`
    /// puts the frozen live file set where this node receives the file set as a replica, so
    /// that the new origin's first stream is an incremental onto it (ZFS with `promote_path:`:
    /// the dataset renamed back to the replica's); `false` undoes that (the other member did
    /// not take over). Nothing to do where the live file set and the received snapshots are
    /// apart anyway (btrfs).
    async fn place_as_replica(&self, _as_replica: bool) -> Result<()> {
        Ok(())
    }
}

/// A replica's side of a file set.
#[async_trait]
pub trait ReplicaSide: Send + Sync {
    /// Every complete snapshot received, oldest first.
    async fn list(&self) -> Result<Vec<Snapshot>>;
    /// Whether this side can receive the compact stream format (see [`OriginSide::send`]).
    async fn accepts_compact(&self) -> bool;
    /// Receives `stream` (read to its end, which must come without error); the snapshot is
    /// visible only once complete and checked, and nothing partial remains on failure
    /// (except, on modern ZFS, the hidden resumable state of a receive continuing a token).
    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot>;
    /// The resume token of a partial receive the filesystem kept when its process died
    /// (modern ZFS `receive -s`); `None` where there is none or the backend has no such thing.
    async fn resume_token(&self) -> Option<String> {
        None
    }
    /// Bytes free where this side receives (its filesystem, its pool), if it can tell: what
    /// a replica without room tells its origin, which waits for room before resending.
    async fn free_space(&self) -> Option<u64> {
        None
    }
    async fn delete(&self, snapshot: &Snapshot) -> Result<()>;
    /// Makes room for `incoming` before its stream flows, outside the receive's stall
    /// watch (it may take long): ZFS sets aside the snapshots after its base as diverged
    /// data (see `zfs::ZfsReplica`). Nothing is lost if it is cut; the next call completes it.
    async fn prepare(&self, _incoming: &Incoming) -> Result<()> {
        Ok(())
    }
    /// The diverged data this side keeps beside what it received, by name (ZFS: snapshots
    /// after the common base with a new origin, set aside before its first receive); the
    /// replica service records them in the epoch store, so that `snapship diverged` shows them.
    async fn diverged(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// A snapshot's files, readable at [`SnapshotView::path`] while it lives (`verify` hashes
/// them): on btrfs the snapshot itself; on ZFS a temporary read-only clone (zfs-fuse shows
/// no `.zfs/snapshot`), destroyed by [`SnapshotView::close`], or when dropped on a failure.
pub struct SnapshotView {
    path: PathBuf,
    clone: Option<zfs::TempClone>,
}

impl SnapshotView {
    pub fn path(&self) -> &std::path::Path {
        match &self.clone {
            Some(c) => c.path(),
            None => &self.path,
        }
    }

    /// Releases what was made to read the snapshot (the ZFS clone).
    pub async fn close(mut self) -> Result<()> {
        match self.clone.take() {
            Some(c) => c.remove().await,
            None => Ok(()),
        }
    }
}

/// The snapshot `name` of `policy`'s file set held on `node`, as its origin (`as_origin`:
/// among the snapshots of its live file set) or as a replica, for reading. `scratch`: a
/// private directory where a ZFS clone may be mounted.
pub async fn view(policy: &Policy, node: &str, as_origin: bool, name: &SnapshotName, scratch: &std::path::Path) -> Result<SnapshotView> {
    let not_member = || anyhow::anyhow!("node `{node}` is not a member of file set `{}`", policy.fileset);
    match policy.backend {
        BackendKind::Btrfs => {
            let home = if as_origin { policy.origin_home(node) } else { policy.replica_home(node) }.ok_or_else(not_member)?;
            Ok(SnapshotView { path: PathBuf::from(home).join(name.as_str()), clone: None })
        }
        BackendKind::Zfs => {
            let dataset = if as_origin { policy.live_on(node) } else { policy.replica_home(node) }.ok_or_else(not_member)?;
            let clone = zfs::TempClone::new(&dataset, name, scratch).await?;
            Ok(SnapshotView { path: PathBuf::new(), clone: Some(clone) })
        }
    }
}

/// The origin side of `policy` on this node, its initial origin.
pub fn origin_for(policy: &Policy) -> Result<Box<dyn OriginSide>> {
    origin_on(policy, &policy.origin.node.0)
}

/// The origin side of `policy` on `node`, the origin now (after a promotion, a former
/// replica): its live file set (`Policy::live_on`) with its snapshots at its home, where its
/// received ones are, so that they serve as bases.
pub fn origin_on(policy: &Policy, node: &str) -> Result<Box<dyn OriginSide>> {
    let not_member = || anyhow::anyhow!("node `{node}` is not a member of file set `{}`", policy.fileset);
    let live = policy.live_on(node).ok_or_else(not_member)?;
    let home = policy.origin_home(node).ok_or_else(not_member)?;
    match policy.backend {
        BackendKind::Btrfs => Ok(Box::new(btrfs::BtrfsOrigin::new(PathBuf::from(live), PathBuf::from(home)))),
        BackendKind::Zfs => Ok(Box::new(zfs::ZfsOrigin::promoted(live, home))),
    }
}

/// The replica side of `policy` held at `replica` on this node.
pub fn replica_for(policy: &Policy, replica: &ReplicaSpec) -> Result<Box<dyn ReplicaSide>> {
    replica_on(policy, &replica.node.0)
}

/// The replica side of `policy` on `node`, at its `replica_home`: a replica's path, or, for the
/// policy's initial origin once another node is origin, its own snapshot directory (its own
/// snapshots are bases there).
pub fn replica_on(policy: &Policy, node: &str) -> Result<Box<dyn ReplicaSide>> {
    let home = policy.replica_home(node).ok_or_else(|| anyhow::anyhow!("node `{node}` is not a member of file set `{}`", policy.fileset))?;
    match policy.backend {
        BackendKind::Btrfs => Ok(Box::new(btrfs::BtrfsReplica::new(PathBuf::from(home)))),
        BackendKind::Zfs => Ok(Box::new(zfs::ZfsReplica::new(home).with_members(policy.members().into_iter().map(String::from).collect()))),
    }
}

/// The send side of a relay (a cascade): `node`'s received snapshots of `policy`, at its
/// `replica_home`, listed and sent like an origin's (btrfs: a received snapshot sends with
/// its `received_uuid`, the origin's identity). Nothing is snapshotted or made live there.
pub fn relay_on(policy: &Policy, node: &str) -> Result<Box<dyn OriginSide>> {
    let home = policy.replica_home(node).ok_or_else(|| anyhow::anyhow!("node `{node}` is not a member of file set `{}`", policy.fileset))?;
    match policy.backend {
        BackendKind::Btrfs => Ok(Box::new(btrfs::BtrfsOrigin::new(PathBuf::from(&home), PathBuf::from(&home)))),
        // Received ZFS snapshots keep the origin's guids: a relay sends from its replica dataset.
        BackendKind::Zfs => Ok(Box::new(zfs::ZfsOrigin::new(home))),
    }
}

/// Takes one snapshot of each member of a consistency group at one point in time (all are
/// of `backend`): atomically on ZFS, one right after the other on btrfs.
pub async fn take_group(backend: BackendKind, members: &[(&str, &dyn OriginSide)], kind: Kind) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    match backend {
        BackendKind::Zfs => {
            let datasets: Vec<&str> = members.iter().map(|(d, _)| *d).collect();
            let name = zfs::snapshot_datasets(&datasets, kind).await?;
            for (dataset, side) in members {
                let s = side.list().await?.into_iter().find(|s| s.name == name);
                out.push(s.ok_or_else(|| anyhow::anyhow!("{dataset}@{name} is missing right after the group snapshot"))?);
            }
        }
        BackendKind::Btrfs => {
            for (_, side) in members {
                out.push(side.take_snapshot(kind).await?);
            }
        }
    }
    Ok(out)
}

/// The newest origin snapshot that `replica` also holds: the base for the next incremental
/// send. Matched by identity, so a renamed or same-named-but-different snapshot never counts.
pub fn common_base<'a>(origin: &'a [Snapshot], replica: &[Snapshot]) -> Option<&'a Snapshot> {
    origin.iter().rev().find(|o| replica.iter().any(|r| r.identity == o.identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, identity: &str) -> Snapshot {
        Snapshot { name: SnapshotName::parse(name).unwrap(), identity: identity.into(), local_id: None, parent_local_id: None }
    }

    const A: &str = "snapship-20260101T000000.000Z";
    const B: &str = "snapship-20260101T010000.000Z";
    const C: &str = "snapship-20260101T020000.000Z";

    #[tokio::test]
    async fn a_silent_sending_process_is_killed_at_the_stall_timeout() {
        use tokio::io::AsyncReadExt;
        let mut process = runner::Cmd::new("sleep").arg("30").spawn(runner::Pipe::Out).unwrap();
        let stdout = process.stdout();
        let pid = process.pid().unwrap();
        let mut stream = SendStream::new(Box::new(stdout), process).with_stall_timeout(std::time::Duration::from_millis(200));
        let err = stream.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("`sleep 30` produced no data for 0s (stall timeout)"), "{err}");
        // Killed: gone (or a zombie being reaped) soon after.
        let alive = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        for _ in 0..100 {
            if !alive() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!alive(), "the stuck process still runs");
        // And the failure sticks.
        assert!(stream.read(&mut [0u8; 8]).await.is_err());
    }

    #[test]
    fn base_is_newest_shared_identity() {
        let origin = [snap(A, "a"), snap(B, "b"), snap(C, "c")];
        assert_eq!(common_base(&origin, &[snap(A, "a"), snap(B, "b")]).unwrap().identity, "b");
        assert_eq!(common_base(&origin, &[snap(A, "a")]).unwrap().identity, "a");
        assert!(common_base(&origin, &[]).is_none());
    }

    #[test]
    fn base_ignores_names() {
        // The replica's copy of B came from a different snapshot that happened to share the name.
        let origin = [snap(A, "a"), snap(B, "b")];
        let replica = [snap(A, "a"), snap(B, "other")];
        assert_eq!(common_base(&origin, &replica).unwrap().identity, "a");
        // And an identity match under another name still counts.
        let replica = [snap(C, "b")];
        assert_eq!(common_base(&origin, &replica).unwrap().identity, "b");
    }

    #[test]
    fn base_survives_deleted_newest_on_either_side() {
        let origin = [snap(A, "a"), snap(C, "c")]; // B deleted on the origin
        let replica = [snap(A, "a"), snap(B, "b"), snap(C, "c")];
        assert_eq!(common_base(&origin, &replica).unwrap().identity, "c");
        let replica = [snap(A, "a"), snap(B, "b")]; // C deleted on the replica
        assert_eq!(common_base(&origin, &replica).unwrap().identity, "a");
    }
}
