//! Writing down how a transfer ended: the log line, the state file (on success the snapshot
//! is the replica's new common base) and the filesystem's guard on that base. `sync` and the
//! daemon's workers both come here.

use anyhow::Result;

use super::state::StateStore;
use crate::replicate::ReplicaReport;
use crate::snapshot::{OriginSide, SnapshotName};

/// Records how the transfer of `snapshot` to `replica` ended.
pub async fn outcome(state: &StateStore, origin: &dyn OriginSide, fileset: &str, replica: &str, snapshot: &SnapshotName, result: &Result<ReplicaReport>) {
    log(fileset, replica, result);
    match state.record_outcome(replica, snapshot, result.as_ref().map(|r| r.bytes)).await {
        Err(e) => tracing::error!(fileset, "cannot record the state: {e:#}"),
        Ok(Some(previous)) if result.is_ok() => {
            if let Err(e) = origin.keep_base(replica, snapshot, previous.as_ref()).await {
                tracing::warn!(fileset, replica, "cannot guard the new common base: {e:#}");
            }
        }
        Ok(_) => {}
    }
}

/// Registers a planned transfer in the state file: its snapshot and base stay protected
/// until an outcome replaces it (the replica may hold them although an answer was lost).
pub async fn in_flight(state: &StateStore, replica: &str, snapshot: &SnapshotName, base: Option<&SnapshotName>) -> Result<()> {
    let record = (snapshot.clone(), base.cloned());
    state.update(|s| s.replicas.entry(replica.to_string()).or_default().in_flight = Some(record)).await
}

fn log(fileset: &str, replica: &str, result: &Result<ReplicaReport>) {
    match result {
        Ok(r) => tracing::info!(
            fileset, replica, snapshot = %r.snapshot, base = r.base.as_deref().unwrap_or("none (full)"), bytes = r.bytes,
            secs = format!("{:.2}", r.elapsed.as_secs_f64()), "replica up to date"
        ),
        Err(e) => tracing::error!(fileset, replica, "replication failed: {e:#}"),
    }
}
