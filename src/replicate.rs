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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::RwLock;

use crate::ship::meter::{Metered, Tally};
use crate::ship::{Listing, Partial, ReplicaEndpoint, Resumed, Start, StreamStart};
use crate::snapshot::{self, Incoming, OriginSide, Snapshot, SnapshotName, common_base};

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
    let node = ep.node();
    loop {
        let mut sending = target.name.clone();
        let result = async {
            // Ask the replica first, outside the planning lock: a slow replica must not hold
            // up the caller's pruning, and through it everything else.
            let listing = list_replica(ep).await?;
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
        return Ok(Step { snapshot: older, plan, accepts_compact: listing.accepts_compact });
    }
    let plan = plan_from(origin, target, &listing.snapshots, listing.resumable.as_ref()).await?;
    Ok(Step { snapshot: target.clone(), plan, accepts_compact: listing.accepts_compact })
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
    let mut incoming =
        Incoming { name: snapshot.name.clone(), identity: snapshot.identity.clone(), base: base.as_ref().map(|b| b.identity.clone()), from_token: false };
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
        let step = Step { snapshot: c, plan: Plan::Send { base: None, resume: Some(p) }, accepts_compact: false };
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
