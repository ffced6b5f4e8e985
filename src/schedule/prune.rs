//! Carrying out retention on one side of a file set, and the protections each side adds.
//!
//! Origin: the newest snapshot, every replica's common base and transfers in flight (from the
//! state file and, in the daemon, from its workers) are kept. Replica: the newest received
//! snapshot is kept; it is the common base the origin will send from next (the origin keeps
//! its side of it too). Only snapshots snapship made are ever listed, so only those are
//! ever deleted.

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::retention::{self, Entry, Reason};
use crate::config::{Mode, Policy};
use crate::snapshot::{OriginSide, ReplicaSide, Snapshot, SnapshotName};
use crate::state::FilesetState;

/// One side's snapshots and the plan for them.
pub struct SidePlan {
    pub snapshots: Vec<Snapshot>,
    pub entries: Vec<Entry>,
}

/// What a [`FilesetState`] protects on the origin: each replica's base and in-flight transfer.
pub fn origin_protections(state: &FilesetState) -> Vec<(SnapshotName, Reason)> {
    let mut out = Vec::new();
    for (replica, r) in &state.replicas {
        if let Some(base) = r.base.as_deref().and_then(SnapshotName::parse) {
            out.push((base, Reason::CommonBase(replica.clone())));
        }
        if let Some((sending, base)) = &r.in_flight {
            for name in std::iter::once(sending).chain(base.iter()) {
                if let Some(n) = SnapshotName::parse(name) {
                    out.push((n, Reason::InFlight));
                }
            }
        }
    }
    out
}

pub async fn plan_origin(policy: &Policy, origin: &dyn OriginSide, protect: &[(SnapshotName, Reason)], now: DateTime<Utc>) -> Result<SidePlan> {
    let snapshots = origin.list().await?;
    Ok(plan_side(snapshots, policy, &policy.retention.origin, protect, now))
}

pub async fn plan_replica(policy: &Policy, side: &dyn ReplicaSide, now: DateTime<Utc>) -> Result<SidePlan> {
    let snapshots = side.list().await?;
    Ok(plan_side(snapshots, policy, &policy.retention.replica, &[], now))
}

fn plan_side(snapshots: Vec<Snapshot>, policy: &Policy, rules: &crate::config::Retention, protect: &[(SnapshotName, Reason)], now: DateTime<Utc>) -> SidePlan {
    let names: Vec<SnapshotName> = snapshots.iter().map(|s| s.name.clone()).collect();
    let entries = retention::plan(&names, rules, policy.mode == Mode::Hybrid, now, protect);
    SidePlan { snapshots, entries }
}

impl SidePlan {
    /// The snapshots the plan deletes.
    pub fn doomed(&self) -> impl Iterator<Item = &Snapshot> {
        self.entries.iter().filter(|e| e.delete()).filter_map(|e| self.snapshots.iter().find(|s| s.name == e.name))
    }
}

/// Deletes what `plan` says on the origin; returns how many went.
pub async fn apply_origin(fileset: &str, plan: &SidePlan, origin: &dyn OriginSide) -> Result<usize> {
    apply(fileset, plan, Side::Origin(origin)).await
}

/// Deletes what `plan` says on a replica; returns how many went.
pub async fn apply_replica(fileset: &str, plan: &SidePlan, side: &dyn ReplicaSide) -> Result<usize> {
    apply(fileset, plan, Side::Replica(side)).await
}

/// The side a plan is carried out on.
enum Side<'a> {
    Origin(&'a dyn OriginSide),
    Replica(&'a dyn ReplicaSide),
}

async fn apply(fileset: &str, plan: &SidePlan, side: Side<'_>) -> Result<usize> {
    let mut n = 0;
    for s in plan.doomed() {
        match side {
            Side::Origin(o) => o.delete(s).await?,
            Side::Replica(r) => r.delete(s).await?,
        }
        let where_ = if matches!(side, Side::Origin(_)) { "origin" } else { "replica" };
        tracing::info!(fileset, snapshot = %s.name, "pruned on the {where_}");
        n += 1;
    }
    Ok(n)
}

/// Prunes a replica by its policy after a receive; errors are logged, not returned (a failed
/// prune must not turn a good transfer into a failed one).
pub async fn prune_replica_after_receive(policy: &Policy, side: &dyn ReplicaSide) {
    let result = async {
        let plan = plan_replica(policy, side, Utc::now()).await?;
        apply_replica(&policy.fileset.0, &plan, side).await
    };
    if let Err(e) = result.await {
        tracing::error!(fileset = %policy.fileset, "pruning the replica failed: {e:#}");
    }
}

/// `snapship prune`: the plan for one side of one file set, and whether it may be applied.
pub struct PruneReport {
    pub side: &'static str,
    pub fileset: String,
    pub plan: SidePlan,
    /// Why this side must not be pruned now, if so.
    pub blocked: Option<String>,
}

/// Plans every side of `policies` held on this node. On an origin, each replica's common
/// base is learned live where the replica answers, else from the state file; a replica with
/// neither blocks pruning of that origin (its base would be unknown).
pub async fn plan_node(config: &crate::config::LoadedConfig, policies: &[&Policy]) -> Result<Vec<PruneReport>> {
    let here = &config.node.node;
    let mut out = Vec::new();
    let mut connector = None;
    for policy in policies {
        if policy.origin.node == *here {
            let origin = crate::snapshot::origin_for(policy)?;
            let state = crate::state::StateStore::read(&crate::state::StateStore::path_for(&config.node.state_dir, &policy.fileset.0))?;
            let mut protect = origin_protections(&state);
            let held = origin.list().await?;
            let mut blocked = Vec::new();
            for ep in crate::replicate::endpoints(config, policy, &mut connector)? {
                let live = tokio::time::timeout(std::time::Duration::from_secs(10), ep.list()).await;
                match live {
                    Ok(Ok(has)) => {
                        if let Some(base) = crate::snapshot::common_base(&held, &has) {
                            protect.push((base.name.clone(), Reason::CommonBase(ep.node().to_string())));
                        }
                    }
                    _ if state.replicas.get(ep.node()).is_some_and(|r| r.base.is_some()) => {}
                    _ => blocked.push(format!("replica `{}` does not answer and no common base with it is recorded", ep.node())),
                }
            }
            let plan = plan_side(held, policy, &policy.retention.origin, &protect, Utc::now());
            out.push(PruneReport { side: "origin", fileset: policy.fileset.0.clone(), plan, blocked: (!blocked.is_empty()).then(|| blocked.join("; ")) });
        }
        if let Some(replica) = policy.replica_on(here) {
            let side = crate::snapshot::replica_for(policy, replica)?;
            let plan = plan_replica(policy, side.as_ref(), Utc::now()).await?;
            out.push(PruneReport { side: "replica", fileset: policy.fileset.0.clone(), plan, blocked: None });
        }
    }
    Ok(out)
}

/// Applies the reports that are not blocked; returns how many snapshots went.
pub async fn apply_reports(config: &crate::config::LoadedConfig, reports: &[PruneReport]) -> Result<usize> {
    let mut n = 0;
    for r in reports.iter().filter(|r| r.blocked.is_none()) {
        let policy = config.policy(&r.fileset).expect("planned from these policies");
        n += if r.side == "origin" {
            apply_origin(&r.fileset, &r.plan, crate::snapshot::origin_for(policy)?.as_ref()).await?
        } else {
            let replica = policy.replica_on(&config.node.node).expect("planned as a replica");
            apply_replica(&r.fileset, &r.plan, crate::snapshot::replica_for(policy, replica)?.as_ref()).await?
        };
    }
    Ok(n)
}
