//! `snapship verify` between two nodes over QUIC, each with its own loop btrfs: a faithful
//! replica is equal (exit 0), also when verified again from the kept hashes; a received
//! snapshot tampered with by hand (made writable, a file's content changed, a file removed,
//! a mode and an xattr changed, made read-only again: it keeps its received UUID) differs
//! (exit 1), each path named with what differs; a replica that is down cannot be verified
//! (exit 2, with the reason). `btrfs property set -f`, which also clears the received UUID,
//! leaves no copy to verify (exit 2, saying so).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Instant;

use crate::common::cluster::*;
use crate::common::*;

fn verify(c: &Cluster, args: &[&str]) -> (Output, f64) {
    let started = Instant::now();
    let out = snapship().args(["verify", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("projects").args(args).output().unwrap();
    (out, started.elapsed().as_secs_f64())
}

fn two_nodes(test: &str) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let (c, src, dst) = Cluster::two_nodes(test, 400, |p| p);
    fill(&src, 1);
    std::fs::set_permissions(src.join("sub/f5.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/f1.txt", src.join("link")).unwrap();
    set_xattr(&src.join("sub/f6.txt"), "blue");
    (c, src, dst)
}

fn set_xattr(path: &Path, value: &str) {
    rustix::fs::lsetxattr(path, "user.color", value.as_bytes(), rustix::fs::XattrFlags::empty()).unwrap();
}

/// Flips a subvolume's read-only flag. `btrfs property set -f -ts PATH ro false` does the
/// same but btrfs-progs 6.2 also clears the received UUID; the kernel's flag alone (this
/// ioctl, as an intruder would use it) keeps it, the case nothing but the content can show.
fn set_ro(path: &Path, ro: bool) {
    libbtrfsutil::set_subvolume_read_only(path, ro).unwrap();
}

#[test]
fn verify_finds_a_faithful_replica_equal_and_a_tampered_one_different() {
    require_root!();
    let (mut c, src, dst) = two_nodes("verify_tamper");
    c.sync_ok("alpha", "projects");

    let (out, full) = verify(&c, &["--full"]);
    assert!(out.status.success(), "{}\n{}", text(&out), c.daemons["beta"].log_text());
    assert!(text(&out).contains("projects -> beta: snapship-"), "{}", text(&out));
    assert!(text(&out).contains(" equal ("), "{}", text(&out));
    let (out, again) = verify(&c, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 files hashed, 31 reused"), "the second verify reuses every hash:\n{}", text(&out));

    // A later snapshot: only what changed is rehashed.
    std::fs::write(src.join("sub/f2.txt"), "changed on the origin").unwrap();
    c.sync_ok("alpha", "projects");
    let (out, incremental) = verify(&c, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 files hashed, 30 reused"), "{}", text(&out));
    eprintln!("verify figures: full {full:.2}s, again {again:.2}s, next snapshot {incremental:.2}s");

    // Tamper with the replica's newest snapshot by hand.
    let name = snapshots(&dst).pop().unwrap();
    let copy = dst.join(&name);
    let received = subvol(&copy).received.clone();
    set_ro(&copy, false);
    std::fs::write(copy.join("sub/f3.txt"), "file 3 seed 9\n".repeat(50)).unwrap(); // same size
    std::fs::remove_file(copy.join("sub/f4.txt")).unwrap();
    std::fs::set_permissions(copy.join("sub/f5.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
    set_xattr(&copy.join("sub/f6.txt"), "red");
    std::fs::write(copy.join("extra"), "x").unwrap();
    set_ro(&copy, true);
    assert_eq!(subvol(&copy).received, received, "the tampered copy keeps its received UUID");

    let (out, _) = verify(&c, &[]);
    let shown = text(&out);
    eprintln!("{shown}");
    assert_eq!(out.status.code(), Some(1), "{shown}");
    for line in [
        "M sub/f3.txt: content",
        "D sub/f4.txt: only on the origin",
        "M sub/f5.txt: mode 0755 -> 0700",
        "M sub/f6.txt: xattr user.color",
        "A extra: only on the replica",
        "DIFFERS",
    ] {
        assert!(shown.contains(line), "missing {line:?} in:\n{shown}");
    }
    assert!(!shown.contains("f1.txt") && !shown.contains("data.bin"), "only what differs is named:\n{shown}");
    // --full finds the same, and an older snapshot named by --snapshot is still equal.
    let (out, _) = verify(&c, &["--full", "--replica", "beta"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("M sub/f3.txt: content"), "{}", text(&out));
    let older = snapshots(&dst).remove(0);
    let (out, _) = verify(&c, &["--snapshot", &older]);
    assert!(out.status.success(), "{}", text(&out));
    let (out, _) = verify(&c, &["--snapshot", "snapship-20200101T000000.000Z"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("holds no snapshot named"), "{}", text(&out));

    // The tampered copy is never a base: the next snapshot goes incremental from the older
    // one, the replica is whole again, and beta's status flags the changed copy.
    std::fs::write(src.join("sub/f8.txt"), "after the tampering").unwrap();
    let shipped = c.sync_ok("alpha", "projects");
    assert!(shipped.contains(&format!("incremental from {older}")), "the base is not the tampered {name}:\n{shipped}");
    let (out, _) = verify(&c, &[]);
    assert!(out.status.success(), "the newest snapshot on beta is whole: {}", text(&out));
    let status = c.status_json("beta");
    assert_eq!(status["replica_of"][0]["tampered"], serde_json::json!([name]), "{status}");
    assert!(c.daemons["beta"].log_text().contains("was changed after it was received"), "the log says so");

    // By `btrfs property set -f -ts PATH ro false` instead, btrfs-progs (6.2) clears the
    // received UUID: the replica no longer counts it as a copy, and verify says so.
    run(std::process::Command::new("btrfs").args(["property", "set", "-f", "-ts"]).arg(&copy).args(["ro", "false"]));
    std::fs::write(copy.join("sub/f7.txt"), "changed by hand").unwrap();
    run(std::process::Command::new("btrfs").args(["property", "set", "-ts"]).arg(&copy).args(["ro", "true"]));
    let (out, _) = verify(&c, &["--snapshot", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("holds no received copy of"), "{}", text(&out));
    c.stop("beta");
}

#[test]
fn verify_against_a_replica_that_is_down_exits_2_with_the_reason() {
    require_root!();
    let (mut c, _src, _dst) = two_nodes("verify_down");
    c.sync_ok("alpha", "projects");
    c.stop("beta");
    let (out, _) = verify(&c, &[]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(shown.contains("projects -> beta: COULD NOT VERIFY"), "{shown}");
    eprintln!("{shown}");
}

/// The figures in docs/restore.md ("Verify"): a larger file set (256 MiB in 2,000 files),
/// verified in full, then after a change to 10 files, incrementally and in full. Ignored by
/// default (it writes a quarter GiB on each node); run with `-- --ignored verify_figures`.
#[test]
#[ignore]
fn verify_figures() {
    require_root!();
    let (mut c, src, _dst) = Cluster::two_nodes("verify_figures", 1200, |p| p);
    for d in 0..20 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            write_random(&src.join(format!("d{d}/f{f}")), 128 << 10, (d * 100 + f) as u64);
        }
    }
    c.sync_ok("alpha", "projects");
    let (out, full) = verify(&c, &["--full"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("full, first: {full:.2}s: {}", text(&out).lines().next().unwrap_or(""));
    for f in 0..10 {
        write_random(&src.join(format!("d3/f{f}")), 128 << 10, 9000 + f);
    }
    c.sync_ok("alpha", "projects");
    let (out, incremental) = verify(&c, &[]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("incremental, 10 files changed: {incremental:.2}s: {}", text(&out).lines().next().unwrap_or(""));
    let (out, full) = verify(&c, &["--full"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("full, same snapshot: {full:.2}s: {}", text(&out).lines().next().unwrap_or(""));
    c.stop("beta");
}

/// With `snapship run` on the origin, the daemon verifies: the mismatches go to its log and
/// to `snapship_verify_mismatches_total{fileset,replica}` on its metrics endpoint.
#[test]
fn verify_through_the_daemon_logs_and_counts_the_mismatches() {
    require_root!();
    let (mut c, _src, dst) = two_nodes("verify_daemon");
    let metrics_port = free_port();
    c.node_extra.insert("alpha".into(), format!("metrics: 127.0.0.1:{metrics_port}\n"));
    let p = std::fs::read_to_string(c.dir("alpha").join("policies/projects.yaml")).unwrap();
    c.configure("alpha", &[("projects", p)]);
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    let (out, _) = verify(&c, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("verified by the running snapship run"), "{}", text(&out));

    let copy = dst.join(snapshots(&dst).pop().unwrap());
    set_ro(&copy, false);
    std::fs::write(copy.join("sub/f9.txt"), "not what the origin has").unwrap();
    set_ro(&copy, true);
    let (out, _) = verify(&c, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("M sub/f9.txt: content"), "{}", text(&out));

    let log = c.daemons["alpha"].log_text();
    assert!(log.contains("verify: M sub/f9.txt: content"), "the daemon logs each difference:\n{log}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut scraped = String::new();
    std::io::Read::read_to_string(&mut s, &mut scraped).unwrap();
    let line = scraped.lines().find(|l| l.starts_with("snapship_verify_mismatches_total")).unwrap_or_else(|| panic!("no counter in:\n{scraped}"));
    assert!(line.contains("fileset=\"projects\"") && line.contains("replica=\"beta\""), "{line}");
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    c.stop("alpha");
    c.stop("beta");
}

/// A replica on the origin's own node is verified through the in-process link, with its own
/// kept hashes (`STATE_DIR/verify/FILESET/replica`, beside the origin's).
#[test]
fn verify_of_a_replica_on_the_origins_own_node() {
    require_root!();
    let scratch = Scratch::new("verify_local");
    let fs = LoopBtrfs::new(&scratch, "fs", 300);
    let source = fs.subvolume("projects");
    let replica = fs.mnt.join("backup/projects");
    let config = single_node_config(&scratch, "alpha", &[("projects", local_policy("projects", "alpha", &source, &replica))]);
    fill(&source, 3);
    let out = snapship().args(["sync", "--config"]).arg(&config).arg("projects").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for _ in 0..2 {
        let out = snapship().args(["verify", "--config"]).arg(&config).arg("projects").output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("projects -> alpha: snapship-"), "{}", text(&out));
    }
    let state = config.parent().unwrap().join("state/verify/projects");
    assert!(state.join("origin").is_dir() && state.join("replica").is_dir(), "{}", state.display());
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut scraped = String::new();
    std::io::Read::read_to_string(&mut s, &mut scraped).unwrap();
    scraped
}

/// The value of the first sample of `metric` for fileset `projects` and replica `beta`.
fn sample(scraped: &str, metric: &str) -> Option<f64> {
    let line = scraped.lines().find(|l| l.starts_with(&format!("{metric}{{")) && l.contains("fileset=\"projects\"") && l.contains("replica=\"beta\""))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// The policy's `verify:` schedule: the origin's daemon verifies beta by itself (every 2 s
/// here); `status` shows the success, then, once a received snapshot was tampered with, the
/// mismatch with the path, and so do the gauges and the log.
#[test]
fn scheduled_verify_reports_success_then_a_mismatch_in_status_and_metrics() {
    require_root!();
    let (mut c, _src, dst) = two_nodes("verify_scheduled");
    let metrics_port = free_port();
    c.node_extra.insert("alpha".into(), format!("metrics: 127.0.0.1:{metrics_port}\n"));
    let p = std::fs::read_to_string(c.dir("alpha").join("policies/projects.yaml")).unwrap() + "verify: { schedule: \"*/2 * * * * *\" }\n";
    c.configure("alpha", &[("projects", p)]);
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    let newest = snapshots(&dst).pop().unwrap();
    let verify_of_beta = |c: &Cluster| c.status_json("alpha")["origin_of"][0]["replicas"][0]["verify"].clone();
    let equal = wait_until(std::time::Duration::from_secs(60), "a scheduled verify finding beta equal", || {
        let v = verify_of_beta(&c);
        (v["last"]["snapshot"] == newest.as_str() && v["last"]["mismatches"] == 0).then_some(v)
    });
    assert!(equal["last_success"].is_string(), "{equal}");
    assert!(c.status_json("alpha")["origin_of"][0]["next_verify"].is_string());
    let scraped = scrape(metrics_port);
    assert_eq!(sample(&scraped, "snapship_verify_last_mismatches"), Some(0.0), "{scraped}");
    assert!(sample(&scraped, "snapship_verify_last_success_timestamp_seconds").is_some_and(|t| t > 1e9), "{scraped}");

    let copy = dst.join(&newest);
    set_ro(&copy, false);
    std::fs::write(copy.join("sub/f9.txt"), "not what the origin has").unwrap();
    set_ro(&copy, true);
    let differs = wait_until(std::time::Duration::from_secs(60), "a scheduled verify finding the mismatch", || {
        let v = verify_of_beta(&c);
        (v["last"]["mismatches"].as_u64().is_some_and(|n| n >= 1)).then_some(v)
    });
    let found: Vec<String> = serde_json::from_value(differs["last"]["differences"].clone()).unwrap();
    assert!(found.iter().any(|d| d.starts_with("M sub/f9.txt: content")), "{differs}");
    let scraped = scrape(metrics_port);
    assert!(sample(&scraped, "snapship_verify_last_mismatches").is_some_and(|n| n >= 1.0), "{scraped}");
    assert!(sample(&scraped, "snapship_verify_mismatches_total").is_some_and(|n| n >= 1.0), "{scraped}");
    let out = snapship().args(["status", "--config"]).arg(c.dir("alpha").join("node.yaml")).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("VERIFY MISMATCH: beta's copy of") && shown.contains("M sub/f9.txt: content"), "{shown}");
    let log = c.daemons["alpha"].log_text();
    assert!(log.contains("scheduled verify") && log.contains("verify: M sub/f9.txt: content"), "the log has the mismatch:\n{log}");
    c.stop("alpha");
    c.stop("beta");
}

/// A full stream of a tree with many directories: `btrfs send` sends the root directory's
/// times before it is done creating inodes in the root (under temporary names), so a plain
/// `btrfs send | btrfs receive` leaves the copy's root mtime at the receive time. The
/// replica repeats the root's times before the stream's end: verify finds the copy equal,
/// the root's mtime included.
#[test]
fn a_many_directory_full_receive_keeps_the_roots_times() {
    require_root!();
    let (c, src, dst) = two_nodes("verify_root_times");
    for d in 0..120 {
        let sub = src.join(format!("small/{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..20 {
            std::fs::write(sub.join(format!("{f:03}.dat")), format!("{d}-{f}")).unwrap();
        }
    }
    // The root's last entry (`small`) is among its first inodes: `btrfs send` is done with
    // the root early, and creates the rest of the tree in it under temporary names.
    c.sync_ok("alpha", "projects");
    let name = snapshots(&dst).into_iter().rfind(|n| n.starts_with("snapship-")).unwrap();
    let origin_copy = c.mnt("alpha").join(".snapship/projects").join(&name);
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&dst.join(&name)), mtime(&origin_copy), "the replica's root mtime is not the origin's");
    let (out, _) = verify(&c, &["--full"]);
    assert!(out.status.success(), "verify of a faithful many-directory replica:\n{}", text(&out));
}
