//! Operating snapship: `status --json` and the Prometheus endpoint during and after a real
//! transfer, checked against what happened.

use std::io::{Read, Write};
use std::time::Duration;

use crate::common::cluster::*;
use crate::common::*;
use snapship::observe::status::StatusReport;

fn status(c: &Cluster, node: &str) -> StatusReport {
    let out = run(snapship().args(["status", "--json", "--config"]).arg(c.dir(node).join("node.yaml")));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status --json is not a report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// `name{labels} value` lines of a scrape, for the metrics starting with `prefix`.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.") && text.contains(" 200 "), "{text}");
    text
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name_and_labels} in:\n{text}"))
}

#[test]
fn status_and_metrics_follow_a_transfer() {
    require_root!();
    let mut c = Cluster::new("operate_status", &["alpha", "beta"]);
    let metrics_port = free_port();
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]).replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: continuous\n")
        + "transfer:\n  compression: none\n";
    let alpha = c.configure("alpha", &[("projects", p.clone())]);
    std::fs::write(&alpha, std::fs::read_to_string(&alpha).unwrap() + &format!("metrics: 127.0.0.1:{metrics_port}\n")).unwrap();
    c.configure("beta", &[("projects", p)]);
    write_random(&src.join("big.bin"), 24 << 20, 21);

    // No daemon yet: a clear message.
    let out = snapship().args(["status", "--config"]).arg(&alpha).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapship run is running"), "{}", String::from_utf8_lossy(&out.stderr));

    // During: the daemon's transfer stalls (test hook) after 8 MiB.
    c.start("beta");
    let marker = c.scratch.dir.join("stalled");
    require_test_hooks();
    c.start_with_env("alpha", &[("SNAPSHIP_TEST_STALL", format!("{}:{}", 8 << 20, marker.display()))]);
    wait_until(Duration::from_secs(30), "the stall", || marker.exists().then_some(()));
    let during = status(&c, "alpha");
    let r = &during.origin_of[0].replicas[0];
    let t = r.transfer.as_ref().expect("a transfer in progress");
    assert!(t.bytes >= 8 << 20 && t.bytes < 24 << 20, "bytes in flight: {}", t.bytes);
    assert!(t.base.is_none(), "the first transfer is full");
    assert_eq!((r.transfers_ok, r.transfers_failed), (0, 0));
    let m = scrape(metrics_port);
    assert_eq!(metric(&m, "snapship_transfers_total{fileset=\"projects\",replica=\"beta\",result=\"ok\"}"), 0.0);
    // In words: the bytes of the transfer under way, not the (still 0) totals.
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(&alpha)).stdout).into_owned();
    assert!(
        text.contains("-> beta: none yet") && text.contains("     sending snapship-") && text.contains("(full): ") && text.contains("MiB so far at "),
        "{text}"
    );

    // After: restarted without the hook, the transfer completes. (Stopping alpha closes its
    // connection, so beta drops the partial receive at once, not after an idle timeout.)
    c.stop("alpha");
    wait_until(Duration::from_secs(10), "beta to drop the abandoned receive", || c.daemons["beta"].log_text().contains("request failed").then_some(()));
    c.start("alpha");
    let after = wait_until(Duration::from_secs(60), "the transfer to finish", || {
        let s = status(&c, "alpha");
        (s.origin_of[0].replicas[0].transfers_ok == 1).then_some(s)
    });
    let r = &after.origin_of[0].replicas[0];
    assert!(r.transfer.is_none());
    let newest = after.origin_of[0].newest.clone().unwrap();
    assert_eq!(r.newest.as_deref(), Some(newest.as_str()), "the replica has the origin's newest");
    assert!(r.bytes_shipped > 24 << 20 && r.bytes_shipped < 26 << 20, "a full stream of the 24 MiB file: {}", r.bytes_shipped);
    assert!(r.lag_seconds.unwrap() < 60.0, "lag {:?}", r.lag_seconds);
    assert!(r.last_error.is_none());

    let m = scrape(metrics_port);
    let labels = "{fileset=\"projects\",replica=\"beta\"}";
    assert_eq!(metric(&m, "snapship_transfers_total{fileset=\"projects\",replica=\"beta\",result=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, &format!("snapship_bytes_shipped_total{labels}")), r.bytes_shipped as f64);
    std::thread::sleep(Duration::from_millis(1100)); // one lag refresh
    let m = scrape(metrics_port);
    assert!(metric(&m, &format!("snapship_replica_lag_seconds{labels}")) < 60.0);
    assert!(metric(&m, &format!("snapship_last_success_timestamp_seconds{labels}")) > 1.7e9);
    assert!(metric(&m, "snapship_snapshots{fileset=\"projects\",side=\"origin\"}") >= 1.0);
    // Who is origin, in which epoch, and the diverged data kept (none).
    assert_eq!(metric(&m, "snapship_epoch{fileset=\"projects\"}"), 0.0);
    assert_eq!(metric(&m, "snapship_is_origin{fileset=\"projects\"}"), 1.0);
    assert_eq!(metric(&m, "snapship_diverged_kept{fileset=\"projects\"}"), 0.0);
    assert_eq!(metric(&m, "snapship_broken_policies"), 0.0);

    // The replica's view.
    let b = status(&c, "beta");
    assert_eq!(b.replica_of[0].newest.as_deref(), Some(newest.as_str()));
    assert_eq!(b.replica_of[0].origin, "alpha");

    // The human form says the same.
    let out = run(snapship().args(["status", "--config"]).arg(&alpha));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("projects (origin, continuous)") && text.contains("-> beta: common base snapship-") && text.contains("totals: 1 ok, 0 failed"),
        "{text}"
    );
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn list_shows_both_sides() {
    require_root!();
    let mut c = Cluster::new("operate_list", &["alpha", "beta"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]);
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    fill(&src, 22);
    c.start("beta");
    c.sync_ok("alpha", "projects");
    c.sync_ok("alpha", "projects");
    // A snapshot only on the origin: delete the newest on the replica by hand.
    let newest = snapshots(&dst).pop().unwrap();
    run(std::process::Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(dst.join(&newest)));
    let out = run(snapship().args(["list", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("projects"));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("snapship-")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    // Name, time, kind and size first; the members' marks (origin, beta) last.
    let marks = |row: &str| row.split_whitespace().rev().take(2).map(String::from).collect::<Vec<_>>();
    assert_eq!(marks(rows[0]), ["x", "x"], "{text}");
    assert!(rows[1].starts_with(&newest) && marks(rows[1]) == [".", "x"], "{text}");
}

/// A continuous-mode pair with `rpo: 2s` and metrics on alpha: (cluster, alpha's config,
/// the origin's subvolume, the metrics port).
fn continuous_pair(test: &str, extra: &str) -> (Cluster, std::path::PathBuf, std::path::PathBuf, u16) {
    let c = Cluster::new(test, &["alpha", "beta"]);
    let metrics_port = free_port();
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst)]).replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: continuous\n") + extra;
    let alpha = c.configure("alpha", &[("projects", p.clone())]);
    std::fs::write(&alpha, std::fs::read_to_string(&alpha).unwrap() + &format!("metrics: 127.0.0.1:{metrics_port}\n")).unwrap();
    c.configure("beta", &[("projects", p)]);
    (c, alpha, src, metrics_port)
}

/// Waits until beta holds alpha's newest snapshot and nothing is under way.
fn wait_current(c: &Cluster, limit: Duration) -> StatusReport {
    wait_until(limit, "beta to hold alpha's newest snapshot", || {
        let s = status(c, "alpha");
        let (o, r) = (&s.origin_of[0], &s.origin_of[0].replicas[0]);
        (o.newest.is_some() && r.newest == o.newest && r.transfer.is_none()).then_some(s)
    })
}

#[test]
fn lag_is_zero_while_current_and_grows_past_the_rpo_in_an_outage() {
    require_root!();
    let (mut c, alpha, src, metrics_port) = continuous_pair("operate_lag", "rpo: 2s\n");
    fill(&src, 31);
    c.start("beta");
    c.start("alpha");
    let labels = "{fileset=\"projects\",replica=\"beta\"}";

    // Idle and current: lag stays 0 while the newest snapshot grows old (the old
    // definition, the age of the replica's newest, would pass the rpo here).
    wait_current(&c, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    let s = status(&c, "alpha");
    let (o, r) = (&s.origin_of[0], &s.origin_of[0].replicas[0]);
    assert_eq!(r.newest, o.newest, "nothing new was taken meanwhile");
    let age = chrono::Utc::now() - snapship::snapshot::SnapshotName::parse(o.newest.as_deref().unwrap()).unwrap().time();
    assert!(age.num_seconds() >= 3, "the newest snapshot is {age} old");
    assert_eq!((r.lag_seconds, r.rpo_exceeded, o.rpo_seconds), (Some(0.0), false, Some(2.0)), "{r:#?}");
    let m = scrape(metrics_port);
    assert_eq!(metric(&m, &format!("snapship_replica_lag_seconds{labels}")), 0.0);
    assert_eq!(metric(&m, &format!("snapship_rpo_exceeded{labels}")), 0.0);
    assert_eq!(metric(&m, "snapship_rpo_seconds{fileset=\"projects\"}"), 2.0);

    // Beta is down and alpha's data changes: exposed from the change on, beyond the rpo.
    c.stop("beta");
    std::fs::write(src.join("new.txt"), "written while beta is down\n").unwrap();
    let s = wait_until(Duration::from_secs(30), "the lag to pass the rpo", || {
        let s = status(&c, "alpha");
        s.origin_of[0].replicas[0].rpo_exceeded.then_some(s)
    });
    let r = &s.origin_of[0].replicas[0];
    assert!(r.lag_seconds.unwrap() > 2.0 && r.lag_seconds.unwrap() < 30.0, "lag {:?}", r.lag_seconds);
    std::thread::sleep(Duration::from_millis(1100)); // one metrics refresh
    let m = scrape(metrics_port);
    assert_eq!(metric(&m, &format!("snapship_rpo_exceeded{labels}")), 1.0);
    assert!(metric(&m, &format!("snapship_replica_lag_seconds{labels}")) > 2.0);
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(&alpha)).stdout).into_owned();
    assert!(text.contains("RPO EXCEEDED") && text.contains("more than the rpo of 2s"), "{text}");
    // The failed attempts show, with the message, as they happen.
    let s = wait_until(Duration::from_secs(60), "a failed transfer to beta", || {
        let s = status(&c, "alpha");
        (s.origin_of[0].replicas[0].transfers_failed > 0).then_some(s)
    });
    assert!(s.origin_of[0].replicas[0].last_error.is_some());
    assert!(metric(&scrape(metrics_port), "snapship_failures_total{fileset=\"projects\",what=\"transfer\"}") >= 1.0);

    // Beta is back: current again, the error cleared.
    c.start("beta");
    let s = wait_current(&c, Duration::from_secs(360));
    let r = &s.origin_of[0].replicas[0];
    assert_eq!((r.lag_seconds, r.rpo_exceeded), (Some(0.0), false), "{r:#?}");
    assert!(r.last_error.is_none());
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn totals_survive_a_restart_of_the_origin() {
    require_root!();
    let (mut c, _alpha, src, _) = continuous_pair("operate_totals", "");
    fill(&src, 32);
    c.start("beta");
    c.start("alpha");
    wait_current(&c, Duration::from_secs(60));
    std::fs::write(src.join("more.txt"), "a second snapshot\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = wait_current(&c, Duration::from_secs(60)).origin_of[0].replicas[0].clone();
    assert!(before.transfers_ok >= 2 && before.bytes_shipped > 6 << 20, "{before:#?}");
    c.stop("alpha");
    c.start("alpha");
    // The restarted daemon's first round (it finds beta current) counts one more success:
    // read the totals once it is counted, so that the status and the text see the same ones
    // (nothing changes after it: no snapshot is due).
    wait_for(Duration::from_secs(60), "alpha's first round after its restart to be counted", || {
        status(&c, "alpha").origin_of[0].replicas[0].transfers_ok > before.transfers_ok
    });
    let after = status(&c, "alpha").origin_of[0].replicas[0].clone();
    assert!(after.transfers_ok >= before.transfers_ok, "{before:#?}\n{after:#?}");
    assert!(after.bytes_shipped >= before.bytes_shipped, "{before:#?}\n{after:#?}");
    assert!(after.last_success.is_some(), "the last success is remembered too: {after:#?}");
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(c.dir("alpha").join("node.yaml"))).stdout).into_owned();
    assert!(text.contains(&format!("totals: {} ok", after.transfers_ok)), "{text}");
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn a_failed_snapshot_shows_in_status_until_one_is_taken() {
    require_root!();
    let mut c = Cluster::new("operate_snapfail", &["alpha", "beta"]);
    let metrics_port = free_port();
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst)]);
    let alpha = c.configure("alpha", &[("projects", p.clone())]);
    std::fs::write(&alpha, std::fs::read_to_string(&alpha).unwrap() + &format!("metrics: 127.0.0.1:{metrics_port}\n")).unwrap();
    c.configure("beta", &[("projects", p)]);
    fill(&src, 33);
    c.start("beta");
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    let before = status(&c, "alpha");
    assert!(before.origin_of[0].last_snapshot_error.is_none());

    // The subvolume moved away, a plain directory in its place: no snapshot can be taken.
    let away = src.with_file_name("projects.away");
    std::fs::rename(&src, &away).unwrap();
    std::fs::create_dir(&src).unwrap();
    let out = c.sync("alpha", "projects");
    assert!(!out.status.success());
    let s = status(&c, "alpha");
    let e = s.origin_of[0].last_snapshot_error.as_ref().expect("the failed snapshot in status");
    assert!(e.message.contains("cannot take a snapshot"), "{e:?}");
    assert!((chrono::Utc::now() - e.at).num_seconds() < 60, "{e:?}");
    let text = String::from_utf8_lossy(&run(snapship().args(["status", "--config"]).arg(&alpha)).stdout).into_owned();
    assert!(text.contains("  FAILED at ") && text.contains("cannot take a snapshot"), "{text}");
    assert_eq!(metric(&scrape(metrics_port), "snapship_failures_total{fileset=\"projects\",what=\"snapshot\"}"), 1.0);

    // Put back: the next snapshot works, and the error is gone.
    std::fs::remove_dir(&src).unwrap();
    std::fs::rename(&away, &src).unwrap();
    c.sync_ok("alpha", "projects");
    let s = status(&c, "alpha");
    assert!(s.origin_of[0].last_snapshot_error.is_none(), "{:#?}", s.origin_of[0]);
    assert_eq!(s.origin_of[0].replicas[0].transfers_ok, 2);
    c.stop("alpha");
    c.stop("beta");
}

/// `sync` through the daemon waits for the outcome the daemon reaches, not its first try: a
/// replica down when the sync starts and back a little later is reported as synced. With a
/// bound too short it says what is still under way and exits 1; `--no-wait` returns once the
/// snapshot is taken.
#[test]
fn sync_through_the_daemon_waits_for_the_retry_within_its_bound() {
    require_root!();
    let mut c = Cluster::new("operate_syncwait", &["alpha", "beta"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]);
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    fill(&src, 41);
    c.start("alpha");
    let config = c.dir("alpha").join("node.yaml");

    // beta down: a short bound ends with what is under way.
    let out = snapship().args(["sync", "--wait", "2s", "--config"]).arg(&config).arg("projects").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() && text.contains("-> beta: FAILED") && (text.contains("keeps retrying") || text.contains("still under way")), "{text}");
    let out = run(snapship().args(["sync", "--no-wait", "--config"]).arg(&config).arg("projects"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("taken; the running daemon ships it"), "{text}");

    // beta comes back while a sync waits: the sync reports the daemon's retry that worked.
    std::fs::write(src.join("late.txt"), "after the outage").unwrap();
    let waiting = snapship().args(["sync", "--config"]).arg(&config).arg("projects").stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.start("beta");
    let out = waiting.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("-> beta: "), "{text}");
    assert_eq!(std::fs::read_to_string(dst.join("latest/late.txt")).unwrap(), "after the outage");
    c.stop("alpha");
    c.stop("beta");
}

/// Without a daemon, a sync that fails (its replica is down) and is run again with nothing
/// changed ships the snapshot the first one took instead of taking another.
#[test]
fn failed_one_shot_syncs_do_not_pile_up_snapshots() {
    require_root!();
    let mut c = Cluster::new("operate_syncpile", &["alpha", "beta"]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]);
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    fill(&src, 42);
    let snapdir = src.parent().unwrap().join(".snapship/projects");
    for _ in 0..3 {
        assert!(!c.sync("alpha", "projects").status.success(), "beta is down: the sync fails");
    }
    assert_eq!(snapshots(&snapdir).len(), 1, "three failed syncs of unchanged data, one snapshot: {:?}", snapshots(&snapdir));
    c.start("beta");
    let text = c.sync_ok("alpha", "projects");
    assert_eq!(snapshots(&snapdir).len(), 1, "{text}");
    assert_eq!(snapshots(&dst), snapshots(&snapdir));
    // A change: the next sync takes a new snapshot, as always.
    std::fs::write(src.join("new.txt"), "changed").unwrap();
    c.sync_ok("alpha", "projects");
    assert_eq!(snapshots(&snapdir).len(), 2);
    c.stop("beta");
}
