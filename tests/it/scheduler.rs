//! `snapship run` as origin: cron, continuous and hybrid modes, and retention that protects
//! the common base while a replica is away. Real btrfs, real QUIC, real time (the bounds are
//! generous; RPO figures belong to the benchmarks).

use std::time::Duration;

use crate::common::cluster::*;
use crate::common::*;

fn with_mode(policy: String, mode: &str, extra: &str) -> String {
    policy.replace("mode: snapshot\nschedule: \"@hourly\"\n", &format!("mode: {mode}\n{extra}"))
}

/// Two nodes, `projects` from alpha to beta with `policy`, filled, both daemons running.
fn two_nodes(test: &str, make_policy: impl Fn(String) -> String) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let (mut c, src, dst) = Cluster::two_nodes(test, 400, make_policy);
    fill(&src, 11);
    c.start("alpha");
    (c, src, dst)
}

fn origin_snapshots(c: &Cluster) -> Vec<String> {
    snapshots(&c.mnt("alpha").join(".snapship/projects"))
}

#[test]
fn cron_every_two_seconds() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_cron", |p| with_mode(p, "snapshot", "schedule: \"*/2 * * * * *\"\n"));
    wait_for(Duration::from_secs(20), "a first snapshot on the replica", || !snapshots(&dst).is_empty());
    let before = snapshots(&dst).len();
    std::thread::sleep(Duration::from_secs(10));
    let after = snapshots(&dst).len();
    assert!(after >= before + 2, "only {} new snapshots on the replica in 10 s", after - before);
    assert!(snapshots(&dst).iter().all(|n| !n.ends_with("-c")), "cron snapshots are scheduled ones");
    assert_same_tree(&src, &dst.join("latest"));
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn continuous_ships_a_write_within_seconds_and_idles_quietly() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_cont", |p| with_mode(p, "continuous", "continuous:\n  min_interval: 1s\n"));
    // The initial data goes out (the first poll finds no snapshot yet).
    wait_for(Duration::from_secs(20), "the initial data on the replica", || dst.join("latest/data.bin").exists());

    // Idle: no snapshot in 10 s.
    let idle_before = origin_snapshots(&c);
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(origin_snapshots(&c), idle_before, "an idle file set took snapshots");

    // A write shows up in the replica's latest within a few seconds.
    std::fs::write(src.join("hello.txt"), "written on alpha").unwrap();
    let took = wait_for(Duration::from_secs(15), "the write on the replica", || {
        std::fs::read_to_string(dst.join("latest/hello.txt")).is_ok_and(|t| t == "written on alpha")
    });
    eprintln!("continuous: the write reached the replica's latest in {:.2}s", took.as_secs_f64());
    let names = origin_snapshots(&c);
    assert!(names.last().unwrap().ends_with("-c"), "continuous snapshots carry -c: {names:?}");

    // A burst of writes coalesces: far fewer snapshots than writes.
    let before = origin_snapshots(&c).len();
    for i in 0..30 {
        std::fs::write(src.join(format!("burst-{i}")), "x").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(15), "the burst on the replica", || dst.join("latest/burst-29").exists());
    let taken = origin_snapshots(&c).len() - before;
    assert!(taken <= 8, "30 writes over 3 s took {taken} snapshots with min_interval 1s");
    c.stop("alpha");
    c.stop("beta");
}

/// A write inotify never reports (through mmap: no write syscall; the open and the close are
/// events the watcher ignores) is noticed by the safety poll, once btrfs commits it (its
/// commit interval is 30 s): the poll reads the subvolume's generation and wakes the file
/// set's loop when it moved.
#[test]
fn a_write_through_mmap_is_noticed_by_the_poll() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_mmap", |p| with_mode(p, "continuous", "continuous:\n  min_interval: 1s\n"));
    std::fs::write(src.join("mapped.bin"), vec![b'.'; 8192]).unwrap();
    wait_for(Duration::from_secs(20), "the initial data on the replica", || dst.join("latest/mapped.bin").exists());
    let before = snapshots(&dst);
    let script =
        "import mmap, sys\nwith open(sys.argv[1], 'r+b') as f:\n    m = mmap.mmap(f.fileno(), 0)\n    m[0:6] = b'MAPPED'\n    m.flush()\n    m.close()\n";
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(src.join("mapped.bin")).output().unwrap();
    assert!(out.status.success(), "python3 mmap write failed: {}", String::from_utf8_lossy(&out.stderr));
    let took = wait_for(Duration::from_secs(120), "the mmap write on the replica", || {
        std::fs::read(dst.join("latest/mapped.bin")).is_ok_and(|d| d.starts_with(b"MAPPED"))
    });
    eprintln!("the mmap write reached the replica in {:.1}s", took.as_secs_f64());
    assert!(snapshots(&dst).len() > before.len(), "no new snapshot for the mmap write");
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn hybrid_does_both() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_hybrid", |p| with_mode(p, "hybrid", "schedule: \"*/3 * * * * *\"\ncontinuous:\n  min_interval: 1s\n"));
    wait_for(Duration::from_secs(20), "scheduled snapshots on the replica", || snapshots(&dst).iter().filter(|n| !n.ends_with("-c")).count() >= 2);
    std::fs::write(src.join("change.txt"), "changed").unwrap();
    wait_for(Duration::from_secs(15), "the change on the replica", || dst.join("latest/change.txt").exists());
    let names = origin_snapshots(&c);
    assert!(names.iter().any(|n| n.ends_with("-c")), "no continuous snapshot: {names:?}");
    assert!(names.iter().filter(|n| !n.ends_with("-c")).count() >= 2, "not enough scheduled snapshots: {names:?}");
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn replica_away_while_origin_prunes_keeps_the_base() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_away", |p| with_mode(p, "snapshot", "schedule: \"* * * * * *\"\n") + "retention:\n  origin: { last: 2 }\n");
    wait_for(Duration::from_secs(20), "a snapshot on the replica", || !snapshots(&dst).is_empty());
    c.stop("beta");
    let base = snapshots(&dst).last().unwrap().clone();
    // The origin keeps snapshotting (every second) and pruning to the last 2.
    std::thread::sleep(Duration::from_secs(6));
    let held = origin_snapshots(&c);
    assert!(held.contains(&base), "the common base {base} was pruned: {held:?}");
    assert!(held.len() <= 4, "pruning did not run: {held:?}");
    assert!(held.len() >= 3, "expected the base plus the last 2: {held:?}");

    std::fs::write(src.join("while-away"), "x").unwrap();
    c.start("beta");
    wait_for(Duration::from_secs(30), "the catch-up", || dst.join("latest/while-away").exists());
    // Caught up incrementally: the catch-up was received on top of the base (snapshots keep
    // coming every second, and missed ones the origin still holds are backfilled on top of
    // what the replica holds, so which one by name is not fixed).
    let b = subvol(&dst.join(&base));
    let newer: Vec<String> = snapshots(&dst).into_iter().filter(|n| *n > base).collect();
    assert!(!newer.is_empty(), "no snapshot newer than the base");
    assert!(
        newer.iter().any(|n| subvol(&dst.join(n)).parent.as_deref() == Some(b.uuid.as_str())),
        "the catch-up was not incremental from the base ({base}): {newer:?}"
    );
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn prune_dry_run_explains_the_plan() {
    require_root!();
    let mut c = Cluster::new("sched_prune", &["alpha", "beta"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "retention:\n  origin: { last: 1 }\n";
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    fill(&src, 12);
    c.start("beta");
    for _ in 0..3 {
        c.sync_ok("alpha", "projects");
    }
    let before = origin_snapshots(&c);
    let out = run(snapship().args(["prune", "--dry-run", "--config"]).arg(c.dir("alpha").join("node.yaml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("keep (newest, common base of beta, last)"), "{text}");
    assert_eq!(origin_snapshots(&c), before, "a dry run deleted something");
    let out = run(snapship().args(["prune", "--config"]).arg(c.dir("alpha").join("node.yaml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deleted"), "{text}");
    // The newest is also the common base: the only one kept.
    assert_eq!(origin_snapshots(&c), [before.last().unwrap().clone()]);
    assert_same_tree(&src, &dst.join("latest"));
}

#[test]
fn sync_while_run_is_running_goes_through_the_daemon() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_sync_daemon", |p| p);
    // The daemon starts and ships nothing (no snapshot yet, next cron firing far away).
    let out = c.sync("alpha", "projects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("-> beta: full"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("synced by the running snapship run"));
    assert_same_tree(&src, &dst.join("latest"));
    // The daemon did it: its log has the transfer, its state the new base.
    assert!(c.daemons["alpha"].log_text().contains("replica up to date"));
    let state = std::fs::read_to_string(c.dir("alpha").join("state/filesets/projects.json")).unwrap();
    assert!(state.contains(&format!("\"base\": \"{}\"", snapshots(&dst).last().unwrap())), "{state}");
    c.stop("alpha");
    c.stop("beta");
}

/// What an outside poller of a replica directory saw.
#[derive(Default)]
struct Seen {
    polls: u64,
    snapshots_checked: u64,
    /// `latest` named a snapshot that was not there (and still did on a second look).
    dangling: Vec<String>,
    /// A visible snapshot name that was not a read-only subvolume.
    partial: Vec<String>,
}

/// Polls `dst` until `stop`: `latest` must always name a snapshot that exists, and every
/// visible snapshot name must be a complete, read-only subvolume.
fn poll_replica(dst: &std::path::Path, stop: &std::sync::atomic::AtomicBool) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        seen.polls += 1;
        if let Ok(target) = std::fs::read_link(dst.join("latest")) {
            if !dst.join(&target).exists() {
                // The link may have moved on (and the old target been pruned) between the
                // two reads: only a link that still names a missing snapshot is dangling.
                if std::fs::read_link(dst.join("latest")).is_ok_and(|again| again == target) && !dst.join(&target).exists() {
                    seen.dangling.push(target.display().to_string());
                }
            }
        }
        for name in snapshots(dst) {
            match libbtrfsutil::subvolume_read_only(dst.join(&name)) {
                Ok(true) => seen.snapshots_checked += 1,
                Ok(false) => seen.partial.push(name),
                Err(_) => {} // pruned meanwhile
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    seen
}

#[test]
fn latest_never_dangles_during_receives_and_prunes() {
    require_root!();
    // Continuous snapshots as fast as the policy allows, and a replica that keeps only two:
    // every receive is followed by a prune, racing the next receive if they were not
    // serialised.
    let (mut c, src, dst) = two_nodes("sched_latest", |p| {
        with_mode(p, "continuous", "continuous:\n  min_interval: 200ms\n") + "retention:\n  origin: { last: 3 }\n  replica: { last: 2 }\n"
    });
    wait_for(Duration::from_secs(20), "a first snapshot on the replica", || dst.join("latest").exists());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let poller = s.spawn(|| poll_replica(&dst, &stop));
        for i in 0..60 {
            std::fs::write(src.join(format!("w-{}", i % 5)), format!("write {i}\n").repeat(1000)).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        wait_for(Duration::from_secs(20), "the last write on the replica", || {
            std::fs::read_to_string(dst.join("latest/w-4")).is_ok_and(|t| t.starts_with("write 59\n"))
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        poller.join().unwrap()
    });
    let received = c.daemons["beta"].log_text().matches("received and committed").count();
    eprintln!("{} polls, {} snapshot checks, {received} receives", seen.polls, seen.snapshots_checked);
    assert!(received >= 10, "too few receives ({received}) to have raced anything");
    assert!(seen.dangling.is_empty(), "latest named a missing snapshot: {:?}", seen.dangling);
    assert!(seen.partial.is_empty(), "a partial snapshot was visible: {:?}", seen.partial);
    assert!(snapshots(&dst).len() <= 3, "the replica was not pruned: {:?}", snapshots(&dst));
    c.stop("alpha");
    c.stop("beta");
}

/// The origin's state file is lost while a replica is away, and retention keeps one
/// snapshot: the origin must not prune the base it no longer knows about, so the replica's
/// catch-up is still incremental.
#[test]
fn a_lost_state_file_does_not_cost_the_replica_its_base() {
    require_root!();
    let (mut c, src, dst) = two_nodes("sched_lost_state", |p| with_mode(p, "snapshot", "schedule: \"* * * * * *\"\n") + "retention:\n  origin: { last: 1 }\n");
    wait_for(Duration::from_secs(20), "a snapshot on the replica", || !snapshots(&dst).is_empty());
    c.stop("beta");
    c.stop("alpha");
    let base = snapshots(&dst).last().unwrap().clone();
    std::fs::remove_dir_all(c.dir("alpha").join("state/filesets")).unwrap();
    c.start("alpha");
    std::thread::sleep(Duration::from_secs(4));
    let held = origin_snapshots(&c);
    assert!(held.contains(&base), "the common base {base} was pruned after the state was lost: {held:?}");
    assert!(c.daemons["alpha"].log_text().contains("not pruning: the common base with beta is not known yet"));

    std::fs::write(src.join("while-away"), "x").unwrap();
    c.start("beta");
    wait_for(Duration::from_secs(30), "the catch-up", || dst.join("latest/while-away").exists());
    let first = snapshots(&dst).into_iter().find(|n| *n > base).expect("a snapshot newer than the base");
    let (b, f) = (subvol(&dst.join(&base)), subvol(&dst.join(&first)));
    assert_eq!(f.parent.as_deref(), Some(b.uuid.as_str()), "the catch-up ({first}) was a full resend, not incremental from the base ({base})");
    // Once the replica was reached, pruning resumes: the origin is back to its one snapshot
    // (plus the base and whatever is in flight).
    wait_for(Duration::from_secs(20), "pruning to resume", || origin_snapshots(&c).len() <= 3);
    c.stop("alpha");
    c.stop("beta");
}
