//! The origin's side of QUIC: reaching a remote replica and speaking the protocol to it.
//!
//! [`Connector`] holds one s2n-quic client (one UDP socket) for a run; [`RemoteReplica`]
//! is a [`ReplicaEndpoint`] that connects on first use (checking that the server's
//! certificate names the node it meant to reach) and opens one stream per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use s2n_quic::client::Connect;
use s2n_quic::provider::limits::Limits;
use s2n_quic::{Client, Connection};
use tokio::io::AsyncRead;
use tokio::sync::Mutex;

use super::frame::FrameReader;
use super::protocol::{ErrorCode, Message, Partial, ResumeFrom, VERSION};
use super::tls;
use super::transfer::{self, read_message, write_message};
use super::{ReplicaEndpoint, StreamStart};
use crate::config::{NodeConfig, Transfer};
use crate::snapshot::{Incoming, Snapshot, SnapshotName};

/// Connection limits shared by both sides. The flow-control windows bound what one
/// connection can buffer (memory stays flat whatever the stream size) while keeping a
/// loopback or LAN path full.
pub fn limits() -> Result<Limits> {
    const WINDOW: u64 = 8 << 20;
    Ok(Limits::new()
        .with_max_handshake_duration(Duration::from_secs(5))?
        .with_max_idle_timeout(Duration::from_secs(30))?
        .with_data_window(WINDOW)?
        .with_bidirectional_local_data_window(WINDOW)?
        .with_bidirectional_remote_data_window(WINDOW)?)
}

/// UDP I/O bound to `addr`, probing path MTUs up to 9000 bytes: QUIC at 1500 is CPU-bound,
/// and where the path carries jumbo frames (loopback, many LANs) the probe finds them;
/// elsewhere it settles at what the path allows.
pub fn io(addr: SocketAddr) -> Result<s2n_quic::provider::io::tokio::Provider> {
    Ok(s2n_quic::provider::io::tokio::Builder::default().with_receive_address(addr)?.with_max_mtu(9000)?.build()?)
}

/// How long a replica may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// After the end of a stream, the replica finishes receiving (it may have much spooled) and
/// says it is alive at least every half second: it is given this long between two signs.
const COMMIT_SILENCE: Duration = Duration::from_secs(60);

/// An error the replica answered with.
#[derive(Debug, thiserror::Error)]
#[error("replica `{node}` refused: {message} ({code:?})")]
pub struct Refused {
    pub node: String,
    pub code: ErrorCode,
    pub message: String,
}

/// The origin's QUIC clients: one UDP socket per address family, made on first use.
pub struct Connector {
    tls: crate::config::TlsFiles,
    prepared: std::sync::Mutex<Option<s2n_quic::provider::tls::default::Client>>,
    v4: std::sync::OnceLock<Client>,
    v6: std::sync::OnceLock<Client>,
}

impl Connector {
    pub fn new(node: &NodeConfig) -> Result<Connector> {
        let files = node.tls.as_ref().ok_or_else(|| anyhow!("{} has no `tls:` section; it is needed to reach other nodes", node.file.display()))?;
        // Build it now, so that a missing certificate is reported before any transfer.
        let prepared = std::sync::Mutex::new(Some(tls::client_tls(files)?));
        Ok(Connector { tls: files.clone(), prepared, v4: Default::default(), v6: Default::default() })
    }

    fn client_for(&self, addr: &SocketAddr) -> Result<&Client> {
        let (cell, bind) = if addr.is_ipv4() { (&self.v4, "0.0.0.0:0") } else { (&self.v6, "[::]:0") };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        // The TLS config built (and checked) in `new` serves the first client.
        let tls = match self.prepared.lock().expect("tls lock").take() {
            Some(tls) => tls,
            None => tls::client_tls(&self.tls)?,
        };
        let client = Client::builder()
            .with_tls(tls)?
            .with_limits(limits()?)?
            .with_io(io(bind.parse().expect("a literal address"))?)?
            .start()
            .map_err(|e| anyhow!("cannot start the QUIC client on {bind}: {e}"))?;
        Ok(cell.get_or_init(|| client))
    }

    /// Connects to `node` at `addr` (HOST:PORT), requiring its certificate to name `node`;
    /// tries each address the name resolves to.
    pub async fn connect(&self, node: &str, addr: &str) -> Result<Connection> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await.with_context(|| format!("cannot resolve `{addr}` (peer `{node}`)"))?.collect();
        let mut last = anyhow!("`{addr}` (peer `{node}`) resolves to no address");
        for sock in addrs {
            let attempt = async {
                let client = self.client_for(&sock)?;
                client.connect(Connect::new(sock).with_server_name(node)).await.map_err(|e| anyhow!("cannot connect to `{node}` at {sock}: {e}"))
            };
            match attempt.await {
                Ok(mut conn) => {
                    conn.keep_alive(true).ok();
                    return Ok(conn);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// What to check when a handshake failed on certificates.
fn tls_hint(error: &str) -> &'static str {
    if error.contains("HANDSHAKE_FAILURE") || error.contains("untrusted") || error.contains("Certificate") {
        " (the nodes refused each other's certificates: both need certificates from the same CA, made by `snapship certs`, naming the node in `node:`)"
    } else {
        ""
    }
}

fn with_tls_hint(e: anyhow::Error) -> anyhow::Error {
    match tls_hint(&format!("{e:#}")) {
        "" => e,
        hint => e.context(hint.trim_start().trim_start_matches('(').trim_end_matches(')').to_string()),
    }
}

pub struct RemoteReplica {
    node: String,
    addr: String,
    fileset: String,
    transfer: Transfer,
    /// A replica that acknowledges nothing for this long, with data outstanding, is stalled.
    stall: Duration,
    connector: Arc<Connector>,
    connection: Mutex<Option<Connection>>,
    /// What the replica said in its last `snapshots` answer.
    compact: std::sync::atomic::AtomicBool,
    partial: std::sync::Mutex<Option<Partial>>,
}

impl RemoteReplica {
    pub fn new(node: String, addr: String, fileset: String, transfer: Transfer, stall: Duration, connector: Arc<Connector>) -> Self {
        RemoteReplica {
            node,
            addr,
            fileset,
            transfer,
            stall,
            connector,
            connection: Mutex::new(None),
            compact: Default::default(),
            partial: Default::default(),
        }
    }

    /// Opens a request stream (connecting first if needed) and sends `hello` and `request`.
    async fn request(&self, request: &Message) -> Result<(FrameReader<s2n_quic::stream::ReceiveStream>, s2n_quic::stream::SendStream)> {
        let mut guard = self.connection.lock().await;
        if guard.is_none() {
            *guard = Some(self.connector.connect(&self.node, &self.addr).await?);
        }
        let conn = guard.as_mut().expect("connected above");
        let stream = match conn.open_bidirectional_stream().await {
            Ok(s) => s,
            Err(e) => {
                *guard = None; // a dead connection: reconnect next time
                bail!("cannot open a stream to `{}`: {e}", self.node);
            }
        };
        drop(guard);
        let (recv, mut send) = stream.split();
        write_message(&mut send, &Message::Hello { version: VERSION }).await?;
        write_message(&mut send, request).await?;
        Ok((FrameReader::new(recv), send))
    }

    fn refused(&self, code: ErrorCode, message: String) -> anyhow::Error {
        Refused { node: self.node.clone(), code, message }.into()
    }
}

#[async_trait]
impl ReplicaEndpoint for RemoteReplica {
    fn node(&self) -> &str {
        &self.node
    }

    async fn list(&self) -> Result<Vec<Snapshot>> {
        self.list_snapshots().await.map_err(with_tls_hint)
    }

    async fn accepts_compact(&self) -> bool {
        self.compact.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn partial(&self) -> Option<Partial> {
        self.partial.lock().expect("partial lock").clone()
    }

    async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            conn.close(0u32.into());
        }
    }

    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        let result = self.ship(incoming, start, stream).await.map_err(with_tls_hint);
        if result.is_err() {
            // Whatever went wrong, the next attempt starts on a fresh connection: a stalled
            // one may still look alive to QUIC.
            self.close().await;
        }
        result
    }
}

impl RemoteReplica {
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let (mut replies, _send) = self.request(&Message::List { fileset: self.fileset.clone() }).await?;
        match read_message(&mut replies).await? {
            Message::Snapshots { snapshots, compact, partial } => {
                self.compact.store(compact, std::sync::atomic::Ordering::Relaxed);
                *self.partial.lock().expect("partial lock") = partial;
                Ok(snapshots
                    .into_iter()
                    .filter_map(|s| {
                        let name = SnapshotName::parse(&s.name)?;
                        Some(Snapshot { name, identity: s.identity, local_id: None, parent_local_id: None })
                    })
                    .collect())
            }
            Message::Error { code, message } => Err(self.refused(code, message)),
            other => bail!("protocol error: `{}` answered {other:?} to list", self.node),
        }
    }

    async fn ship(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()> {
        let from = start.offset();
        let begin = Message::Begin {
            fileset: self.fileset.clone(),
            snapshot: incoming.name.to_string(),
            identity: incoming.identity.clone(),
            base: incoming.base.clone(),
            compression: self.transfer.compression.into(),
            compact: start.compact,
            resume: start.resumed.as_ref().map(|r| ResumeFrom { offset: r.offset, blake3: r.hasher.finalize().to_hex().to_string() }),
            from_token: start.from_token,
        };
        let (mut replies, mut send) = self.request(&begin).await?;
        let ready = tokio::time::timeout(ANSWER_TIMEOUT, read_message(&mut replies))
            .await
            .map_err(|_| anyhow!("replica `{}` did not answer `begin` within {}s", self.node, ANSWER_TIMEOUT.as_secs()))??;
        match ready {
            Message::Ready => {}
            Message::Error { code, message } => return Err(self.refused(code, message)),
            other => bail!("protocol error: `{}` answered {other:?} to begin", self.node),
        }
        if from > 0 {
            tracing::info!(replica = %self.node, snapshot = %incoming.name, offset = from, "resuming the transfer where the replica stopped");
        }
        // Stream the data while watching the replica's acknowledgements: an error may come
        // early, and a replica that stops acknowledging while data is outstanding is stalled.
        let written = std::sync::atomic::AtomicU64::new(from);
        let prefix = start.resumed.map(|r| (r.offset, r.hasher));
        let sending = transfer::write_data(stream, prefix, self.transfer.compression, self.transfer.bandwidth_limit, &written, &mut send);
        let mut acked = from;
        let sent = tokio::select! {
            sent = sending => sent,
            failed = self.watch_acks(&mut replies, &written, &mut acked) => return Err(failed),
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                // The replica may have given up first and said why (then it stopped reading,
                // and our write failed on the reset): its reason is the one to report.
                if let Ok(Some((code, message))) = tokio::time::timeout(Duration::from_secs(2), self.error_reply(&mut replies)).await {
                    return Err(self.refused(code, message));
                }
                // Tell the replica why; it keeps what it has for a resume.
                let _ = write_message(&mut send, &Message::error(ErrorCode::Aborted, format!("{e:#}"))).await;
                let _ = send.close().await;
                return Err(e);
            }
        };
        write_message(&mut send, &Message::End { bytes: sent.bytes, blake3: sent.blake3 }).await?;
        send.close().await.ok();
        tracing::debug!(replica = %self.node, bytes = sent.bytes, wire_bytes = sent.wire_bytes, "stream sent, waiting for the commit");
        let committed = loop {
            let silence = COMMIT_SILENCE.max(self.stall);
            match tokio::time::timeout(silence, read_message(&mut replies)).await {
                Err(_) => bail!("replica `{}` went silent for {}s while finishing the snapshot", self.node, silence.as_secs()),
                Ok(Ok(Message::Ack { .. })) => continue,
                Ok(reply) => break reply?,
            }
        };
        match committed {
            Message::Committed { .. } => Ok(()),
            Message::Error { code, message } => Err(self.refused(code, message)),
            other => bail!("protocol error: `{}` answered {other:?} to end", self.node),
        }
    }

    /// The error the replica answered with, if its next message (after acknowledgements) is one.
    async fn error_reply(&self, replies: &mut FrameReader<s2n_quic::stream::ReceiveStream>) -> Option<(ErrorCode, String)> {
        loop {
            match read_message(replies).await.ok()? {
                Message::Ack { .. } => continue,
                Message::Error { code, message } => return Some((code, message)),
                _ => return None,
            }
        }
    }

    /// Reads acknowledgements until something goes wrong, which it returns: an error from the
    /// replica, a closed stream, or no progress for the stall timeout while `written` (stream
    /// bytes read into frames already handed to QUIC) is ahead of what the replica
    /// acknowledged.
    async fn watch_acks(
        &self,
        replies: &mut FrameReader<s2n_quic::stream::ReceiveStream>,
        written: &std::sync::atomic::AtomicU64,
        acked: &mut u64,
    ) -> anyhow::Error {
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
                Ok(Ok(Message::Error { code, message })) => return self.refused(code, message),
                Ok(Ok(other)) => return anyhow!("protocol error: `{}` sent {other:?} during the transfer", self.node),
                Ok(Err(e)) => return e.context(format!("replica `{}` broke off the transfer", self.node)),
                Err(_) => {}
            }
            if written.load(std::sync::atomic::Ordering::Relaxed) > *acked {
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
