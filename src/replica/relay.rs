//! Relaying (cascades, A → B → C): a replica that other replicas name in `from:` forwards
//! every snapshot it received to them, node replicas and object stores alike (a store is one
//! more `ReplicaEndpoint`).
//!
//! The relay's send side is its own replica directory ([`crate::snapshot::relay_on`]): a
//! received btrfs snapshot sends with the origin's identity (its `received_uuid`), a received
//! ZFS snapshot keeps the origin's guid (sent with `-I` from the replica dataset), so the
//! downstream's copies carry the origin's identities and every member shares common bases.
//! Each downstream gets one worker running the replication loop the origin's workers run
//! ([`replicate::follow`]: newest first, then backfill, resume, stall and bandwidth limits
//! of `ship::PeerReplica`), woken whenever the replica service commits a receive.
//!
//! The relay works only while the epoch names another node as origin (a relay promoted to
//! origin feeds its downstreams from its origin job instead), and never towards the origin
//! itself. Its pruning (the replica service's, after each receive) keeps what the
//! downstreams need ([`RelayGuard`]): each one's newest common base, kept in
//! `state_dir/relay/FILESET.json` across restarts, and the snapshot and base of a transfer in
//! flight; while a downstream's base is unknown (never reached, no record), the relay does
//! not prune at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Policy;
use crate::observe::status::StatusBoard;
use crate::replicate::{self, Hooks, Plan, ReplicaReport, Step};
use crate::ship::ReplicaEndpoint;
use crate::ship::client::Fenced;
use crate::ship::meter::Tally;
use crate::snapshot::{OriginSide, Snapshot, SnapshotName};
use crate::store::{self, EpochStore};

/// How often a relay looks at what it holds even without news of a receive (a receive
/// before the relay started, a snapshot deleted by hand).
const RESCAN: Duration = Duration::from_secs(30);

/// What a relay's downstreams need kept, per file set: shared by the relay's workers (which
/// register it) and the replica service's pruning (which keeps it).
pub struct RelayGuard {
    dir: PathBuf,
    inner: Mutex<BTreeMap<String, Fileset>>,
}

#[derive(Default)]
struct Fileset {
    /// Planning a transfer (read) and pruning (write) exclude each other.
    planning: Arc<RwLock<()>>,
    downstreams: BTreeMap<String, Downstream>,
    /// What other transfers from this node need kept while they run (a snapshot shipped to a
    /// member that fetched it, and its base), by [`Kept`] handle; not kept on disk.
    kept: BTreeMap<u64, Vec<String>>,
    next_kept: u64,
    loaded: bool,
}

/// Identities pruning keeps while this lives ([`RelayGuard::keep`]).
pub struct Kept {
    guard: Arc<RelayGuard>,
    fileset: String,
    id: u64,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.guard.with(&self.fileset, |f| f.kept.remove(&self.id));
    }
}

/// One downstream's newest common base (kept on disk) and its transfer in flight.
#[derive(Default, Clone, Serialize, Deserialize)]
struct Downstream {
    base: Option<Held>,
    #[serde(skip)]
    in_flight: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Held {
    name: SnapshotName,
    identity: String,
}

impl RelayGuard {
    pub fn new(state_dir: &Path) -> Arc<RelayGuard> {
        Arc::new(RelayGuard { dir: state_dir.join("relay"), inner: Mutex::default() })
    }

    fn path(&self, fileset: &str) -> PathBuf {
        self.dir.join(format!("{fileset}.json"))
    }

    /// Runs `f` on `fileset`'s entry, read from disk on first use.
    fn with<T>(&self, fileset: &str, f: impl FnOnce(&mut Fileset) -> T) -> T {
        let mut inner = self.inner.lock().expect("relay guard lock");
        let entry = inner.entry(fileset.to_string()).or_default();
        if !entry.loaded {
            entry.loaded = true;
            match std::fs::read(self.path(fileset)) {
                Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, Downstream>>(&bytes) {
                    Ok(kept) => entry.downstreams = kept,
                    Err(e) => tracing::warn!(fileset, "ignoring the unreadable {}: {e}", self.path(fileset).display()),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(fileset, "cannot read {}: {e}", self.path(fileset).display()),
            }
        }
        f(entry)
    }

    /// The lock that planning a relay transfer reads and pruning writes.
    pub fn planning(&self, fileset: &str) -> Arc<RwLock<()>> {
        self.with(fileset, |f| f.planning.clone())
    }

    /// What this node's pruning of `policy`'s file set must keep for its downstreams (the
    /// replicas naming `here` in `from:`): identities; or, when a downstream's base is not
    /// known yet, the names of those downstreams (then nothing may be pruned).
    pub fn needs(&self, policy: &Policy, here: &str) -> std::result::Result<Vec<String>, Vec<String>> {
        let downstreams = relayed_to(policy, here);
        self.with(&policy.fileset.0, |f| {
            let unknown: Vec<String> = downstreams.iter().filter(|d| f.downstreams.get(**d).is_none_or(|d| d.base.is_none())).map(|d| d.to_string()).collect();
            if !unknown.is_empty() {
                return Err(unknown);
            }
            let current = f.downstreams.iter().filter(|(name, _)| downstreams.contains(&name.as_str())).map(|(_, d)| d);
            let kept = f.kept.values().flatten().cloned();
            Ok(current.flat_map(|d| d.base.iter().map(|b| b.identity.clone()).chain(d.in_flight.iter().cloned())).chain(kept).collect())
        })
    }

    /// Keeps `identities` of `fileset` from pruning until the handle is dropped (a transfer
    /// that is not a downstream's: a snapshot shipped to the member that fetched it).
    /// Register it under a read of [`planning`](Self::planning), as a planned step does.
    pub fn keep(self: &Arc<Self>, fileset: &str, identities: Vec<String>) -> Kept {
        let id = self.with(fileset, |f| {
            f.next_kept += 1;
            f.kept.insert(f.next_kept, identities);
            f.next_kept
        });
        Kept { guard: self.clone(), fileset: fileset.to_string(), id }
    }

    /// A transfer to `downstream` is planned: what it holds in common with us is now known,
    /// and the step's snapshot and base stay kept until it ends.
    fn planned(&self, fileset: &str, downstream: &str, step: &Step) -> Result<()> {
        let (known, in_flight) = match &step.plan {
            Plan::AlreadyThere => (Some(&step.snapshot), Vec::new()),
            Plan::Send { base, .. } => (base.as_ref(), std::iter::once(&step.snapshot).chain(base.as_ref()).map(|s| s.identity.clone()).collect()),
        };
        self.update(fileset, downstream, |d| {
            if let Some(k) = known.filter(|_| !step.backfill) {
                d.base = Some(Held { name: k.name.clone(), identity: k.identity.clone() });
            }
            d.in_flight = in_flight;
        })
    }

    /// A transfer of `snapshot` to `downstream` succeeded: it is the new common base if newer.
    fn delivered(&self, fileset: &str, downstream: &str, snapshot: &Snapshot) -> Result<()> {
        self.update(fileset, downstream, |d| {
            d.in_flight.clear();
            if d.base.as_ref().is_none_or(|b| b.name <= snapshot.name) {
                d.base = Some(Held { name: snapshot.name.clone(), identity: snapshot.identity.clone() });
            }
        })
    }

    fn update(&self, fileset: &str, downstream: &str, change: impl FnOnce(&mut Downstream)) -> Result<()> {
        let bytes = self.with(fileset, |f| {
            change(f.downstreams.entry(downstream.to_string()).or_default());
            serde_json::to_vec_pretty(&f.downstreams)
        })?;
        store::write_atomically(&self.path(fileset), &bytes)
    }
}

/// The replicas naming `here` in `from:`: nodes, and object stores (which the relay uploads
/// to as the origin would).
pub fn relayed_to<'a>(policy: &'a Policy, here: &str) -> Vec<&'a str> {
    let nodes = policy.replicas.iter().filter(|r| r.from.as_ref().is_some_and(|f| f.0 == here)).map(|r| r.node.0.as_str());
    let stores = policy.object_stores.iter().filter(|s| s.from.as_ref().is_some_and(|f| f.0 == here)).map(|s| s.name.0.as_str());
    nodes.chain(stores).collect()
}

/// The relay of one file set on this node, feeding the replicas that name it in `from:`.
pub struct RelayJob {
    pub policy: Policy,
    here: String,
    /// This node's received snapshots, as a send side.
    side: Arc<dyn OriginSide>,
    downstreams: Vec<Arc<dyn ReplicaEndpoint>>,
    epochs: Arc<EpochStore>,
    guard: Arc<RelayGuard>,
    status: Arc<StatusBoard>,
    /// Ticks after each receive the replica service committed.
    received: watch::Receiver<u64>,
    stall: Duration,
}

impl RelayJob {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: Policy,
        here: &str,
        side: Arc<dyn OriginSide>,
        downstreams: Vec<Arc<dyn ReplicaEndpoint>>,
        epochs: Arc<EpochStore>,
        guard: Arc<RelayGuard>,
        status: Arc<StatusBoard>,
        received: watch::Receiver<u64>,
        stall: Duration,
    ) -> RelayJob {
        RelayJob { policy, here: here.to_string(), side, downstreams, epochs, guard, status, received, stall }
    }

    /// Whether this node relays to `downstream` in the current epoch: it is not the origin
    /// itself, and `downstream` is not either.
    fn active(&self, downstream: &str) -> bool {
        self.epochs.current(&self.policy).is_ok_and(|e| e.origin != self.here && e.origin != downstream)
    }

    /// Runs until `shutdown`: one worker per downstream, and the watch of what this node holds.
    ///
    /// # Cancel safety
    /// Transfers in flight at `shutdown` are dropped; the downstream keeps what it received
    /// for a resume.
    pub async fn run(self, shutdown: CancellationToken) {
        let job = Arc::new(self);
        let fileset = job.policy.fileset.0.clone();
        let names: Vec<&str> = job.downstreams.iter().map(|d| d.node()).collect();
        let fed_by = job.epochs.current(&job.policy).map(|e| e.origin).unwrap_or_default();
        let fed_by = job.policy.feeder(&job.here, &fed_by).unwrap_or("-").to_string();
        job.status.relay(&fileset, &format!("{:?}", job.policy.mode).to_lowercase(), job.policy.rpo.map(|r| r.0), &names, &fed_by);
        let (tx, rx) = watch::channel(None);
        let workers = TaskTracker::new();
        for ep in &job.downstreams {
            workers.spawn(job.clone().worker(ep.clone(), rx.clone(), shutdown.clone()));
        }
        workers.close();
        job.watch_held(&tx, &shutdown).await;
        workers.wait().await;
        for ep in &job.downstreams {
            ep.close().await;
        }
    }

    /// Publishes the newest snapshot this node holds, after each receive and every
    /// [`RESCAN`], until `shutdown`.
    async fn watch_held(&self, newest: &watch::Sender<Option<Snapshot>>, shutdown: &CancellationToken) {
        let mut received = self.received.clone();
        loop {
            match self.side.list().await {
                Ok(held) => {
                    self.status.origin_snapshots(&self.policy.fileset.0, &held.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
                    let last = held.last().cloned();
                    newest.send_if_modified(|n| {
                        let changed = n.as_ref().map(|s| &s.identity) != last.as_ref().map(|s| &s.identity);
                        *n = last;
                        changed
                    });
                }
                Err(e) => tracing::warn!(fileset = %self.policy.fileset, "relay: cannot list the received snapshots: {e:#}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = received.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RESCAN) => {}
            }
        }
    }

    /// Keeps one downstream up to date while this node relays to it.
    async fn worker(self: Arc<Self>, ep: Arc<dyn ReplicaEndpoint>, newest: watch::Receiver<Option<Snapshot>>, shutdown: CancellationToken) {
        let hooks = RelayHooks { job: self.clone(), planning: self.guard.planning(&self.policy.fileset.0) };
        let mut epochs = self.epochs.subscribe();
        loop {
            if self.active(ep.node()) {
                let stop = shutdown.child_token();
                let never = CancellationToken::new();
                let follow = replicate::follow(self.side.as_ref(), ep.as_ref(), newest.clone(), &self.policy, self.stall, &hooks, &stop, &never);
                tokio::pin!(follow);
                loop {
                    tokio::select! {
                        () = &mut follow => return,
                        changed = epochs.changed() => {
                            if changed.is_err() || !self.active(ep.node()) {
                                tracing::info!(fileset = %self.policy.fileset, downstream = ep.node(), "not relaying in this epoch");
                                stop.cancel();
                                follow.as_mut().await;
                                break;
                            }
                        }
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = epochs.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// What the relay does around each transfer: keep what it needs, status, fencing.
struct RelayHooks {
    job: Arc<RelayJob>,
    planning: Arc<RwLock<()>>,
}

impl RelayHooks {
    fn fileset(&self) -> &str {
        &self.job.policy.fileset.0
    }
}

#[async_trait]
impl Hooks for RelayHooks {
    fn planning(&self) -> &RwLock<()> {
        &self.planning
    }

    async fn planned(&self, replica: &str, step: &Step) -> Result<()> {
        if !step.backfill {
            let has = match &step.plan {
                Plan::AlreadyThere => Some(&step.snapshot.name),
                Plan::Send { base, .. } => base.as_ref().map(|b| &b.name),
            };
            self.job.status.replica_has(self.fileset(), replica, has);
        }
        self.job.guard.planned(self.fileset(), replica, step)
    }

    fn started(&self, replica: &str, step: &Step, tally: Arc<Tally>, from: u64) {
        let base = step.plan.base().map(|b| b.name.clone());
        self.job.status.transfer_started(self.fileset(), replica, &step.snapshot.name, base.as_ref(), tally, from);
    }

    async fn finished(&self, replica: &str, snapshot: &SnapshotName, result: &Result<ReplicaReport>) {
        let fileset = self.fileset();
        let shown = result.as_ref().map(|r| r.bytes).map_err(|e| format!("{e:#}"));
        self.job.status.transfer_finished(fileset, replica, snapshot, shown);
        match result {
            Ok(r) => {
                tracing::info!(fileset, replica, snapshot = %r.snapshot, base = r.base.as_deref().unwrap_or("none (full)"), bytes = r.bytes, "relayed: downstream up to date");
                let sent = self.job.side.list().await.ok().and_then(|held| held.into_iter().find(|s| &s.name == snapshot));
                if let Some(s) = sent {
                    if let Err(e) = self.job.guard.delivered(fileset, replica, &s) {
                        tracing::error!(fileset, replica, "cannot record the downstream's common base: {e:#}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(fileset, replica, "relaying failed: {e:#}");
                // SECURITY: never learned from a downstream's answer. Learned, the epoch would
                // fence the relay's own origin off, and epochs are not signed: a hostile
                // downstream could stop replication to this node with a claim about anyone. A
                // real new origin reaches this node itself, as its origin or through its
                // feeder, and its epoch comes with that request. (A promotable downstream can
                // still claim to be origin in a request of its own, which `authorize` follows:
                // docs/failover.md, "Not there yet".)
                if let Some(fenced) = e.chain().find_map(|c| c.downcast_ref::<Fenced>()) {
                    tracing::warn!(
                        fileset,
                        replica,
                        "the downstream knows a newer epoch, {} (origin `{}`): not followed on a downstream's word (the new origin's own request, or its feeder's, brings it here)",
                        fenced.epoch.number,
                        fenced.epoch.origin.escape_debug()
                    );
                }
            }
        }
    }

    fn listed(&self, replica: &str, listing: &crate::ship::Listing) {
        self.job.status.downstream_of(&self.job.policy, replica, &listing.downstream);
    }

    async fn caught_up(&self, _replica: &str) {}

    fn backfill(&self, replica: &str, pending: usize, sent: u64) {
        self.job.status.backfill(self.fileset(), replica, pending, sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let dir = Path::new("/nonexistent");
        let node = crate::config::parse_node_text(
            &dir.join("n.yaml"),
            "node: beta\nstate_dir: s\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n  alpha: 127.0.0.1:1\n  gamma: 127.0.0.1:2\n  delta: 127.0.0.1:3\npolicies: []\n",
        )
        .unwrap();
        let text = "fileset: p\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/p\nreplicas:\n  - node: beta\n    path: /b/p\n  - node: gamma\n    path: /b/p\n    from: beta\n  - node: delta\n    path: /b/p\n";
        crate::config::parse_policy_text(&dir.join("p.yaml"), text, &node).unwrap()
    }

    fn snap(hour: u32) -> Snapshot {
        let name = SnapshotName::parse(&format!("snapship-20260101T{hour:02}0000.000Z")).unwrap();
        Snapshot { name, identity: format!("id{hour}"), local_id: None, parent_local_id: None }
    }

    #[test]
    fn a_relay_keeps_its_downstreams_base_and_remembers_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let guard = RelayGuard::new(dir.path());
        // Only gamma names beta; delta is the origin's, and nodes that relay nothing need nothing.
        assert_eq!(guard.needs(&p, "beta"), Err(vec!["gamma".to_string()]), "gamma's base is unknown: no pruning");
        assert_eq!(guard.needs(&p, "delta"), Ok(vec![]));
        let send = Step { snapshot: snap(3), plan: Plan::Send { base: Some(snap(1)), resume: None }, accepts_compact: true, backfill: false };
        guard.planned("p", "gamma", &send).unwrap();
        let mut needs = guard.needs(&p, "beta").unwrap();
        needs.sort();
        assert_eq!(needs, ["id1", "id1", "id3"], "the base, and the transfer in flight");
        guard.delivered("p", "gamma", &snap(3)).unwrap();
        assert_eq!(guard.needs(&p, "beta").unwrap(), ["id3"]);
        // A backfill of an older snapshot does not move the base back.
        let backfill = Step { snapshot: snap(2), plan: Plan::Send { base: Some(snap(3)), resume: None }, accepts_compact: true, backfill: true };
        guard.planned("p", "gamma", &backfill).unwrap();
        guard.delivered("p", "gamma", &snap(2)).unwrap();
        assert_eq!(guard.needs(&p, "beta").unwrap(), ["id3"]);
        // After a restart the base is still known.
        let again = RelayGuard::new(dir.path());
        assert_eq!(again.needs(&p, "beta").unwrap(), ["id3"]);
    }

    #[test]
    fn what_a_fetch_ships_is_kept_while_it_ships_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy();
        let guard = RelayGuard::new(dir.path());
        // delta relays nothing: only the push counts, on any node.
        let kept = guard.keep("p", vec!["id5".into(), "id4".into()]);
        let other = guard.keep("p", vec!["id7".into()]);
        let mut needs = guard.needs(&p, "delta").unwrap();
        needs.sort();
        assert_eq!(needs, ["id4", "id5", "id7"]);
        drop(kept);
        assert_eq!(guard.needs(&p, "delta").unwrap(), ["id7"]);
        drop(other);
        assert_eq!(guard.needs(&p, "delta").unwrap(), Vec::<String>::new());
        // Nothing of it is written down: a restart keeps nothing for a push that died with it.
        let _k = guard.keep("p", vec!["id9".into()]);
        assert_eq!(RelayGuard::new(dir.path()).needs(&p, "delta").unwrap(), Vec::<String>::new());
    }
}
