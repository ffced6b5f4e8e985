//! `make bench`, phase `failover`: the day of the disaster, measured (issue: promotion RTO
//! and failback bytes side by side with what the by-hand procedure costs).
//!
//! Three nodes on loop btrfs, alpha the origin of 120 MB, beta and gamma its replicas. alpha
//! is killed (SIGKILL, its port silent); `snapship promote` on beta is timed; beta writes
//! 1 MB and ships it; alpha restarts with its unchanged config, steps down and receives the
//! change from beta: the bytes of that first stream are compared with `btrfs send -p` of the
//! same change (the floor) and with the full stream that a by-hand failover cost before
//! (the old origin's snapshots orphaned, so everything resent). The by-hand RTO is the
//! machine time of its steps (a writable snapshot, a daemon restart with the edited policy);
//! the admin's editing is not counted.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::*;

/// `key=value` of a log line, quotes trimmed.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).map(|v| v.trim_matches('"'))
}

/// (snapshot, base, bytes) of the first stream with bytes a daemon log shows shipped to `replica`.
fn first_stream(log: &str, replica: &str) -> Option<(String, String, u64)> {
    log.lines().filter(|l| l.contains("replica up to date") && field(l, "replica") == Some(replica)).find_map(|l| {
        let bytes: u64 = field(l, "bytes")?.parse().ok()?;
        (bytes > 0).then(|| Some((field(l, "snapshot")?.to_string(), field(l, "base")?.to_string(), bytes)))?
    })
}

fn stream_size(args: &str) -> u64 {
    let out = std::process::Command::new("sh").arg("-ec").arg(format!("btrfs send -q {args} | wc -c")).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Where on beta the subvolume `name` is (its replica directory, or its snapshot directory).
fn find(c: &Cluster, name: &str) -> PathBuf {
    let candidates = [c.mnt("beta").join("backup/projects").join(name), c.mnt("beta").join(".snapship/projects").join(name)];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| panic!("no subvolume {name} on beta"))
}

struct Run {
    rto: f64,
    failback: u64,
    floor: u64,
    full: u64,
    by_hand_rto: f64,
}

fn one(round: usize) -> Run {
    let mut c = Cluster::with_size(&format!("bench_failover{round}"), &["alpha", "beta", "gamma"], 1024);
    let Failover { src, gamma_dst, beta_live, .. } = three_node_failover(&c, "mode: snapshot\nschedule: \"@hourly\"\n");
    for i in 0..30 {
        write_random(&src.join(format!("data-{i:02}.bin")), 4 << 20, 7000 + i);
    }
    for n in ["beta", "gamma", "alpha"] {
        c.start(n);
    }
    c.sync_ok("alpha", "projects");
    write_random(&src.join("change-on-alpha.bin"), 1 << 20, 7100);
    c.sync_ok("alpha", "projects");

    // The disaster, and the promotion.
    c.kill9("alpha");
    let started = Instant::now();
    let out = snapship().args(["promote", "--config"]).arg(c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    let rto = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "promote failed: {}", String::from_utf8_lossy(&out.stderr));

    // beta writes and ships (alpha is down: its attempt fails, gamma's succeeds).
    write_random(&beta_live.join("change-on-beta.bin"), 1 << 20, 7200);
    let _ = c.sync("beta", "projects");
    wait_for(Duration::from_secs(60), "beta's write on gamma", || gamma_dst.join("latest/change-on-beta.bin").exists());

    // Failback: alpha restarts unchanged and receives from beta.
    c.start("alpha");
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    wait_for(Duration::from_secs(120), "beta's write on alpha", || alpha_dir.join("latest/change-on-beta.bin").exists());
    let (snapshot, base, failback) =
        wait_until(Duration::from_secs(30), "beta's log of its stream to alpha", || first_stream(&c.daemons["beta"].log_text(), "alpha"));
    let (newest, parent) = (find(&c, &snapshot), find(&c, &base));
    let floor = stream_size(&format!("-p {} {}", parent.display(), newest.display()));
    let full = stream_size(&newest.display().to_string());

    // The by-hand steps' machine time: a writable snapshot of the newest received one, and a
    // daemon restart (stop, start until running) as each survivor needs with an edited policy.
    let by_hand = c.mnt("gamma").join("by-hand");
    let snap = timed_secs(|| {
        let out = std::process::Command::new("btrfs").args(["subvolume", "snapshot"]).arg(gamma_dst.join("latest")).arg(&by_hand).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    let restart = timed_secs(|| {
        c.stop("gamma");
        c.start("gamma");
    });
    for n in ["alpha", "beta", "gamma"] {
        c.stop(n);
    }
    Run { rto, failback, floor, full, by_hand_rto: snap + restart }
}

fn timed_secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs the phase `runs` times; writes its section and verdicts.
pub fn run(runs: usize, out: &mut String, verdicts: &mut Vec<(&'static str, bool, String)>) {
    eprintln!("failover: promotion RTO and failback bytes ({runs} runs)");
    let all: Vec<Run> = (0..runs).map(one).collect();
    let rto = median(all.iter().map(|r| r.rto).collect());
    let by_hand = median(all.iter().map(|r| r.by_hand_rto).collect());
    let failback = median(all.iter().map(|r| r.failback).collect());
    let floor = median(all.iter().map(|r| r.floor).collect());
    let full = median(all.iter().map(|r| r.full).collect());
    let shown = |v: &Vec<String>| v.join(", ");
    writeln!(
        out,
        "\n## Failover and failback (btrfs, three nodes, 120 MB file set; medians of {runs})\n\n\
         alpha (the origin) is killed with SIGKILL, its port silent; `snapship promote` on beta; beta writes 1 MB; alpha restarts with its unchanged config and fails back.\n\n\
         | | snapship | by hand (before this round) |\n|---|---|---|\n\
         | RTO: the file set writable on beta | {rto:.2} s (`snapship promote`; runs: {}) | {by_hand:.2} s of machine time (writable snapshot + a daemon restart with the edited policy; the admin's editing not counted) |\n\
         | failback: first stream to the old origin | {failback} B (`btrfs send -p` of the same change: {floor} B; runs: {}) | {full} B (a full resend: the old origin's snapshots were orphaned) |\n\n\
         Most of the promotion's time is its wait (3 s) for the dead origin's answer: promote refuses while the origin answers.",
        shown(&all.iter().map(|r| format!("{:.2}", r.rto)).collect()),
        shown(&all.iter().map(|r| r.failback.to_string()).collect()),
    )
    .unwrap();
    verdicts.push(("Promotion RTO <= 5 s", rto <= 5.0, format!("{rto:.2} s")));
    let within = failback <= floor + 16 * 1024;
    verdicts.push(("Failback within a few KB of `btrfs send -p`", within, format!("{failback} B vs {floor} B (full: {full} B)")));
}
