//! Observation: what a node tells its admin.
//!
//! [`status`] is the daemon's status board (the roles report events to it; it answers
//! `snapship status` and keeps the Prometheus metrics, named in [`metrics`]); [`progress`]
//! draws `sync`'s progress bars or lines; [`logging`] sets up `tracing`. Nothing here acts
//! on a file set.

pub mod logging;
pub mod metrics;
pub mod progress;
pub mod status;
