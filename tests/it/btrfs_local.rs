//! Local replication on real loop-mounted btrfs: full then incremental, bases found by
//! identity after deletions on either side, and a sync killed mid-receive.

use std::path::{Path, PathBuf};

use crate::common::*;
use snapship::config::{self, LoadedConfig};
use snapship::replicate::ReplicaReport;

struct Fixture {
    _origin_fs: LoopBtrfs,
    _replica_fs: LoopBtrfs,
    config_path: PathBuf,
    source: PathBuf,
    snapdir: PathBuf,
    replica: PathBuf,
    scratch: Scratch,
}

impl Fixture {
    fn new(test: &str, origin_mib: u64, replica_mib: u64) -> Fixture {
        let scratch = Scratch::new(test);
        let origin_fs = LoopBtrfs::new(&scratch, "origin", origin_mib);
        let replica_fs = LoopBtrfs::new(&scratch, "replica", replica_mib);
        let source = origin_fs.subvolume("projects");
        let replica = replica_fs.mnt.join("backup/projects");
        let config_path = single_node_config(&scratch, "alpha", &[("projects", local_policy("projects", "alpha", &source, &replica))]);
        let snapdir = origin_fs.mnt.join(".snapship/projects");
        Fixture { _origin_fs: origin_fs, _replica_fs: replica_fs, config_path, source, snapdir, replica, scratch }
    }

    fn config(&self) -> LoadedConfig {
        let loaded = config::load(&self.config_path).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded
    }

    /// One sync through the library; returns the single replica's report.
    fn sync(&self) -> ReplicaReport {
        let cfg = std::sync::Arc::new(self.config());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let report = rt.block_on(snapship::node::sync(&cfg, cfg.policy("projects").unwrap(), &|_, _| {})).unwrap();
        let (_, result) = report.into_iter().next().unwrap().replicas.into_iter().next().unwrap();
        result.unwrap()
    }

    /// Names of complete snapshots on the replica (what `ls` shows, minus `latest`).
    fn replica_snapshots(&self) -> Vec<String> {
        visible(&self.replica).into_iter().filter(|n| n != "latest").collect()
    }

    fn latest(&self) -> String {
        std::fs::read_link(self.replica.join("latest")).unwrap().to_string_lossy().into_owned()
    }

    /// Every replica snapshot is read-only, received from the origin snapshot of the same
    /// name, and identical to it in content.
    fn assert_replica_matches_origin(&self) {
        for name in self.replica_snapshots() {
            let (o, r) = (self.snapdir.join(&name), self.replica.join(&name));
            let (of, rf) = (subvol(&o), subvol(&r));
            assert!(rf.read_only, "{name} is writable on the replica");
            assert_eq!(rf.received.as_deref(), Some(of.uuid.as_str()), "{name}: received_uuid is not the origin's uuid");
            assert_same_tree(&o, &r);
        }
    }
}

fn write_files(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("docs/deep")).unwrap();
    write_random(&dir.join("big.bin"), 8 << 20, seed);
    for i in 0..50 {
        std::fs::write(dir.join(format!("docs/note-{i}.txt")), format!("note {i} seed {seed}\n").repeat(20)).unwrap();
    }
    std::fs::write(dir.join("docs/deep/readme"), "hello").unwrap();
    std::os::unix::fs::symlink("docs/deep/readme", dir.join("link")).unwrap();
}

#[test]
fn full_then_incremental() {
    require_root!();
    let f = Fixture::new("full_then_incremental", 512, 512);
    write_files(&f.source, 1);
    let first = f.sync();
    assert_eq!(first.base, None, "the first sync is a full send");
    assert!(first.bytes > 8 << 20, "a full stream carries the 8 MiB file: {} bytes", first.bytes);

    // A small change: one file rewritten, one added, one removed, one chmod.
    std::fs::write(f.source.join("docs/note-3.txt"), "changed\n").unwrap();
    std::fs::write(f.source.join("new.txt"), "new file\n").unwrap();
    std::fs::remove_file(f.source.join("docs/note-4.txt")).unwrap();
    std::fs::set_permissions(f.source.join("docs/deep/readme"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let second = f.sync();
    assert_eq!(second.base.as_deref(), Some(first.snapshot.as_str()), "the second sync is incremental from the first");
    assert!(second.bytes * 50 < first.bytes, "incremental {} bytes is not far smaller than full {}", second.bytes, first.bytes);

    assert_eq!(f.replica_snapshots(), [first.snapshot.clone(), second.snapshot.clone()]);
    f.assert_replica_matches_origin();
    // Received incrementally: the replica's second snapshot was made from its first.
    let (r1, r2) = (subvol(&f.replica.join(&first.snapshot)), subvol(&f.replica.join(&second.snapshot)));
    assert_eq!(r2.parent.as_deref(), Some(r1.uuid.as_str()));
    assert_eq!(f.latest(), second.snapshot);
    assert_same_tree(&f.source, &f.replica.join("latest"));
    // Nothing left in staging but the lock.
    assert_eq!(std::fs::read_dir(f.replica.join(".snapship-staging")).unwrap().count(), 1);
}

fn btrfs_delete(path: &Path) {
    run(std::process::Command::new("btrfs").arg("-q").arg("subvolume").arg("delete").arg(path));
}

#[test]
fn common_base_survives_deletions() {
    require_root!();
    let f = Fixture::new("common_base_survives_deletions", 512, 512);
    write_files(&f.source, 2);
    let s1 = f.sync();
    std::fs::write(f.source.join("a"), "a").unwrap();
    let s2 = f.sync();
    std::fs::write(f.source.join("b"), "b").unwrap();
    let s3 = f.sync();
    assert_eq!(s3.base.as_deref(), Some(s2.snapshot.as_str()));

    // The origin's newest snapshot deleted by hand: the replica still has it, but the
    // newest *common* one is now s2.
    btrfs_delete(&f.snapdir.join(&s3.snapshot));
    std::fs::write(f.source.join("c"), "c").unwrap();
    let s4 = f.sync();
    assert_eq!(s4.base.as_deref(), Some(s2.snapshot.as_str()));
    f.assert_replica_matches_origin_except(&[&s3.snapshot]);
    assert_eq!(f.latest(), s4.snapshot);

    // The replica's newest received snapshot deleted: an older base (s2) is used.
    btrfs_delete(&f.replica.join(&s4.snapshot));
    std::fs::write(f.source.join("d"), "d").unwrap();
    let s5 = f.sync();
    assert_eq!(s5.base.as_deref(), Some(s2.snapshot.as_str()));
    assert_same_tree(&f.source, &f.replica.join("latest"));

    // Every replica snapshot deleted: a full send.
    for name in f.replica_snapshots() {
        btrfs_delete(&f.replica.join(name));
    }
    std::fs::write(f.source.join("e"), "e").unwrap();
    let s6 = f.sync();
    assert_eq!(s6.base, None);
    assert!(s6.bytes > 8 << 20, "a full send again: {} bytes", s6.bytes);
    assert_eq!(f.replica_snapshots(), std::slice::from_ref(&s6.snapshot));
    assert_same_tree(&f.source, &f.replica.join("latest"));
    let _ = s1;
}

impl Fixture {
    fn assert_replica_matches_origin_except(&self, gone_on_origin: &[&str]) {
        for name in self.replica_snapshots() {
            if gone_on_origin.contains(&name.as_str()) {
                continue;
            }
            assert_same_tree(&self.snapdir.join(&name), &self.replica.join(&name));
        }
    }
}

#[test]
fn sigkill_mid_receive_leaves_nothing_partial() {
    require_root!();
    let f = Fixture::new("sigkill_mid_receive", 1024, 1024);
    write_files(&f.source, 3);
    let first = f.sync();

    // 64 MiB of new data; the stream stalls (test hook) after 16 MiB and we kill -9.
    write_random(&f.source.join("more.bin"), 64 << 20, 4);
    let staging = f.replica.join(".snapship-staging");
    sync_killed_mid_transfer(&f.config_path, "projects", 16 << 20, &f.scratch);
    wait_for_no_process(&format!("btrfs receive .*{}", staging.display()));
    // The interrupted receive left its partial subvolume, hidden in staging.
    assert!(std::fs::read_dir(&staging).unwrap().count() > 1, "nothing was being received");

    // Nothing partial is visible: only the first snapshot, and latest still points at it.
    assert_eq!(f.replica_snapshots(), std::slice::from_ref(&first.snapshot));
    assert_eq!(f.latest(), first.snapshot);
    f.assert_replica_matches_origin();

    // The next sync cleans up and succeeds, incremental from the first snapshot.
    let next = f.sync();
    assert_eq!(next.base.as_deref(), Some(first.snapshot.as_str()));
    assert_same_tree(&f.source, &f.replica.join("latest"));
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 1, "staging still holds leftovers");
    // The snapshot the killed sync took on the origin is not on the replica; the new one is.
    assert_eq!(f.replica_snapshots().len(), 2);
}

#[test]
fn cli_sync_prints_what_it_did() {
    require_root!();
    let f = Fixture::new("cli_sync", 512, 512);
    write_files(&f.source, 5);
    let out = run(snapship().args(["sync", "--config"]).arg(&f.config_path).arg("projects"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-> alpha: full"), "{text}");
    let out = run(snapship().args(["sync", "--config"]).arg(&f.config_path).arg("projects"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("-> alpha: incremental from snapship-"), "{text}");
    assert_same_tree(&f.source, &f.replica.join("latest"));

    // An unknown file set is a clear error and a non-zero exit.
    let out = snapship().args(["sync", "--config"]).arg(&f.config_path).arg("nope").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no file set `nope`"));
}
