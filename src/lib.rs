//! snapship: live replicas of btrfs subvolumes and ZFS datasets, shipped as snapshot send
//! streams. See ARCHITECTURE.md for how the modules fit together and who may call whom.
//!
//! Layers, lowest first: `config` (what the admin wrote, validated); `snapshot` (the
//! backends); `store` (state files, and the epochs that say who is origin); `schedule` (deciding when, pure); `ship` (moving streams between nodes);
//! `observe` (status, metrics, progress, logs); `replicate` (the one replication logic);
//! `restore` (getting data back out of the snapshots a node holds);
//! the roles, `replica` and `origin`; `node` (wiring the roles for `run` and one-shot
//! commands); `cli`. A module may use those below it, never those above.

pub mod cli;
pub mod config;
pub mod node;
pub mod objstore;
pub mod observe;
pub mod origin;
pub mod replica;
pub mod replicate;
pub mod restore;
#[cfg(test)]
mod role_tests;
pub mod schedule;
pub mod ship;
pub mod snapshot;
pub mod store;
