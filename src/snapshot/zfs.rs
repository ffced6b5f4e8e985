//! The ZFS backend, through the `zfs` command (`-H -p` output where it exists).
//!
//! Identity is the snapshot guid, the same on every copy. The origin snapshots its dataset
//! and sends with `-I` from the common base, so every snapshot taken meanwhile travels in
//! one stream. The replica receives into its policy's dataset, kept read-only (and with atime
//! off, so that reading it never blocks the next incremental receive); `zfs receive` is atomic,
//! so a cut stream never leaves a snapshot behind.
//!
//! One binary serves old and modern ZFS: [`Features`] are read from `zfs`'s own usage text.
//! zfs-fuse 0.7 (pool version 23, what the tests run on) has holds, but no bookmarks, resume
//! tokens, `written`, `list -p`, `send -c/-w`, or several snapshots in one `zfs snapshot`;
//! modern OpenZFS has them all and gets them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use chrono::Utc;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::runner::{Cmd, CommandError, Pipe};
use super::{Incoming, Kind, OriginSide, ReplicaSide, SendStream, Snapshot, SnapshotName};

/// What the local `zfs` can do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Features {
    /// `zfs snapshot a@s b@s` (atomic across datasets).
    pub multi_snapshot: bool,
    /// `zfs receive -s` and `zfs send -t TOKEN`.
    pub resumable: bool,
    pub bookmarks: bool,
    /// `zfs send -c` (compressed blocks as on disk) and `-w` (raw, encrypted).
    pub compressed_send: bool,
    pub raw_send: bool,
    pub holds: bool,
    /// The `written@SNAPSHOT` property (came with feature flags, like bookmarks).
    pub written: bool,
    /// `zfs receive -u` (do not mount).
    pub receive_no_mount: bool,
}

/// The option letters of the first usage line of `command` (`send [-DnPpRv] ...` -> "DnPpRv").
fn flags_of(usage: &str, command: &str) -> String {
    usage
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{command} [-")))
        .and_then(|l| l.split_once("[-").and_then(|(_, rest)| rest.split_once(']')).map(|(f, _)| f.to_string()))
        .unwrap_or_default()
}

impl Features {
    /// Reads the features from the text `zfs` prints when run without arguments.
    pub fn from_usage(usage: &str) -> Features {
        let has_line = |prefix: &str| usage.lines().any(|l| l.trim_start().starts_with(prefix));
        let send = flags_of(usage, "send");
        let receive = flags_of(usage, "receive");
        let bookmarks = has_line("bookmark ");
        Features {
            multi_snapshot: usage.lines().any(|l| l.trim_start().starts_with("snapshot ") && l.trim_end().ends_with("...")),
            resumable: receive.contains('s') && has_line("send [-nvPe] -t") || usage.contains("-t <receive_resume_token>"),
            bookmarks,
            compressed_send: send.contains('c'),
            raw_send: send.contains('w'),
            holds: has_line("hold "),
            written: bookmarks,
            receive_no_mount: receive.contains('u'),
        }
    }
}

/// The features of the `zfs` on this machine, detected once.
pub async fn features() -> &'static Features {
    static FEATURES: OnceCell<Features> = OnceCell::const_new();
    FEATURES
        .get_or_init(|| async {
            let text = match Cmd::new("zfs").output_unchecked().await {
                Ok((_, out, err)) => format!("{out}{err}"),
                Err(e) => {
                    tracing::warn!("cannot run zfs: {e}");
                    String::new()
                }
            };
            let f = Features::from_usage(&text);
            tracing::debug!(?f, "zfs features");
            f
        })
        .await
}

/// `name -> property -> value` from `zfs get -H -p -o name,property,value ...`.
pub fn parse_properties(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split('\t');
        if let (Some(name), Some(prop), Some(value)) = (parts.next(), parts.next(), parts.next()) {
            out.entry(name.to_string()).or_default().insert(prop.to_string(), value.to_string());
        }
    }
    out
}

/// The snapship snapshots of `dataset` among parsed properties (bookmarks and foreign
/// snapshots left out), oldest first.
pub fn snapshots_in(dataset: &str, props: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Snapshot> {
    let prefix = format!("{dataset}@");
    let mut out: Vec<Snapshot> = props
        .iter()
        .filter_map(|(name, p)| {
            let snap = SnapshotName::parse(name.strip_prefix(&prefix)?)?;
            let guid = p.get("guid")?.clone();
            Some(Snapshot { name: snap, identity: guid.clone(), local_id: Some(guid), parent_local_id: None })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The resume token of a dataset from `zfs get -H -o value receive_resume_token`, if any.
pub fn parse_resume_token(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty() && t != "-").then(|| t.to_string())
}

/// `zfs send` for `snapshot`: incremental with every snapshot in between (`-I`) from `base`,
/// compressed blocks as on disk where both sides can.
pub fn send_command(f: &Features, dataset: &str, snapshot: &str, base: Option<&str>, compact: bool) -> Cmd {
    let mut cmd = Cmd::new("zfs").arg("send");
    if compact && f.compressed_send {
        cmd = cmd.arg("-c");
    }
    if let Some(base) = base {
        cmd = cmd.arg("-I").arg(format!("{dataset}@{base}"));
    }
    cmd.arg(format!("{dataset}@{snapshot}"))
}

/// `zfs send -t TOKEN`: resume an interrupted stream (modern ZFS).
pub fn resume_send_command(f: &Features, token: &str) -> Option<Cmd> {
    f.resumable.then(|| Cmd::new("zfs").arg("send").arg("-t").arg(token))
}

/// `zfs receive` into `dataset`: forced (`-F`) when the dataset exists, so that an atime
/// update or newer snapshots that the origin no longer has do not block it; resumable (`-s`)
/// and unmounted (`-u`) where supported.
pub fn receive_command(f: &Features, dataset: &str, exists: bool) -> Cmd {
    let mut cmd = Cmd::new("zfs").arg("receive");
    if exists {
        cmd = cmd.arg("-F");
    }
    if f.resumable {
        cmd = cmd.arg("-s");
    }
    cmd.arg(dataset)
}

/// `zfs snapshot` of several datasets at one point in time: one command where ZFS takes
/// several names; else `-r` on their common parent, and the snapshots of the other children
/// are destroyed right after (atomic for the members all the same). `None`: no common parent.
pub fn group_snapshot_commands(f: &Features, datasets: &[&str], name: &str) -> Option<(Cmd, Vec<String>)> {
    if f.multi_snapshot || datasets.len() == 1 {
        let mut cmd = Cmd::new("zfs").arg("snapshot");
        for d in datasets {
            cmd = cmd.arg(format!("{d}@{name}"));
        }
        return Some((cmd, Vec::new()));
    }
    let parts: Vec<Vec<&str>> = datasets.iter().map(|d| d.split('/').collect()).collect();
    let common: Vec<&str> = parts[0].iter().enumerate().take_while(|(i, p)| parts.iter().all(|q| q.get(*i) == Some(p))).map(|(_, p)| *p).collect();
    if common.is_empty() {
        return None;
    }
    Some((Cmd::new("zfs").arg("snapshot").arg("-r").arg(format!("{}@{name}", common.join("/"))), datasets.iter().map(|d| d.to_string()).collect()))
}

async fn zfs(args: &[&str]) -> Result<String, CommandError> {
    let mut cmd = Cmd::new("zfs");
    for a in args {
        cmd = cmd.arg(a);
    }
    cmd.output().await
}

/// Runs `cmd`, retrying a moment when ZFS says "dataset is busy" (seen right after a receive).
async fn with_busy_retry(cmd: &Cmd) -> Result<String, CommandError> {
    let mut tries = 0;
    loop {
        match cmd.output().await {
            Err(e) if e.stderr().contains("dataset is busy") && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

async fn dataset_exists(dataset: &str) -> Result<bool> {
    match zfs(&["list", "-H", "-o", "name", dataset]).await {
        Ok(_) => Ok(true),
        Err(e) if e.stderr().contains("does not exist") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn list_snapshots(dataset: &str) -> Result<Vec<Snapshot>> {
    match zfs(&["get", "-H", "-p", "-o", "name,property,value", "-d", "1", "guid", dataset]).await {
        Ok(text) => Ok(snapshots_in(dataset, &parse_properties(&text))),
        Err(e) if e.stderr().contains("does not exist") => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

pub struct ZfsOrigin {
    dataset: String,
}

impl ZfsOrigin {
    pub fn new(dataset: String) -> Self {
        ZfsOrigin { dataset }
    }
}

/// Takes a snapshot named after now (and after the newest existing one) of every dataset, at
/// one point in time; returns the name.
pub async fn snapshot_datasets(datasets: &[&str], kind: Kind) -> Result<SnapshotName> {
    let f = features().await;
    let mut newest = None;
    for d in datasets {
        if let Some(s) = list_snapshots(d).await?.pop() {
            newest = newest.max(Some(s.name));
        }
    }
    let mut name = SnapshotName::next(Utc::now(), newest.as_ref(), kind);
    loop {
        let (cmd, members) = group_snapshot_commands(f, datasets, name.as_str())
            .ok_or_else(|| anyhow!("the datasets {} share no parent, and this ZFS cannot snapshot several at once", datasets.join(", ")))?;
        match cmd.output().await {
            Ok(_) => {
                if !members.is_empty() {
                    discard_other_children(datasets, name.as_str()).await?;
                }
                return Ok(name);
            }
            Err(e) if e.stderr().contains("already exists") => name = name.successor(),
            Err(e) => return Err(e.into()),
        }
    }
}

/// After `zfs snapshot -r PARENT@name`: destroys the snapshots of the datasets that are not
/// members of the group.
async fn discard_other_children(members: &[&str], name: &str) -> Result<()> {
    let parts: Vec<Vec<&str>> = members.iter().map(|d| d.split('/').collect()).collect();
    let common: Vec<&str> = parts[0].iter().enumerate().take_while(|(i, p)| parts.iter().all(|q| q.get(*i) == Some(p))).map(|(_, p)| *p).collect();
    let parent = common.join("/");
    let listed = zfs(&["list", "-H", "-o", "name", "-r", &parent]).await?;
    for dataset in listed.lines() {
        if !members.contains(&dataset) {
            let snap = format!("{dataset}@{name}");
            if let Err(e) = with_busy_retry(&Cmd::new("zfs").arg("destroy").arg(&snap)).await {
                if !e.stderr().contains("could not find") && !e.stderr().contains("does not exist") {
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl OriginSide for ZfsOrigin {
    async fn take_snapshot(&self, kind: Kind) -> Result<Snapshot> {
        let name = snapshot_datasets(&[&self.dataset], kind).await.with_context(|| format!("cannot snapshot {}", self.dataset))?;
        self.list().await?.into_iter().find(|s| s.name == name).ok_or_else(|| anyhow!("snapshot {}@{name} vanished right after it was taken", self.dataset))
    }

    async fn changed_since(&self, snapshot: &Snapshot, _flush: bool) -> Result<bool> {
        let snap = format!("{}@{}", self.dataset, snapshot.name);
        if features().await.written {
            let written = zfs(&["get", "-H", "-p", "-o", "value", &format!("written@{}", snapshot.name), &self.dataset]).await?;
            return Ok(written.trim() != "0");
        }
        // Old ZFS: a change either grows the dataset or leaves blocks only the snapshot holds.
        let props = parse_properties(&zfs(&["get", "-H", "-p", "-o", "name,property,value", "used,referenced", &self.dataset, &snap]).await?);
        let get = |n: &str, p: &str| props.get(n).and_then(|m| m.get(p)).cloned().unwrap_or_default();
        Ok(get(&snap, "used") != "0" || get(&snap, "referenced") != get(&self.dataset, "referenced"))
    }

    async fn list(&self) -> Result<Vec<Snapshot>> {
        list_snapshots(&self.dataset).await
    }

    async fn send(&self, snapshot: &Snapshot, base: Option<&Snapshot>, compact: bool) -> Result<SendStream> {
        let f = features().await;
        let mut process = send_command(f, &self.dataset, snapshot.name.as_str(), base.map(|b| b.name.as_str()), compact).spawn(Pipe::Out)?;
        Ok(SendStream::new(Box::new(process.stdout()), process))
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        with_busy_retry(&Cmd::new("zfs").arg("destroy").arg(format!("{}@{}", self.dataset, snapshot.name))).await?;
        Ok(())
    }

    async fn send_resumed(&self, token: &str) -> Result<SendStream> {
        let cmd = resume_send_command(features().await, token).ok_or_else(|| anyhow!("this ZFS cannot resume a send (no `zfs send -t`)"))?;
        let mut process = cmd.spawn(Pipe::Out)?;
        Ok(SendStream::new(Box::new(process.stdout()), process))
    }

    async fn keep_base(&self, replica: &str, base: &SnapshotName, previous: Option<&SnapshotName>) -> Result<()> {
        let f = features().await;
        if !f.holds {
            return Ok(());
        }
        let tag = format!("snapship:{replica}");
        let snap = format!("{}@{}", self.dataset, base);
        match zfs(&["hold", &tag, &snap]).await {
            Err(e) if !e.stderr().contains("tag already exists") => return Err(e.into()),
            _ => {}
        }
        if let Some(prev) = previous.filter(|p| *p != base) {
            let prev = format!("{}@{}", self.dataset, prev);
            if let Err(e) = zfs(&["release", &tag, &prev]).await {
                tracing::debug!("release {tag} on {prev}: {e}");
            }
        }
        if f.bookmarks {
            // A bookmark of the base outlives the snapshot: an incremental source of last resort.
            let bookmark = format!("{}#snapship-{replica}", self.dataset);
            let _ = zfs(&["destroy", &bookmark]).await;
            zfs(&["bookmark", &snap, &bookmark]).await?;
        }
        Ok(())
    }
}

pub struct ZfsReplica {
    dataset: String,
}

impl ZfsReplica {
    pub fn new(dataset: String) -> Self {
        ZfsReplica { dataset }
    }

    /// Drops what an interrupted resumable receive kept (modern ZFS); nothing to do on old.
    async fn discard_partial(&self) {
        if features().await.resumable {
            let _ = zfs(&["receive", "-A", &self.dataset]).await;
        }
    }
}

#[async_trait]
impl ReplicaSide for ZfsReplica {
    async fn list(&self) -> Result<Vec<Snapshot>> {
        list_snapshots(&self.dataset).await
    }

    async fn accepts_compact(&self) -> bool {
        features().await.compressed_send
    }

    async fn resume_token(&self) -> Option<String> {
        if !features().await.resumable {
            return None;
        }
        zfs(&["get", "-H", "-o", "value", "receive_resume_token", &self.dataset]).await.ok().as_deref().and_then(parse_resume_token)
    }

    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot> {
        let f = features().await;
        let exists = dataset_exists(&self.dataset).await?;
        if !incoming.from_token {
            // A new stream cannot start while an old partial receive is kept.
            self.discard_partial().await;
        }
        if exists && incoming.base.is_none() && !incoming.from_token && !self.list().await?.is_empty() {
            bail!(
                "{} holds snapshots but none in common with the origin; a full receive would destroy them. \
                 Destroy them (zfs destroy -r {}) or give the replica another dataset",
                self.dataset,
                self.dataset
            );
        }
        if !exists {
            if let Some((parent, _)) = self.dataset.rsplit_once('/') {
                if !dataset_exists(parent).await? {
                    zfs(&["create", "-p", parent]).await.with_context(|| format!("cannot create the parent dataset {parent}"))?;
                }
            }
        }
        let mut process = receive_command(f, &self.dataset, exists).spawn(Pipe::In)?;
        let mut stdin = process.stdin();
        let copied = tokio::io::copy_buf(&mut tokio::io::BufReader::with_capacity(super::PIPE_BUFFER, stream), &mut stdin).await.map_err(anyhow::Error::from);
        let copied = match copied {
            Ok(_) => stdin.shutdown().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        drop(stdin);
        let received = process.wait().await;
        if let Err(e) = copied {
            // A receive continuing a token keeps its partial state for another try; any other
            // is dropped (a cut stream is resumed by the spool, not by ZFS).
            if !incoming.from_token {
                self.discard_partial().await;
            }
            // The stream's error is the cause unless zfs gave up first (EPIPE).
            let broken_pipe = e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
            return Err(match received {
                Err(re) if broken_pipe => re.into(),
                Err(re) => e.context(format!("the stream into zfs receive broke ({re})")),
                Ok(()) => {
                    // zfs committed on the stream's end record before our end check failed:
                    // the snapshot must not stay.
                    let snap = format!("{}@{}", self.dataset, incoming.name);
                    if let Err(de) = with_busy_retry(&Cmd::new("zfs").arg("destroy").arg(&snap)).await {
                        tracing::error!("cannot destroy {snap} after a failed stream check: {de}");
                    }
                    e.context("the stream failed its check after zfs receive committed it; the snapshot was destroyed")
                }
            });
        }
        if let Err(e) = received {
            if !incoming.from_token {
                self.discard_partial().await;
            }
            return Err(e.into());
        }
        let got = self
            .list()
            .await?
            .into_iter()
            .find(|s| s.name == incoming.name)
            .ok_or_else(|| anyhow!("zfs receive succeeded but {}@{} is not there", self.dataset, incoming.name))?;
        if got.identity != incoming.identity {
            bail!("received {}@{} has guid {}, expected {}", self.dataset, incoming.name, got.identity, incoming.identity);
        }
        // Keep the replica read-only, and reads from changing it (atime).
        for prop in ["readonly=on", "atime=off"] {
            zfs(&["set", prop, &self.dataset]).await?;
        }
        Ok(got)
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        with_busy_retry(&Cmd::new("zfs").arg("destroy").arg(format!("{}@{}", self.dataset, snapshot.name))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = include_str!("../../tests/data/zfs/zfs-fuse-0.7.0-usage.txt");
    const MODERN: &str = include_str!("../../tests/data/zfs/openzfs-2.1.11-usage.txt");

    #[test]
    fn detects_zfs_fuse_as_old() {
        let f = Features::from_usage(OLD);
        assert_eq!(
            f,
            Features {
                multi_snapshot: false,
                resumable: false,
                bookmarks: false,
                compressed_send: false,
                raw_send: false,
                holds: true,
                written: false,
                receive_no_mount: false
            }
        );
    }

    #[test]
    fn detects_openzfs_as_modern() {
        let f = Features::from_usage(MODERN);
        assert_eq!(
            f,
            Features {
                multi_snapshot: true,
                resumable: true,
                bookmarks: true,
                compressed_send: true,
                raw_send: true,
                holds: true,
                written: true,
                receive_no_mount: true
            }
        );
    }

    #[test]
    fn commands_follow_the_features() {
        let (old, modern) = (Features::from_usage(OLD), Features::from_usage(MODERN));
        let args = |c: Cmd| c.args().join(" ");
        assert_eq!(args(send_command(&old, "tank/p", "s2", Some("s1"), true)), "send -I tank/p@s1 tank/p@s2");
        assert_eq!(args(send_command(&modern, "tank/p", "s2", Some("s1"), true)), "send -c -I tank/p@s1 tank/p@s2");
        assert_eq!(args(send_command(&modern, "tank/p", "s2", None, false)), "send tank/p@s2");
        assert_eq!(args(receive_command(&old, "b/p", true)), "receive -F b/p");
        assert_eq!(args(receive_command(&modern, "b/p", false)), "receive -s b/p");
        assert!(resume_send_command(&old, "tok").is_none());
        assert_eq!(args(resume_send_command(&modern, "1-abc").unwrap()), "send -t 1-abc");
        let (one, members) = group_snapshot_commands(&modern, &["tank/a", "tank/b"], "s").unwrap();
        assert_eq!((args(one), members.len()), ("snapshot tank/a@s tank/b@s".to_string(), 0));
        let (one, members) = group_snapshot_commands(&old, &["tank/x/a", "tank/x/b"], "s").unwrap();
        assert_eq!((args(one), members.len()), ("snapshot -r tank/x@s".to_string(), 2));
        assert!(group_snapshot_commands(&old, &["tank/a", "pool2/b"], "s").is_none());
    }

    #[test]
    fn parses_recorded_outputs() {
        let props = parse_properties(include_str!("../../tests/data/zfs/openzfs-2.1.11-get-guid.txt"));
        let snaps = snapshots_in("tank/projects", &props);
        // The dataset, a foreign snapshot and a bookmark are not snapship snapshots.
        assert_eq!(snaps.iter().map(|s| s.name.to_string()).collect::<Vec<_>>(), ["snapship-20261123T100000.000Z", "snapship-20261123T101500.000Z"]);
        assert_eq!(snaps[1].identity, "2739501178331592261");
        let token = parse_resume_token(include_str!("../../tests/data/zfs/openzfs-2.1.11-get-resume-token.txt")).unwrap();
        assert!(token.starts_with("1-e604ea4bf-e0-"));
        assert_eq!(parse_resume_token("-\n"), None);
    }
}
