//! The replica's side of QUIC: accept origins, check who they are and what they may do, and
//! receive their streams with this node's own backend and paths.
//!
//! A request is authorized only when the peer's certificate names the node that this node's
//! copy of the policy names as origin, and the policy names this node as a replica. The
//! target path always comes from this node's policy; no message can name one.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use s2n_quic::{Connection, Server};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::FrameReader;
use super::protocol::{ErrorCode, Message, VERSION, WireSnapshot};
use super::session::{self, Sessions};
use super::tls::{self, PeerIdentity, PeerName};
use super::transfer::{IncomingData, read_message, write_message};
use crate::config::{LoadedConfig, Policy, ReplicaSpec};
use crate::snapshot::{self, Incoming, SnapshotName};
use crate::status::StatusBoard;

/// Answers `peer` asking about `fileset`: the policy and this node's replica entry, or the
/// error message to send back.
pub fn authorize<'a>(config: &'a LoadedConfig, peer: &str, fileset: &str) -> Result<(&'a Policy, &'a ReplicaSpec), Message> {
    let here = &config.node.node;
    let Some(policy) = config.policy(fileset) else {
        return Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` has no policy for file set `{fileset}`")));
    };
    if policy.origin.node.0 != peer {
        return Err(Message::error(
            ErrorCode::Unauthorized,
            format!("node `{peer}` is not the origin of `{fileset}` (the policy on `{here}` names `{}`)", policy.origin.node),
        ));
    }
    match policy.replica_on(here) {
        Some(replica) => Ok((policy, replica)),
        None => Err(Message::error(ErrorCode::Unauthorized, format!("node `{here}` is not a replica of `{fileset}`"))),
    }
}

/// Binds the listening socket (so that a port in use is an error at start-up).
pub fn bind(config: &LoadedConfig, addr: SocketAddr) -> Result<Server> {
    let files = config.node.tls.as_ref().ok_or_else(|| anyhow!("{} has no `tls:` section; a replica needs one", config.node.file.display()))?;
    let server = Server::builder()
        .with_tls(tls::server_tls(files)?)?
        .with_limits(super::quic::limits()?)?
        .with_event(PeerIdentity)?
        .with_io(super::quic::io(addr)?)?
        .start()
        .map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(node = %config.node.node, %addr, "listening for origins");
    Ok(server)
}

/// Serves until `shutdown`; transfers in flight are dropped then (their receives fail, and
/// the partial snapshot, hidden in staging, is removed now or by the next receive).
pub async fn serve(mut server: Server, config: Arc<LoadedConfig>, status: Arc<StatusBoard>, shutdown: CancellationToken) -> Result<()> {
    let tasks = TaskTracker::new();
    let sessions = Sessions::new(&config.node.transfers, &config.node.state_dir);
    tasks.spawn(sessions.clone().watch(shutdown.clone()));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = server.accept() => match conn {
                Some(conn) => { tasks.spawn(handle_connection(conn, config.clone(), status.clone(), sessions.clone(), shutdown.clone())); }
                None => break,
            },
        }
    }
    sessions.shutdown();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn handle_connection(mut conn: Connection, config: Arc<LoadedConfig>, status: Arc<StatusBoard>, sessions: Arc<Sessions>, shutdown: CancellationToken) {
    let remote = conn.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = conn.query_event_context(|p: &PeerName| p.0.clone()).ok().flatten();
    let peer = match peer {
        Some(p) if config.node.peers.keys().any(|k| k.0 == p) => p,
        Some(p) => {
            tracing::warn!(%remote, "refusing node `{p}`: it is not listed under peers in {}", config.node.file.display());
            conn.close(1u32.into());
            return;
        }
        None => {
            tracing::warn!(%remote, "refusing a connection whose certificate names no node (no DNS subject alternative name)");
            conn.close(1u32.into());
            return;
        }
    };
    tracing::debug!(%peer, %remote, "origin connected");
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bidirectional_stream() => match stream {
                Ok(Some(stream)) => { streams.spawn(handle_stream(stream, peer.clone(), config.clone(), status.clone(), sessions.clone())); }
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

async fn handle_stream(
    stream: s2n_quic::stream::BidirectionalStream,
    peer: String,
    config: Arc<LoadedConfig>,
    status: Arc<StatusBoard>,
    sessions: Arc<Sessions>,
) {
    let (recv, mut send) = stream.split();
    let frames = FrameReader::new(recv);
    let reply = match serve_request(frames, &mut send, &peer, &config, &status, &sessions).await {
        Ok(reply) => reply,
        Err(e) => Message::error(session::error_code(&e), format!("{e:#}")),
    };
    if let Message::Error { code, message } = &reply {
        tracing::warn!(%peer, ?code, "request failed: {message}");
    }
    let _ = write_message(&mut send, &reply).await;
    let _ = send.close().await;
}

/// Serves one request; returns the final reply to send.
async fn serve_request(
    mut frames: FrameReader<s2n_quic::stream::ReceiveStream>,
    send: &mut s2n_quic::stream::SendStream,
    peer: &str,
    config: &LoadedConfig,
    status: &Arc<StatusBoard>,
    sessions: &Sessions,
) -> Result<Message> {
    match read_message(&mut frames).await? {
        Message::Hello { version } if version == VERSION => {}
        Message::Hello { version } => {
            return Ok(Message::error(
                ErrorCode::Version,
                format!("this node speaks protocol {VERSION}, the origin {version}; run the same snapship version on both"),
            ));
        }
        other => return Ok(Message::error(ErrorCode::BadRequest, format!("expected hello, got {other:?}"))),
    }
    match read_message(&mut frames).await? {
        Message::List { fileset } => {
            let (policy, replica) = match authorize(config, peer, &fileset) {
                Ok(found) => found,
                Err(refusal) => return Ok(refusal),
            };
            let side = snapshot::replica_for(policy, replica)?;
            let snapshots = side.list().await?.into_iter().map(|s| WireSnapshot { name: s.name.to_string(), identity: s.identity }).collect();
            Ok(Message::Snapshots { snapshots, compact: side.accepts_compact().await, partial: sessions.resumable(&fileset, side.as_ref()).await })
        }
        Message::Begin { fileset, snapshot, identity, base, compression, compact, resume, from_token } => {
            let (policy, replica) = match authorize(config, peer, &fileset) {
                Ok(found) => found,
                Err(refusal) => return Ok(refusal),
            };
            let Some(name) = SnapshotName::parse(&snapshot) else {
                return Ok(Message::error(ErrorCode::BadRequest, format!("{snapshot:?} is not a snapship snapshot name")));
            };
            let from = resume.as_ref().map_or(0, |r| r.offset);
            let incoming = Incoming { name, identity, base: base.clone(), from_token };
            let attached = sessions.begin(peer, &fileset, incoming, compact, resume, snapshot::replica_for(policy, replica)?).await?;
            write_message(send, &Message::Ready).await?;
            tracing::info!(%peer, %fileset, %snapshot, base = base.as_deref().unwrap_or("none (full)"), from, "receiving");
            let data = IncomingData::new(frames, compression, sessions.stall_timeout());
            sessions.feed(attached, data, send).await?;
            tracing::info!(%peer, %fileset, %snapshot, "received and committed");
            let side = snapshot::replica_for(policy, replica)?;
            // Prune this replica by its own policy (its newest snapshot, the next base, is
            // always kept) once the origin has its answer: pruning must not delay it.
            let (policy, status, peer, fileset2) = (policy.clone(), status.clone(), peer.to_string(), fileset.clone());
            tokio::spawn(async move {
                crate::schedule::prune::prune_replica_after_receive(&policy, side.as_ref()).await;
                if let Ok(held) = side.list().await {
                    status.received(&fileset2, &peer, held.last().map(|s| &s.name), held.len());
                }
            });
            Ok(Message::Committed { snapshot })
        }
        other => Ok(Message::error(ErrorCode::BadRequest, format!("expected list or begin, got {other:?}"))),
    }
}
