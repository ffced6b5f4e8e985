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
pub mod session;
pub mod spool;
pub mod tls;
pub mod transfer;

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::snapshot::{Incoming, Snapshot};
pub use protocol::Partial;

/// Where a stream starts: from zero, or after a prefix the replica already holds.
pub struct StreamStart {
    /// The stream is in the backend's compact format.
    pub compact: bool,
    pub resumed: Option<Resumed>,
    /// The stream resumes the replica's ZFS resume token (`zfs send -t`).
    pub from_token: bool,
}

/// The replica holds the first `offset` bytes of the stream, which hash into `hasher`.
pub struct Resumed {
    pub offset: u64,
    pub hasher: blake3::Hasher,
}

impl StreamStart {
    pub fn offset(&self) -> u64 {
        self.resumed.as_ref().map_or(0, |r| r.offset)
    }
}

/// One replica of one file set, as the origin reaches it.
#[async_trait]
pub trait ReplicaEndpoint: Send + Sync {
    /// The replica's node name, for logs and reports.
    fn node(&self) -> &str;
    /// The complete snapshots the replica holds, with their identities.
    async fn list(&self) -> Result<Vec<Snapshot>>;
    /// Whether the replica receives the backend's compact stream format; known after `list`.
    async fn accepts_compact(&self) -> bool;
    /// A cut transfer the replica holds and can resume; known after `list`.
    async fn partial(&self) -> Option<Partial> {
        None
    }
    /// Closes any connection to the replica, telling it at once that transfers in flight are
    /// cut (it keeps what it received, for a resume).
    async fn close(&self) {}
    /// Ships `stream` to the replica, which receives it; `Ok` once the replica has the
    /// snapshot complete, checked and visible. `start` says whether `stream` goes on from
    /// where a partial transfer stopped (only when [`partial`](Self::partial) offered it).
    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()>;
}
