//! QUIC between nodes (s2n-quic, mutual TLS): the origin's [`Connector`] and [`QuicDialer`],
//! and the replica's listening side ([`bind`], [`serve`]).
//!
//! [`Connector`] holds one s2n-quic client (one UDP socket per address family) for a run; a
//! [`QuicDialer`] keeps one connection to one peer (checking that the server's certificate
//! names the node it meant to reach) and opens one bidirectional stream per request. On the
//! replica, [`serve`] accepts connections, admits only peers listed in the node config (the
//! name comes from the verified certificate, never from a message), and hands each stream to
//! the replica role's [`Handler`].
//!
//! Admission comes before authorization: a listed peer with a valid certificate may still be
//! hostile, so every peer gets bounded room on the replica whatever it sends: at most
//! [`MAX_CONNECTIONS_PER_PEER`] connections (and [`MAX_CONNECTIONS`] in all), at most
//! [`MAX_STREAMS_PER_CONNECTION`] open request streams per connection (QUIC stream credit),
//! and at most [`MAX_REQUESTS_PER_PEER`] requests served at once (a semaphore taken before a
//! stream is accepted, so a flood of streams waits in QUIC instead of spawning tasks). What
//! a request may then do is the handler's business. A refused connection is closed with a
//! [`Refusal`] code that the origin turns into what to do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use s2n_quic::client::Connect;
use s2n_quic::provider::limits::Limits;
use s2n_quic::{Client, Connection, Server};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::{self, PeerIdentity, PeerName};
use super::{Dialer, Handler, RequestStream};
use crate::config::{NodeConfig, TlsFiles};

/// The flow-control windows (connection and stream) and the send buffer, in bytes: what
/// may be in flight on one connection. A path carries at most window / RTT, so this is a
/// bandwidth-delay product: 16 MiB is 670 Mbit/s at 200 ms RTT (a far DR site), 2.7 Gbit/s
/// at 50 ms, and more than a LAN needs. (The old 8 MiB windows were not what capped a long
/// path; s2n-quic's default 4 MiB send buffer was one cap, 168 Mbit/s at 200 ms, and the
/// congestion controller the other, see [`congestion_controller`].)
///
/// The trade-off is memory. The receive window is what a peer may send before the replica
/// reads it, so it is what the replica holds in QUIC's buffers when its spool is full and
/// the stream waits: at most [`MAX_CONNECTIONS_PER_PEER`] x 16 MiB (64 MiB) per peer and
/// [`MAX_CONNECTIONS`] x 16 MiB (512 MiB) in all, in the worst case where every connection
/// of every peer is stalled with a full window; a healthy transfer holds what one RTT
/// carries, and the spool (whose memory level has the node-wide `spool_memory` budget)
/// takes it from there. On the origin the send buffer holds what is sent and not yet
/// acknowledged, again one RTT's worth: a 1 Gbit/s path at 200 ms (25 MB in flight) would
/// need more, and gets 670 Mbit/s.
pub const WINDOW: u64 = 16 << 20;

/// Connection limits shared by both sides: windows of [`WINDOW`], so that memory stays flat
/// whatever the stream size while a long path stays full.
///
/// Silence is the node's `stall_timeout`'s to judge, not QUIC's: the idle timeout is
/// `stall` (so a dead peer is noticed within it, and a live one is never dropped sooner),
/// and keep-alives go out every quarter of it (at most every 30 s), which also lets a
/// restarted replica's stateless reset tell the origin at once that its connection is gone.
pub fn limits(stall: Duration) -> Result<Limits> {
    let stall = stall.max(Duration::from_secs(1));
    Ok(Limits::new()
        .with_max_handshake_duration(Duration::from_secs(5))?
        .with_max_idle_timeout(stall)?
        .with_max_keep_alive_period(keep_alive_period(stall))?
        .with_data_window(WINDOW)?
        .with_bidirectional_local_data_window(WINDOW)?
        .with_bidirectional_remote_data_window(WINDOW)?
        .with_max_send_buffer_size(WINDOW as u32)?)
}

/// The congestion controller of both endpoints: BBR. s2n-quic's default, CUBIC with hybrid
/// slow start, leaves slow start at the first rise of the RTT samples of 4-16 ms (a busy
/// machine or a queue on the path makes those) and then grows its window by about one
/// packet per RTT: at 200 ms RTT it stayed at 150-250 KB in flight (1-1.3 MB/s) where TCP
/// on the same path reached 10 MB/s. BBR sizes its window from the measured bandwidth and
/// minimum RTT instead, so jitter does not stop its start-up, and it does not take loss
/// unrelated to congestion for congestion.
pub fn congestion_controller() -> s2n_quic::provider::congestion_controller::Bbr {
    s2n_quic::provider::congestion_controller::Bbr::default()
}

/// How often a quiet connection is pinged: four times per idle timeout, at most every 30 s
/// (what middleboxes tolerate).
fn keep_alive_period(stall: Duration) -> Duration {
    (stall / 4).clamp(Duration::from_millis(250), Duration::from_secs(30))
}

/// Connections one peer may have open to a replica at once. An origin uses one (a restarted
/// origin's old one lingers until the idle timeout); the rest is slack.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Connections a replica accepts in all, from all its peers.
pub const MAX_CONNECTIONS: usize = 32;
/// Request streams a peer may have open on one connection (s2n-quic's default is 100): an
/// origin needs one per file set it is transferring and one per listing.
pub const MAX_STREAMS_PER_CONNECTION: u64 = 32;
/// Requests of one peer served at once, over all its connections. A stream beyond it waits
/// (unaccepted, in QUIC) for a request of that peer to end.
pub const MAX_REQUESTS_PER_PEER: usize = 32;

/// Why the replica closed a connection right after the handshake: the QUIC application
/// error code it closes with, which the origin maps back to what to do ([`explain_close`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The replica is shutting down.
    ShuttingDown = 2,
    /// The certificate names a node that is not in the replica's `peers`.
    NotListed = 10,
    /// The certificate names no node (no DNS subject alternative name).
    NoNodeName = 11,
    /// The peer, or all peers together, have as many connections open as allowed.
    TooManyConnections = 12,
}

impl Refusal {
    const ALL: [Refusal; 4] = [Refusal::ShuttingDown, Refusal::NotListed, Refusal::NoNodeName, Refusal::TooManyConnections];

    fn code(self) -> u32 {
        self as u32
    }

    /// What the origin `me` is told when `replica` refused it for this reason.
    fn what_to_do(self, me: &str, replica: &str) -> String {
        match self {
            Refusal::ShuttingDown => format!("`{replica}` is shutting down; the origin retries by itself"),
            Refusal::NotListed => format!(
                "`{me}` is not listed under `peers` on `{replica}`: add it there (`{me}: HOST:PORT` in `{replica}`'s node config) and reload `snapship run` there (`systemctl reload snapship`, or SIGHUP)"
            ),
            Refusal::NoNodeName => format!("`{replica}` found no node name in `{me}`'s certificate: make the certificate with `snapship certs {me}`"),
            Refusal::TooManyConnections => format!(
                "`{replica}` has as many connections open as it allows ({MAX_CONNECTIONS_PER_PEER} per peer, {MAX_CONNECTIONS} in all); is another process using `{me}`'s certificate? The origin retries by itself"
            ),
        }
    }
}

/// The [`Refusal`] in an error that a connection closed by the replica caused, if any.
fn refusal_in(text: &str) -> Option<Refusal> {
    // s2n-quic says "closed on the application level with error application::Error(N) by
    // the remote endpoint".
    let rest = text.split("application::Error(").nth(1)?;
    let code: u32 = rest.split(')').next()?.parse().ok()?;
    let by_remote = rest.contains("remote");
    Refusal::ALL.into_iter().find(|r| r.code() == code).filter(|_| by_remote)
}

/// UDP I/O bound to `addr`, probing path MTUs up to 9000 bytes: QUIC at 1500 is CPU-bound,
/// and where the path carries jumbo frames (loopback, many LANs) the probe finds them;
/// elsewhere it settles at what the path allows. The socket's buffers are sized
/// ([`udp_socket`]).
pub fn io(addr: SocketAddr) -> Result<s2n_quic::provider::io::tokio::Provider> {
    let socket = udp_socket(addr)?;
    Ok(s2n_quic::provider::io::tokio::Builder::default().with_rx_socket(socket)?.with_max_mtu(9000)?.build()?)
}

/// What the kernel is asked to buffer per UDP socket, each way. The default (208 KiB on
/// Linux) overflows in bursts: about one datagram in ten was dropped on a clean loopback
/// transfer, each one resent.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`] bytes of receive and send buffer:
/// forced past `net.core.rmem_max`/`wmem_max` where this process may (CAP_NET_ADMIN, as
/// root), else as much as those allow, with a warning saying how to raise them.
pub fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind a UDP socket on {addr}"))?;
    socket.set_nonblocking(true)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
    }
    // Linux reports twice what it grants (the doubling covers its bookkeeping).
    let granted = |got: rustix::io::Result<usize>| got.map(|b| b / 2).unwrap_or(0);
    let (recv, send) = (granted(sockopt::socket_recv_buffer_size(&socket)), granted(sockopt::socket_send_buffer_size(&socket)));
    for (what, got, key) in [("receive", recv, "net.core.rmem_max"), ("send", send, "net.core.wmem_max")] {
        if got < SOCKET_BUFFER {
            tracing::warn!(
                %addr,
                "the kernel caps the UDP {what} buffer at {} KiB ({key}), below the {} MiB asked: datagrams may be dropped in bursts and resent; raise it with `sysctl -w {key}={SOCKET_BUFFER}` (and in /etc/sysctl.d to keep it), or run snapship as root",
                got >> 10,
                SOCKET_BUFFER >> 20
            );
        }
    }
    Ok(socket)
}

/// Stateless reset tokens that survive a restart: derived (keyed BLAKE3) from the node's
/// TLS private key and the connection ID. A replica that restarted answers a packet of a
/// connection it no longer knows with a reset the origin can check, so the origin drops
/// that connection at once instead of waiting out the idle timeout. The key never leaves
/// the node, and connection IDs are random, so nobody else can forge a reset.
struct ResetTokens {
    key: [u8; 32],
}

impl ResetTokens {
    fn from_key_file(files: &TlsFiles) -> Result<ResetTokens> {
        let pem = std::fs::read(&files.key).with_context(|| format!("cannot read {}", files.key.display()))?;
        Ok(ResetTokens { key: blake3::derive_key("snapship 2026 QUIC stateless reset tokens", &pem) })
    }
}

impl s2n_quic::provider::stateless_reset_token::Provider for ResetTokens {
    type Generator = ResetTokens;
    type Error = std::convert::Infallible;

    fn start(self) -> Result<ResetTokens, Self::Error> {
        Ok(self)
    }
}

impl s2n_quic::provider::stateless_reset_token::Generator for ResetTokens {
    fn generate(&mut self, local_connection_id: &[u8]) -> s2n_quic_core::stateless_reset::Token {
        let hash = blake3::keyed_hash(&self.key, local_connection_id);
        let mut token = [0u8; 16];
        token.copy_from_slice(&hash.as_bytes()[..16]);
        token.into()
    }
}

/// Whether `e` says the QUIC connection under a request is gone (closed by the peer,
/// reset by a restarted peer, timed out), as opposed to an answer or a local problem:
/// then a fresh connection may well work.
pub fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let inner = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &(dyn std::error::Error + 'static));
        [Some(c), inner].into_iter().flatten().any(|c| {
            c.downcast_ref::<s2n_quic::connection::Error>().is_some()
                || c.downcast_ref::<s2n_quic::stream::Error>().is_some_and(|s| matches!(s, s2n_quic::stream::Error::ConnectionError { .. }))
        })
    })
}

/// The origin's QUIC clients: one UDP socket per address family, made on first use.
pub struct Connector {
    /// This node's name, for what to do when a replica refuses it.
    me: String,
    /// The TLS files, for what to check when a handshake fails.
    tls: TlsFiles,
    /// The TLS every handshake uses: replaced in place when the daemon reloads.
    live: tls::LiveTls,
    /// The node's `stall_timeout`: the connections' idle timeout ([`limits`]).
    stall: Duration,
    v4: std::sync::OnceLock<Client>,
    v6: std::sync::OnceLock<Client>,
    /// How many of the clients' connections have not yet told their peer they are closed.
    unclosed: tokio::sync::watch::Sender<usize>,
}

impl Connector {
    /// Waits (up to `limit`) until every connection made through this connector has sent
    /// its close to the peer (or ended otherwise), so that a one-shot command's close
    /// reaches the peer before the process exits: a peer counts open connections, and one
    /// never told would hold a slot until its idle timeout. It does not wait out QUIC's
    /// closing period (three probe timeouts, about 0.26 s on loopback, in which the endpoint
    /// would only repeat its close to late packets): a process about to exit has no use
    /// for it.
    pub async fn wait_closed(&self, limit: std::time::Duration) {
        let mut unclosed = self.unclosed.subscribe();
        let _ = tokio::time::timeout(limit, async {
            let _ = unclosed.wait_for(|n| *n == 0).await;
            // The close is in the socket task's queue: give it a moment to leave.
            tokio::time::sleep(CLOSE_FLUSH).await;
        })
        .await;
    }

    pub fn new(node: &NodeConfig) -> Result<Connector> {
        let files = node.tls.as_ref().ok_or_else(|| anyhow!("{} has no `tls:` section; it is needed to reach other nodes", node.file.display()))?;
        // Built now, so that a missing certificate is reported before any transfer.
        Ok(Self::with_tls(node, files, tls::LiveTls::load(files)?))
    }

    /// A connector for `node` whose handshakes use `live` (the daemon's, replaced when it
    /// reloads); `files` are what `live` was made from.
    pub fn with_tls(node: &NodeConfig, files: &TlsFiles, live: tls::LiveTls) -> Connector {
        Connector {
            me: node.node.0.clone(),
            tls: files.clone(),
            live,
            stall: node.transfers.stall_timeout.0,
            v4: Default::default(),
            v6: Default::default(),
            unclosed: tokio::sync::watch::Sender::new(0),
        }
    }

    fn client_for(&self, addr: &SocketAddr) -> Result<&Client> {
        let (cell, bind) = if addr.is_ipv4() { (&self.v4, "0.0.0.0:0") } else { (&self.v6, "[::]:0") };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let client = Client::builder()
            .with_tls(self.live.client())?
            .with_limits(limits(self.stall)?)?
            .with_congestion_controller(congestion_controller())?
            .with_event(CloseWatch(self.unclosed.clone()))?
            .with_io(io(bind.parse().expect("a literal address"))?)?
            .start()
            .map_err(|e| anyhow!("cannot start the QUIC client on {bind}: {e}"))?;
        Ok(cell.get_or_init(|| client))
    }

    /// `e`, from talking to `replica`, with what to do when it is a refusal: a connection
    /// the replica closed ([`Refusal`]), or certificates refused in the handshake.
    pub fn explain(&self, replica: &str, e: anyhow::Error) -> anyhow::Error {
        let text = format!("{e:#}");
        if let Some(refusal) = refusal_in(&text) {
            return e.context(refusal.what_to_do(&self.me, replica));
        }
        match tls_hint(&text, &self.me, replica, &self.tls) {
            Some(hint) => e.context(hint),
            None => e,
        }
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

/// One connection to one peer, made on first use and again after a failure.
pub struct QuicDialer {
    node: String,
    addr: String,
    connector: Arc<Connector>,
    connection: Mutex<Option<Connection>>,
}

impl QuicDialer {
    pub fn new(node: String, addr: String, connector: Arc<Connector>) -> Self {
        QuicDialer { node, addr, connector, connection: Mutex::new(None) }
    }
}

#[async_trait]
impl Dialer for QuicDialer {
    /// A stream on the connection kept, or on a new one. A kept connection that turns out
    /// closed (the replica restarted, or shut down and came back) is replaced at once by
    /// one fresh dial, so a restart costs a reconnect, not a failed attempt.
    async fn open(&self) -> Result<RequestStream> {
        let mut guard = self.connection.lock().await;
        let mut fresh = guard.is_none();
        if fresh {
            *guard = Some(self.connector.connect(&self.node, &self.addr).await?);
        }
        let stream = loop {
            let conn = guard.as_mut().expect("connected above");
            match conn.open_bidirectional_stream().await {
                Ok(s) => break s,
                Err(e) if !fresh => {
                    tracing::info!(replica = %self.node, "the connection kept to `{}` is gone ({e}); connecting again", self.node);
                    *guard = Some(self.connector.connect(&self.node, &self.addr).await?);
                    fresh = true;
                }
                Err(e) => {
                    *guard = None; // a dead connection: reconnect next time
                    bail!("cannot open a stream to `{}`: {e}", self.node);
                }
            }
        };
        drop(guard);
        let (recv, send) = stream.split();
        Ok(RequestStream { recv: Box::new(recv), send: Box::new(send) })
    }

    fn lost(&self, e: &anyhow::Error) -> bool {
        connection_lost(e)
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        self.connector.explain(&self.node, e)
    }

    async fn reset(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            conn.close(0u32.into());
        }
    }
}

/// How long [`Connector::wait_closed`] gives a close, once written, to leave the socket.
const CLOSE_FLUSH: Duration = Duration::from_millis(10);

/// s2n-quic event subscriber of a [`Connector`]'s clients: counts their connections in
/// `unclosed` until each has sent its CONNECTION_CLOSE (s2n-quic publishes the close, then
/// the datagram that carries it), or ended in a way that sends none (the peer closed it, the
/// idle timer, a stateless reset), or is gone.
struct CloseWatch(tokio::sync::watch::Sender<usize>);

/// One connection's part of [`CloseWatch`]: counted until [`Unclosed::done`] (or its drop,
/// when s2n-quic forgets the connection).
struct Unclosed {
    count: Option<tokio::sync::watch::Sender<usize>>,
    /// The connection closed from this side: its close goes out with the next datagram.
    closing: bool,
}

impl Unclosed {
    fn done(&mut self) {
        if let Some(count) = self.count.take() {
            count.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

impl Drop for Unclosed {
    fn drop(&mut self) {
        self.done();
    }
}

impl s2n_quic::provider::event::Subscriber for CloseWatch {
    type ConnectionContext = Unclosed;

    fn create_connection_context(&mut self, _: &s2n_quic::provider::event::ConnectionMeta, _: &s2n_quic::provider::event::ConnectionInfo) -> Unclosed {
        self.0.send_modify(|n| *n += 1);
        Unclosed { count: Some(self.0.clone()), closing: false }
    }

    fn on_connection_closed(
        &mut self,
        context: &mut Unclosed,
        _: &s2n_quic::provider::event::ConnectionMeta,
        event: &s2n_quic::provider::event::events::ConnectionClosed,
    ) {
        use s2n_quic::connection::Error;
        match event.error {
            Error::Closed { initiator, .. } | Error::Transport { initiator, .. } | Error::Application { initiator, .. } if initiator.is_local() => {
                context.closing = true
            }
            _ => context.done(),
        }
    }

    fn on_datagram_sent(&mut self, context: &mut Unclosed, _: &s2n_quic::provider::event::ConnectionMeta, _: &s2n_quic::provider::event::events::DatagramSent) {
        if context.closing {
            context.done();
        }
    }
}

/// Binds the replica's listening socket (so that a port in use is an error at start-up).
/// `stall` is the node's `stall_timeout` ([`limits`]); `files` are what `live` was made from
/// (the stateless reset tokens derive from the key, so they survive a restart).
pub fn bind(live: &tls::LiveTls, files: &TlsFiles, addr: SocketAddr, stall: Duration) -> Result<Server> {
    Server::builder()
        .with_tls(live.server())?
        .with_limits(limits(stall)?.with_max_open_remote_bidirectional_streams(MAX_STREAMS_PER_CONNECTION)?)?
        .with_congestion_controller(congestion_controller())?
        .with_stateless_reset_token(ResetTokens::from_key_file(files)?)?
        .with_event(PeerIdentity)?
        .with_io(io(addr)?)?
        .start()
        .map_err(|e| anyhow!("cannot listen on {addr}: {e}"))
}

/// Accepts connections until `shutdown`, admitting only the nodes in `peers` (as they are
/// when each connection is made: a reload may change them), each within
/// its limits, and hands each of their request streams to `handler`. Every connection and
/// stream task is tracked and waited for before this returns.
pub async fn serve(mut server: Server, peers: tokio::sync::watch::Receiver<Vec<String>>, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let admission = Arc::new(Admission::default());
    loop {
        // Cancel safety: `accept` hands a connection over only when it returns it.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = server.accept() => match conn {
                Some(conn) => { tasks.spawn(connection(conn, peers.clone(), admission.clone(), handler.clone(), shutdown.clone())); }
                None => break,
            },
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// The replica's count of connections, per peer and in all, and each peer's request slots.
#[derive(Default)]
struct Admission {
    state: std::sync::Mutex<AdmissionState>,
}

#[derive(Default)]
struct AdmissionState {
    total: usize,
    /// Per listed peer (so at most one entry per name in `peers`): its open connections, and
    /// its request slots, shared by all its connections.
    peers: HashMap<String, (usize, Arc<Semaphore>)>,
}

/// An admitted connection; dropping it frees its place.
struct ConnectionSlot {
    admission: Arc<Admission>,
    peer: String,
    requests: Arc<Semaphore>,
}

impl Admission {
    /// A place for a connection of `peer`, or which limit it would exceed.
    fn admit(self: &Arc<Self>, peer: &str) -> Result<ConnectionSlot, String> {
        let mut st = self.state.lock().expect("admission lock");
        let total = st.total;
        let (open, requests) = st.peers.entry(peer.to_string()).or_insert_with(|| (0, Arc::new(Semaphore::new(MAX_REQUESTS_PER_PEER))));
        if *open >= MAX_CONNECTIONS_PER_PEER {
            return Err(format!("it already has {open} connections open (the limit per peer)"));
        }
        if total >= MAX_CONNECTIONS {
            return Err(format!("this node already has {total} connections open (the limit for all peers)"));
        }
        *open += 1;
        let requests = requests.clone();
        st.total += 1;
        Ok(ConnectionSlot { admission: self.clone(), peer: peer.to_string(), requests })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut st = self.admission.state.lock().expect("admission lock");
        st.total -= 1;
        if let Some((open, _)) = st.peers.get_mut(&self.peer) {
            *open -= 1;
        }
    }
}

async fn connection(
    mut conn: Connection,
    peers: tokio::sync::watch::Receiver<Vec<String>>,
    admission: Arc<Admission>,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = conn.query_event_context(|p: &PeerName| p.0.clone()).ok().flatten();
    let refuse = |conn: &Connection, why: Refusal| conn.close(why.code().into());
    let peer = match peer {
        Some(p) if peers.borrow().contains(&p) => p,
        Some(p) => {
            tracing::warn!(%remote, "refusing node {p:?}: it is not listed under `peers` in the node config (if it should replicate with this node, add it there)");
            refuse(&conn, Refusal::NotListed);
            return;
        }
        None => {
            tracing::warn!(%remote, "refusing a connection whose certificate names no node (no DNS subject alternative name)");
            refuse(&conn, Refusal::NoNodeName);
            return;
        }
    };
    let slot = match admission.admit(&peer) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::warn!(%remote, "refusing a connection from node {peer:?}: {why}");
            refuse(&conn, Refusal::TooManyConnections);
            return;
        }
    };
    tracing::debug!(%peer, %remote, "peer connected");
    // Pings keep a quiet connection alive for as long as both sides live, and tell this
    // side within the idle timeout (`stall_timeout`) when the origin is gone.
    conn.keep_alive(true).ok();
    let streams = TaskTracker::new();
    let mut saturated = false;
    loop {
        // A request slot first, then a stream: while the peer has all its requests running,
        // its further streams wait in QUIC (bounded by MAX_STREAMS_PER_CONNECTION and the
        // flow-control windows), not in tasks here.
        // Cancel safety: a cancelled `acquire_owned` takes no permit; a cancelled
        // `accept_bidirectional_stream` takes no stream.
        if slot.requests.available_permits() == 0 && !saturated {
            tracing::warn!(%peer, %remote, "node {peer:?} has {MAX_REQUESTS_PER_PEER} requests under way (the limit); its further streams wait");
        }
        saturated = slot.requests.available_permits() == 0;
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slot.requests.clone().acquire_owned() => permit.expect("the request semaphore is never closed"),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bidirectional_stream() => match stream {
                Ok(Some(stream)) => {
                    let (recv, send) = stream.split();
                    let (handler, peer) = (handler.clone(), peer.clone());
                    streams.spawn(async move {
                        handler.handle(peer, RequestStream { recv: Box::new(recv), send: Box::new(send) }).await;
                        drop(permit);
                    });
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    streams.close();
    if shutdown.is_cancelled() {
        refuse(&conn, Refusal::ShuttingDown);
    }
    streams.wait().await;
    drop(slot);
}

/// What to check when a handshake between this node (`me`, with `files`) and `replica`
/// failed on certificates; `None` when `error` is no such failure.
fn tls_hint(error: &str, me: &str, replica: &str, files: &TlsFiles) -> Option<String> {
    let refused_by_replica = error.contains("HANDSHAKE_FAILURE") || error.contains("Certificate");
    if !refused_by_replica && !error.contains("untrusted") && !error.contains("expired") {
        return None;
    }
    let cert = files.cert.display();
    // Our own certificate is the one we can look at.
    if let Some(problem) = std::fs::read_to_string(&files.cert).ok().and_then(|pem| tls::validity_problem(&pem, SystemTime::now())) {
        return Some(format!(
            "this node's certificate {cert} {problem}: renew it with `snapship certs --renew {me}` (check with `openssl x509 -enddate -noout -in {cert}`), then copy it here"
        ));
    }
    if error.contains("expired") {
        return Some(format!(
            "`{replica}`'s certificate has expired or is not valid yet: check it there with `openssl x509 -enddate -noout -in CERT`; renew it with `snapship certs --renew {replica}`"
        ));
    }
    Some(format!(
        "the nodes refused each other's certificates: is a certificate expired or not yet valid? check `openssl x509 -enddate -noout -in CERT` on both (this node's: {cert}); renew with `snapship certs --renew NODE`. Otherwise both need certificates from the same CA, made by `snapship certs`, naming the node in `node:` (`{me}`, `{replica}`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes_map_back_to_what_to_do() {
        let closed =
            |code: u32| format!("cannot read: The connection was closed on the application level with error application::Error({code}) by the remote endpoint");
        assert_eq!(refusal_in(&closed(10)), Some(Refusal::NotListed));
        assert_eq!(refusal_in(&closed(12)), Some(Refusal::TooManyConnections));
        assert_eq!(refusal_in(&closed(99)), None);
        assert_eq!(refusal_in("application::Error(10) by the local endpoint"), None, "our own close is no refusal");
        let text = Refusal::NotListed.what_to_do("alpha", "beta");
        assert!(text.contains("`alpha` is not listed under `peers` on `beta`: add it there"), "{text}");
    }

    #[test]
    fn admission_counts_connections_per_peer_and_in_all() {
        let admission = Arc::new(Admission::default());
        let alpha: Vec<_> = (0..MAX_CONNECTIONS_PER_PEER).map(|_| admission.admit("alpha").unwrap()).collect();
        assert!(admission.admit("alpha").err().unwrap().contains("limit per peer"));
        let mut others = Vec::new();
        for i in 0..MAX_CONNECTIONS - MAX_CONNECTIONS_PER_PEER {
            others.push(admission.admit(&format!("n{}", i / MAX_CONNECTIONS_PER_PEER)).unwrap());
        }
        assert!(admission.admit("gamma").err().unwrap().contains("for all peers"));
        drop(alpha);
        admission.admit("alpha").unwrap();
        assert!(Arc::ptr_eq(&others[0].requests, &others[1].requests), "a peer's connections share its request slots");
    }
}
