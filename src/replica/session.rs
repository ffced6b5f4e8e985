//! The replica's transfers in progress, kept apart from the connections that feed them.
//!
//! A transfer into a file set is a [`Session`]: a [`spool`] and the backend's receive reading
//! from it. A connection attaches to the session and feeds it, acknowledging what reached the
//! spool. When the connection is cut, stalls or its origin dies, the session stays, detached,
//! with everything it acknowledged: the listing reports it as `partial`, and the origin
//! resumes it from there. A fresh `begin` for the file set replaces it; a session nobody
//! resumes within `resume_window` is dropped. Dropping a session fails its spool, so the
//! backend's receive fails and removes its partial snapshot, which was never visible.
//!
//! What a listing reports can be behind by the time the origin resumes: the connection of
//! an origin that died may still feed the session for a moment (a chunk waiting for more
//! data is pushed when the stream pauses; data the transport already took is drained). So a
//! resume may start at an offset a listing reported, short of what the session holds then:
//! the bytes in between are checked against what it holds and not spooled twice.
//!
//! A watchdog kills a receive that stops reading its spool for the stall timeout (a stuck
//! `btrfs receive` or `zfs receive`). Nothing of a session outlives this process: after a
//! crash the backend clears its staging area on the next receive and the origin, finding no
//! partial, starts over.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::spool::{self, SpoolWriter};
use crate::config::Transfers;
use crate::ship::protocol::{ErrorCode, Message, Partial, ResumeFrom};
use crate::ship::transfer::{IncomingData, IncomingError, OWN_ALLOCATION, write_message};
use crate::snapshot::{Incoming, ReplicaSide};

/// Stream bytes pushed into the spool at a time (less when the stream pauses).
const PUSH: usize = 256 * 1024;
/// The replica acknowledges at least this often (bytes, time), whichever comes first; the
/// same interval pushes a partly filled buffer, and keeps the origin informed while the
/// receive finishes after the end of the stream.
const ACK_BYTES: u64 = 4 << 20;
const ACK_INTERVAL: Duration = Duration::from_millis(500);
/// Offsets (with their hashes) that listings reported, kept per session so that a resume
/// from one of them is recognised after the session moved on: the last few only.
const LISTED: usize = 4;
/// How long replacing a session waits for its receive to fail and clean up before killing
/// it, and how long a takeover waits for the previous connection to let go: both well
/// inside the origin's patience for an answer to `begin`.
const GRACE: Duration = Duration::from_secs(20);

/// How a receive ended: `Err` carries the protocol code and the message for the origin.
type Outcome = Result<(), (ErrorCode, String)>;

/// An error with the protocol code the origin should see.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    pub code: ErrorCode,
    pub message: String,
}

fn failed(code: ErrorCode, message: impl Into<String>) -> anyhow::Error {
    Failed { code, message: message.into() }.into()
}

/// The code for an error from a receive: a full filesystem is told apart, since the admin
/// has to act on it; other errors are classified as incoming-stream errors.
pub fn error_code(err: &anyhow::Error) -> ErrorCode {
    if let Some(f) = err.chain().find_map(|c| c.downcast_ref::<Failed>()) {
        return f.code;
    }
    // Classified where it happened: by the command runner from the command's own words, or
    // an I/O error with ENOSPC (the spool's disk level).
    let no_space = err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| e.raw_os_error() == Some(nix::libc::ENOSPC))
            || matches!(c.downcast_ref::<crate::snapshot::runner::CommandError>(), Some(crate::snapshot::runner::CommandError::NoSpace { .. }))
    });
    if no_space { ErrorCode::NoSpace } else { IncomingError::code_of(err) }
}

/// What the origin is told about `err` (with `code`): the messages this node made for it
/// ([`Failed`]) and what is wrong with the origin's own stream ([`IncomingError`]) as they
/// are; anything else (a backend's or the spool's error, naming this node's paths and
/// commands) as a generic sentence, the details being in this node's log.
pub fn for_peer(code: ErrorCode, err: &anyhow::Error) -> String {
    if let Some(f) = err.chain().find_map(|c| c.downcast_ref::<Failed>()) {
        return f.message.clone();
    }
    let incoming = err.chain().any(|c| {
        c.downcast_ref::<IncomingError>().is_some()
            || c.downcast_ref::<std::io::Error>().and_then(|e| e.get_ref()).is_some_and(|e| e.is::<IncomingError>() || e.is::<crate::ship::frame::FrameError>())
    });
    if incoming {
        return format!("{err:#}");
    }
    match code {
        ErrorCode::NoSpace => "no space left on the replica; free space there and the origin retries by itself".into(),
        ErrorCode::ReceiveFailed => "the replica's filesystem refused the stream; its log says why".into(),
        ErrorCode::Stalled => "the receive on the replica stalled; its log says why".into(),
        _ => format!("the replica could not serve the request ({code:?}); its log says why"),
    }
}

/// What identifies a stream: a resume must be of the very same one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StreamKey {
    snapshot: String,
    identity: String,
    base: Option<String>,
    compact: bool,
}

/// Where a session is in its life, as its feeders see it:
///
/// ```text
///  begin -> Fed --cut, stall, origin gone--> Detached --resume--> Fed
///            |                                  |
///            +--end of stream, checked--> Finishing --receive ends--> (forgotten)
///  any --replaced, expired, stuck, shutdown--> Dropped
/// ```
/// The receive's own end (the `outcome` watch) is apart: it may fail in any phase.
enum Phase {
    /// A connection feeds the session; cancelling `feeder` cuts that connection off.
    Fed { feeder: CancellationToken },
    /// Cut: nobody has fed it since `since`; resumable until the resume window passes.
    Detached { since: Instant },
    /// The stream is complete and checked; the receive is finishing. Not resumable.
    Finishing,
    /// Dropped for `why`: its feeder is cut off and answers with this; its receive fails.
    Dropped { code: ErrorCode, why: String },
}

/// A session's phase and how much of the stream it holds, behind one lock: a listing never
/// pairs the offset of one moment with the hash of another.
struct State {
    phase: Phase,
    offset: u64,
    hasher: blake3::Hasher,
    /// What the last [`LISTED`] listings reported (offset, hasher there), oldest first.
    listed: std::collections::VecDeque<(u64, blake3::Hasher)>,
}

pub struct Session {
    fileset: String,
    peer: String,
    key: StreamKey,
    writer: SpoolWriter,
    state: Mutex<State>,
    /// Held by the connection feeding the session: one feeder at a time.
    feeding: Arc<tokio::sync::Mutex<()>>,
    outcome: watch::Receiver<Option<Outcome>>,
    receive: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("session state lock")
    }

    /// Stream bytes held, and their BLAKE3 (hex).
    fn held(&self) -> (u64, String) {
        let st = self.state();
        (st.offset, st.hasher.finalize().to_hex().to_string())
    }

    /// Whether an origin may resume it: fed or cut, and its receive still alive.
    fn resumable(&self) -> bool {
        self.outcome.borrow().is_none() && matches!(self.state().phase, Phase::Fed { .. } | Phase::Detached { .. })
    }

    /// Stream bytes it holds (took into its spool).
    pub fn held_bytes(&self) -> u64 {
        self.state().offset
    }

    /// The stream's length, once all of it arrived (the receive was finishing).
    pub fn stream_length(&self) -> Option<u64> {
        let st = self.state();
        matches!(st.phase, Phase::Finishing).then_some(st.offset)
    }

    fn finishing(&self) -> bool {
        matches!(self.state().phase, Phase::Finishing)
    }

    /// Since when nobody feeds it, if it is cut.
    fn detached_since(&self) -> Option<Instant> {
        match self.state().phase {
            Phase::Detached { since } => Some(since),
            _ => None,
        }
    }

    /// Why it was dropped, if it was.
    fn dropped(&self) -> Option<(ErrorCode, String)> {
        match &self.state().phase {
            Phase::Dropped { code, why } => Some((*code, why.clone())),
            _ => None,
        }
    }

    /// Drops it for `why` (the first reason stays), cutting off any feeder.
    fn drop_for(&self, code: ErrorCode, why: &str) {
        let mut st = self.state();
        match &st.phase {
            Phase::Dropped { .. } => return,
            Phase::Fed { feeder } => feeder.cancel(),
            Phase::Detached { .. } | Phase::Finishing => {}
        }
        st.phase = Phase::Dropped { code, why: why.to_string() };
    }

    /// What a listing reports; remembered, so that a resume from it is recognised even if
    /// the session holds more by then (see [`Session::resume_from`]).
    fn listed(&self) -> Partial {
        debug_assert!(!self.finishing());
        let (offset, blake3) = {
            let mut st = self.state();
            let (offset, hasher) = (st.offset, st.hasher.clone());
            if st.listed.back().is_none_or(|(o, _)| *o != offset) {
                if st.listed.len() == LISTED {
                    st.listed.pop_front();
                }
                st.listed.push_back((offset, hasher.clone()));
            }
            (offset, hasher.finalize().to_hex().to_string())
        };
        Partial {
            snapshot: self.key.snapshot.clone(),
            identity: self.key.identity.clone(),
            base: self.key.base.clone(),
            compact: self.key.compact,
            offset,
            blake3,
            token: None,
        }
    }

    /// Where a resume from `resume` (offset and hash, as the origin has them from a listing)
    /// picks up, with no feeder attached (the offset stands still): at what the session
    /// holds, or short of it at an offset a listing reported with that very hash. Then the
    /// next bytes up to what it holds are checked, not spooled again ([`Overlap`]). `None`:
    /// not a prefix this session can vouch for.
    fn resume_from(&self, resume: &ResumeFrom) -> Option<Option<Overlap>> {
        let st = self.state();
        let hex = |h: &blake3::Hasher| h.finalize().to_hex().to_string();
        if resume.offset == st.offset {
            return (hex(&st.hasher) == resume.blake3).then_some(None);
        }
        let (offset, hasher) = st.listed.iter().find(|(o, h)| *o == resume.offset && *o < st.offset && hex(h) == resume.blake3)?;
        Some(Some(Overlap { left: st.offset - offset, hasher: hasher.clone() }))
    }

    /// Waits for the receive to end; a receive that was killed counts as failed.
    async fn outcome(&self) -> Outcome {
        let mut rx = self.outcome.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(o) => o.clone().expect("waited for Some"),
            Err(_) => Err(self.dropped().unwrap_or((ErrorCode::ReceiveFailed, "the receive was stopped".into()))),
        }
    }
}

/// A connection's hold on a session: only one feeds it at a time. When it goes, the
/// session counts as detached (the resume window starts) until another attaches.
pub struct Attached {
    pub session: Arc<Session>,
    _feeding: OwnedMutexGuard<()>,
    token: CancellationToken,
    /// A resume that starts short of what the session holds: the bytes it has already.
    overlap: Option<Overlap>,
}

/// The first bytes of a resumed stream that the session already holds (an earlier
/// connection fed them after the listing the origin resumed from): hashed on from the
/// listed offset and compared, once all of them came, with what the session holds; never
/// spooled again.
struct Overlap {
    left: u64,
    hasher: blake3::Hasher,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut st = self.session.state();
        if let Phase::Fed { .. } = st.phase {
            st.phase = Phase::Detached { since: Instant::now() };
        }
    }
}

pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// One `begin` at a time per file set, so that replacing a session and starting its
    /// successor cannot interleave with another; the replica's prune holds it too.
    fileset_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    settings: Transfers,
    spool_dir: PathBuf,
    /// The memory all sessions' spools share: `spool_memory` for the whole node.
    spool_budget: spool::MemoryBudget,
    /// `FILESET.json` per receive under way: which stream it is. It outlives a crash, so that
    /// a partial receive the filesystem kept (a ZFS resume token) can be matched to its
    /// snapshot after a restart.
    receiving_dir: PathBuf,
}

impl Sessions {
    /// Sessions spooling under `state_dir/spool`, which is cleared first: spool files of a
    /// previous run are useless (their receives died with it).
    pub fn new(settings: &Transfers, state_dir: &std::path::Path) -> Arc<Sessions> {
        let spool_dir = state_dir.join("spool");
        if spool_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&spool_dir) {
                tracing::warn!("cannot clear the spool directory {}: {e}", spool_dir.display());
            }
        }
        let receiving_dir = state_dir.join("receiving");
        Arc::new(Sessions {
            map: Mutex::default(),
            fileset_locks: Mutex::default(),
            settings: settings.clone(),
            spool_dir,
            spool_budget: spool::MemoryBudget::new(settings.spool_memory.0 as usize),
            receiving_dir,
        })
    }

    fn receiving_file(&self, fileset: &str) -> PathBuf {
        self.receiving_dir.join(format!("{fileset}.json"))
    }

    /// Records which stream is being received into `fileset` (best effort: without it, a
    /// resume token cannot be used after a crash and the origin starts over).
    fn remember(&self, fileset: &str, key: &StreamKey) {
        let written = std::fs::create_dir_all(&self.receiving_dir)
            .and_then(|()| std::fs::write(self.receiving_file(fileset), serde_json::to_vec(key).expect("a key serializes")));
        if let Err(e) = written {
            tracing::warn!("cannot record the receive into `{fileset}` under {}: {e}", self.receiving_dir.display());
        }
    }

    /// The partial transfer the origin can resume: a session of this process, or else a
    /// partial receive that the replica's filesystem kept through a crash (ZFS resume token).
    pub async fn resumable(&self, fileset: &str, side: &dyn ReplicaSide) -> Option<Partial> {
        if let Some(p) = self.partial(fileset) {
            return Some(p);
        }
        let file = self.receiving_file(fileset);
        let Some(token) = side.resume_token().await else {
            let _ = std::fs::remove_file(&file); // stale: nothing partial is kept
            return None;
        };
        let key: StreamKey = serde_json::from_slice(&std::fs::read(&file).ok()?).ok()?;
        Some(Partial {
            snapshot: key.snapshot,
            identity: key.identity,
            base: key.base,
            compact: key.compact,
            offset: 0,
            blake3: String::new(),
            token: Some(token),
        })
    }

    /// The lock of `fileset`: held by each `begin` while it sets its session up, and by the
    /// replica's prune, so that they never overlap.
    pub fn fileset_lock(&self, fileset: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.fileset_locks.lock().expect("fileset locks").entry(fileset.to_string()).or_default().clone()
    }

    /// What a session of `fileset` still needs: the identities of the snapshot it receives
    /// and of its base (a prune must keep the base).
    pub fn needs(&self, fileset: &str) -> Vec<String> {
        let map = self.map.lock().expect("sessions lock");
        map.get(fileset).map(|s| std::iter::once(s.key.identity.clone()).chain(s.key.base.clone()).collect()).unwrap_or_default()
    }

    pub fn stall_timeout(&self) -> Duration {
        self.settings.stall_timeout.0
    }

    /// The resumable transfer into `fileset`, if there is one.
    pub fn partial(&self, fileset: &str) -> Option<Partial> {
        let session = self.map.lock().expect("sessions lock").get(fileset).cloned()?;
        session.resumable().then(|| session.listed())
    }

    /// Starts a transfer (or resumes the partial one) and attaches the caller to it.
    pub async fn begin(
        &self,
        peer: &str,
        fileset: &str,
        incoming: Incoming,
        compact: bool,
        resume: Option<ResumeFrom>,
        side: Box<dyn ReplicaSide>,
    ) -> Result<Attached> {
        let _one_at_a_time = self.fileset_lock(fileset).lock_owned().await;
        let key = StreamKey { snapshot: incoming.name.to_string(), identity: incoming.identity.clone(), base: incoming.base.clone(), compact };
        let existing = self.map.lock().expect("sessions lock").get(fileset).cloned();
        if let Some(s) = existing.as_ref().filter(|s| s.finishing() && s.outcome.borrow().is_none()) {
            return Err(failed(ErrorCode::Busy, format!("the receive of {} into `{fileset}` is finishing; list again in a moment", s.key.snapshot)));
        }
        if let Some(resume) = resume {
            let Some(session) = existing.filter(|s| s.key == key && s.peer == peer) else {
                return Err(failed(ErrorCode::CannotResume, format!("no partial transfer of {} to resume here (it may have expired)", key.snapshot)));
            };
            let mut attached = self.attach(&session).await?;
            let Some(overlap) = session.resume_from(&resume) else {
                return Err(failed(
                    ErrorCode::CannotResume,
                    format!("this replica holds {} bytes of the stream, not {} as the origin thought; list again", session.held_bytes(), resume.offset),
                ));
            };
            tracing::info!(%peer, fileset, snapshot = %key.snapshot, offset = resume.offset, "resuming a cut transfer");
            if let Some(o) = &overlap {
                tracing::info!(
                    %peer, fileset, already_held = o.left,
                    "the cut connection fed more after the listing the origin resumed from: those bytes are checked against what this replica holds, not spooled again"
                );
            }
            attached.overlap = overlap;
            return Ok(attached);
        }
        if let Some(old) = existing {
            self.discard(&old, ErrorCode::Aborted, "replaced by a new transfer from the origin", false).await;
        }
        self.remember(fileset, &key);
        let limits = spool::Limits {
            memory: self.settings.spool_memory.0 as usize,
            disk: self.settings.spool_disk.0,
            budget: self.spool_budget.clone(),
            spill_after: spool::SPILL_AFTER,
        };
        let (writer, reader) = spool::spool(limits, self.spool_dir.clone());
        let (tx, rx) = watch::channel(None);
        let name = fileset.to_string();
        let receive = tokio::spawn(async move {
            let mut data = reader.into_async_read();
            // The details (command lines, this node's paths, what the stream made the
            // filesystem say) stay in this node's log; the origin hears what to do.
            let outcome = match side.receive(&incoming, &mut data).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!(fileset = %name, "receive failed: {}", format!("{e:#}").escape_debug());
                    Err(match error_code(&e) {
                        ErrorCode::NoSpace => {
                            (ErrorCode::NoSpace, format!("no space left on the replica for `{name}`; free space there and the origin retries by itself"))
                        }
                        code => (code, for_peer(code, &e)),
                    })
                }
            };
            let _ = tx.send(Some(outcome));
        });
        let session = Arc::new(Session {
            fileset: fileset.to_string(),
            peer: peer.to_string(),
            key,
            writer,
            state: Mutex::new(State { phase: Phase::Detached { since: Instant::now() }, offset: 0, hasher: blake3::Hasher::new(), listed: Default::default() }),
            feeding: Arc::default(),
            outcome: rx,
            receive: Mutex::new(Some(receive)),
        });
        self.map.lock().expect("sessions lock").insert(fileset.to_string(), session.clone());
        self.attach(&session).await
    }

    /// Takes the session over from any connection still feeding it.
    async fn attach(&self, session: &Arc<Session>) -> Result<Attached> {
        if let Phase::Fed { feeder } = &session.state().phase {
            feeder.cancel();
        }
        let guard = tokio::time::timeout(GRACE, session.feeding.clone().lock_owned())
            .await
            .map_err(|_| failed(ErrorCode::Busy, "the previous connection still feeds this transfer; try again"))?;
        let token = CancellationToken::new();
        {
            let mut st = session.state();
            match &st.phase {
                Phase::Dropped { code, why } => return Err(failed(*code, why.clone())),
                Phase::Finishing => return Err(failed(ErrorCode::Busy, "the receive is finishing; list again in a moment")),
                Phase::Fed { .. } | Phase::Detached { .. } => st.phase = Phase::Fed { feeder: token.clone() },
            }
        }
        Ok(Attached { session: session.clone(), _feeding: guard, token, overlap: None })
    }

    /// Drops `session` for `why`: its receive fails (and cleans up), or is killed if it is
    /// stuck (`kill`) or does not end within the grace period. A feeder still attached is
    /// cut off and answers the origin with `code` and `why`.
    async fn discard(&self, session: &Arc<Session>, code: ErrorCode, why: &str, kill: bool) {
        self.forget(session);
        session.drop_for(code, why);
        session.writer.fail(why.to_string());
        let grace = if kill { Duration::ZERO } else { GRACE.min(self.stall_timeout()) };
        let ended = tokio::time::timeout(grace, session.outcome()).await.is_ok();
        let handle = session.receive.lock().expect("receive lock").take();
        match handle {
            Some(handle) => {
                if !ended {
                    handle.abort(); // dropping the receive kills its process
                }
                let _ = handle.await;
            }
            // Another discard holds the handle: wait for it to end the receive.
            None => {
                let _ = tokio::time::timeout(GRACE, session.outcome()).await;
            }
        }
    }

    /// Stops every session (the daemon is stopping): their feeders return, their receives
    /// fail. A btrfs receive cannot outlive this process anyway.
    pub fn shutdown(&self) {
        let sessions: Vec<Arc<Session>> = self.map.lock().expect("sessions lock").values().cloned().collect();
        for s in sessions {
            s.drop_for(ErrorCode::Aborted, "the replica is shutting down");
            s.writer.fail("the replica is shutting down");
        }
    }

    /// Feeds `data` into the attached session until the stream ends and the snapshot is
    /// committed (`Ok`), or something fails. A cut leaves the session waiting to be resumed;
    /// a failed receive or a stream that fails its final check drops it.
    pub async fn feed<W: AsyncWrite + Unpin>(&self, mut attached: Attached, mut data: IncomingData, acks: &mut W) -> Result<()> {
        let session = attached.session.clone();
        let overlap = attached.overlap.take();
        let result = feed_spool(&attached, overlap, &mut data, acks).await;
        let e = match result {
            Ok(()) => {
                // The stream is complete and checked: let the receive finish.
                session.state().phase = Phase::Finishing;
                session.writer.finish();
                let outcome = self.finish(&session, acks).await;
                self.forget(&session);
                return outcome.map_err(|(code, message)| failed(code, message));
            }
            Err(e) => e,
        };
        if attached.token.is_cancelled() {
            // Dropped (say why), or taken over by another connection.
            return match session.dropped() {
                Some((code, why)) => Err(failed(code, why)),
                None => Err(e),
            };
        }
        if session.outcome.borrow().is_some() || e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            // The receive ended first: its error is the cause.
            let (code, message) = session.outcome().await.err().unwrap_or((ErrorCode::ReceiveFailed, format!("{e:#}")));
            self.forget(&session);
            return Err(failed(code, message));
        }
        if let Some(IncomingError::Checksum { .. }) = e.downcast_ref::<IncomingError>() {
            // The whole stream does not hash as the origin's: what we hold is worthless.
            self.discard(&session, ErrorCode::Checksum, "the stream failed its final checksum", false).await;
            return Err(e);
        }
        if let Some(Failed { code: ErrorCode::Checksum, message }) = e.downcast_ref::<Failed>() {
            // The resumed stream is not the one held: the receive already read the other.
            let why = message.clone();
            self.discard(&session, ErrorCode::Checksum, &why, false).await;
            return Err(e);
        }
        let offset = session.state().offset;
        tracing::info!(peer = %session.peer, fileset = %session.fileset, offset, "transfer cut, kept for resuming: {}", format!("{e:#}").escape_debug());
        Err(e) // dropping `attached` marks the session detached
    }

    /// Waits for the receive to end after the end of the stream, telling the origin all
    /// along that the replica is alive; a receive that has read everything and still does
    /// not end within the stall timeout is killed.
    async fn finish<W: AsyncWrite + Unpin>(&self, session: &Arc<Session>, acks: &mut W) -> Outcome {
        let offset = session.state().offset;
        let mut drained_since: Option<Instant> = None;
        loop {
            tokio::select! {
                outcome = session.outcome() => return outcome,
                _ = tokio::time::sleep(ACK_INTERVAL) => {}
            }
            // A keepalive; if the origin is gone, the receive still finishes.
            let _ = tokio::time::timeout(ACK_INTERVAL, write_message(acks, &Message::Ack { offset })).await;
            if session.writer.buffered() > 0 {
                drained_since = None; // still reading: the spool watchdog judges
            } else if drained_since.get_or_insert_with(Instant::now).elapsed() > self.stall_timeout() {
                let why = format!("the receive read the whole stream but did not finish within {} (stall timeout); it was killed", self.settings.stall_timeout);
                tracing::error!(fileset = %session.fileset, "{why}");
                self.discard(session, ErrorCode::Stalled, &why, true).await;
                return session.outcome().await;
            }
        }
    }

    /// Removes `session` if it is still the file set's current one.
    fn forget(&self, session: &Arc<Session>) {
        let mut map = self.map.lock().expect("sessions lock");
        if map.get(&session.fileset).is_some_and(|s| Arc::ptr_eq(s, session)) {
            map.remove(&session.fileset);
            let _ = std::fs::remove_file(self.receiving_file(&session.fileset));
        }
    }

    /// Drops sessions left too long, and kills receives that stopped reading, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let tick = (self.stall_timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let sessions: Vec<Arc<Session>> = self.map.lock().expect("sessions lock").values().cloned().collect();
            for s in sessions {
                let detached = s.detached_since();
                if s.outcome.borrow().is_some() && detached.is_some() {
                    self.forget(&s); // failed on its own while nobody fed it
                } else if detached.is_some_and(|t| t.elapsed() > self.settings.resume_window.0) {
                    tracing::warn!(fileset = %s.fileset, snapshot = %s.key.snapshot, "dropping a cut transfer: its origin did not resume it within {}", self.settings.resume_window);
                    let me = self.clone();
                    tokio::spawn(async move { me.discard(&s, ErrorCode::Aborted, "the origin did not resume the transfer in time", false).await });
                } else if s.writer.waiting().is_some_and(|w| w > self.stall_timeout()) {
                    let why = format!("the receive on the replica read nothing for {} (stall timeout); it was killed", self.settings.stall_timeout);
                    tracing::error!(fileset = %s.fileset, snapshot = %s.key.snapshot, "{why}");
                    // Forget it now, so that the next tick does not discard it again.
                    self.forget(&s);
                    let me = self.clone();
                    tokio::spawn(async move { me.discard(&s, ErrorCode::Stalled, &why, true).await });
                }
            }
        }
    }
}

/// Moves the stream into the spool, acknowledging as it goes, to its clean end, where the
/// whole stream's length and BLAKE3 are checked. A resume short of what the session holds
/// (`overlap`) checks its first bytes against what is held instead of spooling them.
async fn feed_spool<W: AsyncWrite + Unpin>(attached: &Attached, mut overlap: Option<Overlap>, data: &mut IncomingData, acks: &mut W) -> Result<()> {
    let session = &attached.session;
    let token = &attached.token;
    // Said to a feeder that is cut off for another connection (an origin that died and came
    // back resumed on a new one): an answer of this node, not a failed receive.
    let taken_over = || failed(ErrorCode::Aborted, "another connection took the transfer over");
    // Small pieces are gathered here into chunks of about PUSH; a large one that holds its own
    // allocation goes into the spool as it came (no copy).
    let mut buf = BytesMut::new();
    let mut last_ack = (session.state().offset, Instant::now());
    if overlap.is_some() {
        // What the session holds is acknowledged at once: the origin must not see a stall
        // while it sends bytes the replica only checks.
        write_message(acks, &Message::Ack { offset: last_ack.0 }).await.map_err(|e| anyhow!("cannot acknowledge: {e}"))?;
    }
    loop {
        // Read; but push what there is when the stream pauses, so that acknowledgements
        // keep up with a slow origin.
        let read = tokio::select! {
            _ = token.cancelled() => return Err(taken_over()),
            next = data.next_chunk() => Some(next?),
            _ = tokio::time::sleep(ACK_INTERVAL), if !buf.is_empty() => None,
        };
        let end = matches!(read, Some(None));
        let chunk = match read {
            Some(Some(piece)) if buf.is_empty() && piece.len() > OWN_ALLOCATION && data.own_allocations() => piece,
            Some(Some(piece)) => {
                buf.extend_from_slice(&piece);
                if buf.len() < PUSH {
                    continue;
                }
                buf.split().freeze()
            }
            Some(None) | None => buf.split().freeze(),
        };
        let mut chunk = chunk;
        if let Some(o) = overlap.as_mut().filter(|_| !chunk.is_empty()) {
            let n = chunk.len().min(usize::try_from(o.left).unwrap_or(usize::MAX));
            o.hasher.update(&chunk.split_to(n));
            o.left -= n as u64;
            if o.left == 0 {
                let (offset, held) = session.held();
                if o.hasher.finalize().to_hex().as_str() != held {
                    return Err(failed(
                        ErrorCode::Checksum,
                        format!(
                            "the resumed stream differs from the {offset} bytes this replica holds (a different stream was regenerated); send it again from the start"
                        ),
                    ));
                }
                overlap = None;
            }
        }
        if !chunk.is_empty() {
            // Only the wait for room may be given up: once the chunk goes in, it is counted.
            tokio::select! {
                _ = token.cancelled() => return Err(taken_over()),
                room = session.writer.room(chunk.len()) => room?,
            }
            session.writer.push(chunk.clone()).await?;
            let offset = {
                let mut p = session.state();
                p.hasher.update(&chunk);
                p.offset += chunk.len() as u64;
                p.offset
            };
            if offset - last_ack.0 >= ACK_BYTES || last_ack.1.elapsed() >= ACK_INTERVAL {
                write_message(acks, &Message::Ack { offset }).await.map_err(|e| anyhow!("cannot acknowledge: {e}"))?;
                last_ack = (offset, Instant::now());
            }
        }
        if end {
            break;
        }
    }
    let (offset, digest) = session.held();
    data.check_end(offset, &digest)?;
    Ok(())
}
