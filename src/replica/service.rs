//! The replica service: one per node, serving every file set this node is a replica of.
//!
//! A request is authorized only when the peer's certificate names the node that this node's
//! copy of the policy names as origin, and the policy names this node as a replica. The one
//! exception goes the other way: on the origin, a `list` from one of the file set's replicas
//! is answered with the origin's own snapshots (`snapship list` on a replica). What
//! the peer sends (file set, snapshot name, identities) is checked against the policy and the
//! backend before anything touches a filesystem; the target path always comes from the
//! policy. `verify` (from the current origin only, like `list`) hashes the received snapshot
//! it names, found by name among this node's received snapshots, and answers the origin's
//! `verify_dir` requests from that tree in memory: no path from the wire reaches a filesystem.
//!
//! Between members: `holds` (what this node holds of a file set) is answered to any member,
//! and `fetch` has this node ship a snapshot it holds to the member asking, which admits
//! that transfer only while it awaits it (a grant; see `replica::fetch`).
//!
//! Receives and pruning of one file set never overlap: the file set's lock (the one `begin`
//! takes) is taken before the origin hears `committed` and held while the replica prunes, so
//! the next `begin` waits for the prune, and a prune never races a receive that publishes a
//! new snapshot (and moves `latest`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use super::fetch::{self, Grants, Pushes};
use super::prune;
use super::relay::RelayGuard;
use super::session::{self, Sessions};
use crate::config::{LoadedConfig, Policy};
use crate::observe::status::StatusBoard;
use crate::schedule::admission::Receives;
use crate::ship::frame::FrameReader;
use crate::ship::lan::LanTickets;
use crate::ship::protocol::{ErrorCode, Message, Room, VERSION, WireSnapshot};
use crate::ship::transfer::{IncomingData, read_message, write_message};
use crate::ship::{Handler, RequestStream};
use crate::snapshot::tree::{self, Cache, Tree};
use crate::snapshot::{self, Incoming, ReplicaSide, SnapshotName};
use crate::store::{Epoch, EpochStore};

/// A snapshot name dated further into the future than this (by this node's clock) is refused:
/// retention files snapshots by the time in their names, and a future-dated burst from a
/// compromised origin would otherwise fill every bucket and push real history out.
pub const MAX_FUTURE: Duration = Duration::from_secs(300);

/// How long a peer has, from opening a request stream, to send `hello` and its request.
/// Honest origins send both at once; ten seconds covers a slow, lossy path.
pub const FIRST_REQUEST: Duration = Duration::from_secs(10);

/// How long a verifying origin may take between two `verify_dir` requests (it compares a
/// page with its own tree in between: quick).
pub const VERIFY_IDLE: Duration = Duration::from_secs(60);

/// About how many bytes of entries go into one `verify_entries` page, well under the 64 KiB
/// message frame limit.
const PAGE_BYTES: usize = 32 * 1024;

/// Makes the backend's replica side of a policy on a node, at that node's home (tests put
/// fakes here).
pub type Backends = Arc<dyn Fn(&Policy, &str) -> Result<Box<dyn ReplicaSide>> + Send + Sync>;

/// The real backends: btrfs or ZFS, by the policy.
pub fn real_backends() -> Backends {
    Arc::new(snapshot::replica_on)
}

/// Takes over origin duty on this node: the daemon's part of a planned switchover.
#[async_trait]
pub trait TakeOver: Send + Sync {
    /// Makes this node the origin of `policy`'s file set from `snapshot`; the new epoch.
    async fn take_over(&self, policy: &Policy, snapshot: &SnapshotName) -> Result<Epoch>;
}

pub struct ReplicaService {
    /// The node config and policies; replaced when the daemon reloads ([`Self::replace_config`]).
    config: std::sync::RwLock<Arc<LoadedConfig>>,
    /// This node's name and `state_dir` (a reload never changes them).
    here: String,
    state_dir: std::path::PathBuf,
    /// Set by the daemon once it runs; one-shot commands cannot take over.
    take_over: std::sync::OnceLock<Arc<dyn TakeOver>>,
    epochs: Arc<EpochStore>,
    sessions: Arc<Sessions>,
    status: Arc<StatusBoard>,
    backends: Backends,
    /// Prunes after receives (each holds its file set's lock).
    prunes: TaskTracker,
    /// One verify hashes at a time on this node.
    verifies: tokio::sync::Semaphore,
    /// Slots for receives, from all origins together: a `begin` beyond them waits its turn.
    receives: Receives,
    /// The backend's preparation for a stream, per file set, while it runs (see `prepare`).
    preparing: std::sync::Mutex<std::collections::HashMap<String, Prepared>>,
    /// What the replicas this node relays to need kept (cascades: `replica::relay`).
    relays: Arc<RelayGuard>,
    /// Ticks once a receive is committed and pruned: a relay forwards it.
    received: Arc<tokio::sync::watch::Sender<u64>>,
    /// The LAN path's tickets, where this node serves it.
    lan: std::sync::OnceLock<Arc<LanTickets>>,
    /// Peers told (in the log) that this node does not allow them the LAN path: once each.
    lan_refusals_told: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The fetches this node awaits (who may ship what into its home).
    grants: Arc<Grants>,
    /// How this node ships what another member fetches (set by the daemon).
    pushes: std::sync::OnceLock<Arc<dyn Pushes>>,
    /// (file set, member) pairs being shipped to for a fetch: one at a time each.
    pushing: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

/// The outcome of a backend's preparation for a stream, once it is known.
type Prepared = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

/// How long a `begin` waits for the backend's preparation before it answers `Busy` (the
/// origin waits a minute for an answer, and retries after `Busy`); a second in unit tests.
const PREPARE_WAIT: Duration = if cfg!(test) { Duration::from_secs(1) } else { Duration::from_secs(30) };

/// How long a `begin` waits for a receive slot (`schedule::admission::Receives`) before it
/// is answered `Busy`: with [`PREPARE_WAIT`], within the minute the origin waits for an answer.
pub(crate) const RECEIVE_WAIT: Duration = if cfg!(test) { Duration::from_secs(1) } else { Duration::from_secs(25) };

impl ReplicaService {
    pub fn new(config: Arc<LoadedConfig>, epochs: Arc<EpochStore>, status: Arc<StatusBoard>, backends: Backends) -> Arc<ReplicaService> {
        let sessions = Sessions::new(&config.node.transfers, &config.node.state_dir);
        let relays = RelayGuard::new(&config.node.state_dir);
        Arc::new(ReplicaService {
            here: config.node.node.0.clone(),
            state_dir: config.node.state_dir.clone(),
            config: std::sync::RwLock::new(config),
            take_over: Default::default(),
            epochs,
            sessions,
            status,
            backends,
            prunes: TaskTracker::new(),
            verifies: tokio::sync::Semaphore::new(1),
            receives: Receives::default(),
            preparing: Default::default(),
            relays,
            received: Arc::new(tokio::sync::watch::channel(0).0),
            lan: Default::default(),
            lan_refusals_told: Default::default(),
            grants: Default::default(),
            pushes: Default::default(),
            pushing: Default::default(),
        })
    }

    /// The config requests are answered by now.
    fn config(&self) -> Arc<LoadedConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Answers requests from now on by `config` (the daemon reloaded). Sessions under way
    /// keep the policy they began with.
    pub fn replace_config(&self, config: Arc<LoadedConfig>) {
        *self.config.write().expect("config lock") = config;
    }

    /// What this node's relays register for its pruning to keep.
    pub fn relay_guard(&self) -> &Arc<RelayGuard> {
        &self.relays
    }

    /// Ticks after each committed (and pruned) receive, for this node's relays.
    pub fn subscribe_received(&self) -> tokio::sync::watch::Receiver<u64> {
        self.received.subscribe()
    }

    /// Serves the LAN path's connections through `tickets` (the daemon does this where some
    /// peer is marked `encryption: off`).
    pub fn accept_lan(&self, tickets: Arc<LanTickets>) {
        let _ = self.lan.set(tickets);
    }

    /// The LAN path's tickets for a `begin` from `peer`, when it `asked` and this node marks
    /// `peer` `encryption: off` too; otherwise the stream comes over QUIC (the encrypted
    /// path, which is always allowed), logged (once per peer) where the origin asked.
    fn lan_path(&self, peer: &str, asked: bool) -> Option<&Arc<LanTickets>> {
        if !asked {
            return None;
        }
        let marked = self.config().node.lan_peers.iter().any(|p| p.0 == peer);
        match self.lan.get() {
            Some(tickets) if marked => Some(tickets),
            _ => {
                if !self.lan_refusals_told.lock().expect("lan refusals lock").insert(peer.to_string()) {
                    return None;
                }
                tracing::warn!(%peer, "node {peer:?} asked for the LAN path, which this node does not allow for it: receiving over QUIC (encrypted); to allow it, write `{peer}: {{ address: HOST:PORT, encryption: off }}` under `peers` here");
                None
            }
        }
    }

    /// The fetches this node awaits: a grant lets one member ship one snapshot here.
    pub fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    /// Serves other members' fetches through `pushes` (the daemon does this).
    pub fn accept_fetches(&self, pushes: Arc<dyn Pushes>) {
        let _ = self.pushes.set(pushes);
    }

    /// `holds` from `peer`: what this node holds of `fileset` at its home, when both are
    /// members (names and identities, which every member is shipped anyway; tampered copies
    /// left out), with the newest epoch this node knows.
    async fn holds(&self, peer: &str, fileset: &str) -> Result<Message> {
        let policy = match authorize(&self.config(), peer, fileset) {
            Ok(policy) => policy.clone(),
            Err(refusal) => return Ok(refusal),
        };
        let held = (self.backends)(&policy, self.here())?.list().await?;
        let snapshots =
            held.into_iter().filter(|s| !snapshot::is_tampered(s)).map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
        Ok(Message::Snapshots { snapshots, compact: false, partial: None, epoch: self.epochs.current(&policy)?, downstream: Vec::new(), free: None })
    }

    /// `fetch` from `peer`: ships `snapshot`, which this node holds, to `peer` (and only to
    /// it), when both are members of `fileset` by this node's policy.
    async fn fetch(&self, peer: &str, fileset: &str, snapshot: &str) -> Result<Message> {
        let policy = match authorize(&self.config(), peer, fileset) {
            Ok(policy) => policy.clone(),
            Err(refusal) => return Ok(refusal),
        };
        if peer == self.here() {
            return Ok(Message::error(ErrorCode::BadRequest, "a node does not fetch from itself"));
        }
        let Some(pushes) = self.pushes.get() else {
            return Ok(Message::error(
                ErrorCode::BadRequest,
                format!("node `{}` runs no daemon that could ship a snapshot; start `snapship run` there", self.here()),
            ));
        };
        let Some(name) = SnapshotName::parse(snapshot) else {
            return Ok(Message::error(ErrorCode::BadRequest, format!("{snapshot:?} is not a snapship snapshot name")));
        };
        let held = (self.backends)(&policy, self.here())?.list().await?;
        let Some(found) = held.into_iter().find(|s| s.name == name && !snapshot::is_tampered(s)) else {
            return Ok(Message::error(ErrorCode::BadRequest, format!("node `{}` holds no snapshot {name} of `{fileset}`", self.here())));
        };
        let key = (fileset.to_string(), peer.to_string());
        if !self.pushing.lock().expect("pushing lock").insert(key.clone()) {
            return Ok(Message::error(ErrorCode::Busy, format!("node `{}` is shipping a snapshot of `{fileset}` to `{peer}` already", self.here())));
        }
        // Taken out again however this request ends (a dropped request included).
        struct Pushing<'a>(&'a std::sync::Mutex<std::collections::BTreeSet<(String, String)>>, (String, String));
        impl Drop for Pushing<'_> {
            fn drop(&mut self) {
                self.0.lock().expect("pushing lock").remove(&self.1);
            }
        }
        let _pushing = Pushing(&self.pushing, key);
        tracing::info!(%peer, %fileset, snapshot = %name, "fetch: shipping to the member that asked");
        let shipped = fetch::push(pushes.as_ref(), &policy, peer, &found, &self.relays, self.sessions.stall_timeout()).await;
        match shipped {
            Ok(f) => Ok(Message::Fetched { snapshot: f.snapshot, base: f.base, bytes: f.bytes }),
            Err(e) => {
                tracing::warn!(%peer, %fileset, snapshot = %name, "fetch: shipping failed: {}", format!("{e:#}").escape_debug());
                // The asker's own refusal goes back to it as it was; anything else stays in
                // this node's log.
                Ok(match e.chain().find_map(|c| c.downcast_ref::<crate::ship::client::Refused>()) {
                    Some(r) => Message::error(r.code, format!("`{peer}` refused the stream `{}` shipped: {}", self.here(), r.message)),
                    None => Message::error(
                        session::error_code(&e),
                        format!("shipping {name} from `{}` failed: {}", self.here(), session::for_peer(session::error_code(&e), &e)),
                    ),
                })
            }
        }
    }

    /// Lets an origin hand the file set over to this node (the daemon does this).
    pub fn accept_handovers(&self, take_over: Arc<dyn TakeOver>) {
        let _ = self.take_over.set(take_over);
    }

    /// A planned switchover from `peer`: take over from `snapshot` if it is the newest this
    /// node holds.
    async fn handover(&self, peer: &str, fileset: &str, snapshot: &str, epoch: &Epoch) -> Result<Message> {
        // SECURITY: only the origin of the epoch this node knows hands the file set over, and
        // in that epoch: not a relay acting in its origin's epoch, nor a member claiming a
        // newer one (which `authorize` would learn). Otherwise any member could make this node
        // origin on its word, and the real origin step down once this node ships to it.
        let policy = match authorize(&self.config(), peer, fileset) {
            Ok(found) => found.clone(),
            Err(refusal) => return Ok(refusal),
        };
        let known = self.epochs.current(&policy)?;
        // (A stale origin gets `authorize`'s fencing answer below, which tells it why.)
        if epoch.number >= known.number && (known.origin != peer || *epoch != known) {
            tracing::warn!(peer = ?peer, %fileset, "refusing a handover: it claims {epoch}, this node knows {known}");
            return Ok(Message::error(
                ErrorCode::Unauthorized,
                format!(
                    "node `{peer}` is not the origin of `{fileset}` in {known}, the newest epoch `{}` knows: only that origin hands the file set over",
                    self.here()
                ),
            ));
        }
        let policy = match self.authorize(peer, fileset, epoch) {
            Ok(found) => found,
            Err(refusal) => return Ok(refusal),
        };
        if let Some(why) = policy.origin_refusal(self.here()) {
            return Ok(Message::error(ErrorCode::Unauthorized, format!("{why} in the policy on `{}`: it does not take over", self.here())));
        }
        let Some(take_over) = self.take_over.get() else {
            return Ok(Message::error(
                ErrorCode::BadRequest,
                format!("node `{}` runs no daemon that could take over; start `snapship run` there", self.here()),
            ));
        };
        let Some(name) = SnapshotName::parse(snapshot) else {
            return Ok(Message::error(ErrorCode::BadRequest, format!("{snapshot:?} is not a snapship snapshot name")));
        };
        let held = (self.backends)(&policy, self.here())?.list().await?;
        if held.last().map(|s| &s.name) != Some(&name) {
            let newest = held.last().map_or("nothing".to_string(), |s| s.name.to_string());
            return Ok(Message::error(ErrorCode::BadRequest, format!("this node's newest snapshot of `{fileset}` is {newest}, not {name}: ship it first")));
        }
        let epoch = take_over.take_over(&policy, &name).await?;
        tracing::warn!(%fileset, peer = ?peer, "took over as origin in {epoch} (planned switchover)");
        Ok(Message::TookOver { epoch })
    }

    /// The policy of `fileset` when `peer`, a member, asks what this node holds as the
    /// current origin (`snapship list` run on a replica): it claims an epoch whose origin is
    /// not itself, no newer than ours. A replica learns nothing new from the answer: the names
    /// and identities are those the origin ships to it anyway.
    fn origin_listed_to(&self, peer: &str, fileset: &str, claimed: &Epoch) -> Option<Policy> {
        let policy = self.config().policy(fileset)?.clone();
        let known = self.epochs.current(&policy).ok()?;
        let asking_replica = claimed.origin != peer && claimed.number <= known.number && policy.is_member(peer) && peer != self.here();
        (asking_replica && known.origin == self.here()).then_some(policy)
    }

    /// This origin's own snapshots of `policy`'s file set, as the answer to a replica's `list`.
    async fn origin_listing(&self, policy: &Policy) -> Result<Message> {
        let here = self.here();
        let snapshots =
            snapshot::origin_on(policy, here)?.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
        Ok(Message::Snapshots { snapshots, compact: false, partial: None, epoch: self.epochs.current(policy)?, downstream: Vec::new(), free: None })
    }

    /// `snapship verify` from `peer`, authorized like `list`: this node's hash tree of the
    /// received snapshot named `snapshot` (found by name in this node's replica directory of
    /// the file set, never by a path from the wire), then one page of a directory per
    /// `verify_dir`, until `verify_done`.
    #[allow(clippy::too_many_arguments)]
    async fn verify<W: AsyncWrite + Unpin>(
        &self,
        peer: &str,
        fileset: &str,
        snapshot: &str,
        full: bool,
        epoch: &Epoch,
        mut frames: FrameReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
        send: &mut W,
    ) -> Result<Message> {
        let policy = match self.authorize(peer, fileset, epoch) {
            Ok(found) => found,
            Err(refusal) => return Ok(refusal),
        };
        // A replica of the policy, or any member while another node is the origin (the old
        // origin after a failover holds its copies at its own snapshot directory or dataset).
        let replica_here = policy.replica_on(&crate::config::units::Name(self.here.clone())).is_some();
        if !replica_here && self.epochs.current(&policy).is_ok_and(|e| e.origin == self.here()) {
            return Ok(Message::error(ErrorCode::Unauthorized, format!("node `{}` is the origin of `{fileset}`, not a replica", self.here())));
        }
        let Some(name) = SnapshotName::parse(snapshot) else {
            return Ok(Message::error(ErrorCode::BadRequest, format!("{snapshot:?} is not a snapship snapshot name")));
        };
        let held = (self.backends)(&policy, self.here())?.list().await?;
        if !held.iter().any(|s| s.name == name) {
            return Ok(Message::error(ErrorCode::BadRequest, format!("node `{}` holds no snapshot {name} of `{fileset}`", self.here())));
        }
        // One tree at a time on this node: hashing reads the whole copy.
        let _turn = self.verifies.acquire().await?;
        let state_dir = self.state_dir.clone();
        // The snapshot's files (on ZFS a temporary clone, destroyed after, failures included).
        let view = snapshot::view(&policy, self.here(), false, &name, &state_dir.join("verify-mnt")).await?;
        let root = view.path().to_path_buf();
        let (fs, snap) = (fileset.to_string(), name.to_string());
        let started = std::time::Instant::now();
        let tree = tokio::task::spawn_blocking(move || -> Result<Tree> {
            let dir = tree::cache_dir(&state_dir, &fs, "replica");
            let cache = if full { Cache::default() } else { tree::load_cache(&dir) };
            let tree = Tree::compute(&root, &cache, tree::hash_workers())?;
            if let Err(e) = tree::save_cache(&dir, &tree::cache_of(&tree, &snap)) {
                tracing::warn!(fileset = %fs, "cannot keep the verify cache: {e:#}");
            }
            Ok(tree)
        })
        .await;
        let closed = view.close().await;
        let tree = tree??;
        closed?;
        tracing::info!(%peer, %fileset, %snapshot, hashed = tree.hashed, reused = tree.reused, seconds = started.elapsed().as_secs_f64(), "hashed for verify");
        write_message(send, &Message::VerifyRoot { root: tree.root.clone() }).await?;
        loop {
            let request = match tokio::time::timeout(VERIFY_IDLE, read_message(&mut frames)).await {
                Ok(request) => request?,
                Err(_) => return Ok(Message::error(ErrorCode::BadRequest, format!("no verify_dir or verify_done within {}s", VERIFY_IDLE.as_secs()))),
            };
            match request {
                Message::VerifyDir { path, after } => {
                    let Ok(at) = tree::check_path(&path) else {
                        return Ok(Message::error(ErrorCode::BadRequest, "verify_dir names a path that is not inside the snapshot"));
                    };
                    let Some((entries, more)) = tree.page(&at, after.as_deref(), PAGE_BYTES) else {
                        return Ok(Message::error(ErrorCode::BadRequest, "verify_dir names no directory of the snapshot"));
                    };
                    write_message(send, &Message::VerifyEntries { entries, more }).await?;
                }
                Message::VerifyDone => return Ok(Message::VerifyDone),
                other => return Ok(Message::error(ErrorCode::BadRequest, format!("expected verify_dir or verify_done, got {}", other.kind()))),
            }
        }
    }

    /// `snapship check --peers` on `peer`: this node's name, and its policy for `fileset`
    /// when `peer` is a member of that file set by this node's own policy (a member holds
    /// the file set's data anyway; others learn nothing of it).
    fn describe(&self, peer: &str, fileset: Option<&str>) -> Message {
        let config = self.config();
        let here = self.here().to_string();
        let Some(fileset) = fileset else { return Message::Described { node: here, policy: None } };
        let Some(policy) = config.policy(fileset) else {
            return Message::error(
                ErrorCode::Unauthorized,
                format!("node `{here}` has no policy for file set {fileset:?} (or it did not load: see `snapship check` there)"),
            );
        };
        if !policy.is_member(peer) {
            return Message::error(ErrorCode::Unauthorized, format!("node `{peer}` is not a member of `{fileset}` by node `{here}`'s policy"));
        }
        Message::Described { node: here, policy: Some(policy.document.clone()) }
    }

    fn here(&self) -> &str {
        &self.here
    }

    /// Has the backend make room for `incoming` before its stream flows (ZFS: snapshots after
    /// the base set aside as diverged data, a local copy that may take long). It runs in a
    /// task of its own, one per file set, under the file set's lock, so a request that goes
    /// away does not cut it; a `begin` that finds it still running after [`PREPARE_WAIT`]
    /// is answered `Busy`, and the origin's retry waits for the same task.
    #[allow(clippy::result_large_err)] // a refusal is the message to send back
    async fn prepare(&self, policy: &Policy, incoming: &Incoming) -> Result<(), Message> {
        let fileset = policy.fileset.0.clone();
        let failed = |e: String| {
            tracing::error!(%fileset, "preparing the receive failed: {}", e.escape_debug());
            Message::error(ErrorCode::ReceiveFailed, "the replica could not prepare its file set for the stream (nothing was lost); its log says why")
        };
        let mut done = {
            let mut map = self.preparing.lock().expect("preparing lock");
            match map.get(&fileset).filter(|rx| rx.borrow().is_none()) {
                Some(running) => running.clone(),
                None => {
                    let side = (self.backends)(policy, self.here()).map_err(|e| failed(format!("{e:#}")))?;
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let (lock, incoming) = (self.sessions.fileset_lock(&fileset), incoming.clone());
                    self.prunes.spawn(async move {
                        let _one_at_a_time = lock.lock_owned().await;
                        let _ = tx.send(Some(side.prepare(&incoming).await.map_err(|e| format!("{e:#}"))));
                    });
                    map.insert(fileset.clone(), rx.clone());
                    rx
                }
            }
        };
        let outcome = match tokio::time::timeout(PREPARE_WAIT, done.wait_for(|r| r.is_some())).await {
            Ok(Ok(r)) => r.clone().expect("waited for it"),
            Ok(Err(_)) => Err("the preparation ended without an outcome".to_string()),
            Err(_) => {
                return Err(Message::error(
                    ErrorCode::Busy,
                    format!("the replica is setting aside diverged data of `{fileset}` before this stream (a local copy); retry in a moment"),
                ));
            }
        };
        outcome.map_err(failed)
    }

    /// Records in the epoch store the diverged data the backend set aside while receiving
    /// (ZFS: the snapshots after the common base with a new origin), so that `status` and
    /// `snapship diverged` show it. A failure is logged: the data itself is kept either way.
    async fn record_diverged(&self, policy: &Policy) {
        let kept = match (self.backends)(policy, self.here()) {
            Ok(side) => side.diverged().await,
            Err(e) => Err(e),
        };
        let known = self.epochs.record(policy).map(|r| r.diverged);
        match (kept, known) {
            (Ok(kept), Ok(known)) => {
                for name in kept.iter().filter(|k| !known.contains(k)) {
                    tracing::warn!(fileset = %policy.fileset, kept = %name, "diverged data kept (snapshots after the common base with the new origin); see `snapship diverged`");
                    if let Err(e) = self.epochs.add_diverged(policy, name) {
                        tracing::error!(fileset = %policy.fileset, "cannot record the diverged data {name}: {e:#}");
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => tracing::error!(fileset = %policy.fileset, "cannot list the diverged data kept: {e:#}"),
        }
    }

    /// The sessions, for their watchdog ([`Sessions::watch`]) and shutdown.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Stops every session and waits for the prunes under way.
    pub async fn shutdown(&self) {
        self.sessions.shutdown();
        self.prunes.close();
        self.prunes.wait().await;
    }

    /// Answers `peer`, acting as origin in `claimed`, asking about `fileset`: the policy, or
    /// the error message to send back. A newer epoch is learned (and this node, if it was the
    /// origin, stops being one: its origin job watches the epochs); an older one is fenced.
    #[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
    pub fn authorize(&self, peer: &str, fileset: &str, claimed: &Epoch) -> Result<Policy, Message> {
        let owned = authorize(&self.config(), peer, fileset)?.clone();
        let policy = &owned;
        let internal = |e: anyhow::Error| {
            tracing::error!(%fileset, "cannot read or write the epoch: {e:#}");
            Message::error(ErrorCode::ReceiveFailed, format!("the replica cannot read its epoch of `{fileset}`; see its log"))
        };
        let known = self.epochs.current(policy).map_err(internal)?;
        let here = &self.here;
        if claimed.number == known.number && claimed.origin != known.origin {
            return Err(Message::error(
                ErrorCode::Unauthorized,
                format!(
                    "node `{peer}` is not the origin of `{fileset}` in {known} (the policy on `{here}` names `{}` as the initial origin)",
                    policy.origin.node
                ),
            ));
        }
        if claimed.number < known.number {
            tracing::warn!(peer = ?peer, %fileset, "refusing a stale origin: it acts in {claimed}, this node knows {known}");
            return Err(Message::fenced(
                &known,
                format!("node `{peer}` is not the origin of `{fileset}` in the newest epoch `{here}` knows, {known}; it must stop acting as origin"),
            ));
        }
        // A cascade: the relay this node's replica entry names in `from:` feeds it, acting in
        // the origin's epoch; any other member claiming someone else's epoch is refused.
        let relay = policy.feeder(here, &claimed.origin).filter(|f| *f != claimed.origin);
        if claimed.origin != peer && relay != Some(peer) {
            let fed_by = match relay {
                Some(r) => format!("; this node is fed by `{r}` (`from:` in its replica entry)"),
                None => String::new(),
            };
            return Err(Message::error(ErrorCode::Unauthorized, format!("node `{peer}` claims {claimed}, which names another node as origin{fed_by}")));
        }
        // SECURITY: any member can claim a newer epoch naming itself; only one this node's own
        // policy lets be origin is followed. The epoch this node already knows is checked too:
        // one recorded before its origin was marked `promotable: false` is not followed either
        // (until a promotion of an allowed member replaces it).
        if let Some(why) = policy.origin_refusal(&claimed.origin) {
            tracing::warn!(peer = ?peer, %fileset, epoch = claimed.number, "refusing epoch {claimed}: {}", why.escape_debug());
            let next = match claimed.number == known.number {
                true => format!(": `snapship promote {fileset}` on a member allowed to be origin moves the file set on"),
                false => String::new(),
            };
            return Err(Message::error(
                ErrorCode::Unauthorized,
                format!(
                    "`{here}` does not follow epoch {} (origin `{}`): {why} in the policy on `{here}`{next}",
                    claimed.number,
                    claimed.origin.escape_debug()
                ),
            ));
        }
        if claimed.number > known.number {
            if let Some(why) = crate::store::implausible(&known, claimed) {
                tracing::warn!(peer = ?peer, %fileset, "refusing epoch {claimed}: {why}");
                return Err(Message::error(ErrorCode::Unauthorized, format!("`{here}` does not follow epoch {}: {why}", claimed.number)));
            }
            self.epochs.learn(policy, claimed).map_err(internal)?;
        }
        Ok(owned)
    }

    /// Serves one request; returns the final reply to send.
    async fn serve_request<W: AsyncWrite + Unpin>(
        &self,
        mut frames: FrameReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
        send: &mut W,
        peer: &str,
    ) -> Result<Message> {
        // The opening (hello and the request) must arrive promptly: a peer that trickles it
        // would otherwise hold one of its admission slots for as long as it likes.
        let opening = async { Ok::<_, anyhow::Error>((read_message(&mut frames).await?, read_message(&mut frames).await?)) };
        let (hello, request) = match tokio::time::timeout(FIRST_REQUEST, opening).await {
            Ok(opening) => opening?,
            Err(_) => {
                return Ok(Message::error(
                    ErrorCode::BadRequest,
                    format!("no complete hello and request within {}s; the stream was closed", FIRST_REQUEST.as_secs()),
                ));
            }
        };
        match hello {
            Message::Hello { version } if version == VERSION => {}
            Message::Hello { version } => {
                return Ok(Message::error(
                    ErrorCode::Version,
                    format!("this node speaks protocol {VERSION}, the origin {version}; run the same snapship version on both"),
                ));
            }
            other => return Ok(Message::error(ErrorCode::BadRequest, format!("expected hello, got {}", other.kind()))),
        }
        match request {
            Message::List { fileset, epoch } => {
                if let Some(identity) = self.grants.listing_for(&fileset, peer) {
                    // A member shipping what this node fetched: what it holds, and a cut
                    // transfer only if it is of that very snapshot.
                    let policy = match authorize(&self.config(), peer, &fileset) {
                        Ok(policy) => policy.clone(),
                        Err(refusal) => return Ok(refusal),
                    };
                    let side = (self.backends)(&policy, self.here())?;
                    let snapshots = side.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
                    let partial = self.sessions.resumable(&fileset, side.as_ref()).await.filter(|p| p.identity == identity);
                    let epoch = self.epochs.current(&policy)?;
                    return Ok(Message::Snapshots {
                        snapshots,
                        compact: side.accepts_compact().await,
                        partial,
                        epoch,
                        downstream: Vec::new(),
                        free: side.free_space().await,
                    });
                }
                if let Some(policy) = self.origin_listed_to(peer, &fileset, &epoch) {
                    return self.origin_listing(&policy).await;
                }
                let policy = match self.authorize(peer, &fileset, &epoch) {
                    Ok(found) => found,
                    Err(refusal) => return Ok(refusal),
                };
                let side = (self.backends)(&policy, self.here())?;
                let snapshots = side.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
                let partial = self.sessions.resumable(&fileset, side.as_ref()).await;
                let downstream = self.status.hops(&fileset);
                Ok(Message::Snapshots { snapshots, compact: side.accepts_compact().await, partial, epoch, downstream, free: side.free_space().await })
            }
            Message::Begin { fileset, snapshot, identity, base, compression, compact, resume, from_token, epoch, lan } => {
                let name = match check_name(&snapshot, chrono::Utc::now()) {
                    Ok(name) => name,
                    Err(refusal) => return Ok(refusal),
                };
                // A snapshot this node fetched from `peer` (a grant), or one its origin (or
                // relay) ships, by policy and epoch.
                let fetched = self.grants.admits(&fileset, peer, &name, &identity);
                let policy = match fetched {
                    true => authorize(&self.config(), peer, &fileset).cloned(),
                    false => self.authorize(peer, &fileset, &epoch),
                };
                let policy = match policy {
                    Ok(found) => found,
                    Err(refusal) => return Ok(refusal),
                };
                // A slot before any work: many origins (or thousands of file sets starting at
                // once) queue here instead of running thousands of receives together.
                let Some(_receiving) = self.receives.admit_within(peer, RECEIVE_WAIT).await else {
                    return Ok(Message::error(
                        ErrorCode::Busy,
                        format!(
                            "node `{}` runs as many receives as it takes at once ({} in all, {} from one peer); retry in a moment",
                            self.here(),
                            self.receives.limit(),
                            crate::schedule::admission::PER_PEER
                        ),
                    ));
                };
                let from = resume.as_ref().map_or(0, |r| r.offset);
                let incoming = Incoming { name: name.clone(), identity, base: base.clone(), from_token, fetched };
                // A fetched stream is received where it fits or not at all: nothing is set
                // aside for it (the backend refuses it instead).
                if resume.is_none()
                    && !fetched
                    && let Err(refusal) = self.prepare(&policy, &incoming).await
                {
                    return Ok(refusal);
                }
                let attached = self.sessions.begin(peer, &fileset, incoming, compact, resume, (self.backends)(&policy, self.here())?).await?;
                // Marks the grant failed however this receive ends but by its commit.
                let _fetch_receiving = fetched.then(|| self.grants.began(&fileset, peer, &name));
                let data = match self.lan_path(peer, lan) {
                    Some(tickets) => {
                        // The stream comes over the LAN path; the acknowledgements and the
                        // answer still go back on this (QUIC) stream.
                        let pending = tickets.issue(peer);
                        let (transfer, key) = pending.ticket().to_wire();
                        write_message(send, &Message::LanReady { transfer, key }).await?;
                        let lan_frames = pending
                            .connected(crate::ship::lan::TICKET_TIMEOUT)
                            .await
                            .map_err(|e| session::Failed { code: ErrorCode::Aborted, message: format!("{e:#}") })?;
                        tracing::info!(%peer, %fileset, %snapshot, base = ?base.as_deref().unwrap_or("none (full)"), from, "receiving over the LAN path (TCP, authenticated, not encrypted)");
                        IncomingData::new(lan_frames, compression, self.sessions.stall_timeout())
                    }
                    None => {
                        write_message(send, &Message::Ready).await?;
                        tracing::info!(%peer, %fileset, %snapshot, base = ?base.as_deref().unwrap_or("none (full)"), from, "receiving");
                        IncomingData::new(frames, compression, self.sessions.stall_timeout())
                    }
                };
                let session = attached.session.clone();
                if let Err(e) = self.sessions.feed(attached, data, send).await {
                    // No room: say how much there is (after the failed receive cleaned up),
                    // so that the origin waits for room instead of resending blindly.
                    let code = session::error_code(&e);
                    let side = (self.backends)(&policy, self.here())?;
                    if let (ErrorCode::NoSpace, Some(free)) = (code, side.free_space().await) {
                        let room = Room { free, received: session.held_bytes(), needed: session.stream_length() };
                        tracing::warn!(%peer, %fileset, %snapshot, ?room, "no room for the stream: {}", format!("{e:#}").escape_debug());
                        return Ok(Message::no_space(session::for_peer(code, &e), room));
                    }
                    return Err(e);
                }
                tracing::info!(%peer, %fileset, %snapshot, fetched, "received and committed");
                if fetched {
                    // Asked for (promote, restore): kept as it is, no pruning now.
                    self.grants.used(&fileset, peer, &name);
                    self.received.send_modify(|n| *n += 1);
                    return Ok(Message::Committed { snapshot });
                }
                self.record_diverged(&policy).await;
                // Hold the file set's lock before the origin hears `committed`, so that its next
                // `begin` waits for this prune; prune once it has its answer.
                let lock = self.sessions.fileset_lock(&fileset).lock_owned().await;
                let side = (self.backends)(&policy, self.here())?;
                let (policy, status, sessions) = (policy.clone(), self.status.clone(), self.sessions.clone());
                let (relays, received, here) = (self.relays.clone(), self.received.clone(), self.here().to_string());
                let origin_is_remote = policy.origin.node.0 != self.here;
                self.prunes.spawn(async move {
                    let pruned = prune::after_receive(&policy, side.as_ref(), &sessions, &relays, &here).await;
                    drop(lock);
                    received.send_modify(|n| *n += 1);
                    if origin_is_remote {
                        if let Ok(held) = side.list().await {
                            status.received(&policy.fileset.0, &policy.origin.node.0, held.last().map(|s| &s.name), held.len());
                            status.tampered(&policy.fileset.0, held.iter().filter(|s| snapshot::is_tampered(s)).map(|s| s.name.to_string()).collect());
                        }
                        status.replica_pruned(&policy.fileset.0, pruned);
                    }
                });
                Ok(Message::Committed { snapshot })
            }
            Message::Handover { fileset, snapshot, epoch } => self.handover(peer, &fileset, &snapshot, &epoch).await,
            Message::Verify { fileset, snapshot, full, epoch } => self.verify(peer, &fileset, &snapshot, full, &epoch, frames, send).await,
            Message::Describe { fileset } => Ok(self.describe(peer, fileset.as_deref())),
            Message::Holds { fileset } => self.holds(peer, &fileset).await,
            Message::Fetch { fileset, snapshot } => self.fetch(peer, &fileset, &snapshot).await,
            other => {
                Ok(Message::error(ErrorCode::BadRequest, format!("expected list, begin, handover, verify, holds, fetch or describe, got {}", other.kind())))
            }
        }
    }
}

#[async_trait]
impl Handler for ReplicaService {
    async fn handle(&self, peer: String, stream: RequestStream) {
        let RequestStream { recv, mut send } = stream;
        let frames = FrameReader::new(recv);
        let reply = match self.serve_request(frames, &mut send, &peer).await {
            Ok(reply) => reply,
            Err(e) => {
                // The full error may name this node's paths and commands: it stays here.
                let code = session::error_code(&e);
                tracing::warn!(%peer, ?code, "request failed: {}", format!("{e:#}").escape_debug());
                return send_reply(send, &Message::error(code, session::for_peer(code, &e))).await;
            }
        };
        if let Message::Error { code, message, .. } = &reply {
            tracing::warn!(%peer, ?code, "request failed: {}", message.escape_debug());
        }
        send_reply(send, &reply).await
    }
}

/// Sends the final reply and closes the stream; a peer that does not read it gets
/// [`FIRST_REQUEST`] to take it, not forever.
async fn send_reply(mut send: Box<dyn AsyncWrite + Send + Unpin>, message: &Message) {
    let _ = tokio::time::timeout(FIRST_REQUEST, async {
        let _ = write_message(&mut send, message).await;
        let _ = send.shutdown().await;
    })
    .await;
}

/// Answers `peer` asking about `fileset` with `config`'s policy, when both `peer` and this
/// node are members of its star; or the refusal to send back. (Which member is the origin
/// now is the epoch's business: [`ReplicaService::authorize`].)
#[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
pub fn authorize<'a>(config: &'a LoadedConfig, peer: &str, fileset: &str) -> Result<&'a Policy, Message> {
    let here = &config.node.node;
    let Some(policy) = config.policy(fileset) else {
        return Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` has no policy for file set {fileset:?}")));
    };
    if !policy.is_member(peer) {
        return Err(Message::error(
            ErrorCode::Unauthorized,
            format!(
                "node `{peer}` is not the origin of `{fileset}` (the policy on `{here}` names `{}`, and `{peer}` is not a member): if `{peer}` should be its origin, change `origin.node` in the policy on `{here}` too; otherwise remove `{here}` from the replicas of `{fileset}` on `{peer}`",
                policy.origin.node
            ),
        ));
    }
    if !policy.is_member(&here.0) {
        return Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` is not a replica of `{fileset}`")));
    }
    Ok(policy)
}

/// The snapshot name an origin sent, if it is one snapship makes and not dated beyond
/// [`MAX_FUTURE`] from `now`.
#[allow(clippy::result_large_err)] // a refusal is the message to send back; a cold path
fn check_name(text: &str, now: chrono::DateTime<chrono::Utc>) -> Result<SnapshotName, Message> {
    let Some(name) = SnapshotName::parse(text) else {
        return Err(Message::error(ErrorCode::BadRequest, format!("{text:?} is not a snapship snapshot name")));
    };
    if name.time() > now + MAX_FUTURE {
        return Err(Message::error(
            ErrorCode::BadRequest,
            format!(
                "snapshot {name} is dated {} ahead of this replica's clock (more than {}s); check the clocks of both nodes (NTP)",
                humantime::format_duration(Duration::from_secs((name.time() - now).num_seconds().max(0) as u64)),
                MAX_FUTURE.as_secs()
            ),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_future_are_refused() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert!(check_name("snapship-20260601T120400.000Z", now).is_ok(), "a few minutes of clock skew is fine");
        let Err(Message::Error { code, message, .. }) = check_name("snapship-20260601T130000.000Z", now) else { panic!("an hour ahead passed") };
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("ahead of this replica's clock"), "{message}");
        assert!(check_name("../etc/passwd", now).is_err());
    }

    /// `node`'s view of a file set with origin alpha and replicas beta and gamma.
    fn config_of(node: &str) -> LoadedConfig {
        config_with(node, "")
    }

    /// The same with `gamma_extra` (keys) added to gamma's replica entry, and delta a replica.
    fn config_with(node: &str, gamma_extra: &str) -> LoadedConfig {
        let file = std::path::Path::new("/nonexistent/node.yaml");
        let peers: String = ["alpha", "beta", "gamma", "delta"].iter().filter(|n| **n != node).map(|n| format!("  {n}: 127.0.0.1:1\n")).collect();
        let node = crate::config::parse_node_text(
            file,
            &format!("node: {node}\nstate_dir: state\ntls:\n  ca: ca.pem\n  cert: c.pem\n  key: c.key\npeers:\n{peers}policies: []\n"),
        )
        .unwrap();
        let text = "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /srv/projects\nreplicas:\n  - node: beta\n    path: /backup/projects\n  - node: gamma\n    path: /backup/projects\n";
        let text = &format!("{text}{gamma_extra}");
        let policy = crate::config::parse_policy_text(std::path::Path::new("/nonexistent/projects.yaml"), text, &node).unwrap();
        LoadedConfig { node, policies: vec![policy], errors: vec![] }
    }

    /// The replica service of `node`, with its epochs in a temporary directory.
    fn service_of(node: &str) -> (tempfile::TempDir, Arc<ReplicaService>) {
        service_with(config_of(node))
    }

    fn service_with(config: LoadedConfig) -> (tempfile::TempDir, Arc<ReplicaService>) {
        let dir = tempfile::tempdir().unwrap();
        let epochs = Arc::new(EpochStore::open(dir.path()));
        let node = config.node.node.0.clone();
        let service = ReplicaService::new(Arc::new(config), epochs, StatusBoard::new(&node), real_backends());
        (dir, service)
    }

    #[test]
    fn a_cascaded_replica_takes_its_relay_and_no_other_member() {
        let e = |number: u64, origin: &str| Epoch { number, origin: origin.into() };
        let cascade = "    from: beta\n  - node: delta\n    path: /backup/projects\n";
        let (_d, gamma) = service_with(config_with("gamma", cascade));
        assert!(gamma.authorize("beta", "projects", &e(0, "alpha")).is_ok(), "the relay, in the origin's epoch");
        assert!(gamma.authorize("alpha", "projects", &e(0, "alpha")).is_ok(), "the origin itself");
        let Err(Message::Error { code, message, .. }) = gamma.authorize("delta", "projects", &e(0, "alpha")) else {
            panic!("delta, not the relay, was let in")
        };
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("fed by `beta`"), "{message}");
        assert!(gamma.authorize("beta", "projects", &e(0, "beta")).is_err(), "the relay is not the origin of epoch 0");
        // Fencing holds for the relay too: once gamma knows epoch 1 (delta promoted), the
        // relay acting in epoch 0 is fenced off, and taken again in epoch 1.
        assert!(gamma.authorize("delta", "projects", &e(1, "delta")).is_ok());
        let Err(Message::Error { code, .. }) = gamma.authorize("beta", "projects", &e(0, "alpha")) else { panic!("a stale relay was let in") };
        assert_eq!(code, ErrorCode::Fenced);
        assert!(gamma.authorize("beta", "projects", &e(1, "delta")).is_ok());
        // Without `from:`, a replica takes no other replica.
        let (_d, plain) = service_with(config_with("gamma", "  - node: delta\n    path: /backup/projects\n"));
        assert!(plain.authorize("beta", "projects", &e(0, "alpha")).is_err());
    }

    /// gamma promoted itself (its own copy of the policy allowed it) and beta recorded its
    /// epoch; then beta's policy marks gamma `promotable: false`: gamma is refused from then
    /// on, in the epoch beta already knows, and a promotion of beta's choice is followed.
    #[test]
    fn an_origin_marked_not_promotable_after_its_promotion_is_no_longer_followed() {
        let e = |number: u64, origin: &str| Epoch { number, origin: origin.into() };
        let (dir, beta) = service_of("beta");
        assert!(beta.authorize("gamma", "projects", &e(1, "gamma")).is_ok(), "gamma may be origin before the change");
        let marked = config_with("beta", "    promotable: false\n");
        let beta = ReplicaService::new(Arc::new(marked), Arc::new(EpochStore::open(dir.path())), StatusBoard::new("beta"), real_backends());
        assert_eq!(beta.epochs.current(beta.config().policy("projects").unwrap()).unwrap(), e(1, "gamma"), "the epoch recorded before");
        let Err(Message::Error { code, message, .. }) = beta.authorize("gamma", "projects", &e(1, "gamma")) else { panic!("gamma was still followed") };
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("does not follow epoch 1 (origin `gamma`)") && message.contains("snapship promote projects"), "{message}");
        assert!(beta.authorize("alpha", "projects", &e(2, "alpha")).is_ok(), "a promotion of an allowed member moves on");
        let Err(Message::Error { code, message, .. }) = beta.authorize("alpha", "projects", &e(u64::MAX, "alpha")) else {
            panic!("an epoch far ahead was followed")
        };
        assert_eq!(code, ErrorCode::Unauthorized);
        assert!(message.contains("promotions past epoch 2"), "{message}");
    }

    /// A handover comes from the origin of the epoch this node knows, in that epoch; a relay
    /// acting in its origin's epoch, or a member claiming a newer one, is refused and teaches
    /// this node no epoch.
    #[tokio::test]
    async fn only_the_current_origin_hands_a_file_set_over() {
        let e = |number: u64, origin: &str| Epoch { number, origin: origin.into() };
        let cascade = "    from: beta\n  - node: delta\n    path: /backup/projects\n";
        let (_d, gamma) = service_with(config_with("gamma", cascade));
        let name = "snapship-20260101T000000.000Z";
        for (peer, claimed) in [("beta", e(0, "alpha")), ("beta", e(1, "beta")), ("delta", e(1, "delta")), ("alpha", e(1, "alpha"))] {
            let Message::Error { code, message, .. } = gamma.handover(peer, "projects", name, &claimed).await.unwrap() else {
                panic!("{peer} handed the file set over in {claimed}")
            };
            assert_eq!(code, ErrorCode::Unauthorized, "{peer}: {message}");
            assert!(message.contains("only that origin hands the file set over"), "{message}");
        }
        assert_eq!(gamma.epochs.current(gamma.config().policy("projects").unwrap()).unwrap(), e(0, "alpha"), "an epoch was learned from a handover");
        // An origin acting in an older epoch than this node knows is fenced off, as everywhere.
        let (_d, beta) = service_of("beta");
        assert!(beta.authorize("gamma", "projects", &e(1, "gamma")).is_ok());
        let Message::Error { code, .. } = beta.handover("alpha", "projects", name, &e(0, "alpha")).await.unwrap() else { panic!("no refusal") };
        assert_eq!(code, ErrorCode::Fenced);
        // The origin, in its epoch, gets past the check (to the next: no daemon here).
        let Message::Error { code, message, .. } = gamma.handover("alpha", "projects", name, &e(0, "alpha")).await.unwrap() else { panic!("no refusal") };
        assert_eq!(code, ErrorCode::BadRequest, "{message}");
        assert!(message.contains("runs no daemon"), "{message}");
    }

    #[test]
    fn only_the_origin_lists_its_own_snapshots_and_only_to_its_replicas() {
        let e = |origin: &str| Epoch { number: 0, origin: origin.into() };
        let (_d, origin) = service_of("alpha");
        assert!(origin.origin_listed_to("beta", "projects", &e("alpha")).is_some());
        assert!(origin.origin_listed_to("gamma", "projects", &e("alpha")).is_some());
        assert!(origin.origin_listed_to("delta", "projects", &e("alpha")).is_none(), "not a member");
        assert!(origin.origin_listed_to("beta", "other", &e("alpha")).is_none(), "no such file set");
        // A replica answers a replica nothing of the kind, and refuses it as an origin.
        let (_d, replica) = service_of("beta");
        assert!(replica.origin_listed_to("gamma", "projects", &e("alpha")).is_none());
        assert!(replica.authorize("gamma", "projects", &e("gamma")).is_err());
        // Its origin's `list` is the usual one: what the replica holds.
        assert!(replica.origin_listed_to("alpha", "projects", &e("alpha")).is_none());
        assert!(replica.authorize("alpha", "projects", &e("alpha")).is_ok());
    }

    #[test]
    fn a_policy_is_described_only_to_members_of_its_file_set() {
        let (_d, beta) = service_of("beta");
        let Message::Described { node, policy } = beta.describe("delta", None) else { panic!("who-are-you refused") };
        assert_eq!((node.as_str(), policy), ("beta", None), "any admitted peer learns the node's name, nothing more");
        let Message::Described { policy: Some(text), .. } = beta.describe("gamma", Some("projects")) else { panic!("a member was refused") };
        assert!(text.contains("fileset: projects") && !text.contains('#'), "{text}");
        for (peer, fileset) in [("delta", "projects"), ("gamma", "other"), ("gamma", "../../etc/passwd")] {
            let Message::Error { code, message, .. } = beta.describe(peer, Some(fileset)) else { panic!("{peer} learned the policy of {fileset}") };
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
        }
    }
}
