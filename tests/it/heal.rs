//! Connections that heal, and no blind resends: two nodes (alpha the origin, beta the
//! replica) running `snapship run` over real QUIC.
//!
//! - a replica restarted between two syncs (SIGTERM, or SIGKILL) costs the second sync a
//!   reconnect only: it succeeds on its first attempt, well within the stall timeout (before,
//!   the origin reused the dead connection: an at once failure, or a hang of the idle
//!   timeout);
//! - a replica frozen (SIGSTOP) or killed after it acknowledged the whole stream, while it
//!   commits, is noticed within the stall timeout, and the error names the commit phase;
//! - a replica whose filesystem is full says how much room it has, and the origin waits for
//!   room (asking it with `list`) without resending; once room is made, the transfer
//!   completes.
//!
//! The times are printed (`--nocapture`) but not asserted beyond generous bounds: the
//! figures belong to `make bench` and docs/benchmarks.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::proxy::Proxy;
use crate::common::*;

struct Pair {
    c: Cluster,
    proxy: Option<Proxy>,
    src: PathBuf,
    dst: PathBuf,
}

/// alpha ships `projects` to beta (through a proxy that counts bytes, if `proxied`), with
/// each node's `transfers:` section; both daemons running, alpha with debug logs (the
/// tests watch for the end of the stream).
fn pair(test: &str, sizes: (u64, u64), proxied: bool, alpha_transfers: &str, beta_transfers: &str) -> Pair {
    let mut c = Cluster::with_sizes(test, &[("alpha", sizes.0), ("beta", sizes.1)]);
    let proxy = proxied.then(|| Proxy::start(format!("127.0.0.1:{}", c.ports["beta"]).parse().unwrap()));
    if let Some(p) = &proxy {
        c.route("alpha", "beta", p.addr());
    }
    c.node_extra.insert("alpha".into(), alpha_transfers.into());
    c.node_extra.insert("beta".into(), beta_transfers.into());
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    c.start("beta");
    c.start_with_env("alpha", &[("RUST_LOG", "snapship=debug,warn".into())]);
    Pair { c, proxy, src, dst }
}

impl Pair {
    fn log(&self, node: &str) -> String {
        self.c.daemons.get(node).map(|d| d.log_text()).unwrap_or_default()
    }

    /// alpha's status entry for beta.
    fn replica_status(&self) -> serde_json::Value {
        self.c.status_json("alpha")["origin_of"][0]["replicas"][0].clone()
    }

    /// Waits until beta holds `n` snapshots with `latest` on the newest.
    fn wait_snapshots(&self, n: usize, limit: Duration) {
        let latest_is_newest = || {
            let newest = snapshots(&self.dst).pop();
            newest.is_some() && std::fs::read_link(self.dst.join("latest")).ok().map(|l| l.to_string_lossy().into_owned()) == newest
        };
        let deadline = Instant::now() + limit;
        while snapshots(&self.dst).len() < n || !latest_is_newest() {
            assert!(Instant::now() < deadline, "beta never got {n} snapshots:\nalpha:\n{}\nbeta:\n{}", self.log("alpha"), self.log("beta"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of beta's daemon.
    fn beta_pid(&self) -> u32 {
        self.c.daemons["beta"].child.as_ref().expect("beta runs").id()
    }
}

/// Sends `signal` to every process whose command line matches `pattern`.
fn signal_all(pattern: &str, signal: &str) {
    let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
    assert!(!pids.is_empty(), "no process matches `{pattern}`");
    for pid in pids {
        let _ = std::process::Command::new("kill").args([signal, &pid]).status();
    }
}

/// Waits until `log()` contains `text`; how long it took.
fn wait_log(limit: Duration, what: &str, log: impl Fn() -> String, text: &str) -> Duration {
    let start = Instant::now();
    while !log().contains(text) {
        assert!(start.elapsed() < limit, "{what}: `{text}` never appeared:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

const STALL: Duration = Duration::from_secs(20);

/// beta restarts between two syncs, by `restart`; the second sync must not notice more than
/// a reconnect.
fn restart_between_syncs(test: &str, restart: impl Fn(&mut Cluster)) {
    let transfers = format!("transfers:\n  stall_timeout: {}s\n", STALL.as_secs());
    let mut p = pair(test, (400, 400), false, &transfers, &transfers);
    std::fs::write(p.src.join("a.txt"), "first").unwrap();
    p.c.sync_ok("alpha", "projects");
    restart(&mut p.c);
    // Let alpha's kept connection go quiet on the dead replica first (at least one keep-alive
    // goes out meanwhile).
    std::thread::sleep(Duration::from_secs(6));
    std::fs::write(p.src.join("b.txt"), "second").unwrap();
    let failed_before = p.replica_status()["transfers_failed"].as_u64().unwrap();
    let started = Instant::now();
    let text = p.c.sync_ok("alpha", "projects");
    let took = started.elapsed();
    eprintln!("{test}: the sync after the restart took {:.2}s", took.as_secs_f64());
    for l in p.log("alpha").lines().filter(|l| l.contains("connecting again") || l.contains("on a fresh one")) {
        eprintln!("{test}: {l}");
    }
    assert!(text.contains("-> beta: incremental"), "{text}");
    assert!(took < STALL / 2, "the sync after beta's restart took {took:?}, the stall timeout is {STALL:?}:\n{}", p.log("alpha"));
    let status = p.replica_status();
    assert_eq!(status["transfers_failed"].as_u64().unwrap(), failed_before, "the first attempt failed: {status}\n{}", p.log("alpha"));
    assert!(!p.log("alpha").contains("retrying in"), "alpha retried:\n{}", p.log("alpha"));
    assert_same_tree(&p.src, &p.dst.join("latest"));
    p.c.stop("alpha");
    p.c.stop("beta");
}

/// beta stopped cleanly (SIGTERM: it closes its connections) and started again.
#[test]
fn a_replica_restarted_between_syncs_costs_only_a_reconnect() {
    require_root!();
    restart_between_syncs("heal_restart_term", |c| {
        c.stop("beta");
        c.start("beta");
    });
}

/// beta killed (SIGKILL: its connections are never closed) and started again: its
/// stateless reset tells alpha at once that the kept connection is gone.
#[test]
fn a_replica_killed_and_restarted_between_syncs_costs_only_a_reconnect() {
    require_root!();
    restart_between_syncs("heal_restart_kill", |c| {
        c.kill9("beta");
        c.start("beta");
    });
}

/// The commit phase: beta's `btrfs receive` is frozen, so the whole stream goes into its
/// spool and is acknowledged; alpha sends the end and waits for the commit. Then beta
/// itself is frozen (`kill_it`: killed): alpha must notice within its stall timeout, and
/// say the commit phase failed. Once beta is back, the transfer completes.
fn dead_in_commit_phase(test: &str, kill_it: bool) {
    const STALL: Duration = Duration::from_secs(5);
    // beta's own watchdogs wait longer than the test: the origin must be the one to notice.
    let mut p = pair(test, (600, 600), true, "transfers:\n  stall_timeout: 5s\n", "transfers:\n  stall_timeout: 10m\n");
    write_random(&p.src.join("big.bin"), 96 << 20, 61);
    let held = snapshots(&p.dst).len();
    let child = snapship()
        .args(["sync", "--wait", "0s", "--config"])
        .arg(p.c.dir("alpha").join("node.yaml"))
        .arg("projects")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let receive = format!("btrfs receive.*{}", p.dst.display());
    wait_for(Duration::from_secs(60), "the receive to start", || {
        std::process::Command::new("pgrep").args(["-f", &receive]).output().is_ok_and(|o| o.status.success())
    });
    signal_all(&receive, "-STOP");
    let sent = "stream sent, waiting for the commit";
    let already = p.log("alpha").matches(sent).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while p.log("alpha").matches(sent).count() <= already {
        assert!(Instant::now() < deadline, "alpha never sent the whole stream:\n{}", p.log("alpha"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let beta = p.beta_pid().to_string();
    if kill_it {
        p.c.kill9("beta");
    } else {
        let _ = std::process::Command::new("kill").args(["-STOP", &beta]).status();
    }
    let dead = Instant::now();
    let took = wait_log(STALL * 4, "alpha noticing the dead replica", || p.log("alpha"), "failed in the commit phase");
    eprintln!(
        "{test}: beta {} in the commit phase, noticed after {:.2}s (stall timeout {STALL:?})",
        if kill_it { "killed" } else { "frozen" },
        took.as_secs_f64()
    );
    assert!(dead.elapsed() < STALL + Duration::from_secs(5), "noticed after {:?}", dead.elapsed());
    let log = p.log("alpha");
    eprintln!("{test}: {}", log.lines().find(|l| l.contains("failed in the commit phase")).unwrap_or_default());
    let mut child = child;
    let _ = child.wait();
    // Bring beta back: the transfer completes (a resend after a kill).
    if kill_it {
        signal_all(&receive, "-KILL");
        wait_for_no_process(&receive);
        p.c.start("beta");
    } else {
        let _ = std::process::Command::new("kill").args(["-CONT", &beta]).status();
        signal_all(&receive, "-CONT");
    }
    p.wait_snapshots(held + 1, Duration::from_secs(180));
    assert_same_tree(&p.src, &p.dst.join("latest"));
}

#[test]
fn a_replica_frozen_in_the_commit_phase_is_noticed_within_the_stall_timeout() {
    require_root!();
    dead_in_commit_phase("heal_commit_frozen", false);
}

#[test]
fn a_replica_killed_in_the_commit_phase_is_noticed_within_the_stall_timeout() {
    require_root!();
    dead_in_commit_phase("heal_commit_killed", true);
}

/// beta's filesystem is full: alpha is told how much room there is and waits for room,
/// checking with beta (a `list` per second or so) without resending the stream; the status
/// says so. Once room is made, the transfer completes.
#[test]
fn a_full_replica_is_waited_for_not_resent_blindly() {
    require_root!();
    let transfers = "transfers:\n  stall_timeout: 4s\n";
    let mut p = pair("heal_no_space", (700, 512), true, transfers, transfers);
    std::fs::write(p.src.join("small.txt"), "first").unwrap();
    p.c.sync_ok("alpha", "projects");
    // Leave about 80 MiB free on beta, then send 200 MiB.
    let ballast = p.c.mnt("beta").join("ballast.bin");
    let free = nix::sys::statvfs::statvfs(p.c.mnt("beta")).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    write_random(&ballast, free.saturating_sub(80 << 20) as usize, 63);
    run(&mut std::process::Command::new("sync"));
    write_random(&p.src.join("big.bin"), 200 << 20, 64);
    let out = p.c.sync("alpha", "projects");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() && text.contains("NoSpace") && text.contains("free there"), "{text}\nbeta:\n{}", p.log("beta"));
    let waiting = wait_until(Duration::from_secs(30), "the status to show the wait for room", || {
        let r = p.replica_status();
        (!r["waiting_for_room"].is_null()).then(|| r["waiting_for_room"].clone())
    });
    eprintln!("waiting for room: {waiting}");
    let status = snapship().args(["status", "--config"]).arg(p.c.dir("alpha").join("node.yaml")).output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(shown.contains("WAITING FOR ROOM on beta"), "{shown}");
    // Across the wait: no resend, only the checks.
    let proxy = p.proxy.as_ref().unwrap();
    // The refused attempt's data still in flight (QUIC windows of up to 16 MiB) drains first:
    // count from when the link has gone quiet (the checks are a few hundred bytes).
    let mut last = proxy.forwarded().0;
    let before = wait_until(Duration::from_secs(30), "the refused attempt's data in flight to drain", || {
        std::thread::sleep(Duration::from_secs(1));
        let now = proxy.forwarded().0;
        (std::mem::replace(&mut last, now) + 64 * 1024 > now).then_some(now)
    });
    std::thread::sleep(Duration::from_secs(15));
    let during = proxy.forwarded().0 - before;
    eprintln!("bytes towards beta during 15 s of waiting for room: {during}");
    assert!(during < 1 << 20, "{during} bytes went to beta while it had no room:\n{}", p.log("alpha"));
    assert_eq!(snapshots(&p.dst).len(), 1);
    // Room made: the transfer goes through without another sync.
    std::fs::remove_file(&ballast).unwrap();
    run(&mut std::process::Command::new("sync"));
    let freed = Instant::now();
    p.wait_snapshots(2, Duration::from_secs(120));
    eprintln!("delivered {:.1}s after room was made", freed.elapsed().as_secs_f64());
    assert_same_tree(&p.src, &p.dst.join("latest"));
    assert!(p.replica_status()["waiting_for_room"].is_null());
    p.c.stop("alpha");
    p.c.stop("beta");
}
