//! The origin role: what a node does for the file sets it is origin of.
//!
//! - [`job`]: the daemon's loop per file set: a snapshot task (cron, data changes, sync
//!   requests) and one worker per replica that brings it up to the newest snapshot with
//!   retries; consistency groups share a [`job::GroupHub`].
//! - [`sync`]: `snapshot sync` without a daemon: one snapshot, every replica brought up to it.
//! - [`prune`]: the origin's retention, protecting every replica's base and transfers in
//!   flight; [`state`]: what the origin remembers per replica across runs (bases, in flight,
//!   last outcome); [`record`]: how a transfer's outcome is written down, for both callers.
//! - [`verify`]: `snapship verify`: a replica's copy of a snapshot against this origin's.
//!
//! Both `run` and `sync` drive [`crate::replicate::bring_up_to_date`], the one replication
//! logic, and only see replicas through [`crate::ship::ReplicaEndpoint`].

pub mod failover;
pub mod job;
pub mod prune;
pub mod record;
pub mod state;
pub mod sync;
pub mod verify;
