//! When to snapshot, ship and prune. So far: cron expressions as policies write them.

pub mod cron;
