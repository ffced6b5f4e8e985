//! The roles tested end to end without root, in seconds: a fake origin (its send streams
//! are `cat` of files), the real replication logic and protocol client, the in-process link,
//! the real replica service with its sessions and spool, and a fake replica backend that
//! keeps what it received in memory. What is faked is only the filesystem.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::config::{self, LoadedConfig};
use crate::observe::status::StatusBoard;
use crate::replica::ReplicaService;
use crate::replicate;
use crate::ship::client::PeerReplica;
use crate::ship::local::{self, LocalLink};
use crate::ship::protocol::ErrorCode;
use crate::ship::{ReplicaEndpoint, Resumed, Start, StreamStart};
use crate::snapshot::runner::{Cmd, Pipe};
use crate::snapshot::{Incoming, Kind, OriginSide, ReplicaSide, SendStream, Snapshot, SnapshotName};
use crate::store::{Epoch, EpochStore};

/// An origin whose snapshots are files of bytes; a send stream is `cat` of the file (the
/// stream of an incremental is the same bytes: the fake replica does not care).
struct FakeOrigin {
    dir: PathBuf,
    snapshots: Mutex<Vec<Snapshot>>,
}

impl FakeOrigin {
    fn new(dir: PathBuf) -> FakeOrigin {
        FakeOrigin { dir, snapshots: Mutex::default() }
    }

    /// Adds a snapshot whose stream is `bytes`.
    fn add(&self, hour: u32, bytes: &[u8]) -> Snapshot {
        let name = SnapshotName::parse(&format!("snapship-20260101T{hour:02}0000.000Z")).unwrap();
        std::fs::write(self.dir.join(name.as_str()), bytes).unwrap();
        let s = Snapshot { name, identity: format!("id-{hour}"), local_id: None, parent_local_id: None };
        self.snapshots.lock().unwrap().push(s.clone());
        s
    }
}

#[async_trait]
impl OriginSide for FakeOrigin {
    async fn take_snapshot(&self, _: Kind) -> Result<Snapshot> {
        bail!("the tests add snapshots by hand")
    }
    async fn changed_since(&self, _: &Snapshot, _: bool) -> Result<bool> {
        Ok(false)
    }
    async fn list(&self) -> Result<Vec<Snapshot>> {
        Ok(self.snapshots.lock().unwrap().clone())
    }
    async fn send(&self, snapshot: &Snapshot, _: Option<&Snapshot>, _: bool) -> Result<SendStream> {
        let mut process = Cmd::new("cat").arg(self.dir.join(snapshot.name.as_str())).spawn(Pipe::Out)?;
        let out = process.stdout();
        Ok(SendStream::new(Box::new(out), process))
    }
    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        self.snapshots.lock().unwrap().retain(|s| s.name != snapshot.name);
        Ok(())
    }
}

/// What a fake replica holds: each snapshot with the stream it was received from.
type Held = Arc<Mutex<Vec<(Snapshot, Vec<u8>)>>>;

/// A replica that keeps received streams in memory.
#[derive(Clone, Default)]
struct FakeReplica {
    held: Held,
    /// How long its preparation for a stream takes, and how many preparations ended.
    prepare_delay: Arc<Mutex<Duration>>,
    prepared: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether each stream received was one this node fetched (`Incoming::fetched`).
    fetched: Arc<Mutex<Vec<bool>>>,
}

#[async_trait]
impl ReplicaSide for FakeReplica {
    async fn list(&self) -> Result<Vec<Snapshot>> {
        Ok(self.held.lock().unwrap().iter().map(|(s, _)| s.clone()).collect())
    }
    async fn accepts_compact(&self) -> bool {
        false
    }
    async fn prepare(&self, _: &Incoming) -> Result<()> {
        let delay = *self.prepare_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.prepared.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<Snapshot> {
        if let Some(base) = &incoming.base {
            if !self.held.lock().unwrap().iter().any(|(s, _)| &s.identity == base) {
                bail!("base {base} is not held");
            }
        }
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        self.fetched.lock().unwrap().push(incoming.fetched);
        let s = Snapshot { name: incoming.name.clone(), identity: incoming.identity.clone(), local_id: None, parent_local_id: None };
        self.held.lock().unwrap().push((s.clone(), bytes));
        Ok(s)
    }
    async fn delete(&self, snapshot: &Snapshot) -> Result<()> {
        self.held.lock().unwrap().retain(|(s, _)| s.name != snapshot.name);
        Ok(())
    }
}

/// beta holds a replica of `projects`, whose origin is alpha; the replica service runs on
/// the in-process link, and `origin` is how alpha (or whoever `peer` is) reaches it.
struct Fixture {
    _dir: tempfile::TempDir,
    policy: crate::config::Policy,
    origin: FakeOrigin,
    replica: FakeReplica,
    service: Arc<ReplicaService>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

const STALL: Duration = Duration::from_secs(3);

impl Fixture {
    fn new(retention: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let node_file = dir.path().join("beta.yaml");
        let node = config::parse_node_text(&node_file, "node: beta\nlisten: 127.0.0.1:1\nstate_dir: state\ntls:\n  ca: ca.pem\n  cert: beta.pem\n  key: beta.key\npeers:\n  alpha: 127.0.0.1:2\n  gamma: 127.0.0.1:3\npolicies: []\n").unwrap();
        // beta's replica directory is real (verify reads the snapshots' files there).
        let backup = dir.path().join("backup");
        let text = format!(
            "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/projects\nreplicas:\n  - node: beta\n    path: {}\n  - node: gamma\n    path: /backup/projects\n{retention}",
            backup.display()
        );
        let policy = config::parse_policy_text(&dir.path().join("projects.yaml"), &text, &node).unwrap();
        let loaded = Arc::new(LoadedConfig { node, policies: vec![policy.clone()], errors: vec![] });
        let replica = FakeReplica::default();
        let backend = replica.clone();
        let epochs = Arc::new(EpochStore::open(&loaded.node.state_dir));
        let backends: crate::replica::service::Backends = Arc::new(move |_, _| Ok(Box::new(backend.clone()) as Box<dyn ReplicaSide>));
        let service = ReplicaService::new(loaded.clone(), epochs, StatusBoard::new("beta"), backends);
        let origin_dir = dir.path().join("origin");
        std::fs::create_dir(&origin_dir).unwrap();
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(service.sessions().clone().watch(shutdown.clone()));
        Fixture { _dir: dir, policy, origin: FakeOrigin::new(origin_dir), replica, service, shutdown, tasks }
    }

    /// An endpoint for the replica as `peer` reaches it (the link names the peer).
    fn endpoint(&self, peer: &str) -> PeerReplica {
        let (link, streams) = LocalLink::pair(peer);
        self.tasks.spawn(local::serve(streams, self.service.clone(), self.shutdown.clone()));
        // Uncompressed, so that what a cut leaves on the replica is predictable.
        let transfer = config::Transfer { compression: config::units::Compression::None, ..Default::default() };
        // The peer acts in epoch 0 as the origin it claims to be.
        let epoch = Epoch { number: 0, origin: peer.to_string() };
        PeerReplica::new("beta".into(), "projects".into(), transfer, STALL, Arc::new(link), Arc::new(move || Ok(epoch.clone())))
    }

    fn held(&self) -> Vec<(String, Vec<u8>)> {
        self.replica.held.lock().unwrap().iter().map(|(s, b)| (s.name.to_string(), b.clone())).collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.service.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// `len` bytes of pseudo-random data (xorshift), the same for the same seed.
fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_snapshot_goes_through_the_service_and_is_listed() {
    let f = Fixture::new("");
    let ep = f.endpoint("alpha");
    let s1 = f.origin.add(1, &data(3 << 20, 1));
    let report = replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert_eq!((report.base, report.bytes), (None, 3 << 20));
    assert_eq!(f.held(), vec![(s1.name.to_string(), data(3 << 20, 1))]);
    // The next one goes incrementally from the first.
    let s2 = f.origin.add(2, &data(1000, 2));
    let report = replicate::bring_up_to_date(&f.origin, &s2, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert_eq!(report.base.as_deref(), Some(s1.name.as_str()));
    let listing = ep.list().await.unwrap();
    assert_eq!(listing.snapshots.iter().map(|s| s.identity.as_str()).collect::<Vec<_>>(), ["id-1", "id-2"]);
    assert!(listing.resumable.is_none());
    f.stop().await;
}

/// A backend's preparation that takes long (ZFS: setting diverged data aside, a local copy)
/// is answered `Busy` and goes on without the request; the origin's next try is received.
#[tokio::test]
async fn a_long_preparation_is_busy_then_done_without_the_request() {
    let f = Fixture::new("");
    let ep = f.endpoint("alpha");
    *f.replica.prepare_delay.lock().unwrap() = Duration::from_secs(3);
    let s1 = f.origin.add(1, &data(1000, 3));
    let err = replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("Busy") && format!("{err:#}").contains("retry in a moment"), "{err:#}");
    assert!(f.held().is_empty());
    // The request went away; the preparation was not cut.
    tokio::time::timeout(Duration::from_secs(10), async {
        while f.replica.prepared.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the preparation ended");
    *f.replica.prepare_delay.lock().unwrap() = Duration::ZERO;
    replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert_eq!(f.held(), vec![(s1.name.to_string(), data(1000, 3))]);
    f.stop().await;
}

#[tokio::test]
async fn a_peer_that_is_not_the_origin_gets_nothing() {
    let f = Fixture::new("");
    let ep = f.endpoint("gamma");
    let err = ep.list().await.unwrap_err();
    let refused = err.downcast_ref::<crate::ship::client::Refused>().expect("a refusal");
    assert_eq!(refused.code, ErrorCode::Unauthorized);
    assert!(refused.message.contains("not the origin"), "{}", refused.message);
    let s1 = f.origin.add(1, b"hostile");
    let err = replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("Unauthorized"), "{err:#}");
    assert!(f.held().is_empty(), "a non-origin peer wrote to the replica");
    f.stop().await;
}

#[tokio::test]
async fn a_future_dated_snapshot_is_refused() {
    let f = Fixture::new("");
    let ep = f.endpoint("alpha");
    let future = SnapshotName::next(chrono::Utc::now() + chrono::Duration::days(400), None, Kind::Scheduled);
    std::fs::write(f.origin.dir.join(future.as_str()), b"x").unwrap();
    let s = Snapshot { name: future, identity: "id-future".into(), local_id: None, parent_local_id: None };
    f.origin.snapshots.lock().unwrap().push(s.clone());
    let err = replicate::bring_up_to_date(&f.origin, &s, &ep, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("ahead of this replica's clock"), "{err:#}");
    assert!(f.held().is_empty());
    f.stop().await;
}

/// A stream that fails after `cut` bytes, as a connection cut mid-way looks to the sender.
struct CutAfter<R> {
    inner: R,
    left: usize,
}

impl<R: AsyncRead + Unpin> AsyncRead for CutAfter<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("cut on purpose")));
        }
        let want = buf.remaining().min(self.left);
        let mut part = tokio::io::ReadBuf::new(&mut buf.initialize_unfilled()[..want]);
        let before = part.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len() - before;
        self.left -= n;
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_cut_transfer_is_listed_as_partial_and_resumes_where_it_stopped() {
    let f = Fixture::new("");
    let ep = f.endpoint("alpha");
    let bytes = data(12 << 20, 7);
    let s1 = f.origin.add(1, &bytes);
    let incoming = Incoming { name: s1.name.clone(), identity: s1.identity.clone(), base: None, from_token: false, fetched: false };
    let mut cut = CutAfter { inner: &bytes[..], left: 9 << 20 };
    let err = ep.receive(&incoming, StreamStart { compact: false, start: Start::Fresh }, &mut cut).await.unwrap_err();
    assert!(format!("{err:#}").contains("cut on purpose"), "{err:#}");
    // The replica kept what it acknowledged; nothing is visible.
    let partial = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = ep.list().await.unwrap().resumable.filter(|p| p.offset > 0) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the cut transfer is listed as partial");
    assert!(f.held().is_empty(), "a partial snapshot became visible");
    assert_eq!(partial.identity, "id-1");
    let offset = partial.offset as usize;
    assert!(offset > 0 && offset <= 9 << 20, "offset {offset}");
    assert_eq!(partial.blake3, blake3::hash(&bytes[..offset]).to_hex().as_str());
    // A resume that claims another prefix is refused; the right one completes the snapshot.
    let mut wrong = blake3::Hasher::new();
    wrong.update(b"not the prefix");
    let start = StreamStart { compact: false, start: Start::Resume(Resumed { offset: offset as u64, hasher: wrong }) };
    let err = ep.receive(&incoming, start, &mut &bytes[offset..]).await.unwrap_err();
    assert!(format!("{err:#}").contains("CannotResume"), "{err:#}");
    let report = replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    // After the refused resume the session may be gone; either way the snapshot is whole.
    assert!(report.resumed_from == 0 || report.resumed_from == offset as u64, "{report:?}");
    assert_eq!(f.held(), vec![(s1.name.to_string(), bytes)]);
    f.stop().await;
}

#[tokio::test]
async fn a_resume_with_the_right_prefix_sends_only_the_rest() {
    let f = Fixture::new("");
    let ep = f.endpoint("alpha");
    let bytes = data(12 << 20, 9);
    let s1 = f.origin.add(1, &bytes);
    let incoming = Incoming { name: s1.name.clone(), identity: s1.identity.clone(), base: None, from_token: false, fetched: false };
    let mut cut = CutAfter { inner: &bytes[..], left: 9 << 20 };
    ep.receive(&incoming, StreamStart { compact: false, start: Start::Fresh }, &mut cut).await.unwrap_err();
    tokio::time::timeout(Duration::from_secs(10), async {
        while ep.list().await.unwrap().resumable.is_none_or(|p| p.offset == 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("partial listed");
    let report = replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert!(report.resumed_from > 0, "not resumed: {report:?}");
    assert_eq!(report.bytes, bytes.len() as u64, "the report counts the whole stream");
    assert_eq!(f.held(), vec![(s1.name.to_string(), bytes)]);
    f.stop().await;
}

/// An origin that died mid-transfer, seen from the replica: its connection is still up and
/// still feeds the session after the restarted origin listed it (a chunk waiting for more
/// data is pushed when the stream pauses; what the transport took is drained). Returns the
/// listing the restarted origin got, at `listed` bytes, taken before the old connection
/// brought the session to `held` bytes; the old sender's task (taken over later); and the
/// pipe that still "feeds" it (the dead origin's connection, not closed).
async fn overtaken_listing(
    f: &Fixture,
    bytes: &[u8],
    incoming: &Incoming,
    listed: usize,
    held: usize,
) -> (crate::ship::protocol::Partial, tokio::task::JoinHandle<Result<()>>, tokio::io::DuplexStream) {
    use tokio::io::AsyncWriteExt;
    let old = f.endpoint("alpha");
    let (mut feeding, mut pipe) = tokio::io::duplex(64 << 10);
    let incoming = incoming.clone();
    let sender = tokio::spawn(async move { old.receive(&incoming, StreamStart { compact: false, start: Start::Fresh }, &mut pipe).await });
    let listing = f.endpoint("alpha");
    let wait_for = |offset: usize| {
        let listing = &listing;
        async move {
            let wait = async {
                loop {
                    if let Some(p) = listing.list().await.unwrap().resumable.filter(|p| p.offset == offset as u64) {
                        return p;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(20), wait).await.expect("the session got to the offset")
        }
    };
    feeding.write_all(&bytes[..listed]).await.unwrap();
    let partial = wait_for(listed).await;
    feeding.write_all(&bytes[listed..held]).await.unwrap();
    wait_for(held).await;
    (partial, sender, feeding)
}

/// The restarted origin resumes from the offset its listing reported, which the dead
/// origin's connection overtook meanwhile: the replica takes the resume (it was refused,
/// `CannotResume`, a failed attempt and a second resume), checks the bytes it already held
/// instead of spooling them twice, and the snapshot is whole.
#[tokio::test]
async fn a_resume_from_a_listing_the_dead_origins_connection_overtook_is_taken() {
    let f = Fixture::new("");
    let bytes = data(12 << 20, 13);
    let s1 = f.origin.add(1, &bytes);
    let incoming = Incoming { name: s1.name.clone(), identity: s1.identity.clone(), base: None, from_token: false, fetched: false };
    let (partial, old, _dead) = overtaken_listing(&f, &bytes, &incoming, 8 << 20, 9 << 20).await;
    assert_eq!(partial.blake3, blake3::hash(&bytes[..8 << 20]).to_hex().as_str());
    // What the restarted origin does with that listing (replicate::transfer): the prefix
    // checked, the rest of the stream sent from the listed offset.
    let restarted = f.endpoint("alpha");
    let mut hasher = blake3::Hasher::new();
    hasher.update(&bytes[..8 << 20]);
    let start = StreamStart { compact: false, start: Start::Resume(Resumed { offset: 8 << 20, hasher }) };
    restarted.receive(&incoming, start, &mut &bytes[8 << 20..]).await.expect("the resume from the listed offset is taken");
    assert_eq!(f.held(), vec![(s1.name.to_string(), bytes)]);
    let err = old.await.unwrap().expect_err("the dead origin's connection was taken over");
    assert!(format!("{err:#}").contains("took the transfer over"), "{err:#}");
    f.stop().await;
}

/// A resume from a listed offset whose next bytes are not those the session already holds
/// (a peer regenerating another stream, or lying) leaves nothing: the session is dropped
/// (its receive already read the other bytes), and the next transfer starts over. A resume
/// from an offset no listing reported is refused, as before.
#[tokio::test]
async fn a_resume_that_does_not_match_what_the_replica_already_holds_is_dropped() {
    let f = Fixture::new("");
    let bytes = data(12 << 20, 14);
    let s1 = f.origin.add(1, &bytes);
    let incoming = Incoming { name: s1.name.clone(), identity: s1.identity.clone(), base: None, from_token: false, fetched: false };
    let (_partial, _old, _dead) = overtaken_listing(&f, &bytes, &incoming, 8 << 20, 9 << 20).await;
    let peer = f.endpoint("alpha");
    let resume_at = |offset: usize| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&bytes[..offset]);
        StreamStart { compact: false, start: Start::Resume(Resumed { offset: offset as u64, hasher }) }
    };
    // The right prefix, at an offset never listed.
    let err = peer.receive(&incoming, resume_at(4 << 20), &mut &bytes[4 << 20..]).await.unwrap_err();
    assert!(format!("{err:#}").contains("CannotResume"), "{err:#}");
    // The listed offset, then bytes other than those held.
    let mut other = bytes.clone();
    other[(8 << 20) + 1000] ^= 1;
    let err = peer.receive(&incoming, resume_at(8 << 20), &mut &other[8 << 20..]).await.unwrap_err();
    assert!(format!("{err:#}").contains("differs from the 9437184 bytes this replica holds"), "{err:#}");
    assert!(f.held().is_empty(), "a partial snapshot became visible");
    assert!(peer.list().await.unwrap().resumable.is_none(), "the session was kept");
    let report = replicate::bring_up_to_date(&f.origin, &s1, &peer, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert_eq!(report.resumed_from, 0);
    assert_eq!(f.held(), vec![(s1.name.to_string(), bytes)]);
    f.stop().await;
}

#[tokio::test]
async fn the_replica_prunes_after_a_receive_and_keeps_the_newest() {
    let f = Fixture::new("retention:\n  replica: { last: 1 }\n");
    let ep = f.endpoint("alpha");
    for hour in 1..=3 {
        let s = f.origin.add(hour, &data(1000, hour as u8));
        replicate::bring_up_to_date(&f.origin, &s, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    }
    // The prune after the last receive holds the file set's lock: once it is free again the
    // prune is done.
    drop(f.service.sessions().fileset_lock("projects").lock().await);
    let names: Vec<String> = f.held().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["snapship-20260101T030000.000Z"]);
    f.stop().await;
}

#[tokio::test]
async fn a_stale_origin_is_fenced_off_and_a_promoted_one_is_followed() {
    let f = Fixture::new("");
    let alpha = f.endpoint("alpha");
    let s1 = f.origin.add(1, &data(1000, 1));
    replicate::bring_up_to_date(&f.origin, &s1, &alpha, STALL, &replicate::NoHooks::default()).await.unwrap();
    // gamma, a member, promoted in epoch 1: beta follows it.
    let (link, streams) = LocalLink::pair("gamma");
    f.tasks.spawn(local::serve(streams, f.service.clone(), f.shutdown.clone()));
    let transfer = config::Transfer { compression: config::units::Compression::None, ..Default::default() };
    let e1 = Epoch { number: 1, origin: "gamma".into() };
    let gamma = PeerReplica::new("beta".into(), "projects".into(), transfer, STALL, Arc::new(link), Arc::new(move || Ok(e1.clone())));
    let s2 = f.origin.add(2, &data(1000, 2));
    let report = replicate::bring_up_to_date(&f.origin, &s2, &gamma, STALL, &replicate::NoHooks::default()).await.unwrap();
    assert_eq!(report.base.as_deref(), Some(s1.name.as_str()), "the new origin goes on from the common base");
    // alpha, still in epoch 0, is fenced off and writes nothing.
    let s3 = f.origin.add(3, &data(1000, 3));
    let err = replicate::bring_up_to_date(&f.origin, &s3, &alpha, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    let fenced = err.chain().find_map(|c| c.downcast_ref::<crate::ship::client::Fenced>()).expect("fenced");
    assert_eq!(fenced.epoch, Epoch { number: 1, origin: "gamma".into() });
    assert_eq!(f.held().len(), 2, "the stale origin wrote");
    f.stop().await;
}

#[tokio::test]
async fn the_origin_job_ships_the_newest_snapshot_and_records_the_base() {
    use crate::origin::job::OriginJob;
    use crate::origin::state::StateStore;
    let f = Fixture::new("");
    let origin = Arc::new(FakeOrigin::new(f.origin.dir.clone()));
    let s1 = origin.add(1, &data(2000, 4));
    let ep: Arc<dyn ReplicaEndpoint> = Arc::new(f.endpoint("alpha"));
    let state_dir = tempfile::tempdir().unwrap();
    let state = Arc::new(StateStore::open(state_dir.path(), "projects").unwrap());
    let status = StatusBoard::new("alpha");
    let (job, _sync) = OriginJob::new(f.policy.clone(), origin, vec![ep], state.clone(), crate::schedule::clock::Clock::System, status);
    let stop = CancellationToken::new();
    let run = tokio::spawn(job.run(stop.clone()));
    // The worker ships the newest snapshot it finds at start, then records the base.
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.get().await.replicas.get("beta").and_then(|r| r.base.clone()) != Some(s1.name.clone()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the base is recorded");
    assert_eq!(f.held(), vec![(s1.name.to_string(), data(2000, 4))]);
    assert!(state.get().await.replicas["beta"].in_flight.is_none(), "the finished transfer is no longer in flight");
    stop.cancel();
    run.await.unwrap();
    f.stop().await;
}

#[tokio::test]
async fn verify_reads_the_replicas_tree_by_name_in_pages_and_only_for_its_origin() {
    use crate::snapshot::tree::{Cache, Tree};
    let f = Fixture::new("");
    let s1 = f.origin.add(1, b"x");
    f.replica.held.lock().unwrap().push((s1.clone(), Vec::new()));
    // The received snapshot's files, where beta's policy puts them: enough long names for
    // several pages.
    let copy = f._dir.path().join("backup").join(s1.name.as_str());
    std::fs::create_dir_all(copy.join("sub")).unwrap();
    for i in 0..600 {
        std::fs::write(copy.join(format!("{}-{i:04}", "long-name".repeat(8))), format!("{i}")).unwrap();
    }
    std::fs::write(copy.join("sub/f"), "f").unwrap();
    let local = Tree::compute(&copy, &Cache::default(), 2).unwrap();

    let mut tree = f.endpoint("alpha").verify(&s1.name, true).await.unwrap();
    assert_eq!(tree.root(), &local.root);
    assert_eq!(tree.dir("").await.unwrap(), local.dir("").unwrap(), "every page, once, in order");
    assert_eq!(tree.dir("sub").await.unwrap(), local.dir("sub").unwrap());
    let refused = tree.dir("sub/..").await.unwrap_err();
    assert!(format!("{refused:#}").contains("not inside the snapshot"), "{refused:#}");
    // A refusal ends the stream; a new one goes on.
    let mut tree = f.endpoint("alpha").verify(&s1.name, false).await.unwrap();
    assert!(format!("{:#}", tree.dir("nope").await.unwrap_err()).contains("no directory"));
    let mut tree = f.endpoint("alpha").verify(&s1.name, false).await.unwrap();
    tree.done().await.unwrap();

    // Only the origin may ask, and only for a snapshot the replica holds.
    let err = f.endpoint("gamma").verify(&s1.name, false).await.err().expect("refused");
    assert_eq!(err.downcast_ref::<crate::ship::client::Refused>().expect("a refusal").code, ErrorCode::Unauthorized);
    let other = SnapshotName::parse("snapship-20200101T000000.000Z").unwrap();
    let err = f.endpoint("alpha").verify(&other, false).await.err().expect("refused");
    assert!(format!("{err:#}").contains("holds no snapshot"), "{err:#}");
    f.stop().await;
}

#[tokio::test]
async fn a_returning_replica_gets_the_newest_first_then_the_history_it_keeps_oldest_first() {
    let f = Fixture::new("retention:\n  replica: { last: 4 }\n");
    let ep = f.endpoint("alpha");
    let s1 = f.origin.add(1, &data(1000, 1));
    replicate::bring_up_to_date(&f.origin, &s1, &ep, STALL, &replicate::NoHooks::default()).await.unwrap();
    // Away while the origin took 2 to 6; `last: 4` keeps 3, 4, 5 (and 6), not 2.
    let newest = (2..=6).map(|h| f.origin.add(h, &data(1000, h as u8))).last().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Some(newest));
    let stop = CancellationToken::new();
    let hooks = replicate::NoHooks::default();
    let never = CancellationToken::new();
    let follow = replicate::follow(&f.origin, &ep, rx, &f.policy, STALL, &hooks, &stop, &never);
    let done = async {
        while f.held().len() < 4 || f.held().iter().any(|(n, _)| n.contains("T01")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the worker count an empty queue, then stop it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
    };
    tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(follow, done) }).await.expect("the backfill ends");
    let order: Vec<String> = f.held().into_iter().map(|(n, _)| n[18..20].to_string()).collect();
    // Received in this order: 6 first, then 3, 4, 5 (2 is not kept); the replica's own
    // pruning then let 1 go (`last: 4`).
    assert_eq!(order, ["06", "03", "04", "05"]);
    f.stop().await;
}

/// gamma, another replica of `projects` beside the fixture's beta, whose copies are the fake
/// origin's snapshots: it serves fetches, shipping to beta's service through the link.
struct Gamma {
    service: Arc<ReplicaService>,
    held: FakeReplica,
}

/// How gamma ships what a member fetches: from the fixture's fake origin (its "home"), to
/// beta's service only (the only member the test wires).
struct TestPushes {
    origin: Arc<FakeOrigin>,
    beta: Arc<ReplicaService>,
    tasks: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
}

impl crate::replica::fetch::Pushes for TestPushes {
    fn sender(&self, _: &crate::config::Policy) -> Result<Arc<dyn OriginSide>> {
        Ok(self.origin.clone())
    }
    fn endpoint(&self, _: &crate::config::Policy, member: &str) -> Result<Arc<dyn ReplicaEndpoint>> {
        if member != "beta" {
            bail!("the test reaches beta only, not {member}");
        }
        let (link, streams) = LocalLink::pair("gamma");
        self.tasks.spawn(local::serve(streams, self.beta.clone(), self.shutdown.clone()));
        let transfer = config::Transfer { compression: config::units::Compression::None, ..Default::default() };
        let epoch = Epoch { number: 0, origin: "alpha".into() };
        Ok(Arc::new(PeerReplica::new("beta".into(), "projects".into(), transfer, STALL, Arc::new(link), Arc::new(move || Ok(epoch.clone())))))
    }
}

impl Fixture {
    /// gamma's service, holding what `origin` holds (the same identities), serving fetches.
    fn gamma(&self, origin: Arc<FakeOrigin>) -> Gamma {
        let dir = self._dir.path().join("gamma");
        let node = config::parse_node_text(
            &dir.join("gamma.yaml"),
            "node: gamma\nlisten: 127.0.0.1:1\nstate_dir: state\ntls:\n  ca: ca.pem\n  cert: gamma.pem\n  key: gamma.key\npeers:\n  alpha: 127.0.0.1:2\n  beta: 127.0.0.1:3\n  delta: 127.0.0.1:4\npolicies: []\n",
        )
        .unwrap();
        let text = "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/projects\nreplicas:\n  - node: beta\n    path: /backup/projects\n  - node: gamma\n    path: /backup/projects\n";
        let policy = config::parse_policy_text(&dir.join("projects.yaml"), text, &node).unwrap();
        let loaded = Arc::new(LoadedConfig { node, policies: vec![policy], errors: vec![] });
        let held = FakeReplica::default();
        let backend = held.clone();
        let backends: crate::replica::service::Backends = Arc::new(move |_, _| Ok(Box::new(backend.clone()) as Box<dyn ReplicaSide>));
        let service = ReplicaService::new(loaded.clone(), Arc::new(EpochStore::open(&dir.join("state"))), StatusBoard::new("gamma"), backends);
        service.accept_fetches(Arc::new(TestPushes { origin, beta: self.service.clone(), tasks: self.tasks.clone(), shutdown: self.shutdown.clone() }));
        Gamma { service, held }
    }

    /// How `asker` reaches gamma's service (the link names the asker).
    fn to_gamma(&self, gamma: &Gamma, asker: &str) -> PeerReplica {
        let (link, streams) = LocalLink::pair(asker);
        self.tasks.spawn(local::serve(streams, gamma.service.clone(), self.shutdown.clone()));
        let transfer = config::Transfer { compression: config::units::Compression::None, ..Default::default() };
        let epoch = Epoch { number: 0, origin: "alpha".into() };
        PeerReplica::new("gamma".into(), "projects".into(), transfer, STALL, Arc::new(link), Arc::new(move || Ok(epoch.clone())))
    }
}

#[tokio::test]
async fn a_member_fetches_a_newer_snapshot_from_another_incrementally() {
    let f = Fixture::new("");
    let alpha = f.endpoint("alpha");
    let origin = Arc::new(FakeOrigin::new(f._dir.path().join("origin")));
    let s1 = origin.add(1, &data(1000, 1));
    replicate::bring_up_to_date(origin.as_ref(), &s1, &alpha, STALL, &replicate::NoHooks::default()).await.unwrap();
    let s2 = origin.add(2, &data(2000, 2));
    let gamma = f.gamma(origin.clone());
    gamma.held.held.lock().unwrap().extend([(s1.clone(), Vec::new()), (s2.clone(), Vec::new())]);
    let to_gamma = f.to_gamma(&gamma, "beta");
    let holds = to_gamma.holds().await.unwrap();
    assert_eq!(holds.snapshots.iter().map(|s| s.identity.as_str()).collect::<Vec<_>>(), ["id-1", "id-2"]);
    let got = crate::replica::fetch::fetch(f.service.grants(), &f.policy, &to_gamma, &holds.snapshots[1]).await.unwrap();
    assert_eq!((got.base.as_deref(), got.bytes), (Some(s1.name.as_str()), 2000), "incremental from the base both hold");
    assert_eq!(f.held().last().unwrap(), &(s2.name.to_string(), data(2000, 2)));
    // The backend is told which stream beta fetched, and nothing was prepared for it: a
    // fetch is received where it fits or refused (ZFS: whatever base the member names,
    // nothing is set aside or rolled back), while the origin's stream was prepared as ever.
    assert_eq!(*f.replica.fetched.lock().unwrap(), [false, true]);
    assert_eq!(f.replica.prepared.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The grant is used up: gamma cannot ship anything more into beta.
    assert!(f.service.grants().listing_for("projects", "gamma").is_none());
    f.stop().await;
}

#[tokio::test]
async fn fetches_go_only_to_members_that_asked_and_only_of_what_is_held() {
    let f = Fixture::new("");
    let origin = Arc::new(FakeOrigin::new(f._dir.path().join("origin")));
    let s1 = origin.add(1, &data(1000, 1));
    let s2 = origin.add(2, &data(1000, 2));
    let gamma = f.gamma(origin.clone());
    gamma.held.held.lock().unwrap().push((s1.clone(), Vec::new()));
    let refused = |e: anyhow::Error| e.chain().find_map(|c| c.downcast_ref::<crate::ship::client::Refused>()).map(|r| (r.code, r.message.clone()));
    // delta is no member of `projects` on gamma: it learns nothing and gets nothing.
    let from_delta = f.to_gamma(&gamma, "delta");
    let (code, _) = refused(from_delta.holds().await.unwrap_err()).expect("a refusal");
    assert_eq!(code, ErrorCode::Unauthorized);
    let (code, _) = refused(from_delta.fetch(&s1.name).await.unwrap_err()).expect("a refusal");
    assert_eq!(code, ErrorCode::Unauthorized);
    // A snapshot gamma does not hold (the origin has it, gamma does not) is not shipped.
    let from_beta = f.to_gamma(&gamma, "beta");
    let _grant = f.service.grants().allow("projects", "gamma", &s2.name, &s2.identity);
    let (code, message) = refused(crate::replica::fetch::fetch(f.service.grants(), &f.policy, &from_beta, &s2).await.unwrap_err()).expect("a refusal");
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(message.contains("holds no snapshot"), "{message}");
    assert!(f.held().is_empty());
    // A fetch beta did not ask for (no grant): gamma ships, beta refuses the stream.
    drop(_grant);
    let err = from_beta.fetch(&s1.name).await.unwrap_err();
    assert!(format!("{err:#}").contains("Unauthorized"), "{err:#}");
    assert!(f.held().is_empty(), "a stream beta never asked for was written");
    // A grant for one snapshot admits no other: gamma's begin of s1 under a grant of s2.
    let gamma_as_origin = f.endpoint("gamma");
    let _grant = f.service.grants().allow("projects", "gamma", &s2.name, &s2.identity);
    let err = replicate::bring_up_to_date(origin.as_ref(), &s1, &gamma_as_origin, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("Unauthorized"), "{err:#}");
    // Nor the granted name with another identity (a forged copy).
    let forged = Snapshot { identity: "forged".into(), ..s2.clone() };
    let err = replicate::bring_up_to_date(origin.as_ref(), &forged, &gamma_as_origin, STALL, &replicate::NoHooks::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("Unauthorized"), "{err:#}");
    assert!(f.held().is_empty());
    f.stop().await;
}
