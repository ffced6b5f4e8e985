//! The replication logic: bring one replica up to a snapshot. `snapship sync` and the
//! daemon's replica workers both call [`bring_up_to_date`]; this is the one place where a
//! transfer is planned and started.
//!
//! Ask the replica what it holds ([`Listing`]), pick the step ([`next_step`]: a cut transfer
//! of an older snapshot is finished first, then the target goes incrementally from the
//! newest common base, by identity), open a send stream (full without a base, resumed after
//! the prefix the replica holds when its hash matches) and hand it to the endpoint. The
//! caller's [`Hooks`] see each step planned (under the caller's planning lock, so that a
//! prune cannot delete a base chosen for a transfer before it is registered), started and
//! finished. This module knows nothing of filesystems or networks: it drives the
//! [`OriginSide`] and [`ReplicaEndpoint`] traits.
//!
//! **Backfill** (snapshot and hybrid mode, btrfs): once a replica holds the newest snapshot
//! (RPO first), the snapshots it missed that its own retention would keep
//! ([`backfill_queue`], the replica's rules from the same policy file) follow, oldest first,
//! each incremental from the nearest snapshot both hold ([`backfill_base`]: on btrfs any
//! held snapshot can be a parent, older or newer; on ZFS the missed snapshots travel in the
//! `send -I` stream to the newest, see [`backfills`]). [`follow`] is the loop a worker runs for
//! one replica: ship the newest, backfill one snapshot at a time while nothing newer came,
//! retry with backoff. The origin's workers and a relay's (cascades) run it alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{RwLock, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendKind, Mode, Policy};
use crate::schedule::admission::Permit;
use crate::schedule::retention::{self, Reason};

use crate::ship::meter::{Metered, Tally};
use crate::ship::{Listing, Partial, ReplicaEndpoint, Resumed, Start, StreamStart};
use crate::snapshot::{self, Incoming, Kind, OriginSide, Snapshot, SnapshotName, common_base};

/// What one replica got.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicaReport {
    pub node: String,
    pub snapshot: String,
    /// The base the stream was incremental from; `None` for a full send.
    pub base: Option<String>,
    pub bytes: u64,
    /// The replica already held this much of the stream from a cut transfer.
    #[serde(default)]
    pub resumed_from: u64,
    pub elapsed: Duration,
}

/// How a replica will be brought up to a snapshot.
#[derive(Debug, Clone)]
pub enum Plan {
    /// It already holds the snapshot.
    AlreadyThere,
    /// Send the snapshot, incremental from this base, or full; going on from the replica's
    /// partial transfer of the same stream if there is one.
    Send { base: Option<Snapshot>, resume: Option<Partial> },
}

impl Plan {
    /// The base the stream goes from, if any.
    pub fn base(&self) -> Option<&Snapshot> {
        match self {
            Plan::Send { base, .. } => base.as_ref(),
            Plan::AlreadyThere => None,
        }
    }
}

/// One transfer: the snapshot it sends (the target, or an older one whose cut transfer the
/// replica holds part of) and how.
#[derive(Debug, Clone)]
pub struct Step {
    pub snapshot: Snapshot,
    pub plan: Plan,
    /// The replica takes the backend's compact stream format (from its listing).
    pub accepts_compact: bool,
    /// A missed snapshot sent after the replica became current (older than its newest).
    pub backfill: bool,
}

/// Hooks that do nothing around a step: a transfer that protects, registers and records
/// nothing of its own (a fetch between members; the role tests).
#[derive(Default)]
pub struct NoHooks(RwLock<()>);

#[async_trait]
impl Hooks for NoHooks {
    fn planning(&self) -> &RwLock<()> {
        &self.0
    }
    async fn planned(&self, _: &str, _: &Step) -> Result<()> {
        Ok(())
    }
    fn started(&self, _: &str, _: &Step, _: Arc<Tally>, _: u64) {}
    async fn finished(&self, _: &str, _: &SnapshotName, _: &Result<ReplicaReport>) {}
}

/// What the caller of [`bring_up_to_date`] does around each step.
#[async_trait]
pub trait Hooks: Send + Sync {
    /// Held (read) while a step is planned and [`planned`](Self::planned) runs; the caller's
    /// pruning takes it for writing.
    fn planning(&self) -> &RwLock<()>;
    /// A step is planned: register what it needs protected (its snapshot and base).
    async fn planned(&self, replica: &str, step: &Step) -> Result<()>;
    /// Its stream starts, with its live byte count and the offset it starts from.
    fn started(&self, replica: &str, step: &Step, tally: Arc<Tally>, from: u64);
    /// The attempt to send `snapshot` ended (listing and planning errors included).
    async fn finished(&self, replica: &str, snapshot: &SnapshotName, result: &Result<ReplicaReport>);
    /// The replica answered a listing (a relay reports the replicas it feeds in it).
    fn listed(&self, _replica: &str, _listing: &Listing) {}
    /// [`follow`] brought the replica up to the newest snapshot, or backfilled one (the
    /// origin prunes here).
    async fn caught_up(&self, _replica: &str) {}
    /// The replica's backfill queue: `pending` snapshots still to send, `sent` bytes of the
    /// one just backfilled (0 when only the queue was counted).
    fn backfill(&self, _replica: &str, _pending: usize, _sent: u64) {}
    /// Waits for a slot for one transfer to `replica` ([`follow`] asks before each attempt
    /// and each backfilled snapshot, and holds it for the transfer): the origin limits
    /// transfers per peer node-wide (`schedule::admission`). `None`: no limit.
    async fn admit(&self, _replica: &str) -> Option<Permit> {
        None
    }
    /// [`follow`]'s wait after a failed attempt, `delay` by the backoff: `true` to try again
    /// (also sooner, when the caller learns the replica is back), `false` at `shutdown`.
    /// The origin probes the replica meanwhile, and waits for room after a `NoSpace`.
    async fn wait_to_retry(&self, _ep: &dyn ReplicaEndpoint, _error: &anyhow::Error, delay: Duration, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Brings `ep` up to `target`: a cut transfer of an older snapshot that the replica holds
/// part of is finished first, then `target` follows (incrementally on top of it). Stops at
/// the first failure. `stall`: a sending process that produces nothing this long is killed.
pub async fn bring_up_to_date(
    origin: &dyn OriginSide,
    target: &Snapshot,
    ep: &dyn ReplicaEndpoint,
    stall: Duration,
    hooks: &dyn Hooks,
) -> Result<ReplicaReport> {
    bring_up_to(origin, target, None, ep, stall, hooks).await
}

/// [`bring_up_to_date`], with the target moved to the newest on `newer` once the replica
/// answered (reaching a replica that was away can take a while: RPO first).
async fn bring_up_to(
    origin: &dyn OriginSide,
    target: &Snapshot,
    newer: Option<&watch::Receiver<Option<Snapshot>>>,
    ep: &dyn ReplicaEndpoint,
    stall: Duration,
    hooks: &dyn Hooks,
) -> Result<ReplicaReport> {
    let node = ep.node();
    let mut target = target.clone();
    loop {
        let mut sending = target.name.clone();
        let result = async {
            // Ask the replica first, outside the planning lock: a slow replica must not hold
            // up the caller's pruning, and through it everything else.
            let listing = list_replica(ep).await?;
            hooks.listed(node, &listing);
            if let Some(newest) = newer.and_then(|rx| rx.borrow().clone()).filter(|n| n.name > target.name) {
                target = newest;
            }
            let target = &target;
            let step = {
                let _planning = hooks.planning().read().await;
                let step = next_step(origin, target, &listing).await?;
                sending = step.snapshot.name.clone();
                hooks.planned(node, &step).await?;
                step
            };
            if step.snapshot.name != target.name {
                tracing::info!(replica = node, snapshot = %step.snapshot.name, "finishing a cut transfer first");
            }
            let report = transfer(origin, &step, ep, stall, &|tally, from| hooks.started(node, &step, tally, from)).await?;
            Ok::<_, anyhow::Error>((step, report))
        }
        .await;
        let (step, result) = match result {
            Ok((step, report)) => (Some(step), Ok(report)),
            Err(e) => (None, Err(e)),
        };
        hooks.finished(node, &sending, &result).await;
        let report = result?;
        if step.is_some_and(|s| s.snapshot.name == target.name) {
            return Ok(report);
        }
    }
}

/// What `ep` holds; a replica that does not answer within a minute is an error.
pub async fn list_replica(ep: &dyn ReplicaEndpoint) -> Result<Listing> {
    let what = || format!("cannot list the snapshots of replica `{}`", ep.node());
    tokio::time::timeout(LIST_TIMEOUT, ep.list())
        .await
        .map_err(|_| anyhow!("no answer within {}s", LIST_TIMEOUT.as_secs()))
        .with_context(what)?
        .with_context(what)
}

const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// The next transfer towards `target` given what the replica holds: an older partial first,
/// else the target itself.
pub async fn next_step(origin: &dyn OriginSide, target: &Snapshot, listing: &Listing) -> Result<Step> {
    if let Some((older, plan)) = partial_to_finish(origin, target, listing.resumable.as_ref()).await? {
        return Ok(Step { snapshot: older, plan, accepts_compact: listing.accepts_compact, backfill: false });
    }
    let plan = plan_from(origin, target, &listing.snapshots, listing.resumable.as_ref()).await?;
    Ok(Step { snapshot: target.clone(), plan, accepts_compact: listing.accepts_compact, backfill: false })
}

/// Picks the base given what the replica holds. A partial transfer of this very snapshot is
/// resumed, from its own base (still common: the replica is receiving on it).
pub async fn plan_from(origin: &dyn OriginSide, snapshot: &Snapshot, replica_has: &[Snapshot], partial: Option<&Partial>) -> Result<Plan> {
    if replica_has.iter().any(|r| r.identity == snapshot.identity) {
        return Ok(Plan::AlreadyThere);
    }
    // Only snapshots older than the one sent can be its base.
    let older: Vec<Snapshot> = origin.list().await?.into_iter().filter(|s| s.name < snapshot.name).collect();
    if let Some(p) = partial.filter(|p| p.identity == snapshot.identity) {
        if let Some(base) = base_of_partial(&older, p) {
            return Ok(Plan::Send { base, resume: Some(p.clone()) });
        }
    }
    let base = common_base(&older, replica_has).cloned();
    Ok(Plan::Send { base, resume: None })
}

/// The origin's snapshot that `partial` is incremental from: `Some(None)` for a full stream,
/// `None` if the origin no longer has it.
fn base_of_partial(origin: &[Snapshot], partial: &Partial) -> Option<Option<Snapshot>> {
    match &partial.base {
        None => Some(None),
        Some(id) => origin.iter().find(|s| &s.identity == id).map(|s| Some(s.clone())),
    }
}

/// A partial transfer of an older snapshot than `target` that is finished first: what the
/// replica holds of it is not sent again, and the target then goes incrementally on top of
/// it (the two streams together cost about what one stream to the target would). `None` if
/// there is none, or the origin no longer has what it needs.
pub async fn partial_to_finish(origin: &dyn OriginSide, target: &Snapshot, partial: Option<&Partial>) -> Result<Option<(Snapshot, Plan)>> {
    let Some(p) = partial.filter(|p| p.identity != target.identity && (p.offset > 0 || p.token.is_some())) else { return Ok(None) };
    let snaps = origin.list().await?;
    let Some(older) = snaps.iter().find(|s| s.identity == p.identity && s.name < target.name) else { return Ok(None) };
    let before: Vec<Snapshot> = snaps.iter().filter(|s| s.name < older.name).cloned().collect();
    Ok(base_of_partial(&before, p).map(|base| (older.clone(), Plan::Send { base, resume: Some(p.clone()) })))
}

/// Retry delays for a failing replica: from 1 s, doubling, at most 5 minutes, jittered.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default().with_min_delay(Duration::from_secs(1)).with_max_delay(Duration::from_secs(300)).with_jitter().without_max_times().build()
}

/// Keeps `ep` up to the newest snapshot on `newest` until `shutdown`: ships it (again
/// whenever a newer one appears; snapshots published during a transfer fold into the next),
/// then, while nothing newer came, backfills the snapshots the replica missed one at a time
/// (RPO first: a new snapshot is shipped before the next backfill step). A failure is
/// retried after 1 s, doubling to at most 5 minutes, with jitter; a newer snapshot cuts the
/// wait short.
///
/// # Cancel safety
/// Returns at `shutdown`, dropping any transfer in flight (the replica keeps what it
/// received for a resume). At `drain` it returns once the transfer in flight (if any) has
/// ended, starting no other.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    origin: &dyn OriginSide,
    ep: &dyn ReplicaEndpoint,
    mut newest: watch::Receiver<Option<Snapshot>>,
    policy: &Policy,
    stall: Duration,
    hooks: &dyn Hooks,
    shutdown: &CancellationToken,
    drain: &CancellationToken,
) {
    let node = ep.node();
    let mut delays = None;
    loop {
        // Drained (a reload changed the policy): the transfer under way finished; start none.
        if drain.is_cancelled() {
            return;
        }
        let target = newest.borrow_and_update().clone();
        if let Some(snapshot) = target {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = async {
                    let report = {
                        // A slot first (other file sets may be sending to this replica); the
                        // target moves to the newest snapshot once the replica has answered,
                        // so one that came while this waited goes too.
                        let _admitted = tokio::select! {
                            admitted = hooks.admit(node) => admitted,
                            _ = drain.cancelled() => return Ok(()),
                        };
                        bring_up_to(origin, &snapshot, Some(&newest), ep, stall, hooks).await?
                    };
                    hooks.caught_up(node).await;
                    let snapshot = origin.list().await?.into_iter().find(|s| s.name.as_str() == report.snapshot).unwrap_or(snapshot);
                    // Backfill while nothing newer is waiting.
                    while !newest.has_changed().unwrap_or(true) && !drain.is_cancelled() {
                        let _admitted = hooks.admit(node).await;
                        match backfill_step(origin, &snapshot, ep, policy, stall, hooks, Utc::now()).await? {
                            Backfilled::Sent => hooks.caught_up(node).await,
                            Backfilled::Nothing => break,
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                } => r,
            };
            match attempt {
                Ok(()) => delays = None,
                Err(e) => {
                    let delay = delays.get_or_insert_with(retry_delays).next().unwrap_or(Duration::from_secs(300));
                    tracing::warn!(
                        fileset = %policy.fileset,
                        replica = node,
                        "retrying in {:.1}s (sooner if it was out of reach and answers again): {e:#}",
                        delay.as_secs_f64()
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = drain.cancelled() => return,
                        retry = hooks.wait_to_retry(ep, &e, delay, shutdown) => if retry { continue } else { return },
                        changed = newest.changed() => if changed.is_err() { return } else { continue },
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = drain.cancelled() => return,
            changed = newest.changed() => if changed.is_err() { return },
        }
    }
}

/// What one [`backfill_step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Backfilled {
    /// One missed snapshot went to the replica.
    Sent,
    /// Nothing to backfill (or the replica is not current: the newest goes first).
    Nothing,
}

/// Sends the oldest snapshot of the replica's backfill queue, if it is current (holds
/// `newest`, the newest snapshot the caller ships).
pub async fn backfill_step(
    origin: &dyn OriginSide,
    newest: &Snapshot,
    ep: &dyn ReplicaEndpoint,
    policy: &Policy,
    stall: Duration,
    hooks: &dyn Hooks,
    now: DateTime<Utc>,
) -> Result<Backfilled> {
    if !backfills(policy) {
        return Ok(Backfilled::Nothing);
    }
    let node = ep.node();
    let listing = list_replica(ep).await?;
    if !listing.snapshots.iter().any(|s| s.identity == newest.identity) {
        return Ok(Backfilled::Nothing);
    }
    let (step, pending) = {
        let _planning = hooks.planning().read().await;
        let held = origin.list().await?;
        let queue = backfill_queue(policy, &held, &listing.snapshots, now);
        hooks.backfill(node, queue.len(), 0);
        let Some(first) = queue.first() else { return Ok(Backfilled::Nothing) };
        let partial = listing.resumable.as_ref().filter(|p| p.identity == first.identity && (p.offset > 0 || p.token.is_some()));
        let plan = match partial.and_then(|p| base_of_partial(&held, p).map(|base| (base, p))) {
            Some((base, p)) => Plan::Send { base, resume: Some(p.clone()) },
            None => Plan::Send { base: backfill_base(&held, first, &listing.snapshots).cloned(), resume: None },
        };
        let step = Step { snapshot: first.clone(), plan, accepts_compact: listing.accepts_compact, backfill: true };
        hooks.planned(node, &step).await?;
        (step, queue.len())
    };
    tracing::info!(fileset = %policy.fileset, replica = node, snapshot = %step.snapshot.name, base = ?step.plan.base().map(|b| b.name.to_string()), pending, "backfilling a missed snapshot");
    let result = transfer(origin, &step, ep, stall, &|tally, from| hooks.started(node, &step, tally, from)).await;
    hooks.finished(node, &step.snapshot.name, &result).await;
    let report = result?;
    hooks.backfill(node, pending - 1, report.bytes);
    Ok(Backfilled::Sent)
}

/// Whether `policy`'s replicas get missed snapshots backfilled: snapshot and hybrid mode, on
/// btrfs. A ZFS replica cannot receive a snapshot older than its newest, so there the
/// history comes before the newest instead: the origin's (or relay's) `zfs send -I` from the
/// common base carries every snapshot in between in the stream to the newest
/// (`snapshot::zfs`), and the replica's pruning drops what its retention does not keep.
pub fn backfills(policy: &Policy) -> bool {
    policy.mode != Mode::Continuous && policy.backend == BackendKind::Btrfs
}

/// The snapshots of `origin` that a replica holding `replica_has` lacks and that its own
/// retention (the policy's `retention.replica`) would keep if it held them, oldest first.
/// Only the span of the replica's history counts (between its oldest and newest snapshot: a
/// new replica's history starts when it joins). Continuous snapshots (hybrid mode) come
/// only where `within` or `last` keep them. Pure.
pub fn backfill_queue(policy: &Policy, origin: &[Snapshot], replica_has: &[Snapshot], now: DateTime<Utc>) -> Vec<Snapshot> {
    let (Some(oldest), Some(newest)) = (replica_has.iter().map(|s| &s.name).min(), replica_has.iter().map(|s| &s.name).max()) else { return Vec::new() };
    if !backfills(policy) {
        return Vec::new();
    }
    let missing: Vec<&Snapshot> =
        // A name the replica holds under another identity is not sent either: it would refuse it.
        origin.iter().filter(|o| o.name > *oldest && o.name < *newest && !replica_has.iter().any(|r| r.identity == o.identity || r.name == o.name)).collect();
    if missing.is_empty() {
        return Vec::new();
    }
    let names: Vec<SnapshotName> = replica_has.iter().map(|s| s.name.clone()).chain(missing.iter().map(|s| s.name.clone())).collect();
    let plan = retention::plan(&names, &policy.retention.replica, policy.mode == Mode::Hybrid, now, &[]);
    let mut out: Vec<Snapshot> = missing
        .into_iter()
        .filter(|s| {
            plan.iter().find(|e| e.name == s.name).is_some_and(|e| match s.name.kind() {
                Kind::Continuous => e.keep.contains(&Reason::Within) || e.keep.contains(&Reason::Last),
                Kind::Scheduled => !e.keep.is_empty(),
            })
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The base for backfilling `snapshot`: of the snapshots both sides hold (by identity), the
/// one nearest to it in time, older or newer (btrfs takes any parent; the nearer, the less
/// the stream carries). Pure.
pub fn backfill_base<'a>(origin: &'a [Snapshot], snapshot: &Snapshot, replica_has: &[Snapshot]) -> Option<&'a Snapshot> {
    let at = snapshot.name.time();
    origin.iter().filter(|o| o.identity != snapshot.identity && replica_has.iter().any(|r| r.identity == o.identity)).min_by_key(|o| (o.name.time() - at).abs())
}

/// Called when a stream starts, with its live byte count (from the start of the stream, for
/// progress and status) and the offset it starts from (not 0 when resumed).
pub type OnStart<'a> = &'a (dyn Fn(Arc<Tally>, u64) + Send + Sync);

/// Carries out one step. `stall`: a sending process that produces nothing this long is killed.
pub async fn transfer(origin: &dyn OriginSide, step: &Step, ep: &dyn ReplicaEndpoint, stall: Duration, on_start: OnStart<'_>) -> Result<ReplicaReport> {
    let started_at = Instant::now();
    let snapshot = &step.snapshot;
    let report = |base: Option<&Snapshot>, bytes, resumed_from| ReplicaReport {
        node: ep.node().into(),
        snapshot: snapshot.name.to_string(),
        base: base.map(|b| b.name.to_string()),
        bytes,
        resumed_from,
        elapsed: started_at.elapsed(),
    };
    let Plan::Send { base, resume } = &step.plan else { return Ok(report(None, 0, 0)) };
    let mut incoming = Incoming {
        name: snapshot.name.clone(),
        identity: snapshot.identity.clone(),
        base: base.as_ref().map(|b| b.identity.clone()),
        from_token: false,
        fetched: false,
    };
    let open = |compact| async move { Ok::<_, anyhow::Error>(Metered::new(origin.send(snapshot, base.as_ref(), compact).await?.with_stall_timeout(stall))) };
    // Dropping a stream (on error) kills its sending process.
    let mut started = None;
    if let Some(token) = resume.as_ref().and_then(|p| p.token.as_ref()) {
        // The replica's filesystem kept the partial receive: ZFS resumes it (a new stream), if
        // the token resumes this very stream; else the stream starts over below.
        tracing::info!(replica = ep.node(), snapshot = %snapshot.name, "resuming from the replica's ZFS resume token");
        match origin.send_resumed(token, snapshot, base.as_ref()).await {
            Ok(stream) => {
                incoming.from_token = true;
                let stream = Metered::new(stream.with_stall_timeout(stall));
                started = Some((stream, StreamStart { compact: resume.as_ref().is_some_and(|p| p.compact), start: Start::FromToken }));
            }
            Err(e) => tracing::warn!(replica = ep.node(), snapshot = %snapshot.name, "not resuming from the replica's ZFS resume token: {e:#}"),
        }
    } else if let Some(p) = resume {
        let mut reader = open(p.compact).await?;
        match skip_prefix(&mut reader, p).await? {
            Some(hasher) => started = Some((reader, StreamStart { compact: p.compact, start: Start::Resume(Resumed { offset: p.offset, hasher }) })),
            None => tracing::warn!(
                replica = ep.node(), snapshot = %snapshot.name, offset = p.offset,
                "the regenerated stream differs from what the replica holds: sending it again from the start"
            ),
        }
    }
    let (mut reader, start_at) = match started {
        Some(s) => s,
        None => {
            let compact = step.accepts_compact;
            (open(compact).await?, StreamStart { compact, start: Start::Fresh })
        }
    };
    let from = start_at.offset();
    on_start(reader.tally(), from);
    ep.receive(&incoming, start_at, &mut reader).await?;
    Ok(report(base.as_ref(), reader.bytes(), from))
}

/// Reads the first `partial.offset` bytes of a regenerated stream: if they hash as the
/// replica's do, the hasher to go on with; `None` if the stream differs (or is shorter).
async fn skip_prefix(stream: &mut (dyn AsyncRead + Send + Unpin), partial: &Partial) -> Result<Option<blake3::Hasher>> {
    let mut hasher = blake3::Hasher::new();
    let mut left = partial.offset;
    let mut buf = vec![0u8; snapshot::PIPE_BUFFER];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = stream.read(&mut buf[..want]).await.context("regenerating the send stream to resume it")?;
        if n == 0 {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok((hasher.finalize().to_hex().as_str() == partial.blake3).then_some(hasher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Kind, SendStream, SnapshotName};
    use async_trait::async_trait;

    /// An origin that only lists: planning needs nothing else.
    struct Listed(Vec<Snapshot>);

    #[async_trait]
    impl OriginSide for Listed {
        async fn take_snapshot(&self, _: Kind) -> Result<Snapshot> {
            unimplemented!("planning takes no snapshot")
        }
        async fn changed_since(&self, _: &Snapshot, _: bool) -> Result<bool> {
            unimplemented!("planning checks no change")
        }
        async fn list(&self) -> Result<Vec<Snapshot>> {
            Ok(self.0.clone())
        }
        async fn send(&self, _: &Snapshot, _: Option<&Snapshot>, _: bool) -> Result<SendStream> {
            unimplemented!("planning sends nothing")
        }
        async fn delete(&self, _: &Snapshot) -> Result<()> {
            unimplemented!("planning deletes nothing")
        }
    }

    fn snap(hour: u32, identity: &str) -> Snapshot {
        let name = SnapshotName::parse(&format!("snapship-20260101T{hour:02}0000.000Z")).unwrap();
        Snapshot { name, identity: identity.into(), local_id: None, parent_local_id: None }
    }

    fn partial(s: &Snapshot, base: Option<&str>, offset: u64) -> Partial {
        let blake3 = String::from("h");
        Partial { snapshot: s.name.to_string(), identity: s.identity.clone(), base: base.map(Into::into), compact: true, offset, blake3, token: None }
    }

    fn plan_base(plan: &Plan) -> (Option<String>, Option<u64>) {
        match plan {
            Plan::Send { base, resume } => (base.as_ref().map(|b| b.identity.clone()), resume.as_ref().map(|r| r.offset)),
            Plan::AlreadyThere => panic!("expected a send"),
        }
    }

    /// A policy in `mode` on `backend` with the replica's retention `rules` (YAML flow map).
    fn policy(mode: &str, backend: &str, rules: &str) -> Policy {
        let file = std::path::Path::new("/nonexistent/node.yaml");
        let node = crate::config::parse_node_text(
            file,
            "node: alpha\nstate_dir: state\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n  beta: 127.0.0.1:1\npolicies: []\n",
        )
        .unwrap();
        let (origin, replica) = if backend == "zfs" { ("tank/projects", "backup/projects") } else { ("/srv/projects", "/backup/projects") };
        let schedule = if mode == "continuous" { "continuous:\n  min_interval: 1s\n".to_string() } else { "schedule: \"@hourly\"\n".to_string() };
        let text = format!(
            "fileset: projects\nbackend: {backend}\nmode: {mode}\n{schedule}origin:\n  node: alpha\n  path: {origin}\nreplicas:\n  - node: beta\n    path: {replica}\nretention:\n  replica: {rules}\n"
        );
        crate::config::parse_policy_text(std::path::Path::new("/nonexistent/projects.yaml"), &text, &node).unwrap()
    }

    /// A snapshot at `hh:mm` on 2026-01-01, continuous when `continuous`; its identity is its time.
    fn at(hh: u32, mm: u32, continuous: bool) -> Snapshot {
        let suffix = if continuous { "-c" } else { "" };
        let name = SnapshotName::parse(&format!("snapship-20260101T{hh:02}{mm:02}00.000Z{suffix}")).unwrap();
        Snapshot { name, identity: format!("{hh:02}{mm:02}"), local_id: None, parent_local_id: None }
    }

    fn names(list: &[Snapshot]) -> Vec<String> {
        list.iter().map(|s| s.identity.clone()).collect()
    }

    fn now() -> DateTime<Utc> {
        "2026-01-01T06:10:00Z".parse().unwrap()
    }

    #[test]
    fn backfill_sends_what_the_replicas_retention_keeps_oldest_first() {
        // The origin kept every hourly snapshot and two continuous ones; the replica was
        // away from 00:00 to 06:00 and has just received the newest.
        let mut origin: Vec<Snapshot> = (0..=6).map(|h| at(h, 0, false)).collect();
        origin.extend([at(1, 30, true), at(5, 50, true)]);
        origin.sort_by(|a, b| a.name.cmp(&b.name));
        let replica = [at(0, 0, false), at(6, 0, false)];
        let hybrid = policy("hybrid", "btrfs", "{ within: 30m, hourly: 48 }");
        // Every missed hour; of the continuous ones only what `within` keeps (05:50).
        assert_eq!(names(&backfill_queue(&hybrid, &origin, &replica, now())), ["0100", "0200", "0300", "0400", "0500", "0550"]);
        // Snapshot mode (scheduled snapshots only): what `hourly` keeps.
        let scheduled: Vec<Snapshot> = (0..=6).map(|h| at(h, 0, false)).collect();
        let snapshot_mode = policy("snapshot", "btrfs", "{ hourly: 3 }");
        assert_eq!(names(&backfill_queue(&snapshot_mode, &scheduled, &replica, now())), ["0400", "0500"], "hourly: 3 keeps 04, 05 and 06");
        // What the replica's rules would delete is not sent.
        let daily = policy("hybrid", "btrfs", "{ daily: 7 }");
        assert!(backfill_queue(&daily, &origin, &replica, now()).is_empty(), "one per day: the replica keeps 06:00 only");
        // Nothing it holds, by identity or by name.
        let mut renamed = replica.to_vec();
        renamed.push(Snapshot { identity: "other".into(), ..at(3, 0, false) });
        assert!(!names(&backfill_queue(&hybrid, &origin, &renamed, now())).contains(&"0300".to_string()));
        // Nothing before the replica's history began.
        let joined = [at(3, 0, false), at(4, 0, false), at(6, 0, false)];
        assert_eq!(names(&backfill_queue(&hybrid, &origin, &joined, now())), ["0500", "0550"]);
        // Continuous mode and ZFS never backfill.
        assert!(backfill_queue(&policy("continuous", "btrfs", "{ last: 10 }"), &origin, &replica, now()).is_empty());
        assert!(backfill_queue(&policy("hybrid", "zfs", "{ hourly: 48 }"), &origin, &replica, now()).is_empty());
        // A replica without rules keeps all it gets: scheduled history yes, continuous no.
        let keep_all = policy("hybrid", "btrfs", "{}");
        assert_eq!(names(&backfill_queue(&keep_all, &origin, &replica, now())), ["0100", "0200", "0300", "0400", "0500"]);
    }

    #[test]
    fn a_backfilled_snapshot_goes_from_the_nearest_held_one_either_side() {
        let origin: Vec<Snapshot> = (0..=6).map(|h| at(h, 0, false)).collect();
        let replica = [at(0, 0, false), at(5, 0, false), at(6, 0, false)];
        assert_eq!(backfill_base(&origin, &at(4, 0, false), &replica).unwrap().identity, "0500", "newer and nearer");
        assert_eq!(backfill_base(&origin, &at(1, 0, false), &replica).unwrap().identity, "0000");
        // Only what both hold counts.
        assert_eq!(backfill_base(&origin[..2], &at(1, 0, false), &replica).unwrap().identity, "0000");
        assert!(backfill_base(&origin, &at(1, 0, false), &[]).is_none());
    }

    #[tokio::test]
    async fn a_partial_of_the_target_is_resumed_from_its_own_base() {
        let (a, b, c) = (snap(1, "a"), snap(2, "b"), snap(3, "c"));
        let origin = Listed(vec![a.clone(), b.clone(), c.clone()]);
        // The replica holds a and b; the partial of c was started from a (b arrived since,
        // say from a sync elsewhere): the partial's own base is what the stream needs.
        let p = partial(&c, Some("a"), 1000);
        let plan = plan_from(&origin, &c, &[a.clone(), b.clone()], Some(&p)).await.unwrap();
        assert_eq!(plan_base(&plan), (Some("a".into()), Some(1000)));
        // Without a partial: the newest common base, from zero.
        let plan = plan_from(&origin, &c, &[a.clone(), b.clone()], None).await.unwrap();
        assert_eq!(plan_base(&plan), (Some("b".into()), None));
    }

    #[tokio::test]
    async fn a_partial_whose_base_is_gone_is_sent_again() {
        let (b, c) = (snap(2, "b"), snap(3, "c"));
        let origin = Listed(vec![b.clone(), c.clone()]); // a was pruned on the origin
        let p = partial(&c, Some("a"), 1000);
        let plan = plan_from(&origin, &c, std::slice::from_ref(&b), Some(&p)).await.unwrap();
        assert_eq!(plan_base(&plan), (Some("b".into()), None));
        // A partial of another snapshot does not change the target's plan.
        let other = partial(&snap(4, "d"), Some("b"), 5);
        assert_eq!(plan_base(&plan_from(&origin, &c, std::slice::from_ref(&b), Some(&other)).await.unwrap()), (Some("b".into()), None));
    }

    #[tokio::test]
    async fn an_older_partial_is_finished_first() {
        let (a, b, c) = (snap(1, "a"), snap(2, "b"), snap(3, "c"));
        let origin = Listed(vec![a.clone(), b.clone(), c.clone()]);
        let (older, plan) = partial_to_finish(&origin, &c, Some(&partial(&b, Some("a"), 700))).await.unwrap().unwrap();
        assert_eq!(older.identity, "b");
        assert_eq!(plan_base(&plan), (Some("a".into()), Some(700)));
        // Nothing held yet, or the partial is of the target itself, or unknown: nothing first.
        assert!(partial_to_finish(&origin, &c, Some(&partial(&b, Some("a"), 0))).await.unwrap().is_none());
        assert!(partial_to_finish(&origin, &c, Some(&partial(&c, Some("b"), 9))).await.unwrap().is_none());
        assert!(partial_to_finish(&origin, &c, Some(&partial(&snap(0, "x"), None, 9))).await.unwrap().is_none());
        // A ZFS token counts even at offset 0 (the filesystem holds the data).
        let mut token = partial(&b, None, 0);
        token.token = Some("1-abc".into());
        let (older, plan) = partial_to_finish(&origin, &c, Some(&token)).await.unwrap().unwrap();
        assert_eq!((older.identity.as_str(), plan_base(&plan)), ("b", (None, Some(0))));
    }

    /// An origin whose resume tokens are all refused (as a ZFS origin refuses a token for
    /// another stream) and whose fresh sends stream "fresh".
    struct RefusesTokens;

    #[async_trait]
    impl OriginSide for RefusesTokens {
        async fn take_snapshot(&self, _: Kind) -> Result<Snapshot> {
            unimplemented!("the transfer takes no snapshot")
        }
        async fn changed_since(&self, _: &Snapshot, _: bool) -> Result<bool> {
            unimplemented!("the transfer checks no change")
        }
        async fn list(&self) -> Result<Vec<Snapshot>> {
            Ok(Vec::new())
        }
        async fn send(&self, _: &Snapshot, _: Option<&Snapshot>, _: bool) -> Result<SendStream> {
            let mut process = snapshot::runner::Cmd::new("printf").arg("fresh").spawn(snapshot::runner::Pipe::Out)?;
            Ok(SendStream::new(Box::new(process.stdout()), process))
        }
        async fn send_resumed(&self, _: &str, s: &Snapshot, _: Option<&Snapshot>) -> Result<SendStream> {
            anyhow::bail!("the replica offered a resume token for another snapshot, not for {}; the origin starts over", s.name)
        }
        async fn delete(&self, _: &Snapshot) -> Result<()> {
            unimplemented!("the transfer deletes nothing")
        }
    }

    /// A replica endpoint that records what it was sent.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<(bool, bool, Vec<u8>)>>);

    #[async_trait]
    impl ReplicaEndpoint for Recorder {
        fn node(&self) -> &str {
            "beta"
        }
        async fn list(&self) -> Result<Listing> {
            Ok(Listing::default())
        }
        async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await?;
            self.0.lock().unwrap().push((incoming.from_token, matches!(start.start, Start::FromToken), bytes));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_resume_token_starts_the_stream_over() {
        let c = snap(3, "c");
        let mut p = partial(&c, None, 0);
        p.token = Some("1-abc".into());
        let step = Step { snapshot: c, plan: Plan::Send { base: None, resume: Some(p) }, accepts_compact: false, backfill: false };
        let ep = Recorder::default();
        let report = transfer(&RefusesTokens, &step, &ep, Duration::from_secs(30), &|_, _| {}).await.unwrap();
        // A fresh stream from the start, and the replica told it is not a token's.
        assert_eq!(report.resumed_from, 0);
        assert_eq!(*ep.0.lock().unwrap(), [(false, false, b"fresh".to_vec())]);
    }

    #[tokio::test]
    async fn a_regenerated_prefix_is_checked_by_hash() {
        let data = vec![5u8; 3 << 20];
        let mut p = partial(&snap(1, "a"), None, 2 << 20);
        p.blake3 = blake3::hash(&data[..2 << 20]).to_hex().to_string();
        let mut same = &data[..];
        let hasher = skip_prefix(&mut same, &p).await.unwrap().expect("the same stream resumes");
        assert_eq!(same.len(), 1 << 20, "exactly the prefix was read");
        let mut whole = hasher.clone();
        whole.update(same);
        assert_eq!(whole.finalize(), blake3::hash(&data));
        let mut changed = data.clone();
        changed[100] ^= 1;
        assert!(skip_prefix(&mut &changed[..], &p).await.unwrap().is_none(), "a different stream starts over");
        assert!(skip_prefix(&mut &data[..1 << 20], &p).await.unwrap().is_none(), "a shorter stream starts over");
    }
}
