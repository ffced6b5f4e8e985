//! The in-process transport: a replica on the origin's own node is spoken to through pipes
//! in this process, with the same protocol as a remote one, so that it gets the same replica
//! service (sessions, spool, begin lock, watchdogs) and the same checks (framing checksums,
//! the whole stream's BLAKE3).
//!
//! [`LocalLink::pair`] makes both ends: a [`Dialer`] for the origin's endpoints and a stream
//! source that [`serve`] hands to the replica role's [`Handler`]. Each request stream is a
//! pair of bounded in-memory pipes (`tokio::io::duplex`): a full pipe pushes back on the
//! writer, so memory stays bounded whatever the stream size.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Dialer, Handler, RequestStream};

/// Bytes each direction of an in-process request stream buffers.
const PIPE: usize = 4 << 20;

/// The origin's end: opens request streams to the replica role of this process.
#[derive(Clone)]
pub struct LocalLink {
    /// The node name the replica sees as the peer: this node.
    node: String,
    streams: mpsc::Sender<(String, RequestStream)>,
}

/// The replica's end: the request streams opened through the link.
pub struct LocalStreams(mpsc::Receiver<(String, RequestStream)>);

impl LocalLink {
    /// A link whose streams come from `node` (this node: origin and replica are one process).
    pub fn pair(node: &str) -> (LocalLink, LocalStreams) {
        let (tx, rx) = mpsc::channel(16);
        (LocalLink { node: node.to_string(), streams: tx }, LocalStreams(rx))
    }
}

#[async_trait]
impl Dialer for LocalLink {
    async fn open(&self) -> Result<RequestStream> {
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let (our_recv, our_send) = tokio::io::split(ours);
        let (their_recv, their_send) = tokio::io::split(theirs);
        let theirs = RequestStream { recv: Box::new(their_recv), send: Box::new(their_send) };
        self.streams.send((self.node.clone(), theirs)).await.map_err(|_| anyhow!("the replica service of this node is not running"))?;
        Ok(RequestStream { recv: Box::new(our_recv), send: Box::new(our_send) })
    }
}

/// Hands each stream opened through the link to `handler`, until `shutdown` or until every
/// [`LocalLink`] is gone; waits for the streams being served.
pub async fn serve(mut streams: LocalStreams, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = streams.0.recv() => match next {
                Some((peer, stream)) => {
                    let handler = handler.clone();
                    tasks.spawn(async move { handler.handle(peer, stream).await });
                }
                None => break,
            },
        }
    }
    tasks.close();
    tasks.wait().await;
}
