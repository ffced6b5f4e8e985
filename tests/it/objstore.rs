//! Object-storage replicas against a real S3 store (Garage on loopback, see
//! common/garage.rs), on loop btrfs: a full then an incremental upload through `snapship
//! sync`; `list` showing what the store holds; restore of the newest and of an older
//! snapshot onto an empty filesystem, equal to the origin's snapshots; no plaintext of the
//! file set anywhere in Garage's directories; tampered object bytes refused on restore with
//! nothing left behind; an upload cut mid-stream resumed after the parts already stored
//! (bytes re-sent measured); retention across a new full stream keeping every kept snapshot
//! restorable; a Garage cluster (replication factor 3) losing a node mid-upload; ZFS on
//! zfs-fuse (with `--path` through a temporary dataset); `verify` of the store's copy
//! (faithful, a changed byte, a lost object); `--path` of one file with its metadata; a
//! relay (`from:`) feeding a store.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::garage::Garage;
use crate::common::*;

const PART: u64 = 5 << 20;

/// One node `alpha` with the file set `projects` on a loop btrfs, its only replica the object
/// store `offsite` in Garage, and a second, empty btrfs to restore onto.
struct Fixture {
    garage: Garage,
    _origin: LoopBtrfs,
    target: LoopBtrfs,
    config: PathBuf,
    source: PathBuf,
    snapdir: PathBuf,
    scratch: Scratch,
}

/// The key and credentials files, and the policy's `replicas:` entry for the store.
fn offsite_entry(scratch: &Scratch, garage: &Garage) -> String {
    let keys = scratch.dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("offsite.key");
    std::fs::write(&key, format!("{}\n", "5e".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    garage.credentials_file(&keys.join("offsite.env"));
    format!(
        "replicas:\n  - name: offsite\n    object_store:\n      endpoint: {}\n      bucket: {}\n      prefix: backups/\n      region: {}\n      credentials: {}\n    encryption_key: {}\n    part_size: 5MiB\n",
        garage.endpoint,
        crate::common::garage::BUCKET,
        crate::common::garage::REGION,
        keys.join("offsite.env").display(),
        key.display()
    )
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        Self::with(test, "", "")
    }

    /// With more keys in the store's entry (`entry`, indented as its keys) and the policy
    /// (`policy`, top-level keys).
    fn with(test: &str, entry: &str, more: &str) -> Option<Fixture> {
        let scratch = Scratch::new(test);
        let garage = Garage::start(&scratch, test)?;
        let origin = LoopBtrfs::new(&scratch, "origin", 400);
        let target = LoopBtrfs::new(&scratch, "target", 400);
        let source = origin.subvolume("projects");
        let policy = format!(
            "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\n{}{entry}{more}",
            source.display(),
            offsite_entry(&scratch, &garage)
        );
        let config = single_node_config(&scratch, "alpha", &[("projects", policy)]);
        let snapdir = origin.mnt.join(".snapship/projects");
        Some(Fixture { garage, _origin: origin, target, config, source, snapdir, scratch })
    }

    fn sync(&self) -> Output {
        snapship().args(["sync", "--wait", "0s", "--config"]).arg(&self.config).arg("projects").output().unwrap()
    }

    fn sync_ok(&self) -> String {
        let out = self.sync();
        let t = text(&out);
        assert!(out.status.success(), "sync failed:\n{t}");
        t
    }

    fn restore(&self, snapshot: &str, to: &Path) -> Output {
        snapship()
            .args(["restore", "--config"])
            .arg(&self.config)
            .args(["projects", "--from", "offsite", "--snapshot", snapshot, "--to"])
            .arg(to)
            .output()
            .unwrap()
    }

    /// Restores `snapshot` from the store onto the empty filesystem and compares it with the
    /// origin's snapshot.
    fn restore_and_compare(&self, snapshot: &str, label: &str) {
        let to = self.target.mnt.join(label);
        let out = self.restore(snapshot, &to);
        assert!(out.status.success(), "restore of {snapshot} failed:\n{}", text(&out));
        assert_same_tree(&self.snapdir.join(snapshot), &to);
        assert!(!libbtrfsutil::subvolume_read_only(&to).unwrap(), "the restored copy is writable");
        // Only the copy is left: the received steps are gone.
        let left: Vec<String> = std::fs::read_dir(&self.target.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(left.iter().all(|n| !n.starts_with(".snapship-restore")), "{left:?}");
    }
}

/// Snapshot names in the origin's directory, oldest first.
fn names(dir: &Path) -> Vec<String> {
    let mut v = visible(dir);
    v.retain(|n| n.starts_with("snapship-"));
    v.sort();
    v
}

/// Whether `needle` occurs in any file under `dir`.
fn found_in(dir: &Path, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("grep").args(["-r", "-l", "-a", "-F", needle]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

#[test]
fn full_then_incremental_upload_restores_each_snapshot_and_leaks_no_plaintext() {
    require_root!();
    let Some(f) = Fixture::new("objstore_roundtrip") else { return };
    let marker = format!("SNAPSHIP-PLAINTEXT-MARKER-{}", std::process::id());
    std::fs::create_dir_all(f.source.join("docs")).unwrap();
    std::fs::write(f.source.join("docs/marker.txt"), marker.repeat(1000)).unwrap();
    write_random(&f.source.join("big.bin"), 12 << 20, 7);
    let first = f.sync_ok();
    assert!(first.contains("-> offsite:") && first.contains("full"), "{first}");
    let s1 = names(&f.snapdir).pop().unwrap();

    std::fs::write(f.source.join("docs/marker.txt"), format!("{marker} changed")).unwrap();
    write_random(&f.source.join("second.bin"), 3 << 20, 8);
    std::fs::remove_file(f.source.join("big.bin")).unwrap();
    let second = f.sync_ok();
    assert!(second.contains(&format!("incremental from {s1}")), "{second}");
    let s2 = names(&f.snapdir).pop().unwrap();

    // `list` shows both held by the store.
    let out = snapship().args(["list", "--config"]).arg(&f.config).arg("projects").output().unwrap();
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    assert!(listing.contains("offsite (object store)"), "{listing}");
    for s in [&s1, &s2] {
        let row = listing.lines().find(|l| l.starts_with(s.as_str())).unwrap_or_else(|| panic!("{s} not listed:\n{listing}"));
        assert!(row.trim_end().ends_with("x  x") || row.matches(" x").count() == 2, "{row}");
    }

    // The store never saw the file set's bytes.
    for dir in f.garage.dirs() {
        assert_eq!(found_in(&dir, &marker), Vec::<String>::new(), "plaintext in Garage's {}", dir.display());
    }
    // (The grep does see plaintext where there is some.)
    assert!(!found_in(&f.snapdir.join(&s1), &marker).is_empty());

    f.restore_and_compare(&s2, "newest");
    f.restore_and_compare(&s1, "older");
}

#[test]
fn tampered_object_bytes_are_refused_on_restore() {
    require_root!();
    let Some(f) = Fixture::new("objstore_tamper") else { return };
    write_random(&f.source.join("data.bin"), 7 << 20, 3);
    f.sync_ok();
    let s1 = names(&f.snapdir).pop().unwrap();

    // Change one byte of the stream's data object, as the store serves it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let s3 = f.garage.client();
        let prefix = object_store::path::Path::from("backups/projects/streams");
        let objects: Vec<_> = s3.list(Some(&prefix)).try_collect().await.unwrap();
        assert_eq!(objects.len(), 1, "{objects:?}");
        let key = &objects[0].location;
        let mut bytes = s3.get(key).await.unwrap().bytes().await.unwrap().to_vec();
        let at = bytes.len() / 2 + 5; // in the second part
        bytes[at] ^= 0x40;
        s3.put(key, bytes.into()).await.unwrap();
    });

    let to = f.target.mnt.join("tampered");
    let out = f.restore(&s1, &to);
    let t = text(&out);
    assert!(!out.status.success(), "a tampered stream restored:\n{t}");
    assert!(t.contains("authentication failed") || t.contains("changed"), "{t}");
    assert!(!to.exists(), "nothing is left at --to");
    let left: Vec<String> = std::fs::read_dir(&f.target.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.starts_with(".snapship-restore")), "{left:?}");
}

#[test]
fn a_cut_upload_resumes_after_the_parts_already_stored() {
    require_root!();
    let Some(f) = Fixture::new("objstore_resume") else { return };
    write_random(&f.source.join("data.bin"), 24 << 20, 11);
    // The stream stops after 12 MiB (two 5 MiB parts stored, the third being read) and the
    // sync is killed.
    sync_killed_mid_transfer(&f.config, "projects", 12 << 20, &f.scratch);
    let s1 = names(&f.snapdir).pop().unwrap();
    std::fs::write(f.source.join("after.txt"), "written after the cut").unwrap();

    let out = f.sync();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // The cut stream was finished first, after what the store held, then the new snapshot.
    let resumed = t
        .lines()
        .find_map(|l| l.split("resumed an upload after ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or_else(|| panic!("no resume in:\n{t}"));
    assert_eq!(resumed, 2 * PART, "two whole parts were stored before the cut");
    let sent = t
        .lines()
        .find_map(|l| l.split("uploaded ").nth(1).filter(|_| l.contains(&s1)).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or_else(|| panic!("no upload figure for {s1} in:\n{t}"));
    eprintln!("resume: {resumed} bytes already stored, {sent} bytes sent after the cut");
    assert!(sent < (24 << 20) - resumed + PART, "only the rest of the stream was sent again ({sent})");
    let s2 = names(&f.snapdir).pop().unwrap();
    assert_ne!(s1, s2);
    f.restore_and_compare(&s1, "cut");
    f.restore_and_compare(&s2, "after");
}

#[test]
fn zfs_uploads_and_restores_onto_an_empty_pool() {
    if !have_zfs("objstore_zfs") {
        return;
    }
    let _one = crate::zfs::one_at_a_time();
    let scratch = Scratch::new("objstore_zfs");
    let Some(garage) = Garage::start(&scratch, "objstore_zfs") else { return };
    let origin = ZfsPool::new(&scratch, "o", 256);
    let target = ZfsPool::new(&scratch, "t", 256);
    let src = origin.dataset("projects");
    let policy = format!(
        "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src}\n{}",
        offsite_entry(&scratch, &garage)
    );
    let config = single_node_config(&scratch, "alpha", &[("projects", policy)]);
    let sync = || {
        let out = snapship().args(["sync", "--wait", "0s", "--config"]).arg(&config).arg("projects").output().unwrap();
        assert!(out.status.success(), "sync failed:\n{}", text(&out));
        text(&out)
    };
    let marker = format!("SNAPSHIP-ZFS-MARKER-{}", std::process::id());
    std::fs::write(origin.mountpoint("projects").join("marker.txt"), marker.repeat(500)).unwrap();
    write_random(&origin.mountpoint("projects").join("big.bin"), 6 << 20, 5);
    assert!(sync().contains("full"));
    std::fs::write(origin.mountpoint("projects").join("later.txt"), "second").unwrap();
    let second = sync();
    assert!(second.contains("incremental from"), "{second}");
    let snaps: Vec<String> = origin.snapshot_props(&src, "guid").into_iter().map(|(n, _)| n).collect();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    for dir in garage.dirs() {
        assert!(found_in(&dir, &marker).is_empty(), "plaintext in Garage's {}", dir.display());
    }
    for (i, snap) in snaps.iter().enumerate() {
        let to = format!("{}/restored{i}", target.name);
        let out =
            snapship().args(["restore", "--config"]).arg(&config).args(["projects", "--from", "offsite", "--snapshot", snap, "--to", &to]).output().unwrap();
        assert!(out.status.success(), "restore of {snap} failed:\n{}", text(&out));
        // The origin's snapshot, seen through a clone (zfs-fuse has no .zfs directory).
        let clone = format!("{}/cmp{i}", origin.name);
        run(std::process::Command::new("zfs").args(["clone", &format!("{src}@{snap}"), &clone]));
        assert_same_tree(&origin.mountpoint(&format!("cmp{i}")), &target.mountpoint(&format!("restored{i}")));
        let ro = sh(&format!("zfs get -H -o value readonly {to}"));
        assert_eq!(ro.trim(), "off", "the restored dataset is writable");
    }
    // One file of the older snapshot, through a temporary dataset destroyed afterwards.
    let to = scratch.dir.join("marker-restored.txt");
    let out = snapship()
        .args(["restore", "--config"])
        .arg(&config)
        .args(["projects", "--from", "offsite", "--snapshot", &snaps[0], "--path", "marker.txt", "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(out.status.success(), "restore --path failed:\n{}", text(&out));
    assert_eq!(std::fs::read_to_string(&to).unwrap(), marker.repeat(500));
    let left = sh(&format!("zfs list -H -o name -r {}", origin.name));
    assert!(!left.contains("snapship-restore"), "the temporary dataset is left: {left}\n{}", text(&out));
}

#[test]
fn a_garage_node_killed_mid_upload_does_not_stop_it() {
    require_root!();
    let scratch = Scratch::new("objstore_cluster");
    let Some(mut garage) = Garage::cluster(&scratch, "objstore_cluster", 3) else { return };
    let origin = LoopBtrfs::new(&scratch, "origin", 400);
    let target = LoopBtrfs::new(&scratch, "target", 300);
    let source = origin.subvolume("projects");
    // Paced, so that the upload is still under way when a node goes.
    let policy = format!(
        "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\n{}transfer:\n  bandwidth_limit: 10MiB/s\n",
        source.display(),
        offsite_entry(&scratch, &garage)
    );
    let config = single_node_config(&scratch, "alpha", &[("projects", policy)]);
    write_random(&source.join("data.bin"), 40 << 20, 21);
    let sync = snapship()
        .args(["sync", "--wait", "0s", "--config"])
        .arg(&config)
        .arg("projects")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first part is stored (its upload record is there) and before the manifest is,
    // one of the three nodes dies.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = garage.client();
    let keys = |dir: &str| {
        rt.block_on(async {
            use futures::TryStreamExt;
            use object_store::ObjectStore;
            let prefix = object_store::path::Path::from(format!("backups/projects/{dir}"));
            s3.list(Some(&prefix)).try_collect::<Vec<_>>().await.map(|v| v.len()).unwrap_or(0)
        })
    };
    wait_for(std::time::Duration::from_secs(60), "the first part stored", || keys("pending") > 0);
    assert_eq!(keys("manifests"), 0, "the upload is still under way");
    garage.kill(2);
    let out = sync.wait_with_output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "sync failed with one Garage node down:\n{t}");
    let snapdir = origin.mnt.join(".snapship/projects");
    let s1 = names(&snapdir).pop().unwrap();
    let to = target.mnt.join("restored");
    let out =
        snapship().args(["restore", "--config"]).arg(&config).args(["projects", "--from", "offsite", "--snapshot", &s1, "--to"]).arg(&to).output().unwrap();
    assert!(out.status.success(), "restore with one Garage node down failed:\n{}", text(&out));
    assert_same_tree(&snapdir.join(&s1), &to);
}

/// The streams the store holds for `projects` (by their manifests): (snapshot name, full).
fn stored_streams(garage: &Garage) -> Vec<(String, bool)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let s3 = garage.client();
        let prefix = object_store::path::Path::from("backups/projects/manifests");
        let mut v: Vec<(String, bool)> = s3
            .list(Some(&prefix))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .into_iter()
            .map(|m| {
                // NAME.IDENTITY.full or NAME.IDENTITY.from.BASE; a name has one dot.
                let key = m.location.filename().unwrap().to_string();
                let name: Vec<&str> = key.splitn(3, '.').take(2).collect();
                (name.join("."), key.ends_with(".full"))
            })
            .collect();
        v.sort();
        v
    })
}

#[test]
fn retention_across_a_new_full_keeps_every_kept_snapshot_restorable() {
    require_root!();
    // Every incremental exceeds 1 % of the full: the upload after one is a new full.
    let Some(f) = Fixture::with("objstore_retention", "    full_ratio: 0.01\n", "retention:\n  replica: { last: 2 }\n") else { return };
    let mut taken = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..4u64 {
        write_random(&f.source.join(format!("file{i}.bin")), 1 << 20, 30 + i);
        if i == 0 {
            write_random(&f.source.join("base.bin"), 8 << 20, 29);
        }
        let out = f.sync_ok();
        kinds.push(if out.contains("incremental from") { "incremental" } else { "full" });
        taken.push(names(&f.snapdir).pop().unwrap());
        // Every snapshot retention keeps (the last two) restores, equal to the origin's.
        let keep = &taken[taken.len().saturating_sub(2)..];
        for (j, s) in keep.iter().enumerate() {
            f.restore_and_compare(s, &format!("r{i}-{j}"));
        }
        let held = stored_streams(&f.garage);
        eprintln!("after upload {i} ({}): {held:?}", kinds[i as usize]);
    }
    // full, incremental (over 1 %), then a new full, then an incremental on it.
    assert_eq!(kinds, ["full", "incremental", "full", "incremental"]);
    // What is left: the new full and the incremental on it; the old chain went whole once
    // no kept snapshot needed it.
    let held = stored_streams(&f.garage);
    let expect: Vec<(String, bool)> = vec![(taken[2].clone(), true), (taken[3].clone(), false)];
    assert_eq!(held, expect);
}

/// `snapship verify` of the store `offsite` (with `extra` arguments): its exit code and text.
fn verify_store(config: &Path, extra: &[&str]) -> (i32, String) {
    let out = snapship().args(["verify", "--config"]).arg(config).args(["projects", "--replica", "offsite"]).args(extra).output().unwrap();
    (out.status.code().unwrap_or(-1), text(&out))
}

/// A change to an object's bytes.
type Change<'a> = &'a dyn Fn(&mut Vec<u8>);

/// Rewrites one stored object under `backups/projects/streams` (the first whose key `pick`
/// takes) with `change` applied to its bytes; `None` deletes it.
fn change_stream_object(garage: &Garage, pick: impl Fn(&str) -> bool, change: Option<Change>) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let s3 = garage.client();
        let prefix = object_store::path::Path::from("backups/projects/streams");
        let objects: Vec<_> = s3.list(Some(&prefix)).try_collect().await.unwrap();
        let key = objects.iter().map(|o| o.location.clone()).find(|k| pick(k.as_ref())).unwrap_or_else(|| panic!("no such object in {objects:?}"));
        match change {
            Some(change) => {
                let mut bytes = s3.get(&key).await.unwrap().bytes().await.unwrap().to_vec();
                change(&mut bytes);
                s3.put(&key, bytes.into()).await.unwrap();
            }
            None => s3.delete(&key).await.unwrap(),
        }
        key.to_string()
    })
}

#[test]
fn verify_checks_the_stores_copy_against_its_manifests() {
    require_root!();
    let Some(f) = Fixture::new("objstore_verify") else { return };
    write_random(&f.source.join("data.bin"), 7 << 20, 41);
    f.sync_ok();
    std::fs::write(f.source.join("later.txt"), "the second snapshot").unwrap();
    let second = f.sync_ok();
    assert!(second.contains("incremental from"), "{second}");
    let newest = names(&f.snapdir).pop().unwrap();

    // A faithful store: equal, cheaply and with every part downloaded.
    let (code, t) = verify_store(&f.config, &[]);
    assert_eq!(code, 0, "{t}");
    assert!(t.contains(&format!("projects -> offsite: {newest} equal")) && t.contains("2 streams"), "{t}");
    let (code, t) = verify_store(&f.config, &["--full"]);
    assert_eq!(code, 0, "{t}");
    assert!(t.contains("parts downloaded, decrypted and hashed"), "{t}");
    eprintln!("verify --full of a faithful store:\n{t}");
    // Without --replica the store is verified with the others (here the only replica).
    let out = snapship().args(["verify", "--config"]).arg(&f.config).arg("projects").output().unwrap();
    assert!(out.status.success() && text(&out).contains("-> offsite:"), "{}", text(&out));

    // One byte of the full stream's object changed (its size kept): the default check, which
    // only compares sizes, cannot see it (as documented); --full names the part.
    let full = change_stream_object(&f.garage, |k| k.ends_with(".full"), Some(&|b: &mut Vec<u8>| b[100] ^= 0x01));
    let (code, t) = verify_store(&f.config, &[]);
    assert_eq!(code, 0, "sizes are unchanged: {t}");
    let (code, t) = verify_store(&f.config, &["--full"]);
    assert_eq!(code, 1, "{t}");
    assert!(t.contains("DIFFERS") && t.contains(&format!("{full} part 1 of 2")) && t.contains("authentication failed"), "{t}");
    eprintln!("verify --full of a tampered store:\n{t}");

    // The incremental's object lost: found without --full, named.
    let incremental = change_stream_object(&f.garage, |k| k.contains(".from."), None);
    let (code, t) = verify_store(&f.config, &[]);
    assert_eq!(code, 1, "{t}");
    assert!(t.contains(&format!("{incremental}: missing from the store")), "{t}");

    // A snapshot the store does not hold: could not verify.
    let (code, t) = verify_store(&f.config, &["--snapshot", "snapship-20000101T000000.000Z"]);
    assert_eq!(code, 2, "{t}");
    assert!(t.contains("holds no snapshot named"), "{t}");
}

#[test]
fn restore_of_one_path_from_the_store_keeps_its_metadata_and_leaves_nothing_else() {
    require_root!();
    let Some(f) = Fixture::new("objstore_path") else { return };
    let file = f.source.join("docs/secret.txt");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "the original").unwrap();
    write_random(&f.source.join("big.bin"), 6 << 20, 43);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&file, Some(1234), Some(5678)).unwrap();
    rustix::fs::setxattr(&file, "user.note", b"kept", rustix::fs::XattrFlags::empty()).unwrap();
    run(std::process::Command::new("touch").arg("-h").arg("-d").arg("2024-02-03 04:05:06.5 UTC").arg(&file));
    let meta = std::fs::symlink_metadata(&file).unwrap();
    f.sync_ok();
    let s1 = names(&f.snapdir).pop().unwrap();
    // A second snapshot, so that the restore of the first receives a chain it then drops.
    std::fs::write(&file, "overwritten").unwrap();
    f.sync_ok();

    let restore = |path: &str, to: &Path| {
        snapship()
            .args(["restore", "--config"])
            .arg(&f.config)
            .args(["projects", "--from", "offsite", "--snapshot", &s1, "--path", path, "--to"])
            .arg(to)
            .output()
            .unwrap()
    };
    let left = || -> Vec<String> {
        std::fs::read_dir(&f.target.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".snapship-restore"))
            .collect()
    };
    let to = f.target.mnt.join("secret.txt");
    let out = restore("docs/secret.txt", &to);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("docs/secret.txt in object store `offsite`") && t.contains(&s1), "{t}");
    let got = std::fs::symlink_metadata(&to).unwrap();
    assert_eq!(std::fs::read_to_string(&to).unwrap(), "the original");
    assert_eq!(got.permissions().mode() & 0o7777, 0o640);
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&got), std::os::unix::fs::MetadataExt::gid(&got)), (1234, 5678));
    use std::os::unix::fs::MetadataExt;
    assert_eq!((got.mtime(), got.mtime_nsec()), (meta.mtime(), meta.mtime_nsec()));
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&to, "user.note", &mut buf[..]).expect("the xattr on the copy");
    assert_eq!(&buf[..n], b"kept");
    // Only the file: the received chain is gone.
    assert_eq!(left(), Vec::<String>::new());
    assert_eq!(visible(&f.target.mnt), ["secret.txt"]);

    // A path the snapshot does not have: refused, and the chain received for it removed too.
    let out = restore("docs/never.txt", &f.target.mnt.join("never"));
    assert!(!out.status.success() && text(&out).contains("is not in snapshot"), "{}", text(&out));
    assert_eq!(left(), Vec::<String>::new());
    assert!(!f.target.mnt.join("never").exists());
}

#[test]
fn a_relay_uploads_what_it_received_to_a_store_naming_it_in_from() {
    require_root!();
    let mut c = crate::common::cluster::Cluster::with_size("objstore_relay", &["alpha", "beta"], 300);
    let Some(garage) = Garage::start(&c.scratch, "objstore_relay") else { return };
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let entry = offsite_entry(&c.scratch, &garage).replacen("replicas:\n", "", 1);
    let policy = format!(
        "fileset: projects\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {}\nreplicas:\n  - node: beta\n    path: {}\n{entry}    from: beta\n",
        src.display(),
        dst.display()
    );
    c.configure("alpha", &[("projects", policy.clone())]);
    let beta = c.configure("beta", &[("projects", policy.clone())]);
    let out = snapship().args(["check", "--config"]).arg(&beta).output().unwrap();
    assert!(out.status.success(), "check refuses a store fed by a relay:\n{}", text(&out));
    c.start("beta");
    let alpha_dir = c.mnt("alpha").join(".snapship/projects");
    let stored = |name: &str| stored_streams(&garage).into_iter().find(|(n, _)| n == name);

    write_random(&src.join("data.bin"), 6 << 20, 61);
    let first = c.sync_ok("alpha", "projects");
    // alpha feeds beta only; beta uploads to the store.
    assert!(first.contains("-> beta:") && !first.contains("offsite"), "{first}");
    let s1 = names(&alpha_dir).pop().unwrap();
    let (_, full) = wait_until(std::time::Duration::from_secs(90), "beta's upload of the first snapshot", || stored(&s1));
    assert!(full, "the first upload is a full stream");
    std::fs::write(src.join("later.txt"), "relayed incrementally").unwrap();
    c.sync_ok("alpha", "projects");
    let s2 = names(&alpha_dir).pop().unwrap();
    let (_, full) = wait_until(std::time::Duration::from_secs(90), "beta's upload of the second snapshot", || stored(&s2));
    assert!(!full, "the second upload is an incremental on the first");
    let log = c.daemons["beta"].log_text();
    assert!(log.lines().any(|l| l.contains("relayed") && l.contains("offsite")), "{log}");

    // The store's copies are alpha's snapshots: restored on alpha, verified there.
    let alpha = c.dir("alpha").join("node.yaml");
    for (s, label) in [(&s1, "first"), (&s2, "second")] {
        let to = c.mnt("alpha").join(format!("restored-{label}"));
        let out =
            snapship().args(["restore", "--config"]).arg(&alpha).args(["projects", "--from", "offsite", "--snapshot", s, "--to"]).arg(&to).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert_same_tree(&alpha_dir.join(s), &to);
    }
    let (code, t) = verify_store(&alpha, &["--full"]);
    assert_eq!(code, 0, "{t}");
    c.stop("beta");
}
