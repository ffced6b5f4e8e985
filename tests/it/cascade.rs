//! Replica history across outages (backfill) and cascades (A → B → C), on loop btrfs and
//! real QUIC between `snapship run` daemons.
//!
//! - backfill: beta is away while alpha takes several scheduled snapshots (hybrid, a cron
//!   every few seconds); back, it gets alpha's newest first, then every missed snapshot its
//!   retention keeps, each identical to alpha's and carrying alpha's identity; the bytes
//!   shipped are measured against the sum of the incrementals of a replay;
//! - cascade: alpha feeds beta only; beta relays to gamma and delta (`from: beta`), whose
//!   snapshots carry alpha's identities; alpha's link carries each snapshot once; beta away,
//!   gamma waits and catches up when beta is back; gamma away, beta's pruning keeps
//!   gamma's base, and gamma catches up incrementally from it;
//! - a hostile member: a node with a valid certificate that is not gamma's relay is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snapship::config::Transfer;
use snapship::ship::client::PeerReplica;
use snapship::ship::quic::{Connector, QuicDialer};
use snapship::ship::{ReplicaEndpoint, Start, StreamStart};
use snapship::snapshot::{Incoming, SnapshotName};
use snapship::store::Epoch;

use crate::common::cluster::*;
use crate::common::*;

/// Snapshot names in an origin's snapshot directory (or a replica's), oldest first.
fn names(dir: &Path) -> Vec<String> {
    snapshots(dir).into_iter().filter(|n| n.starts_with("snapship-")).collect()
}

/// `key=value` of a log line (`value` unquoted).
pub(crate) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).map(|v| v.trim_matches('"'))
}

/// (snapshot, bytes) of each transfer a daemon log shows delivered to `replica`, in order.
pub(crate) fn delivered(log: &str, replica: &str, what: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter(|l| l.contains(what) && field(l, "replica") == Some(replica))
        .filter_map(|l| Some((field(l, "snapshot")?.to_string(), field(l, "bytes")?.parse().ok()?)))
        .collect()
}

/// The size of `btrfs send -p parent snapshot` (an incremental stream) on the origin.
fn incremental_size(dir: &Path, parent: &str, snapshot: &str) -> u64 {
    let out = sh(&format!("btrfs send -q -p {} {} | wc -c", dir.join(parent).display(), dir.join(snapshot).display()));
    out.trim().parse().unwrap()
}

/// Waits until what `replica` holds stays the same for two seconds (its feeder's backfill
/// and its own pruning are done).
fn settle(replica: &Path) {
    let mut last = names(replica);
    wait_for(Duration::from_secs(60), &format!("{} to settle", replica.display()), || {
        std::thread::sleep(Duration::from_secs(2));
        let now = names(replica);
        std::mem::replace(&mut last, now.clone()) == now
    });
}

/// Every snapshot in `replica` is the origin's one of that name: its identity and content.
fn assert_copies_of(origin_dir: &Path, replica: &Path) {
    settle(replica);
    for name in names(replica) {
        let (mine, theirs) = (subvol(&origin_dir.join(&name)), subvol(&replica.join(&name)));
        assert_eq!(theirs.received.as_deref(), Some(mine.uuid.as_str()), "{name} in {} does not carry the origin's identity", replica.display());
        assert_same_tree(&origin_dir.join(&name), &replica.join(&name));
    }
}

#[test]
fn a_replica_back_from_an_outage_is_current_first_then_gets_its_history() {
    require_root!();
    let (mut c, src, dst) = Cluster::two_nodes("backfill", 400, |p| {
        p.replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: hybrid\nschedule: \"*/3 * * * * *\"\ncontinuous:\n  min_interval: 1s\n")
            + "retention:\n  replica: { within: 1h }\n"
    });
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    fill(&src, 41);
    c.start("alpha");
    wait_for(Duration::from_secs(60), "a first snapshot on beta", || !names(&dst).is_empty());

    // beta is away over at least 6 scheduled snapshots, each with new data.
    c.stop("beta");
    let before: Vec<String> = names(&alpha_dir);
    let scheduled_since = |list: &[String]| list.iter().filter(|n| !before.contains(n) && !n.ends_with("-c")).count();
    let mut i = 0;
    wait_for(Duration::from_secs(120), "6 scheduled snapshots while beta is away", || {
        write_random(&src.join(format!("outage-{i}.bin")), 1 << 20, 100 + i);
        i += 1;
        std::thread::sleep(Duration::from_millis(700));
        scheduled_since(&names(&alpha_dir)) >= 6
    });
    let missed: Vec<String> = names(&alpha_dir).into_iter().filter(|n| !before.contains(n)).collect();
    let held_before = names(&dst);
    eprintln!("missed while away: {} snapshots ({} scheduled)", missed.len(), scheduled_since(&missed));

    // Back: current first, then the history.
    c.start("beta");
    wait_for(Duration::from_secs(180), "every missed snapshot on beta", || {
        let held = names(&dst);
        missed.iter().all(|m| held.contains(m))
    });
    // (beta logs a receive a moment after it is visible.)
    let log = wait_until(Duration::from_secs(30), "beta's log of every missed snapshot", || {
        let log = c.daemons["beta"].log_text();
        missed.iter().all(|m| log.contains(&format!("received and committed peer=alpha fileset=projects snapshot={m}"))).then_some(log)
    });
    let received: Vec<&str> = log.lines().filter(|l| l.contains("received and committed")).filter_map(|l| field(l, "snapshot")).collect();
    let first = received.first().expect("beta received something");
    assert!(missed.iter().all(|m| m.as_str() <= *first), "the first snapshot received ({first}) is not newer than every missed one: {received:?}");
    // Then the missed ones (the first may be one of them, the newest when beta returned).
    let backfilled: Vec<&str> = received[1..].iter().copied().filter(|r| missed.iter().any(|m| m == r)).collect();
    assert!(backfilled.len() + 1 >= missed.len(), "not backfilled: {missed:?}, received {received:?}");
    let mut sorted = backfilled.clone();
    sorted.sort();
    assert_eq!(backfilled, sorted, "backfill goes oldest first");
    assert_copies_of(&alpha_dir, &dst);
    assert_same_tree(&alpha_dir.join(names(&dst).last().unwrap()), &dst.join("latest"));
    wait_until(Duration::from_secs(30), "the backfill queue to empty", || {
        let s = c.status_json("alpha");
        let r = &s["origin_of"][0]["replicas"][0];
        (r["backfill_pending"].as_u64() == Some(0) && r["backfill_bytes"].as_u64() > Some(0)).then_some(())
    });

    // Bytes: what went to beta since it came back, against a replay of each incremental
    // (alpha stopped first, so that nothing more arrives).
    c.stop("alpha");
    let alpha_log = std::fs::read_to_string(c.scratch.dir.join("alpha-run.log")).unwrap();
    let last_before = held_before.iter().rev().find(|h| names(&alpha_dir).contains(h)).cloned().expect("a snapshot both held before the outage");
    let span: Vec<String> = names(&alpha_dir).into_iter().filter(|n| *n >= last_before && names(&dst).contains(n)).collect();
    let replay: u64 = span.windows(2).map(|w| incremental_size(&alpha_dir, &w[0], &w[1])).sum();
    let sent: u64 = delivered(&alpha_log, "beta", "replica up to date").iter().filter(|(s, _)| *s > last_before && span.contains(s)).map(|(_, b)| b).sum();
    eprintln!("backfill: {} snapshots after {last_before}; shipped {sent} bytes, a replay of each incremental {replay} bytes", span.len() - 1);
    // Current first costs one stream over the outage on top of the replay: about twice.
    assert!(sent <= 3 * replay, "shipped {sent} bytes, more than three times a replay ({replay})");
    c.stop("beta");
}

/// The four-node cascade policy: alpha feeds beta, beta feeds gamma and delta.
fn cascade_policy(src: &Path, dst: &BTreeMapPaths) -> String {
    format!(
        "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\nreplicas:\n  - node: beta\n    path: {}\n  - node: gamma\n    path: {}\n    from: beta\n  - node: delta\n    path: {}\n    from: beta\nretention:\n  replica: {{ last: 2 }}\n",
        src.display(),
        dst["beta"].display(),
        dst["gamma"].display(),
        dst["delta"].display()
    )
}

type BTreeMapPaths = std::collections::BTreeMap<&'static str, PathBuf>;

/// Four nodes on loop btrfs of `size` MiB with [`cascade_policy`] configured on each (no
/// daemon started): the cluster, alpha's live subvolume, each replica's directory.
fn four_node_cascade(test: &str, size: u64) -> (Cluster, PathBuf, BTreeMapPaths) {
    let nodes = ["alpha", "beta", "gamma", "delta"];
    let c = Cluster::with_size(test, &nodes, size);
    let src = c.fs["alpha"].subvolume("projects");
    let dst: BTreeMapPaths = nodes[1..].iter().map(|n| (*n, c.mnt(n).join("backup/projects"))).collect();
    let policy = cascade_policy(&src, &dst);
    for n in nodes {
        c.configure(n, &[("projects", policy.clone())]);
    }
    (c, src, dst)
}

#[test]
fn a_relay_forwards_alphas_snapshots_to_two_downstreams() {
    require_root!();
    let (mut c, src, dst) = four_node_cascade("cascade", 300);
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    fill(&src, 51);
    for n in ["beta", "gamma", "delta", "alpha"] {
        c.start(n);
    }
    let current = |n: &str| names(&dst[n]).last().cloned() == names(&alpha_dir).last().cloned();
    let mut syncs = 0;
    for round in 0..3 {
        write_random(&src.join(format!("round-{round}.bin")), 2 << 20, 200 + round);
        c.sync_ok("alpha", "projects");
        syncs += 1;
        for n in ["beta", "gamma", "delta"] {
            wait_for(Duration::from_secs(60), &format!("alpha's newest on {n}"), || current(n));
        }
    }
    for n in ["beta", "gamma", "delta"] {
        assert_copies_of(&alpha_dir, &dst[n]);
        assert_same_tree(&src, &dst[n].join("latest"));
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
    eprintln!("cascade: alpha shipped {shipped} bytes (to beta only); beta relayed {relayed} bytes to gamma and delta");
    let status = c.status_json("alpha");
    let replicas: Vec<&str> = status["origin_of"][0]["replicas"].as_array().unwrap().iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(replicas, ["beta"], "{status}");
    let status = c.status_json("beta");
    let relay = &status["relay_of"][0];
    assert_eq!(relay["fed_by"].as_str(), Some("alpha"), "{status}");
    let downstreams: Vec<&str> = relay["replicas"].as_array().unwrap().iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(downstreams, ["delta", "gamma"], "{status}");
    // The origin shows the whole tree: beta reports whom it feeds when alpha lists it.
    c.sync_ok("alpha", "projects");
    let status = c.status_json("alpha");
    let fed: Vec<&str> = status["origin_of"][0]["replicas"][0]["downstream"].as_array().unwrap().iter().filter_map(|h| h["node"].as_str()).collect();
    assert_eq!(fed, ["delta", "gamma"], "{status}");
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(c.dir("alpha").join("node.yaml"))).stdout).into_owned();
    assert!(text.contains("feeds gamma: newest") && text.contains("feeds delta: newest"), "{text}");
    eprintln!("status on alpha:\n{text}");
    for n in ["beta", "gamma", "delta"] {
        wait_for(Duration::from_secs(60), &format!("alpha's newest on {n}"), || current(n));
    }

    // beta away: gamma waits, and catches up once beta is back.
    c.stop("beta");
    let gamma_had = names(&dst["gamma"]).last().cloned();
    write_random(&src.join("while-beta-is-away.bin"), 1 << 20, 300);
    let _ = c.sync("alpha", "projects"); // fails for beta: it is away
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(names(&dst["gamma"]).last().cloned(), gamma_had, "gamma got something while its relay was away");
    c.start("beta");
    write_random(&src.join("after-beta-is-back.bin"), 1 << 20, 301);
    c.sync_ok("alpha", "projects");
    for n in ["beta", "gamma", "delta"] {
        wait_for(Duration::from_secs(90), &format!("alpha's newest on {n} after beta's return"), || current(n));
    }
    assert_same_tree(&src, &dst["gamma"].join("latest"));

    // gamma away: beta keeps (last: 2) what gamma has as base, whatever its retention says.
    c.stop("gamma");
    let gamma_base = names(&dst["gamma"]).last().cloned().unwrap();
    for round in 0..3 {
        write_random(&src.join(format!("while-gamma-is-away-{round}.bin")), 1 << 20, 400 + round);
        c.sync_ok("alpha", "projects");
        wait_for(Duration::from_secs(60), "alpha's newest on delta", || current("delta"));
    }
    // beta prunes after each receive: to its last 2, plus gamma's base.
    wait_for(Duration::from_secs(60), "beta pruned by its retention", || current("beta") && names(&dst["beta"]).len() <= 3);
    assert!(names(&dst["beta"]).contains(&gamma_base), "beta pruned gamma's base {gamma_base}: {:?}", names(&dst["beta"]));
    c.start("gamma");
    wait_for(Duration::from_secs(90), "alpha's newest on gamma after its return", || current("gamma"));
    // (beta logs a transfer just after gamma committed it.)
    let back = wait_until(Duration::from_secs(30), "beta's log of the transfer to gamma", || {
        delivered(&c.daemons["beta"].log_text(), "gamma", "relayed").into_iter().find(|(s, b)| *s > gamma_base && *b > 0)
    });
    assert!(back.1 < 6 << 20, "gamma got {} bytes after its return: not incremental from its base", back.1);
    assert_copies_of(&alpha_dir, &dst["gamma"]);
    assert_same_tree(&src, &dst["gamma"].join("latest"));
    // Once gamma moved on, beta's next prune (after its next receive) lets the old base go.
    c.sync_ok("alpha", "projects");
    wait_for(Duration::from_secs(60), "beta pruned gamma's old base once it moved on", || !names(&dst["beta"]).contains(&gamma_base));
    for n in ["alpha", "beta", "gamma", "delta"] {
        c.stop(n);
    }
}

#[test]
fn only_the_configured_relay_can_feed_a_cascaded_replica() {
    require_root!();
    let nodes = ["alpha", "beta", "gamma", "delta"];
    let mut c = Cluster::with_size("cascade_hostile", &nodes, 200);
    let src = c.fs["alpha"].subvolume("projects");
    let dst: BTreeMapPaths = nodes[1..].iter().map(|n| (*n, c.mnt(n).join("backup/projects"))).collect();
    // delta is a plain replica here: a member with a valid certificate, not gamma's relay.
    let policy = cascade_policy(&src, &dst).replace("    from: beta\nretention", "retention");
    for n in nodes {
        c.configure(n, &[("projects", policy.clone())]);
    }
    c.start("gamma");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let as_node = |node: &str| -> PeerReplica {
        let path = c.dir(node).join("node.yaml");
        let config = snapship::config::parse_node_text(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        let connector = Arc::new(Connector::new(&config).unwrap());
        let dialer = Arc::new(QuicDialer::new("gamma".into(), format!("127.0.0.1:{}", c.ports["gamma"]), connector));
        // It claims the real epoch, as the relay does.
        let epoch: snapship::ship::client::EpochSource = Arc::new(|| Ok(Epoch { number: 0, origin: "alpha".into() }));
        PeerReplica::new("gamma".into(), "projects".into(), Transfer::default(), Duration::from_secs(30), dialer, epoch)
    };
    rt.block_on(async {
        let hostile = as_node("delta");
        let err = hostile.list().await.expect_err("delta listed gamma");
        assert!(format!("{err:#}").contains("fed by `beta`"), "{err:#}");
        let incoming = Incoming {
            name: SnapshotName::parse("snapship-20260101T000000.000Z").unwrap(),
            identity: "00000000-0000-0000-0000-000000000001".into(),
            base: None,
            from_token: false,
            fetched: false,
        };
        let start = StreamStart { compact: false, start: Start::Fresh };
        let err = hostile.receive(&incoming, start, &mut &b"not a send stream"[..]).await.expect_err("delta fed gamma");
        assert!(format!("{err:#}").contains("fed by `beta`"), "{err:#}");
        hostile.close().await;
        // The configured relay is taken (the same request, beta's certificate).
        let relay = as_node("beta");
        relay.list().await.expect("gamma lists to its relay");
        relay.close().await;
    });
    assert!(names(&dst["gamma"]).is_empty(), "something reached gamma");
    let log = c.daemons["gamma"].log_text();
    assert!(log.contains("fed by `beta`"), "gamma did not log the refusal:\n{log}");
    c.stop("gamma");
}

/// A hostile downstream (or one with a corrupted state) fences its relay off with a newer
/// epoch naming another member: the relay does not follow it (that would fence its
/// own origin off and stop replication to it); a real new origin reaches the relay itself.
/// beta keeps following alpha, receiving and relaying to delta.
#[test]
fn a_downstreams_newer_epoch_is_not_followed_by_its_relay() {
    require_root!();
    let (mut c, src, dst) = four_node_cascade("cascade_downstream_epoch", 200);
    // gamma claims delta was promoted. (Not gamma naming itself: its own daemon would then act
    // as origin and ship, and a promotable member's own request is followed; docs/failover.md,
    // "Not there yet".)
    let epochs = c.dir("gamma").join("state/epochs");
    std::fs::create_dir_all(&epochs).unwrap();
    std::fs::write(epochs.join("projects.json"), r#"{"epoch":{"number":1,"origin":"delta"}}"#).unwrap();
    fill(&src, 71);
    for n in ["beta", "gamma", "delta", "alpha"] {
        c.start(n);
    }
    c.sync_ok("alpha", "projects");
    let claim = "the downstream knows a newer epoch, 1 (origin `delta`): not followed";
    wait_for(Duration::from_secs(60), "beta refused by gamma", || c.daemons["beta"].log_text().contains(claim));
    std::fs::write(src.join("still-alpha.txt"), "alpha keeps the role").unwrap();
    let out = c.sync("alpha", "projects");
    let said = text(&out);
    assert!(said.lines().any(|l| l.contains(" -> beta: incremental from")), "{said}");
    wait_for(Duration::from_secs(60), "alpha's new file on delta, through beta", || dst["delta"].join("latest/still-alpha.txt").exists());
    let status = c.status_json("beta");
    assert_eq!((status["epochs"][0]["epoch"].as_u64(), status["epochs"][0]["origin"].as_str()), (Some(0), Some("alpha")), "{status}");
    assert!(names(&dst["gamma"]).is_empty(), "gamma, claiming another origin, took beta's stream");
    for n in ["alpha", "beta", "gamma", "delta"] {
        c.stop(n);
    }
}

#[test]
fn a_promoted_relay_feeds_its_downstream_as_origin() {
    require_root!();
    let nodes = ["alpha", "beta", "gamma"];
    let mut c = Cluster::with_size("cascade_promote", &nodes, 300);
    let src = c.fs["alpha"].subvolume("projects");
    let (beta_dst, gamma_dst) = (c.mnt("beta").join("backup/projects"), c.mnt("gamma").join("backup/projects"));
    let beta_live = c.mnt("beta").join("projects");
    let policy = format!(
        "fileset: projects\nbackend: btrfs\nmode: continuous\ncontinuous:\n  min_interval: 1s\norigin:\n  node: alpha\n  path: {}\nreplicas:\n  - node: beta\n    path: {}\n    promote_path: {}\n  - node: gamma\n    path: {}\n    from: beta\n",
        src.display(),
        beta_dst.display(),
        beta_live.display(),
        gamma_dst.display()
    );
    for n in nodes {
        c.configure(n, &[("projects", policy.clone())]);
    }
    fill(&src, 61);
    for n in ["beta", "gamma", "alpha"] {
        c.start(n);
    }
    std::fs::write(src.join("before.txt"), "written on alpha").unwrap();
    wait_for(Duration::from_secs(60), "alpha's write on gamma, through beta", || gamma_dst.join("latest/before.txt").exists());
    assert!(c.daemons["gamma"].log_text().lines().any(|l| l.contains("receiving") && l.contains("peer=beta")), "gamma was not fed by beta");

    // alpha is lost; beta, the relay, is promoted and feeds gamma as its origin.
    c.kill9("alpha");
    let out = snapship().args(["promote", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    assert!(out.status.success(), "promote failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::write(beta_live.join("after.txt"), "written on beta").unwrap();
    wait_for(Duration::from_secs(60), "beta's write on gamma", || gamma_dst.join("latest/after.txt").exists());
    let to_gamma = wait_until(Duration::from_secs(30), "beta's origin job shipping to gamma", || {
        delivered(&c.daemons["beta"].log_text(), "gamma", "replica up to date").into_iter().find(|(_, b)| *b > 0)
    });
    eprintln!("after the promotion: beta -> gamma {} bytes", to_gamma.1);
    assert!(to_gamma.1 < 1 << 20, "gamma got {} bytes: not incremental from what beta relayed", to_gamma.1);
    assert_same_tree(&beta_live, &gamma_dst.join("latest"));
    let status = c.status_json("gamma");
    assert_eq!(status["epochs"][0]["epoch"].as_u64(), Some(1), "gamma follows epoch 1: {status}");
    c.stop("gamma");
    c.stop("beta");
}
