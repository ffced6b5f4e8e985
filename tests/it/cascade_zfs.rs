//! Replica history across outages and cascades (A → B → C) on real zfs-fuse pools, with
//! `snapship run` daemons over QUIC (the btrfs scenarios of `cascade.rs`).
//!
//! - history: beta is away while alpha takes several scheduled snapshots (hybrid, a cron
//!   every few seconds); back, it gets every one it missed in the one `zfs send -I` stream
//!   to alpha's newest (ZFS receives nothing older than a replica's newest snapshot, so the
//!   newest cannot come first), each with alpha's guid; the bytes shipped are measured
//!   against the sum of the incrementals and against one `zfs send -i` over the outage;
//! - cascade: alpha feeds beta only; beta relays to gamma and delta (`from: beta`) from its
//!   replica dataset, whose snapshots keep alpha's guids; alpha's link carries each snapshot
//!   once; beta away, gamma waits and catches up (with the snapshot it missed); gamma away,
//!   beta's pruning keeps gamma's base, and gamma catches up incrementally from it;
//! - a hostile origin's package: a `zfs send -I` stream that brings a snapshot not named as
//!   snapship names them, or one newer than announced, is undone on the replica.
//!
//! The ZFS tests run one at a time (`zfs::one_at_a_time`); the daemons stop before the pools
//! go, and the pools go with the test, on failure too.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cascade::{delivered, field};
use crate::common::cluster::*;
use crate::common::*;
use crate::zfs::{fill_small, one_at_a_time};

/// `(name, guid)` of the snapship snapshots of `dataset`, oldest first.
fn guids(pool: &ZfsPool, dataset: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pool.snapshot_props(dataset, "guid").into_iter().filter(|(n, _)| n.starts_with("snapship-")).collect();
    out.sort();
    out
}

fn names(list: &[(String, String)]) -> Vec<String> {
    list.iter().map(|(n, _)| n.clone()).collect()
}

/// The size of `zfs send -i` (one incremental) of `dataset` from `base` to `snapshot`.
fn incremental_size(dataset: &str, base: &str, snapshot: &str) -> u64 {
    sh(&format!("zfs send -i {dataset}@{base} {dataset}@{snapshot} | wc -c")).trim().parse().unwrap()
}

/// One pool per node (own scratch, so that the cluster's daemons stop before they go).
struct Pools {
    pools: BTreeMap<&'static str, ZfsPool>,
    _scratch: Scratch,
}

impl Pools {
    fn new(test: &str, nodes: &[&'static str]) -> Pools {
        let scratch = Scratch::new(test);
        let pools = nodes.iter().map(|n| (*n, ZfsPool::new(&scratch, n, 128))).collect();
        Pools { pools, _scratch: scratch }
    }

    /// The replica dataset of `node` (`POOL/backup/projects`), or the origin's (`POOL/projects`).
    fn dataset(&self, node: &str) -> String {
        if node == "alpha" { format!("{}/projects", self.pools[node].name) } else { format!("{}/backup/projects", self.pools[node].name) }
    }

    fn mount(&self, node: &str) -> std::path::PathBuf {
        self.pools[node].mountpoint(if node == "alpha" { "projects" } else { "backup/projects" })
    }

    fn held(&self, node: &str) -> Vec<(String, String)> {
        guids(&self.pools[node], &self.dataset(node))
    }

    /// Every snapshot `node` holds is alpha's of that name, guid and all.
    fn assert_alphas(&self, node: &str) {
        let alpha = self.held("alpha");
        let held = self.held(node);
        assert!(!held.is_empty(), "{node} holds nothing");
        for s in &held {
            assert!(alpha.contains(s), "{node}'s {} (guid {}) is not alpha's: alpha has {alpha:?}", s.0, s.1);
        }
    }

    /// `node` holds alpha's newest snapshot.
    fn current(&self, node: &str) -> bool {
        let newest = self.held("alpha").pop();
        newest.is_some() && self.held(node).contains(newest.as_ref().unwrap())
    }
}

#[test]
fn zfs_replica_back_from_an_outage_gets_the_missed_snapshots() {
    if !have_zfs("zfs_replica_back_from_an_outage_gets_the_missed_snapshots") {
        return;
    }
    let _serial = one_at_a_time();
    let p = Pools::new("zfs_backfill_pools", &["alpha", "beta"]);
    let mut c = Cluster::with_size("zfs_backfill", &["alpha", "beta"], 160);
    p.pools["alpha"].dataset("projects");
    let (src_ds, dst_ds) = (p.dataset("alpha"), p.dataset("beta"));
    let policy = format!(
        "fileset: projects\nbackend: zfs\nmode: hybrid\nschedule: \"*/3 * * * * *\"\ncontinuous:\n  min_interval: 1s\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {dst_ds}\nretention:\n  replica: {{ within: 1h }}\n"
    );
    for n in ["alpha", "beta"] {
        c.configure(n, &[("projects", policy.clone())]);
    }
    let src = p.mount("alpha");
    fill_small(&src, 81);
    c.start("beta");
    c.start("alpha");
    wait_for(Duration::from_secs(90), "a first snapshot on beta", || !p.held("beta").is_empty());

    // beta is away over at least 6 scheduled snapshots, each with new data.
    c.stop("beta");
    let before = names(&p.held("alpha"));
    let scheduled_since = |list: &[String]| list.iter().filter(|n| !before.contains(n) && !n.ends_with("-c")).count();
    let mut i = 0;
    wait_for(Duration::from_secs(120), "6 scheduled snapshots while beta is away", || {
        write_random(&src.join(format!("outage-{i}.bin")), 256 << 10, 100 + i);
        i += 1;
        std::thread::sleep(Duration::from_millis(700));
        scheduled_since(&names(&p.held("alpha"))) >= 6
    });
    let missed: Vec<(String, String)> = p.held("alpha").into_iter().filter(|(n, _)| !before.contains(n)).collect();
    let held_before = p.held("beta");
    eprintln!("missed while away: {} snapshots ({} scheduled)", missed.len(), scheduled_since(&names(&missed)));

    // Back: everything it missed, in the stream to the newest.
    c.start("beta");
    wait_for(Duration::from_secs(120), "every missed snapshot on beta", || {
        let held = p.held("beta");
        missed.iter().all(|m| held.contains(m))
    });
    p.assert_alphas("beta");
    let beta_log = wait_until(Duration::from_secs(30), "beta's log of the snapshots in between", || {
        let log = c.daemons["beta"].log_text();
        log.contains("received the snapshots in between too").then_some(log)
    });
    let received: Vec<&str> = beta_log.lines().filter(|l| l.contains("received and committed")).filter_map(|l| field(l, "snapshot")).collect();
    eprintln!("beta committed (one line per stream): {received:?}");

    // Writes stop; a scheduled snapshot after the last one, and beta has it: same data.
    let last_write = names(&p.held("alpha")).pop().unwrap();
    wait_for(Duration::from_secs(30), "a snapshot after the last write", || names(&p.held("alpha")).pop().unwrap() > last_write);
    let newest = p.held("alpha").pop().unwrap();
    wait_for(Duration::from_secs(60), "alpha's newest on beta", || p.held("beta").contains(&newest));
    c.stop("alpha");
    wait_for(Duration::from_secs(60), "alpha's newest on beta", || p.current("beta"));
    assert_same_tree(&src, &p.mount("beta"));

    // Bytes: the streams to beta since it came back, against a replay of each incremental
    // and against one `zfs send -i` from the last common snapshot (what "newest first" would
    // ship before any history).
    let alpha_log = std::fs::read_to_string(c.scratch.dir.join("alpha-run.log")).unwrap();
    let alpha_names = names(&p.held("alpha"));
    let last_before = held_before.iter().rev().map(|(n, _)| n).find(|n| alpha_names.contains(n)).cloned().expect("a snapshot both held before the outage");
    let beta_names = names(&p.held("beta"));
    let span: Vec<&String> = alpha_names.iter().filter(|n| **n >= last_before && beta_names.contains(n)).collect();
    let replay: u64 = span.windows(2).map(|w| incremental_size(&src_ds, w[0], w[1])).sum();
    let one = incremental_size(&src_ds, &last_before, span.last().unwrap());
    let streams: Vec<(String, u64)> = delivered(&alpha_log, "beta", "replica up to date").into_iter().filter(|(s, _)| *s > last_before).collect();
    let sent: u64 = streams.iter().map(|(_, b)| b).sum();
    eprintln!(
        "zfs backfill: {} snapshots after {last_before} in {} stream(s); shipped {sent} bytes, a replay of each incremental {replay} bytes, one zfs send -i over the span {one} bytes",
        span.len() - 1,
        streams.len()
    );
    assert!(streams.len() < span.len() - 1, "one stream per missed snapshot: {streams:?}");
    assert!(sent <= replay + replay / 4 + (64 << 10), "shipped {sent} bytes, more than a replay ({replay})");
    c.stop("beta");
}

/// The four-node cascade on ZFS: alpha feeds beta, beta feeds gamma and delta.
fn cascade_policy(p: &Pools) -> String {
    format!(
        "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\nreplicas:\n  - node: beta\n    path: {}\n  - node: gamma\n    path: {}\n    from: beta\n  - node: delta\n    path: {}\n    from: beta\nretention:\n  replica: {{ last: 2 }}\n",
        p.dataset("alpha"),
        p.dataset("beta"),
        p.dataset("gamma"),
        p.dataset("delta")
    )
}

#[test]
fn zfs_relay_forwards_alphas_snapshots_to_two_downstreams() {
    if !have_zfs("zfs_relay_forwards_alphas_snapshots_to_two_downstreams") {
        return;
    }
    let _serial = one_at_a_time();
    let nodes = ["alpha", "beta", "gamma", "delta"];
    let p = Pools::new("zfs_cascade_pools", &nodes);
    let mut c = Cluster::with_size("zfs_cascade", &nodes, 160);
    p.pools["alpha"].dataset("projects");
    let policy = cascade_policy(&p);
    for n in nodes {
        c.configure(n, &[("projects", policy.clone())]);
    }
    let src = p.mount("alpha");
    fill_small(&src, 91);
    for n in ["beta", "gamma", "delta", "alpha"] {
        c.start(n);
    }
    let mut syncs = 0;
    for round in 0..3 {
        write_random(&src.join(format!("round-{round}.bin")), 1 << 20, 200 + round);
        c.sync_ok("alpha", "projects");
        syncs += 1;
        for n in ["beta", "gamma", "delta"] {
            wait_for(Duration::from_secs(60), &format!("alpha's newest on {n}"), || p.current(n));
        }
    }
    for n in ["beta", "gamma", "delta"] {
        p.assert_alphas(n);
        assert_same_tree(&src, &p.mount(n));
    }
    // alpha's link carried each snapshot once, to beta alone.
    let to_beta = wait_until(Duration::from_secs(30), "alpha's log of every transfer to beta", || {
        let shown: Vec<(String, u64)> = delivered(&c.daemons["alpha"].log_text(), "beta", "replica up to date").into_iter().filter(|(_, b)| *b > 0).collect();
        (shown.len() >= syncs).then_some(shown)
    });
    assert_eq!(to_beta.len(), syncs, "one stream per snapshot to beta: {to_beta:?}");
    let alpha_log = c.daemons["alpha"].log_text();
    assert!(delivered(&alpha_log, "gamma", "replica up to date").is_empty() && delivered(&alpha_log, "delta", "replica up to date").is_empty());
    let beta_log = c.daemons["beta"].log_text();
    let relayed: u64 = ["gamma", "delta"].iter().flat_map(|n| delivered(&beta_log, n, "relayed")).map(|(_, b)| b).sum();
    let shipped: u64 = to_beta.iter().map(|(_, b)| b).sum();
    eprintln!("zfs cascade: alpha shipped {shipped} bytes (to beta only); beta relayed {relayed} bytes to gamma and delta");
    let status = c.status_json("beta");
    let relay = &status["relay_of"][0];
    assert_eq!(relay["fed_by"].as_str(), Some("alpha"), "{status}");
    let downstreams: Vec<&str> = relay["replicas"].as_array().unwrap().iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(downstreams, ["delta", "gamma"], "{status}");

    // beta away: gamma waits, and catches up once beta is back, with what it missed.
    c.stop("beta");
    let gamma_had = p.held("gamma");
    write_random(&src.join("while-beta-is-away.bin"), 512 << 10, 300);
    let _ = c.sync("alpha", "projects"); // fails for beta: it is away
    let while_away = p.held("alpha").pop().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.held("gamma"), gamma_had, "gamma got something while its relay was away");
    c.start("beta");
    write_random(&src.join("after-beta-is-back.bin"), 512 << 10, 301);
    c.sync_ok("alpha", "projects");
    for n in ["beta", "gamma", "delta"] {
        wait_for(Duration::from_secs(90), &format!("alpha's newest on {n} after beta's return"), || p.current(n));
    }
    assert!(p.held("gamma").contains(&while_away), "gamma lacks {} (taken while beta was away): {:?}", while_away.0, p.held("gamma"));
    p.assert_alphas("gamma");
    assert_same_tree(&src, &p.mount("gamma"));

    // gamma away: beta keeps (last: 2) what gamma has as base, whatever its retention says.
    // (Stopped once beta heard gamma commit: a transfer cut in its commit phase leaves its
    // base protected on beta, as it should, until gamma answers again.)
    let gamma_base = names(&p.held("gamma")).pop().unwrap();
    wait_for(Duration::from_secs(30), "beta's log of gamma's newest", || {
        delivered(&c.daemons["beta"].log_text(), "gamma", "relayed").iter().any(|(s, _)| *s == gamma_base)
    });
    c.stop("gamma");
    for round in 0..3 {
        write_random(&src.join(format!("while-gamma-is-away-{round}.bin")), 256 << 10, 400 + round);
        c.sync_ok("alpha", "projects");
        wait_for(Duration::from_secs(60), "alpha's newest on delta", || p.current("delta"));
    }
    let pruned = (0..60).any(|_| {
        std::thread::sleep(Duration::from_secs(1));
        p.current("beta") && p.held("beta").len() <= 3
    });
    if !pruned {
        let log = c.daemons["beta"].log_text();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("prun")).collect();
        let guard = std::fs::read_to_string(c.dir("beta").join("state/relay/projects.json")).unwrap_or_default();
        panic!("beta was not pruned to its last 2 and gamma's base {gamma_base}: {:?}\n{}\nrelay guard: {guard}", names(&p.held("beta")), lines.join("\n"));
    }
    assert!(names(&p.held("beta")).contains(&gamma_base), "beta pruned gamma's base {gamma_base}: {:?}", p.held("beta"));
    c.start("gamma");
    wait_for(Duration::from_secs(90), "alpha's newest on gamma after its return", || p.current("gamma"));
    let back = wait_until(Duration::from_secs(30), "beta's log of the transfer to gamma", || {
        let log = c.daemons["beta"].log_text();
        let relayed = log.lines().filter(|l| l.contains("relayed") && field(l, "replica") == Some("gamma"));
        relayed.filter(|l| field(l, "snapshot").is_some_and(|s| *s > *gamma_base)).find_map(|l| field(l, "base").map(String::from))
    });
    assert_eq!(back, gamma_base, "gamma's catch-up was not incremental from its base");
    p.assert_alphas("gamma");
    assert_same_tree(&src, &p.mount("gamma"));
    // Once gamma moved on, beta's next prune (after its next receive) lets the old base go.
    c.sync_ok("alpha", "projects");
    wait_for(Duration::from_secs(60), "beta pruned gamma's old base once it moved on", || !names(&p.held("beta")).contains(&gamma_base));
    for n in ["alpha", "beta", "gamma", "delta"] {
        c.stop(n);
    }
}

/// A hostile origin's `zfs send -I` package, received straight into a replica dataset: a
/// snapshot in between that snapship did not name, or one named after the announced
/// snapshot, is refused and the receive undone; a faithful package passes.
#[test]
fn zfs_package_with_foreign_snapshots_is_undone() {
    if !have_zfs("zfs_package_with_foreign_snapshots_is_undone") {
        return;
    }
    let _serial = one_at_a_time();
    use snapship::snapshot::{Incoming, ReplicaSide, SnapshotName, zfs::ZfsReplica};
    let scratch = Scratch::new("zfs_hostile_package");
    let (origin, replica) = (ZfsPool::new(&scratch, "o", 128), ZfsPool::new(&scratch, "r", 128));
    let src = origin.dataset("projects");
    let dst = format!("{}/backup/projects", replica.name);
    let side = ZfsReplica::new(dst.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let guid = |n: &str| origin.snapshot_props(&src, "guid").into_iter().find(|(s, _)| s == n).unwrap().1;
    let snap = |n: &str, data: &str| {
        std::fs::write(origin.mountpoint("projects").join(n), data).unwrap();
        run(std::process::Command::new("zfs").arg("snapshot").arg(format!("{src}@{n}")));
    };
    let receive = |name: &str, base: Option<&str>| {
        let mut cmd = std::process::Command::new("zfs");
        cmd.arg("send");
        if let Some(b) = base {
            cmd.arg("-I").arg(format!("{src}@{b}"));
        }
        let stream = run(cmd.arg(format!("{src}@{name}"))).stdout;
        let incoming = Incoming { name: SnapshotName::parse(name).unwrap(), identity: guid(name), base: base.map(guid), from_token: false, fetched: false };
        rt.block_on(side.receive(&incoming, &mut &stream[..]))
    };
    let held = || replica.snapshot_props(&dst, "guid").into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let s = ["snapship-20260101T000000.000Z", "snapship-20260101T010000.000Z", "snapship-20260101T020000.000Z", "snapship-20260101T030000.000Z"];
    fill_small(&origin.mountpoint("projects"), 31);
    snap(s[0], "0");
    receive(s[0], None).unwrap();
    // A snapshot between that snapship did not name.
    snap("planted", "p");
    snap(s[1], "1");
    let e = format!("{:#}", receive(s[1], Some(s[0])).unwrap_err());
    assert!(e.contains("`planted` is not a snapship snapshot name") && e.contains("undone"), "{e}");
    assert_eq!(held(), [s[0]], "the refused package left something behind");
    // A snapship name after the one announced, created before it.
    run(std::process::Command::new("zfs").arg("destroy").arg(format!("{src}@planted")));
    snap("snapship-20991231T000000.000Z", "f");
    snap(s[2], "2");
    let e = format!("{:#}", receive(s[2], Some(s[0])).unwrap_err());
    assert!(e.contains("is not between the base"), "{e}");
    assert_eq!(held(), [s[0]]);
    // What snapship's origin sends: the snapshots in between, each with the origin's guid.
    run(std::process::Command::new("zfs").arg("destroy").arg(format!("{src}@snapship-20991231T000000.000Z")));
    snap(s[3], "3");
    let got = receive(s[3], Some(s[0])).unwrap();
    assert_eq!(got.name.as_str(), s[3]);
    let mut all = held();
    all.sort();
    assert_eq!(all, s, "a faithful package brings every snapshot in between");
    for n in s {
        let r = replica.snapshot_props(&dst, "guid").into_iter().find(|(x, _)| x == n).unwrap().1;
        assert_eq!(r, guid(n), "{n}'s guid");
    }
}
