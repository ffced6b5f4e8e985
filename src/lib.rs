//! snapship: live replicas of btrfs subvolumes and ZFS datasets, shipped as snapshot send
//! streams. See ARCHITECTURE.md for how the modules fit together.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod logging;
pub mod progress;
pub mod replicate;
pub mod schedule;
pub mod ship;
pub mod snapshot;
pub mod state;
pub mod status;
