//! The replica role: what a node does for the file sets it holds copies of.
//!
//! [`service::ReplicaService`] answers the origin's requests, whatever transport brought them
//! (QUIC from another node, or the in-process link from this one): it authorizes each request
//! against this node's own policy (the peer's name comes from its certificate, the target
//! path from our policy, never from a message), lists what is held, and receives streams
//! through [`session`]s, each a [`spool`] in front of the backend's receive, kept apart
//! from the connection so that a cut transfer can be resumed. After each receive it prunes
//! by the replica's retention ([`prune`]), serialised with the next receive of the file set.
//! [`fetch`]: a member gets a snapshot another member holds (promote, `restore --from`).

pub mod fetch;
pub mod prune;
pub mod relay;
pub mod service;
pub mod session;
pub mod spool;

pub use service::ReplicaService;
