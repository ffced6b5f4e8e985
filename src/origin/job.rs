//! The origin's loop for one file set in `snapship run`.
//!
//! One task takes snapshots when the policy says (cron in snapshot and hybrid mode, data
//! changes at most once per `min_interval` in continuous and hybrid mode) and publishes the
//! newest on a watch channel. One worker per replica ships the newest snapshot to it: a
//! worker never runs two transfers at once, and snapshots taken during a transfer fold into
//! the next one (the channel holds only the newest), so nothing piles up. A failed transfer is
//! retried with exponential backoff and jitter; a slow or dead replica delays nobody else.
//! Once a replica is current, the snapshots it missed that its retention keeps are
//! backfilled (`replicate::follow`).
//! After each snapshot and each successful transfer the origin is pruned, protecting every
//! replica's common base and whatever is in flight.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use tokio::sync::{RwLock, broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::state::StateStore;
use super::{prune, record};
use crate::config::{BackendKind, Mode, Policy};
use crate::observe::status::{ErrorStatus, StatusBoard};
use crate::replicate::{self, Hooks, Plan, ReplicaReport, Step};
use crate::schedule::admission::{Admission, Permit};
use crate::schedule::clock::Clock;
use crate::schedule::retention::Reason;
use crate::schedule::retry::{self, Next, RetryWait};
use crate::schedule::triggers::{ChangeWatcher, Woke, next_fire};
use crate::ship::ReplicaEndpoint;
use crate::ship::client::{Fenced, NoRoom, Refused};
use crate::ship::meter::Tally;
use crate::ship::protocol::Room;
use crate::snapshot::{Kind, OriginSide, Snapshot, SnapshotName};
use crate::store::EpochStore;

pub struct OriginJob {
    pub policy: Policy,
    pub origin: Arc<dyn OriginSide>,
    pub replicas: Vec<Arc<dyn ReplicaEndpoint>>,
    pub state: Arc<StateStore>,
    pub clock: Clock,
    pub status: Arc<StatusBoard>,
    /// Transfers planned or under way: replica -> (snapshot, base).
    in_flight: Mutex<BTreeMap<String, (SnapshotName, Option<SnapshotName>)>>,
    /// Planning a transfer (read) and pruning (write) exclude each other, so a base chosen
    /// for a transfer is registered as in flight before any prune can see it.
    plan_lock: RwLock<()>,
    /// Every transfer's outcome, for `snapship sync` requests waiting on them.
    outcomes: broadcast::Sender<Outcome>,
    sync_requests: Mutex<Option<mpsc::Receiver<SyncRequest>>>,
    group: Option<Arc<GroupHub>>,
    /// A sending process that produces nothing this long is killed.
    stall: Duration,
    /// Where a newer epoch, learned from a replica that fenced this origin off, is recorded
    /// (the node then stops this job).
    epochs: Option<Arc<EpochStore>>,
    /// Replicas listed since this job started: their common base is known live (it is
    /// registered when a transfer is planned), whatever the state file says.
    listed: Mutex<std::collections::BTreeSet<String>>,
    /// Slots for transfers, per replica node, shared by every job of the node (so that a
    /// node with thousands of file sets starts a few transfers at a time); `None`: no limit.
    admission: Option<Arc<Admission>>,
    /// Cancelled to end the job gently (a reload changed its policy): no new snapshot or
    /// transfer starts, the transfers under way finish, then `run` returns.
    drain: CancellationToken,
}

/// How one transfer to one replica ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub replica: String,
    pub snapshot: SnapshotName,
    pub result: Result<ReplicaReport, String>,
}

/// `snapship sync` while the daemon runs: take a snapshot now (of the whole consistency
/// group, if any), answer per file set with each replica's outcome for it (or for a newer
/// snapshot, which carries the same data).
pub struct SyncRequest {
    pub reply: oneshot::Sender<SyncAnswer>,
    /// How long to wait, after a replica's first attempt failed, for a retry of the workers
    /// to succeed (zero: the first attempt's outcome answers). `None`: answer once the
    /// snapshot is taken, with no outcomes.
    pub wait: Option<Duration>,
}

/// Per file set: its name, the snapshot taken, and each replica's outcome; or why no
/// snapshot could be taken.
pub type SyncAnswer = Result<Vec<(String, SnapshotName, Vec<Outcome>)>, String>;

/// Where a group member's snapshots go, and where its outcomes come from.
type MemberChannels = (watch::Sender<Option<Snapshot>>, broadcast::Sender<Outcome>);

/// The file sets of one consistency group in `snapship run`: a snapshot of one is taken as
/// a snapshot of all, at one point in time, and handed to every member's replica workers.
/// The first member (by name) runs the group's cron schedule; any member's changes trigger.
pub struct GroupHub {
    pub name: String,
    backend: BackendKind,
    members: Vec<GroupMember>,
    channels: Mutex<BTreeMap<String, MemberChannels>>,
    /// One group snapshot at a time.
    taking: tokio::sync::Mutex<()>,
}

/// One file set of a [`GroupHub`].
pub struct GroupMember {
    pub fileset: String,
    /// The origin's path (the ZFS dataset).
    pub path: String,
    pub origin: Arc<dyn OriginSide>,
    pub replicas: Vec<String>,
}

impl GroupHub {
    pub fn new(name: &str, backend: BackendKind, mut members: Vec<GroupMember>) -> Arc<GroupHub> {
        members.sort_by(|a, b| a.fileset.cmp(&b.fileset));
        Arc::new(GroupHub { name: name.to_string(), backend, members, channels: Mutex::default(), taking: tokio::sync::Mutex::new(()) })
    }

    fn leader(&self) -> &str {
        &self.members[0].fileset
    }

    fn replicas_of(&self, fileset: &str) -> Vec<String> {
        self.members.iter().find(|m| m.fileset == fileset).map(|m| m.replicas.clone()).unwrap_or_default()
    }

    /// Snapshots every member; publishes each snapshot to its member; subscribes the
    /// returned receivers to every member's outcomes before publishing.
    async fn take(&self, kind: Kind) -> Result<Vec<(String, Snapshot, broadcast::Receiver<Outcome>)>> {
        let _one = self.taking.lock().await;
        let sides: Vec<(&str, &dyn OriginSide)> = self.members.iter().map(|m| (m.path.as_str(), m.origin.as_ref())).collect();
        let snaps = crate::snapshot::take_group(self.backend, &sides, kind).await?;
        let channels = self.channels.lock().expect("group channels lock");
        let mut out = Vec::new();
        for (m, snap) in self.members.iter().zip(snaps) {
            if let Some((newest, outcomes)) = channels.get(&m.fileset) {
                let rx = outcomes.subscribe();
                newest.send_replace(Some(snap.clone()));
                out.push((m.fileset.clone(), snap, rx));
            }
        }
        Ok(out)
    }
}

/// Where the daemon sends sync requests for one file set.
pub type SyncHandle = mpsc::Sender<SyncRequest>;

impl OriginJob {
    pub fn new(
        policy: Policy,
        origin: Arc<dyn OriginSide>,
        replicas: Vec<Arc<dyn ReplicaEndpoint>>,
        state: Arc<StateStore>,
        clock: Clock,
        status: Arc<StatusBoard>,
    ) -> (Self, SyncHandle) {
        let names: Vec<&str> = replicas.iter().map(|r| r.node()).collect();
        status.origin(&policy.fileset.0, &format!("{:?}", policy.mode).to_lowercase(), policy.rpo.map(|r| r.0), &names);
        let (sync_tx, sync_rx) = mpsc::channel(4);
        let job = OriginJob {
            policy,
            origin,
            replicas,
            state,
            clock,
            status,
            in_flight: Mutex::default(),
            plan_lock: RwLock::new(()),
            outcomes: broadcast::channel(64).0,
            sync_requests: Mutex::new(Some(sync_rx)),
            group: None,
            stall: crate::config::Transfers::default().stall_timeout.0,
            epochs: None,
            listed: Mutex::default(),
            admission: None,
            drain: CancellationToken::new(),
        };
        (job, sync_tx)
    }

    /// Sets the stall timeout for sending processes (the node's `transfers.stall_timeout`).
    pub fn with_stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Records newer epochs that replicas report in `epochs`.
    pub fn with_epochs(mut self, epochs: Arc<EpochStore>) -> Self {
        self.epochs = Some(epochs);
        self
    }

    /// Ends [`Self::run`] gently when `drain` is cancelled: transfers under way finish first.
    pub fn with_drain(mut self, drain: CancellationToken) -> Self {
        self.drain = drain;
        self
    }

    /// Transfers wait for a slot of `admission` (the node's, shared by its jobs).
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Makes this file set a member of a consistency group.
    pub fn in_group(mut self, hub: Arc<GroupHub>) -> Self {
        self.group = Some(hub);
        self
    }

    /// Tells the status board what the origin holds.
    async fn report_snapshots(&self) {
        if let Ok(list) = self.origin.list().await {
            self.status.origin_snapshots(self.fileset(), &names_of(&list));
        }
    }

    fn fileset(&self) -> &str {
        &self.policy.fileset.0
    }

    /// Runs until `shutdown`; transfers in flight are then dropped: the replica keeps what it
    /// received for `resume_window`, and the next run resumes from there. Or until the drain
    /// token ([`Self::with_drain`]) is cancelled: then the transfers in flight finish first.
    pub async fn run(self, shutdown: CancellationToken) {
        let job = Arc::new(self);
        let state = job.state.get().await;
        for (replica, r) in &state.replicas {
            job.status.replica_has(job.fileset(), replica, r.base.as_ref());
            let last_error = r.last_error.clone().map(|(at, message)| ErrorStatus { at, message });
            job.status.replica_history(job.fileset(), replica, r.totals(), r.last_success, last_error);
        }
        let newest = match job.origin.list().await {
            Ok(mut list) => {
                job.status.origin_snapshots(job.fileset(), &names_of(&list));
                list.pop()
            }
            Err(e) => {
                tracing::error!(fileset = job.fileset(), "cannot list snapshots: {e:#}");
                None
            }
        };
        let (tx, rx) = watch::channel(newest);
        if let Some(hub) = &job.group {
            hub.channels.lock().expect("group channels lock").insert(job.fileset().to_string(), (tx.clone(), job.outcomes.clone()));
        }
        let workers = TaskTracker::new();
        for ep in &job.replicas {
            workers.spawn(job.clone().replica_worker(ep.clone(), rx.clone(), shutdown.clone()));
        }
        workers.close();
        job.snapshot_loop(&tx, &shutdown).await;
        workers.wait().await;
        for ep in &job.replicas {
            ep.close().await;
        }
    }

    async fn snapshot_loop(&self, newest: &watch::Sender<Option<Snapshot>>, shutdown: &CancellationToken) {
        let p = &self.policy;
        let watcher =
            matches!(p.mode, Mode::Continuous | Mode::Hybrid).then(|| ChangeWatcher::new(std::path::Path::new(&p.origin.path), self.origin.change_counter()));
        let mut sync_requests = self.sync_requests.lock().expect("sync_requests lock").take().expect("one snapshot loop per job");
        let mut pending_sync = None;
        // In a group, only the leader keeps the schedule: one group snapshot per firing.
        let schedule = p.schedule.as_ref().filter(|_| self.group.as_ref().is_none_or(|g| g.leader() == self.fileset()));
        let min_interval = p.continuous.as_ref().map_or(Duration::from_secs(1), |c| c.min_interval.0);
        let mut last_fire = self.clock.now();
        let mut flush = false;
        let mut last_snapshot = tokio::time::Instant::now() - min_interval;
        loop {
            // A firing missed by more than a minute (a suspended machine) is not replayed.
            if let Some(next) = schedule.and_then(|s| s.next_after(last_fire)) {
                if next < self.clock.now() - chrono::Duration::minutes(1) {
                    last_fire = self.clock.now();
                }
            }
            let kind = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.drain.cancelled() => return,
                t = async { next_fire(schedule.expect("guarded"), &self.clock, last_fire).await }, if schedule.is_some() => {
                    last_fire = t;
                    Kind::Scheduled
                }
                woke = async { watcher.as_ref().expect("guarded").wait().await }, if watcher.is_some() => {
                    flush = woke == Woke::Change;
                    if flush {
                        self.status.change_noticed(self.fileset());
                    }
                    Kind::Continuous
                }
                Some(request) = sync_requests.recv() => {
                    pending_sync = Some(request);
                    Kind::Scheduled
                }
            };
            if kind == Kind::Continuous {
                // At most one snapshot per min_interval: changes within it coalesce.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.drain.cancelled() => return,
                    _ = tokio::time::sleep_until(last_snapshot + min_interval) => {}
                }
                let current = newest.borrow().clone();
                let changed = match &current {
                    Some(s) => self.origin.changed_since(s, flush).await,
                    None => Ok(true),
                };
                match changed {
                    Ok(true) => self.status.change_noticed(self.fileset()),
                    Ok(false) => {
                        self.status.change_undone(self.fileset());
                        continue;
                    }
                    Err(e) => {
                        // Most likely the snapshot went away (deleted by hand, or by another
                        // process's prune): take a fresh one rather than stop noticing changes.
                        tracing::warn!(fileset = self.fileset(), "cannot compare with the newest snapshot ({e:#}); taking a new one");
                    }
                }
            }
            let taken = match &self.group {
                Some(hub) => hub.take(kind).await.with_context(|| format!("group `{}`", hub.name)),
                None => {
                    // Subscribe before publishing, so that no outcome is missed.
                    let outcomes = self.outcomes.subscribe();
                    self.origin.take_snapshot(kind).await.map(|s| {
                        newest.send_replace(Some(s.clone()));
                        vec![(self.fileset().to_string(), s, outcomes)]
                    })
                }
            };
            match taken {
                Ok(taken) => {
                    for (fileset, s, _) in &taken {
                        tracing::info!(fileset = %fileset, snapshot = %s.name, "snapshot taken");
                        self.status.snapshot_taken(fileset, &s.name);
                    }
                    last_snapshot = tokio::time::Instant::now();
                    if let Some(request) = pending_sync.take() {
                        let waits = taken.into_iter().map(|(fileset, s, rx)| (fileset, s.name, rx)).collect();
                        tokio::spawn(answer_sync(request, waits, self.group.clone(), self.replicas.iter().map(|r| r.node().to_string()).collect()));
                    }
                }
                Err(e) => {
                    tracing::error!(fileset = self.fileset(), "cannot take a snapshot: {e:#}");
                    let message = format!("cannot take a snapshot: {e:#}");
                    match &self.group {
                        Some(hub) => hub.members.iter().for_each(|m| self.status.snapshot_failed(&m.fileset, &message)),
                        None => self.status.snapshot_failed(self.fileset(), &message),
                    }
                    if let Some(request) = pending_sync.take() {
                        let _ = request.reply.send(Err(message));
                    }
                }
            }
            self.prune().await;
            self.report_snapshots().await;
        }
    }

    /// Keeps one replica up to the newest snapshot, backfilling what it missed
    /// ([`replicate::follow`]); pruning after each success ([`Hooks::caught_up`]).
    async fn replica_worker(self: Arc<Self>, ep: Arc<dyn ReplicaEndpoint>, newest: watch::Receiver<Option<Snapshot>>, shutdown: CancellationToken) {
        replicate::follow(self.origin.as_ref(), ep.as_ref(), newest, &self.policy, self.stall, self.as_ref(), &shutdown, &self.drain).await;
    }

    /// Waits `delay` before the next try, probing the replica every
    /// [`retry::probe_period`]: a replica that was out of reach and answers again is tried
    /// at once. `false`: shut down meanwhile.
    async fn back_off(&self, ep: &dyn ReplicaEndpoint, delay: Duration, shutdown: &CancellationToken) -> bool {
        let start = tokio::time::Instant::now();
        let mut wait = RetryWait::new(Duration::ZERO, delay, retry::probe_period(self.stall));
        loop {
            match wait.next(start.elapsed()) {
                Next::Retry => return true,
                Next::Sleep(d) => tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(d) => {}
                },
                Next::Probe => {
                    let answered = tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        answered = probe(ep, retry::probe_timeout(self.stall)) => answered,
                    };
                    if wait.probed(start.elapsed(), answered) {
                        tracing::info!(fileset = self.fileset(), replica = ep.node(), "the replica answers again; trying now");
                        return true;
                    }
                }
            }
        }
    }

    /// After the replica had no room for a stream: checks with it (a `list`, which says
    /// how much is free) every [`retry::probe_period`] until it has room
    /// ([`retry::room_enough`]), the status saying so meanwhile; nothing is resent until
    /// then. `false`: shut down meanwhile.
    async fn wait_for_room(&self, ep: &dyn ReplicaEndpoint, room: Room, shutdown: &CancellationToken) -> bool {
        self.status.waiting_for_room(self.fileset(), ep.node(), Some((room.free, room.needed)));
        let every = retry::probe_period(self.stall);
        let started = tokio::time::Instant::now();
        let ready = loop {
            if started.elapsed() > retry::ROOM_WAIT_MAX {
                tracing::info!(
                    fileset = self.fileset(),
                    replica = ep.node(),
                    "no room yet after {}s of waiting; trying once more anyway",
                    retry::ROOM_WAIT_MAX.as_secs()
                );
                break true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep(every) => {}
            }
            let listing = tokio::select! {
                _ = shutdown.cancelled() => break false,
                listing = tokio::time::timeout(retry::probe_timeout(self.stall), ep.list()) => listing,
            };
            let free = match listing {
                Ok(Ok(listing)) => listing.free,
                Ok(Err(_)) | Err(_) => continue, // out of reach for now: keep waiting
            };
            let Some(free) = free else {
                break true; // it no longer says: try again, with backoff if it fails
            };
            self.status.waiting_for_room(self.fileset(), ep.node(), Some((free, room.needed)));
            if retry::room_enough(free, room.free, room.received, room.needed) {
                tracing::info!(fileset = self.fileset(), replica = ep.node(), free, "the replica has room now; sending again");
                break true;
            }
        };
        self.status.waiting_for_room(self.fileset(), ep.node(), None);
        ready
    }

    /// Prunes the origin by its retention, protecting bases and transfers in flight.
    async fn prune(&self) {
        let _exclusive = self.plan_lock.write().await;
        let state = self.state.get().await;
        // A replica whose common base is neither recorded nor learned live since start (the
        // state file was lost, or it was never reached) may hold any of our snapshots as its
        // base: prune nothing until it has been asked.
        let unknown: Vec<String> = {
            let listed = self.listed.lock().expect("listed lock");
            self.replicas
                .iter()
                .map(|r| r.node().to_string())
                .filter(|n| !listed.contains(n) && state.replicas.get(n).is_none_or(|r| r.base.is_none()))
                .collect()
        };
        if !unknown.is_empty() {
            tracing::warn!(
                fileset = self.fileset(),
                "not pruning: the common base with {} is not known yet (no record of it, and not reached since start); pruning waits until it answers",
                unknown.join(", ")
            );
            return;
        }
        let mut protect = prune::protections(&state);
        for (snapshot, base) in self.in_flight.lock().expect("in_flight lock").values() {
            protect.push((snapshot.clone(), Reason::InFlight));
            if let Some(b) = base {
                protect.push((b.clone(), Reason::InFlight));
            }
        }
        let result = async {
            let plan = prune::plan(&self.policy, self.origin.as_ref(), &protect, self.clock.now()).await?;
            prune::apply(self.fileset(), &plan, self.origin.as_ref()).await
        }
        .await;
        if let Err(e) = &result {
            tracing::error!(fileset = self.fileset(), "pruning failed: {e:#}");
        }
        self.status.pruned(self.fileset(), result.map(|_| ()).map_err(|e| format!("cannot prune the origin: {e:#}")));
    }
}

/// What the daemon does around each transfer: status, the sync requests waiting on
/// outcomes, transfers in flight (in memory and in the state file) and the common base.
///
/// A transfer that failed stays registered as in flight (in memory and in the state file)
/// until the next attempt replaces it: the replica may have committed the snapshot and
/// pruned the old base even though its answer was lost, so both stay protected until a
/// fresh listing says what the replica holds. (A cut transfer is also resumable.)
#[async_trait]
impl Hooks for OriginJob {
    fn planning(&self) -> &RwLock<()> {
        &self.plan_lock
    }

    async fn planned(&self, replica: &str, step: &Step) -> Result<()> {
        self.listed.lock().expect("listed lock").insert(replica.to_string());
        let has = match &step.plan {
            Plan::AlreadyThere => Some(&step.snapshot.name),
            Plan::Send { base, .. } => base.as_ref().map(|b| &b.name),
        };
        if !step.backfill {
            self.status.replica_has(self.fileset(), replica, has);
        }
        if let Plan::Send { base, .. } = &step.plan {
            let base = base.as_ref().map(|b| b.name.clone());
            self.in_flight.lock().expect("in_flight lock").insert(replica.to_string(), (step.snapshot.name.clone(), base.clone()));
            record::in_flight(&self.state, replica, &step.snapshot.name, base.as_ref()).await?;
        }
        Ok(())
    }

    async fn admit(&self, replica: &str) -> Option<Permit> {
        Some(self.admission.as_ref()?.admit(replica).await)
    }

    fn listed(&self, replica: &str, listing: &crate::ship::Listing) {
        self.status.downstream_of(&self.policy, replica, &listing.downstream);
    }

    async fn caught_up(&self, _replica: &str) {
        self.prune().await;
        self.report_snapshots().await;
    }

    fn backfill(&self, replica: &str, pending: usize, sent: u64) {
        self.status.backfill(self.fileset(), replica, pending, sent);
    }

    fn started(&self, replica: &str, step: &Step, tally: Arc<Tally>, from: u64) {
        let base = step.plan.base().map(|b| b.name.clone());
        self.status.transfer_started(self.fileset(), replica, &step.snapshot.name, base.as_ref(), tally, from);
    }

    async fn finished(&self, replica: &str, snapshot: &SnapshotName, result: &Result<ReplicaReport>) {
        let shown = result.as_ref().cloned().map_err(|e| format!("{e:#}"));
        self.status.transfer_finished(self.fileset(), replica, snapshot, shown.as_ref().map(|r| r.bytes).map_err(Clone::clone));
        let _ = self.outcomes.send(Outcome { replica: replica.to_string(), snapshot: snapshot.clone(), result: shown });
        if result.is_ok() {
            self.in_flight.lock().expect("in_flight lock").remove(replica);
        }
        if let (Err(e), Some(epochs)) = (result, &self.epochs) {
            // Cloned out of the error: the error is not held across the confirmation.
            let fenced = e.chain().find_map(|c| c.downcast_ref::<Fenced>()).cloned();
            if let Some(fenced) = fenced {
                tracing::warn!(
                    fileset = self.fileset(),
                    replica,
                    "fenced off: `{}` is the origin in epoch {}",
                    fenced.epoch.origin.escape_debug(),
                    fenced.epoch.number
                );
                let confirmed = fenced.confirmed(&self.replicas, retry::probe_timeout(self.stall)).await.and_then(|epoch| epochs.learn(&self.policy, &epoch));
                // `learn` refuses an epoch this node's policy does not allow (the replica may
                // follow a member that promoted itself against it): this node stays origin.
                if let Err(e) = confirmed {
                    tracing::error!(fileset = self.fileset(), replica, "not stepping down: {e:#}");
                }
            }
        }
        record::outcome(&self.state, self.origin.as_ref(), self.fileset(), replica, snapshot, result).await;
    }

    async fn wait_to_retry(&self, ep: &dyn ReplicaEndpoint, error: &anyhow::Error, delay: Duration, shutdown: &CancellationToken) -> bool {
        let no_room = error.chain().find_map(|c| c.downcast_ref::<NoRoom>()).map(|n| n.room);
        match no_room {
            Some(room) => {
                tracing::warn!(fileset = self.fileset(), replica = ep.node(), "waiting for room on the replica before sending again: {error:#}");
                self.wait_for_room(ep, room, shutdown).await
            }
            None => self.back_off(ep, delay, shutdown).await,
        }
    }
}

/// Whether `ep` answers a `list` within `limit` (a refusal is an answer too). A probe not
/// answered drops the connection, so that the next one dials afresh.
async fn probe(ep: &dyn ReplicaEndpoint, limit: Duration) -> bool {
    match tokio::time::timeout(limit, ep.list()).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) if e.chain().any(|c| c.is::<Refused>() || c.is::<Fenced>() || c.is::<NoRoom>()) => true,
        Ok(Err(_)) | Err(_) => {
            ep.close().await;
            false
        }
    }
}

/// The names of `snapshots`, for the status board.
fn names_of(snapshots: &[Snapshot]) -> Vec<SnapshotName> {
    snapshots.iter().map(|s| s.name.clone()).collect()
}

/// Waits, per file set, for every replica's first outcome for its target snapshot or a newer
/// one, then answers.
async fn answer_sync(
    request: SyncRequest,
    waits: Vec<(String, SnapshotName, broadcast::Receiver<Outcome>)>,
    group: Option<Arc<GroupHub>>,
    own_replicas: Vec<String>,
) {
    let mut answers = Vec::new();
    for (fileset, target, mut outcomes) in waits {
        let Some(wait) = request.wait else {
            answers.push((fileset, target, Vec::new()));
            continue;
        };
        let replicas = match &group {
            Some(hub) => hub.replicas_of(&fileset),
            None => own_replicas.clone(),
        };
        // Every replica's first outcome (each attempt is bounded by the stall timeouts), then,
        // for those that failed, a retry that works, until `wait` has passed.
        let mut done: BTreeMap<String, Outcome> = BTreeMap::new();
        let mut failed: BTreeMap<String, Outcome> = BTreeMap::new();
        let mut deadline = None;
        while done.len() < replicas.len() {
            if deadline.is_none() && done.len() + failed.len() == replicas.len() {
                deadline = Some(tokio::time::Instant::now() + wait);
            }
            let next = match deadline {
                Some(at) => tokio::time::timeout_at(at, outcomes.recv()).await,
                None => Ok(outcomes.recv().await),
            };
            match next {
                Ok(Ok(o)) if o.snapshot >= target && o.result.is_ok() => {
                    failed.remove(&o.replica);
                    done.insert(o.replica.clone(), o);
                }
                Ok(Ok(o)) if o.snapshot >= target && !done.contains_key(&o.replica) => {
                    failed.insert(o.replica.clone(), o);
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        let waited = humantime::format_duration(Duration::from_secs(wait.as_secs()));
        let got = replicas
            .iter()
            .map(|r| match (done.remove(r), failed.remove(r)) {
                (Some(ok), _) => ok,
                (None, Some(mut last)) => {
                    if let Err(e) = &mut last.result {
                        e.push_str(&format!(" (waited {waited} more for a retry; the daemon keeps retrying: `snapship status` shows how it goes)"));
                    }
                    last
                }
                (None, None) => Outcome {
                    replica: r.clone(),
                    snapshot: target.clone(),
                    result: Err("the daemon stopped before the transfer ended (`snapship status` shows it)".to_string()),
                },
            })
            .collect();
        answers.push((fileset, target, got));
    }
    let _ = request.reply.send(Ok(answers));
}
