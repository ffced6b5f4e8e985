//! The names of the Prometheus metrics, in one place: dashboards and alert rules depend on
//! them, so a name changes here or nowhere.

/// Gauge: how long ago the oldest origin change happened that a replica does not hold yet
/// (seconds; 0 while it holds everything), seen from the origin.
pub const REPLICA_LAG: &str = "snapship_replica_lag_seconds";
/// Gauge: a file set's recovery point objective, the policy's `rpo` (seconds).
pub const RPO: &str = "snapship_rpo_seconds";
/// Gauge: 1 while a replica's lag exceeds its file set's `rpo`, else 0.
pub const RPO_EXCEEDED: &str = "snapship_rpo_exceeded";
/// Counter: failures met by a file set, labelled by `what`: on its origin `snapshot`,
/// `prune`, `transfer`; on a replica's node `replica_prune`.
pub const FAILURES: &str = "snapship_failures_total";
/// Gauge: age of the newest snapshot received, seen from the replica (seconds).
pub const RECEIVED_LAG: &str = "snapship_received_lag_seconds";
/// Counter: send stream bytes shipped to a replica (uncompressed).
pub const BYTES_SHIPPED: &str = "snapship_bytes_shipped_total";
/// Counter: transfers to a replica, labelled by `result` (ok, failed).
pub const TRANSFERS: &str = "snapship_transfers_total";
/// Counter: transfers resumed after an interruption.
pub const RESUMES: &str = "snapship_resumes_total";
/// Counter: send stream bytes put on the wire, failed and cut attempts included.
pub const BYTES_SENT: &str = "snapship_bytes_sent_total";
/// Gauge: snapshots held, labelled by `side` (origin, replica).
pub const SNAPSHOTS: &str = "snapship_snapshots";
/// Gauge: when a transfer to a replica last succeeded (Unix time).
pub const LAST_SUCCESS: &str = "snapship_last_success_timestamp_seconds";
/// Gauge: when this node's TLS certificate (`tls.cert`) expires (Unix time, its notAfter);
/// set once at daemon start, so a renewed certificate shows after the restart that loads it.
pub const CERTIFICATE_EXPIRY: &str = "snapship_certificate_expiry_timestamp_seconds";
/// Counter: differences `snapship verify` found between the origin's copy of a snapshot and
/// a replica's, labelled by `fileset` and `replica`.
pub const VERIFY_MISMATCHES: &str = "snapship_verify_mismatches_total";
/// Gauge: when a verify run by the origin's daemon (scheduled by `verify:`, or asked for)
/// last found a replica's copy equal to the origin's (Unix time).
pub const VERIFY_LAST_SUCCESS: &str = "snapship_verify_last_success_timestamp_seconds";
/// Gauge: differences the last completed verify of a replica found (0: equal); stays up
/// until a verify finds the copies equal again.
pub const VERIFY_LAST_MISMATCHES: &str = "snapship_verify_last_mismatches";
/// Gauge: policy files the daemon left out because they are broken (status names each).
pub const BROKEN_POLICIES: &str = "snapship_broken_policies";
/// Counter: config reloads (SIGHUP), labelled by `result` (ok, refused).
pub const RELOADS: &str = "snapship_config_reloads_total";
/// Gauge: a file set's epoch as this node knows it (0 until a promotion).
pub const EPOCH: &str = "snapship_epoch";
/// Gauge: 1 while this node is a file set's origin, else 0.
pub const IS_ORIGIN: &str = "snapship_is_origin";
/// Gauge: diverged snapshots (or datasets) kept on this node for a file set; only the admin
/// removes them (`snapship diverged --remove`).
pub const DIVERGED: &str = "snapship_diverged_kept";
/// Gauge: received snapshots of a file set on this node that changed after they were
/// received (made writable behind snapship's back): never bases, never pruned.
pub const TAMPERED: &str = "snapship_tampered_snapshots";
/// Gauge: missed snapshots a replica still gets backfilled (its retention keeps them), as
/// last counted by the node that feeds it.
pub const BACKFILL_PENDING: &str = "snapship_backfill_pending";
/// Counter: send stream bytes of backfilled snapshots.
pub const BACKFILL_BYTES: &str = "snapship_backfill_bytes_total";
