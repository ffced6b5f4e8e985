//! Deciding when: nothing here moves data or deletes anything.
//!
//! - `clock`, `triggers`: when an origin takes a snapshot (cron firings, data changes),
//!   against an injectable clock.
//! - `retention`: which snapshots to keep, and why (pure planning; the roles carry plans out
//!   with their own protections).

pub mod clock;
pub mod retention;
pub mod triggers;
