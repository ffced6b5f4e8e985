//! The origin's side of the protocol: one replica, reached through a [`Dialer`].
//!
//! [`PeerReplica`] is the [`ReplicaEndpoint`] for every replica, remote or on this node: it
//! opens one request stream per request, sends `hello` and the request, and reads the
//! answers. While a stream goes out it watches the replica's acknowledgements, so that an
//! error is seen early and a replica that stops acknowledging is found stalled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::frame::FrameReader;
use super::protocol::{ErrorCode, Message, ResumeFrom, Room, VERSION};
use super::transfer::{self, read_message, write_message};
use super::{Dialer, Fetched, Holdings, Listing, ReplicaEndpoint, Start, StreamStart, TreeSource};
use crate::config::Transfer;
use crate::snapshot::tree::Entry;
use crate::snapshot::{Incoming, Snapshot, SnapshotName};
use crate::store::Epoch;

/// How long a replica may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a transfer was when it failed, named in its error: what a dead or frozen replica
/// was caught doing tells the admin (and the fault bench) where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asking the replica to begin (up to `ready`).
    Begin,
    /// Sending the stream, with the replica acknowledging what reached its spool.
    Data,
    /// After the end of the stream: the replica finishes receiving what it spooled and
    /// commits, saying it is alive at least every half second.
    Commit,
}

impl Phase {
    /// The context an error of this phase gets.
    pub fn failed(self, node: &str) -> String {
        match self {
            Phase::Begin => format!("the transfer to `{node}` failed in the begin phase (asking it to receive)"),
            Phase::Data => format!("the transfer to `{node}` failed in the data phase (sending the stream)"),
            Phase::Commit => {
                format!("the transfer to `{node}` failed in the commit phase (it held the whole stream and was finishing the receive)")
            }
        }
    }
}

/// The most entries verify takes from a replica for one directory.
const MAX_DIR_ENTRIES: usize = 10_000_000;

type Replies = FrameReader<Box<dyn AsyncRead + Send + Unpin>>;
type Outgoing = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// An error the replica answered with. Its message is the replica's text: shown with control
/// characters escaped, so that it cannot forge lines in this node's log.
#[derive(Debug, thiserror::Error)]
#[error("replica `{node}` refused: {} ({code:?})", without_controls(message))]
pub struct Refused {
    pub node: String,
    pub code: ErrorCode,
    pub message: String,
}

/// A replica refused this origin: it knows a newer epoch, whose origin is another node.
/// The origin must stop acting as origin of the file set.
#[derive(Debug, Clone, thiserror::Error)]
#[error("replica `{node}` fenced this origin off: {message} (it knows {epoch})")]
pub struct Fenced {
    pub node: String,
    pub epoch: Epoch,
    pub message: String,
}

impl Fenced {
    /// This fencing's epoch, if its origin says so too. Epochs are not signed, so a member's
    /// word about an epoch naming another member is not enough to stop acting on the file set
    /// (a hostile member could name a promotion that never happened): the member it names is
    /// asked with a `list`, which a real new origin answers by fencing this node off itself.
    /// `members` are the endpoints this node reaches (an origin's replicas); a named member
    /// not among them, or not answering within `limit`, does not confirm. The new origin,
    /// when there is one, reaches this node itself (it ships to it or to its feeder) and its
    /// epoch arrives with its own request.
    pub async fn confirmed(&self, members: &[Arc<dyn ReplicaEndpoint>], limit: Duration) -> Result<Epoch> {
        let (epoch, said_by) = (&self.epoch, &self.node);
        if epoch.origin == self.node {
            return Ok(epoch.clone());
        }
        let named = epoch.origin.escape_debug().to_string();
        let unconfirmed = |how: String| anyhow!("`{said_by}` says `{named}` is the origin in epoch {}, {how}", epoch.number);
        let Some(ep) = members.iter().find(|m| m.node() == epoch.origin) else {
            return Err(unconfirmed(format!("and `{named}` is not a member this node reaches to confirm it")));
        };
        match tokio::time::timeout(limit, ep.list()).await {
            Ok(Err(e)) => match e.chain().find_map(|c| c.downcast_ref::<Fenced>()) {
                Some(own) if own.epoch.origin == epoch.origin && own.epoch.number >= epoch.number => Ok(own.epoch.clone()),
                _ => Err(unconfirmed(format!("which `{named}` does not confirm ({e:#})"))),
            },
            Ok(Ok(_)) => Err(unconfirmed(format!("but `{named}` still answers this node as a replica"))),
            Err(_) => Err(unconfirmed(format!("and `{named}` did not answer to confirm it"))),
        }
    }
}

/// A replica had no room for a stream, and said how much it has: the origin waits for room
/// (checking with `list`) instead of resending the stream.
#[derive(Debug, thiserror::Error)]
#[error("replica `{node}` refused: {} (NoSpace; {} free there{})", without_controls(message), crate::config::units::ByteSize(room.free), room.needed.map(|n| format!(", the stream needs {}", crate::config::units::ByteSize(n))).unwrap_or_default())]
pub struct NoRoom {
    pub node: String,
    pub room: Room,
    pub message: String,
}

/// The epoch the origin acts in, read at each request (a promotion may change it).
pub type EpochSource = Arc<dyn Fn() -> Result<Epoch> + Send + Sync>;

/// The snapshots of a listing whose names are snapship's (others are left out).
fn parsed(snapshots: Vec<super::protocol::WireSnapshot>) -> Vec<Snapshot> {
    snapshots
        .into_iter()
        .filter_map(|s| {
            let name = SnapshotName::parse(&s.name)?;
            Some(Snapshot { name, identity: s.identity, local_id: None, parent_local_id: None })
        })
        .collect()
}

/// `text` with control characters (newlines, escapes) written as escapes.
fn without_controls(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// What `describe` learned of a peer (`snapship check --peers`).
#[derive(Debug)]
pub struct Described {
    /// The node its certificate and its own config name (the dialer checked the former).
    pub node: String,
    /// Its policy for the file set asked about, as canonical YAML.
    pub policy: Option<String>,
}

/// Asks `node`, behind `dialer`, who it is and (with `fileset`) its policy for that file set.
/// A refusal is a [`Refused`]; a peer of another protocol version refuses with
/// [`ErrorCode::Version`].
pub async fn describe(dialer: &dyn Dialer, node: &str, fileset: Option<&str>) -> Result<Described> {
    let stream = dialer.open().await.map_err(|e| dialer.explain(e))?;
    let mut send = stream.send;
    write_message(&mut send, &Message::Hello { version: VERSION }).await?;
    write_message(&mut send, &Message::Describe { fileset: fileset.map(str::to_string) }).await?;
    let mut replies = FrameReader::new(stream.recv);
    let reply = tokio::time::timeout(ANSWER_TIMEOUT, read_message(&mut replies))
        .await
        .map_err(|_| anyhow!("`{node}` did not answer within {}s", ANSWER_TIMEOUT.as_secs()))?
        .map_err(|e| dialer.explain(e))?;
    match reply {
        Message::Described { node, policy } => Ok(Described { node, policy }),
        Message::Error { code, message, .. } => Err(Refused { node: node.to_string(), code, message }.into()),
        other => bail!("protocol error: `{node}` answered {} to describe", other.kind()),
    }
}

/// One replica of one file set, spoken to through `dialer`.
pub struct PeerReplica {
    node: String,
    fileset: String,
    transfer: Transfer,
    /// A replica that acknowledges nothing for this long, with data outstanding, is stalled.
    stall: Duration,
    dialer: Arc<dyn Dialer>,
    epoch: EpochSource,
    /// Whether this endpoint said already that the replica refuses the LAN path (once, not
    /// at every transfer).
    lan_refusal_told: std::sync::atomic::AtomicBool,
}

impl PeerReplica {
    pub fn new(node: String, fileset: String, transfer: Transfer, stall: Duration, dialer: Arc<dyn Dialer>, epoch: EpochSource) -> Self {
        PeerReplica { node, fileset, transfer, stall, dialer, epoch, lan_refusal_told: Default::default() }
    }

    /// Whether to ask for the LAN path in the next `begin`: both nodes allow it, and its TCP
    /// connection to that address did not fail lately in this process ([`super::lan::usable`]).
    fn asks_lan(&self) -> bool {
        self.dialer.lan_address().is_some_and(super::lan::usable)
    }

    /// Opens a request stream and sends `hello` and `request`.
    async fn request(&self, request: &Message) -> Result<(Replies, Outgoing)> {
        let stream = self.dialer.open().await?;
        let mut send = stream.send;
        write_message(&mut send, &Message::Hello { version: VERSION }).await?;
        write_message(&mut send, request).await?;
        Ok((FrameReader::new(stream.recv), send))
    }

    /// Sends `request` and reads its first answer (within `limit`, if any). When the
    /// connection turns out gone before any answer came (a replica that restarted resets
    /// it; one that shut down closed it), the request goes once more on a fresh connection:
    /// a restart costs a reconnect, not a failed attempt. Only for requests that may be
    /// asked twice (`list`, `begin`, `verify`, `holds`, `fetch`: a fetch asked again finds
    /// the snapshot there).
    async fn ask(&self, request: &Message, limit: Option<Duration>) -> Result<(Message, Replies, Outgoing)> {
        let mut retried = false;
        loop {
            let attempt = async {
                let (mut replies, send) = self.request(request).await?;
                let first = match limit {
                    Some(limit) => tokio::time::timeout(limit, read_message(&mut replies))
                        .await
                        .map_err(|_| anyhow!("replica `{}` did not answer `{}` within {}s", self.node, request.kind(), limit.as_secs()))??,
                    None => read_message(&mut replies).await?,
                };
                Ok::<_, anyhow::Error>((first, replies, send))
            };
            match attempt.await {
                Err(e) if !retried && self.dialer.lost(&e) => {
                    tracing::info!(replica = %self.node, "the connection to `{}` was gone ({e:#}); asking again on a fresh one", self.node);
                    self.dialer.reset().await;
                    retried = true;
                }
                other => return other,
            }
        }
    }

    /// `e`, met in `phase`, saying so; an answer of the replica ([`Refused`], [`Fenced`])
    /// says itself what happened and stays as it is.
    fn in_phase(&self, phase: Phase, e: anyhow::Error) -> anyhow::Error {
        if e.is::<Refused>() || e.is::<Fenced>() { e } else { e.context(phase.failed(&self.node)) }
    }

    fn refused(&self, code: ErrorCode, message: String, epoch: Option<Epoch>, room: Option<Room>) -> anyhow::Error {
        match (code, epoch, room) {
            (ErrorCode::Fenced, Some(epoch), _) => Fenced { node: self.node.clone(), epoch, message }.into(),
            (ErrorCode::NoSpace, _, Some(room)) => NoRoom { node: self.node.clone(), room, message }.into(),
            _ => Refused { node: self.node.clone(), code, message }.into(),
        }
    }
}

#[async_trait]
impl ReplicaEndpoint for PeerReplica {
    fn node(&self) -> &str {
        &self.node
    }

    async fn list(&self) -> Result<Listing> {
        self.list_snapshots().await.map_err(|e| self.dialer.explain(e))
    }

    async fn close(&self) {
        self.dialer.reset().await;
    }

    async fn hand_over(&self, snapshot: &SnapshotName) -> Result<Epoch> {
        let request = Message::Handover { fileset: self.fileset.clone(), snapshot: snapshot.to_string(), epoch: (self.epoch)()? };
        let (mut replies, _send) = self.request(&request).await.map_err(|e| self.dialer.explain(e))?;
        // Taking over makes a writable copy and starts origin duty: quick, but give it time.
        match tokio::time::timeout(ANSWER_TIMEOUT, read_message(&mut replies)).await {
            Err(_) => bail!("replica `{}` did not answer the handover within {}s", self.node, ANSWER_TIMEOUT.as_secs()),
            Ok(reply) => match reply? {
                Message::TookOver { epoch } => Ok(epoch),
                Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
                other => bail!("protocol error: `{}` answered {} to handover", self.node, other.kind()),
            },
        }
    }

    async fn holds(&self) -> Result<Holdings> {
        let request = Message::Holds { fileset: self.fileset.clone() };
        let (answer, _replies, _send) = self.ask(&request, Some(ANSWER_TIMEOUT)).await.map_err(|e| self.dialer.explain(e))?;
        match answer {
            Message::Snapshots { snapshots, epoch, .. } => Ok(Holdings { snapshots: parsed(snapshots), epoch }),
            Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to holds", self.node, other.kind()),
        }
    }

    async fn fetch(&self, snapshot: &SnapshotName) -> Result<Fetched> {
        let request = Message::Fetch { fileset: self.fileset.clone(), snapshot: snapshot.to_string() };
        // The member ships the snapshot to this node meanwhile (a transfer of its own, with
        // its stall watch): no time limit but the connection's liveness.
        let (answer, _replies, _send) = self.ask(&request, None).await.map_err(|e| self.dialer.explain(e))?;
        match answer {
            Message::Fetched { snapshot: got, base, bytes } if got == snapshot.as_str() => Ok(Fetched { snapshot: got, base, bytes }),
            Message::Fetched { .. } => bail!("protocol error: `{}` answered the fetch of {snapshot} about another snapshot", self.node),
            Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to fetch", self.node, other.kind()),
        }
    }

    async fn verify(&self, snapshot: &SnapshotName, full: bool) -> Result<Box<dyn TreeSource>> {
        let request = Message::Verify { fileset: self.fileset.clone(), snapshot: snapshot.to_string(), full, epoch: (self.epoch)()? };
        // The replica hashes its whole copy before it answers (rehashing only what changed
        // since its last verify, unless `full`): no time limit but the connection's liveness.
        let (answer, replies, send) = self.ask(&request, None).await.map_err(|e| self.dialer.explain(e))?;
        match answer {
            Message::VerifyRoot { root } => Ok(Box::new(RemoteTree { node: self.node.clone(), root, replies, send })),
            Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to verify", self.node, other.kind()),
        }
    }

    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        let result = self.ship(incoming, start, stream).await.map_err(|e| self.dialer.explain(e));
        if result.is_err() {
            // Whatever went wrong, the next attempt starts on a fresh connection: a stalled
            // one may still look alive to QUIC.
            self.close().await;
        }
        result
    }
}

impl PeerReplica {
    async fn list_snapshots(&self) -> Result<Listing> {
        let (answer, _replies, _send) = self.ask(&Message::List { fileset: self.fileset.clone(), epoch: (self.epoch)()? }, None).await?;
        match answer {
            Message::Snapshots { snapshots, compact, partial, free, downstream, .. } => {
                let snapshots = parsed(snapshots);
                Ok(Listing { snapshots, accepts_compact: compact, resumable: partial, free, downstream })
            }
            Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to list", self.node, other.kind()),
        }
    }

    async fn ship(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        let from = start.offset();
        let (resume, prefix, from_token) = match start.start {
            Start::Fresh => (None, None, false),
            Start::FromToken => (None, None, true),
            Start::Resume(r) => (Some(ResumeFrom { offset: r.offset, blake3: r.hasher.finalize().to_hex().to_string() }), Some((r.offset, r.hasher)), false),
        };
        let asked_lan = self.asks_lan();
        let begin = Message::Begin {
            fileset: self.fileset.clone(),
            snapshot: incoming.name.to_string(),
            identity: incoming.identity.clone(),
            base: incoming.base.clone(),
            compression: self.transfer.compression.into(),
            compact: start.compact,
            resume,
            from_token,
            epoch: (self.epoch)()?,
            lan: asked_lan,
        };
        let (ready, mut replies, mut send) = self.ask(&begin, Some(ANSWER_TIMEOUT)).await.map_err(|e| self.in_phase(Phase::Begin, e))?;
        // The LAN path, where the replica offered it: the data frames and `end` go to `out`.
        let mut lan_out: Option<Outgoing> = None;
        match ready {
            Message::Ready => {
                if asked_lan && !self.lan_refusal_told.swap(true, Ordering::Relaxed) {
                    tracing::warn!(replica = %self.node, "the replica does not allow the LAN path for this node: sending over QUIC (encrypted); mark this node `encryption: off` under `peers` on the replica to use it");
                }
            }
            Message::LanReady { transfer, key } => {
                let (true, Some(address), Some(ticket)) = (asked_lan, self.dialer.lan_address(), super::lan::Ticket::from_wire(&transfer, &key)) else {
                    bail!("protocol error: `{}` answered lan_ready, which this node did not ask for or cannot read", self.node);
                };
                lan_out = Some(Box::new(super::lan::connect(&self.node, address, &ticket).await?));
                tracing::info!(replica = %self.node, snapshot = %incoming.name, "sending over the LAN path (TCP, authenticated, not encrypted)");
            }
            Message::Error { code, message, epoch, room } => return Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to begin", self.node, other.kind()),
        }
        if from > 0 {
            tracing::info!(replica = %self.node, snapshot = %incoming.name, offset = from, "resuming the transfer where the replica stopped");
        }
        // Stream the data while watching the replica's acknowledgements: an error may come
        // early, and a replica that stops acknowledging while data is outstanding is stalled.
        //
        // Cancel safety: when `watch_acks` returns first, the send future is dropped mid-write;
        // nothing more is written to this stream (the caller drops the connection), and the
        // replica keeps what it acknowledged for a resume.
        let out: &mut Outgoing = match &mut lan_out {
            Some(lan) => lan,
            None => &mut send,
        };
        let written = AtomicU64::new(from);
        let sending = transfer::write_data(stream, prefix, self.transfer.compression, self.transfer.bandwidth_limit, &written, out);
        let mut acked = from;
        let sent = tokio::select! {
            sent = sending => sent,
            failed = self.watch_acks(&mut replies, &written, &mut acked) => return Err(self.in_phase(Phase::Data, failed)),
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                // The replica may have given up first and said why (then it stopped reading,
                // and our write failed on the reset): its reason is the one to report.
                if let Ok(Some(Message::Error { code, message, epoch, room })) =
                    tokio::time::timeout(Duration::from_secs(2), self.error_reply(&mut replies)).await
                {
                    return Err(self.refused(code, message, epoch, room));
                }
                // Tell the replica why; it keeps what it has for a resume.
                let _ = write_message(out, &Message::error(ErrorCode::Aborted, format!("{e:#}"))).await;
                let _ = out.shutdown().await;
                return Err(self.in_phase(Phase::Data, e));
            }
        };
        write_message(out, &Message::End { bytes: sent.bytes, blake3: sent.blake3 }).await.map_err(|e| self.in_phase(Phase::Data, e.into()))?;
        out.shutdown().await.ok();
        tracing::debug!(replica = %self.node, bytes = sent.bytes, wire_bytes = sent.wire_bytes, "stream sent, waiting for the commit");
        // The replica says it is alive every half second while it finishes: silence for the
        // stall timeout means it died or froze (the QUIC idle timeout, the same length, may
        // say so first; either way the error names this phase).
        let committed = loop {
            match tokio::time::timeout(self.stall, read_message(&mut replies)).await {
                Err(_) => {
                    let silent = anyhow!("replica `{}` said nothing for {:.1}s (stall timeout)", self.node, self.stall.as_secs_f64());
                    return Err(self.in_phase(Phase::Commit, silent));
                }
                Ok(Ok(Message::Ack { .. })) => continue,
                Ok(reply) => break reply.map_err(|e| self.in_phase(Phase::Commit, e))?,
            }
        };
        match committed {
            Message::Committed { .. } => Ok(()),
            Message::Error { code, message, epoch, room } => Err(self.refused(code, message, epoch, room)),
            other => bail!("protocol error: `{}` answered {} to end", self.node, other.kind()),
        }
    }

    /// The error the replica answered with (a [`Message::Error`]), if its next message
    /// (after acknowledgements) is one.
    async fn error_reply(&self, replies: &mut Replies) -> Option<Message> {
        loop {
            match read_message(replies).await.ok()? {
                Message::Ack { .. } => continue,
                error @ Message::Error { .. } => return Some(error),
                _ => return None,
            }
        }
    }

    /// Reads acknowledgements until something goes wrong, which it returns: an error from the
    /// replica, a closed stream, or no progress for the stall timeout while `written` (stream
    /// bytes read into frames already handed to the transport) is ahead of what the replica
    /// acknowledged.
    ///
    /// # Cancel safety
    /// Cancelled when the stream has gone out; an acknowledgement read half-way is lost with
    /// it, which is harmless: the commit loop that follows skips acknowledgements.
    async fn watch_acks(&self, replies: &mut Replies, written: &AtomicU64, acked: &mut u64) -> anyhow::Error {
        let tick = (self.stall / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut behind_since: Option<std::time::Instant> = None;
        loop {
            match tokio::time::timeout(tick, read_message(replies)).await {
                Ok(Ok(Message::Ack { offset })) => {
                    if offset > *acked {
                        *acked = offset;
                        behind_since = None;
                    }
                }
                Ok(Ok(Message::Error { code, message, epoch, room })) => return self.refused(code, message, epoch, room),
                Ok(Ok(other)) => return anyhow!("protocol error: `{}` sent {} during the transfer", self.node, other.kind()),
                Ok(Err(e)) => return e.context(format!("replica `{}` broke off the transfer", self.node)),
                Err(_) => {}
            }
            if written.load(Ordering::Relaxed) > *acked {
                let since = *behind_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > self.stall {
                    return anyhow!(
                        "replica `{}` acknowledged nothing for {}s with data outstanding (stall timeout; it holds {} bytes of the stream)",
                        self.node,
                        self.stall.as_secs(),
                        acked
                    );
                }
            } else {
                behind_since = None;
            }
        }
    }
}

/// A replica's hash tree, read over one request stream: one `verify_dir` per page.
struct RemoteTree {
    node: String,
    root: Entry,
    replies: Replies,
    send: Outgoing,
}

#[async_trait]
impl TreeSource for RemoteTree {
    fn root(&self) -> &Entry {
        &self.root
    }

    async fn dir(&mut self, path: &str) -> Result<Vec<Entry>> {
        let parts: Vec<String> = if path.is_empty() { Vec::new() } else { path.split('/').map(str::to_string).collect() };
        let mut out: Vec<Entry> = Vec::new();
        loop {
            let after = out.last().map(|e| e.name.clone());
            write_message(&mut self.send, &Message::VerifyDir { path: parts.clone(), after }).await?;
            let reply = tokio::time::timeout(ANSWER_TIMEOUT, read_message(&mut self.replies))
                .await
                .map_err(|_| anyhow!("replica `{}` did not answer verify_dir within {}s", self.node, ANSWER_TIMEOUT.as_secs()))??;
            match reply {
                Message::VerifyEntries { entries, more } => {
                    // Pages must go forward in name order (so the comparison's merge holds and a
                    // hostile replica cannot page forever), and a directory has a bounded size.
                    let last = out.last().map(|e| e.name.clone());
                    let ordered =
                        entries.windows(2).all(|w| w[0].name < w[1].name) && entries.first().is_none_or(|e| last.as_ref().is_none_or(|l| e.name > *l));
                    if !ordered || (more && entries.is_empty()) {
                        bail!("protocol error: `{}` sent a page of `verify_entries` out of name order", self.node);
                    }
                    out.extend(entries);
                    if out.len() > MAX_DIR_ENTRIES {
                        bail!("replica `{}` lists more than {MAX_DIR_ENTRIES} entries in one directory of the snapshot; verify gives up there", self.node);
                    }
                    if !more {
                        return Ok(out);
                    }
                }
                Message::Error { code, message, .. } => return Err(Refused { node: self.node.clone(), code, message }.into()),
                other => bail!("protocol error: `{}` answered {} to verify_dir", self.node, other.kind()),
            }
        }
    }

    async fn done(&mut self) -> Result<()> {
        write_message(&mut self.send, &Message::VerifyDone).await?;
        self.send.shutdown().await.ok();
        match tokio::time::timeout(ANSWER_TIMEOUT, read_message(&mut self.replies)).await {
            Ok(Ok(Message::VerifyDone)) => Ok(()),
            Ok(Ok(other)) => bail!("protocol error: `{}` answered {} to verify_done", self.node, other.kind()),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("replica `{}` did not answer verify_done within {}s", self.node, ANSWER_TIMEOUT.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_message_cannot_forge_log_lines() {
        let e = Refused { node: "beta".into(), code: ErrorCode::BadRequest, message: "no\n2026-01-01 INFO forged `line`".into() };
        assert_eq!(e.to_string(), "replica `beta` refused: no\\n2026-01-01 INFO forged `line` (BadRequest)");
    }
}
