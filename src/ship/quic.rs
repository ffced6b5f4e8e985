//! QUIC between nodes (s2n-quic, mutual TLS): the origin's [`Connector`] and [`QuicDialer`],
//! and the replica's listening side ([`bind`], [`serve`]).
//!
//! [`Connector`] holds one s2n-quic client (one UDP socket per address family) for a run; a
//! [`QuicDialer`] keeps one connection to one peer (checking that the server's certificate
//! names the node it meant to reach) and opens one bidirectional stream per request. On the
//! replica, [`serve`] accepts connections, admits only peers listed in the node config (the
//! name comes from the verified certificate, never from a message), and hands each stream to
//! the replica role's [`Handler`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use s2n_quic::client::Connect;
use s2n_quic::provider::limits::Limits;
use s2n_quic::{Client, Connection, Server};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::{self, PeerIdentity, PeerName};
use super::{Dialer, Handler, RequestStream};
use crate::config::{NodeConfig, TlsFiles};

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

/// The origin's QUIC clients: one UDP socket per address family, made on first use.
pub struct Connector {
    tls: TlsFiles,
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
    async fn open(&self) -> Result<RequestStream> {
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
        let (recv, send) = stream.split();
        Ok(RequestStream { recv: Box::new(recv), send: Box::new(send) })
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        with_tls_hint(e)
    }

    async fn reset(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            conn.close(0u32.into());
        }
    }
}

/// Binds the replica's listening socket (so that a port in use is an error at start-up).
pub fn bind(files: &TlsFiles, addr: SocketAddr) -> Result<Server> {
    Server::builder()
        .with_tls(tls::server_tls(files)?)?
        .with_limits(limits()?)?
        .with_event(PeerIdentity)?
        .with_io(io(addr)?)?
        .start()
        .map_err(|e| anyhow!("cannot listen on {addr}: {e}"))
}

/// Accepts connections until `shutdown`, admitting only the nodes in `peers`, and hands each
/// of their request streams to `handler`. Every connection and stream task is tracked and
/// waited for before this returns.
pub async fn serve(mut server: Server, peers: Vec<String>, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let peers = Arc::new(peers);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = server.accept() => match conn {
                Some(conn) => { tasks.spawn(connection(conn, peers.clone(), handler.clone(), shutdown.clone())); }
                None => break,
            },
        }
    }
    tasks.close();
    tasks.wait().await;
}

async fn connection(mut conn: Connection, peers: Arc<Vec<String>>, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    let remote = conn.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = conn.query_event_context(|p: &PeerName| p.0.clone()).ok().flatten();
    let peer = match peer {
        Some(p) if peers.contains(&p) => p,
        Some(p) => {
            tracing::warn!(%remote, "refusing node {p:?}: it is not listed under `peers` in the node config");
            conn.close(1u32.into());
            return;
        }
        None => {
            tracing::warn!(%remote, "refusing a connection whose certificate names no node (no DNS subject alternative name)");
            conn.close(1u32.into());
            return;
        }
    };
    tracing::debug!(%peer, %remote, "peer connected");
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bidirectional_stream() => match stream {
                Ok(Some(stream)) => {
                    let (recv, send) = stream.split();
                    let (handler, peer) = (handler.clone(), peer.clone());
                    streams.spawn(async move { handler.handle(peer, RequestStream { recv: Box::new(recv), send: Box::new(send) }).await });
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    streams.close();
    if shutdown.is_cancelled() {
        conn.close(2u32.into());
    }
    streams.wait().await;
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
