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

// Hostile streams and planted symlinks, through the backend directly.
//
// A peer with a valid certificate may still be hostile, and a send stream is the origin's to
// shape: it can make any names, symlinks, several subvolumes. These tests hand the replica
// side such streams (made with `btrfs send` from crafted subvolumes, or edited byte by byte)
// and plant symlinks where it works, and check that nothing is accepted that is not exactly
// the expected snapshot, that nothing is left behind, and that nothing outside the replica
// directory is touched.

use snapship::snapshot::btrfs::BtrfsReplica;
use snapship::snapshot::{Incoming, ReplicaSide, Snapshot, SnapshotName};

const NAME: &str = "snapship-20260101T000000.000Z";
const OTHER: &str = "snapship-20260101T010000.000Z";

/// One btrfs filesystem holding crafted origin snapshots, the replica directory, and a
/// directory outside the replica with a marker file that nothing may touch.
struct Hostile {
    fs: LoopBtrfs,
    _scratch: Scratch,
    replica: PathBuf,
    outside: PathBuf,
}

impl Hostile {
    fn new(test: &str) -> Hostile {
        let scratch = Scratch::new(test);
        let fs = LoopBtrfs::new(&scratch, "fs", 256);
        let outside = fs.mnt.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("marker"), "keep me").unwrap();
        let replica = fs.mnt.join("backup/projects");
        Hostile { fs, _scratch: scratch, replica, outside }
    }

    /// A read-only snapshot named `name` of a new subvolume that `fill` wrote, in a directory
    /// of its own (so that two can share a name).
    fn snapshot(&self, name: &str, fill: impl FnOnce(&Path)) -> PathBuf {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let src = self.fs.subvolume(&format!("src-{n}"));
        fill(&src);
        let dir = self.fs.mnt.join(format!("snaps-{n}"));
        std::fs::create_dir(&dir).unwrap();
        let snap = dir.join(name);
        run(std::process::Command::new("btrfs").args(["-q", "subvolume", "snapshot", "-r"]).arg(&src).arg(&snap));
        snap
    }

    fn plain_snapshot(&self, name: &str) -> PathBuf {
        self.snapshot(name, |src| std::fs::write(src.join("file"), "content\n").unwrap())
    }

    /// `btrfs send` of `snapshots`. Several make one stream holding them all: with `-e`, a
    /// single end command closes the stream after the last (without it, each subvolume ends
    /// with one, and `btrfs receive -e` stops at the first).
    fn send(&self, snapshots: &[&Path]) -> Vec<u8> {
        run(std::process::Command::new("btrfs").args(["send", "-q", "-e"]).args(snapshots)).stdout
    }

    /// Receives `stream` as snapshot `name` with identity `identity`, as a sync would.
    fn receive(&self, name: &str, identity: &str, stream: &[u8]) -> anyhow::Result<Snapshot> {
        self.receive_on(name, identity, None, stream)
    }

    /// The same, announced as incremental from `base` (an identity).
    fn receive_on(&self, name: &str, identity: &str, base: Option<&str>, stream: &[u8]) -> anyhow::Result<Snapshot> {
        let replica = BtrfsReplica::new(self.replica.clone());
        let incoming =
            Incoming { name: SnapshotName::parse(name).unwrap(), identity: identity.into(), base: base.map(Into::into), from_token: false, fetched: false };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut stream = stream;
            replica.receive(&incoming, &mut stream).await
        })
    }

    fn list(&self) -> anyhow::Result<Vec<Snapshot>> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(BtrfsReplica::new(self.replica.clone()).list())
    }

    /// The outside directory holds its marker, unchanged, and nothing else.
    fn assert_outside_untouched(&self) {
        assert_eq!(names_in(&self.outside), ["marker"], "something was made in {}", self.outside.display());
        assert_eq!(std::fs::read_to_string(self.outside.join("marker")).unwrap(), "keep me");
    }

    /// The replica directory holds exactly the complete snapshots `snapshots`, `latest` when
    /// there is one, and staging with nothing but its lock.
    fn assert_replica_holds(&self, snapshots: &[&str]) {
        let mut expected: Vec<String> = snapshots.iter().map(|s| s.to_string()).collect();
        expected.push(".snapship-staging".into());
        if !snapshots.is_empty() {
            expected.push("latest".into());
        }
        expected.sort();
        // The seals of the received snapshots (their ctransid once published), when any was.
        let names: Vec<String> = names_in(&self.replica).into_iter().filter(|n| n != ".snapship-seals").collect();
        assert_eq!(names, expected);
        if self.replica.join(".snapship-seals").exists() {
            let seals = names_in(&self.replica.join(".snapship-seals"));
            assert!(snapshots.iter().all(|s| seals.contains(&s.to_string())), "every snapshot is sealed: {seals:?}");
        }
        assert_eq!(names_in(&self.replica.join(".snapship-staging")), [".lock"], "leftovers in staging");
        for s in snapshots {
            assert!(subvol(&self.replica.join(s)).read_only, "{s} is writable");
        }
    }
}

/// Every name in `dir`, hidden ones too, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// A btrfs send stream (protocol 1) cut into its commands, so that a test can edit one and
/// put the stream back together with valid checksums, as a hostile origin could. A command
/// is `u32 length, u16 type, u32 crc32c` and then attributes `u16 type, u16 length, data`.
struct Stream {
    header: Vec<u8>,
    commands: Vec<(u16, Vec<u8>)>,
}

const CMD_SUBVOL: u16 = 1;
const CMD_SYMLINK: u16 = 8;
const ATTR_INO: u16 = 3;
const ATTR_PATH: u16 = 15;
const ATTR_PATH_LINK: u16 = 17;

/// The stream's checksum: crc32c seeded with 0 and without the usual final inversion, over
/// the command with its crc field zeroed.
fn stream_crc(command: &[u8]) -> u32 {
    !crc32c::crc32c_append(!0, command)
}

impl Stream {
    fn parse(bytes: &[u8]) -> Stream {
        assert!(bytes.starts_with(b"btrfs-stream\0"), "not a btrfs send stream");
        let (header, mut rest) = bytes.split_at(17);
        let mut commands = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as usize;
            let cmd = u16::from_le_bytes(rest[4..6].try_into().unwrap());
            let crc = u32::from_le_bytes(rest[6..10].try_into().unwrap());
            let payload = rest[10..10 + len].to_vec();
            let encoded = Stream::encode(cmd, &payload);
            assert_eq!(u32::from_le_bytes(encoded[6..10].try_into().unwrap()), crc, "the test's checksum does not match btrfs's");
            commands.push((cmd, payload));
            rest = &rest[10 + len..];
        }
        Stream { header: header.to_vec(), commands }
    }

    fn encode(cmd: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + payload.len());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&cmd.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(payload);
        let crc = stream_crc(&out);
        out[6..10].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.header.clone();
        for (cmd, payload) in &self.commands {
            out.extend(Stream::encode(*cmd, payload));
        }
        out
    }

    fn attributes(payload: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let (mut out, mut rest) = (Vec::new(), payload);
        while !rest.is_empty() {
            let kind = u16::from_le_bytes(rest[0..2].try_into().unwrap());
            let len = u16::from_le_bytes(rest[2..4].try_into().unwrap()) as usize;
            out.push((kind, rest[4..4 + len].to_vec()));
            rest = &rest[4 + len..];
        }
        out
    }

    fn payload(attributes: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, data) in attributes {
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&(data.len() as u16).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    /// Renames the subvolume the stream makes (the path of its subvol command).
    fn rename_subvolume(&mut self, to: &str) {
        let (_, payload) = self.commands.iter_mut().find(|(cmd, _)| *cmd == CMD_SUBVOL).expect("a subvol command");
        let attributes: Vec<_> =
            Stream::attributes(payload).into_iter().map(|(k, v)| if k == ATTR_PATH { (k, to.as_bytes().to_vec()) } else { (k, v) }).collect();
        *payload = Stream::payload(&attributes);
    }

    /// Adds, right after the subvol command, a symlink at `path` (relative to the subvolume)
    /// pointing to `target`.
    fn insert_symlink(&mut self, path: &str, target: &Path) {
        let at = self.commands.iter().position(|(cmd, _)| *cmd == CMD_SUBVOL).expect("a subvol command") + 1;
        let attributes = [
            (ATTR_PATH, path.as_bytes().to_vec()),
            (ATTR_INO, 100_000u64.to_le_bytes().to_vec()),
            (ATTR_PATH_LINK, target.as_os_str().as_encoded_bytes().to_vec()),
        ];
        self.commands.insert(at, (CMD_SYMLINK, Stream::payload(&attributes)));
    }
}

#[test]
fn hostile_symlinks_inside_a_snapshot_are_data_and_a_wrongly_named_subvolume_is_refused() {
    if !have_root("hostile_symlinks_inside_a_snapshot") {
        return;
    }
    let h = Hostile::new("hostile_symlinks");
    let outside = h.outside.clone();
    let crafted = |src: &Path| {
        std::fs::write(src.join("file"), "data\n").unwrap();
        for name in [".snapship-staging", "latest", ".snapship-publishing-x", "receive-x"] {
            symlink(&outside, src.join(name));
        }
        symlink(outside.join("marker"), src.join(".lock"));
        symlink("../../../../../../outside", src.join("escape"));
    };
    // Named as expected: received, the symlinks kept as they are, nothing followed.
    let snap = h.snapshot(NAME, crafted);
    let got = h.receive(NAME, &subvol(&snap).uuid, &h.send(&[&snap])).unwrap();
    assert_eq!(got.name.as_str(), NAME);
    assert_same_tree(&snap, &h.replica.join(NAME));
    h.assert_replica_holds(&[NAME]);
    h.assert_outside_untouched();

    // The same content in a subvolume named like the names snapship uses itself: refused,
    // and nothing of it stays.
    for name in ["latest", ".snapship-staging", ".lock"] {
        let snap = h.snapshot(name, crafted);
        let result = h.receive(OTHER, &subvol(&snap).uuid, &h.send(&[&snap]));
        h.assert_replica_holds(&[NAME]);
        h.assert_outside_untouched();
        let err = result.unwrap_err();
        assert!(format!("{err:#}").contains(&format!("made \"{name}\", not snapshot {OTHER}")), "{err:#}");
    }
    assert_eq!(std::fs::read_link(h.replica.join("latest")).unwrap(), Path::new(NAME));
}

#[test]
fn a_stream_of_two_subvolumes_is_refused_and_leaves_nothing() {
    if !have_root("a_stream_of_two_subvolumes_is_refused") {
        return;
    }
    let h = Hostile::new("two_subvolumes");
    let (a, b) = (h.plain_snapshot(NAME), h.plain_snapshot(OTHER));
    let result = h.receive(NAME, &subvol(&a).uuid, &h.send(&[&a, &b]));
    h.assert_replica_holds(&[]);
    let err = result.unwrap_err();
    // Refused on the way in (the stream check), or at the latest when the staging holds two.
    let text = format!("{err:#}");
    assert!(text.contains("second subvolume") || text.contains("this one made 2 entries"), "{text}");
    assert!(h.list().unwrap().is_empty());
    // And the replica still takes a proper stream afterwards.
    h.receive(NAME, &subvol(&a).uuid, &h.send(&[&a])).unwrap();
    h.assert_replica_holds(&[NAME]);
}

#[test]
fn byte_edited_streams_are_refused_with_nothing_visible() {
    if !have_root("byte_edited_streams_are_refused") {
        return;
    }
    let h = Hostile::new("edited_streams");
    let snap = h.plain_snapshot(NAME);
    let uuid = subvol(&snap).uuid;
    let stream = h.send(&[&snap]);

    // A flipped byte: the checksum catches it.
    let mut flipped = stream.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    assert!(h.receive(NAME, &uuid, &flipped).is_err());
    h.assert_replica_holds(&[]);

    // The subvolume renamed, checksum fixed: not the snapshot asked for.
    let mut renamed = Stream::parse(&stream);
    renamed.rename_subvolume(OTHER);
    let result = h.receive(NAME, &uuid, &renamed.bytes());
    h.assert_replica_holds(&[]);
    let err = result.unwrap_err();
    assert!(format!("{err:#}").contains(&format!("made \"{OTHER}\", not snapshot {NAME}")), "{err:#}");

    // A symlink made beside the subvolume (`..` from inside it), pointing outside: refused,
    // the symlink removed, not followed.
    let mut beside = Stream::parse(&stream);
    beside.insert_symlink("../planted", &h.outside);
    let result = h.receive(NAME, &uuid, &beside.bytes());
    h.assert_replica_holds(&[]);
    h.assert_outside_untouched();
    let err = result.unwrap_err();
    assert!(format!("{err:#}").contains("this one made 2 entries"), "{err:#}");

    // The untouched stream is still fine.
    h.receive(NAME, &uuid, &stream).unwrap();
    h.assert_replica_holds(&[NAME]);
}

#[test]
fn a_staging_directory_that_is_a_symlink_is_refused_and_not_followed() {
    if !have_root("a_staging_directory_that_is_a_symlink") {
        return;
    }
    let h = Hostile::new("staging_symlink");
    let snap = h.plain_snapshot(NAME);
    std::fs::create_dir_all(&h.replica).unwrap();
    let staging = h.replica.join(".snapship-staging");
    symlink(&h.outside, &staging);
    let result = h.receive(NAME, &subvol(&snap).uuid, &h.send(&[&snap]));
    // Nothing made (no lock, no subvolume) or removed (the marker) through the link.
    h.assert_outside_untouched();
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains(&staging.display().to_string()) && err.contains("symbolic link"), "{err}");
    assert_eq!(names_in(&h.replica), [".snapship-staging"]);
}

#[test]
fn symlinks_planted_at_the_hidden_and_temporary_names_are_never_followed() {
    if !have_root("symlinks_planted_at_the_hidden_and_temporary_names") {
        return;
    }
    let h = Hostile::new("planted_symlinks");
    let snap = h.plain_snapshot(NAME);
    std::fs::create_dir_all(&h.replica).unwrap();
    // The hidden publishing name pointing at a subvolume outside, `latest` and its temporary
    // names at a directory outside: the names this process would try next (left alone: a
    // live process may be about to use its own) and one of a process that is gone.
    let victim = h.fs.subvolume("victim");
    std::fs::write(victim.join("marker"), "keep me too").unwrap();
    symlink(&victim, h.replica.join(format!(".snapship-publishing-{NAME}")));
    symlink(&h.outside, h.replica.join("latest"));
    let ours: Vec<String> = (0..256).map(|n| format!(".latest.tmp-{}-{n}", std::process::id())).collect();
    for name in &ours {
        symlink(&h.outside, h.replica.join(name));
    }
    symlink(&h.outside, h.replica.join(".latest.tmp-4194999-0"));
    let result = h.receive(NAME, &subvol(&snap).uuid, &h.send(&[&snap]));
    h.assert_outside_untouched();
    assert_eq!(std::fs::read_to_string(victim.join("marker")).unwrap(), "keep me too");
    result.unwrap();
    assert_eq!(std::fs::read_link(h.replica.join("latest")).unwrap(), Path::new(NAME));
    // This process's planted names are still there, untouched; the rest is as it should be.
    for name in &ours {
        assert_eq!(std::fs::read_link(h.replica.join(name)).unwrap(), h.outside, "{name}");
        std::fs::remove_file(h.replica.join(name)).unwrap();
    }
    h.assert_replica_holds(&[NAME]);
}

#[test]
fn a_replica_path_others_can_change_is_refused() {
    if !have_root("a_replica_path_others_can_change_is_refused") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let h = Hostile::new("unsafe_replica_path");
    let snap = h.plain_snapshot(NAME);
    let (uuid, stream) = (subvol(&snap).uuid, h.send(&[&snap]));
    let chmod = |path: &Path, mode| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();

    // The replica directory world-writable.
    std::fs::create_dir_all(&h.replica).unwrap();
    chmod(&h.replica, 0o777);
    let err = format!("{:#}", h.receive(NAME, &uuid, &stream).unwrap_err());
    assert!(err.contains(&format!("refusing {} (on the replica path)", h.replica.display())) && err.contains("chmod go-w"), "{err}");
    assert!(h.list().is_err(), "listing a replica others can change");
    assert!(names_in(&h.replica).is_empty());

    // Its parent writable by its group.
    chmod(&h.replica, 0o755);
    let parent = h.replica.parent().unwrap();
    chmod(parent, 0o775);
    let err = format!("{:#}", h.receive(NAME, &uuid, &stream).unwrap_err());
    assert!(err.contains(&format!("refusing {} (on the replica path)", parent.display())), "{err}");
    assert!(names_in(&h.replica).is_empty());
    chmod(parent, 0o755);

    // The replica directory a symlink (to a directory on the same filesystem).
    std::fs::remove_dir(&h.replica).unwrap();
    let real = h.fs.mnt.join("real");
    std::fs::create_dir(&real).unwrap();
    symlink(&real, &h.replica);
    let err = format!("{:#}", h.receive(NAME, &uuid, &stream).unwrap_err());
    assert!(err.contains(&h.replica.display().to_string()) && err.contains("symbolic link"), "{err}");
    assert!(names_in(&real).is_empty());

    // Made safe, it receives.
    std::fs::remove_file(&h.replica).unwrap();
    h.receive(NAME, &uuid, &stream).unwrap();
    h.assert_replica_holds(&[NAME]);
}

/// A hostile origin announces an incremental from a base the replica holds, but its stream
/// builds on another subvolume of the replica's filesystem (`btrfs receive` would find it by
/// UUID anywhere, `--chroot` notwithstanding) to copy that subvolume's content in. Refused
/// before `btrfs receive` sees the command; nothing is visible, and the honest incremental
/// still works.
#[test]
fn a_stream_that_builds_on_a_subvolume_outside_the_replica_is_refused() {
    require_root!();
    let h = Hostile::new("foreign_parent");
    // The replica holds `base`; elsewhere on its filesystem is `secret`, received from another star.
    let base = h.plain_snapshot(NAME);
    h.receive(NAME, &subvol(&base).uuid, &h.send(&[&base])).unwrap();
    let secret = h.snapshot(NAME, |src| std::fs::write(src.join("secret"), "another star's data\n").unwrap());
    let elsewhere = h.fs.mnt.join("other-star");
    std::fs::create_dir(&elsewhere).unwrap();
    let send = format!("btrfs send -q {} | btrfs receive -q {}", secret.display(), elsewhere.display());
    run(std::process::Command::new("sh").arg("-ec").arg(send));
    // A child of `secret`, sent incrementally from it.
    let child_src = h.fs.mnt.join("child-src");
    run(std::process::Command::new("btrfs").args(["-q", "subvolume", "snapshot"]).arg(&secret).arg(&child_src));
    std::fs::write(child_src.join("more"), "x").unwrap();
    let child = h.fs.mnt.join("child");
    run(std::process::Command::new("btrfs").args(["-q", "subvolume", "snapshot", "-r"]).arg(&child_src).arg(&child));
    let hostile = run(std::process::Command::new("btrfs").args(["send", "-q", "-p"]).arg(&secret).arg(&child)).stdout;
    let err = h.receive_on(OTHER, &subvol(&child).uuid, Some(&subvol(&base).uuid), &hostile).unwrap_err();
    assert!(format!("{err:#}").contains("another parent than the base it announced"), "{err:#}");
    h.assert_replica_holds(&[NAME]);
    // The honest incremental from the base goes through.
    let next_src = h.fs.mnt.join("next-src");
    run(std::process::Command::new("btrfs").args(["-q", "subvolume", "snapshot"]).arg(&base).arg(&next_src));
    std::fs::write(next_src.join("file2"), "y").unwrap();
    std::fs::create_dir(h.fs.mnt.join("next")).unwrap();
    let next = h.fs.mnt.join("next").join(OTHER);
    run(std::process::Command::new("btrfs").args(["-q", "subvolume", "snapshot", "-r"]).arg(&next_src).arg(&next));
    let honest = run(std::process::Command::new("btrfs").args(["send", "-q", "-p"]).arg(&base).arg(&next)).stdout;
    h.receive_on(OTHER, &subvol(&next).uuid, Some(&subvol(&base).uuid), &honest).unwrap();
    h.assert_replica_holds(&[NAME, OTHER]);
}
