//! The ZFS backend, through the `zfs` command (`-H -p` output where it exists).
//!
//! Identity is the snapshot guid, the same on every copy. The origin snapshots its dataset
//! and sends with `-I` from the common base, so every snapshot taken meanwhile travels in
//! one stream. The replica receives into its policy's dataset, kept read-only (and with atime
//! off, so that reading it never blocks the next incremental receive); `zfs receive` is atomic,
//! so a cut stream never leaves a snapshot behind.
//!
//! The other side is hostile until checked. A replica's resume token names what the origin
//! would send, so it must name the very stream planned ([`check_resume_token`]). An origin's
//! stream could carry properties (a mountpoint or share outside the replica's policy) or
//! other file systems: the replica refuses any stream whose first record is a replication
//! header ([`check_stream_header`]), receives with the properties that reach outside
//! forced or kept out where its ZFS can ([`receive_command`]), and undoes a `-I` package that
//! brought a snapshot outside what it takes ([`check_received`]).
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
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
    /// `zfs receive -o property=value` and `-x property` (OpenZFS 0.7 and later): the
    /// receiver's values win over the stream's.
    pub receive_props: bool,
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
            receive_props: usage
                .lines()
                .map(str::trim)
                .any(|l| l.starts_with("receive [") && l.contains("[-o <property>=<value>]") && l.contains("[-x <property>]")),
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

/// `zfs send` for `snapshot`: incremental from `base`, with every snapshot in between (`-I`)
/// when `intermediates` (else `-i`, the two ends only), compressed blocks as on disk where
/// both sides can.
pub fn send_command(f: &Features, dataset: &str, snapshot: &str, base: Option<&str>, intermediates: bool, compact: bool) -> Cmd {
    let mut cmd = Cmd::new("zfs").arg("send");
    if compact && f.compressed_send {
        cmd = cmd.arg("-c");
    }
    if let Some(base) = base {
        cmd = cmd.arg(if intermediates { "-I" } else { "-i" }).arg(format!("{dataset}@{base}"));
    }
    cmd.arg(format!("{dataset}@{snapshot}"))
}

/// The snapshots `zfs send -I base snapshot` would carry besides `snapshot`: those created
/// after `base` and before `snapshot`, from `all` (`(name, guid)` in creation order). `None`
/// if either end is not in `all`.
pub fn between<'a>(all: &'a [(String, String)], base: &str, snapshot: &str) -> Option<&'a [(String, String)]> {
    let from = all.iter().position(|(n, _)| n == base)?;
    let to = all.iter().position(|(n, _)| n == snapshot)?;
    (from < to).then(|| &all[from + 1..to])
}

/// Whether the origin sends the snapshots between `base` and `snapshot` with it (`-I`): only
/// when every one of them is a snapship snapshot, which a replica takes ([`check_received`]
/// refuses any other name). A snapshot of someone else's in between (an admin's `@before-upgrade`)
/// makes it `-i`: the replica gets the two ends, and misses the scheduled ones in between.
pub fn sends_intermediates(all: &[(String, String)], base: &str, snapshot: &str) -> bool {
    between(all, base, snapshot).is_some_and(|b| b.iter().all(|(n, _)| SnapshotName::parse(n).is_some()))
}

/// Checks what a receive brought into a replica dataset, against what it held `before` and
/// `after` (`(name, guid)`, creation order): besides the announced snapshot `incoming` (whose
/// guid the caller checks), only the snapshots of a `zfs send -I` package may come, each a
/// snapship name strictly between the base and `incoming` (oldest first by name as by
/// creation). Anything else (another name, a snapshot newer than the one announced or older
/// than the base, any extra from a stream that is not a package) is refused: the caller
/// undoes the receive. Returns the names of the intermediate snapshots received. Pure.
pub fn check_received(before: &[(String, String)], after: &[(String, String)], incoming: &Incoming, header: StreamHeader) -> Result<Vec<String>> {
    let new: Vec<&(String, String)> = after.iter().filter(|a| !before.contains(a)).collect();
    let extra: Vec<&str> = new.iter().map(|(n, _)| n.as_str()).filter(|n| *n != incoming.name.as_str()).collect();
    if extra.is_empty() {
        return Ok(Vec::new());
    }
    let refuse = |why: String| {
        anyhow!(
            "refused the stream for {}: it brought {} besides the announced snapshot; {why}. \
             snapship's origin never sends that, so the sender is not snapship's or not the one this policy trusts; \
             the receive was undone",
            incoming.name,
            extra.join(", ")
        )
    };
    if header != StreamHeader::Package || incoming.from_token {
        return Err(refuse("only a `zfs send -I` package from a base carries more than one snapshot".into()));
    }
    let base = incoming.base.as_deref().and_then(|g| before.iter().find(|(_, guid)| guid == g)).map(|(n, _)| n.as_str());
    let Some(base) = base.and_then(SnapshotName::parse) else {
        return Err(refuse("a package must go from a snapship snapshot the replica holds".into()));
    };
    let mut last = base.clone();
    for name in &extra {
        let Some(parsed) = SnapshotName::parse(name) else { return Err(refuse(format!("`{name}` is not a snapship snapshot name"))) };
        if parsed <= base || parsed >= incoming.name {
            return Err(refuse(format!("`{name}` is not between the base {base} and {}", incoming.name)));
        }
        if parsed <= last {
            return Err(refuse(format!("`{name}` came after {last}: names out of creation order")));
        }
        last = parsed;
    }
    Ok(extra.into_iter().map(String::from).collect())
}

/// Whether a stream this node fetched from another member ([`Incoming::fetched`]) fits
/// `dataset` as it is, `held` its snapshots (name, guid) in creation order, `None` when the
/// dataset does not exist. A fetch never makes room: a ZFS dataset receives an incremental
/// only on its newest snapshot (else `receive -F` would destroy the newer ones, and this
/// node's replication would set them aside and roll back), and a full stream only into a new
/// dataset (over an existing one it would replace it). The member that ships is hostile as
/// any peer: whatever base it names, nothing here is changed before this passes. Pure.
pub fn check_fetch_fits(dataset: &str, held: Option<&[(String, String)]>, incoming: &Incoming) -> Result<()> {
    let name = &incoming.name;
    match (held, incoming.base.as_deref()) {
        (None, None) => Ok(()),
        (None, Some(base)) => bail!("refused the fetched stream of {name}: it is incremental from guid {base}, but {dataset} does not exist"),
        (Some(_), None) => bail!(
            "refused the fetched stream of {name}: it is a full stream and {dataset} exists (a full receive would replace it). \
             Move it away (zfs rename {dataset} {dataset}-old) and fetch again, or restore on the member that holds {name}"
        ),
        (Some(all), Some(base)) => {
            let Some(at) = all.iter().position(|(_, guid)| guid == base) else {
                bail!("refused the fetched stream of {name}: {dataset} holds no snapshot with guid {base}, the stream's base");
            };
            let newer: Vec<&str> = all[at + 1..].iter().map(|(n, _)| n.as_str()).collect();
            if !newer.is_empty() {
                bail!(
                    "refused the fetched stream of {name}: {dataset} holds {} after the stream's base {}, and a ZFS dataset receives \
                     nothing older than its newest snapshot (this node never rolls back to make room). Restore {name} on the member \
                     that holds it, or restore one of the snapshots this node holds",
                    newer.join(", "),
                    all[at].0
                );
            }
            Ok(())
        }
    }
}

/// `zfs send -t TOKEN`: resume an interrupted stream (modern ZFS). The token comes from the
/// replica: pass it through [`check_token_text`] and [`check_resume_token`] first.
pub fn resume_send_command(f: &Features, token: &str) -> Option<Cmd> {
    f.resumable.then(|| Cmd::new("zfs").arg("send").arg("-t").arg(token))
}

/// `zfs send -nvt TOKEN`: decodes the token and prints what it would resume, sending nothing.
pub fn resume_token_dump_command(token: &str) -> Cmd {
    Cmd::new("zfs").arg("send").arg("-nvt").arg(token)
}

/// What a resume token says it resumes. A token is an nvlist that the replica hands over,
/// unauthenticated: `zfs send -t` sends whatever it names, so every field that chooses the
/// data is checked against the origin's own plan ([`check_resume_token`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeToken {
    /// `dataset@snapshot` of the partial receive.
    pub toname: String,
    pub toguid: u64,
    /// The guid of the incremental source; `None` for a full stream.
    pub fromguid: Option<u64>,
}

/// Refuses a token that is not made of what ZFS puts in one (`1-<hex>-<hex>-<hex>`: digits,
/// letters, dashes) before it goes anywhere near a command line.
pub fn check_token_text(token: &str) -> Result<()> {
    if token.is_empty() || token.starts_with('-') || !token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("the replica offered a resume token with characters no ZFS token has; the origin starts over with a fresh send");
    }
    Ok(())
}

/// Reads what `zfs send -nvt TOKEN` printed (stdout and stderr together: OpenZFS 2.x prints
/// the dump on stdout, 0.7 and 0.8 on stderr). libzfs prints "resume token contents:", then
/// `nvlist_print`: "nvlist version: 0" and one line per pair, a tab, `name = value`, with
/// numbers in hex (`toguid = 0x2604a9cea437f645`).
///
/// The token's strings are printed as they are, so a hostile one can forge lines (a value
/// holding "\n\ttoname = ..."). The real pairs are printed too, each at the start of a
/// line, so every pair line of the whole output is read and a name seen twice refuses the
/// token; a forged line can then only add a pair the token lacks, and `zfs send -t` reads
/// none of the pairs that matter from anywhere but the real ones.
pub fn parse_resume_token_dump(text: &str) -> Result<ResumeToken> {
    let Some((_, dump)) = text.split_once("resume token contents:") else {
        bail!("`zfs send -nvt` printed no resume token contents");
    };
    let mut pairs: BTreeMap<&str, &str> = BTreeMap::new();
    for line in dump.lines() {
        // Top-level pairs only: one tab (a nested nvlist's pairs have more).
        let Some(pair) = line.strip_prefix('\t').filter(|p| !p.starts_with('\t')) else { continue };
        let Some((name, value)) = pair.split_once(" = ") else { continue };
        if pairs.insert(name, value).is_some() {
            bail!("the resume token holds `{name}` twice");
        }
    }
    let hex = |name: &str| -> Result<Option<u64>> {
        let Some(v) = pairs.get(name) else { return Ok(None) };
        let digits = v.strip_prefix("0x").ok_or_else(|| anyhow!("the resume token's `{name}` is not a hex number: {v}"))?;
        u64::from_str_radix(digits, 16).map(Some).map_err(|_| anyhow!("the resume token's `{name}` is not a hex number: {v}"))
    };
    let toname = pairs.get("toname").ok_or_else(|| anyhow!("the resume token names no snapshot (no `toname`)"))?.to_string();
    let toguid = hex("toguid")?.ok_or_else(|| anyhow!("the resume token has no `toguid`"))?;
    // libzfs reads a missing fromguid as 0: a full stream.
    let fromguid = hex("fromguid")?.filter(|g| *g != 0);
    Ok(ResumeToken { toname, toguid, fromguid })
}

/// Whether a decoded token resumes exactly the stream the origin means to send: `snapshot`
/// of `dataset` (name and guid), incremental from `base` (by guid) or full when `base` is
/// `None`. Guids are decimal in `zfs get guid` and hex in the token: compared as numbers.
pub fn check_resume_token(token: &ResumeToken, dataset: &str, snapshot: &Snapshot, base: Option<&Snapshot>) -> Result<()> {
    let guid = |s: &Snapshot| s.identity.parse::<u64>().with_context(|| format!("the guid of {dataset}@{} is not a number: {}", s.name, s.identity));
    let expected = format!("{dataset}@{}", snapshot.name);
    let refuse = |what: String| anyhow!("the replica offered a resume token for {what}, not for {expected}; the origin starts over with a fresh send");
    if token.toname != expected {
        return Err(refuse(format!("another dataset or snapshot ({})", token.toname)));
    }
    if token.toguid != guid(snapshot)? {
        return Err(refuse(format!("another snapshot (guid {:#x}, not {:#x})", token.toguid, guid(snapshot)?)));
    }
    match (token.fromguid, base) {
        (None, None) => Ok(()),
        (Some(from), Some(b)) if from == guid(b)? => Ok(()),
        (Some(from), Some(b)) => Err(refuse(format!("a stream from another base (guid {from:#x}, not {}@{})", dataset, b.name))),
        (Some(from), None) => Err(refuse(format!("an incremental stream (from guid {from:#x}) where a full one was started"))),
        (None, Some(b)) => Err(refuse(format!("a full stream where one from {dataset}@{} was started", b.name))),
    }
}

/// Properties whose value from a stream would reach outside the replica's dataset: where it
/// mounts, and whom it is shared with. `zfs receive -x` keeps the stream's values out (the
/// replica's own settings, inherited or local, stay).
pub const RECEIVE_EXCLUDED: [&str; 3] = ["mountpoint", "sharenfs", "sharesmb"];

/// Properties the replica forces at receive (`-o`), and sets again right after it on every
/// ZFS (see [`ReplicaSide::receive`] of [`ZfsReplica`]).
pub const RECEIVE_FORCED: [&str; 1] = ["readonly=on"];

/// `zfs receive` into `dataset`: forced (`-F`) when the dataset exists, so that an atime
/// update or newer snapshots that the origin no longer has do not block it; resumable (`-s`)
/// where supported. Whatever the stream carries, where this ZFS can: unmounted (`-u`, so
/// nothing is mounted while the stream is received), read-only from the start (`-o
/// readonly=on`), and the stream's [`RECEIVE_EXCLUDED`] properties left out (`-x`).
///
/// zfs-fuse 0.7 has none of `-u`, `-o`, `-x` (and ZoL 0.6 only `-u`): there, what stands
/// between a stream's properties and the replica is [`check_stream_header`] (streams that
/// carry properties are refused), then, right after the receive, `readonly=on` and the
/// [`RECEIVE_EXCLUDED`] properties a stream set put back to inherited. The gap: a received
/// file system is mounted during the receive (at its inherited mountpoint, unless a stream
/// hid properties past its first record) and writable until the receive ends.
pub fn receive_command(f: &Features, dataset: &str, exists: bool) -> Cmd {
    let mut cmd = Cmd::new("zfs").arg("receive");
    if exists {
        cmd = cmd.arg("-F");
    }
    if f.resumable {
        cmd = cmd.arg("-s");
    }
    if f.receive_no_mount {
        cmd = cmd.arg("-u");
    }
    if f.receive_props {
        for prop in RECEIVE_FORCED {
            cmd = cmd.arg("-o").arg(prop);
        }
        for prop in RECEIVE_EXCLUDED {
            cmd = cmd.arg("-x").arg(prop);
        }
    }
    cmd.arg(dataset)
}

/// `(dataset, property)` whose value came from a received stream, from `zfs get -r -H -o
/// name,property,source` (snapshots left out: their properties are not inherited).
pub fn received_properties(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, prop, source) = (f.next()?, f.next()?, f.next()?);
            (source.trim() == "received" && !name.contains('@')).then(|| (name.to_string(), prop.to_string()))
        })
        .collect()
}

/// The size of a send stream record (`dmu_replay_record_t` in OpenZFS's
/// include/sys/zfs_ioctl.h, the same in zfs-fuse): a stream begins with one, a DRR_BEGIN.
pub const STREAM_RECORD: usize = 312;
/// `drr_magic` of a DRR_BEGIN record.
const DMU_BACKUP_MAGIC: u64 = 0x2_F5BA_CBAC;
/// The header types in the low two bits of `drr_versioninfo`.
const DMU_SUBSTREAM: u64 = 1;
const DMU_COMPOUNDSTREAM: u64 = 2;
/// Feature flag (bits 2.. of `drr_versioninfo`): the stream carries holds (`send --holds`).
const DMU_BACKUP_FEATURE_HOLDS: u64 = 1 << 26;

/// What the first record of a stream says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamHeader {
    /// One snapshot, full or incremental (`zfs send [-i]`, `zfs send -t`).
    Single,
    /// Several incremental snapshots of one file system in a row (`zfs send -I`): a
    /// compound header with no payload, so no properties and no other file systems.
    Package,
}

/// Checks the first record of a stream before `zfs receive` sees it. A compound header
/// with a payload is a replication stream (`zfs send -R`, `-p`, `-b`, `--holds`): its
/// payload, an nvlist of file systems and their properties, would be applied to the replica
/// (mountpoints, shares, other datasets); snapship never sends one, so it is refused.
///
/// Only the first record is read. A package's substreams could nest a replication header
/// further in, which `zfs receive` would also follow; `-u`, `-o` and `-x` still hold for it
/// where ZFS has them ([`receive_command`]), and elsewhere the replica puts back the
/// properties that reach outside right after the receive. Walking every record of the
/// stream would close that last gap (the mount during the receive on zfs-fuse).
///
/// The record, in the sender's byte order (`drr_magic` tells which): `drr_type` u32 at 0
/// (DRR_BEGIN is 0), `drr_payloadlen` u32 at 4, then the DRR_BEGIN body: `drr_magic` u64
/// at 8, `drr_versioninfo` u64 at 16 (header type in bits 0-1, feature flags above).
pub fn check_stream_header(record: &[u8]) -> Result<StreamHeader> {
    if record.len() < STREAM_RECORD {
        bail!("the stream ended after {} bytes, before its first record: not a ZFS send stream", record.len());
    }
    let at = |offset: usize, len: usize| &record[offset..offset + len];
    let little = u64::from_le_bytes(at(8, 8).try_into().expect("8 bytes")) == DMU_BACKUP_MAGIC;
    let big = u64::from_be_bytes(at(8, 8).try_into().expect("8 bytes")) == DMU_BACKUP_MAGIC;
    if !little && !big {
        bail!("the stream does not begin with a ZFS send stream header (bad magic): not a ZFS send stream");
    }
    let u32_at = |o| {
        let b: [u8; 4] = at(o, 4).try_into().expect("4 bytes");
        if little { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) }
    };
    let versioninfo = {
        let b: [u8; 8] = at(16, 8).try_into().expect("8 bytes");
        if little { u64::from_le_bytes(b) } else { u64::from_be_bytes(b) }
    };
    if u32_at(0) != 0 {
        bail!("the stream does not begin with a DRR_BEGIN record (type {}): not a ZFS send stream", u32_at(0));
    }
    let payload = u32_at(4);
    let replication = || {
        anyhow!(
            "refused a ZFS replication stream (zfs send -R, -p, -b or --holds): it carries properties or other file systems, \
             which a replica does not take from its origin; snapship's origin never sends one, so the origin is not \
             snapship's or not the one this policy trusts"
        )
    };
    match versioninfo & 3 {
        DMU_SUBSTREAM => Ok(StreamHeader::Single),
        DMU_COMPOUNDSTREAM if payload == 0 && versioninfo & (DMU_BACKUP_FEATURE_HOLDS << 2) == 0 => Ok(StreamHeader::Package),
        DMU_COMPOUNDSTREAM => Err(replication()),
        other => bail!("the stream's header type {other} is unknown (1: one snapshot, 2: a package): not a ZFS send stream this replica takes"),
    }
}

/// Reads the first [`STREAM_RECORD`] bytes of a stream (fewer if it ends before).
async fn read_first_record(stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Vec<u8>> {
    let mut record = vec![0u8; STREAM_RECORD];
    let mut filled = 0;
    while filled < record.len() {
        match stream.read(&mut record[filled..]).await.context("reading the stream's first record")? {
            0 => break,
            n => filled += n,
        }
    }
    record.truncate(filled);
    Ok(record)
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
    zfs_command(args).output().await
}

fn zfs_command(args: &[&str]) -> Cmd {
    args.iter().fold(Cmd::new("zfs"), |cmd, a| cmd.arg(a))
}

/// `zfs ARGS` by [`with_busy_retry`].
async fn zfs_retrying(args: &[&str]) -> Result<String, CommandError> {
    with_busy_retry(&zfs_command(args)).await
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
    /// Where this node's snapshots are while it is a replica (its replica dataset), when
    /// that is another dataset than the live one (`promote_path:` set): promotion moves
    /// the replica dataset there (`zfs rename`), stepping down moves it back.
    home: Option<String>,
}

impl ZfsOrigin {
    pub fn new(dataset: String) -> Self {
        ZfsOrigin { dataset, home: None }
    }

    /// The origin side of a promoted replica whose live dataset is `live` and whose
    /// replica dataset is `home`.
    pub fn promoted(live: String, home: String) -> Self {
        let home = (home != live).then_some(home);
        ZfsOrigin { dataset: live, home }
    }
}

/// The name of diverged data (`diverged-TIME`), as a snapshot name and in a dataset name: a
/// name this module made, refused otherwise before it reaches a command line.
pub fn check_diverged_name(name: &str) -> Result<()> {
    let rest = name.strip_prefix("diverged-").unwrap_or("");
    if rest.is_empty() || !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
        bail!("{name:?} is not the name of diverged data (diverged-TIME)");
    }
    Ok(())
}

/// A fresh name for diverged data, from the time now.
fn diverged_name() -> String {
    format!("diverged-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))
}

/// The dataset that keeps diverged data `label` set aside from `dataset`: a sibling,
/// `DATASET-LABEL` (a child would have to mount inside the read-only replica).
pub fn diverged_dataset(dataset: &str, label: &str) -> String {
    format!("{dataset}-{label}")
}

/// Every snapshot of `dataset` (snapship's, diverged ones and foreign ones) with its guid,
/// in creation order.
async fn all_snapshots(dataset: &str) -> Result<Vec<(String, String)>> {
    let text = zfs(&["get", "-H", "-p", "-o", "name,property,value", "-d", "1", "guid,createtxg", dataset]).await?;
    let prefix = format!("{dataset}@");
    let mut out: Vec<(u64, String, String)> = parse_properties(&text)
        .into_iter()
        .filter_map(|(name, p)| {
            let snap = name.strip_prefix(&prefix)?.to_string();
            Some((p.get("createtxg")?.parse().ok()?, snap, p.get("guid")?.clone()))
        })
        .collect();
    out.sort();
    Ok(out.into_iter().map(|(_, n, g)| (n, g)).collect())
}

/// `zfs send SEND | zfs receive RECEIVE` on this node, through a bounded buffer.
async fn local_copy(send: Cmd, receive: Cmd) -> Result<()> {
    let mut sender = send.spawn(Pipe::Out)?;
    let mut receiver = receive.spawn(Pipe::In)?;
    let (mut out, mut inp) = (sender.stdout(), receiver.stdin());
    let copied = tokio::io::copy_buf(&mut tokio::io::BufReader::with_capacity(super::PIPE_BUFFER, &mut out), &mut inp).await;
    let closed = inp.shutdown().await;
    drop(inp);
    let (sent, received) = (sender.wait().await, receiver.wait().await);
    sent?;
    received?;
    copied?;
    closed?;
    Ok(())
}

/// `zfs set readonly=...` of `dataset`.
async fn set_read_only(dataset: &str, on: bool) -> Result<()> {
    zfs(&["set", if on { "readonly=on" } else { "readonly=off" }, dataset])
        .await
        .with_context(|| format!("cannot set readonly={} on {dataset}", if on { "on" } else { "off" }))?;
    Ok(())
}

/// Moves file system `from` to `to` (`zfs rename`, same pool), unmounted for the move:
/// zfs-fuse renames only an unmounted file system (a mounted one is busy), and OpenZFS
/// remounts it at the new place all the same. An error: not moved, `from` where it was
/// (mounted again, or the error says it is not). `Some(why)`: moved, but not mounted at the
/// new place.
async fn rename_dataset(from: &str, to: &str) -> Result<Option<String>> {
    let mounted = zfs(&["get", "-H", "-o", "value", "mounted", from]).await.with_context(|| format!("cannot read {from}"))?.trim() == "yes";
    if mounted {
        zfs_retrying(&["umount", from])
            .await
            .with_context(|| format!("cannot move {from} to {to}: it cannot be unmounted (a process using it? stop it first)"))?;
    }
    if let Err(e) = zfs_retrying(&["rename", from, to]).await {
        let not_remounted = if mounted { zfs(&["mount", from]).await.err() } else { None };
        let state = match not_remounted {
            None => "it is where it was".to_string(),
            Some(again) => format!("it is where it was, but unmounted ({again}): `zfs mount {from}`"),
        };
        return Err(anyhow::Error::from(e).context(format!("cannot move {from} to {to}; {state}")));
    }
    if mounted && let Err(e) = zfs(&["mount", to]).await {
        return Ok(Some(format!("moved {from} to {to}, but cannot mount it there ({e}): `zfs mount {to}`")));
    }
    Ok(None)
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
            if let Err(e) = zfs_retrying(&["destroy", &snap]).await {
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
    /// In place: the replica dataset (moved to the live dataset first when `promote_path:`
    /// names another one) made writable, with atime back to what the pool says. Its head is
    /// its newest received snapshot, `snapshot`: a replica is kept read-only.
    async fn make_live_from(&self, snapshot: &Snapshot) -> Result<()> {
        if let Some(home) = &self.home {
            if dataset_exists(&self.dataset).await? {
                bail!("{} already exists; move it away (or set `promote_path:` on this replica to another dataset) and promote again", self.dataset);
            }
            if let Some(unmounted) = rename_dataset(home, &self.dataset).await? {
                bail!("{unmounted}; then `zfs set readonly=off {}` makes it the live file set", self.dataset);
            }
        }
        if !self.list().await?.iter().any(|s| s.identity == snapshot.identity) {
            bail!("{}@{} is not there to promote from", self.dataset, snapshot.name);
        }
        set_read_only(&self.dataset, false).await?;
        if let Err(e) = zfs(&["inherit", "atime", &self.dataset]).await {
            tracing::warn!("cannot put atime of {} back to inherited: {e}", self.dataset);
        }
        Ok(())
    }

    /// A snapshot `diverged-TIME` of the live dataset (not a snapship name: retention never
    /// sees it), then the dataset read-only. The first incremental receive from the new
    /// origin sets it aside with every snapshot after the common base ([`ZfsReplica`]'s
    /// receive), so `receive -F` never rolls it back.
    async fn step_down(&self) -> Result<String> {
        let name = diverged_name();
        zfs(&["snapshot", &format!("{}@{name}", self.dataset)]).await.with_context(|| format!("cannot keep {} as {name}", self.dataset))?;
        set_read_only(&self.dataset, true).await?;
        // Its snapshots go back where this node receives them as a replica.
        self.place_as_replica(true).await?;
        Ok(name)
    }

    async fn remove_diverged(&self, name: &str) -> Result<()> {
        check_diverged_name(name)?;
        let dataset = self.home.as_deref().unwrap_or(&self.dataset);
        let (snap, aside) = (format!("{dataset}@{name}"), diverged_dataset(dataset, name));
        let mut found = false;
        if dataset_exists(&aside).await? {
            zfs_retrying(&["destroy", "-r", &aside]).await?;
            found = true;
        }
        if dataset_exists(&snap).await? {
            zfs_retrying(&["destroy", &snap]).await?;
            found = true;
        }
        if !found {
            bail!("neither {snap} nor {aside} exists: the diverged data `{name}` is gone already");
        }
        Ok(())
    }

    async fn freeze(&self, frozen: bool) -> Result<()> {
        set_read_only(&self.dataset, frozen).await
    }

    /// Back in place (`false`), the live dataset must be mounted to be thawed: not mounted
    /// is an error. A replica needs no mount to receive: as one, it is a warning.
    async fn place_as_replica(&self, as_replica: bool) -> Result<()> {
        match (&self.home, as_replica) {
            (Some(home), true) => {
                if let Some(unmounted) = rename_dataset(&self.dataset, home).await? {
                    tracing::warn!("{unmounted}");
                }
                Ok(())
            }
            (Some(home), false) => match rename_dataset(home, &self.dataset).await? {
                Some(unmounted) => bail!("{unmounted}"),
                None => Ok(()),
            },
            (None, _) => Ok(()),
        }
    }

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

    /// Incremental with the snapshots in between (`-I`) where they are all snapship's (see
    /// [`sends_intermediates`]): a replica that was away gets every snapshot it missed in the
    /// one stream, oldest first (ZFS receives nothing older than a replica's newest snapshot,
    /// so there is no backfill afterwards).
    async fn send(&self, snapshot: &Snapshot, base: Option<&Snapshot>, compact: bool) -> Result<SendStream> {
        let f = features().await;
        let intermediates = match base {
            Some(b) => {
                let all = all_snapshots(&self.dataset).await?;
                let with = sends_intermediates(&all, b.name.as_str(), snapshot.name.as_str());
                if !with {
                    tracing::warn!(dataset = %self.dataset, base = %b.name, snapshot = %snapshot.name,
                        "a snapshot that is not snapship's lies in between: sending with -i, without the snapshots in between");
                }
                with
            }
            None => false,
        };
        let cmd = send_command(f, &self.dataset, snapshot.name.as_str(), base.map(|b| b.name.as_str()), intermediates, compact);
        let mut process = cmd.spawn(Pipe::Out)?;
        Ok(SendStream::new(Box::new(process.stdout()), process))
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        zfs_retrying(&["destroy", &format!("{}@{}", self.dataset, snapshot.name)]).await?;
        Ok(())
    }

    /// The token is the replica's word: its text is checked before it reaches a command line,
    /// then `zfs send -nvt` decodes it and it must name this very stream (see
    /// [`check_resume_token`]); only then does `zfs send -t` run.
    async fn send_resumed(&self, token: &str, snapshot: &Snapshot, base: Option<&Snapshot>) -> Result<SendStream> {
        check_token_text(token)?;
        let cmd = resume_send_command(features().await, token).ok_or_else(|| anyhow!("this ZFS cannot resume a send (no `zfs send -t`)"))?;
        let dump = resume_token_dump_command(token);
        let (status, out, err) = dump.output_unchecked().await?;
        if !status.success() {
            bail!("`{dump}` cannot decode the replica's resume token ({status}): {}; the origin starts over with a fresh send", err.trim());
        }
        let decoded = parse_resume_token_dump(&format!("{out}\n{err}")).context("reading the replica's resume token")?;
        check_resume_token(&decoded, &self.dataset, snapshot, base)?;
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
    /// The file set's members: the tags of the holds this node put on its snapshots while it
    /// was origin (`snapship:MEMBER`), released before diverged snapshots are set aside.
    members: Vec<String>,
}

impl ZfsReplica {
    pub fn new(dataset: String) -> Self {
        ZfsReplica { dataset, members: Vec::new() }
    }

    /// With the members of its file set (see [`ZfsReplica::members`]).
    pub fn with_members(mut self, members: Vec<String>) -> Self {
        self.members = members;
        self
    }

    /// Before an incremental receive from the base with guid `base`: every snapshot after the
    /// base (what this node wrote as origin after it, the live data kept at step-down, or a
    /// snapshot newer than the one a new origin was promoted from) would block the receive
    /// (zfs-fuse) or be destroyed by `receive -F` (OpenZFS). They are copied first, by name
    /// and guid, into the sibling dataset `DATASET-diverged-TIME` (read-only; `snapship
    /// diverged` lists it), checked there, and only then removed here (`zfs rollback -r` to
    /// the base). Returns the name the data is kept under, if any was set aside.
    ///
    /// The copy is local: a full stream of the first snapshot after the base, then one
    /// incremental to the newest (a clone of the base would be free, but zfs-fuse receives
    /// into no clone). A copy cut short is found and completed by the next attempt.
    async fn set_aside_after(&self, base: &str) -> Result<Option<String>> {
        let all = all_snapshots(&self.dataset).await?;
        let Some(at) = all.iter().position(|(_, guid)| guid == base) else {
            return Ok(None); // the receive refuses a base it does not hold
        };
        let after = &all[at + 1..];
        let (Some((first, _)), Some((newest, newest_guid))) = (after.first(), after.last()) else { return Ok(None) };
        let label = after.iter().rev().map(|(n, _)| n).find(|n| check_diverged_name(n).is_ok()).cloned().unwrap_or_else(diverged_name);
        let aside = diverged_dataset(&self.dataset, &label);
        let names: Vec<&str> = after.iter().map(|(n, _)| n.as_str()).collect();
        tracing::warn!(dataset = %self.dataset, kept = %aside, snapshots = ?names, "snapshots after the common base with the new origin: keeping them as diverged data before receiving");
        let held = || async { all_snapshots(&aside).await.unwrap_or_default() };
        let mut there = if dataset_exists(&aside).await? { held().await } else { Vec::new() };
        if !there.iter().any(|(_, g)| g == newest_guid) {
            let src = |n: &str| format!("{}@{n}", self.dataset);
            if there.is_empty() {
                if dataset_exists(&aside).await? {
                    bail!("{aside} exists but holds no snapshot of {}; move it away so that the diverged data can be kept there", self.dataset);
                }
                local_copy(Cmd::new("zfs").arg("send").arg(src(first)), Cmd::new("zfs").arg("receive").arg(&aside))
                    .await
                    .with_context(|| format!("cannot keep {}@{first} as diverged data in {aside}; nothing was removed from {}", self.dataset, self.dataset))?;
                there = held().await;
            }
            let (from, _) = there.last().cloned().ok_or_else(|| anyhow!("{aside} holds no snapshot after receiving {first}"))?;
            if &from != newest {
                local_copy(Cmd::new("zfs").arg("send").arg("-I").arg(src(&from)).arg(src(newest)), Cmd::new("zfs").arg("receive").arg("-F").arg(&aside))
                    .await
                    .with_context(|| format!("cannot keep the snapshots of {} after {from} as diverged data in {aside}; nothing was removed", self.dataset))?;
                there = held().await;
            }
        }
        for (name, guid) in after {
            if !there.iter().any(|(n, g)| n == name && g == guid) {
                bail!("{aside} lacks {name} (guid {guid}) after the copy; nothing was removed from {}", self.dataset);
            }
        }
        set_read_only(&aside, true).await?;
        // The copy is complete: this node's own holds may go, then the snapshots after the base.
        if features().await.holds {
            for (name, _) in after {
                for member in &self.members {
                    let _ = zfs(&["release", &format!("snapship:{member}"), &format!("{}@{name}", self.dataset)]).await;
                }
            }
        }
        let (base_name, _) = &all[at];
        zfs_retrying(&["rollback", "-r", &format!("{}@{base_name}", self.dataset)])
            .await
            .with_context(|| format!("cannot roll {} back to the common base {base_name} (the diverged data is kept in {aside}); a hold of another tool may keep a snapshot after it", self.dataset))?;
        Ok(Some(label))
    }

    /// Where `zfs receive -x` is missing (zfs-fuse): puts the [`RECEIVE_EXCLUDED`] properties
    /// that a stream set, on the dataset or a child it brought, back to what the replica
    /// inherits, right after the receive. Streams that carry properties are refused at their
    /// first record, so this is for one that hid them further in (see [`check_stream_header`]).
    async fn drop_received_properties(&self) -> Result<()> {
        let text = zfs(&["get", "-r", "-H", "-o", "name,property,source", &RECEIVE_EXCLUDED.join(","), &self.dataset]).await?;
        for (name, prop) in received_properties(&text) {
            tracing::warn!(dataset = %name, "the origin's stream set `{prop}`: putting it back to the replica's inherited value");
            zfs(&["inherit", &prop, &name])
                .await
                .with_context(|| format!("the origin's stream set `{prop}` on {name}, and it could not be undone; run `zfs inherit {prop} {name}`"))?;
        }
        Ok(())
    }

    /// Before a full stream into the dataset while it exists holding no snapshot (checked by
    /// the caller: every snapshot was destroyed, so nothing is in common with the origin and
    /// no snapshot keeps anything): destroys the empty file system, so that the stream is
    /// received as a new one rather than with `receive -F` over it. A full `receive -F` over
    /// an existing file system is a clone swap in zfs-fuse 0.7 that fails now and then
    /// with "cannot receive new filesystem stream: I/O error" (one try in three in a loop,
    /// mounted or not, however long after the last destroy); a receive into a new file
    /// system does not. `-F` would have replaced its contents all the same. `zfs destroy`
    /// without `-r` leaves a dataset with children alone (and fails the receive).
    /// Gone already is fine (modern ZFS: `receive -A` dropped a new file system's partial
    /// receive).
    async fn clear_for_full(&self) -> Result<()> {
        match zfs_retrying(&["destroy", &self.dataset]).await {
            Err(e) if !e.stderr().contains("does not exist") => Err(anyhow::Error::from(e).context(format!(
                "{} holds no snapshot and must be replaced by a full receive, but cannot be destroyed; \
                 destroy it (zfs destroy {}) or give the replica another dataset",
                self.dataset, self.dataset
            ))),
            _ => Ok(()),
        }
    }

    /// Undoes a receive that committed but is refused: back to the base (`zfs rollback -r`,
    /// which destroys every snapshot after it: all the stream brought, as the receive started
    /// on the newest snapshot), or, without one, every snapshot that was not there `before`
    /// destroyed, newest first.
    async fn undo_receive(&self, before: &[(String, String)], incoming: &Incoming) -> Result<()> {
        let base = incoming.base.as_deref().and_then(|g| before.iter().find(|(_, guid)| guid == g));
        let cmds = match base {
            Some((name, _)) if !incoming.from_token => vec![Cmd::new("zfs").arg("rollback").arg("-r").arg(format!("{}@{name}", self.dataset))],
            _ => {
                let after = all_snapshots(&self.dataset).await?;
                let new = after.iter().rev().filter(|a| !before.contains(a));
                new.map(|(name, _)| Cmd::new("zfs").arg("destroy").arg(format!("{}@{name}", self.dataset))).collect()
            }
        };
        for cmd in cmds {
            with_busy_retry(&cmd).await.with_context(|| format!("cannot undo the refused receive into {} (`{cmd}`); run it by hand", self.dataset))?;
        }
        Ok(())
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

    async fn prepare(&self, incoming: &Incoming) -> Result<()> {
        if let Some(base) = incoming.base.as_deref().filter(|_| !incoming.from_token && !incoming.fetched) {
            if dataset_exists(&self.dataset).await? {
                self.set_aside_after(base).await?;
            }
        }
        Ok(())
    }

    /// The dataset's `available` (its parent's before the first receive made it).
    async fn free_space(&self) -> Option<u64> {
        let mut dataset = self.dataset.as_str();
        loop {
            if let Ok(out) = zfs(&["get", "-Hp", "-o", "value", "available", dataset]).await {
                return out.trim().parse().ok();
            }
            dataset = dataset.rsplit_once('/')?.0;
        }
    }

    async fn resume_token(&self) -> Option<String> {
        if !features().await.resumable {
            return None;
        }
        zfs(&["get", "-H", "-o", "value", "receive_resume_token", &self.dataset]).await.ok().as_deref().and_then(parse_resume_token)
    }

    /// The stream's first record is checked ([`check_stream_header`]) before anything on the
    /// replica changes; `zfs receive` then gets it and the rest ([`receive_command`]).
    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot> {
        let f = features().await;
        let exists = dataset_exists(&self.dataset).await?;
        if exists && incoming.base.is_none() && !incoming.from_token && !self.list().await?.is_empty() {
            bail!(
                "{} holds snapshots but none in common with the origin; a full receive would destroy them. \
                 Destroy them (zfs destroy -r {}) or give the replica another dataset",
                self.dataset,
                self.dataset
            );
        }
        if incoming.fetched && !incoming.from_token {
            let held = if exists { Some(all_snapshots(&self.dataset).await?) } else { None };
            check_fetch_fits(&self.dataset, held.as_deref(), incoming)?;
        }
        let first = read_first_record(stream).await?;
        let header = check_stream_header(&first).with_context(|| format!("the stream for {}@{}", self.dataset, incoming.name))?;
        if header == StreamHeader::Package && (incoming.base.is_none() || incoming.from_token) {
            bail!(
                "refused the stream for {}@{}: a package of several snapshots (zfs send -I) where a {} was announced; \
                 snapship's origin never sends that",
                self.dataset,
                incoming.name,
                if incoming.from_token { "resumed stream" } else { "full stream" }
            );
        }
        if exists
            && !incoming.from_token
            && !incoming.fetched
            && let Some(base) = &incoming.base
        {
            // Done by `prepare` already, outside the stall watch; this finds nothing then.
            self.set_aside_after(base).await?;
        }
        if !incoming.from_token {
            // A new stream cannot start while an old partial receive is kept.
            self.discard_partial().await;
        }
        let exists = if exists && incoming.base.is_none() && !incoming.from_token {
            // It holds no snapshot (refused above otherwise): received as a new file system.
            self.clear_for_full().await?;
            false
        } else {
            exists
        };
        if !exists
            && let Some((parent, _)) = self.dataset.rsplit_once('/')
            && !dataset_exists(parent).await?
        {
            zfs(&["create", "-p", parent]).await.with_context(|| format!("cannot create the parent dataset {parent}"))?;
        }
        // What it holds now (after any set-aside): the receive may add only what
        // `check_received` allows.
        let before = if exists { all_snapshots(&self.dataset).await? } else { Vec::new() };
        // A fetched stream is received without `-F`: were the dataset changed since its newest
        // snapshot, `-F` would roll that back; zfs refuses instead.
        let mut process = receive_command(f, &self.dataset, exists && !incoming.fetched).spawn(Pipe::In)?;
        let mut stdin = process.stdin();
        let mut whole = first.as_slice().chain(stream);
        let copied =
            tokio::io::copy_buf(&mut tokio::io::BufReader::with_capacity(super::PIPE_BUFFER, &mut whole), &mut stdin).await.map_err(anyhow::Error::from);
        let copied = match copied {
            Ok(_) => stdin.shutdown().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        drop(stdin);
        let received = process.wait().await;
        // Without `-x`, undo what a stream may have set, whether the receive succeeded or
        // not (a failed one can leave a file system behind). A failure to undo fails a
        // receive that succeeded, and is logged beside one that failed.
        let undone = match !f.receive_props && dataset_exists(&self.dataset).await.unwrap_or(true) {
            true => self.drop_received_properties().await,
            false => Ok(()),
        };
        if let Err(e) = &undone
            && (copied.is_err() || received.is_err())
        {
            tracing::error!("{e:#}");
        }
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
                    // the snapshot (and any of a package before it) must not stay.
                    if let Err(de) = self.undo_receive(&before, incoming).await {
                        tracing::error!("{de:#}");
                    }
                    e.context("the stream failed its check after zfs receive committed it; what it brought was destroyed")
                }
            });
        }
        if let Err(e) = received {
            if !incoming.from_token {
                self.discard_partial().await;
            }
            if incoming.fetched && e.stderr().contains("modified") {
                let what = format!(
                    "{} changed since its newest snapshot, and receiving the fetched {} on it would roll that back (zfs receive -F), \
                     which a fetch never does: take a snapshot of it first, or restore on the member that holds {}",
                    self.dataset, incoming.name, incoming.name
                );
                return Err(anyhow::Error::from(e).context(what));
            }
            return Err(e.into());
        }
        let after = all_snapshots(&self.dataset).await?;
        match check_received(&before, &after, incoming, header) {
            Ok(intermediates) if !intermediates.is_empty() => {
                tracing::info!(dataset = %self.dataset, snapshot = %incoming.name, ?intermediates, "received the snapshots in between too (zfs send -I)");
            }
            Ok(_) => {}
            Err(e) => {
                if let Err(ue) = self.undo_receive(&before, incoming).await {
                    tracing::error!("{ue:#}");
                }
                return Err(e.context(format!("receiving {}@{}", self.dataset, incoming.name)));
            }
        }
        let got = self
            .list()
            .await?
            .into_iter()
            .find(|s| s.name == incoming.name)
            .ok_or_else(|| anyhow!("zfs receive succeeded but {}@{} is not there", self.dataset, incoming.name))?;
        if got.identity != incoming.identity {
            // Not what was announced: it must not stay (nor what came with it).
            if let Err(ue) = self.undo_receive(&before, incoming).await {
                tracing::error!("{ue:#}");
            }
            bail!("received {}@{} has guid {}, expected {}; the receive was undone", self.dataset, incoming.name, got.identity, incoming.identity);
        }
        undone?;
        // Keep the replica read-only (again: `-o` is not on every ZFS), and reads from
        // changing it (atime).
        for prop in RECEIVE_FORCED.into_iter().chain(["atime=off"]) {
            zfs(&["set", prop, &self.dataset]).await?;
        }
        Ok(got)
    }

    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        zfs_retrying(&["destroy", &format!("{}@{}", self.dataset, snapshot.name)]).await?;
        Ok(())
    }

    /// The diverged data kept beside the replica dataset (`DATASET-diverged-TIME`) and in it
    /// (`DATASET@diverged-TIME`, kept at step-down until the first receive sets it aside).
    async fn diverged(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if let Some((parent, _)) = self.dataset.rsplit_once('/') {
            let prefix = format!("{}-", self.dataset);
            match zfs(&["list", "-H", "-o", "name", "-d", "1", "-t", "filesystem", parent]).await {
                Ok(text) => out.extend(text.lines().filter_map(|l| l.strip_prefix(&prefix)).filter(|n| check_diverged_name(n).is_ok()).map(String::from)),
                Err(e) if e.stderr().contains("does not exist") => {}
                Err(e) => return Err(e.into()),
            }
        }
        if dataset_exists(&self.dataset).await? {
            for (name, _) in all_snapshots(&self.dataset).await? {
                if check_diverged_name(&name).is_ok() && !out.contains(&name) {
                    out.push(name);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// What [`swap_in_place`] did: the dataset kept with the live state from before, and what
/// went wrong after the swap (which lost nothing).
#[derive(Debug)]
pub struct SwappedIn {
    pub kept: String,
    pub warning: Option<String>,
}

/// `restore --in-place` on ZFS: `dataset` (the live file set, no daemon using it) takes the
/// content and history of its snapshot `snapshot`, and everything it held is kept in the
/// dataset `DATASET.before-restore-TIME`, read-only. Nothing is destroyed or rolled back:
/// 1. the live state is snapshotted as `@before-restore-TIME`;
/// 2. a clone of `snapshot` is made beside it and promoted (`zfs promote` moves the
///    snapshots up to `snapshot` into the clone, guids and all; the later ones and the
///    live-state snapshot stay with the old dataset, a clone of it now);
/// 3. both are unmounted (zfs-fuse renames a file system only unmounted), the old dataset is
///    renamed to the kept name and the clone to the live name, and both are mounted again.
///
/// A failure before the second rename undoes what was done (the promote reversed, the clone
/// and the snapshot it came with destroyed: both were made here and hold nothing else) and
/// says "nothing changed"; after it the restore is done.
pub async fn swap_in_place(dataset: &str, snapshot: &SnapshotName) -> Result<SwappedIn> {
    let unchanged = |what: String| anyhow!("{what}; nothing changed: {dataset} is as it was");
    let source = zfs(&["get", "-H", "-o", "source", "mountpoint", dataset]).await.map_err(|e| unchanged(format!("cannot read {dataset}: {e}")))?;
    if source.trim() == "local" {
        bail!(unchanged(format!(
            "{dataset} has a mountpoint of its own, which the restored dataset would not get; restore a clone beside (--to) and switch by hand (docs/restore.md)"
        )));
    }
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let (live_state, restoring, kept) =
        (format!("{dataset}@before-restore-{stamp}"), format!("{dataset}.snapship-restoring-{stamp}"), format!("{dataset}.before-restore-{stamp}"));
    for taken in [&restoring, &kept] {
        if dataset_exists(taken).await? {
            bail!(unchanged(format!("{taken} exists already")));
        }
    }
    zfs(&["snapshot", &live_state]).await.map_err(|e| unchanged(format!("cannot snapshot the live state as {live_state}: {e}")))?;
    // Undoes steps 1 and 2 (as far as they went): the promote reversed, then the clone and the
    // live-state snapshot destroyed, which were made here and hold nothing else.
    let undo = |promoted: bool| {
        let (live_state, restoring) = (live_state.clone(), restoring.clone());
        async move {
            let mut left = Vec::new();
            if promoted && let Err(e) = zfs_retrying(&["promote", dataset]).await {
                left.push(format!("`zfs promote {dataset}` ({e})"));
            }
            if left.is_empty() && dataset_exists(&restoring).await.unwrap_or(true) {
                if let Err(e) = zfs_retrying(&["destroy", &restoring]).await {
                    left.push(format!("`zfs destroy {restoring}` ({e})"));
                }
            }
            if left.is_empty()
                && let Err(e) = zfs_retrying(&["destroy", &live_state]).await
            {
                left.push(format!("`zfs destroy {live_state}` ({e})"));
            }
            if left.is_empty() { String::new() } else { format!(" (to tidy up by hand: {})", left.join(", ")) }
        }
    };
    let source = format!("{dataset}@{snapshot}");
    if let Err(e) = zfs(&["clone", &source, &restoring]).await {
        let left = undo(false).await;
        bail!(unchanged(format!("cannot clone {source} as {restoring}: {e}{left}")));
    }
    if let Err(e) = zfs_retrying(&["promote", &restoring]).await {
        let left = undo(false).await;
        bail!(unchanged(format!("cannot promote {restoring}: {e}{left}")));
    }
    let remount = |name: String| async move {
        let _ = zfs(&["mount", &name]).await;
    };
    for (name, what) in [(&restoring, "the restored clone"), (&dataset.to_string(), "the live dataset")] {
        if let Err(e) = zfs_retrying(&["umount", name]).await {
            remount(restoring.clone()).await;
            remount(dataset.to_string()).await;
            let left = undo(true).await;
            bail!(unchanged(format!("cannot unmount {what} {name} (a process using it? stop it first): {e}{left}")));
        }
    }
    if let Err(e) = zfs_retrying(&["rename", dataset, &kept]).await {
        remount(dataset.to_string()).await;
        let left = undo(true).await;
        bail!(unchanged(format!("cannot rename {dataset} to {kept}: {e}{left}")));
    }
    if let Err(e) = zfs_retrying(&["rename", &restoring, dataset]).await {
        // Put the live dataset back under its name, then undo.
        return match zfs_retrying(&["rename", &kept, dataset]).await {
            Ok(_) => {
                remount(dataset.to_string()).await;
                let left = undo(true).await;
                Err(unchanged(format!("cannot rename {restoring} to {dataset}: {e}{left}")))
            }
            Err(back) => Err(anyhow!(
                "cannot rename {restoring} to {dataset} ({e}), nor {kept} back ({back}): {dataset} is missing. Nothing is lost: \
                 the live state is {kept} (with every snapshot after {snapshot}), the restored one {restoring}; \
                 `zfs rename {restoring} {dataset}` finishes the restore, `zfs rename {kept} {dataset}` and `zfs promote {dataset}` undo it"
            )),
        };
    }
    let mut warnings = Vec::new();
    if let Err(e) = zfs(&["mount", dataset]).await {
        warnings.push(format!("{dataset} could not be mounted ({e}): `zfs mount {dataset}`"));
    }
    if let Err(e) = set_read_only(&kept, true).await {
        warnings.push(format!("{e:#}; it is kept writable"));
    }
    if let Err(e) = zfs(&["mount", &kept]).await {
        warnings.push(format!("{kept} could not be mounted ({e}): `zfs mount {kept}`"));
    }
    Ok(SwappedIn { kept, warning: (!warnings.is_empty()).then(|| warnings.join("; ")) })
}

/// A temporary read-only clone of a snapshot, mounted in a directory of its own, for reading
/// the snapshot's files (zfs-fuse shows no `.zfs/snapshot`). [`TempClone::remove`] destroys
/// it; dropped without that (a failure, a panic), it is destroyed all the same.
pub struct TempClone {
    clone: Option<String>,
    dir: std::path::PathBuf,
}

impl TempClone {
    /// Clones `dataset@snapshot` as `DATASET-verify-PID-N`, mounted at a fresh directory
    /// under `scratch`.
    pub async fn new(dataset: &str, snapshot: &SnapshotName, scratch: &std::path::Path) -> Result<TempClone> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("verify-{}-{n}", std::process::id());
        let clone = format!("{dataset}-{tag}");
        let dir = scratch.join(&tag);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let made = Cmd::new("zfs")
            .arg("clone")
            .arg("-o")
            .arg("readonly=on")
            .arg("-o")
            .arg(format!("mountpoint={}", dir.display()))
            .arg(format!("{dataset}@{snapshot}"))
            .arg(&clone)
            .output()
            .await;
        // From here on the guard cleans up, whatever happens.
        let guard = TempClone { clone: Some(clone.clone()), dir };
        made.with_context(|| format!("cannot clone {dataset}@{snapshot} to read it"))?;
        Ok(guard)
    }

    /// Where the snapshot's files are.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Destroys the clone and its directory.
    pub async fn remove(mut self) -> Result<()> {
        if let Some(clone) = self.clone.take() {
            if dataset_exists(&clone).await? {
                zfs_retrying(&["destroy", &clone]).await.with_context(|| format!("cannot destroy the temporary clone {clone}"))?;
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

impl Drop for TempClone {
    fn drop(&mut self) {
        let Some(clone) = self.clone.take() else { return };
        // Blocking, on a failure path only: retried while ZFS says it is busy.
        for _ in 0..20 {
            match std::process::Command::new("zfs").args(["destroy", &clone]).env("LC_ALL", "C").output() {
                Ok(o) if o.status.success() || String::from_utf8_lossy(&o.stderr).contains("does not exist") => break,
                Ok(o) => tracing::debug!("destroying {clone}: {}", String::from_utf8_lossy(&o.stderr).trim()),
                Err(e) => {
                    tracing::error!("cannot run zfs to destroy the temporary clone {clone}: {e}");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = include_str!("../../tests/data/zfs/zfs-fuse-0.7.0-usage.txt");
    const MODERN: &str = include_str!("../../tests/data/zfs/openzfs-2.1.11-usage.txt");

    #[test]
    fn diverged_names_are_ours_only() {
        let name = "diverged-20261201T123456.789Z";
        check_diverged_name(name).unwrap();
        assert_eq!(diverged_dataset("tank/backup/projects", name), "tank/backup/projects-diverged-20261201T123456.789Z");
        check_diverged_name(&diverged_name()).unwrap();
        for bad in
            ["diverged-", "snapship-20261201T123456.789Z", "diverged-x/y", "diverged-x@y", "diverged-x y", "diverged--r", "../diverged-x", "diverged-x;id"]
        {
            assert!(check_diverged_name(bad).is_err(), "{bad:?} passed");
        }
    }

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
                receive_no_mount: false,
                receive_props: false
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
                receive_no_mount: true,
                receive_props: true
            }
        );
    }

    #[test]
    fn commands_follow_the_features() {
        let (old, modern) = (Features::from_usage(OLD), Features::from_usage(MODERN));
        let args = |c: Cmd| c.args().join(" ");
        assert_eq!(args(send_command(&old, "tank/p", "s2", Some("s1"), true, true)), "send -I tank/p@s1 tank/p@s2");
        assert_eq!(args(send_command(&modern, "tank/p", "s2", Some("s1"), true, true)), "send -c -I tank/p@s1 tank/p@s2");
        assert_eq!(args(send_command(&modern, "tank/p", "s2", Some("s1"), false, false)), "send -i tank/p@s1 tank/p@s2");
        assert_eq!(args(send_command(&modern, "tank/p", "s2", None, false, false)), "send tank/p@s2");
        // zfs-fuse takes none of -u, -o, -x (see receive_command for what stands in).
        assert_eq!(args(receive_command(&old, "b/p", true)), "receive -F b/p");
        let guarded = "-u -o readonly=on -x mountpoint -x sharenfs -x sharesmb";
        assert_eq!(args(receive_command(&modern, "b/p", false)), format!("receive -s {guarded} b/p"));
        assert_eq!(args(receive_command(&modern, "b/p", true)), format!("receive -F -s {guarded} b/p"));
        // ZoL 0.6.5: -u, but no -o or -x.
        let zol065 =
            Features::from_usage("usage: zfs command args ...\n\treceive [-vnFu] <filesystem|volume|snapshot>\n\treceive [-vnFu] [-d | -e] <filesystem>\n");
        assert_eq!((zol065.receive_no_mount, zol065.receive_props), (true, false));
        assert_eq!(args(receive_command(&zol065, "b/p", true)), "receive -F -u b/p");
        assert!(resume_send_command(&old, "tok").is_none());
        assert_eq!(args(resume_send_command(&modern, "1-abc").unwrap()), "send -t 1-abc");
        let (one, members) = group_snapshot_commands(&modern, &["tank/a", "tank/b"], "s").unwrap();
        assert_eq!((args(one), members.len()), ("snapshot tank/a@s tank/b@s".to_string(), 0));
        let (one, members) = group_snapshot_commands(&old, &["tank/x/a", "tank/x/b"], "s").unwrap();
        assert_eq!((args(one), members.len()), ("snapshot -r tank/x@s".to_string(), 2));
        assert!(group_snapshot_commands(&old, &["tank/a", "pool2/b"], "s").is_none());
    }

    // `zfs send -nvt TOKEN` outputs, written by hand from OpenZFS's printing code (no ZFS
    // here has `send -t`): libzfs_sendrecv.c prints "resume token contents:" and
    // libnvpair.c's nvlist_print the pairs, in the order dsl_dataset.c puts them in the token.
    // OpenZFS 2.1, incremental, on stdout (the estimate is printed only with -P or progress):
    const DUMP_INCREMENTAL: &str = "resume token contents:\nnvlist version: 0\n\
        \tfromguid = 0xa3d526371afa28ba\n\tobject = 0x4\n\toffset = 0x160000\n\tbytes = 0x2d3e10\n\
        \ttoguid = 0x2604a9cea437f645\n\ttoname = tank/projects@snapship-20261123T101500.000Z\n\
        \tembedok = 1\n\tcompressok = 1\n";
    // OpenZFS 0.7, full, on stderr, followed by the size estimate.
    const DUMP_FULL: &str = "resume token contents:\nnvlist version: 0\n\
        \tobject = 0x1\n\toffset = 0x20000\n\tbytes = 0x31a18\n\ttoguid = 0xa3d526371afa28ba\n\
        \ttoname = tank/projects@snapship-20261123T100000.000Z\n\tembedok = 1\n\
        full send of tank/projects@snapship-20261123T100000.000Z estimated size is 3.98M\n";

    /// The two snapship snapshots of the recorded `zfs get guid` (decimal guids).
    fn recorded_snapshots() -> (Snapshot, Snapshot) {
        let props = parse_properties(include_str!("../../tests/data/zfs/openzfs-2.1.11-get-guid.txt"));
        let mut snaps = snapshots_in("tank/projects", &props).into_iter();
        (snaps.next().unwrap(), snaps.next().unwrap())
    }

    #[test]
    fn a_token_is_decoded_from_the_dump() {
        let t = parse_resume_token_dump(DUMP_INCREMENTAL).unwrap();
        assert_eq!(t.toname, "tank/projects@snapship-20261123T101500.000Z");
        assert_eq!((t.toguid, t.fromguid), (2739501178331592261, Some(11805384016339282106)));
        let t = parse_resume_token_dump(DUMP_FULL).unwrap();
        assert_eq!((t.toguid, t.fromguid), (11805384016339282106, None));
        // An explicit zero is no base, as libzfs reads it.
        let zero = DUMP_FULL.replace("\tobject", "\tfromguid = 0x0\n\tobject");
        assert_eq!(parse_resume_token_dump(&zero).unwrap().fromguid, None);
    }

    #[test]
    fn a_token_for_the_planned_stream_is_accepted() {
        let (first, second) = recorded_snapshots();
        check_resume_token(&parse_resume_token_dump(DUMP_INCREMENTAL).unwrap(), "tank/projects", &second, Some(&first)).unwrap();
        check_resume_token(&parse_resume_token_dump(DUMP_FULL).unwrap(), "tank/projects", &first, None).unwrap();
    }

    #[test]
    fn a_hostile_token_is_refused() {
        let (first, second) = recorded_snapshots();
        let check = |dump: &str, dataset: &str, snapshot: &Snapshot, base: Option<&Snapshot>| {
            let err = parse_resume_token_dump(dump).and_then(|t| check_resume_token(&t, dataset, snapshot, base)).unwrap_err();
            format!("{err:#}")
        };
        let refused = |e: &str| e.contains("the replica offered a resume token for") && e.contains("the origin starts over");
        // Another dataset on the origin, same snapshot name and guid.
        let other = DUMP_INCREMENTAL.replace("toname = tank/projects@", "toname = tank/secrets@");
        let e = check(&other, "tank/projects", &second, Some(&first));
        assert!(refused(&e) && e.contains("tank/secrets@"), "{e}");
        // A child of the dataset is another dataset too.
        let child = DUMP_INCREMENTAL.replace("toname = tank/projects@", "toname = tank/projects/private@");
        assert!(refused(&check(&child, "tank/projects", &second, Some(&first))));
        // Another snapshot name, or the right name with another guid.
        assert!(refused(&check(DUMP_INCREMENTAL, "tank/projects", &first, None)));
        let guid = DUMP_INCREMENTAL.replace("toguid = 0x2604a9cea437f645", "toguid = 0x2604a9cea437f646");
        let e = check(&guid, "tank/projects", &second, Some(&first));
        assert!(refused(&e) && e.contains("another snapshot (guid 0x2604a9cea437f646"), "{e}");
        // The wrong base, a base where a full stream was started, no base where one was.
        let (_, mut foreign) = recorded_snapshots();
        foreign.identity = "9034129472271137740".into();
        let e = check(DUMP_INCREMENTAL, "tank/projects", &second, Some(&foreign));
        assert!(refused(&e) && e.contains("another base"), "{e}");
        assert!(refused(&check(DUMP_INCREMENTAL, "tank/projects", &second, None)));
        let full_of_second = DUMP_FULL.replace("0xa3d526371afa28ba", "0x2604a9cea437f645").replace("T100000", "T101500");
        assert!(refused(&check(&full_of_second, "tank/projects", &second, Some(&first))));
        // A string value forging a line: the real pair is printed too, and a pair seen twice
        // refuses the token.
        let forged = DUMP_INCREMENTAL
            .replace("\tembedok = 1\n", "\tnote = x\n\ttoname = tank/projects@snapship-20261123T101500.000Z\n")
            .replace("toname = tank/projects@snapship-20261123T101500.000Z\n\tnote", "toname = tank/secrets@snapship-20261123T101500.000Z\n\tnote");
        assert!(check(&forged, "tank/projects", &second, Some(&first)).contains("holds `toname` twice"));
        // Forged pairs ending in a line of their own, the real ones after it: all are read.
        let cut = DUMP_INCREMENTAL
            .replace("\tfromguid", "\tnote = x\n\ttoname = tank/projects@snapship-20261123T101500.000Z\n\ttoguid = 0x2604a9cea437f645\nend\n\tfromguid");
        let cut = cut.replacen("\ttoname = tank/projects@snapship-20261123T101500.000Z\n\tembedok", "\ttoname = tank/secrets@x\n\tembedok", 1);
        assert!(check(&cut, "tank/projects", &second, Some(&first)).contains("twice"));
        // Incomplete or garbled dumps.
        assert!(check("cannot resume send: resume token is corrupt\n", "tank/projects", &first, None).contains("no resume token contents"));
        assert!(check(&DUMP_FULL.replace("\ttoguid = 0xa3d526371afa28ba\n", ""), "tank/projects", &first, None).contains("no `toguid`"));
        assert!(check(&DUMP_FULL.replace("0xa3d526371afa28ba", "11805384016339282106"), "tank/projects", &first, None).contains("not a hex number"));
    }

    #[test]
    fn a_token_with_foreign_characters_never_reaches_a_command_line() {
        let token = parse_resume_token(include_str!("../../tests/data/zfs/openzfs-2.1.11-get-resume-token.txt")).unwrap();
        check_token_text(&token).unwrap();
        for hostile in ["1-abc; rm -rf /", "1-$(reboot)", "1-`id`", "1-abc\n2-def", "1-a b", "-v", "", "1-abc|sh", "1-ab\u{e9}"] {
            let err = check_token_text(hostile).unwrap_err().to_string();
            assert!(err.contains("characters no ZFS token has"), "{hostile:?}: {err}");
        }
    }

    #[tokio::test]
    async fn the_origin_refuses_a_hostile_token_before_running_zfs() {
        // Checked first thing: this runs no zfs (there is none in unit tests to run).
        let (first, second) = recorded_snapshots();
        let origin = ZfsOrigin::new("tank/projects".into());
        let err = origin.send_resumed("1-abc$(touch /tmp/pwned)", &second, Some(&first)).await.err().expect("refused");
        assert!(err.to_string().contains("characters no ZFS token has"), "{err}");
    }

    /// A stream's first record, built by hand from include/sys/zfs_ioctl.h: `drr_type`,
    /// `drr_payloadlen`, then the DRR_BEGIN body (magic, versioninfo, creation time, type,
    /// flags, toguid, fromguid, toname), in little or big endian.
    fn begin_record(payload: u32, versioninfo: u64, big: bool) -> Vec<u8> {
        let u32b = |v: u32| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        let u64b = |v: u64| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut r = Vec::new();
        r.extend(u32b(0)); // DRR_BEGIN
        r.extend(u32b(payload));
        r.extend(u64b(0x2_F5BA_CBAC));
        r.extend(u64b(versioninfo));
        r.extend(u64b(1_764_000_000)); // creation time
        r.extend(u32b(2)); // DMU_OST_ZFS
        r.extend(u32b(0)); // drr_flags
        r.extend(u64b(0x2604_a9ce_a437_f645)); // toguid
        r.extend(u64b(0)); // fromguid
        let mut name = b"tank/projects@snapship-20261123T101500.000Z".to_vec();
        name.resize(256, 0);
        r.extend(name);
        assert_eq!(r.len(), STREAM_RECORD);
        r
    }

    #[test]
    fn stream_headers_of_our_own_sends_pass() {
        // Feature flags sit above the two header type bits: SA_SPILL | EMBED_DATA | LZ4.
        let features = ((1 << 2) | (1 << 16) | (1 << 17)) << 2;
        // zfs send [-i]: one substream; zfs send -I: a compound header without a payload.
        assert_eq!(check_stream_header(&begin_record(0, features | 1, false)).unwrap(), StreamHeader::Single);
        assert_eq!(check_stream_header(&begin_record(0, 2, false)).unwrap(), StreamHeader::Package);
        // From a big-endian origin.
        assert_eq!(check_stream_header(&begin_record(0, features | 1, true)).unwrap(), StreamHeader::Single);
        assert_eq!(check_stream_header(&begin_record(0, 2, true)).unwrap(), StreamHeader::Package);
        // zfs send -t: a substream with the RESUMING feature.
        assert_eq!(check_stream_header(&begin_record(0, ((1 << 20) << 2) | 1, false)).unwrap(), StreamHeader::Single);
    }

    #[test]
    fn replication_streams_are_refused() {
        let refused = |r: &[u8]| {
            let e = check_stream_header(r).unwrap_err().to_string();
            assert!(e.contains("refused a ZFS replication stream"), "{e}");
        };
        // zfs send -R or -p: a compound header whose payload is the file systems' nvlist.
        refused(&begin_record(628, 2, false));
        refused(&begin_record(628, 2, true));
        // --holds: the HOLDS feature on the compound header.
        refused(&begin_record(0, ((1 << 26) << 2) | 2, false));
        // Anything else is not a stream this replica takes.
        let mut not_begin = begin_record(0, 1, false);
        not_begin[0] = 5; // DRR_END
        assert!(check_stream_header(&not_begin).unwrap_err().to_string().contains("does not begin with a DRR_BEGIN record (type 5)"));
        let mut bad_magic = begin_record(0, 1, false);
        bad_magic[8] ^= 1;
        assert!(check_stream_header(&bad_magic).unwrap_err().to_string().contains("bad magic"));
        assert!(check_stream_header(&begin_record(0, 3, false)).unwrap_err().to_string().contains("header type 3 is unknown"));
        assert!(check_stream_header(&begin_record(0, 1, false)[..100]).unwrap_err().to_string().contains("ended after 100 bytes"));
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, g)| (n.to_string(), g.to_string())).collect()
    }

    const S0: &str = "snapship-20260101T000000.000Z";
    const S1: &str = "snapship-20260101T010000.000Z";
    const S2: &str = "snapship-20260101T020000.000Z";
    const S3: &str = "snapship-20260101T030000.000Z";

    #[test]
    fn intermediates_are_sent_when_all_are_snapships() {
        let all = pairs(&[(S0, "10"), (S1, "11"), (S2, "12"), (S3, "13")]);
        assert_eq!(between(&all, S0, S3).unwrap(), &all[1..3]);
        assert!(sends_intermediates(&all, S0, S3));
        assert!(between(&all, S3, S0).is_none() && between(&all, "gone", S3).is_none());
        // Someone else's snapshot in between: the two ends only.
        let foreign = pairs(&[(S0, "10"), (S1, "11"), ("before-upgrade", "99"), (S3, "13")]);
        assert!(!sends_intermediates(&foreign, S0, S3));
        assert!(sends_intermediates(&foreign, S0, S1), "it is not between these two");
    }

    fn incoming(name: &str, guid: &str, base: Option<&str>) -> Incoming {
        Incoming { name: SnapshotName::parse(name).unwrap(), identity: guid.into(), base: base.map(Into::into), from_token: false, fetched: false }
    }

    #[test]
    fn a_fetched_stream_is_received_only_where_it_fits() {
        let fetched = |name: &str, guid: &str, base: Option<&str>| Incoming { fetched: true, ..incoming(name, guid, base) };
        let held = pairs(&[(S0, "10"), (S1, "11")]);
        // On the newest snapshot, or a full stream where the dataset is gone: received.
        check_fetch_fits("p/r", Some(&held), &fetched(S3, "13", Some("11"))).unwrap();
        check_fetch_fits("p/r", None, &fetched(S3, "13", None)).unwrap();
        // A hostile member's base older than the newest: refused, naming what is in the way.
        let e = check_fetch_fits("p/r", Some(&held), &fetched(S3, "13", Some("10"))).unwrap_err().to_string();
        assert!(e.contains(S1) && e.contains("nothing older than its newest") && e.contains("never rolls back"), "{e}");
        // A full stream over an existing dataset (which it would replace), even an empty one.
        for held in [&held[..], &[]] {
            let e = check_fetch_fits("p/r", Some(held), &fetched(S3, "13", None)).unwrap_err().to_string();
            assert!(e.contains("full stream") && e.contains("zfs rename p/r"), "{e}");
        }
        // A base this node does not hold, or no dataset to be incremental on.
        assert!(check_fetch_fits("p/r", Some(&held), &fetched(S3, "13", Some("99"))).unwrap_err().to_string().contains("guid 99"));
        assert!(check_fetch_fits("p/r", None, &fetched(S3, "13", Some("11"))).unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn a_package_may_bring_only_snapships_between_its_ends() {
        let before = pairs(&[(S0, "10")]);
        let to_s3 = incoming(S3, "13", Some("10"));
        // zfs send -I s0 s3: s1 and s2 come too, in order.
        let after = pairs(&[(S0, "10"), (S1, "11"), (S2, "12"), (S3, "13")]);
        assert_eq!(check_received(&before, &after, &to_s3, StreamHeader::Package).unwrap(), [S1, S2]);
        assert!(check_received(&before, &pairs(&[(S0, "10"), (S3, "13")]), &to_s3, StreamHeader::Single).unwrap().is_empty());
        let refused = |after: &[(&str, &str)], inc: &Incoming, header: StreamHeader, why: &str| {
            let e = format!("{:#}", check_received(&before, &pairs(after), inc, header).unwrap_err());
            assert!(e.contains("refused the stream") && e.contains(why), "{e}");
        };
        // A hostile origin's extras: a name that is not snapship's, one newer than announced,
        // one not after the base, names against creation order, extras outside a package.
        refused(&[(S0, "10"), ("evil", "66"), (S3, "13")], &to_s3, StreamHeader::Package, "`evil` is not a snapship snapshot name");
        let later = "snapship-20991231T000000.000Z";
        refused(&[(S0, "10"), (S3, "13"), (later, "67")], &to_s3, StreamHeader::Package, "is not between the base");
        refused(&[(S0, "10"), ("snapship-20251231T000000.000Z", "68"), (S3, "13")], &to_s3, StreamHeader::Package, "is not between the base");
        refused(&[(S0, "10"), (S2, "12"), (S1, "11"), (S3, "13")], &to_s3, StreamHeader::Package, "out of creation order");
        refused(&[(S0, "10"), (S1, "11"), (S3, "13")], &to_s3, StreamHeader::Single, "only a `zfs send -I` package");
        // A package from no base, from a base it does not hold, or resumed from a token.
        refused(&[(S0, "10"), (S1, "11"), (S3, "13")], &incoming(S3, "13", None), StreamHeader::Package, "must go from a snapship snapshot");
        refused(&[(S0, "10"), (S1, "11"), (S3, "13")], &incoming(S3, "13", Some("77")), StreamHeader::Package, "must go from a snapship snapshot");
        let mut token = to_s3.clone();
        token.from_token = true;
        refused(&[(S0, "10"), (S1, "11"), (S3, "13")], &token, StreamHeader::Package, "only a `zfs send -I` package");
    }

    #[test]
    fn received_properties_are_found() {
        // zfs-fuse, after receiving a `zfs send -p` stream of a dataset with a local
        // mountpoint and sharesmb (seen live: `zfs get -r -H -o name,property,source`).
        let text = "r/b\tmountpoint\treceived\nr/b\tsharenfs\tdefault\nr/b\tsharesmb\treceived\nr/b@s\tsharesmb\treceived\n";
        let pair = |n: &str, p: &str| (n.to_string(), p.to_string());
        assert_eq!(received_properties(text), [pair("r/b", "mountpoint"), pair("r/b", "sharesmb")]);
        assert!(received_properties("r/b\tmountpoint\tinherited from r\nr/b\tsharenfs\tdefault\n").is_empty());
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
