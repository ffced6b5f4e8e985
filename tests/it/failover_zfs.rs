//! Failover, failback, switchover and verify on real zfs-fuse pools, three nodes over QUIC
//! (the btrfs scenario of `failover.rs`, driven by `snapship sync` through the daemons so
//! that each stream's size is read from its output). alpha is the origin; it takes a
//! snapshot that never leaves it and writes more, then dies. `promote` on beta makes the
//! replica dataset writable in place (epoch 1); gamma follows incrementally; `verify` from
//! the promoted beta finds gamma equal. alpha, restarted with its unchanged config, is
//! fenced, steps down, and keeps what it wrote after the common base as diverged data (set
//! aside in a sibling dataset before the first receive, never rolled back by `receive -F`);
//! its first stream is incremental. A switchover hands the file set back to alpha with
//! nothing lost, and a switchover to a member that is down thaws and keeps the role. The
//! ZFS tests run one at a time (`zfs::one_at_a_time`); the pools go with the test, on
//! failure too.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::*;
use crate::zfs::{fill_small, one_at_a_time};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The bytes of the stream `sync` output shows shipped to `node`, and whether it was an
/// incremental (`projects: S -> node: incremental from B (N bytes in Xs)`).
fn shipped(out: &str, node: &str) -> Option<(bool, u64)> {
    let line = out.lines().find(|l| l.contains(&format!(" -> {node}: ")) && !l.contains("FAILED"))?;
    let bytes = line.split('(').nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((line.contains("incremental from"), bytes))
}

fn zfs(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(std::process::Command::new("zfs").args(args)).stdout).into_owned()
}

fn snapship_on(c: &Cluster, node: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = snapship();
    cmd.arg(args[0]).arg("--config").arg(c.dir(node).join("node.yaml")).args(&args[1..]);
    cmd.output().unwrap()
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(".write-probe");
    let ok = std::fs::write(&probe, "x").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

#[test]
fn zfs_promote_fail_back_and_switch_over() {
    if !have_zfs("zfs_promote_fail_back_and_switch_over") {
        return;
    }
    let _serial = one_at_a_time();
    let mut c = Cluster::with_size("zfs_failover", &["alpha", "beta", "gamma"], 160);
    let (pa, pb, pg) = (ZfsPool::new(&c.scratch, "pa", 256), ZfsPool::new(&c.scratch, "pb", 256), ZfsPool::new(&c.scratch, "pg", 256));
    let src_ds = pa.dataset("projects");
    let (beta_ds, gamma_ds) = (format!("{}/backup/projects", pb.name), format!("{}/backup/projects", pg.name));
    let (src, beta_live, gamma_mnt) = (pa.mountpoint("projects"), pb.mountpoint("backup/projects"), pg.mountpoint("backup/projects"));
    let policy = format!(
        "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {beta_ds}\n  - node: gamma\n    path: {gamma_ds}\n"
    );
    for n in ["alpha", "beta", "gamma"] {
        c.configure(n, &[("projects", policy.clone())]);
    }
    fill_small(&src, 11);
    c.start("beta");
    c.start("gamma");
    c.start("alpha");
    let out = c.sync_ok("alpha", "projects");
    let full = shipped(&out, "beta").unwrap_or_else(|| panic!("{out}")).1;
    std::fs::write(src.join("before.txt"), "written on alpha").unwrap();
    c.sync_ok("alpha", "projects");
    assert_eq!(read(&gamma_mnt.join("before.txt")).as_deref(), Some("written on alpha"));
    let base = pb.snapshot_props(&beta_ds, "guid").pop().unwrap();

    // What alpha does after that never reaches a replica: a snapshot of its own, more writes.
    std::fs::write(src.join("alpha-only.txt"), "in alpha's own snapshot").unwrap();
    let own = format!("snapship-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
    zfs(&["snapshot", &format!("{src_ds}@{own}")]);
    std::fs::write(src.join("alpha-late.txt"), "written on alpha after its last snapshot").unwrap();

    // The disaster: alpha is gone, its port silent. beta is promoted in place.
    c.kill9("alpha");
    let started = Instant::now();
    let out = snapship_on(&c, "beta", &["promote", "projects"]);
    let took = started.elapsed();
    assert!(out.status.success(), "promote failed:\n{}", text(&out));
    eprintln!("zfs promote took {:.2}s:\n{}", took.as_secs_f64(), text(&out));
    assert!(text(&out).contains("promoted `beta` to origin in epoch 1"), "{}", text(&out));
    assert!(text(&out).contains(&base.0), "promoted from the newest snapshot beta held: {}", text(&out));
    assert_same_tree(&gamma_mnt, &beta_live);
    assert!(writable(&beta_live), "beta's dataset is not writable after the promotion");
    std::fs::write(beta_live.join("after.txt"), "written on beta").unwrap();
    let status = c.status_json("beta");
    let epoch = &status["epochs"][0];
    assert_eq!((epoch["epoch"].as_u64(), epoch["origin"].as_str()), (Some(1), Some("beta")), "{status}");

    // gamma follows the new origin, incrementally (alpha, dead, fails).
    let out = String::from_utf8_lossy(&c.sync("beta", "projects").stdout).into_owned();
    let (incremental, to_gamma) = shipped(&out, "gamma").unwrap_or_else(|| panic!("beta shipped nothing to gamma:\n{out}"));
    eprintln!("first stream beta -> gamma: {to_gamma} bytes (the full send was {full})");
    assert!(incremental && to_gamma * 20 < full, "gamma got {to_gamma} bytes: not an incremental:\n{out}");
    assert_eq!(read(&gamma_mnt.join("after.txt")).as_deref(), Some("written on beta"));
    assert!(!writable(&gamma_mnt), "gamma's replica is writable");
    // Verify from the promoted member: gamma's copy equals beta's.
    let out = snapship_on(&c, "beta", &["verify", "projects", "--replica", "gamma"]);
    assert!(out.status.success() && text(&out).contains(" equal ("), "verify from the new origin:\n{}", text(&out));

    // alpha comes back with its unchanged config: fenced off, it steps down and fails back.
    c.start("alpha");
    wait_for(Duration::from_secs(60), "alpha stepping down", || c.daemons["alpha"].log_text().contains("stepped down"));
    let refused = ["beta", "gamma"].iter().any(|n| c.daemons[*n].log_text().contains("refusing a stale origin"));
    assert!(refused, "no member fenced the stale origin off");
    // Nothing the stale origin had was written on a replica: its own snapshot is on neither.
    for (pool, ds) in [(&pb, &beta_ds), (&pg, &gamma_ds)] {
        assert!(pool.snapshot_props(ds, "guid").iter().all(|(n, _)| *n != own), "the stale origin's {own} reached {ds}");
    }
    assert!(!writable(&src), "alpha's live dataset is not frozen");
    let out = c.sync_ok("beta", "projects");
    let (incremental, to_alpha) = shipped(&out, "alpha").unwrap_or_else(|| panic!("beta shipped nothing to alpha:\n{out}"));
    assert!(incremental, "alpha's first stream is a full one:\n{out}");
    assert_same_tree(&beta_live, &src);
    // The old origin, a replica now, is verified from the new one like any replica.
    let out = snapship_on(&c, "beta", &["verify", "projects", "--replica", "alpha"]);
    assert!(out.status.success() && text(&out).contains(" equal ("), "verify of the old origin:\n{}", text(&out));
    // What `zfs send -i` needs for the same change, from the common base to what alpha got.
    let newest = pa.snapshot_props(&src_ds, "guid").pop().unwrap().0;
    let by_hand =
        run(std::process::Command::new("zfs").args(["send", "-i", &format!("{src_ds}@{}", base.0), &format!("{src_ds}@{newest}")])).stdout.len() as u64;
    eprintln!("failback: first stream beta -> alpha: {to_alpha} bytes; zfs send -i of the same change: {by_hand} bytes (full: {full})");
    assert!(to_alpha.abs_diff(by_hand) < 16 << 10, "{to_alpha} bytes shipped where zfs send -i needs {by_hand}");

    // What alpha wrote after the common base is kept, in a read-only sibling dataset.
    let status = c.status_json("alpha");
    let diverged = status["epochs"][0]["diverged"][0].as_str().unwrap_or_else(|| panic!("no diverged data in alpha's status: {status}")).to_string();
    let kept_ds = format!("{src_ds}-{diverged}");
    let mut kept: Vec<String> = pa.snapshot_props(&kept_ds, "guid").into_iter().map(|(n, _)| n).collect();
    kept.sort();
    assert_eq!(kept, [diverged.clone(), own.clone()], "alpha's own snapshot and its live data at step-down");
    let kept_mnt = pa.mountpoint(&format!("projects-{diverged}"));
    assert_eq!(read(&kept_mnt.join("alpha-late.txt")).as_deref(), Some("written on alpha after its last snapshot"));
    assert_eq!(read(&kept_mnt.join("alpha-only.txt")).as_deref(), Some("in alpha's own snapshot"));
    assert!(!writable(&kept_mnt), "the diverged data is writable");
    assert!(read(&src.join("alpha-late.txt")).is_none(), "alpha's live dataset is beta's now");
    let out = snapship_on(&c, "alpha", &["diverged", "projects"]);
    assert!(text(&out).contains(&diverged), "{}", text(&out));

    // Planned switchover back to alpha, with writes on beta right up to the command.
    for i in 0..5 {
        std::fs::write(beta_live.join(format!("late-{i}.txt")), format!("written on beta {i}")).unwrap();
    }
    let started = Instant::now();
    let out = snapship_on(&c, "beta", &["switchover", "projects", "--to", "alpha"]);
    assert!(out.status.success(), "switchover failed:\n{}", text(&out));
    eprintln!("zfs switchover took {:.2}s:\n{}", started.elapsed().as_secs_f64(), text(&out));
    for i in 0..5 {
        assert_eq!(read(&src.join(format!("late-{i}.txt"))).as_deref(), Some(format!("written on beta {i}").as_str()));
    }
    assert!(writable(&src), "alpha's dataset is writable again");
    assert!(!writable(&beta_live), "beta froze its writes");
    std::fs::write(src.join("back.txt"), "alpha again").unwrap();
    let out = c.sync_ok("alpha", "projects");
    assert!(shipped(&out, "beta").is_some_and(|(i, _)| i) && shipped(&out, "gamma").is_some_and(|(i, _)| i), "{out}");
    assert_eq!(read(&gamma_mnt.join("back.txt")).as_deref(), Some("alpha again"));
    assert_eq!(read(&beta_live.join("back.txt")).as_deref(), Some("alpha again"));

    // The admin removes the diverged data once looked at (retention never does).
    let out = snapship_on(&c, "alpha", &["diverged", "projects", "--remove", &diverged]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(pa.snapshot_props(&kept_ds, "guid").is_empty(), "{kept_ds} is still there");

    // A switchover to a member that is down fails before it took over: alpha thaws and stays.
    c.stop("gamma");
    let out = snapship_on(&c, "alpha", &["switchover", "projects", "--to", "gamma"]);
    assert!(!out.status.success(), "a switchover to a stopped member succeeded:\n{}", text(&out));
    assert!(text(&out).contains("writes are thawed"), "{}", text(&out));
    assert!(writable(&src), "alpha stayed frozen after the failed switchover");
    assert_eq!(c.status_json("alpha")["epochs"][0]["origin"].as_str(), Some("alpha"));
    c.stop("alpha");
    c.stop("beta");
}

/// A replica holding a snapshot newer than the base a new origin sends from keeps it, by name
/// and guid, in a sibling dataset; the incremental is received on the base. (The same holds
/// for a hostile origin naming an old base on purpose: it costs the replica a local copy,
/// never a snapshot.)
#[test]
fn zfs_replica_keeps_snapshots_after_the_base_as_diverged() {
    if !have_zfs("zfs_replica_keeps_snapshots_after_the_base_as_diverged") {
        return;
    }
    let _serial = one_at_a_time();
    use snapship::snapshot::{Incoming, ReplicaSide, SnapshotName, zfs::ZfsReplica};
    let scratch = Scratch::new("zfs_keeps_diverged");
    let (origin, replica) = (ZfsPool::new(&scratch, "o", 160), ZfsPool::new(&scratch, "r", 160));
    let src = origin.dataset("projects");
    let dst = format!("{}/backup/projects", replica.name);
    let side = ZfsReplica::new(dst.clone()).with_members(vec!["alpha".into(), "beta".into()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names = ["snapship-20260101T000000.000Z", "snapship-20260101T010000.000Z", "snapship-20260101T020000.000Z", "snapship-20260101T030000.000Z"];
    let guid = |n: &str| origin.snapshot_props(&src, "guid").into_iter().find(|(s, _)| s == n).unwrap().1;
    let receive = |name: &str, base: Option<&str>| {
        let mut cmd = std::process::Command::new("zfs");
        cmd.arg("send");
        if let Some(b) = base {
            cmd.arg("-i").arg(format!("{src}@{b}"));
        }
        let stream = run(cmd.arg(format!("{src}@{name}"))).stdout;
        let incoming = Incoming { name: SnapshotName::parse(name).unwrap(), identity: guid(name), base: base.map(guid), from_token: false, fetched: false };
        rt.block_on(side.receive(&incoming, &mut &stream[..]))
    };
    fill_small(&origin.mountpoint("projects"), 21);
    zfs(&["snapshot", &format!("{src}@{}", names[0])]);
    receive(names[0], None).unwrap();
    std::fs::write(origin.mountpoint("projects/second"), "2").unwrap();
    zfs(&["snapshot", &format!("{src}@{}", names[1])]);
    receive(names[1], Some(names[0])).unwrap();
    let newer_guid = guid(names[1]);
    // Another history from the first snapshot on (a new origin promoted from it).
    zfs(&["rollback", "-r", &format!("{src}@{}", names[0])]);
    std::fs::write(origin.mountpoint("projects/other"), "o").unwrap();
    zfs(&["snapshot", &format!("{src}@{}", names[2])]);
    let got = receive(names[2], Some(names[0])).unwrap();
    assert_eq!(got.name.as_str(), names[2]);
    let held: Vec<String> = replica.snapshot_props(&dst, "guid").into_iter().map(|(n, _)| n).collect();
    assert_eq!(held, [names[0], names[2]]);
    assert_eq!(read(&replica.mountpoint("backup/projects/other")).as_deref(), Some("o"));
    // The newer snapshot is kept, same name, same guid, read-only.
    let kept = rt.block_on(side.diverged()).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept_ds = format!("{dst}-{}", kept[0]);
    assert_eq!(replica.snapshot_props(&kept_ds, "guid"), [(names[1].to_string(), newer_guid)]);
    let kept_mnt = replica.mountpoint(&format!("backup/projects-{}", kept[0]));
    assert_eq!(read(&kept_mnt.join("second")).as_deref(), Some("2"));
    assert!(!writable(&kept_mnt));
    // Later incrementals are plain again.
    zfs(&["snapshot", &format!("{src}@{}", names[3])]);
    receive(names[3], Some(names[2])).unwrap();
    assert_eq!(rt.block_on(side.diverged()).unwrap(), kept);
}

/// `promote_path:` naming another dataset: promote moves the replica dataset there
/// (unmounted for the move, which zfs-fuse needs) and makes it writable; a switchover away
/// moves it back to the replica path, read-only, where the next stream lands incrementally.
#[test]
fn zfs_promote_path_moves_the_replica_dataset_there_and_back() {
    if !have_zfs("zfs_promote_path_moves_the_replica_dataset_there_and_back") {
        return;
    }
    let _serial = one_at_a_time();
    let mut c = Cluster::with_size("zfs_promote_path", &["alpha", "beta"], 160);
    let (pa, pb) = (ZfsPool::new(&c.scratch, "pa", 256), ZfsPool::new(&c.scratch, "pb", 256));
    let src_ds = pa.dataset("projects");
    pb.dataset("live");
    let (replica_ds, live_ds) = (format!("{}/backup/projects", pb.name), format!("{}/live/projects", pb.name));
    let (src, replica_mnt, live_mnt) = (pa.mountpoint("projects"), pb.mountpoint("backup/projects"), pb.mountpoint("live/projects"));
    let policy = format!(
        "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {replica_ds}\n    promote_path: {live_ds}\n"
    );
    for n in ["alpha", "beta"] {
        c.configure(n, &[("projects", policy.clone())]);
    }
    fill_small(&src, 12);
    c.start("beta");
    c.start("alpha");
    c.sync_ok("alpha", "projects");
    let exists = |ds: &str| std::process::Command::new("zfs").args(["list", "-H", ds]).output().unwrap().status.success();

    c.kill9("alpha");
    let out = snapship_on(&c, "beta", &["promote", "projects"]);
    assert!(out.status.success(), "promote failed:\n{}", text(&out));
    assert!(exists(&live_ds) && !exists(&replica_ds), "the replica dataset was not moved to {live_ds}");
    assert_same_tree(&src, &live_mnt);
    assert!(writable(&live_mnt), "{live_ds} is not writable after the promotion");
    std::fs::write(live_mnt.join("after.txt"), "written on beta").unwrap();

    // alpha comes back, steps down and gets beta's writes; then the file set goes back to it.
    c.start("alpha");
    wait_for(Duration::from_secs(60), "alpha stepping down", || c.daemons["alpha"].log_text().contains("stepped down"));
    c.sync_ok("beta", "projects");
    let out = snapship_on(&c, "beta", &["switchover", "projects", "--to", "alpha"]);
    assert!(out.status.success(), "switchover failed:\n{}", text(&out));
    assert_eq!(read(&src.join("after.txt")).as_deref(), Some("written on beta"));
    assert!(exists(&replica_ds) && !exists(&live_ds), "stepping down did not move the dataset back to {replica_ds}");
    assert!(!writable(&replica_mnt), "beta's replica dataset is writable after it stepped down");

    std::fs::write(src.join("back.txt"), "alpha again").unwrap();
    let out = c.sync_ok("alpha", "projects");
    assert!(shipped(&out, "beta").is_some_and(|(incremental, _)| incremental), "{out}");
    assert_eq!(read(&replica_mnt.join("back.txt")).as_deref(), Some("alpha again"));
    c.stop("alpha");
    c.stop("beta");
}
