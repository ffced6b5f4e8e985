//! Deciding when: nothing here moves data or deletes anything.
//!
//! - `clock`, `triggers`: when an origin takes a snapshot (cron firings, data changes),
//!   against an injectable clock.
//! - `retry`: when a failed transfer is tried again (backoff cut short by probes, the wait
//!   for room on a full replica).
//! - `admission`: how many transfers run at once (per peer on the origin, node-wide receives
//!   on the replica); the rest wait their turn.
//! - `retention`: which snapshots to keep, and why (pure planning; the roles carry plans out
//!   with their own protections).

pub mod admission;
pub mod clock;
pub mod retention;
pub mod retry;
pub mod triggers;
