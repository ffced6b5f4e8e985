//! Moving send streams from an origin to its replicas.
//!
//! The replication logic talks to every replica through [`ReplicaEndpoint`]: list what you
//! hold, receive this stream. A replica on this very node is served by a local pipe
//! ([`local::LocalReplica`]); remote replicas go over QUIC ([`quic::RemoteReplica`] on the
//! origin, [`server`] on the replica), speaking [`protocol`] in [`frame`]s, with streams
//! shaped by [`transfer`] and peers authenticated by [`tls`].

pub mod frame;
pub mod local;
pub mod meter;
pub mod protocol;
pub mod quic;
pub mod server;
pub mod tls;
pub mod transfer;

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::snapshot::{Incoming, Snapshot};

/// One replica of one file set, as the origin reaches it.
#[async_trait]
pub trait ReplicaEndpoint: Send + Sync {
    /// The replica's node name, for logs and reports.
    fn node(&self) -> &str;
    /// The complete snapshots the replica holds, with their identities.
    async fn list(&self) -> Result<Vec<Snapshot>>;
    /// Whether the replica receives the backend's compact stream format; known after `list`.
    async fn accepts_compact(&self) -> bool;
    /// Closes any connection to the replica, telling it at once that transfers in flight are
    /// abandoned (so it drops the partial receive and frees the replica for the next one).
    async fn close(&self) {}
    /// Ships `stream` to the replica, which receives it; `Ok` once the replica has the
    /// snapshot complete, checked and visible.
    async fn receive(&self, incoming: &Incoming, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()>;
}
