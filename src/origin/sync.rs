//! `snapship sync` without a running daemon: snapshot a file set now and bring every
//! replica up to it. A file set in a consistency group brings its whole group along: all are
//! snapshotted at one point in time, and each is shipped; one report per file set.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use tokio::sync::RwLock;

use super::{record, state::StateStore};
use crate::config::{LoadedConfig, Policy};
use crate::replicate::{self, Hooks, Plan, ReplicaReport, Step};
use crate::ship::ReplicaEndpoint;
use crate::ship::meter::Tally;
use crate::snapshot::{self, Kind, OriginSide, Snapshot, SnapshotName};

/// The outcome of one sync of a file set: the snapshot taken, then one result per replica.
#[derive(Debug)]
pub struct SyncReport {
    pub fileset: String,
    pub snapshot: Snapshot,
    pub replicas: Vec<(String, Result<ReplicaReport>)>,
}

impl SyncReport {
    pub fn failures(&self) -> usize {
        self.replicas.iter().filter(|(_, r)| r.is_err()).count()
    }
}

/// Sees each replica's stream as it starts (replica name, byte count), for progress.
pub type OnStart<'a> = &'a (dyn Fn(&str, Arc<Tally>) + Send + Sync);

/// How this node reaches a member's replicas.
pub type Endpoints<'a> = &'a dyn Fn(&Policy) -> Result<Vec<Arc<dyn ReplicaEndpoint>>>;

/// Snapshots `policy`'s file set (with its group) and brings each replica up to it.
/// `endpoints(member)`: the replicas of a member, as this node reaches them.
pub async fn sync(config: &LoadedConfig, policy: &Policy, endpoints: Endpoints<'_>, on_start: OnStart<'_>) -> Result<Vec<SyncReport>> {
    if policy.origin.node != config.node.node {
        bail!("this node is `{}`, but file set `{}` has its origin on `{}`; run sync there", config.node.node, policy.fileset, policy.origin.node);
    }
    let members = config.group_of(policy);
    let origins = members.iter().map(|p| snapshot::origin_for(p)).collect::<Result<Vec<_>>>()?;
    let endpoints = members.iter().map(|p| endpoints(p)).collect::<Result<Vec<_>>>()?;
    let snaps = if members.len() == 1 {
        let state = StateStore::open(&config.node.state_dir, &policy.fileset.0)?;
        match unshipped_and_current(origins[0].as_ref(), &state, &endpoints[0]).await {
            Some(snap) => {
                tracing::info!(fileset = %policy.fileset, snapshot = %snap.name, "nothing changed since the newest snapshot, which not every replica holds yet: shipping it");
                vec![snap]
            }
            None => vec![origins[0].take_snapshot(Kind::Scheduled).await.with_context(|| format!("file set `{}`: cannot take a snapshot", policy.fileset))?],
        }
    } else {
        let sides: Vec<(&str, &dyn OriginSide)> = members.iter().zip(&origins).map(|(p, o)| (p.origin.path.as_str(), o.as_ref())).collect();
        snapshot::take_group(policy.backend, &sides, Kind::Scheduled)
            .await
            .with_context(|| format!("group `{}`: cannot take the snapshots", policy.group.as_ref().expect("a group")))?
    };
    let stall = config.node.transfers.stall_timeout.0;
    let mut reports = Vec::new();
    for (((member, origin), snap), eps) in members.iter().zip(&origins).zip(snaps).zip(&endpoints) {
        tracing::info!(fileset = %member.fileset, snapshot = %snap.name, "snapshot taken");
        let state = StateStore::open(&config.node.state_dir, &member.fileset.0)?;
        let hooks = OneShot { fileset: &member.fileset.0, origin: origin.as_ref(), state: &state, planning: RwLock::new(()), on_start };
        let jobs = eps.iter().map(|ep| async {
            let result = replicate::bring_up_to_date(origin.as_ref(), &snap, ep.as_ref(), stall, &hooks).await;
            (ep.node().to_string(), result)
        });
        let replicas = futures::future::join_all(jobs).await;
        reports.push(SyncReport { fileset: member.fileset.0.clone(), snapshot: snap, replicas });
    }
    // Each replica is told the connection is over, rather than left to its idle timeout.
    for ep in endpoints.iter().flatten() {
        ep.close().await;
    }
    Ok(reports)
}

/// The origin's newest snapshot when some replica is not known to hold it (a sync before
/// this one failed) and nothing changed since it was taken: then this sync ships it rather
/// than take another, so failed syncs retried do not pile up snapshots (and a cut transfer
/// of it resumes). `None`: take a new snapshot.
async fn unshipped_and_current(origin: &dyn OriginSide, state: &StateStore, replicas: &[Arc<dyn ReplicaEndpoint>]) -> Option<Snapshot> {
    let newest = origin.list().await.ok()?.pop()?;
    let known = state.get().await;
    let everywhere = replicas.iter().all(|r| known.replicas.get(r.node()).and_then(|s| s.base.as_ref()) == Some(&newest.name));
    if everywhere {
        return None;
    }
    // Flushed first: a write still in the page cache counts as a change.
    matches!(origin.changed_since(&newest, true).await, Ok(false)).then_some(newest)
}

/// What a one-shot sync does around each transfer: progress, and the state file.
struct OneShot<'a> {
    fileset: &'a str,
    origin: &'a dyn OriginSide,
    state: &'a StateStore,
    /// Nothing prunes while a sync runs without a daemon (it holds the state lock): a lock of
    /// its own is enough.
    planning: RwLock<()>,
    on_start: OnStart<'a>,
}

#[async_trait]
impl Hooks for OneShot<'_> {
    fn planning(&self) -> &RwLock<()> {
        &self.planning
    }

    async fn planned(&self, replica: &str, step: &Step) -> Result<()> {
        match &step.plan {
            Plan::Send { base, .. } => record::in_flight(self.state, replica, &step.snapshot.name, base.as_ref().map(|b| &b.name)).await,
            Plan::AlreadyThere => Ok(()),
        }
    }

    fn started(&self, replica: &str, _step: &Step, tally: Arc<Tally>, _from: u64) {
        (self.on_start)(replica, tally);
    }

    async fn finished(&self, replica: &str, snapshot: &SnapshotName, result: &Result<ReplicaReport>) {
        record::outcome(self.state, self.origin, self.fileset, replica, snapshot, result).await;
    }
}
