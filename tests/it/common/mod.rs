//! Test fixtures on real filesystems: loop-mounted btrfs images, node configs and policies
//! written to disk, the `snapship` binary, and tree comparison.
//!
//! Every fixture gets its own names (test name + pid + counter), so tests run in parallel.
//! Fixtures clean up in `Drop`; `scripts/with-scratch.sh` (what `make test` runs under) sweeps
//! whatever a killed test left under its scratch directory.
#![allow(dead_code)]

pub mod cluster;
pub mod garage;
pub mod proxy;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Set by `make test`: tests that need root must run, and fail loudly when they cannot.
pub const REQUIRE_ENV: &str = "SNAPSHIP_REQUIRE_ROOT_TESTS";
/// Set by `make test`: where fixtures put images and mount points.
pub const SCRATCH_ENV: &str = "SNAPSHIP_TEST_TMP";

/// Whether this test can use root, loop devices and btrfs. Without root, under plain
/// `cargo test`, it says it skips; under `make test` it panics instead.
pub fn have_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = Command::new("mkfs.btrfs").arg("--version").output().is_ok_and(|o| o.status.success());
    if root && tools {
        return true;
    }
    let why = if !root { "needs root" } else { "needs mkfs.btrfs (btrfs-progs)" };
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test}: {why}, and {REQUIRE_ENV} is set: run `make test` as root on a machine with loop devices");
    }
    eprintln!("SKIPPED {test}: {why} (run `make test` as root to include it)");
    false
}

pub static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A port that is free on 127.0.0.1 for both UDP (QUIC) and TCP (metrics), chosen by the OS,
/// and never handed out twice in this test run.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free UDP port");
        let port = udp.local_addr().unwrap().port();
        let tcp_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if tcp_free && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until `f` gives a value, polling every 50 ms; panics with `what` after `limit`.
pub fn wait_until<T>(limit: std::time::Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until `cond` holds (see [`wait_until`]); returns how long it took.
pub fn wait_for(limit: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) -> std::time::Duration {
    let start = std::time::Instant::now();
    wait_until(limit, what, || cond().then_some(()));
    start.elapsed()
}

/// The first line of a test that needs root, loop devices and btrfs: under plain `cargo
/// test` without root the test says it skips and returns; under `make test` it fails loudly
/// instead (see [`have_root`]). The test's name comes from the function it is in.
#[allow(unused_macros)]
macro_rules! require_root {
    () => {{
        fn here() {}
        let name = std::any::type_name_of_val(&here).trim_end_matches("::here");
        if !$crate::common::have_root(name.rsplit("::").next().unwrap_or(name)) {
            return;
        }
    }};
}

/// A fresh directory for one test, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let base = std::env::var_os(SCRATCH_ENV).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = base.join(format!("{test}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command's stdout then stderr, as text (for assertions on what it said).
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    out
}

pub fn sh(script: &str) -> String {
    String::from_utf8(run(Command::new("sh").arg("-ec").arg(script)).stdout).unwrap()
}

/// A btrfs filesystem in a sparse image file, loop-mounted (with zstd compression) at
/// `mnt` until dropped.
pub struct LoopBtrfs {
    pub image: PathBuf,
    pub mnt: PathBuf,
}

impl LoopBtrfs {
    pub fn new(scratch: &Scratch, label: &str, size_mib: u64) -> LoopBtrfs {
        let image = scratch.dir.join(format!("{label}.img"));
        let mnt = scratch.dir.join(label);
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("truncate").arg("-s").arg(format!("{size_mib}M")).arg(&image));
        run(Command::new("mkfs.btrfs").arg("-q").arg("-L").arg(label).arg(&image));
        run(Command::new("mount").arg("-o").arg("loop,compress=zstd").arg(&image).arg(&mnt));
        LoopBtrfs { image, mnt }
    }

    pub fn subvolume(&self, name: &str) -> PathBuf {
        let path = self.mnt.join(name);
        run(Command::new("btrfs").arg("-q").arg("subvolume").arg("create").arg(&path));
        path
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        // A process killed by the test may still hold the mount for a moment.
        for _ in 0..50 {
            let ok = Command::new("umount").arg(&self.mnt).output().is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*p))
}

/// Writes `len` bytes of deterministic pseudo-random (incompressible) data.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).unwrap();
}

/// Everything under `root` that a replica must reproduce: type, mode, size, content, link
/// targets, by relative path.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode();
            let desc = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o}")
            } else {
                let data = std::fs::read(&path).unwrap();
                format!("file {mode:o} {} {:016x} uid {}", data.len(), fnv(&data), meta.uid())
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert!(!ta.is_empty(), "{} is empty", a.display());
    if ta != tb {
        let only_a: Vec<_> = ta.iter().filter(|(k, v)| tb.get(*k) != Some(v)).take(5).collect();
        let only_b: Vec<_> = tb.iter().filter(|(k, v)| ta.get(*k) != Some(v)).take(5).collect();
        panic!("{} and {} differ:\n  {only_a:?}\n  {only_b:?}", a.display(), b.display());
    }
}

/// Names in `dir` that do not start with a dot: what a user sees with `ls`.
pub fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    names.sort();
    names
}

/// uuid, received uuid and parent uuid of a subvolume, from libbtrfsutil.
#[derive(Debug)]
pub struct SubvolFacts {
    pub uuid: String,
    pub received: Option<String>,
    pub parent: Option<String>,
    pub read_only: bool,
}

pub fn subvol(path: &Path) -> SubvolFacts {
    let info = libbtrfsutil::subvolume_info(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    SubvolFacts {
        uuid: info.uuid().to_string(),
        received: info.received_uuid().map(|u| u.to_string()),
        parent: info.parent_uuid().map(|u| u.to_string()),
        read_only: libbtrfsutil::subvolume_read_only(path).unwrap(),
    }
}

/// The `snapship` binary under test.
pub fn snapship() -> Command {
    Command::new(env!("CARGO_BIN_EXE_snapship"))
}

/// For a test that breaks a transfer through `SNAPSHIP_TEST_*`: those hooks exist only in a
/// `test-hooks` build, so say so instead of failing obscurely.
pub fn require_test_hooks() {
    if !cfg!(feature = "test-hooks") {
        panic!("this test needs the test hooks: run it with `--features test-hooks` (as `make test` does)");
    }
}

/// Writes a node config (no peers: a single node with local replicas) and returns its path.
pub fn single_node_config(scratch: &Scratch, node: &str, policies: &[(&str, String)]) -> PathBuf {
    let pdir = scratch.dir.join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    for (name, text) in policies {
        std::fs::write(pdir.join(format!("{name}.yaml")), text).unwrap();
    }
    let path = scratch.dir.join("node.yaml");
    std::fs::write(&path, format!("node: {node}\nstate_dir: state\npolicies:\n  - policies/*.yaml\n")).unwrap();
    path
}

/// A btrfs policy with one replica on `node` itself.
pub fn local_policy(fileset: &str, node: &str, origin: &Path, replica: &Path) -> String {
    format!(
        "fileset: {fileset}\nbackend: btrfs\nmode: snapshot\nschedule: \"@hourly\"\norigin:\n  node: {node}\n  path: {}\nreplicas:\n  - node: {node}\n    path: {}\n",
        origin.display(),
        replica.display()
    )
}

/// A `snapship run` daemon, stopped with SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    pub child: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `snapship run --config CONFIG` and waits until its log contains `ready`.
    pub fn start(config: &Path, log: &Path, ready: &str) -> Daemon {
        Self::start_with_env(config, log, ready, &[])
    }

    pub fn start_with_env(config: &Path, log: &Path, ready: &str, env: &[(&str, String)]) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = snapship();
        cmd.arg("run").arg("--config").arg(config).stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut d = Daemon { child: Some(child), log: log.to_path_buf() };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(ready) {
                return d;
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("snapship run exited ({status}) before `{ready}`:\n{text}");
            }
            assert!(std::time::Instant::now() < deadline, "snapship run never logged `{ready}`:\n{text}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stops with SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // A failing test shows what its daemons said (the harness prints a failed test's
        // output): the last lines, so that a rare failure can be read from the CI log.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- the log of {} (last {} lines) ----", self.log.display(), lines.len().min(60));
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Whether zfs-fuse answers (started by `make test` through scripts/with-scratch.sh). Like
/// [`have_root`]: skips under plain `cargo test`, panics under `make test`.
pub fn have_zfs(test: &str) -> bool {
    if !have_root(test) {
        return false;
    }
    if Command::new("zpool").arg("list").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!("{test}: needs a running zfs-fuse daemon (make test starts one)");
    }
    eprintln!("SKIPPED {test}: no zfs-fuse daemon answers (run `make test` to include it)");
    false
}

/// A ZFS pool on a sparse file, its root mounted at `mnt`, destroyed on drop. Pool names
/// start with `sstest` (scripts/with-scratch.sh destroys any left over).
pub struct ZfsPool {
    pub name: String,
    pub mnt: PathBuf,
    image: PathBuf,
}

impl ZfsPool {
    pub fn new(scratch: &Scratch, label: &str, size_mib: u64) -> ZfsPool {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("sstest{}x{n}{label}", std::process::id());
        let image = scratch.dir.join(format!("{label}.zpool"));
        let mnt = scratch.dir.join(format!("{label}-zfs"));
        run(Command::new("truncate").arg("-s").arg(format!("{size_mib}M")).arg(&image));
        run(Command::new("zpool").args(["create", "-o", "cachefile=none", "-m"]).arg(&mnt).arg(&name).arg(&image));
        ZfsPool { name, mnt, image }
    }

    /// Creates `pool/path` and returns its dataset name.
    pub fn dataset(&self, path: &str) -> String {
        let ds = format!("{}/{path}", self.name);
        run(Command::new("zfs").args(["create", "-p", &ds]));
        ds
    }

    /// Where `pool/path` is mounted.
    pub fn mountpoint(&self, path: &str) -> PathBuf {
        self.mnt.join(path)
    }

    /// `name -> value` of `property` for every snapshot of `dataset` (none if it does not
    /// exist yet).
    pub fn snapshot_props(&self, dataset: &str, property: &str) -> Vec<(String, String)> {
        let out = Command::new("zfs").args(["get", "-H", "-p", "-o", "name,value", "-d", "1", property, dataset]).output().unwrap();
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"), "zfs get failed: {}", String::from_utf8_lossy(&out.stderr));
            return Vec::new();
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter_map(|(n, v)| n.split_once('@').map(|(_, s)| (s.to_string(), v.to_string())))
            .collect()
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        for _ in 0..40 {
            if Command::new("zpool").args(["destroy", "-f", &self.name]).output().is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Runs `snapship sync --config CONFIG FILESET` with the stall hook (the stream stops after
/// `bytes`), waits until it stalled, and kills it with SIGKILL: a sync killed mid-transfer.
pub fn sync_killed_mid_transfer(config: &Path, fileset: &str, bytes: u64, scratch: &Scratch) {
    let marker = scratch.dir.join(format!("stalled-{}", COUNTER.fetch_add(1, Ordering::SeqCst)));
    require_test_hooks();
    let mut child =
        snapship().args(["sync", "--config"]).arg(config).arg(fileset).env("SNAPSHIP_TEST_STALL", format!("{bytes}:{}", marker.display())).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the transfer never reached the stall point");
        assert!(child.try_wait().unwrap().is_none(), "sync ended before the stall point");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Waits until no process whose command line matches `pattern` runs (a killed sync's
/// `btrfs receive` or `zfs receive` ends when its input does).
pub fn wait_for_no_process(pattern: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while Command::new("pgrep").args(["-f", pattern]).output().unwrap().status.success() {
        assert!(std::time::Instant::now() < deadline, "`{pattern}` still running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
