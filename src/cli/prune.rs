//! `snapship prune`: plans every side of the file sets this node holds, prints why each
//! snapshot is kept, and carries the plans out (each role's own planner and protections).

use std::sync::Arc;

use anyhow::Result;
use chrono::Utc;

use crate::config::{LoadedConfig, Policy};
use crate::origin::state::StateStore;
use crate::schedule::retention::{Reason, SidePlan};
use crate::ship::local::LocalLink;
use crate::snapshot::{self, common_base};
use crate::store::EpochStore;

/// The plan for one side of one file set, and whether it may be applied.
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
pub async fn plan_node(config: &Arc<LoadedConfig>, policies: &[&Policy], local: &LocalLink, epochs: &Arc<EpochStore>) -> Result<Vec<PruneReport>> {
    let here = &config.node.node;
    let mut out = Vec::new();
    let mut connector = None;
    for policy in policies {
        if policy.origin.node == *here {
            let origin = snapshot::origin_for(policy)?;
            let state = StateStore::read(&StateStore::path_for(&config.node.state_dir, &policy.fileset.0))?;
            let mut protect = crate::origin::prune::protections(&state);
            let held = origin.list().await?;
            let mut blocked = Vec::new();
            for ep in crate::node::endpoints(config, policy, &mut connector, local, epochs)? {
                let live = tokio::time::timeout(std::time::Duration::from_secs(10), ep.list()).await;
                match live {
                    Ok(Ok(listing)) => {
                        if let Some(base) = common_base(&held, &listing.snapshots) {
                            protect.push((base.name.clone(), Reason::CommonBase(ep.node().to_string())));
                        }
                    }
                    _ if state.replicas.get(ep.node()).is_some_and(|r| r.base.is_some()) => {}
                    _ => blocked.push(format!("replica `{}` does not answer and no common base with it is recorded", ep.node())),
                }
            }
            let plan = SidePlan::new(held, policy, &policy.retention.origin, &protect, Utc::now());
            out.push(PruneReport { side: "origin", fileset: policy.fileset.0.clone(), plan, blocked: (!blocked.is_empty()).then(|| blocked.join("; ")) });
        }
        if let Some(replica) = policy.replica_on(here) {
            let side = snapshot::replica_for(policy, replica)?;
            // A relay keeps what the replicas it feeds need (their bases, as last recorded).
            let (needed, blocked) = match crate::replica::relay::RelayGuard::new(&config.node.state_dir).needs(policy, &here.0) {
                Ok(needed) => (needed, None),
                Err(unknown) => (Vec::new(), Some(format!("the common base with {} (fed by this node) is not recorded yet", unknown.join(", ")))),
            };
            let plan = crate::replica::prune::plan(policy, side.as_ref(), &needed, Utc::now()).await?;
            out.push(PruneReport { side: "replica", fileset: policy.fileset.0.clone(), plan, blocked });
        }
    }
    Ok(out)
}

/// Applies the reports that are not blocked; returns how many snapshots went.
pub async fn apply_reports(config: &LoadedConfig, reports: &[PruneReport]) -> Result<usize> {
    let mut n = 0;
    for r in reports.iter().filter(|r| r.blocked.is_none()) {
        let policy = config.policy(&r.fileset).expect("planned from these policies");
        n += if r.side == "origin" {
            crate::origin::prune::apply(&r.fileset, &r.plan, snapshot::origin_for(policy)?.as_ref()).await?
        } else {
            let replica = policy.replica_on(&config.node.node).expect("planned as a replica");
            crate::replica::prune::apply(&r.fileset, &r.plan, snapshot::replica_for(policy, replica)?.as_ref()).await?
        };
    }
    Ok(n)
}
