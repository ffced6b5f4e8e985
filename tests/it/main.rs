//! The integration tests, as one binary with a module per area (one build, one link, and
//! fixtures shared in `common`). Most need root, loop devices and btrfs (`make test` runs
//! them under `scripts/with-scratch.sh`, which provides a scratch directory and a zfs-fuse
//! daemon and tears everything down); without root they say they skip.
//!
//! - `btrfs_local`, `zfs`: the backends and one-shot sync on one node;
//! - `quic`, `scheduler`, `operate`: nodes over QUIC, `snapship run`, status and metrics;
//! - `failover`, `failover_zfs`: promotion of a replica, fencing, failback without a full
//!   resend, switchover (loop btrfs; zfs-fuse pools, with verify from the promoted member);
//! - `fetch`, `fetch_zfs`: a member fetching another's snapshot (promote after a missed
//!   snapshot, `restore --from NODE`) (loop btrfs; zfs-fuse pools, with a hostile member's
//!   stream that does not fit);
//! - `cascade`, `cascade_zfs`: backfill of the history a replica missed, and relays
//!   (A → B → C) (loop btrfs; zfs-fuse pools, with a hostile origin's `send -I` package);
//! - `faults`, `proxy`: cuts, kills, full disks, lossy links, hostile peers, and the UDP
//!   fault proxy they go through;
//! - `heal`: connections that heal (a replica restarted between syncs, one dead in the
//!   commit phase) and the wait for room on a full replica instead of blind resends;
//! - `restore`: getting data back (restore at a time, one path, a ZFS clone) and `list`
//!   on every member;
//! - `verify`, `verify_zfs`: `snapship verify` of a faithful, a tampered and an unreachable
//!   replica (loop btrfs; zfs-fuse, through temporary clones);
//! - `cli_check`, `cli_certs`, `certs_expiry`, `examples`: the config checker, certificates
//!   (making, renewing, refusing expired ones in a handshake) and the shipped examples (no
//!   root);
//! - `objstore`: object-storage replicas against a real Garage store: uploads, restores,
//!   resume, tamper and plaintext checks;
//! - `layers`: the dependency rule between the modules of `src/` (no root);
//! - `install`, `service_unit`, `monitoring`: what `make install` ships (man pages,
//!   completions), the systemd unit's hardening score, the Prometheus rules and Grafana
//!   dashboard in examples/monitoring (no root).

#[macro_use]
mod common;

mod btrfs_local;
mod cascade;
mod cascade_zfs;
mod certs_expiry;
mod cli_certs;
mod cli_check;
mod examples;
mod failover;
mod failover_zfs;
mod faults;
mod fetch;
mod fetch_zfs;
mod heal;
mod install;
mod lan;
mod layers;
mod monitoring;
mod objstore;
mod operate;
mod proxy;
mod quic;
mod reload;
mod restore;
mod scheduler;
mod service_unit;
mod verify;
mod verify_zfs;
mod zfs;
