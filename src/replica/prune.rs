//! Pruning a replica: its retention, minus what must stay.
//!
//! The newest received snapshot is kept (it is the base the origin sends from next), and so
//! are the snapshot and base of a transfer in progress (a cut one, waiting to be resumed).
//! The service runs this under the file set's lock, so it never overlaps a receive.

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::relay::RelayGuard;
use super::session::Sessions;
use crate::config::Policy;
use crate::schedule::retention::{Reason, SidePlan};
use crate::snapshot::ReplicaSide;

/// The plan for the replica's snapshots; `needed`: identities a transfer still needs.
pub async fn plan(policy: &Policy, side: &dyn ReplicaSide, needed: &[String], now: DateTime<Utc>) -> Result<SidePlan> {
    let snapshots = side.list().await?;
    let mut protect: Vec<_> = snapshots.iter().filter(|s| needed.contains(&s.identity)).map(|s| (s.name.clone(), Reason::InFlight)).collect();
    protect.extend(snapshots.iter().filter(|s| crate::snapshot::is_tampered(s)).map(|s| (s.name.clone(), Reason::Tampered)));
    Ok(SidePlan::new(snapshots, policy, &policy.retention.replica, &protect, now))
}

/// Deletes what `plan` says on a replica; returns how many went.
pub async fn apply(fileset: &str, plan: &SidePlan, side: &dyn ReplicaSide) -> Result<usize> {
    let mut n = 0;
    for s in plan.doomed() {
        side.delete(s).await?;
        tracing::info!(fileset, snapshot = %s.name, "pruned on the replica");
        n += 1;
    }
    Ok(n)
}

/// Prunes a replica by its policy after a receive. An error is logged and returned for the
/// status board, never to the origin (a failed prune must not turn a good transfer into a
/// failed one). On a relay (`here` named in other replicas' `from:`), what its downstreams
/// need is kept too, and nothing is pruned while a downstream's base is unknown.
pub async fn after_receive(policy: &Policy, side: &dyn ReplicaSide, sessions: &Sessions, relays: &RelayGuard, here: &str) -> Result<(), String> {
    let planning = relays.planning(&policy.fileset.0);
    let _exclusive = planning.write().await;
    let mut needed = sessions.needs(&policy.fileset.0);
    match relays.needs(policy, here) {
        Ok(more) => needed.extend(more),
        Err(unknown) => {
            tracing::warn!(
                fileset = %policy.fileset,
                "not pruning: the common base with {} (fed by this node) is not known yet; pruning waits until it answers",
                unknown.join(", ")
            );
            return Ok(());
        }
    }
    let result = async {
        let plan = plan(policy, side, &needed, Utc::now()).await?;
        apply(&policy.fileset.0, &plan, side).await
    };
    result.await.map(|_| ()).map_err(|e| {
        tracing::error!(fileset = %policy.fileset, "pruning the replica failed: {e:#}");
        format!("cannot prune the replica: {e:#}")
    })
}
