//! Getting data back on real filesystems: `restore --at` at each boundary (exactly at a
//! snapshot, between two, before the first) with the copy's tree equal to the snapshot's;
//! `--path` of one file keeping mode, owner, times and xattrs, and of a directory; the
//! refusals (an existing target, one inside the live file set, an unknown name); `list` on
//! a replica without a daemon, and on the origin with a replica down; a ZFS clone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::cluster::*;
use crate::common::*;

/// One node, one btrfs: `projects` with a replica on the same node, and a `restores`
/// directory beside them.
struct Fixture {
    fs: LoopBtrfs,
    config: PathBuf,
    source: PathBuf,
    snapdir: PathBuf,
    restores: PathBuf,
    _scratch: Scratch,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let scratch = Scratch::new(test);
        let fs = LoopBtrfs::new(&scratch, "fs", 300);
        let source = fs.subvolume("projects");
        let replica = fs.mnt.join("backup/projects");
        let config = single_node_config(&scratch, "alpha", &[("projects", local_policy("projects", "alpha", &source, &replica))]);
        let snapdir = fs.mnt.join(".snapship/projects");
        let restores = fs.mnt.join("restores");
        std::fs::create_dir_all(&restores).unwrap();
        Fixture { fs, config, source, snapdir, restores, _scratch: scratch }
    }

    /// `snapship sync`; returns the new snapshot's name.
    fn sync(&self) -> String {
        let before = visible(&self.snapdir_or_empty());
        let out = snapship().args(["sync", "--config"]).arg(&self.config).arg("projects").output().unwrap();
        assert!(out.status.success(), "sync failed: {}", String::from_utf8_lossy(&out.stderr));
        visible(&self.snapdir).into_iter().find(|n| !before.contains(n)).expect("a new snapshot")
    }

    fn snapdir_or_empty(&self) -> PathBuf {
        std::fs::create_dir_all(&self.snapdir).unwrap();
        self.snapdir.clone()
    }

    fn restore(&self, args: &[&str]) -> Output {
        snapship().args(["restore", "--config"]).arg(&self.config).arg("projects").args(args).output().unwrap()
    }
}

fn ok(out: Output) -> String {
    let t = text(&out);
    assert!(out.status.success(), "restore failed:\n{t}");
    t
}

/// The time in a snapshot name, as RFC 3339 with milliseconds, moved by `ms`.
fn time_of(name: &str, ms: i64) -> chrono::DateTime<chrono::Utc> {
    let stamp = name.trim_start_matches("snapship-").trim_end_matches("-c");
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ").unwrap().and_utc() + chrono::Duration::milliseconds(ms)
}

#[test]
fn restore_at_picks_the_snapshot_at_each_boundary() {
    require_root!();
    let f = Fixture::new("restore_at");
    std::fs::create_dir_all(f.source.join("docs")).unwrap();
    write_random(&f.source.join("big.bin"), 2 << 20, 1);
    std::fs::write(f.source.join("docs/a.txt"), "first").unwrap();
    let s1 = f.sync();
    std::fs::write(f.source.join("docs/a.txt"), "second").unwrap();
    std::fs::write(f.source.join("docs/b.txt"), "new in second").unwrap();
    let s2 = f.sync();
    std::fs::remove_file(f.source.join("docs/b.txt")).unwrap();
    write_random(&f.source.join("big.bin"), 2 << 20, 3);
    let s3 = f.sync();
    let live = tree(&f.source);

    // Exactly at s2 (RFC 3339): s2.
    let to = f.restores.join("exact");
    let at = time_of(&s2, 0).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = ok(f.restore(&["--at", &at, "--to", to.to_str().unwrap()]));
    assert!(out.contains(&format!("snapshot {s2}")) && out.contains(to.to_str().unwrap()), "{out}");
    assert_same_tree(&f.snapdir.join(&s2), &to);
    // A writable copy, a subvolume of its own.
    assert!(!subvol(&to).read_only);
    std::fs::write(to.join("docs/edited"), "x").unwrap();

    // Between s2 and s3 (the UTC form without offset, a millisecond before s3): s2.
    let to = f.restores.join("between");
    let at = time_of(&s3, -1).format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let out = ok(f.restore(&["--at", &at, "--to", to.to_str().unwrap()]));
    assert!(out.contains(&format!("snapshot {s2}")), "{out}");
    assert_same_tree(&f.snapdir.join(&s2), &to);

    // At s1 and `now`.
    let to = f.restores.join("first");
    ok(f.restore(&["--at", &time_of(&s1, 0).to_rfc3339(), "--to", to.to_str().unwrap()]));
    assert_same_tree(&f.snapdir.join(&s1), &to);
    assert_eq!(std::fs::read_to_string(to.join("docs/a.txt")).unwrap(), "first");
    let to = f.restores.join("now");
    let out = ok(f.restore(&["--at", "now", "--to", to.to_str().unwrap()]));
    assert!(out.contains(&format!("snapshot {s3}")), "{out}");
    assert_same_tree(&f.snapdir.join(&s3), &to);

    // Before the first: a clear error naming the oldest held; nothing made.
    let to = f.restores.join("before");
    let out = f.restore(&["--at", &time_of(&s1, -1).to_rfc3339(), "--to", to.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&format!("the oldest this node holds is {s1}")), "{}", text(&out));
    assert!(!to.exists());

    // Refusals: an existing target, one inside the live file set, an unknown name, bad time.
    let out = f.restore(&["--at", "now", "--to", f.restores.join("exact").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("already exists"), "{}", text(&out));
    let out = f.restore(&["--at", "now", "--to", f.source.join("restored-here").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("inside the live file set"), "{}", text(&out));
    let out = f.restore(&["--at", "now", "--to", f.fs.mnt.join("backup/projects/x").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("inside the replica directory"), "{}", text(&out));
    let typo = format!("{}x", s2);
    let out = f.restore(&["--snapshot", &typo, "--to", f.restores.join("typo").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("nearest it holds") && text(&out).contains(&s2), "{}", text(&out));
    let out = f.restore(&["--at", "last tuesday", "--to", f.restores.join("bad").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("2h ago"), "{}", text(&out));
    // By name.
    let to = f.restores.join("named");
    ok(f.restore(&["--snapshot", &s1, "--to", to.to_str().unwrap()]));
    assert_same_tree(&f.snapdir.join(&s1), &to);

    // The live file set was never touched.
    assert_eq!(tree(&f.source), live);
}

#[test]
fn restore_path_keeps_mode_owner_times_and_xattrs() {
    require_root!();
    let f = Fixture::new("restore_path");
    let file = f.source.join("docs/secret.txt");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "the original").unwrap();
    std::fs::write(f.source.join("docs/other.txt"), "other").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&file, Some(1234), Some(5678)).unwrap();
    rustix::fs::setxattr(&file, "user.note", b"kept", rustix::fs::XattrFlags::empty()).unwrap();
    run(Command::new("touch").arg("-h").arg("-d").arg("2024-02-03 04:05:06.5 UTC").arg(&file));
    let meta = std::fs::symlink_metadata(&file).unwrap();
    // A link out of the file set (an origin's data may hold anything).
    std::os::unix::fs::symlink("/etc", f.source.join("outside")).unwrap();
    let snap = f.sync();

    // The live file changes and goes away; the snapshot's copy comes back.
    std::fs::write(&file, "overwritten").unwrap();
    std::fs::remove_file(&file).unwrap();

    let to = f.restores.join("secret.txt");
    let out = ok(f.restore(&["--snapshot", &snap, "--path", "docs/secret.txt", "--to", to.to_str().unwrap()]));
    assert!(out.contains("docs/secret.txt") && out.contains(&snap), "{out}");
    let got = std::fs::symlink_metadata(&to).unwrap();
    assert_eq!(std::fs::read_to_string(&to).unwrap(), "the original");
    assert_eq!(got.permissions().mode() & 0o7777, 0o640);
    assert_eq!((got.uid(), got.gid()), (1234, 5678));
    assert_eq!((got.mtime(), got.mtime_nsec()), (meta.mtime(), meta.mtime_nsec()));
    assert_eq!((got.atime(), got.atime_nsec()), (meta.atime(), meta.atime_nsec()));
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&to, "user.note", &mut buf[..]).expect("the xattr on the copy");
    assert_eq!(&buf[..n], b"kept");

    // A directory, named by its live path: the snapshot's directory, whole.
    let to = f.restores.join("docs");
    ok(f.restore(&["--at", "now", "--path", f.source.join("docs").to_str().unwrap(), "--to", to.to_str().unwrap()]));
    assert_same_tree(&f.snapdir.join(&snap).join("docs"), &to);

    // What is not in the snapshot, and what leaves it.
    let out = f.restore(&["--at", "now", "--path", "docs/never.txt", "--to", f.restores.join("never").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("is not in snapshot"), "{}", text(&out));
    let out = f.restore(&["--at", "now", "--path", "../x", "--to", f.restores.join("up").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("leaves the file set"), "{}", text(&out));
    let out = f.restore(&["--at", "now", "--path", "outside/hostname", "--to", f.restores.join("escaped").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("leads out of snapshot"), "{}", text(&out));
    assert!(!f.restores.join("escaped").exists());
    // The link itself is restored as a link.
    let to = f.restores.join("outside");
    ok(f.restore(&["--at", "now", "--path", "outside", "--to", to.to_str().unwrap()]));
    assert_eq!(std::fs::read_link(&to).unwrap(), Path::new("/etc"));
}

/// Snapshot names in `list`'s rows.
fn listed(out: &str) -> Vec<String> {
    out.lines().filter_map(|l| l.split_whitespace().next()).filter(|w| w.starts_with("snapship-")).map(String::from).collect()
}

/// `list`'s marks in each row, in column order (origin first).
fn marks(out: &str, columns: usize) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| l.starts_with("snapship-"))
        .map(|row| {
            let mut m: Vec<String> = row.split_whitespace().rev().take(columns).map(String::from).collect();
            m.reverse();
            m
        })
        .collect()
}

#[test]
fn list_on_a_replica_without_a_daemon() {
    require_root!();
    let mut c = Cluster::with_size("restore_list", &["alpha", "beta", "gamma"], 300);
    let src = c.fs["alpha"].subvolume("projects");
    let (bdst, gdst) = (c.mnt("beta").join("backup/projects"), c.mnt("gamma").join("backup/projects"));
    let p = policy("projects", "alpha", &src, &[("beta", bdst.clone()), ("gamma", gdst)]);
    let alpha = c.configure("alpha", &[("projects", p.clone())]);
    let beta = c.configure("beta", &[("projects", p.clone())]);
    c.configure("gamma", &[("projects", p)]);
    c.start("beta");
    c.start("gamma");
    std::fs::write(src.join("a"), "a").unwrap();
    c.sync_ok("alpha", "projects");
    std::fs::write(src.join("b"), "b").unwrap();
    c.sync_ok("alpha", "projects");
    let held = snapshots(&bdst);
    assert_eq!(held.len(), 2);
    let list = |config: &Path| {
        let out = snapship().args(["list", "--config"]).arg(config).arg("projects").output().unwrap();
        (out.status.success(), text(&out))
    };

    // The origin, with the replicas' daemons up: every column known.
    let (ok, t) = list(&alpha);
    assert!(ok, "{t}");
    assert_eq!(listed(&t), held, "{t}");
    assert!(t.contains("scheduled") && t.contains("alpha (origin)"), "{t}");
    assert!(marks(&t, 3).iter().all(|m| m == &["x", "x", "x"]), "{t}");
    c.stop("beta");
    c.stop("gamma");

    // beta without a daemon, its origin's running: its own snapshots, the origin's (asked
    // over QUIC), and `?` for gamma, which only answers its origin.
    c.start("alpha");
    let (ok, t) = list(&beta);
    assert!(ok, "{t}");
    assert_eq!(listed(&t), held, "{t}");
    assert!(marks(&t, 3).iter().all(|m| m == &["x", "x", "?"]), "{t}");
    assert!(t.contains("gamma: not asked: members answer only their origin"), "{t}");

    // The origin gone too: beta still shows what it holds, says why alpha is unknown, and
    // exits non-zero.
    c.stop("alpha");
    let (ok, t) = list(&beta);
    assert!(!ok, "{t}");
    assert_eq!(listed(&t), held, "{t}");
    assert!(marks(&t, 3).iter().all(|m| m == &["?", "x", "?"]), "{t}");
    assert!(t.contains("alpha (origin): cannot list") && t.contains("could not list alpha (origin)"), "{t}");

    // A replica can restore what it holds, too.
    let to = c.mnt("beta").join("restored");
    let out = snapship().args(["restore", "--config"]).arg(&beta).args(["projects", "--at", "now", "--to"]).arg(&to).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_same_tree(&bdst.join(&held[1]), &to);

    // The origin with its replicas down: it says which members and why, and exits non-zero.
    let (ok, t) = list(&alpha);
    assert!(!ok, "{t}");
    assert!(t.contains("beta: cannot list") && t.contains("gamma: cannot list") && t.contains("could not list beta, gamma"), "{t}");
    assert_eq!(listed(&t), held, "the origin's own snapshots are still shown: {t}");
}

#[test]
fn zfs_restore_clones_the_snapshot_at_a_time() {
    if !have_zfs("zfs_restore_clones_the_snapshot_at_a_time") {
        return;
    }
    let _serial = crate::zfs::one_at_a_time();
    let l = crate::zfs::Local::new("zfs_restore");
    crate::zfs::fill_small(&l.src(), 1);
    let first = l.sync().unwrap();
    let then = tree(&l.src());
    std::fs::write(l.src().join("sub/f3.txt"), "changed").unwrap();
    let second = l.sync().unwrap();
    assert_ne!(first.snapshot, second.snapshot);

    let restore = |args: &[&str]| snapship().args(["restore", "--config"]).arg(&l.config_path).arg("projects").args(args).output().unwrap();
    let target = format!("{}/restored", l.origin.name);
    let at = time_of(&second.snapshot, -1).to_rfc3339();
    let out = restore(&["--at", &at, "--to", &target]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("snapshot {}", first.snapshot)), "{}", text(&out));
    let mnt = l.origin.mountpoint("restored");
    assert_eq!(tree(&mnt), then);
    std::fs::write(mnt.join("writable"), "yes").expect("the clone is writable");

    // Taken, inside the live dataset, a path instead of a dataset: refused.
    for (to, why) in [(target.as_str(), "already exists"), (&format!("{}/x", l.src_ds), "inside the live file set"), ("/tmp/x", "names the new dataset")] {
        let out = restore(&["--at", "now", "--to", to]);
        assert!(!out.status.success() && text(&out).contains(why), "{to}: {}", text(&out));
    }

    // list shows sizes from ZFS.
    let out = snapship().args(["list", "--config"]).arg(&l.config_path).arg("projects").output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let row = t.lines().find(|r| r.starts_with(&first.snapshot)).unwrap_or_else(|| panic!("{t}"));
    assert!(row.contains("iB/") || row.contains(" B/"), "a used/referenced size: {row}");
}

/// `restore --in-place` on ZFS: the live dataset holds the chosen snapshot's content and
/// history (a promoted clone under the live name, writable); everything it held (the later
/// snapshots, the live state as `@before-restore-TIME`) is kept in the read-only dataset
/// `DATASET.before-restore-TIME`; nothing is destroyed. The next sync ships incrementally
/// from the chosen snapshot, and the replica keeps the later one as diverged data. A restore
/// that cannot unmount the live dataset (a process works in it) changes nothing.
#[test]
fn zfs_restore_in_place_swaps_in_a_promoted_clone_and_keeps_everything() {
    if !have_zfs("zfs_restore_in_place_swaps_in_a_promoted_clone_and_keeps_everything") {
        return;
    }
    let _serial = crate::zfs::one_at_a_time();
    let l = crate::zfs::Local::new("zfs_in_place");
    crate::zfs::fill_small(&l.src(), 2);
    let first = l.sync().unwrap();
    let then = tree(&l.src());
    std::fs::write(l.src().join("sub/f3.txt"), "changed").unwrap();
    std::fs::write(l.src().join("new.txt"), "after the first").unwrap();
    let second = l.sync().unwrap();
    std::fs::write(l.src().join("live-only.txt"), "in no snapshot").unwrap();
    let zfs = |args: &[&str]| String::from_utf8_lossy(&run(std::process::Command::new("zfs").args(args)).stdout).trim().to_string();
    let names = |ds: &str| l.origin.snapshot_props(ds, "createtxg").into_iter().map(|(n, _)| n).collect::<Vec<_>>();

    let in_place =
        || snapship().args(["restore", "--config"]).arg(&l.config_path).args(["projects", "--snapshot", &first.snapshot, "--in-place"]).output().unwrap();
    let datasets = || zfs(&["list", "-H", "-o", "name", "-r", &l.origin.name]);
    let before = datasets();

    // A process working in the live dataset: it cannot be unmounted, and the restore undoes
    // what it did (the promote reversed, its clone and snapshot destroyed): nothing changed.
    let mut busy = std::process::Command::new("sleep").arg("120").current_dir(l.src()).spawn().unwrap();
    let out = in_place();
    busy.kill().unwrap();
    busy.wait().unwrap();
    assert!(!out.status.success() && text(&out).contains("nothing changed") && text(&out).contains("cannot unmount"), "{}", text(&out));
    assert_eq!(names(&l.src_ds), [first.snapshot.as_str(), second.snapshot.as_str()]);
    assert_eq!(datasets(), before);
    assert_eq!(std::fs::read_to_string(l.src().join("live-only.txt")).unwrap(), "in no snapshot");

    let out = in_place();
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("{}", text(&out));
    let kept = text(&out).split("kept read-only at ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("{}", text(&out))).to_string();
    assert!(kept.starts_with(&format!("{}.before-restore-", l.src_ds)), "{kept}");
    assert!(text(&out).contains(&format!("zfs destroy -r {kept}")), "{}", text(&out));
    // The live dataset: the first snapshot's tree and history, writable.
    assert_eq!(tree(&l.src()), then);
    assert_eq!(names(&l.src_ds), [first.snapshot.as_str()]);
    std::fs::write(l.src().join("sub/f1.txt"), "written after the restore").expect("the restored dataset is writable");
    write_random(&l.src().join("after-restore.bin"), 64 << 10, 3);
    // Everything it held is kept, read-only: the second snapshot and the live state.
    let kept_names = names(&kept);
    assert_eq!(kept_names[0], second.snapshot, "{kept_names:?}");
    assert!(kept_names.len() == 2 && kept_names[1].starts_with("before-restore-"), "{kept_names:?}");
    let kept_mnt = std::path::PathBuf::from(zfs(&["get", "-H", "-o", "value", "mountpoint", &kept]));
    assert_eq!(std::fs::read_to_string(kept_mnt.join("live-only.txt")).unwrap(), "in no snapshot");
    assert_eq!(std::fs::read_to_string(kept_mnt.join("new.txt")).unwrap(), "after the first");
    assert!(std::fs::write(kept_mnt.join("probe"), "x").is_err(), "the kept state is writable");

    // The next sync goes from the first snapshot; the replica keeps the second as diverged.
    // (The replica's recorded base is the second, so the sync snapshots only once zfs-fuse
    // shows the writes in `referenced`, which lags them by a transaction group.)
    let referenced = |ds: &str| zfs(&["get", "-H", "-p", "-o", "value", "referenced", ds]);
    let at_first = format!("{}@{}", l.src_ds, first.snapshot);
    wait_for(std::time::Duration::from_secs(60), "the writes in `referenced`", || referenced(&l.src_ds) != referenced(&at_first));
    let third = l.sync().unwrap();
    assert_eq!(third.base.as_deref(), Some(first.snapshot.as_str()), "{third:?}");
    let held: Vec<String> = l.replica.snapshot_props(&l.dst_ds, "createtxg").into_iter().map(|(n, _)| n).collect();
    assert_eq!(held, [first.snapshot.as_str(), third.snapshot.as_str()]);
    let datasets = zfs(&["list", "-H", "-o", "name", "-r", &l.replica.name]);
    let aside = datasets.lines().find(|d| d.starts_with(&format!("{}-diverged-", l.dst_ds))).unwrap_or_else(|| panic!("nothing set aside: {datasets}"));
    assert_eq!(l.replica.snapshot_props(aside, "createtxg").into_iter().map(|(n, _)| n).collect::<Vec<_>>(), [second.snapshot.as_str()]);
    assert_same_tree(&l.src(), &l.replica.mountpoint("backup/projects"));
}

/// `restore --in-place` on the origin: the live subvolume holds the chosen snapshot's content
/// (still a writable subvolume at the path the policy names), the state before is kept
/// read-only beside it (writes no snapshot held included), outside retention and `list`, and
/// the next sync ships from the kept bases. Refused, changing nothing, while another snapship
/// process holds the state_dir (a running daemon).
#[test]
fn restore_in_place_replaces_the_live_file_set_and_keeps_what_it_held() {
    require_root!();
    let f = Fixture::new("restore_in_place");
    std::fs::write(f.source.join("a.txt"), "first").unwrap();
    let s1 = f.sync();
    std::fs::write(f.source.join("a.txt"), "second").unwrap();
    std::fs::write(f.source.join("new.txt"), "after s1").unwrap();
    f.sync();
    std::fs::write(f.source.join("live-only.txt"), "in no snapshot").unwrap();

    // A daemon (here: its lock) using the state_dir: refused, nothing changed.
    let lock = std::fs::File::create(f.config.parent().unwrap().join("state/daemon.lock")).unwrap();
    lock.lock().unwrap();
    let out = f.restore(&["--snapshot", &s1, "--in-place"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("stop it first") && text(&out).contains("nothing changed"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(f.source.join("live-only.txt")).unwrap(), "in no snapshot");
    drop(lock);

    let parent = f.source.parent().unwrap().to_path_buf();
    let before: Vec<String> = visible(&parent);
    let shown = ok(f.restore(&["--snapshot", &s1, "--in-place"]));
    assert!(shown.contains(&format!("to snapshot {s1}")), "{shown}");
    assert_eq!(std::fs::read_to_string(f.source.join("a.txt")).unwrap(), "first");
    assert!(!f.source.join("new.txt").exists() && !f.source.join("live-only.txt").exists());
    let live = subvol(&f.source);
    assert!(!live.read_only, "the live file set stays writable");
    std::fs::write(f.source.join("writable.txt"), "yes").unwrap();

    let kept: Vec<String> = visible(&parent).into_iter().filter(|n| !before.contains(n)).collect();
    assert_eq!(kept.len(), 1, "one kept state beside the live file set: {kept:?}");
    assert!(kept[0].starts_with("projects.before-restore-"), "{kept:?}");
    let kept = parent.join(&kept[0]);
    assert!(shown.contains(&kept.display().to_string()), "the output says where the old state is:\n{shown}");
    assert!(subvol(&kept).read_only, "kept read-only");
    assert_eq!(std::fs::read_to_string(kept.join("live-only.txt")).unwrap(), "in no snapshot", "nothing the live file set held is lost");
    assert_eq!(std::fs::read_to_string(kept.join("a.txt")).unwrap(), "second");
    assert!(!std::fs::read_dir(&parent).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("snapship-restoring")), "no leftovers");

    // Replication goes on from the restored state; the kept state is no snapshot of snapship's.
    let s3 = f.sync();
    let replica = f.fs.mnt.join("backup/projects").join(&s3);
    assert_eq!(std::fs::read_to_string(replica.join("a.txt")).unwrap(), "first");
    assert_eq!(std::fs::read_to_string(replica.join("writable.txt")).unwrap(), "yes");
    let out = snapship().args(["list", "--config"]).arg(&f.config).arg("projects").output().unwrap();
    assert!(!text(&out).contains("before-restore"), "{}", text(&out));
    assert!(kept.exists());
}
