//! What the daemon is doing, for `snapship status` and for Prometheus.
//!
//! The origin loops and the replica server report events to one [`StatusBoard`]: changes
//! noticed, snapshots taken or failed, prunes, transfers started (with a live byte count) and
//! finished, snapshots received. The board answers `status` requests on the control socket
//! with a [`StatusReport`] and keeps the Prometheus metrics current (the lag gauges are
//! refreshed every second, since lag grows by itself).
//!
//! **Lag is exposure**: how long ago the oldest change on the origin happened that a replica
//! does not hold yet, i.e. what losing the origin now would cost ([`exposure`]). It is 0 for
//! a replica that holds the origin's newest snapshot while nothing changed since; it is not
//! the age of the replica's newest snapshot (which grows on an idle, fully current replica).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};

use super::metrics as names;
use crate::config::Policy;
use crate::ship::meter::Tally;
use crate::ship::protocol::Hop;
use crate::snapshot::SnapshotName;

/// The answer to `snapship status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub node: String,
    pub origin_of: Vec<OriginStatus>,
    pub replica_of: Vec<ReceiverStatus>,
    /// File sets this node relays (a cascade): what it forwards to the replicas it feeds,
    /// in the shape of an origin's entry (its `newest` and `snapshots` are what it received).
    #[serde(default)]
    pub relay_of: Vec<OriginStatus>,
    /// Per file set this node is a member of: who is origin, since which promotion, and the
    /// diverged data kept here.
    #[serde(default)]
    pub epochs: Vec<EpochStatus>,
    /// The config the daemon runs with: broken policy files left out, the last reload.
    #[serde(default)]
    pub config: ConfigStatus,
}

/// What the daemon made of its config files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigStatus {
    /// Policies left out, each with its file and why (fix the file, then reload).
    pub broken: Vec<BrokenPolicy>,
    /// The last SIGHUP (or `systemctl reload`), if any since the start.
    pub reload: Option<ReloadStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BrokenPolicy {
    pub file: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    pub at: DateTime<Utc>,
    /// False: the new config was refused and the daemon runs with the one it had.
    pub ok: bool,
    pub message: String,
}

/// A file set's epoch as this node knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochStatus {
    pub fileset: String,
    pub epoch: u64,
    pub origin: String,
    /// When this node was promoted, and from which snapshot (the failover's recovery point).
    pub promoted_at: Option<DateTime<Utc>>,
    pub promoted_from: Option<String>,
    /// Diverged data kept read-only here (never deleted by snapship).
    pub diverged: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OriginStatus {
    pub fileset: String,
    pub mode: String,
    pub newest: Option<String>,
    pub snapshots: usize,
    /// The policy's `rpo`, in seconds: a replica whose lag exceeds it is flagged.
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    /// The last snapshot that could not be taken, until one is taken again.
    #[serde(default)]
    pub last_snapshot_error: Option<ErrorStatus>,
    /// The last prune of the origin that failed, until one succeeds again.
    #[serde(default)]
    pub last_prune_error: Option<ErrorStatus>,
    pub replicas: Vec<ReplicaStatus>,
    /// On a relay: the node that feeds it (the origin, or the relay up the chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fed_by: Option<String>,
    /// When the policy's `verify:` schedule fires next (the daemon verifies every replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_verify: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub node: String,
    /// The newest snapshot the replica holds from us: the common base of the next transfer.
    pub newest: Option<String>,
    /// How long ago the oldest origin change happened that the replica lacks, in seconds;
    /// 0 while it holds everything (see [`exposure`]). None before anything is known.
    pub lag_seconds: Option<f64>,
    /// The lag exceeds the policy's `rpo`.
    #[serde(default)]
    pub rpo_exceeded: bool,
    pub transfer: Option<TransferStatus>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<ErrorStatus>,
    /// Transfers that succeeded and failed, and the stream bytes of the snapshots delivered:
    /// totals kept in the origin's state file, so they survive restarts.
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    pub bytes_shipped: u64,
    /// Stream bytes put on the wire since the daemon started, failed and cut attempts
    /// included (not kept across restarts, unlike `bytes_shipped`).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Transfers that went on from where a cut one stopped.
    #[serde(default)]
    pub resumes: u64,
    /// Missed snapshots still to backfill (once the replica is current), as last counted.
    #[serde(default)]
    pub backfill_pending: usize,
    /// Stream bytes of the snapshots backfilled since the daemon started.
    #[serde(default)]
    pub backfill_bytes: u64,
    /// A relay's report of the replicas it feeds (cascades), from its last listing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub downstream: Vec<Hop>,
    /// The replica said it has no room for the stream: the origin waits for room there
    /// (checking with the replica, not resending) before it tries again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_room: Option<RoomWait>,
    /// What the daemon's verifies of this replica found (scheduled by `verify:` or asked
    /// for by `snapship verify`); absent until one ran since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStatus>,
}

/// The verifies of one replica's copy, as the origin's daemon ran them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyStatus {
    /// The last verify that compared the copies (equal or not).
    pub last: Option<VerifyRun>,
    /// When a verify last found the replica's copy equal to the origin's.
    pub last_success: Option<DateTime<Utc>>,
    /// The last verify that could not compare (replica down, no common snapshot), until one
    /// compares again.
    pub last_error: Option<ErrorStatus>,
}

/// One verify that compared a replica's copy of a snapshot with the origin's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyRun {
    pub snapshot: String,
    pub at: DateTime<Utc>,
    /// How many paths differ (0: equal).
    pub mismatches: usize,
    /// The first differences in words (at most [`SHOWN_DIFFERENCES`]; the log has them all).
    pub differences: Vec<String>,
}

/// How many differences `status` keeps per replica.
pub const SHOWN_DIFFERENCES: usize = 20;

/// A replica without room for a stream, as the origin last heard from it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomWait {
    pub since: DateTime<Utc>,
    /// Bytes free there, at the last check.
    pub free: u64,
    /// The stream's length, when the replica had all of it.
    pub needed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransferStatus {
    pub snapshot: String,
    pub base: Option<String>,
    /// How far into the stream it is (`resumed_from` included).
    pub bytes: u64,
    /// Of this attempt: bytes sent per second since it started.
    pub bytes_per_second: f64,
    pub started: DateTime<Utc>,
    /// The replica already held this much of the stream (a resumed transfer).
    #[serde(default)]
    pub resumed_from: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorStatus {
    pub at: DateTime<Utc>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceiverStatus {
    pub fileset: String,
    pub origin: String,
    pub newest: Option<String>,
    /// Age of `newest`, in seconds: a replica does not see the origin's changes, so this is
    /// an upper bound of what it lacks only while the origin keeps taking snapshots.
    pub lag_seconds: Option<f64>,
    pub snapshots: usize,
    pub last_received: Option<DateTime<Utc>>,
    /// The last prune of this replica that failed, until one succeeds again.
    #[serde(default)]
    pub last_prune_error: Option<ErrorStatus>,
    /// Received snapshots changed after they were received: never bases, never pruned.
    #[serde(default)]
    pub tampered: Vec<String>,
}

#[derive(Default)]
struct Board {
    origin: BTreeMap<String, OriginEntry>,
    receiver: BTreeMap<String, ReceiverEntry>,
    config: ConfigStatus,
}

#[derive(Default)]
struct OriginEntry {
    mode: String,
    rpo: Option<Duration>,
    /// The origin's snapshots, oldest first.
    snapshots: Vec<SnapshotName>,
    /// When a change was first noticed that no snapshot holds yet (continuous and hybrid
    /// mode: the change watcher, or `changed_since` on its poll).
    unsnapshotted_change: Option<DateTime<Utc>>,
    last_snapshot_error: Option<ErrorStatus>,
    last_prune_error: Option<ErrorStatus>,
    replicas: BTreeMap<String, ReplicaEntry>,
    /// This node relays the file set, fed by this node; `None` on the origin.
    fed_by: Option<String>,
    next_verify: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct ReplicaEntry {
    newest: Option<SnapshotName>,
    transfer: Option<Running>,
    last_success: Option<DateTime<Utc>>,
    last_error: Option<ErrorStatus>,
    ok: u64,
    failed: u64,
    bytes: u64,
    sent: u64,
    resumes: u64,
    backfill_pending: usize,
    backfill_bytes: u64,
    downstream: Vec<Hop>,
    waiting_for_room: Option<RoomWait>,
    verify: Option<VerifyStatus>,
}

struct Running {
    snapshot: String,
    base: Option<String>,
    /// Counts stream bytes from the start of the stream.
    tally: Arc<Tally>,
    /// Where this attempt started in the stream.
    from: u64,
    started: Instant,
    started_at: DateTime<Utc>,
}

impl Running {
    /// Bytes this attempt sent.
    fn sent(&self) -> u64 {
        self.tally.bytes().saturating_sub(self.from)
    }
}

#[derive(Default)]
struct ReceiverEntry {
    origin: String,
    newest: Option<SnapshotName>,
    snapshots: usize,
    last_received: Option<DateTime<Utc>>,
    last_prune_error: Option<ErrorStatus>,
    tampered: Vec<String>,
}

pub struct StatusBoard {
    node: String,
    board: Mutex<Board>,
}

/// Seconds from `then` to `now`, never negative.
fn seconds_since(then: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - then).num_milliseconds().max(0) as f64 / 1000.0
}

fn lag(newest: &Option<SnapshotName>, now: DateTime<Utc>) -> Option<f64> {
    newest.as_ref().map(|n| seconds_since(n.time(), now))
}

/// A replica's lag as exposure, in seconds: how long ago the oldest origin change happened
/// that the replica does not hold.
///
/// - `origin`: the origin's snapshots, oldest first; `replica_newest`: the newest of them the
///   replica holds (None: nothing yet);
/// - `unsnapshotted_change`: when a change was first noticed that no origin snapshot holds
///   yet (only continuous and hybrid mode watch for changes; in snapshot mode it is None, and
///   "nothing changed" means the replica holds the origin's newest snapshot).
///
/// The oldest change the replica lacks is approximated by the time of the oldest origin
/// snapshot newer than the replica's newest (the change happened before it was taken) or
/// by the first change noticed since the origin's newest, whichever is older. None of
/// either: the replica is current, lag 0. Nothing on either side and no change seen: None.
pub fn exposure(
    origin: &[SnapshotName],
    replica_newest: Option<&SnapshotName>,
    unsnapshotted_change: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<f64> {
    if origin.is_empty() && replica_newest.is_none() && unsnapshotted_change.is_none() {
        return None;
    }
    let oldest_missing = origin.iter().find(|s| replica_newest.is_none_or(|r| s.time() > r.time())).map(SnapshotName::time);
    let oldest = match (oldest_missing, unsnapshotted_change) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Some(oldest.map_or(0.0, |t| seconds_since(t, now)))
}

/// Whether a lag exceeds the policy's `rpo` (an unknown lag exceeds nothing).
fn over_rpo(lag: Option<f64>, rpo: Option<Duration>) -> bool {
    matches!((lag, rpo), (Some(lag), Some(rpo)) if lag > rpo.as_secs_f64())
}

/// What failed, for the `what` label of the failures counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Snapshot,
    Prune,
    Transfer,
    /// Pruning a replica after a receive (counted on the replica's node).
    ReplicaPrune,
}

impl Failure {
    const ON_ORIGIN: [Failure; 3] = [Failure::Snapshot, Failure::Prune, Failure::Transfer];

    fn label(self) -> &'static str {
        match self {
            Failure::Snapshot => "snapshot",
            Failure::Prune => "prune",
            Failure::Transfer => "transfer",
            Failure::ReplicaPrune => "replica_prune",
        }
    }
}

fn count_failure(fileset: &str, what: Failure) {
    counter!(names::FAILURES, "fileset" => fileset.to_string(), "what" => what.label()).increment(1);
}

/// A replica's totals as kept in the origin's state file, to start the board from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    pub bytes_shipped: u64,
}

impl StatusBoard {
    pub fn new(node: &str) -> Arc<StatusBoard> {
        Arc::new(StatusBoard { node: node.to_string(), board: Mutex::default() })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        f(&mut self.board.lock().expect("status board lock"))
    }

    /// Registers a file set this node is origin of, with its `rpo` and its replicas.
    pub fn origin(&self, fileset: &str, mode: &str, rpo: Option<Duration>, replicas: &[&str]) {
        for what in Failure::ON_ORIGIN {
            counter!(names::FAILURES, "fileset" => fileset.to_string(), "what" => what.label()).absolute(0);
        }
        self.with(|b| {
            let e = b.origin.entry(fileset.to_string()).or_default();
            e.mode = mode.to_string();
            e.rpo = rpo;
            for r in replicas {
                e.replicas.entry(r.to_string()).or_default();
                counter!(names::TRANSFERS, "fileset" => fileset.to_string(), "replica" => r.to_string(), "result" => "ok").absolute(0);
                counter!(names::TRANSFERS, "fileset" => fileset.to_string(), "replica" => r.to_string(), "result" => "failed").absolute(0);
                counter!(names::BYTES_SHIPPED, "fileset" => fileset.to_string(), "replica" => r.to_string()).absolute(0);
                counter!(names::RESUMES, "fileset" => fileset.to_string(), "replica" => r.to_string()).absolute(0);
                counter!(names::BYTES_SENT, "fileset" => fileset.to_string(), "replica" => r.to_string()).absolute(0);
            }
        });
    }

    /// Registers a file set this node relays (fed by `fed_by`) to `downstreams`: shown
    /// under `relay_of`, with the same per-replica entries an origin has.
    pub fn relay(&self, fileset: &str, mode: &str, rpo: Option<Duration>, downstreams: &[&str], fed_by: &str) {
        self.origin(fileset, mode, rpo, downstreams);
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().fed_by = Some(fed_by.to_string()));
    }

    /// A replica's backfill queue: `pending` missed snapshots to go, `sent` bytes of one
    /// just backfilled.
    pub fn backfill(&self, fileset: &str, replica: &str, pending: usize, sent: u64) {
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            r.backfill_pending = pending;
            r.backfill_bytes += sent;
        });
        let labels = [("fileset", fileset.to_string()), ("replica", replica.to_string())];
        gauge!(names::BACKFILL_PENDING, &labels).set(pending as f64);
        counter!(names::BACKFILL_BYTES, &labels).increment(sent);
    }

    /// What `replica` (a relay) reports of the replicas it feeds, checked: only members of
    /// `policy`, at most as deep as it has members, text without control characters.
    pub fn downstream_of(&self, policy: &Policy, replica: &str, hops: &[Hop]) {
        let checked = checked_hops(policy, hops, policy.members().len());
        self.with(|b| b.origin.entry(policy.fileset.0.clone()).or_default().replicas.entry(replica.to_string()).or_default().downstream = checked);
    }

    /// What this node relays of `fileset` (cascades), as hops for its `snapshots` answer;
    /// empty unless it is a relay of it.
    pub fn hops(&self, fileset: &str) -> Vec<Hop> {
        let report = self.report();
        let Some(relay) = report.relay_of.into_iter().find(|r| r.fileset == fileset) else { return Vec::new() };
        relay
            .replicas
            .into_iter()
            .map(|r| Hop {
                node: r.node,
                newest: r.newest,
                lag_seconds: r.lag_seconds.map(|l| l as u64),
                backfill_pending: r.backfill_pending,
                last_error: r.last_error.map(|e| e.message),
                downstream: r.downstream,
            })
            .collect()
    }

    /// Starts a replica's entry from what the state file kept (at daemon start): the totals,
    /// the last success and the last error.
    pub fn replica_history(&self, fileset: &str, replica: &str, totals: Totals, last_success: Option<DateTime<Utc>>, last_error: Option<ErrorStatus>) {
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            (r.ok, r.failed, r.bytes) = (totals.transfers_ok, totals.transfers_failed, totals.bytes_shipped);
            (r.last_success, r.last_error) = (last_success, last_error);
        });
        let (f, r) = (fileset.to_string(), replica.to_string());
        counter!(names::TRANSFERS, "fileset" => f.clone(), "replica" => r.clone(), "result" => "ok").absolute(totals.transfers_ok);
        counter!(names::TRANSFERS, "fileset" => f.clone(), "replica" => r.clone(), "result" => "failed").absolute(totals.transfers_failed);
        counter!(names::BYTES_SHIPPED, "fileset" => f, "replica" => r).absolute(totals.bytes_shipped);
    }

    /// The origin's snapshots now, oldest first.
    pub fn origin_snapshots(&self, fileset: &str, snapshots: &[SnapshotName]) {
        let mut sorted = snapshots.to_vec();
        sorted.sort();
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().snapshots = sorted);
        gauge!(names::SNAPSHOTS, "fileset" => fileset.to_string(), "side" => "origin").set(snapshots.len() as f64);
    }

    /// A change to the origin's data was noticed (the first one since the last snapshot
    /// counts: it is the oldest that no snapshot holds).
    pub fn change_noticed(&self, fileset: &str) {
        self.with(|b| {
            b.origin.entry(fileset.to_string()).or_default().unsnapshotted_change.get_or_insert_with(Utc::now);
        });
    }

    /// What looked like a change left the data as the newest snapshot has it.
    pub fn change_undone(&self, fileset: &str) {
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().unsnapshotted_change = None);
    }

    /// A snapshot was taken: it holds every change noticed so far, and snapshots work again.
    pub fn snapshot_taken(&self, fileset: &str, snapshot: &SnapshotName) {
        self.with(|b| {
            let e = b.origin.entry(fileset.to_string()).or_default();
            if !e.snapshots.contains(snapshot) {
                e.snapshots.push(snapshot.clone());
                e.snapshots.sort();
            }
            e.unsnapshotted_change = None;
            e.last_snapshot_error = None;
        });
    }

    /// A snapshot could not be taken.
    pub fn snapshot_failed(&self, fileset: &str, message: &str) {
        self.with(|b| {
            b.origin.entry(fileset.to_string()).or_default().last_snapshot_error = Some(ErrorStatus { at: Utc::now(), message: message.to_string() })
        });
        count_failure(fileset, Failure::Snapshot);
    }

    /// How a prune of the origin ended.
    pub fn pruned(&self, fileset: &str, result: Result<(), String>) {
        let error = result.as_ref().err().map(|message| ErrorStatus { at: Utc::now(), message: message.clone() });
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().last_prune_error = error);
        if result.is_err() {
            count_failure(fileset, Failure::Prune);
        }
    }

    /// What a replica holds from us, as last learned.
    pub fn replica_has(&self, fileset: &str, replica: &str, newest: Option<&SnapshotName>) {
        self.with(|b| {
            let e = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            e.newest = newest.cloned();
        });
    }

    /// A transfer started, `from` bytes into the stream (not 0 when resumed); `tally` counts
    /// the stream's bytes from its start.
    pub fn transfer_started(&self, fileset: &str, replica: &str, snapshot: &SnapshotName, base: Option<&SnapshotName>, tally: Arc<Tally>, from: u64) {
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            let (snapshot, base) = (snapshot.to_string(), base.map(|b| b.to_string()));
            r.transfer = Some(Running { snapshot, base, tally, from, started: Instant::now(), started_at: Utc::now() });
            if from > 0 {
                r.resumes += 1;
            }
        });
        if from > 0 {
            counter!(names::RESUMES, "fileset" => fileset.to_string(), "replica" => replica.to_string()).increment(1);
        }
    }

    /// When the file set's `verify:` schedule fires next.
    pub fn next_verify(&self, fileset: &str, at: Option<DateTime<Utc>>) {
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().next_verify = at);
    }

    /// How a verify of `replica`'s copy ended: the snapshot compared and its differences in
    /// words, or why it could not compare. Sets the verify gauges (the differences are
    /// counted and logged by `origin::verify`).
    pub fn verified(&self, fileset: &str, replica: &str, result: Result<(&str, &[String]), &str>) {
        let now = Utc::now();
        let labels = [("fileset", fileset.to_string()), ("replica", replica.to_string())];
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            let v = r.verify.get_or_insert_with(VerifyStatus::default);
            match result {
                Ok((snapshot, differences)) => {
                    v.last = Some(VerifyRun {
                        snapshot: snapshot.to_string(),
                        at: now,
                        mismatches: differences.len(),
                        differences: differences.iter().take(SHOWN_DIFFERENCES).cloned().collect(),
                    });
                    if differences.is_empty() {
                        v.last_success = Some(now);
                    }
                    v.last_error = None;
                }
                Err(message) => v.last_error = Some(ErrorStatus { at: now, message: message.to_string() }),
            }
        });
        if let Ok((_, differences)) = result {
            gauge!(names::VERIFY_LAST_MISMATCHES, &labels).set(differences.len() as f64);
            if differences.is_empty() {
                gauge!(names::VERIFY_LAST_SUCCESS, &labels).set(now.timestamp() as f64);
            }
        }
    }

    /// The replica has no room (`Some`: how much it has now), or the wait for room is over
    /// (`None`).
    pub fn waiting_for_room(&self, fileset: &str, replica: &str, room: Option<(u64, Option<u64>)>) {
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            r.waiting_for_room = room.map(|(free, needed)| RoomWait { since: r.waiting_for_room.as_ref().map_or_else(Utc::now, |w| w.since), free, needed });
        });
    }

    /// A transfer ended: `Ok(bytes)` or the error.
    pub fn transfer_finished(&self, fileset: &str, replica: &str, snapshot: &SnapshotName, result: Result<u64, String>) {
        let labels = [("fileset", fileset.to_string()), ("replica", replica.to_string())];
        self.with(|b| {
            let r = b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default();
            if let Some(running) = r.transfer.take() {
                r.sent += running.sent();
                counter!(names::BYTES_SENT, &labels).increment(running.sent());
            }
            match &result {
                Ok(bytes) => {
                    r.ok += 1;
                    r.bytes += bytes;
                    // A backfilled snapshot is older than what the replica holds already.
                    if r.newest.as_ref().is_none_or(|n| n < snapshot) {
                        r.newest = Some(snapshot.clone());
                    }
                    r.last_success = Some(Utc::now());
                    r.last_error = None;
                }
                Err(message) => {
                    r.failed += 1;
                    r.last_error = Some(ErrorStatus { at: Utc::now(), message: message.clone() });
                }
            }
        });
        match result {
            Ok(bytes) => {
                counter!(names::TRANSFERS, "fileset" => fileset.to_string(), "replica" => replica.to_string(), "result" => "ok").increment(1);
                counter!(names::BYTES_SHIPPED, &labels).increment(bytes);
                gauge!(names::LAST_SUCCESS, &labels).set(Utc::now().timestamp() as f64);
            }
            Err(_) => {
                counter!(names::TRANSFERS, "fileset" => fileset.to_string(), "replica" => replica.to_string(), "result" => "failed").increment(1);
                count_failure(fileset, Failure::Transfer);
            }
        }
    }

    /// A snapshot of `fileset` from `origin` was received here.
    pub fn received(&self, fileset: &str, origin: &str, newest: Option<&SnapshotName>, count: usize) {
        self.replica_snapshots(fileset, origin, newest, count, true);
    }

    /// Registers a file set this node is a replica of.
    pub fn receiver(&self, fileset: &str, origin: &str, newest: Option<&SnapshotName>, count: usize) {
        self.replica_snapshots(fileset, origin, newest, count, false);
    }

    /// How a prune of a replica held here ended.
    pub fn replica_pruned(&self, fileset: &str, result: Result<(), String>) {
        let error = result.as_ref().err().map(|message| ErrorStatus { at: Utc::now(), message: message.clone() });
        self.with(|b| b.receiver.entry(fileset.to_string()).or_default().last_prune_error = error);
        if result.is_err() {
            count_failure(fileset, Failure::ReplicaPrune);
        }
    }

    /// The received snapshots of `fileset` on this node that changed after they were received.
    pub fn tampered(&self, fileset: &str, names: Vec<String>) {
        gauge!(names::TAMPERED, "fileset" => fileset.to_string()).set(names.len() as f64);
        self.with(|b| b.receiver.entry(fileset.to_string()).or_default().tampered = names);
    }

    /// The policies the config in use left out (at start-up, and after each reload).
    pub fn config_loaded(&self, broken: Vec<BrokenPolicy>) {
        gauge!(names::BROKEN_POLICIES).set(broken.len() as f64);
        self.with(|b| b.config.broken = broken);
    }

    /// How a reload went: `ok` false when the new config was refused (the old one stays).
    pub fn reloaded(&self, ok: bool, message: &str) {
        counter!(names::RELOADS, "result" => if ok { "ok" } else { "refused" }).increment(1);
        self.with(|b| b.config.reload = Some(ReloadStatus { at: Utc::now(), ok, message: message.to_string() }));
    }

    /// Forgets a file set this node is no longer origin of (a reload removed it).
    pub fn forget_origin(&self, fileset: &str) {
        self.with(|b| b.origin.remove(fileset));
    }

    fn replica_snapshots(&self, fileset: &str, origin: &str, newest: Option<&SnapshotName>, count: usize, just_received: bool) {
        self.with(|b| {
            let e = b.receiver.entry(fileset.to_string()).or_default();
            e.origin = origin.to_string();
            e.newest = newest.cloned();
            e.snapshots = count;
            if just_received {
                e.last_received = Some(Utc::now());
            }
        });
        gauge!(names::SNAPSHOTS, "fileset" => fileset.to_string(), "side" => "replica").set(count as f64);
    }

    pub fn report(&self) -> StatusReport {
        let now = Utc::now();
        self.with(|b| {
            let (relayed, own): (Vec<_>, Vec<_>) = b.origin.iter().partition(|(_, e)| e.fed_by.is_some());
            let entries = |list: Vec<(&String, &OriginEntry)>| -> Vec<OriginStatus> {
                list.into_iter()
                    .map(|(fileset, e)| OriginStatus {
                        fileset: fileset.clone(),
                        mode: e.mode.clone(),
                        newest: e.snapshots.last().map(|n| n.to_string()),
                        snapshots: e.snapshots.len(),
                        rpo_seconds: e.rpo.map(|r| r.as_secs_f64()),
                        last_snapshot_error: e.last_snapshot_error.clone(),
                        last_prune_error: e.last_prune_error.clone(),
                        replicas: e
                            .replicas
                            .iter()
                            .map(|(node, r)| {
                                let lag = exposure(&e.snapshots, r.newest.as_ref(), e.unsnapshotted_change, now);
                                ReplicaStatus {
                                    node: node.clone(),
                                    newest: r.newest.as_ref().map(|n| n.to_string()),
                                    lag_seconds: lag,
                                    rpo_exceeded: over_rpo(lag, e.rpo),
                                    transfer: r.transfer.as_ref().map(|t| {
                                        let secs = t.started.elapsed().as_secs_f64().max(0.001);
                                        TransferStatus {
                                            snapshot: t.snapshot.clone(),
                                            base: t.base.clone(),
                                            bytes: t.tally.bytes(),
                                            bytes_per_second: t.sent() as f64 / secs,
                                            started: t.started_at,
                                            resumed_from: t.from,
                                        }
                                    }),
                                    last_success: r.last_success,
                                    last_error: r.last_error.clone(),
                                    transfers_ok: r.ok,
                                    transfers_failed: r.failed,
                                    bytes_shipped: r.bytes,
                                    bytes_sent: r.sent + r.transfer.as_ref().map_or(0, Running::sent),
                                    resumes: r.resumes,
                                    backfill_pending: r.backfill_pending,
                                    backfill_bytes: r.backfill_bytes,
                                    downstream: r.downstream.clone(),
                                    waiting_for_room: r.waiting_for_room.clone(),
                                    verify: r.verify.clone(),
                                }
                            })
                            .collect(),
                        fed_by: e.fed_by.clone(),
                        next_verify: e.next_verify,
                    })
                    .collect()
            };
            StatusReport {
                node: self.node.clone(),
                origin_of: entries(own),
                relay_of: entries(relayed),
                replica_of: b
                    .receiver
                    .iter()
                    .map(|(fileset, e)| ReceiverStatus {
                        fileset: fileset.clone(),
                        origin: e.origin.clone(),
                        newest: e.newest.as_ref().map(|n| n.to_string()),
                        lag_seconds: lag(&e.newest, now),
                        snapshots: e.snapshots,
                        last_received: e.last_received,
                        last_prune_error: e.last_prune_error.clone(),
                        tampered: e.tampered.clone(),
                    })
                    .collect(),
                epochs: Vec::new(),
                config: b.config.clone(),
            }
        })
    }

    /// Refreshes the lag and RPO gauges (lag grows by itself between events).
    pub fn refresh_lag_metrics(&self) {
        let report = self.report();
        for o in report.origin_of.iter().chain(&report.relay_of) {
            if let Some(rpo) = o.rpo_seconds {
                gauge!(names::RPO, "fileset" => o.fileset.clone()).set(rpo);
            }
            for r in &o.replicas {
                let labels = [("fileset", o.fileset.clone()), ("replica", r.node.clone())];
                if let Some(lag) = r.lag_seconds {
                    gauge!(names::REPLICA_LAG, &labels).set(lag);
                }
                if o.rpo_seconds.is_some() {
                    gauge!(names::RPO_EXCEEDED, &labels).set(if r.rpo_exceeded { 1.0 } else { 0.0 });
                }
            }
        }
        for r in &report.replica_of {
            if let Some(lag) = r.lag_seconds {
                gauge!(names::RECEIVED_LAG, "fileset" => r.fileset.clone(), "origin" => r.origin.clone()).set(lag);
            }
        }
    }
}

/// `hops` from the wire, kept only as far as `policy` allows: members, `depth` levels.
fn checked_hops(policy: &Policy, hops: &[Hop], depth: usize) -> Vec<Hop> {
    if depth == 0 {
        return Vec::new();
    }
    let clean = |t: &str| t.chars().filter(|c| !c.is_control()).take(500).collect::<String>();
    hops.iter()
        .filter(|h| policy.is_member(&h.node))
        .map(|h| Hop {
            node: h.node.clone(),
            newest: h.newest.as_deref().and_then(SnapshotName::parse).map(|n| n.to_string()),
            lag_seconds: h.lag_seconds,
            backfill_pending: h.backfill_pending,
            last_error: h.last_error.as_deref().map(clean),
            downstream: checked_hops(policy, &h.downstream, depth - 1),
        })
        .collect()
}

/// Metric descriptions, registered once when the exporter starts.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        names::REPLICA_LAG,
        Unit::Seconds,
        "How long ago the oldest origin change happened that a replica does not hold yet (0: it holds everything), seen from the origin"
    );
    describe_gauge!(names::RPO, Unit::Seconds, "The file set's recovery point objective (the policy's rpo)");
    describe_gauge!(names::RPO_EXCEEDED, "1 while a replica's lag exceeds the file set's rpo, else 0");
    describe_counter!(names::FAILURES, "Failures met by a file set, by what failed (on its origin: snapshot, prune, transfer; on a replica: replica_prune)");
    describe_gauge!(names::RECEIVED_LAG, Unit::Seconds, "Age of the newest snapshot received, seen from the replica");
    describe_counter!(names::BYTES_SHIPPED, Unit::Bytes, "Send stream bytes shipped to a replica (uncompressed)");
    describe_counter!(names::TRANSFERS, "Transfers to a replica, by result");
    describe_counter!(names::RESUMES, "Transfers resumed after an interruption");
    describe_gauge!(
        names::BACKFILL_PENDING,
        "Missed snapshots a replica still gets backfilled (its own retention keeps them), as last counted by the node feeding it"
    );
    describe_counter!(names::BACKFILL_BYTES, Unit::Bytes, "Send stream bytes of backfilled snapshots");
    describe_counter!(names::BYTES_SENT, Unit::Bytes, "Send stream bytes put on the wire, failed and cut attempts included");
    describe_gauge!(names::SNAPSHOTS, "Snapshots held, per side");
    describe_gauge!(names::TAMPERED, "Received snapshots on this node changed after they were received (never bases; verify shows what differs)");
    describe_gauge!(names::EPOCH, "A file set's epoch as this node knows it (0 until a promotion)");
    describe_gauge!(names::IS_ORIGIN, "1 while this node is the file set's origin, else 0");
    describe_gauge!(names::DIVERGED, "Diverged snapshots kept on this node for a file set (removed only by `snapship diverged --remove`)");
    describe_gauge!(names::BROKEN_POLICIES, "Policy files left out of the config in use (status lists each with its error)");
    describe_counter!(names::RELOADS, "Config reloads (SIGHUP), by result (ok, refused: the old config stays)");
    describe_gauge!(names::LAST_SUCCESS, Unit::Seconds, "When a transfer to a replica last succeeded (Unix time)");
    describe_counter!(names::VERIFY_MISMATCHES, "Differences verify found between the origin's copy of a snapshot and a replica's");
    describe_gauge!(names::VERIFY_LAST_SUCCESS, Unit::Seconds, "When a verify last found a replica's copy equal to the origin's (Unix time)");
    describe_gauge!(names::VERIFY_LAST_MISMATCHES, "Differences the last completed verify of a replica found (0: equal)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relays_report_of_its_downstreams_is_checked_against_the_policy() {
        let dir = std::path::Path::new("/nonexistent");
        let node = crate::config::parse_node_text(
            &dir.join("n.yaml"),
            "node: alpha\nstate_dir: s\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n  beta: 127.0.0.1:1\n  gamma: 127.0.0.1:2\npolicies: []\n",
        )
        .unwrap();
        let text = "fileset: p\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/p\nreplicas:\n  - node: beta\n    path: /b/p\n  - node: gamma\n    path: /b/p\n    from: beta\n";
        let policy = crate::config::parse_policy_text(&dir.join("p.yaml"), text, &node).unwrap();
        let hop = |node: &str, newest: &str, downstream: Vec<Hop>| Hop {
            node: node.into(),
            newest: Some(newest.into()),
            lag_seconds: Some(3),
            backfill_pending: 1,
            last_error: Some("cut\n\x1b[31mFORGED LINE".into()),
            downstream,
        };
        let deep = (0..10).fold(Vec::new(), |inner, _| vec![hop("gamma", "snapship-20260101T000000.000Z", inner)]);
        let wire = vec![hop("gamma", "../../etc", deep), hop("mallory", "snapship-20260101T000000.000Z", vec![])];
        let board = StatusBoard::new("alpha");
        board.origin("p", "snapshot", None, &["beta"]);
        board.downstream_of(&policy, "beta", &wire);
        let shown = &board.report().origin_of[0].replicas[0].downstream;
        assert_eq!(shown.len(), 1, "only members: {shown:?}");
        assert_eq!((shown[0].node.as_str(), shown[0].newest.as_ref()), ("gamma", None), "a name that is no snapshot's is dropped");
        assert!(shown[0].last_error.as_deref().is_some_and(|e| !e.chars().any(char::is_control)), "{shown:?}");
        let mut depth = 0;
        let mut at = shown;
        while let Some(h) = at.first() {
            depth += 1;
            at = &h.downstream;
        }
        assert!(depth <= policy.members().len(), "{depth} levels kept");
    }

    fn name(hms: &str) -> SnapshotName {
        SnapshotName::parse(&format!("snapship-20260101T{hms}.000Z")).unwrap()
    }

    fn at(hms: &str) -> DateTime<Utc> {
        name(hms).time()
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_change_the_replica_lacks() {
        let origin = [name("100000"), name("101000"), name("102000")];
        let now = at("103000");
        // (replica's newest, first change noticed since the origin's newest, lag)
        let cases: [(Option<&str>, Option<&str>, Option<f64>); 8] = [
            // Holds the newest, nothing changed since: current, however long ago that was.
            (Some("102000"), None, Some(0.0)),
            // Holds the newest, a change noticed 5 minutes ago.
            (Some("102000"), Some("102500"), Some(300.0)),
            // Lacks the newest: since it was taken.
            (Some("101000"), None, Some(600.0)),
            // Lacks two: since the older of them.
            (Some("100000"), None, Some(1200.0)),
            // Lacks the newest and later changes: the snapshot is the older.
            (Some("101000"), Some("102500"), Some(600.0)),
            // Holds nothing: since the origin's oldest snapshot.
            (None, None, Some(1800.0)),
            (None, Some("102500"), Some(1800.0)),
            // Newer than what the origin lists (the list is behind): nothing lacking known.
            (Some("102900"), None, Some(0.0)),
        ];
        for (replica, change, want) in cases {
            let got = exposure(&origin, replica.map(name).as_ref(), change.map(at), now);
            assert_eq!(got, want, "replica {replica:?}, change {change:?}");
        }
    }

    #[test]
    fn lag_before_anything_is_known() {
        let now = at("103000");
        assert_eq!(exposure(&[], None, None, now), None);
        // No snapshot yet, but a change seen: exposed since.
        assert_eq!(exposure(&[], None, Some(at("102900")), now), Some(60.0));
        // A change noticed "later" than now (clock step): never negative.
        assert_eq!(exposure(&[name("102000")], Some(&name("102000")), Some(at("104000")), now), Some(0.0));
    }

    #[test]
    fn rpo_exceeded_only_beyond_the_target() {
        let rpo = Some(Duration::from_secs(60));
        assert!(!over_rpo(Some(60.0), rpo));
        assert!(over_rpo(Some(60.5), rpo));
        assert!(!over_rpo(None, rpo));
        assert!(!over_rpo(Some(1e6), None));
    }

    #[test]
    fn the_board_reports_exposure_rpo_and_failures() {
        let board = StatusBoard::new("alpha");
        board.origin("projects", "continuous", Some(Duration::from_secs(2)), &["beta"]);
        let old = SnapshotName::parse("snapship-20200101T000000.000Z").unwrap();
        board.origin_snapshots("projects", std::slice::from_ref(&old));
        board.replica_has("projects", "beta", Some(&old));
        let r = || board.report().origin_of[0].clone();
        // An old snapshot, held: current, not years behind.
        assert_eq!((r().replicas[0].lag_seconds, r().replicas[0].rpo_exceeded), (Some(0.0), false));
        board.snapshot_failed("projects", "cannot take a snapshot: gone");
        board.pruned("projects", Err("cannot prune the origin: busy".into()));
        assert_eq!(r().last_snapshot_error.unwrap().message, "cannot take a snapshot: gone");
        assert_eq!(r().last_prune_error.unwrap().message, "cannot prune the origin: busy");
        // A snapshot the replica lacks, taken long ago: exposed, beyond the rpo.
        let newer = SnapshotName::parse("snapship-20200101T000001.000Z").unwrap();
        board.snapshot_taken("projects", &newer);
        board.pruned("projects", Ok(()));
        let o = r();
        assert!(o.last_snapshot_error.is_none() && o.last_prune_error.is_none(), "failures clear when it works again");
        assert_eq!((o.newest.as_deref(), o.snapshots, o.rpo_seconds), (Some(newer.to_string().as_str()), 2, Some(2.0)));
        assert!(o.replicas[0].lag_seconds.unwrap() > 1e8 && o.replicas[0].rpo_exceeded);
        // Delivered: current again.
        board.transfer_finished("projects", "beta", &newer, Ok(10));
        assert_eq!((r().replicas[0].lag_seconds, r().replicas[0].rpo_exceeded), (Some(0.0), false));
        // A change noticed: exposed from now on, once.
        board.change_noticed("projects");
        let first = board.with(|b| b.origin["projects"].unsnapshotted_change);
        board.change_noticed("projects");
        assert_eq!(board.with(|b| b.origin["projects"].unsnapshotted_change), first);
        board.change_undone("projects");
        assert_eq!(r().replicas[0].lag_seconds, Some(0.0));
    }

    #[test]
    fn a_failed_replica_prune_shows_until_one_succeeds() {
        let board = StatusBoard::new("beta");
        board.receiver("projects", "alpha", None, 0);
        board.replica_pruned("projects", Err("cannot prune the replica: busy".into()));
        let e = board.report().replica_of[0].last_prune_error.clone();
        assert_eq!(e.map(|e| e.message).as_deref(), Some("cannot prune the replica: busy"));
        board.replica_pruned("projects", Ok(()));
        assert!(board.report().replica_of[0].last_prune_error.is_none());
    }

    #[test]
    fn totals_and_the_last_error_start_from_the_state_file() {
        let board = StatusBoard::new("alpha");
        board.origin("projects", "snapshot", None, &["beta"]);
        let error = ErrorStatus { at: Utc::now(), message: "beta cannot be reached".into() };
        board.replica_history("projects", "beta", Totals { transfers_ok: 4, transfers_failed: 2, bytes_shipped: 100 }, None, Some(error.clone()));
        assert_eq!(board.report().origin_of[0].replicas[0].last_error, Some(error));
        let name = SnapshotName::parse("snapship-20200101T000000.000Z").unwrap();
        board.transfer_finished("projects", "beta", &name, Ok(10));
        let r = &board.report().origin_of[0].replicas[0];
        assert_eq!((r.transfers_ok, r.transfers_failed, r.bytes_shipped), (5, 2, 110));
        assert!(r.last_error.is_none() && r.last_success.is_some());
    }
}
