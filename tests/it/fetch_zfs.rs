//! Getting a snapshot another member holds, on real zfs-fuse pools and QUIC (the btrfs
//! scenarios of `fetch.rs`): `restore --from NODE` onto a replica that missed a snapshot
//! (incremental from the base both hold, by guid) and onto one whose dataset was destroyed
//! (a full stream, which makes the dataset again); `promote` on a replica that
//! missed the last snapshot first fetches it from the survivor that holds it. A fetched
//! stream is received only where it fits: a hostile member naming an old base changes
//! nothing (no snapshot set aside, none rolled back). The ZFS tests run one at a time
//! (`zfs::one_at_a_time`); the pools go with the test, on failure too.

use std::path::Path;
use std::time::Duration;

use crate::common::cluster::*;
use crate::common::*;
use crate::zfs::{fill_small, one_at_a_time};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn zfs(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(std::process::Command::new("zfs").args(args)).stdout).into_owned()
}

/// `zfs destroy ARGS`, tried again for a while when zfs-fuse finds the dataset busy (right
/// after it was mounted or read).
fn destroy(args: &[&str]) {
    for _ in 0..40 {
        let out = std::process::Command::new("zfs").arg("destroy").args(args).output().unwrap();
        if out.status.success() {
            return;
        }
        assert!(text(&out).contains("busy"), "zfs destroy {args:?}: {}", text(&out));
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("zfs destroy {args:?}: still busy");
}

/// The number before "stream bytes" in a fetch report.
fn stream_bytes(text: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(3).find(|w| w[1] == "stream" && w[2].starts_with("bytes")).and_then(|w| w[0].trim_start_matches('(').parse().ok())
}

/// `snapship restore --config NODE.yaml projects ARGS...` on `node`.
fn restore(c: &Cluster, node: &str, args: &[&str]) -> std::process::Output {
    snapship().args(["restore", "--config"]).arg(c.dir(node).join("node.yaml")).arg("projects").args(args).output().unwrap()
}

/// The names of `dataset`'s snapshots, oldest first.
fn names(pool: &ZfsPool, dataset: &str) -> Vec<String> {
    pool.snapshot_props(dataset, "createtxg").into_iter().map(|(n, _)| n).collect()
}

/// Three nodes: alpha the origin of `projects` on its pool, beta and gamma replicas at
/// `POOL/backup/projects`.
struct Three {
    c: Cluster,
    pools: [ZfsPool; 3],
    src_ds: String,
    beta_ds: String,
    gamma_ds: String,
}

impl Three {
    fn new(test: &str) -> Three {
        let c = Cluster::with_size(test, &["alpha", "beta", "gamma"], 160);
        let pools = [ZfsPool::new(&c.scratch, "pa", 256), ZfsPool::new(&c.scratch, "pb", 256), ZfsPool::new(&c.scratch, "pg", 256)];
        let src_ds = pools[0].dataset("projects");
        let (beta_ds, gamma_ds) = (format!("{}/backup/projects", pools[1].name), format!("{}/backup/projects", pools[2].name));
        let policy = format!(
            "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {beta_ds}\n  - node: gamma\n    path: {gamma_ds}\n"
        );
        for n in ["alpha", "beta", "gamma"] {
            c.configure(n, &[("projects", policy.clone())]);
        }
        Three { c, pools, src_ds, beta_ds, gamma_ds }
    }
}

#[test]
fn zfs_restore_from_another_member_incrementally_and_onto_a_lost_dataset() {
    if !have_zfs("zfs_restore_from_another_member_incrementally_and_onto_a_lost_dataset") {
        return;
    }
    let _serial = one_at_a_time();
    let mut t = Three::new("zfs_fetch_restore");
    let [pa, pb, pg] = &t.pools;
    let src = pa.mountpoint("projects");
    fill_small(&src, 41);
    for n in ["beta", "gamma", "alpha"] {
        t.c.start(n);
    }
    t.c.sync_ok("alpha", "projects");
    // gamma misses the second snapshot: 200 KiB more in a file set of over 4 MiB.
    t.c.stop("gamma");
    write_random(&src.join("new.bin"), 200 << 10, 42);
    std::fs::write(src.join("sub/f3.txt"), "changed").unwrap();
    let _ = t.c.sync("alpha", "projects");
    // alpha is down meanwhile: its worker does not ship the snapshot to gamma itself.
    t.c.stop("alpha");
    t.c.start("gamma");
    let held = names(pb, &t.beta_ds);
    let (first, second) = (held[0].clone(), held[1].clone());
    assert_eq!(names(pg, &t.gamma_ds), [first.as_str()], "gamma was to miss {second}");
    let full: u64 = zfs(&["get", "-Hp", "-o", "value", "referenced", &format!("{}@{second}", t.beta_ds)]).trim().parse().unwrap();

    // Onto gamma, which holds the first snapshot: incremental from it, by guid.
    let to = format!("{}/restored", pg.name);
    let out = restore(&t.c, "gamma", &["--from", "beta", "--snapshot", &second, "--to", &to]);
    assert!(out.status.success(), "restore --from failed:\n{}", text(&out));
    eprintln!("{}", text(&out));
    assert!(text(&out).contains(&format!("fetched {second} from `beta`")) && text(&out).contains(&format!("incremental from {first}")), "{}", text(&out));
    let bytes = stream_bytes(&text(&out)).unwrap_or_else(|| panic!("no stream bytes in {}", text(&out)));
    eprintln!("restore --from beta onto gamma: {bytes} stream bytes for a file set of {full} bytes");
    assert!(bytes * 4 < full, "{bytes} bytes shipped for a 200 KiB change in {full} bytes: not an incremental");
    assert_eq!(names(pg, &t.gamma_ds), [first.as_str(), second.as_str()]);
    assert_same_tree(&pb.mountpoint("backup/projects"), &pg.mountpoint("restored"));
    let guid = |pool: &ZfsPool, ds: &str| pool.snapshot_props(ds, "guid").into_iter().find(|(n, _)| *n == second).map(|(_, g)| g);
    assert_eq!(guid(pg, &t.gamma_ds), guid(pb, &t.beta_ds), "gamma's copy is not beta's snapshot");

    // gamma loses its dataset (the restored clone of it destroyed first): a full stream from
    // beta makes it again, read-only, with beta's snapshot (its guid).
    t.c.stop("gamma");
    destroy(&[&to]);
    destroy(&["-r", &t.gamma_ds]);
    t.c.start("gamma");
    let to = format!("{}/again", pg.name);
    let out = restore(&t.c, "gamma", &["--from", "beta", "--snapshot", &second, "--to", &to]);
    assert!(out.status.success(), "restore --from onto a lost dataset failed:\n{}", text(&out));
    eprintln!("{}", text(&out));
    assert!(text(&out).contains(&format!("fetched {second} from `beta`")) && text(&out).contains("a full stream"), "{}", text(&out));
    assert_eq!(names(pg, &t.gamma_ds), [second.as_str()]);
    assert_same_tree(&pb.mountpoint("backup/projects"), &pg.mountpoint("again"));
    assert_eq!(guid(pg, &t.gamma_ds), guid(pb, &t.beta_ds));
    // (zfs-fuse shows `readonly` as a temporary mount option: a write tells.)
    assert!(std::fs::write(pg.mountpoint("backup/projects/probe"), "x").is_err(), "the fetched replica dataset is writable");

    // gamma holds the second snapshot only; the first, older than its newest, cannot be
    // received by a ZFS dataset: refused before anything is shipped, naming what to do.
    let out = restore(&t.c, "gamma", &["--from", "beta", "--snapshot", &first, "--to", &format!("{}/older", pg.name)]);
    assert!(!out.status.success() && text(&out).contains("nothing older than their newest") && text(&out).contains("restore it on `beta`"), "{}", text(&out));
    assert_eq!(names(pg, &t.gamma_ds), [second.as_str()]);

    // The origin lost its newest snapshot (its hold for beta released first): on ZFS its
    // snapshots are in its live dataset, which would take the stream only by rolling back
    // what was written since: refused, the live data untouched.
    let lost = format!("{}@{second}", t.src_ds);
    let _ = std::process::Command::new("zfs").args(["release", "snapship:beta", &lost]).output();
    destroy(&[&lost]);
    std::fs::write(src.join("live.txt"), "written after the lost snapshot").unwrap();
    t.c.start("alpha");
    let out = restore(&t.c, "alpha", &["--from", "beta", "--snapshot", &second, "--to", &format!("{}/restored", pa.name)]);
    assert!(!out.status.success() && text(&out).contains("in its live dataset") && text(&out).contains("restore it on `beta`"), "{}", text(&out));
    assert_eq!(names(pa, &t.src_ds), [first.as_str()]);
    assert_eq!(read(&src.join("live.txt")).as_deref(), Some("written after the lost snapshot"));
    for n in ["alpha", "beta", "gamma"] {
        t.c.stop(n);
    }
}

#[test]
fn zfs_promote_first_fetches_the_newer_snapshot_a_survivor_holds() {
    if !have_zfs("zfs_promote_first_fetches_the_newer_snapshot_a_survivor_holds") {
        return;
    }
    let _serial = one_at_a_time();
    let mut t = Three::new("zfs_fetch_promote");
    let [pa, pb, pg] = &t.pools;
    let (src, beta_live, gamma_mnt) = (pa.mountpoint("projects"), pb.mountpoint("backup/projects"), pg.mountpoint("backup/projects"));
    fill_small(&src, 43);
    for n in ["beta", "gamma", "alpha"] {
        t.c.start(n);
    }
    t.c.sync_ok("alpha", "projects");
    // beta misses the last snapshot: only gamma holds the last write when alpha dies.
    t.c.stop("beta");
    std::fs::write(src.join("last.txt"), "the last write on alpha").unwrap();
    let _ = t.c.sync("alpha", "projects");
    wait_for(Duration::from_secs(60), "the last write on gamma", || read(&gamma_mnt.join("last.txt")).is_some());
    let newest = names(pg, &t.gamma_ds).pop().unwrap();
    assert!(!names(pb, &t.beta_ds).contains(&newest), "beta got the last snapshot too");
    t.c.kill9("alpha");
    t.c.start("beta");

    let out = snapship().args(["promote", "--config"]).arg(t.c.dir("beta").join("node.yaml")).arg("projects").output().unwrap();
    assert!(out.status.success(), "promote failed:\n{}", text(&out));
    eprintln!("{}", text(&out));
    assert!(text(&out).contains(&format!("fetched {newest} from `gamma` first")), "{}", text(&out));
    let bytes = stream_bytes(&text(&out)).unwrap_or_else(|| panic!("no stream bytes in {}", text(&out)));
    assert!(bytes < 1 << 20, "the fetch shipped {bytes} bytes: not an incremental");
    assert!(text(&out).contains("promoted `beta` to origin in epoch 1") && text(&out).contains(&format!("from {newest}")), "{}", text(&out));
    // The promoted dataset, writable in place, holds the last write that reached a survivor.
    assert_eq!(read(&beta_live.join("last.txt")).as_deref(), Some("the last write on alpha"));
    assert_same_tree(&gamma_mnt, &beta_live);
    std::fs::write(beta_live.join("after.txt"), "written on beta").expect("the promoted dataset is writable");
    // gamma follows beta incrementally from the snapshot both hold now (alpha, dead, fails).
    let out = String::from_utf8_lossy(&t.c.sync("beta", "projects").stdout).into_owned();
    assert!(out.lines().any(|l| l.contains(" -> gamma: incremental from")), "{out}");
    assert_eq!(read(&gamma_mnt.join("after.txt")).as_deref(), Some("written on beta"));
    t.c.stop("gamma");
    t.c.stop("beta");
}

/// A member shipping a fetched snapshot is hostile as any peer: from an old base (the
/// replica holds a newer snapshot) or as a full stream over the dataset, it is refused before
/// zfs receives anything, and nothing on the replica is set aside or rolled back (what the
/// same stream from the origin would cost).
#[test]
fn zfs_a_fetched_stream_that_does_not_fit_changes_nothing() {
    if !have_zfs("zfs_a_fetched_stream_that_does_not_fit_changes_nothing") {
        return;
    }
    let _serial = one_at_a_time();
    use snapship::snapshot::{Incoming, ReplicaSide, SnapshotName, zfs::ZfsReplica};
    let scratch = Scratch::new("zfs_fetch_fits");
    let (origin, replica) = (ZfsPool::new(&scratch, "o", 160), ZfsPool::new(&scratch, "r", 160));
    let src = origin.dataset("projects");
    let dst = format!("{}/backup/projects", replica.name);
    let side = ZfsReplica::new(dst.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let snaps = ["snapship-20260101T000000.000Z", "snapship-20260101T010000.000Z", "snapship-20260101T020000.000Z"];
    let guid = |n: &str| origin.snapshot_props(&src, "guid").into_iter().find(|(s, _)| s == n).unwrap().1;
    let receive = |name: &str, base: Option<&str>, fetched: bool| {
        let mut cmd = std::process::Command::new("zfs");
        cmd.arg("send");
        if let Some(b) = base {
            cmd.arg("-i").arg(format!("{src}@{b}"));
        }
        let stream = run(cmd.arg(format!("{src}@{name}"))).stdout;
        let incoming = Incoming { name: SnapshotName::parse(name).unwrap(), identity: guid(name), base: base.map(guid), from_token: false, fetched };
        rt.block_on(side.receive(&incoming, &mut &stream[..]))
    };
    fill_small(&origin.mountpoint("projects"), 44);
    for (i, s) in snaps.iter().enumerate() {
        std::fs::write(origin.mountpoint("projects").join(format!("n{i}")), s).unwrap();
        zfs(&["snapshot", &format!("{src}@{s}")]);
    }
    receive(snaps[0], None, false).unwrap();
    receive(snaps[1], Some(snaps[0]), false).unwrap();
    let before = replica.snapshot_props(&dst, "guid");
    for (base, why) in [(Some(snaps[0]), "nothing older than its newest"), (None, "full receive")] {
        let e = format!("{:#}", receive(snaps[2], base, true).unwrap_err());
        assert!(e.contains(why), "{e}");
        assert_eq!(replica.snapshot_props(&dst, "guid"), before, "the replica changed");
        assert!(rt.block_on(side.diverged()).unwrap().is_empty(), "something was set aside");
    }
    // On its newest snapshot, the fetched stream is received (without `receive -F`).
    assert_eq!(receive(snaps[2], Some(snaps[1]), true).unwrap().name.as_str(), snaps[2]);
    assert_eq!(read(&replica.mountpoint("backup/projects/n2")).as_deref(), Some(snaps[2]));
}
