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

    // The replica's view.
    let b = status(&c, "beta");
    assert_eq!(b.replica_of[0].newest.as_deref(), Some(newest.as_str()));
    assert_eq!(b.replica_of[0].origin, "alpha");

    // The human form says the same.
    let out = run(snapship().args(["status", "--config"]).arg(&alpha));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("projects (origin, continuous)") && text.contains("-> beta: common base snapship-") && text.contains("totals: 1 ok, 0 failed"), "{text}");
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
