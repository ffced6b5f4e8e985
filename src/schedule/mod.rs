//! When to snapshot, ship and prune.
//!
//! - `cron`, `clock`, `triggers`: when an origin takes a snapshot (cron schedule, data
//!   changes), against an injectable clock.
//! - `retention`: which snapshots to keep, and why (pure planning).
//! - `prune`: carrying out a plan on one side.
//! - `origin`: the per-file-set loop on the origin: snapshot on triggers, one worker per
//!   replica that ships the newest snapshot with retries, and pruning that protects bases.

pub mod clock;
pub mod cron;
pub mod origin;
pub mod prune;
pub mod retention;
pub mod triggers;
