//! What the daemon is doing, for `snapship status` and for Prometheus.
//!
//! The origin loops and the replica server report events to one [`StatusBoard`]: snapshots
//! taken, transfers started (with a live byte count) and finished, snapshots received. The
//! board answers `status` requests on the control socket with a [`StatusReport`] and keeps
//! the Prometheus metrics current (the lag gauges are refreshed every second, since lag grows
//! by itself).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};

use super::metrics as names;
use crate::ship::meter::Tally;
use crate::snapshot::SnapshotName;

/// The answer to `snapship status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub node: String,
    pub origin_of: Vec<OriginStatus>,
    pub replica_of: Vec<ReceiverStatus>,
    /// Per file set this node is a member of: who is origin, since which promotion, and the
    /// diverged data kept here.
    #[serde(default)]
    pub epochs: Vec<EpochStatus>,
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
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub node: String,
    /// The newest snapshot the replica holds from us: the common base of the next transfer.
    pub newest: Option<String>,
    /// Age of `newest`, in seconds.
    pub lag_seconds: Option<f64>,
    pub transfer: Option<TransferStatus>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<ErrorStatus>,
    pub transfers_ok: u64,
    pub transfers_failed: u64,
    /// Stream bytes of the snapshots delivered.
    pub bytes_shipped: u64,
    /// Stream bytes put on the wire, failed and cut attempts included: what exceeds
    /// `bytes_shipped` was sent more than once.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Transfers that went on from where a cut one stopped.
    #[serde(default)]
    pub resumes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TransferStatus {
    pub snapshot: String,
    pub base: Option<String>,
    pub bytes: u64,
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
    pub lag_seconds: Option<f64>,
    pub snapshots: usize,
    pub last_received: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Board {
    origin: BTreeMap<String, OriginEntry>,
    receiver: BTreeMap<String, ReceiverEntry>,
}

#[derive(Default)]
struct OriginEntry {
    mode: String,
    newest: Option<SnapshotName>,
    snapshots: usize,
    replicas: BTreeMap<String, ReplicaEntry>,
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
}

pub struct StatusBoard {
    node: String,
    board: Mutex<Board>,
}

fn lag(newest: &Option<SnapshotName>, now: DateTime<Utc>) -> Option<f64> {
    newest.as_ref().map(|n| (now - n.time()).num_milliseconds().max(0) as f64 / 1000.0)
}

impl StatusBoard {
    pub fn new(node: &str) -> Arc<StatusBoard> {
        Arc::new(StatusBoard { node: node.to_string(), board: Mutex::default() })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Board) -> T) -> T {
        f(&mut self.board.lock().expect("status board lock"))
    }

    /// Registers a file set this node is origin of, with its replicas.
    pub fn origin(&self, fileset: &str, mode: &str, replicas: &[&str]) {
        self.with(|b| {
            let e = b.origin.entry(fileset.to_string()).or_default();
            e.mode = mode.to_string();
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

    /// The origin's snapshots now: the newest and how many.
    pub fn origin_snapshots(&self, fileset: &str, newest: Option<&SnapshotName>, count: usize) {
        self.with(|b| {
            let e = b.origin.entry(fileset.to_string()).or_default();
            e.newest = newest.cloned();
            e.snapshots = count;
        });
        gauge!(names::SNAPSHOTS, "fileset" => fileset.to_string(), "side" => "origin").set(count as f64);
    }

    /// What a replica holds from us, as last learned.
    pub fn replica_has(&self, fileset: &str, replica: &str, newest: Option<&SnapshotName>) {
        self.with(|b| b.origin.entry(fileset.to_string()).or_default().replicas.entry(replica.to_string()).or_default().newest = newest.cloned());
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
                    r.newest = Some(snapshot.clone());
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
            Err(_) => counter!(names::TRANSFERS, "fileset" => fileset.to_string(), "replica" => replica.to_string(), "result" => "failed").increment(1),
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
        self.with(|b| StatusReport {
            node: self.node.clone(),
            origin_of: b
                .origin
                .iter()
                .map(|(fileset, e)| OriginStatus {
                    fileset: fileset.clone(),
                    mode: e.mode.clone(),
                    newest: e.newest.as_ref().map(|n| n.to_string()),
                    snapshots: e.snapshots,
                    replicas: e
                        .replicas
                        .iter()
                        .map(|(node, r)| ReplicaStatus {
                            node: node.clone(),
                            newest: r.newest.as_ref().map(|n| n.to_string()),
                            lag_seconds: lag(&r.newest, now),
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
                        })
                        .collect(),
                })
                .collect(),
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
                })
                .collect(),
            epochs: Vec::new(),
        })
    }

    /// Refreshes the lag gauges (they grow by themselves between events).
    pub fn refresh_lag_metrics(&self) {
        let report = self.report();
        for o in &report.origin_of {
            for r in &o.replicas {
                if let Some(lag) = r.lag_seconds {
                    gauge!(names::REPLICA_LAG, "fileset" => o.fileset.clone(), "replica" => r.node.clone()).set(lag);
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

/// Metric descriptions, registered once when the exporter starts.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(names::REPLICA_LAG, Unit::Seconds, "Age of the newest snapshot a replica holds, seen from the origin");
    describe_gauge!(names::RECEIVED_LAG, Unit::Seconds, "Age of the newest snapshot received, seen from the replica");
    describe_counter!(names::BYTES_SHIPPED, Unit::Bytes, "Send stream bytes shipped to a replica (uncompressed)");
    describe_counter!(names::TRANSFERS, "Transfers to a replica, by result");
    describe_counter!(names::RESUMES, "Transfers resumed after an interruption");
    describe_counter!(names::BYTES_SENT, Unit::Bytes, "Send stream bytes put on the wire, failed and cut attempts included");
    describe_gauge!(names::SNAPSHOTS, "Snapshots held, per side");
    describe_gauge!(names::LAST_SUCCESS, Unit::Seconds, "When a transfer to a replica last succeeded (Unix time)");
}
