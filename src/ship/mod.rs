//! Moving send streams between nodes. It knows streams, not retention or scheduling.
//!
//! The replication logic talks to every replica through [`ReplicaEndpoint`]: what do you
//! hold ([`Listing`]), receive this stream. One implementation, [`client::PeerReplica`],
//! speaks [`protocol`] in [`frame`]s over request streams that a [`Dialer`] opens: over QUIC
//! to another node ([`quic`], peers authenticated by [`tls`]), or through this very process
//! to a replica on the origin's own node ([`local`]). The replica's side of the same
//! conversation is the replica role (`crate::replica`), which gets its request streams from
//! [`quic::Listener`] or [`local::LocalLink`]. [`transfer`] shapes the stream (framing,
//! zstd, BLAKE3 over the whole stream, pacing), [`meter`] counts it.

pub mod client;
pub mod frame;
pub mod lan;
pub mod local;
pub mod meter;
pub mod protocol;
pub mod quic;
pub mod tls;
pub mod transfer;

use anyhow::Result;
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::snapshot::tree::Entry;
use crate::snapshot::{Incoming, Snapshot};
pub use protocol::Partial;

/// What a replica holds of a file set, as one answer: the complete snapshots (with their
/// identities), whether it takes the backend's compact stream format, and the cut transfer
/// it can resume, if any.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub snapshots: Vec<Snapshot>,
    pub accepts_compact: bool,
    pub resumable: Option<Partial>,
    /// A relay's report of the replicas it feeds (cascades), unchecked: for status only.
    pub downstream: Vec<protocol::Hop>,
    /// Bytes free where the replica receives the file set, if it says.
    pub free: Option<u64>,
}

/// What another member holds of a file set (its answer to `holds`), and the newest epoch it
/// knows.
#[derive(Debug, Clone)]
pub struct Holdings {
    pub snapshots: Vec<Snapshot>,
    pub epoch: crate::store::Epoch,
}

/// A snapshot another member shipped to this node at its request (`fetch`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fetched {
    pub snapshot: String,
    /// The base the stream was incremental from; `None` for a full stream.
    pub base: Option<String>,
    /// Stream bytes shipped (0: this node held it already).
    pub bytes: u64,
}

/// Where a stream starts.
pub enum Start {
    /// From its first byte.
    Fresh,
    /// After a prefix the replica already holds (checked by hash).
    Resume(Resumed),
    /// A new stream that continues the replica's ZFS resume token (`zfs send -t`).
    FromToken,
}

/// The replica holds the first `offset` bytes of the stream, which hash into `hasher`.
pub struct Resumed {
    pub offset: u64,
    pub hasher: blake3::Hasher,
}

/// How a stream is to be sent: its format and where it starts.
pub struct StreamStart {
    /// The stream is in the backend's compact format.
    pub compact: bool,
    pub start: Start,
}

impl StreamStart {
    /// The stream offset the data starts at (not 0 only when resumed).
    pub fn offset(&self) -> u64 {
        match &self.start {
            Start::Resume(r) => r.offset,
            Start::Fresh | Start::FromToken => 0,
        }
    }
}

/// One replica of one file set, as the origin reaches it.
#[async_trait]
pub trait ReplicaEndpoint: Send + Sync {
    /// The replica's node name, for logs and reports.
    fn node(&self) -> &str;
    /// What the replica holds.
    async fn list(&self) -> Result<Listing>;
    /// Closes any connection to the replica, telling it at once that transfers in flight are
    /// cut (it keeps what it received, for a resume).
    async fn close(&self) {}
    /// Ships `stream` to the replica, which receives it; `Ok` once the replica has the
    /// snapshot complete, checked and visible. `start` says whether `stream` goes on from
    /// where a partial transfer stopped (only when the listing offered it).
    async fn receive(&self, incoming: &Incoming, start: StreamStart, stream: &mut (dyn AsyncRead + Send + Unpin)) -> Result<()>;
    /// A planned switchover: asks the replica, which holds `snapshot` as its newest, to take
    /// over as origin; the new epoch once it has.
    async fn hand_over(&self, _snapshot: &crate::snapshot::SnapshotName) -> Result<crate::store::Epoch> {
        anyhow::bail!("replica `{}` cannot take over", self.node())
    }
    /// What the member holds of the file set (`holds`, which any member may ask).
    async fn holds(&self) -> Result<Holdings> {
        anyhow::bail!("member `{}` cannot be asked what it holds this way", self.node())
    }
    /// Asks the member to ship `snapshot`, which it holds, to this node (`fetch`); `Ok` once
    /// this node received it. This node must be awaiting it (a grant of its replica service).
    async fn fetch(&self, _snapshot: &crate::snapshot::SnapshotName) -> Result<Fetched> {
        anyhow::bail!("member `{}` cannot be asked for a snapshot this way", self.node())
    }
    /// The replica's hash tree of `snapshot` (`snapship verify`), to descend into where it
    /// differs from the origin's; `full`: the replica rehashes every file.
    async fn verify(&self, _snapshot: &crate::snapshot::SnapshotName, _full: bool) -> Result<Box<dyn TreeSource>> {
        anyhow::bail!("replica `{}` cannot be verified this way", self.node())
    }
}

/// A snapshot's hash tree held elsewhere (a replica over the protocol) or here, read one
/// directory at a time.
#[async_trait]
pub trait TreeSource: Send {
    /// The root: its metadata and the hash over everything below it.
    fn root(&self) -> &Entry;
    /// The entries of the directory at `path` (a tree path, `""` for the root), sorted by name.
    async fn dir(&mut self, path: &str) -> Result<Vec<Entry>>;
    /// Says the comparison is over.
    async fn done(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A tree computed on this node, as a [`TreeSource`] (a replica on the origin's own node).
pub struct LocalTree(pub crate::snapshot::tree::Tree);

#[async_trait]
impl TreeSource for LocalTree {
    fn root(&self) -> &Entry {
        &self.0.root
    }

    async fn dir(&mut self, path: &str) -> Result<Vec<Entry>> {
        self.0.dir(path).map(<[Entry]>::to_vec).ok_or_else(|| anyhow::anyhow!("{path:?} is not a directory of the tree"))
    }
}

/// One request stream: the replies (or requests, on the replica) come in on `recv`, and
/// `send` goes out. Both directions close independently: shutting `send` down is the end of
/// what this side says.
pub struct RequestStream {
    pub recv: Box<dyn AsyncRead + Send + Unpin>,
    pub send: Box<dyn AsyncWrite + Send + Unpin>,
}

/// Opens request streams to one peer: a QUIC stream on a (cached) connection, or an
/// in-process pipe.
#[async_trait]
pub trait Dialer: Send + Sync {
    /// A new request stream, connecting first if needed.
    async fn open(&self) -> Result<RequestStream>;
    /// Drops the connection (the peer sees transfers in flight cut at once); the next
    /// [`open`](Self::open) connects again.
    async fn reset(&self) {}
    /// Whether `e`, met on a stream this dialer opened, says the connection under it is gone
    /// (so the request is worth one more try on a fresh connection), not an answer.
    fn lost(&self, _e: &anyhow::Error) -> bool {
        false
    }
    /// Adds what to check to an error met on this transport (QUIC: a refused certificate
    /// surfaces at the first read, as `HANDSHAKE_FAILURE`).
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        e
    }
    /// Where this node allows the LAN path with the peer (`encryption: off` under `peers`):
    /// the peer's `HOST:PORT`, whose port its LAN listener has on TCP ([`lan::LanDialer`]).
    fn lan_address(&self) -> Option<&str> {
        None
    }
}

/// Serves request streams as they arrive, on the replica: the replica role implements it,
/// the transports ([`quic::serve`], [`local::serve`]) call it with the peer's verified node
/// name and the stream.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, peer: String, stream: RequestStream);
}
