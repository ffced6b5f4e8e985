//! Pruning the origin: its retention, minus what must stay.
//!
//! The newest snapshot, every replica's common base (from the state file, so also while a
//! replica is away and across restarts) and transfers in flight are kept. Only snapshots
//! snapship made are ever listed, so only those are ever deleted.

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::state::FilesetState;
use crate::config::Policy;
use crate::schedule::retention::{Reason, SidePlan};
use crate::snapshot::{OriginSide, SnapshotName};

/// What a [`FilesetState`] protects on the origin: each replica's base and in-flight transfer.
pub fn protections(state: &FilesetState) -> Vec<(SnapshotName, Reason)> {
    let mut out = Vec::new();
    for (replica, r) in &state.replicas {
        if let Some(base) = &r.base {
            out.push((base.clone(), Reason::CommonBase(replica.clone())));
        }
        if let Some((sending, base)) = &r.in_flight {
            for name in std::iter::once(sending).chain(base.iter()) {
                out.push((name.clone(), Reason::InFlight));
            }
        }
    }
    out
}

/// The plan for the origin's snapshots, keeping `protect`.
pub async fn plan(policy: &Policy, origin: &dyn OriginSide, protect: &[(SnapshotName, Reason)], now: DateTime<Utc>) -> Result<SidePlan> {
    let snapshots = origin.list().await?;
    Ok(SidePlan::new(snapshots, policy, &policy.retention.origin, protect, now))
}

/// Deletes what `plan` says on the origin; returns how many went.
pub async fn apply(fileset: &str, plan: &SidePlan, origin: &dyn OriginSide) -> Result<usize> {
    let mut n = 0;
    for s in plan.doomed() {
        origin.delete(s).await?;
        tracing::info!(fileset, snapshot = %s.name, "pruned on the origin");
        n += 1;
    }
    Ok(n)
}
