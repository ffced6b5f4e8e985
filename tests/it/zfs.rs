//! The ZFS backend on real zfs-fuse pools: the btrfs scenarios again (full and incremental,
//! bases after deletions, a kill mid-receive, over QUIC), holds on the base, a replica that
//! refuses a stream carrying properties, feature detection against the live zfs, and a
//! consistency group with one creation txg.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::*;
use snapship::config;
use snapship::replicate::ReplicaReport;

/// The tests share one zfs-fuse daemon per machine, which was seen to hang for good when two
/// tests created datasets at the same moment: they run one at a time, across test processes
/// too (a file lock; each call opens its own file, so threads of one process exclude each
/// other as well).
pub(crate) fn one_at_a_time() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("snapship-zfs-tests.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()))
}

/// One node, two pools: `projects` on the first, its replica on the second.
pub(crate) struct Local {
    pub(crate) scratch: Scratch,
    pub(crate) origin: ZfsPool,
    pub(crate) replica: ZfsPool,
    pub(crate) config_path: PathBuf,
    pub(crate) src_ds: String,
    pub(crate) dst_ds: String,
}

impl Local {
    pub(crate) fn new(test: &str) -> Local {
        let scratch = Scratch::new(test);
        let origin = ZfsPool::new(&scratch, "o", 256);
        let replica = ZfsPool::new(&scratch, "r", 256);
        let src_ds = origin.dataset("projects");
        let dst_ds = format!("{}/backup/projects", replica.name);
        let policy = format!(
            "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: alpha\n    path: {dst_ds}\n"
        );
        let config_path = single_node_config(&scratch, "alpha", &[("projects", policy)]);
        Local { scratch, origin, replica, config_path, src_ds, dst_ds }
    }

    pub(crate) fn sync(&self) -> anyhow::Result<ReplicaReport> {
        let cfg = std::sync::Arc::new(config::load(&self.config_path).unwrap());
        assert!(cfg.errors.is_empty(), "{:?}", cfg.errors);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let report = rt.block_on(snapship::node::sync(&cfg, cfg.policy("projects").unwrap(), &|_, _| {})).unwrap();
        report.into_iter().next().unwrap().replicas.into_iter().next().unwrap().1
    }

    pub(crate) fn src(&self) -> PathBuf {
        self.origin.mountpoint("projects")
    }

    fn dst(&self) -> PathBuf {
        self.replica.mountpoint("backup/projects")
    }
}

pub(crate) fn fill_small(dir: &std::path::Path, seed: u64) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    write_random(&dir.join("data.bin"), 4 << 20, seed);
    for i in 0..20 {
        std::fs::write(dir.join(format!("sub/f{i}.txt")), format!("file {i} seed {seed}\n").repeat(40)).unwrap();
    }
}

#[test]
fn zfs_full_then_incremental_and_read_only() {
    if !have_zfs("zfs_full_then_incremental_and_read_only") {
        return;
    }
    let _serial = one_at_a_time();
    let l = Local::new("zfs_full_incr");
    fill_small(&l.src(), 1);
    let first = l.sync().unwrap();
    assert_eq!(first.base, None);
    std::fs::write(l.src().join("sub/f3.txt"), "changed").unwrap();
    std::fs::remove_file(l.src().join("sub/f4.txt")).unwrap();
    let second = l.sync().unwrap();
    assert_eq!(second.base.as_deref(), Some(first.snapshot.as_str()));
    assert!(second.bytes * 20 < first.bytes, "incremental {} vs full {}", second.bytes, first.bytes);

    // Same snapshots, same guids on both sides; the replica's data is the origin's.
    let (o, r) = (l.origin.snapshot_props(&l.src_ds, "guid"), l.replica.snapshot_props(&l.dst_ds, "guid"));
    assert_eq!(o, r);
    assert_eq!(r.len(), 2);
    assert_same_tree(&l.src(), &l.dst());
    // Read-only: checked by writing (zfs-fuse reports the property unreliably).
    assert!(std::fs::write(l.dst().join("intruder"), "x").is_err(), "the replica is writable");
}

#[test]
fn zfs_bases_after_deletions_and_holds() {
    if !have_zfs("zfs_bases_after_deletions_and_holds") {
        return;
    }
    let _serial = one_at_a_time();
    let l = Local::new("zfs_bases");
    fill_small(&l.src(), 2);
    let s1 = l.sync().unwrap();
    std::fs::write(l.src().join("a"), "a").unwrap();
    let s2 = l.sync().unwrap();
    // The common base is held on the origin: it cannot be destroyed by accident.
    let refs = l.origin.snapshot_props(&l.src_ds, "userrefs");
    assert_eq!(refs.iter().find(|(n, _)| *n == s2.snapshot).map(|(_, v)| v.as_str()), Some("1"), "{refs:?}");
    assert_eq!(refs.iter().find(|(n, _)| *n == s1.snapshot).map(|(_, v)| v.as_str()), Some("0"), "the old base's hold was not released: {refs:?}");
    let destroy = std::process::Command::new("zfs").arg("destroy").arg(format!("{}@{}", l.src_ds, s2.snapshot)).output().unwrap();
    assert!(!destroy.status.success(), "a held base was destroyed");

    // The replica's newest deleted: the next sync uses the older base.
    run(std::process::Command::new("zfs").arg("destroy").arg(format!("{}@{}", l.dst_ds, s2.snapshot)));
    std::fs::write(l.src().join("b"), "b").unwrap();
    let s3 = l.sync().unwrap();
    assert_eq!(s3.base.as_deref(), Some(s1.snapshot.as_str()));
    assert_same_tree(&l.src(), &l.dst());

    // Every replica snapshot gone (the dataset kept): a full send again.
    for (name, _) in l.replica.snapshot_props(&l.dst_ds, "guid") {
        run(std::process::Command::new("zfs").arg("destroy").arg(format!("{}@{name}", l.dst_ds)));
    }
    std::fs::write(l.src().join("c"), "c").unwrap();
    let s4 = l.sync().unwrap();
    assert_eq!(s4.base, None);
    assert_same_tree(&l.src(), &l.dst());
}

#[test]
fn zfs_kill_mid_receive_leaves_nothing() {
    if !have_zfs("zfs_kill_mid_receive_leaves_nothing") {
        return;
    }
    let _serial = one_at_a_time();
    let l = Local::new("zfs_kill");
    fill_small(&l.src(), 3);
    let first = l.sync().unwrap();
    write_random(&l.src().join("more.bin"), 48 << 20, 4);
    sync_killed_mid_transfer(&l.config_path, "projects", 8 << 20, &l.scratch);
    wait_for_no_process(&format!("zfs receive.*{}", l.dst_ds));
    let names: Vec<String> = l.replica.snapshot_props(&l.dst_ds, "guid").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, std::slice::from_ref(&first.snapshot), "a partial receive became a snapshot");
    let next = l.sync().unwrap();
    assert_eq!(next.base.as_deref(), Some(first.snapshot.as_str()));
    assert_same_tree(&l.src(), &l.dst());
}

#[test]
fn zfs_over_quic() {
    if !have_zfs("zfs_over_quic") {
        return;
    }
    let _serial = one_at_a_time();
    let mut c = Cluster::new("zfs_quic", &["alpha", "beta"]);
    let (pa, pb) = (ZfsPool::new(&c.scratch, "pa", 256), ZfsPool::new(&c.scratch, "pb", 256));
    let src_ds = pa.dataset("db");
    let dst_ds = format!("{}/replicas/db", pb.name);
    let p = format!(
        "fileset: db\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {dst_ds}\n"
    );
    c.configure("alpha", &[("db", p.clone())]);
    c.configure("beta", &[("db", p)]);
    c.start("beta");
    fill_small(&pa.mountpoint("db"), 5);
    let out = c.sync_ok("alpha", "db");
    assert!(out.contains("-> beta: full"), "{out}");
    std::fs::write(pa.mountpoint("db").join("new"), "n").unwrap();
    let out = c.sync_ok("alpha", "db");
    assert!(out.contains("-> beta: incremental"), "{out}");
    assert_eq!(pa.snapshot_props(&src_ds, "guid"), pb.snapshot_props(&dst_ds, "guid"));
    assert_same_tree(&pa.mountpoint("db"), &pb.mountpoint("replicas/db"));
    c.stop("beta");
}

#[test]
fn zfs_replica_refuses_a_stream_carrying_properties() {
    if !have_zfs("zfs_replica_refuses_a_stream_carrying_properties") {
        return;
    }
    let _serial = one_at_a_time();
    use snapship::snapshot::{Incoming, ReplicaSide, SnapshotName, zfs::ZfsReplica};
    let zfs = |args: &[&str]| run(std::process::Command::new("zfs").args(args)).stdout;
    let scratch = Scratch::new("zfs_refuses_props");
    let (origin, replica) = (ZfsPool::new(&scratch, "o", 128), ZfsPool::new(&scratch, "r", 128));
    let src = origin.dataset("projects");
    fill_small(&origin.mountpoint("projects"), 3);
    let (name, later) = ("snapship-20260101T000000.000Z", "snapship-20260101T010000.000Z");
    zfs(&["snapshot", &format!("{src}@{name}")]);
    zfs(&["snapshot", &format!("{src}@{later}")]);
    let guid = origin.snapshot_props(&src, "guid").into_iter().find(|(n, _)| n == name).unwrap().1;
    // A hostile origin: the properties in its streams would mount the replica outside its
    // pool (here where the origin's file set was mounted when it sent them).
    let elsewhere = scratch.dir.join("elsewhere");
    zfs(&["set", &format!("mountpoint={}", elsewhere.display()), &src]);
    let (with_props, replication, plain) =
        (zfs(&["send", "-p", &format!("{src}@{name}")]), zfs(&["send", "-R", &format!("{src}@{name}")]), zfs(&["send", &format!("{src}@{name}")]));
    // A package (`send -I`: a compound header without payload, then substreams) with the
    // properties stream nested as its substream: its first record passes.
    let package = zfs(&["send", "-I", &format!("{src}@{name}"), &format!("{src}@{later}")]);
    let nested = [&package[..624], &with_props[..], &package[package.len() - 312..]].concat();
    zfs(&["inherit", "mountpoint", &src]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let incoming = Incoming { name: SnapshotName::parse(name).unwrap(), identity: guid.clone(), base: None, from_token: false, fetched: false };
    let dst = format!("{}/backup/projects", replica.name);
    let side = ZfsReplica::new(dst.clone());
    let mountpoint_of = |ds: &str| String::from_utf8_lossy(&zfs(&["get", "-H", "-o", "value,source", "mountpoint", ds])).trim().to_string();
    for (flag, stream) in [("-p", &with_props), ("-R", &replication)] {
        let err = rt.block_on(side.receive(&incoming, &mut &stream[..])).unwrap_err();
        assert!(format!("{err:#}").contains("refused a ZFS replication stream"), "zfs send {flag}: {err:#}");
        // Nothing happened on the replica: not even the parent was created.
        assert!(replica.snapshot_props(&dst, "guid").is_empty());
        assert!(std::process::Command::new("zfs").args(["list", &format!("{}/backup", replica.name)]).output().unwrap().status.code() != Some(0));
    }
    // The same snapshot without properties is received, mounted where the replica says.
    let got = rt.block_on(side.receive(&incoming, &mut &plain[..])).unwrap();
    assert_eq!(got.identity, guid);
    assert_same_tree(&origin.mountpoint("projects"), &replica.mountpoint("backup/projects"));
    assert!(mountpoint_of(&dst).starts_with(&format!("{}\tinherited", replica.mountpoint("backup/projects").display())), "{}", mountpoint_of(&dst));
    // A package where a full stream was announced is refused at its first record: nothing
    // reaches zfs receive. (One from a base the replica holds goes to zfs receive; without
    // `-x` (zfs-fuse) the replica puts the stream's properties back right after, and undoes
    // whatever it brought besides snapship snapshots between its ends.)
    let nested_dst = format!("{}/backup/nested", replica.name);
    let err = rt.block_on(ZfsReplica::new(nested_dst.clone()).receive(&incoming, &mut &nested[..])).unwrap_err();
    assert!(format!("{err:#}").contains("a package of several snapshots (zfs send -I) where a full stream was announced"), "{err:#}");
    assert!(std::process::Command::new("zfs").args(["list", &nested_dst]).output().unwrap().status.code() != Some(0), "{nested_dst} was made");
}

#[test]
fn zfs_feature_detection_on_the_live_zfs_fuse() {
    if !have_zfs("zfs_feature_detection_on_the_live_zfs_fuse") {
        return;
    }
    let _serial = one_at_a_time();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(snapship::snapshot::zfs::features()).clone();
    // zfs-fuse 0.7: holds, and none of the modern paths.
    assert!(f.holds && !f.resumable && !f.bookmarks && !f.compressed_send && !f.multi_snapshot && !f.written, "{f:?}");
}

#[test]
fn zfs_broken_policy_is_named_precisely() {
    let s = Scratch::new("zfs_broken_policy");
    let policy = "fileset: db\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: /tank/db\nreplicas:\n  - node: alpha\n    path: backup/db\n";
    let cfg = single_node_config(&s, "alpha", &[("db", policy.to_string())]);
    let out = snapship().arg("check").arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("db.yaml:7:3: key `origin.path`") && err.contains("not a ZFS dataset name"), "{err}");
}

/// Two datasets in one consistency group, and a third outside it.
fn group_setup(test: &str) -> (Scratch, ZfsPool, ZfsPool, std::path::PathBuf) {
    let scratch = Scratch::new(test);
    let origin = ZfsPool::new(&scratch, "o", 256);
    let replica = ZfsPool::new(&scratch, "r", 256);
    let mut policies = Vec::new();
    for (name, group) in [("db", Some("app")), ("files", Some("app")), ("other", None)] {
        let ds = origin.dataset(&format!("srv/{name}"));
        std::fs::write(origin.mountpoint(&format!("srv/{name}")).join("f"), name).unwrap();
        let mut p = format!(
            "fileset: {name}\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {ds}\nreplicas:\n  - node: alpha\n    path: {}/{name}\n",
            replica.name
        );
        if let Some(g) = group {
            p += &format!("group: {g}\n");
        }
        policies.push((name, p));
    }
    let cfg = single_node_config(&scratch, "alpha", &policies.iter().map(|(n, p)| (*n, p.clone())).collect::<Vec<_>>());
    (scratch, origin, replica, cfg)
}

fn createtxg(pool: &ZfsPool, ds: &str) -> Vec<(String, String)> {
    pool.snapshot_props(ds, "createtxg")
}

#[test]
fn zfs_consistency_group_snapshots_share_one_txg() {
    if !have_zfs("zfs_consistency_group_snapshots_share_one_txg") {
        return;
    }
    let _serial = one_at_a_time();
    let (_s, origin, replica, cfg) = group_setup("zfs_group_sync");
    let out = run(snapship().args(["sync", "--config"]).arg(&cfg).arg("db"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("db: ") && text.contains("files: "), "both members ship: {text}");
    let (db, files) = (createtxg(&origin, &format!("{}/srv/db", origin.name)), createtxg(&origin, &format!("{}/srv/files", origin.name)));
    assert_eq!(db.len(), 1);
    assert_eq!(db, files, "one name and one creation txg for the group");
    // Nothing outside the group was snapshotted (zfs-fuse needs `snapshot -r` on the parent).
    assert!(createtxg(&origin, &format!("{}/srv/other", origin.name)).is_empty());
    assert!(createtxg(&origin, &format!("{}/srv", origin.name)).is_empty());
    assert_eq!(replica.snapshot_props(&format!("{}/db", replica.name), "guid").len(), 1);
    assert_eq!(replica.snapshot_props(&format!("{}/files", replica.name), "guid").len(), 1);
}

#[test]
fn zfs_consistency_group_in_the_daemon() {
    if !have_zfs("zfs_consistency_group_in_the_daemon") {
        return;
    }
    let _serial = one_at_a_time();
    let (s, origin, replica, cfg) = group_setup("zfs_group_run");
    // A cron of every 2 s on both members: the group leader alone fires, for both.
    let pdir = s.dir.join("policies");
    for name in ["db", "files"] {
        let p = pdir.join(format!("{name}.yaml"));
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("\"@hourly\"", "\"*/2 * * * * *\"")).unwrap();
    }
    let mut d = Daemon::start(&cfg, &s.dir.join("run.log"), " running ");
    let (db_ds, files_ds) = (format!("{}/srv/db", origin.name), format!("{}/srv/files", origin.name));
    let deadline = Instant::now() + Duration::from_secs(30);
    while replica.snapshot_props(&format!("{}/files", replica.name), "guid").len() < 2 {
        assert!(Instant::now() < deadline, "the group's snapshots never reached the replica:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A sync through the daemon covers the whole group too.
    let out = snapship().args(["sync", "--config"]).arg(&cfg).arg("files").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}\n{}", String::from_utf8_lossy(&out.stderr), d.log_text());
    assert!(text.contains("db: ") && text.contains("files: "), "{text}");
    assert!(d.stop().unwrap().success());
    let (db, files) = (createtxg(&origin, &db_ds), createtxg(&origin, &files_ds));
    assert!(db.len() >= 3, "{db:?}");
    assert_eq!(db, files, "every group snapshot shares one name and txg");
}
