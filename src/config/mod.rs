//! The files an admin writes: the node config and the per-file-set policies.
//!
//! Loading happens in two passes. serde reads each file into the types below, whose value
//! types (durations, rates, cron, names) check themselves, so a bad value is reported with
//! its key and position. Then [`validate_policy`] checks what spans several keys or files
//! (modes, nodes known in `peers`, paths) and locates its complaints with [`locate::KeyIndex`].
//! A broken policy file never stops the others from loading: its errors are collected.

pub mod cron;
pub mod locate;
pub mod object_store;
pub mod peers;
pub mod units;
pub mod wording;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use cron::CronSchedule;
use locate::KeyIndex;
use units::{ByteRate, ByteSize, Compression, HumanDuration, Name};

/// `snapship run --config node.yaml`: who this node is and how it reaches the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; must match the name in its certificate.
    pub node: Name,
    /// Where this node listens for peers; needed where it is a replica of a remote origin.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Spool, local state and the control socket.
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// mTLS files; needed as soon as any policy involves another node.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// How to reach the other nodes, as written: name -> host:port, or a mapping that may
    /// also allow the LAN path (`peers.rs`). Read through `peers` and `lan_peers`.
    #[serde(default, rename = "peers")]
    pub peer_entries: BTreeMap<Name, peers::PeerEntry>,
    /// How to reach the other nodes: name -> host:port (from `peer_entries`).
    #[serde(skip)]
    pub peers: BTreeMap<Name, String>,
    /// The peers this node allows the LAN path with (`encryption: off`); it is used only
    /// where both nodes mark each other so.
    #[serde(skip)]
    pub lan_peers: BTreeSet<Name>,
    /// Policy files or globs, relative to this file.
    #[serde(default)]
    pub policies: Vec<String>,
    /// How this node's transfers survive faults (all optional).
    #[serde(default)]
    pub transfers: Transfers,
    /// The file this was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

/// Node-wide transfer settings: how long a silent peer or process is given, how long a cut
/// transfer waits to be resumed, and how much an incoming stream may buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transfers {
    /// A transfer whose peer, or whose `btrfs`/`zfs` process, makes no progress for this long
    /// is aborted (and the process killed); it is retried and resumes where it stopped.
    pub stall_timeout: HumanDuration,
    /// Replica side: how long a cut transfer is kept, waiting for its origin to resume it.
    pub resume_window: HumanDuration,
    /// Replica side: what incoming streams may buffer ahead of `btrfs receive`/`zfs
    /// receive`: in memory first (`spool_memory` for all streams of the node together), then
    /// on disk under `state_dir/spool` (`spool_disk` per stream).
    pub spool_memory: ByteSize,
    pub spool_disk: ByteSize,
}

impl Default for Transfers {
    fn default() -> Self {
        Transfers {
            stall_timeout: HumanDuration(std::time::Duration::from_secs(120)),
            resume_window: HumanDuration(std::time::Duration::from_secs(3600)),
            spool_memory: ByteSize(64 << 20),
            spool_disk: ByteSize(4 << 30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One file set: where it lives, where it goes, when and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub fileset: Name,
    pub backend: BackendKind,
    pub mode: Mode,
    #[serde(default)]
    pub schedule: Option<CronSchedule>,
    #[serde(default)]
    pub continuous: Option<Continuous>,
    pub origin: Origin,
    /// The node replicas; object-store entries of `replicas:` are in `object_stores`.
    #[serde(deserialize_with = "object_store::node_entries")]
    pub replicas: Vec<ReplicaSpec>,
    /// The object-storage replicas (`replicas:` entries with `name` and `object_store`).
    #[serde(skip)]
    pub object_stores: Vec<object_store::StoreReplica>,
    #[serde(default)]
    pub retention: RetentionSides,
    #[serde(default)]
    pub transfer: Transfer,
    /// Consistency group: file sets of one backend and origin in the same group are
    /// snapshotted at one point in time (atomically on ZFS; one right after the other on
    /// btrfs, which has no multi-subvolume snapshot).
    #[serde(default)]
    pub group: Option<Name>,
    /// Recovery point objective: a replica whose lag (the age of the oldest origin change it
    /// lacks) exceeds this is flagged in `status` and the metrics.
    #[serde(default)]
    pub rpo: Option<HumanDuration>,
    /// Scheduled verification (docs/restore.md): the origin's daemon verifies every node
    /// replica's copy of the newest snapshot both hold, on this schedule.
    #[serde(default)]
    pub verify: Option<VerifySchedule>,
    /// The file this was read from.
    #[serde(skip)]
    pub file: PathBuf,
    /// The policy file's content as canonical YAML (parsed and written again: comments,
    /// layout and key order do not count), which every member should hold the same of;
    /// `snapship check --peers` compares it.
    #[serde(skip)]
    pub document: String,
}

/// `verify: { schedule: CRON, full: BOOL }`: when the origin's daemon runs `snapship verify`
/// of each replica by itself, and whether it rehashes everything each time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySchedule {
    /// Cron, as `schedule:` (UTC).
    pub schedule: CronSchedule,
    /// Rehash every file on both nodes each time, ignoring the hashes kept from the last
    /// verify (default: incremental).
    #[serde(default)]
    pub full: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Btrfs,
    Zfs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Snapshot on the cron `schedule`, then ship.
    Snapshot,
    /// Snapshot and ship as soon as data changes.
    Continuous,
    /// Continuous shipping plus cron snapshots kept for history.
    Hybrid,
}

/// As written in a policy: `btrfs`, `zfs`.
impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Btrfs => "btrfs",
            BackendKind::Zfs => "zfs",
        })
    }
}

/// As written in a policy: `snapshot`, `continuous`, `hybrid`.
impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(mode_name(*self))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Continuous {
    /// At most one snapshot per interval; changes within it coalesce.
    #[serde(default = "default_min_interval")]
    pub min_interval: HumanDuration,
}

fn default_min_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub node: Name,
    /// btrfs: the subvolume's path; zfs: the dataset (`tank/projects`).
    pub path: String,
    /// btrfs only: where snapshots are kept (default: `.snapship/FILESET` beside `path`).
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    pub node: Name,
    /// btrfs: directory of received snapshots; zfs: dataset.
    pub path: String,
    /// Where this replica serves the file set once promoted to origin (btrfs: where the
    /// writable subvolume is made, default the origin's `path`; zfs: a dataset, default the
    /// replica dataset itself).
    #[serde(default)]
    pub promote_path: Option<String>,
    /// Cascade: this replica is fed by that node (another replica of the file set, a relay
    /// that forwards what it received) instead of by the origin.
    #[serde(default)]
    pub from: Option<Name>,
    /// Whether this member may ever become the file set's origin (`promote`, `switchover
    /// --to`). `false`: it never does, and every node whose policy says so refuses an epoch
    /// that names it, so a member that promotes itself anyway is not followed.
    #[serde(default = "promotable_by_default")]
    pub promotable: bool,
}

fn promotable_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSides {
    #[serde(default)]
    pub origin: Retention,
    #[serde(default)]
    pub replica: Retention,
}

/// Which snapshots to keep; absent keys keep nothing extra. The common base and the newest
/// snapshot are always kept, whatever this says.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub within: Option<HumanDuration>,
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub bandwidth_limit: Option<ByteRate>,
}

impl Policy {
    /// The btrfs snapshot directory: as configured, or `.snapship/FILESET` beside the subvolume.
    pub fn snapshot_dir(&self) -> PathBuf {
        if let Some(dir) = &self.origin.snapshot_dir {
            return dir.clone();
        }
        let path = Path::new(&self.origin.path);
        path.parent().unwrap_or(Path::new("/")).join(".snapship").join(&self.fileset.0)
    }

    /// Every node this policy names, origin first.
    pub fn nodes(&self) -> impl Iterator<Item = &Name> {
        std::iter::once(&self.origin.node).chain(self.replicas.iter().map(|r| &r.node))
    }

    /// The replica entry for `node`, if it is one.
    pub fn replica_on(&self, node: &Name) -> Option<&ReplicaSpec> {
        self.replicas.iter().find(|r| &r.node == node)
    }

    /// Every member of the star: the policy's origin, then its replicas.
    pub fn members(&self) -> Vec<&str> {
        std::iter::once(self.origin.node.0.as_str()).chain(self.replicas.iter().map(|r| r.node.0.as_str())).collect()
    }

    pub fn is_member(&self, node: &str) -> bool {
        self.members().contains(&node)
    }

    /// Why `node` may not be the file set's origin by this policy, if it may not: not a
    /// member, or a replica marked `promotable: false`. The policy's own origin always may.
    pub fn origin_refusal(&self, node: &str) -> Option<String> {
        if self.origin.node.0 == node {
            return None;
        }
        match self.replicas.iter().find(|r| r.node.0 == node) {
            Some(r) if r.promotable => None,
            Some(_) => Some(format!("`{node}` may not be the origin of `{}`: its replica entry says `promotable: false`", self.fileset)),
            None => Some(format!("`{}` is not a member of `{}`", node.escape_debug(), self.fileset)),
        }
    }

    /// Where `node` receives the file set as a replica: its replica entry's path; for the
    /// initial origin (once another node is origin) its own `snapshot_dir` (btrfs) or dataset
    /// (zfs), where its own snapshots serve as common bases.
    pub fn replica_home(&self, node: &str) -> Option<String> {
        if let Some(r) = self.replicas.iter().find(|r| r.node.0 == node) {
            return Some(r.path.clone());
        }
        (self.origin.node.0 == node).then(|| self.origin_snapshots())
    }

    /// Where `node` keeps its snapshots as the origin: the initial origin in its
    /// `snapshot_dir` (btrfs) or dataset (zfs); a promoted replica beside what it received.
    pub fn origin_home(&self, node: &str) -> Option<String> {
        if self.origin.node.0 == node {
            return Some(self.origin_snapshots());
        }
        self.replicas.iter().find(|r| r.node.0 == node).map(|r| r.path.clone())
    }

    fn origin_snapshots(&self) -> String {
        match self.backend {
            BackendKind::Btrfs => self.snapshot_dir().display().to_string(),
            BackendKind::Zfs => self.origin.path.clone(),
        }
    }

    /// Who feeds `node` the file set while `origin` is its origin: the relay its replica
    /// entry names with `from:`, else the origin; `None` for the origin itself.
    /// A replica on the origin's own node is fed by the origin.
    /// `node` may also name an object store: its relay, or the origin.
    pub fn feeder<'a>(&'a self, node: &str, origin: &'a str) -> Option<&'a str> {
        let entry = self.replicas.iter().find(|r| r.node.0 == node);
        let store_from = || self.object_stores.iter().find(|s| s.name.0 == node).and_then(|s| s.from.as_ref());
        match entry.and_then(|r| r.from.as_ref()).or_else(store_from) {
            Some(relay) if relay.0 != origin && node != origin => Some(relay.0.as_str()),
            _ if node == origin && entry.is_none() => None,
            _ => Some(origin),
        }
    }

    /// The members that `node` feeds while `origin` is the origin: for the origin, every
    /// member without `from:` (and those whose relay is the origin itself, after a
    /// promotion); for a relay, the replicas naming it in `from:`.
    pub fn downstreams(&self, node: &str, origin: &str) -> Vec<&str> {
        self.members().into_iter().filter(|m| *m != node && self.feeder(m, origin) == Some(node)).collect()
    }

    /// The live file set on `node` when it is the origin: the policy's origin path, or a
    /// replica's `promote_path` (default: btrfs the origin's path, zfs the replica dataset).
    pub fn live_on(&self, node: &str) -> Option<String> {
        if self.origin.node.0 == node {
            return Some(self.origin.path.clone());
        }
        let r = self.replicas.iter().find(|r| r.node.0 == node)?;
        Some(r.promote_path.clone().unwrap_or_else(|| match self.backend {
            BackendKind::Btrfs => self.origin.path.clone(),
            BackendKind::Zfs => r.path.clone(),
        }))
    }
}

/// A problem in a config file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
    /// The key, as a path like `retention.origin.within`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A node config with the policies that loaded, and the errors of those that did not.
#[derive(Debug)]
pub struct LoadedConfig {
    pub node: NodeConfig,
    pub policies: Vec<Policy>,
    pub errors: Vec<ConfigError>,
}

impl LoadedConfig {
    pub fn policy(&self, fileset: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.fileset.0 == fileset)
    }
}

/// Reads the node config at `path` and every policy it lists. An unreadable or invalid node
/// config is an `Err`; policy problems are collected in [`LoadedConfig::errors`] and the
/// policy is left out, so that one broken file never stops the others.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = read(path)?;
    let node = parse_node_text(path, &text)?;
    let index = KeyIndex::new(&text);
    let base = path.parent().unwrap_or(Path::new("."));

    let mut errors = Vec::new();
    let mut files = Vec::new();
    for (i, pattern) in node.policies.iter().enumerate() {
        let full = base.join(pattern);
        let key = format!("policies[{i}]");
        match glob::glob(&full.to_string_lossy()) {
            Err(e) => errors.push(located(path, &index, &key, format!("bad glob {pattern:?}: {e}"))),
            Ok(paths) => {
                let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
                if matched.is_empty() {
                    errors.push(located(path, &index, &key, format!("{pattern:?} matches no file (looked for {})", full.display())));
                }
                matched.sort();
                files.extend(matched);
            }
        }
    }
    files.dedup();

    let mut policies: Vec<Policy> = Vec::new();
    let mut places = Places::default();
    for file in files {
        match load_policy(&file, &node) {
            Err(e) => errors.extend(e),
            Ok(policy) => {
                let index = || KeyIndex::new(&read(&file).unwrap_or_default());
                if let Some(other) = policies.iter().find(|p| p.fileset == policy.fileset) {
                    errors.push(located(
                        &file,
                        &index(),
                        "fileset",
                        format!("file set `{}` is already defined in {}; each file set needs its own name", policy.fileset, other.file.display()),
                    ));
                } else if let Some((key, message)) = places.overlap(&policy, &policies, &node.node) {
                    errors.push(located(&file, &index(), &key, message));
                } else if let Some(message) = group_mismatch(&policy, &policies) {
                    errors.push(located(&file, &index(), "group", message));
                } else {
                    places.add(&policy, policies.len(), &node.node);
                    policies.push(policy);
                }
            }
        }
    }
    errors.extend(missing_listen(&node, &policies));
    Ok(LoadedConfig { node, policies, errors })
}

/// A node that holds replicas of file sets whose origin is another node must listen for them.
fn missing_listen(node: &NodeConfig, policies: &[Policy]) -> Option<ConfigError> {
    if node.listen.is_some() {
        return None;
    }
    let remote: Vec<String> = policies
        .iter()
        .filter(|p| p.origin.node != node.node && p.replica_on(&node.node).is_some())
        .map(|p| format!("`{}` from `{}`", p.fileset, p.origin.node))
        .collect();
    if remote.is_empty() {
        return None;
    }
    Some(ConfigError {
        file: node.file.clone(),
        position: None,
        key: Some("listen".into()),
        message: format!(
            "node `{}` holds replicas of {}, whose origins must reach it: add `listen: 0.0.0.0:7441` (the address and port their `peers:` entry for `{}` points at)",
            node.node,
            remote.join(", "),
            node.node
        ),
    })
}

/// The shortest `continuous.min_interval`: below it, snapshots would follow each other as fast
/// as the filesystem can take them, each a transfer to every replica.
pub const MIN_INTERVAL_FLOOR: std::time::Duration = std::time::Duration::from_millis(100);

/// Parses and checks the text of a node config as if read from `path`, without touching the
/// filesystem: relative paths are resolved against `path`'s directory and `peers` is checked,
/// but the policy files are neither looked for nor read (that is [`load`]'s part).
pub fn parse_node_text(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
    let mut node: NodeConfig = parse_yaml(path, text)?;
    let index = KeyIndex::new(text);
    node.file = path.to_path_buf();
    let base = path.parent().unwrap_or(Path::new("."));
    node.state_dir = base.join(&node.state_dir);
    if let Some(tls) = &mut node.tls {
        tls.ca = base.join(&tls.ca);
        tls.cert = base.join(&tls.cert);
        tls.key = base.join(&tls.key);
    }
    node.peers = node.peer_entries.iter().map(|(n, e)| (n.clone(), e.address.clone())).collect();
    node.lan_peers = node.peer_entries.iter().filter(|(_, e)| e.lan).map(|(n, _)| n.clone()).collect();
    if let Some(peer) = node.peers.keys().find(|p| **p == node.node) {
        return Err(located(path, &index, &format!("peers.{peer}"), format!("`{peer}` is this node itself; list only the other nodes under `peers`")));
    }
    for (peer, addr) in &node.peers {
        if !looks_like_host_port(addr) {
            let key = if node.peer_entries[peer].mapping { format!("peers.{peer}.address") } else { format!("peers.{peer}") };
            return Err(located(path, &index, &key, format!("address {addr:?} is not HOST:PORT, like 192.0.2.7:7441 or backup.lan:7441")));
        }
    }
    Ok(node)
}

/// Reads and checks one policy file against the node config it is loaded for.
pub fn load_policy(path: &Path, node: &NodeConfig) -> Result<Policy, Vec<ConfigError>> {
    let text = read(path).map_err(|e| vec![e])?;
    parse_policy_text(path, &text, node)
}

/// Parses and checks the text of a policy as if read from `path`, against the node config it
/// is loaded for, without touching the filesystem.
pub fn parse_policy_text(path: &Path, text: &str, node: &NodeConfig) -> Result<Policy, Vec<ConfigError>> {
    let mut policy: Policy = parse_yaml(path, text).map_err(|e| vec![e])?;
    policy.file = path.to_path_buf();
    policy.document = canonical(text);
    let stores = object_store::store_entries(path, text).map_err(|e| vec![e])?;
    let mut errors = validate_policy(&policy, node, &KeyIndex::new(text));
    let index = KeyIndex::new(text);
    let names: Vec<&str> = policy.nodes().map(|n| n.0.as_str()).collect();
    errors.extend(object_store::check(&stores, &names).into_iter().map(|(key, message)| located(path, &index, &key, message)));
    if !stores.is_empty() {
        // `validate_policy` saw no object store: its complaint about no replica at all is moot.
        errors.retain(|e| e.key.as_deref() != Some("replicas"));
    }
    policy.object_stores = stores.into_iter().map(|(_, s)| s).collect();
    for s in &policy.object_stores {
        if let Some(message) = store_feeder_problem(&policy, s) {
            errors.push(located(path, &index, &format!("replicas[{}].from", s.index), message));
        }
    }
    if errors.is_empty() { Ok(policy) } else { Err(errors) }
}

/// `text`, a YAML document that parsed, written again from its value: what two copies of
/// one policy agree on whatever their comments and layout.
fn canonical(text: &str) -> String {
    serde_yaml::from_str::<serde_yaml::Value>(text).ok().and_then(|v| serde_yaml::to_string(&sorted(v)).ok()).unwrap_or_default()
}

/// `value` with every mapping's keys in order.
fn sorted(value: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match value {
        Value::Mapping(m) => {
            let mut entries: Vec<(Value, Value)> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            entries.sort_by_key(|(k, _)| serde_yaml::to_string(k).unwrap_or_default());
            Value::Mapping(entries.into_iter().collect())
        }
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(sorted).collect()),
        Value::Tagged(t) => Value::Tagged(Box::new(serde_yaml::value::TaggedValue { tag: t.tag, value: sorted(t.value) })),
        other => other,
    }
}

/// The checks that span several keys, or the policy and the node config.
pub fn validate_policy(p: &Policy, node: &NodeConfig, index: &KeyIndex) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut err = |key: &str, message: String| errors.push(located(&p.file, index, key, message));

    match p.mode {
        Mode::Snapshot | Mode::Hybrid if p.schedule.is_none() => {
            err("mode", format!("mode `{}` needs a `schedule` (a cron expression, like \"*/15 * * * *\")", mode_name(p.mode)))
        }
        Mode::Continuous if p.schedule.is_some() => {
            err("schedule", "`schedule` is only used in snapshot and hybrid mode; remove it, or set `mode: hybrid` to also keep scheduled snapshots".into())
        }
        Mode::Snapshot if p.continuous.is_some() => {
            err("continuous", "`continuous` settings are only used in continuous and hybrid mode; remove them, or change `mode`".into())
        }
        _ => {}
    }

    if p.rpo.as_ref().is_some_and(|r| r.0.is_zero()) {
        err("rpo", "an rpo of 0 is exceeded by every change; write how much data loss is acceptable, like `rpo: 5m`, or remove the key".into());
    }

    if let Some(c) = &p.continuous {
        if c.min_interval.0 < MIN_INTERVAL_FLOOR {
            err(
                "continuous.min_interval",
                format!(
                    "{} is below the shortest interval, 100ms; write 100ms or more, like `min_interval: 1s` (changes within it share one snapshot)",
                    c.min_interval
                ),
            );
        }
    }

    let known = |n: &Name| *n == node.node || node.peers.contains_key(n);
    let peers_hint = || {
        let list: Vec<&str> = node.peers.keys().map(|n| n.0.as_str()).collect();
        format!(
            "this node is `{}` and {} lists {}; add the node under `peers:` there, or fix the name",
            node.node,
            node.file.display(),
            if list.is_empty() { "no peers".to_string() } else { format!("peers {}", list.join(", ")) }
        )
    };
    if !known(&p.origin.node) {
        err("origin.node", format!("unknown node `{}`: {}", p.origin.node, peers_hint()));
    }
    if p.replicas.is_empty() {
        err("replicas", "a file set needs at least one replica (a `node` and a `path`)".into());
    }
    let mut seen = BTreeSet::new();
    for (i, r) in p.replicas.iter().enumerate() {
        if !known(&r.node) {
            err(&format!("replicas[{i}].node"), format!("unknown node `{}`: {}", r.node, peers_hint()));
        }
        if !seen.insert(&r.node) {
            err(&format!("replicas[{i}].node"), format!("node `{}` is listed twice; a node holds one replica of a file set", r.node));
        }
    }

    for (i, r) in p.replicas.iter().enumerate() {
        if let Some(message) = cascade_problem(p, r) {
            err(&format!("replicas[{i}].from"), message);
        }
    }

    let involves_remote = {
        let here = &node.node;
        let origin_here = &p.origin.node == here;
        (origin_here && p.replicas.iter().any(|r| &r.node != here)) || (!origin_here && p.replica_on(here).is_some())
    };
    if involves_remote && node.tls.is_none() {
        err(
            "origin.node",
            format!("this file set crosses nodes, so {} needs a `tls:` section (ca, cert, key; `snapship certs` makes them)", node.file.display()),
        );
    }

    match p.backend {
        BackendKind::Btrfs => {
            if let Err(m) = check_abs_path(&p.origin.path) {
                err("origin.path", m);
            }
            if let Some(dir) = &p.origin.snapshot_dir {
                if let Err(m) = check_abs_path(&dir.to_string_lossy()) {
                    err("origin.snapshot_dir", m);
                }
            }
            let origin = Path::new(&p.origin.path);
            let snapdir = p.snapshot_dir();
            if snapdir.starts_with(origin) {
                err("origin.snapshot_dir", format!("{} is inside the file set {}; keep snapshots outside it", snapdir.display(), origin.display()));
            }
            for (i, r) in p.replicas.iter().enumerate() {
                let key = format!("replicas[{i}].path");
                if let Err(m) = check_abs_path(&r.path) {
                    err(&key, m);
                } else if r.node == p.origin.node {
                    let rp = Path::new(&r.path);
                    if rp.starts_with(origin) || origin.starts_with(rp) || rp.starts_with(&snapdir) || snapdir.starts_with(rp) {
                        err(
                            &key,
                            format!(
                                "a replica on the origin node must not overlap the file set ({}) or its snapshots ({})",
                                origin.display(),
                                snapdir.display()
                            ),
                        );
                    }
                }
            }
        }
        BackendKind::Zfs => {
            if let Err(m) = check_dataset(&p.origin.path) {
                err("origin.path", m);
            }
            if p.origin.snapshot_dir.is_some() {
                err("origin.snapshot_dir", "`snapshot_dir` is for btrfs; ZFS keeps snapshots in the dataset".into());
            }
            for (i, r) in p.replicas.iter().enumerate() {
                if let Err(m) = check_dataset(&r.path) {
                    err(&format!("replicas[{i}].path"), m);
                } else if r.node == p.origin.node && (r.path == p.origin.path || r.path.starts_with(&format!("{}/", p.origin.path))) {
                    err(&format!("replicas[{i}].path"), format!("a replica on the origin node must not be the dataset {} or inside it", p.origin.path));
                }
            }
        }
    }
    errors
}

/// The places on `node` that `policy` writes to or owns, with their keys: the file set and
/// its snapshot directory where `node` is the origin, the replica path where it is a replica.
fn places_on(policy: &Policy, node: &Name) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if &policy.origin.node == node {
        out.push(("origin.path".to_string(), policy.origin.path.clone()));
        if policy.backend == BackendKind::Btrfs {
            out.push(("origin.snapshot_dir".to_string(), policy.snapshot_dir().to_string_lossy().into_owned()));
        }
    }
    for (i, r) in policy.replicas.iter().enumerate() {
        if &r.node == node {
            out.push((format!("replicas[{i}].path"), r.path.clone()));
        }
    }
    out
}

/// What is wrong with replica `r`'s `from:` in `p`, if anything: it must name another
/// replica of the same file set, and following `from:` must end at a replica the origin
/// feeds (no cycle).
fn cascade_problem(p: &Policy, r: &ReplicaSpec) -> Option<String> {
    let relay = r.from.as_ref()?;
    let replicas: Vec<&str> = p.replicas.iter().map(|r| r.node.0.as_str()).collect();
    if *relay == r.node {
        return Some(format!("`{}` cannot feed itself; name another replica of `{}` ({}), or remove `from:`", relay, p.fileset, replicas.join(", ")));
    }
    if *relay == p.origin.node {
        return Some(format!("`{relay}` is the origin, which feeds every replica without `from:`; remove `from: {relay}`"));
    }
    if !replicas.contains(&relay.0.as_str()) {
        return Some(format!("`{relay}` is not a replica of `{}`; `from:` names the replica that feeds this one (one of {})", p.fileset, replicas.join(", ")));
    }
    let mut chain = vec![r.node.0.as_str()];
    let mut at = relay;
    loop {
        if chain.contains(&at.0.as_str()) {
            chain.push(&at.0);
            return Some(format!("`from:` makes a cycle ({}); one replica of the chain must be fed by the origin (no `from:`)", chain.join(" <- ")));
        }
        chain.push(&at.0);
        match p.replicas.iter().find(|x| x.node == *at).and_then(|x| x.from.as_ref()) {
            Some(next) => at = next,
            None => return None,
        }
    }
}

/// What is wrong with object store `s`'s `from:` in `p`, if anything: it must name a replica
/// node of the file set (which relays to the store what it received), not the origin.
fn store_feeder_problem(p: &Policy, s: &object_store::StoreReplica) -> Option<String> {
    let relay = s.from.as_ref()?;
    let replicas: Vec<&str> = p.replicas.iter().map(|r| r.node.0.as_str()).collect();
    if p.backend == BackendKind::Zfs {
        return Some("cascades (`from:`) are supported on btrfs only so far; remove `from:` so that the origin uploads to this store".into());
    }
    if *relay == p.origin.node {
        return Some(format!("`{relay}` is the origin, which uploads to every object store without `from:`; remove `from: {relay}`"));
    }
    if !replicas.contains(&relay.0.as_str()) {
        return Some(format!(
            "`{relay}` is not a replica node of `{}`; `from:` names the replica that uploads to this store (one of {})",
            p.fileset,
            if replicas.is_empty() { "none: add a node replica first".to_string() } else { replicas.join(", ") }
        ));
    }
    None
}

/// The places that the file sets accepted so far own on this node ([`places_on`]), indexed
/// so that checking one more file set costs a few lookups instead of a pass over all of them
/// (comparing every pair made a node with 2,000 file sets take many seconds to load).
///
/// Two file sets on one node must not share or nest their places: their snapshots, `latest`
/// links, retention and receive locks would mix. Places nest by path components for btrfs,
/// by dataset names for zfs; only places of the same backend are compared.
#[derive(Default)]
struct Places {
    /// (zfs?, place without trailing '/') -> (its key, index of its policy in `policies`).
    by_place: BTreeMap<(bool, String), (String, usize)>,
}

impl Places {
    fn add(&mut self, policy: &Policy, index: usize, node: &Name) {
        let zfs = policy.backend == BackendKind::Zfs;
        for (key, place) in places_on(policy, node) {
            self.by_place.entry((zfs, place.trim_end_matches('/').to_string())).or_insert((key, index));
        }
    }

    /// The first place of `policy` that is, contains or lies under an accepted one: the
    /// offending key and the message naming the other file set.
    fn overlap(&self, policy: &Policy, policies: &[Policy], node: &Name) -> Option<(String, String)> {
        let zfs = policy.backend == BackendKind::Zfs;
        for (key, place) in places_on(policy, node) {
            let trimmed = place.trim_end_matches('/');
            // The place itself and each place it lies under...
            let mut up = Some(trimmed);
            let mut hit = None;
            while let Some(candidate) = up {
                if let Some(found) = self.by_place.get(&(zfs, candidate.to_string())) {
                    hit = Some(found);
                    break;
                }
                up = candidate.rfind('/').map(|i| &candidate[..i]);
            }
            // ...then any place under it ('0' is the character after '/').
            let hit = hit.or_else(|| self.by_place.range((zfs, format!("{trimmed}/"))..(zfs, format!("{trimmed}0"))).next().map(|(_, v)| v));
            if let Some((other_key, index)) = hit {
                let other = &policies[*index];
                let other_place = places_on(other, node).into_iter().find(|(k, _)| k == other_key).map(|(_, p)| p).unwrap_or_default();
                return Some((
                    key,
                    format!(
                        "{place} overlaps {other_place}, the `{other_key}` of file set `{}` ({}); give each file set its own place",
                        other.fileset,
                        other.file.display()
                    ),
                ));
            }
        }
        None
    }
}

/// File sets of one group are snapshotted together, so they must agree on what decides that.
fn group_mismatch(policy: &Policy, others: &[Policy]) -> Option<String> {
    let group = policy.group.as_ref()?;
    let other = others.iter().find(|o| o.group.as_ref() == Some(group))?;
    let same = other.backend == policy.backend
        && other.origin.node == policy.origin.node
        && other.mode == policy.mode
        && other.schedule.as_ref().map(|s| s.as_str()) == policy.schedule.as_ref().map(|s| s.as_str());
    (!same).then(|| {
        format!(
            "group `{group}` also holds `{}` ({}), which differs in backend, origin node, mode or schedule;              a group's file sets must agree on all four to be snapshotted together",
            other.fileset,
            other.file.display()
        )
    })
}

impl LoadedConfig {
    /// The file sets of `policy`'s consistency group (itself included), or just `policy`.
    pub fn group_of<'a>(&'a self, policy: &'a Policy) -> Vec<&'a Policy> {
        match &policy.group {
            None => vec![policy],
            Some(g) => self.policies.iter().filter(|p| p.group.as_ref() == Some(g)).collect(),
        }
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Snapshot => "snapshot",
        Mode::Continuous => "continuous",
        Mode::Hybrid => "hybrid",
    }
}

fn check_abs_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?} must be absolute, like /srv/projects"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) || p.parent().is_none() {
        return Err(format!("path {path:?} must be a plain absolute path below / (no `.` or `..`)"));
    }
    Ok(())
}

fn check_dataset(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/');
    let parts_ok = name.split('/').all(|part| !part.is_empty());
    if name.starts_with('/') || !name.chars().all(ok_char) || !parts_ok {
        return Err(format!("{name:?} is not a ZFS dataset name; write POOL/DATASET, like tank/projects"));
    }
    Ok(())
}

fn looks_like_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError { file: path.to_path_buf(), position: None, key: None, message: format!("cannot read: {e}") })
}

fn located(file: &Path, index: &KeyIndex, key: &str, message: String) -> ConfigError {
    ConfigError { file: file.to_path_buf(), position: index.position(key), key: Some(key.to_string()), message }
}

/// Parses YAML into `T`, turning serde's error into one that names file, line, column and key,
/// in plain words (see [`wording`]).
fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError { file: file.to_path_buf(), position: None, key: None, message: "the file is empty".into() });
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // serde_path_to_error writes `?` for a segment it could not name.
        let path = e.path().to_string();
        let path = path.trim_end_matches(".?").trim_end_matches('?');
        let mut key = (path != "." && !path.is_empty()).then(|| path.to_string());
        let inner = e.into_inner();
        let serde_pos = inner.location().map(|l| (l.line(), l.column()));
        let bare = bare_message(&inner.to_string(), key.as_deref(), serde_pos);
        let index = KeyIndex::new(text);
        // serde_yaml places value errors at the enclosing mapping; the key itself is better.
        let mut position = key.as_deref().and_then(|k| index.position(k)).or(serde_pos);
        // A key written twice: serde names the field, not where; the index knows.
        if let Some(field) = bare.strip_prefix("duplicate field `").and_then(|r| r.strip_suffix('`')) {
            let full = key.as_deref().map_or(field.to_string(), |k| format!("{k}.{field}"));
            position = index.duplicate(&full).or(position);
            key = Some(full);
        }
        let message = match serde_pos.and_then(|(line, _)| wording::quote_hint(text, line)) {
            // A YAML syntax error (the index is empty then) on a value YAML reserves.
            Some(hint) if index.is_empty() => hint,
            _ => wording::plain(&bare, key.as_deref()),
        };
        ConfigError { file: file.to_path_buf(), position, key, message }
    })
}

/// serde_yaml's message without the parts [`ConfigError`] prints itself: the path prefix
/// and the " at line L column C" of the error's own position.
fn bare_message(full: &str, key: Option<&str>, pos: Option<(usize, usize)>) -> String {
    let mut msg = full.to_string();
    if let Some((line, col)) = pos {
        let own = format!(" at line {line} column {col}");
        if let Some(at) = msg.find(&own) {
            msg.replace_range(at..at + own.len(), "");
        }
    }
    if let (Some(key), Some((prefix, rest))) = (key, msg.split_once(": ")) {
        if key.starts_with(prefix) {
            msg = rest.to_string();
        }
    }
    msg
}

#[cfg(test)]
mod tests;
