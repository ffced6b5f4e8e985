//! The replication logic: snapshot a file set and bring each replica up to it.
//!
//! For each replica: ask what it holds, pick the common base by identity, open a send stream
//! (incremental from the base, full without one) and hand it to the replica's endpoint. The
//! replicas of one file set are served concurrently, and one replica's failure never stops
//! the others. This module knows nothing of filesystems or networks: it drives the
//! [`OriginSide`] and [`ReplicaEndpoint`] traits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{LoadedConfig, Policy};
use crate::ship::local::LocalReplica;
use crate::ship::meter::{Metered, Tally};
use crate::ship::quic::{Connector, RemoteReplica};
use crate::ship::{Partial, ReplicaEndpoint, Resumed, StreamStart};
use crate::snapshot::{self, Incoming, Kind, OriginSide, Snapshot, SnapshotName, common_base};
use crate::state::StateStore;

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

/// The endpoints of `policy`'s replicas as seen from this node, the origin: a local pipe
/// for a replica on this node, QUIC for the others (through `connector`, made on first need).
pub fn endpoints(config: &LoadedConfig, policy: &Policy, connector: &mut Option<Arc<Connector>>) -> Result<Vec<Arc<dyn ReplicaEndpoint>>> {
    let here = &config.node.node;
    let mut out: Vec<Arc<dyn ReplicaEndpoint>> = Vec::new();
    for replica in &policy.replicas {
        if &replica.node == here {
            out.push(Arc::new(LocalReplica::new(replica.node.0.clone(), policy.clone(), snapshot::replica_for(policy, replica)?)));
            continue;
        }
        let addr = config.node.peers.get(&replica.node).ok_or_else(|| anyhow!("replica `{}` is not in peers", replica.node))?;
        let connector = match connector {
            Some(c) => c.clone(),
            None => connector.insert(Arc::new(Connector::new(&config.node)?)).clone(),
        };
        let stall = config.node.transfers.stall_timeout.0;
        out.push(Arc::new(RemoteReplica::new(replica.node.0.clone(), addr.clone(), policy.fileset.0.clone(), policy.transfer.clone(), stall, connector)));
    }
    Ok(out)
}

/// `snapship sync`: snapshot `policy`'s file set now and ship it to every replica. A file set
/// in a consistency group brings its whole group along: all are snapshotted at one point in
/// time, and each is shipped; one report per file set.
/// `on_start` sees each replica's stream as it starts (replica name, byte count).
pub async fn sync(config: &LoadedConfig, policy: &Policy, on_start: &(dyn Fn(&str, Arc<Tally>) + Send + Sync)) -> Result<Vec<SyncReport>> {
    if policy.origin.node != config.node.node {
        bail!("this node is `{}`, but file set `{}` has its origin on `{}`; run sync there", config.node.node, policy.fileset, policy.origin.node);
    }
    let members = config.group_of(policy);
    let origins = members.iter().map(|p| snapshot::origin_for(p)).collect::<Result<Vec<_>>>()?;
    let mut connector = None;
    let endpoints = members.iter().map(|p| endpoints(config, p, &mut connector)).collect::<Result<Vec<_>>>()?;
    let snaps = if members.len() == 1 {
        vec![origins[0].take_snapshot(Kind::Scheduled).await.with_context(|| format!("file set `{}`: cannot take a snapshot", policy.fileset))?]
    } else {
        let sides: Vec<(&str, &dyn OriginSide)> = members.iter().zip(&origins).map(|(p, o)| (p.origin.path.as_str(), o.as_ref())).collect();
        snapshot::take_group(policy.backend, &sides, Kind::Scheduled)
            .await
            .with_context(|| format!("group `{}`: cannot take the snapshots", policy.group.as_ref().expect("a group")))?
    };
    let mut reports = Vec::new();
    for (((member, origin), snap), eps) in members.iter().zip(&origins).zip(snaps).zip(&endpoints) {
        tracing::info!(fileset = %member.fileset, snapshot = %snap.name, "snapshot taken");
        let jobs = eps.iter().map(|ep| async {
            let node = ep.node().to_string();
            let stall = config.node.transfers.stall_timeout.0;
            let result = ship_to(origin.as_ref(), &snap, ep.as_ref(), stall, &|tally, _from| on_start(&node, tally)).await;
            log_outcome(&member.fileset.0, ep.node(), &result);
            (ep.node().to_string(), result)
        });
        let replicas = futures::future::join_all(jobs).await;
        let state = StateStore::open(&config.node.state_dir, &member.fileset.0)?;
        for (node, result) in &replicas {
            record_outcome(&state, origin.as_ref(), &member.fileset.0, node, &snap.name, result).await;
        }
        reports.push(SyncReport { fileset: member.fileset.0.clone(), snapshot: snap, replicas });
    }
    Ok(reports)
}

/// Records in `state` how the transfer of `snapshot` to `replica` ended; on success the
/// snapshot is the new common base, guarded on the origin where the filesystem can.
pub async fn record_outcome(
    state: &StateStore,
    origin: &dyn OriginSide,
    fileset: &str,
    replica: &str,
    snapshot: &SnapshotName,
    result: &Result<ReplicaReport>,
) {
    match state.record_outcome(replica, snapshot, result).await {
        Err(e) => tracing::error!(fileset, "cannot record the state: {e:#}"),
        Ok(previous) if result.is_ok() => {
            if let Err(e) = origin.keep_base(replica, snapshot, previous.as_ref()).await {
                tracing::warn!(fileset, replica, "cannot guard the new common base: {e:#}");
            }
        }
        Ok(_) => {}
    }
}

pub fn log_outcome(fileset: &str, replica: &str, result: &Result<ReplicaReport>) {
    match result {
        Ok(r) => tracing::info!(
            fileset, replica, snapshot = %r.snapshot, base = r.base.as_deref().unwrap_or("none (full)"), bytes = r.bytes,
            secs = format!("{:.2}", r.elapsed.as_secs_f64()), "replica up to date"
        ),
        Err(e) => tracing::error!(fileset, replica, "replication failed: {e:#}"),
    }
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

/// Asks the replica what it holds and picks the base: the newest common snapshot older than
/// `snapshot`, by identity.
pub async fn plan(origin: &dyn OriginSide, snapshot: &Snapshot, ep: &dyn ReplicaEndpoint) -> Result<Plan> {
    let replica_has = list_replica(ep).await?;
    plan_from(origin, snapshot, &replica_has, ep.partial().await.as_ref()).await
}

/// What `ep` holds; a replica that does not answer within a minute is an error.
pub async fn list_replica(ep: &dyn ReplicaEndpoint) -> Result<Vec<Snapshot>> {
    let what = || format!("cannot list the snapshots of replica `{}`", ep.node());
    tokio::time::timeout(LIST_TIMEOUT, ep.list())
        .await
        .map_err(|_| anyhow!("no answer within {}s", LIST_TIMEOUT.as_secs()))
        .with_context(what)?
        .with_context(what)
}

const LIST_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Carries out `plan`. `stall`: a sending process that produces nothing this long is killed.
pub async fn transfer(
    origin: &dyn OriginSide,
    snapshot: &Snapshot,
    plan: &Plan,
    ep: &dyn ReplicaEndpoint,
    stall: Duration,
    on_start: OnStart<'_>,
) -> Result<ReplicaReport> {
    let start = Instant::now();
    let report = |base: Option<&Snapshot>, bytes, resumed_from| ReplicaReport {
        node: ep.node().into(),
        snapshot: snapshot.name.to_string(),
        base: base.map(|b| b.name.to_string()),
        bytes,
        resumed_from,
        elapsed: start.elapsed(),
    };
    let Plan::Send { base, resume } = plan else { return Ok(report(None, 0, 0)) };
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
                started = Some((stream, StreamStart { compact: resume.as_ref().is_some_and(|p| p.compact), resumed: None, from_token: true }));
            }
            Err(e) => tracing::warn!(replica = ep.node(), snapshot = %snapshot.name, "not resuming from the replica's ZFS resume token: {e:#}"),
        }
    } else if let Some(p) = resume {
        let mut reader = open(p.compact).await?;
        match skip_prefix(&mut reader, p).await? {
            Some(hasher) => {
                started = Some((reader, StreamStart { compact: p.compact, resumed: Some(Resumed { offset: p.offset, hasher }), from_token: false }))
            }
            None => tracing::warn!(
                replica = ep.node(), snapshot = %snapshot.name, offset = p.offset,
                "the regenerated stream differs from what the replica holds: sending it again from the start"
            ),
        }
    }
    let (mut reader, start_at) = match started {
        Some(s) => s,
        None => {
            let compact = ep.accepts_compact().await;
            (open(compact).await?, StreamStart { compact, resumed: None, from_token: false })
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

/// Brings one replica up to `snapshot`, incremental from the common base when there is one;
/// a partial transfer the replica holds is finished first.
pub async fn ship_to(origin: &dyn OriginSide, snapshot: &Snapshot, ep: &dyn ReplicaEndpoint, stall: Duration, on_start: OnStart<'_>) -> Result<ReplicaReport> {
    let mut replica_has = list_replica(ep).await?;
    let mut partial = ep.partial().await;
    if let Some((older, plan)) = partial_to_finish(origin, snapshot, partial.as_ref()).await? {
        transfer(origin, &older, &plan, ep, stall, on_start).await.with_context(|| format!("finishing the cut transfer of {}", older.name))?;
        replica_has = list_replica(ep).await?;
        partial = None;
    }
    let plan = plan_from(origin, snapshot, &replica_has, partial.as_ref()).await?;
    transfer(origin, snapshot, &plan, ep, stall, on_start).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SendStream, SnapshotName};
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
        let plan = plan_from(&origin, &c, &[b.clone()], Some(&p)).await.unwrap();
        assert_eq!(plan_base(&plan), (Some("b".into()), None));
        // A partial of another snapshot does not change the target's plan.
        let other = partial(&snap(4, "d"), Some("b"), 5);
        assert_eq!(plan_base(&plan_from(&origin, &c, &[b.clone()], Some(&other)).await.unwrap()), (Some("b".into()), None));
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
            bail!("the replica offered a resume token for another snapshot, not for {}; the origin starts over", s.name)
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
        async fn list(&self) -> Result<Vec<Snapshot>> {
            Ok(Vec::new())
        }
        async fn accepts_compact(&self) -> bool {
            false
        }
        async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await?;
            self.0.lock().unwrap().push((incoming.from_token, start.from_token, bytes));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_resume_token_starts_the_stream_over() {
        let c = snap(3, "c");
        let mut p = partial(&c, None, 0);
        p.token = Some("1-abc".into());
        let plan = Plan::Send { base: None, resume: Some(p) };
        let ep = Recorder::default();
        let report = transfer(&RefusesTokens, &c, &plan, &ep, Duration::from_secs(30), &|_, _| {}).await.unwrap();
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
