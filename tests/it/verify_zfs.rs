//! `snapship verify` of a ZFS file set between two nodes over QUIC, each with its own
//! zfs-fuse pool. zfs-fuse shows no `.zfs/snapshot`, so each side reads its copy through a
//! temporary read-only clone, destroyed after (on failures too). A faithful replica is equal;
//! a replica snapshot forged to keep the origin's guid and name while holding other content
//! (a stream of another history with its guid patched, received in place of the real one:
//! a ZFS snapshot cannot be changed in place, so this is the way a copy can differ while
//! looking the same) differs, each path named.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use crate::common::cluster::*;
use crate::common::*;
use crate::zfs::{fill_small, one_at_a_time};

fn verify(c: &Cluster, args: &[&str]) -> Output {
    snapship().args(["verify", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("projects").args(args).output().unwrap()
}

fn zfs(args: &[&str]) -> Vec<u8> {
    run(Command::new("zfs").args(args)).stdout
}

/// The temporary clones verify left behind in `pool` (none, if it cleans up).
fn leftover_clones(pool: &ZfsPool) -> Vec<String> {
    String::from_utf8_lossy(&zfs(&["list", "-H", "-o", "name", "-r", &pool.name])).lines().filter(|l| l.contains("-verify-")).map(String::from).collect()
}

/// Fletcher-4 over native-endian 32-bit words, as a ZFS send stream's end record carries it.
fn fletcher4(data: &[u8]) -> [u64; 4] {
    let (mut a, mut b, mut c, mut d) = (0u64, 0u64, 0u64, 0u64);
    for w in data.chunks_exact(4) {
        a = a.wrapping_add(u32::from_ne_bytes(w.try_into().unwrap()) as u64);
        b = b.wrapping_add(a);
        c = c.wrapping_add(b);
        d = d.wrapping_add(c);
    }
    [a, b, c, d]
}

/// A single-snapshot send stream (`zfs send -i`) made to claim snapshot guid `guid`: the
/// guid in its begin and end records replaced, the clone flag of the begin record cleared (it
/// is sent from a clone), the end record's checksum made right again.
/// Records are 312 bytes; the end record is the stream's last.
fn forge(mut stream: Vec<u8>, guid: u64) -> Vec<u8> {
    const RECORD: usize = 312;
    let end = stream.len() - RECORD;
    assert_eq!(u32::from_ne_bytes(stream[end..end + 4].try_into().unwrap()), 5, "the last record is DRR_END");
    stream[36..40].copy_from_slice(&0u32.to_ne_bytes()); // drr_flags: not a clone's stream
    stream[40..48].copy_from_slice(&guid.to_ne_bytes());
    stream[end + 40..end + 48].copy_from_slice(&guid.to_ne_bytes());
    let sum = fletcher4(&stream[..end]);
    for (i, v) in sum.iter().enumerate() {
        stream[end + 8 + 8 * i..end + 16 + 8 * i].copy_from_slice(&v.to_ne_bytes());
    }
    stream
}

#[test]
fn zfs_verify_finds_a_faithful_replica_equal_and_a_forged_one_different() {
    if !have_zfs("zfs_verify_finds_a_faithful_replica_equal_and_a_forged_one_different") {
        return;
    }
    let _serial = one_at_a_time();
    let mut c = Cluster::with_size("zfs_verify", &["alpha", "beta"], 160);
    let (pa, pb) = (ZfsPool::new(&c.scratch, "pa", 256), ZfsPool::new(&c.scratch, "pb", 256));
    let src_ds = pa.dataset("projects");
    let dst_ds = format!("{}/backup/projects", pb.name);
    let p = format!(
        "fileset: projects\nbackend: zfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: alpha\n  path: {src_ds}\nreplicas:\n  - node: beta\n    path: {dst_ds}\n"
    );
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    c.start("beta");
    let src = pa.mountpoint("projects");
    fill_small(&src, 31);
    std::fs::set_permissions(src.join("sub/f5.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/f1.txt", src.join("link")).unwrap();
    c.sync_ok("alpha", "projects");
    let first = pa.snapshot_props(&src_ds, "guid").pop().unwrap().0;
    std::fs::write(src.join("sub/f2.txt"), "changed on the origin").unwrap();
    c.sync_ok("alpha", "projects");
    let (second, guid) = pa.snapshot_props(&src_ds, "guid").pop().unwrap();

    let out = verify(&c, &["--full"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("projects -> beta: {second}")) && text(&out).contains(" equal ("), "{}", text(&out));
    let out = verify(&c, &[]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("zfs verify again (kept hashes): {}", text(&out));
    assert!(leftover_clones(&pa).is_empty() && leftover_clones(&pb).is_empty(), "{:?} {:?}", leftover_clones(&pa), leftover_clones(&pb));

    // Another history from the first snapshot on, with other content, sent as if it were the
    // second snapshot (its guid), and received on the replica in place of the real one.
    let forged_ds = format!("{}/forged", pa.name);
    zfs(&["clone", &format!("{src_ds}@{first}"), &forged_ds]);
    let f = pa.mountpoint("forged");
    std::fs::write(f.join("sub/f2.txt"), "changed on the origin").unwrap();
    std::fs::write(f.join("sub/f3.txt"), "file 3 seed 99\n".repeat(40)).unwrap(); // same size
    std::fs::remove_file(f.join("sub/f4.txt")).unwrap();
    std::fs::set_permissions(f.join("sub/f5.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(f.join("extra"), "x").unwrap();
    zfs(&["snapshot", &format!("{forged_ds}@x")]);
    let stream = forge(zfs(&["send", "-i", &format!("{src_ds}@{first}"), &format!("{forged_ds}@x")]), guid.parse().unwrap());
    c.stop("beta");
    zfs(&["destroy", &format!("{dst_ds}@{second}")]);
    let mut receive = Command::new("zfs").args(["receive", "-F", &format!("{dst_ds}@{second}")]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut receive.stdin.take().unwrap(), &stream).unwrap();
    assert!(receive.wait().unwrap().success(), "the forged stream was not received");
    assert_eq!(pb.snapshot_props(&dst_ds, "guid").pop(), Some((second.clone(), guid.clone())), "the forged copy looks like the real one");
    c.start("beta");

    let out = verify(&c, &[]);
    let shown = text(&out);
    eprintln!("{shown}");
    assert_eq!(out.status.code(), Some(1), "{shown}");
    for line in ["M sub/f3.txt: content", "D sub/f4.txt: only on the origin", "M sub/f5.txt: mode 0755 -> 0700", "A extra: only on the replica", "DIFFERS"] {
        assert!(shown.contains(line), "missing {line:?} in:\n{shown}");
    }
    assert!(!shown.contains("f1.txt") && !shown.contains("data.bin"), "only what differs is named:\n{shown}");
    // The older snapshot is still equal.
    let out = verify(&c, &["--snapshot", &first]);
    assert!(out.status.success(), "{}", text(&out));

    // A replica that is down cannot be verified; this node's clone is gone all the same.
    c.stop("beta");
    let out = verify(&c, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(leftover_clones(&pa).is_empty() && leftover_clones(&pb).is_empty(), "{:?} {:?}", leftover_clones(&pa), leftover_clones(&pb));
}
