//! `make bench`: snapship against the local pipe (`btrfs send | btrfs receive`) and ssh, on
//! real loop btrfs and QUIC on loopback, side by side in one run on the same data; writes
//! docs/benchmarks.md. Needs root (run through scripts/with-scratch.sh, as `make bench` does).
//!
//! Phases: full transfer of mixed data (local pipe, ssh, QUIC with compression none and zstd,
//! the LAN path), ~10 % incremental, a 1 MB change end to end (local pipe, ssh, `snapship
//! sync` through alpha's running daemon and one-shot), continuous-mode RPO, the full send of
//! incompressible data (local pipe, QUIC, the LAN path, ssh), peak RSS during a
//! 4 GiB stream, verify against rsync -c and sha256sum (full, and incremental after a 1 MB
//! change), 2,000 idle continuous file sets (CPU, start-up, memory), the WAN (50 and
//! 200 ms RTT against TCP), catch-up after an outage, connection faults (a replica
//! restarted between syncs, one dead in the commit phase, an outage, UDP drops), upload to
//! and restore from an object store (Garage) against the local pipe (phases/objstore.rs),
//! failover: promotion RTO and failback bytes against the by-hand procedure (phases/failover.rs).
//!
//! Environment: `SNAPSHIP_BENCH_ONLY` (a comma-separated list of phases; then the output goes
//! to target/benchmarks-partial.md), `SNAPSHIP_BENCH_RUNS` (runs per comparison, default 3),
//! `SNAPSHIP_BENCH_BIG_FILES` (the transfer phase's 64 MiB files, default 24: fewer for a
//! quick look on a debug build), and the phases' own (`SNAPSHIP_BENCH_IDLE`, `SNAPSHIP_BENCH_WAN`,
//! `SNAPSHIP_BENCH_CATCHUP`, `SNAPSHIP_BENCH_OBJSTORE`).

#[path = "../tests/it/common/mod.rs"]
mod common;
#[path = "phases/failover.rs"]
mod failover_phase;
#[path = "phases/objstore.rs"]
mod objstore_phase;
#[path = "support/wan.rs"]
mod wan;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::*;
use common::*;

/// Runs per comparison (`SNAPSHIP_BENCH_RUNS` overrides, for quick looks while profiling).
fn runs() -> usize {
    std::env::var("SNAPSHIP_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

/// The transfer phase's 64 MiB files (`SNAPSHIP_BENCH_BIG_FILES` overrides, to shrink the data
/// for a quick look on a debug build; at least 1).
fn big_files() -> usize {
    std::env::var("SNAPSHIP_BENCH_BIG_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(24).max(1)
}

/// Asserts from beta's log that exactly `expected` receives used the LAN path (the runs
/// marked [`Via::Lan`], and the phase's other LAN runs).
fn assert_lan_runs(c: &Cluster, expected: usize) {
    let used = c.daemons["beta"].log_text().matches("receiving over the LAN path").count();
    assert_eq!(used, expected, "the LAN runs did not all use the LAN path (or other runs did too)");
}

/// Phases to run: `SNAPSHIP_BENCH_ONLY=transfer,lan,rpo,rss,idle,verify,wan,catchup,faults,cycle,objstore,failover` (default: all).
fn want(phase: &str) -> bool {
    std::env::var("SNAPSHIP_BENCH_ONLY").map_or(true, |v| v.split(',').any(|p| p == phase))
}
const SSH_PORT: u16 = 2222;

fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A deterministic pseudo-random (incompressible) byte stream.
struct Rng(u64);
impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
    fn below(&mut self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b) % n
    }
}

fn write_file(path: &Path, len: usize, rng: &mut Rng) {
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    std::fs::write(path, data).unwrap();
}

/// About 1.5 GiB of incompressible data in 64 MiB files, plus 20,000 files of 1-16 KiB.
fn generate(dir: &Path, big_files: usize) {
    let mut rng = Rng(0x5eed);
    std::fs::create_dir_all(dir.join("big")).unwrap();
    for i in 0..big_files {
        write_file(&dir.join(format!("big/{i:03}.bin")), 64 << 20, &mut rng);
    }
    for d in 0..100 {
        let sub = dir.join(format!("small/{d:03}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..200 {
            let len = 1024 + rng.below(15 * 1024) as usize;
            write_file(&sub.join(format!("{f:03}.dat")), len, &mut rng);
        }
    }
}

/// A change of about 10 % of the data (of [`generate`]'s, with `big_files` of 64 MiB): 2 of the
/// big files overwritten in part, one replaced, 1,000 small files rewritten, 500 new, 500 deleted.
fn change(dir: &Path, big_files: usize, seed: u64) {
    let mut rng = Rng(seed);
    for i in 0..2 {
        let path = dir.join(format!("big/{:03}.bin", rng.below(big_files as u64)));
        let mut data = std::fs::read(&path).unwrap();
        let start = rng.below(32 << 20) as usize;
        rng.fill(&mut data[start..start + (32 << 20)]);
        std::fs::write(&path, data).unwrap();
        let _ = i;
    }
    write_file(&dir.join(format!("big/{:03}.bin", rng.below(big_files as u64))), 64 << 20, &mut rng);
    for _ in 0..1000 {
        let p = dir.join(format!("small/{:03}/{:03}.dat", rng.below(100), rng.below(200)));
        write_file(&p, 1024 + rng.below(15 * 1024) as usize, &mut rng);
    }
    std::fs::create_dir_all(dir.join(format!("new-{seed}"))).unwrap();
    for f in 0..500 {
        write_file(&dir.join(format!("new-{seed}/{f}.dat")), 1024 + rng.below(15 * 1024) as usize, &mut rng);
    }
    for _ in 0..500 {
        let _ = std::fs::remove_file(dir.join(format!("small/{:03}/{:03}.dat", rng.below(100), rng.below(200))));
    }
    sh("sync");
}

/// sshd on 127.0.0.1:2222 with a throwaway host key and a key for root; stopped on drop.
struct Sshd {
    child: Child,
    key: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let d = dir.join("ssh");
        std::fs::create_dir_all(&d).unwrap();
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {d}/host; ssh-keygen -q -t ed25519 -N '' -f {d}/client; cp {d}/client.pub {d}/authorized; chmod 600 {d}/authorized; mkdir -p /run/sshd",
            d = d.display()
        ));
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", "/dev/null", "-p", &SSH_PORT.to_string(), "-o", "ListenAddress=127.0.0.1", "-o", "PermitRootLogin=prohibit-password"])
            .arg("-h")
            .arg(d.join("host"))
            .arg("-o")
            .arg(format!("AuthorizedKeysFile={}", d.join("authorized").display()))
            .arg("-o")
            .arg("StrictModes=no")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        Sshd { child, key: d.join("client") }
    }

    fn receive_cmd(&self, target: &Path) -> String {
        format!(
            "ssh -p {SSH_PORT} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -c aes128-gcm@openssh.com root@127.0.0.1 btrfs receive -q {}",
            self.key.display(),
            target.display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ways a full send goes in the full-send comparisons (mixed data in the transfer phase,
/// incompressible in the lan phase).
#[derive(Clone, Copy)]
enum Via {
    /// `btrfs send | btrfs receive` on this machine.
    LocalPipe,
    /// `btrfs send | ssh | btrfs receive` through [`Sshd`].
    Ssh,
    /// `snapship sync` one-shot on alpha over QUIC, with this `transfer.compression`.
    Quic(&'static str),
    /// `snapship sync` one-shot on alpha over the LAN path (compression none): alpha's
    /// `peers:` entry for beta marked `encryption: off` for this run only ([`mark_lan`]; beta's
    /// must be marked before its daemon starts).
    Lan,
}

/// What a full-send comparison sends and where to: one read-only snapshot on alpha, each
/// path's own target directory on beta, alpha's policy for `data` without its `transfer:`
/// keys (each run adds its own), and the two long-running receivers whose CPU is counted.
struct FullSends<'a> {
    c: &'a Cluster,
    policy: &'a str,
    snapshot: PathBuf,
    local_dir: PathBuf,
    ssh_dir: PathBuf,
    ship_dir: PathBuf,
    sshd: &'a Sshd,
    beta_pid: u32,
}

impl FullSends<'_> {
    /// One full send by `via` into its emptied target: the time, and the CPU seconds (user +
    /// system) of every process of the path: this process's waited-for children (the pipe's
    /// `btrfs`, ssh, `snapship sync` and its `btrfs send`), beta's daemon and sshd with theirs.
    fn run(&self, via: Via) -> (f64, f64) {
        let snapshot = self.snapshot.display();
        let target = match via {
            Via::LocalPipe => &self.local_dir,
            Via::Ssh => &self.ssh_dir,
            Via::Quic(_) | Via::Lan => &self.ship_dir,
        };
        delete_subvolumes_in(target);
        match via {
            Via::Quic(compression) => set_compression(self.c, compression, self.policy),
            Via::Lan => {
                set_compression(self.c, "none", self.policy);
                mark_lan(self.c, "alpha", "beta");
            }
            Via::LocalPipe | Via::Ssh => {}
        }
        let ticks = || cpu_ticks_all(self.beta_pid) + cpu_ticks_all(self.sshd.child.id());
        let (cpu0, ticks0) = (children_cpu(), ticks());
        let t = timed(|| match via {
            Via::LocalPipe => sh(&format!("btrfs send -q {snapshot} | btrfs receive -q {}", target.display())),
            Via::Ssh => sh(&format!("btrfs send -q {snapshot} | {}", self.sshd.receive_cmd(target))),
            Via::Quic(_) | Via::Lan => {
                self.c.sync_ok("alpha", "data");
            }
        });
        if let Via::Ssh = via {
            // The session's CPU reaches sshd's count once sshd has reaped it, which may be
            // just after the client is done.
            let children = format!("/proc/{0}/task/{0}/children", self.sshd.child.id());
            wait_for(Duration::from_secs(10), "sshd to reap its session", || std::fs::read_to_string(&children).is_ok_and(|c| c.trim().is_empty()));
        }
        (t, children_cpu() - cpu0 + (ticks() - ticks0) as f64 / 100.0)
    }

    /// [`runs`] runs of each of `vias`, one of each in turn per run (`what` names the phase in
    /// the progress lines): per path, the median time and the median CPU seconds.
    fn compare<const N: usize>(&self, what: &str, vias: [Via; N]) -> [(f64, f64); N] {
        let mut samples: [(Vec<f64>, Vec<f64>); N] = std::array::from_fn(|_| (vec![], vec![]));
        for run_i in 0..runs() {
            eprintln!("{what}, run {}", run_i + 1);
            for (via, (times, cpus)) in vias.iter().zip(&mut samples) {
                let (t, cpu) = self.run(*via);
                times.push(t);
                cpus.push(cpu);
            }
        }
        samples.map(|(times, cpus)| (median(times), median(cpus)))
    }
}

fn delete_subvolumes_in(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() && !e.file_name().to_string_lossy().starts_with('.') {
                sh(&format!("btrfs -q subvolume delete {}", p.display()));
            }
        }
    }
    sh("sync");
}

fn set_compression(c: &Cluster, compression: &str, policy: &str) {
    c.configure("alpha", &[("data", format!("{policy}transfer:\n  compression: {compression}\n"))]);
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn main() {
    // `cargo test --all-targets` (make test) runs this binary too, without `--bench`: the
    // benchmarks are for `make bench` only (they take minutes and write docs/benchmarks.md).
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run with `make bench`; skipped under `cargo test`");
        return;
    }
    if !have_root("bench") {
        return;
    }
    let mut out = String::new();
    let mut verdicts = Vec::new();
    writeln!(out, "# Benchmarks\n\nProduced by `make bench` (benches/replication.rs) on {}.\n", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")).unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap().trim().to_string())
        .unwrap_or_default();
    writeln!(out, "Machine: {} cores ({cpu}), {} GiB RAM, kernel {}; btrfs on loop images (zstd mount option) in /tmp; QUIC and ssh on 127.0.0.1. Every comparison below is measured side by side in one run on the same data; times are medians of {} runs unless said otherwise, and the ratios are what to read (this machine is noisy).\n",
        std::thread::available_parallelism().unwrap(), sysinfo_gib(), String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout).trim(), runs()).unwrap();

    // ---- Phase 1: full, incremental, small change -------------------------------------
    if want("transfer") {
        let mut c = Cluster::with_size("bench", &["alpha", "beta"], 16 * 1024);
        let src = c.fs["alpha"].subvolume("data");
        let snaps = c.mnt("alpha").join("manual");
        std::fs::create_dir_all(&snaps).unwrap();
        let rep = c.mnt("beta").to_path_buf();
        let (local_dir, ssh_dir, ship_dir) = (rep.join("local"), rep.join("ssh"), rep.join("snapship"));
        for d in [&local_dir, &ssh_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        // Alpha's daemon runs in the 1 MB change part: its schedule must not fire meanwhile.
        let policy = quiet_policy("data", "alpha", &src, &[("beta", ship_dir.clone())]);
        set_compression(&c, "none", &policy);
        c.configure("beta", &[("data", policy.clone())]);
        mark_lan(&c, "beta", "alpha"); // beta allows it; alpha asks only in the LAN runs
        c.start("beta");
        let beta_pid = c.daemons["beta"].child.as_ref().unwrap().id();
        let sshd = Sshd::start(&c.scratch.dir);
        let big_files = big_files();
        eprintln!("generating the data set...");
        generate(&src, big_files);
        sh("sync");
        let bytes = String::from_utf8_lossy(&Command::new("du").args(["-sb"]).arg(&src).output().unwrap().stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap();
        sh(&format!("btrfs -q subvolume snapshot -r {} {}/s0", src.display(), snaps.display()));

        let full = FullSends {
            c: &c,
            policy: &policy,
            snapshot: snaps.join("s0"),
            local_dir: local_dir.clone(),
            ssh_dir: ssh_dir.clone(),
            ship_dir: ship_dir.clone(),
            sshd: &sshd,
            beta_pid,
        };
        let medians = full.compare("full transfer", [Via::LocalPipe, Via::Ssh, Via::Quic("none"), Via::Quic("zstd"), Via::Lan]);
        let [l, s, n, z, lan] = medians.map(|(t, _cpu)| t);
        assert_lan_runs(&c, runs());
        let mb = bytes / 1e6;
        writeln!(out, "## Full transfer ({:.2} GB: {big_files} files of 64 MiB, 20,000 files of 1-16 KiB)\n", bytes / 1e9).unwrap();
        writeln!(out, "| path | median time | MB/s | vs local pipe |\n|---|---|---|---|").unwrap();
        for (name, t) in [
            ("btrfs send \\| btrfs receive (local pipe)", l),
            ("btrfs send \\| ssh \\| btrfs receive", s),
            ("snapship over QUIC, compression none", n),
            ("snapship over QUIC, zstd", z),
            ("snapship over the LAN path (TCP, MAC'd, `encryption: off`), compression none", lan),
        ] {
            writeln!(out, "| {name} | {t:.2} s | {:.0} | {:.2} x |", mb / t, l / t).unwrap();
        }
        verdicts.push(("Full transfer >= 0.95 x local pipe (compression none)", l / n >= 0.95, format!("{:.2} x", l / n)));

        // Incremental: the same ~10 % change for the local pipe, ssh and snapship (none); a second
        // change for the local pipe again and snapship with zstd.
        delete_subvolumes_in(&ship_dir);
        set_compression(&c, "none", &policy);
        c.sync_ok("alpha", "data");
        let mut prev = "s0".to_string();
        for d in [&local_dir, &ssh_dir] {
            delete_subvolumes_in(d);
        }
        sh(&format!("btrfs send -q {}/s0 | btrfs receive -q {}", snaps.display(), local_dir.display()));
        sh(&format!("btrfs send -q {}/s0 | {}", snaps.display(), sshd.receive_cmd(&ssh_dir)));
        let (mut i_local, mut i_ssh, mut i_none, mut i_local2, mut i_zstd) = (vec![], vec![], vec![], vec![], vec![]);
        let mut inc_bytes = 0u64;
        for run_i in 0..runs() {
            eprintln!("incremental transfer, run {}", run_i + 1);
            for (k, compression) in [(0, "none"), (1, "zstd")] {
                change(&src, big_files, 1000 + (run_i * 2 + k) as u64);
                let next = format!("s{}", run_i * 2 + k + 1);
                sh(&format!("btrfs -q subvolume snapshot -r {} {}/{next}", src.display(), snaps.display()));
                let tl = timed(|| sh(&format!("btrfs send -q -p {s}/{prev} {s}/{next} | btrfs receive -q {}", local_dir.display(), s = snaps.display())));
                if k == 0 {
                    i_local.push(tl);
                    i_ssh.push(timed(|| sh(&format!("btrfs send -q -p {s}/{prev} {s}/{next} | {}", sshd.receive_cmd(&ssh_dir), s = snaps.display()))));
                    inc_bytes = String::from_utf8_lossy(
                        &Command::new("sh")
                            .arg("-c")
                            .arg(format!("btrfs send -q -p {s}/{prev} {s}/{next} | wc -c", s = snaps.display()))
                            .output()
                            .unwrap()
                            .stdout,
                    )
                    .trim()
                    .parse()
                    .unwrap();
                } else {
                    i_local2.push(tl);
                    // The ssh chain needs every snapshot.
                    sh(&format!("btrfs send -q -p {s}/{prev} {s}/{next} | {}", sshd.receive_cmd(&ssh_dir), s = snaps.display()));
                }
                set_compression(&c, compression, &policy);
                let t = timed(|| {
                    c.sync_ok("alpha", "data");
                });
                if k == 0 {
                    i_none.push(t)
                } else {
                    i_zstd.push(t)
                }
                prev = next;
            }
        }
        let (l, s, n, l2, z) = (median(i_local), median(i_ssh), median(i_none), median(i_local2), median(i_zstd));
        writeln!(out, "\n## Incremental transfer (a ~10 % change: {:.0} MB stream)\n", inc_bytes as f64 / 1e6).unwrap();
        writeln!(out, "| path | median time | vs local pipe |\n|---|---|---|").unwrap();
        writeln!(out, "| local pipe | {l:.2} s | 1.00 x |\n| ssh | {s:.2} s | {:.2} x |\n| snapship, compression none | {n:.2} s | {:.2} x |", l / s, l / n)
            .unwrap();
        writeln!(out, "| local pipe (second change of each run) | {l2:.2} s | 1.00 x |\n| snapship, zstd (same second change) | {z:.2} s | {:.2} x |", l2 / z)
            .unwrap();

        // A 1 MB change, end to end: snapshot, send, ship, receive, acknowledge. Each run: the
        // local pipe, ssh and `snapship sync` through alpha's running daemon (it keeps its
        // connection to beta), then a one-shot `snapship sync` with the daemon stopped (a new
        // process: config, TLS, a QUIC handshake, then the sync); after it the daemon starts
        // again, with an untimed sync through it so that its connection is up for the next run.
        // The daemon runs only in this part, its schedule quiet ([`quiet_schedule`]): every
        // snapshot of `data` is one this loop asked for, which `sync_through_daemon` checks.
        set_compression(&c, "none", &policy);
        let origin_snaps = c.mnt("alpha").join(".snapship/data");
        c.start("alpha");
        sync_through_daemon(&c, &origin_snaps);
        let (mut s_local, mut s_ssh, mut s_daemon, mut s_oneshot) = (vec![], vec![], vec![], vec![]);
        // The local pipe again with the durability snapship's replica has before it answers
        // (its commits): the pipe's time plus a `btrfs filesystem sync` of beta right after.
        let mut s_local_synced = vec![];
        // Every path ships exactly its own 1 MB: after each timed path, the other chains catch
        // up (untimed) with everything written so far. (The local pipe and ssh chains take the
        // same snapshots; the daemon and the one-shot sync share alpha's.)
        for i in 0..5 {
            for (k, times) in [(0, &mut s_local), (1, &mut s_ssh), (2, &mut s_daemon), (3, &mut s_oneshot)] {
                let mut rng = Rng(77 + i * 4 + k);
                write_file(&src.join(format!("small-change-{i}-{k}.bin")), 1 << 20, &mut rng);
                // Each path starts with nothing left to write back on either side: what the
                // previous path's receive left dirty (the pipe's and ssh's are not synced) would
                // otherwise be flushed by the next path's commit, and timed as its own.
                sh(&format!("sync -f {} {}", src.display(), rep.display()));
                let next = format!("m{i}{k}");
                let send_to = |target: &str| sh(&format!("btrfs send -q -p {s}/{prev} {s}/{next} | {target}", s = snaps.display()));
                let (local, ssh) = (format!("btrfs receive -q {}", local_dir.display()), sshd.receive_cmd(&ssh_dir));
                let t = match k {
                    0 | 1 => timed(|| {
                        sh(&format!("btrfs -q subvolume snapshot -r {} {}/{next}", src.display(), snaps.display()));
                        send_to(if k == 0 { &local } else { &ssh });
                    }),
                    2 => sync_through_daemon(&c, &origin_snaps),
                    _ => {
                        c.stop("alpha");
                        let t = timed(|| {
                            let out = c.sync("alpha", "data");
                            assert!(out.status.success(), "one-shot sync failed:\n{}", String::from_utf8_lossy(&out.stdout));
                            assert!(!String::from_utf8_lossy(&out.stderr).contains("synced by the running"), "a daemon answered the one-shot sync");
                        });
                        c.start("alpha");
                        t
                    }
                };
                if k == 0 {
                    s_local_synced.push(t + timed(|| sh(&format!("btrfs filesystem sync {}", local_dir.display()))));
                }
                // The catch-up, untimed.
                if k >= 2 {
                    sh(&format!("btrfs -q subvolume snapshot -r {} {}/{next}", src.display(), snaps.display()));
                }
                if k != 0 {
                    send_to(&local);
                }
                if k != 1 {
                    send_to(&ssh);
                }
                if k != 2 {
                    sync_through_daemon(&c, &origin_snaps);
                }
                prev = next;
                times.push(t);
            }
        }
        c.stop("alpha");
        let (l, s, d, o) = (median(s_local), median(s_ssh), median(s_daemon), median(s_oneshot));
        writeln!(out, "\n## A 1 MB change end to end (snapshot, send, ship, receive; median of 5)\n").unwrap();
        writeln!(out, "Each path in turn ships a 1 MB change of its own, and only it (the other paths' copies catch up untimed after each), each path starting with both file systems synced (untimed). Through the daemon: `snapship sync` asks alpha's running `snapship run` over its control socket, which keeps its QUIC connection to beta. One-shot: `snapship sync` with no daemon on alpha (a new process: config, TLS, a QUIC handshake, then the sync).\n").unwrap();
        let ls = median(s_local_synced);
        writeln!(out, "| path | median time | vs local pipe | vs local pipe + sync |\n|---|---|---|---|").unwrap();
        for (name, t) in [
            ("local pipe", l),
            ("local pipe + `btrfs filesystem sync` of the receiving filesystem", ls),
            ("ssh", s),
            ("snapship sync through alpha's running daemon", d),
            ("snapship sync, one-shot (no daemon on alpha)", o),
        ] {
            writeln!(out, "| {name} | {:.0} ms | {:.2} x | {:.2} x |", t * 1e3, t / l, t / ls).unwrap();
        }
        verdicts.push((
            "Small-change cycle <= 1.2 x local pipe",
            d / l <= 1.2,
            format!("{:.2} x through the running daemon ({:.2} x the pipe followed by a sync, the durability the replica has when it answers)", d / l, d / ls),
        ));
        verdicts.push(("Small-change cycle well ahead of ssh", o < s * 0.8, format!("one-shot snapship {:.0} ms, ssh {:.0} ms", o * 1e3, s * 1e3)));
        drop(sshd);
        drop(c);
    }

    // ---- The LAN path: full send of incompressible data, local pipe vs QUIC vs LAN -------
    if want("lan") {
        let mut c = Cluster::with_size("bench_lan", &["alpha", "beta"], 8 * 1024);
        let src = c.fs["alpha"].subvolume("data");
        let snaps = c.mnt("alpha").join("manual");
        std::fs::create_dir_all(&snaps).unwrap();
        let (local_dir, ssh_dir, ship_dir) = (c.mnt("beta").join("local"), c.mnt("beta").join("ssh"), c.mnt("beta").join("snapship"));
        for d in [&local_dir, &ssh_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let base_policy = policy("data", "alpha", &src, &[("beta", ship_dir.clone())]);
        let policy = base_policy.clone() + "transfer:\n  compression: none\n";
        c.configure("beta", &[("data", policy.clone())]);
        mark_lan(&c, "beta", "alpha"); // beta allows it; alpha asks only in the LAN runs
        c.start("beta");
        let beta_pid = c.daemons["beta"].child.as_ref().unwrap().id();
        let sshd = Sshd::start(&c.scratch.dir);
        eprintln!("generating 12 x 64 MiB of incompressible data...");
        generate_big(&src, 12);
        let bytes = 12.0 * 64.0 * 1024.0 * 1024.0;
        sh(&format!("btrfs -q subvolume snapshot -r {} {}/s0", src.display(), snaps.display()));
        let full = FullSends {
            c: &c,
            policy: &base_policy,
            snapshot: snaps.join("s0"),
            local_dir: local_dir.clone(),
            ssh_dir: ssh_dir.clone(),
            ship_dir: ship_dir.clone(),
            sshd: &sshd,
            beta_pid,
        };
        // (median time, median CPU seconds of every process of the path, children included)
        let [(l, lc), (q, qc), (n, nc), (s, sc)] = full.compare("LAN path comparison", [Via::LocalPipe, Via::Quic("none"), Via::Lan, Via::Ssh]);
        drop(sshd);
        // One core per side (`taskset`): the origin's processes on CPU 1, the replica's on
        // CPU 0, to show what each side costs per core.
        sh(&format!("taskset -a -cp 0 {beta_pid} >/dev/null"));
        let (mut p_local, mut p_quic, mut p_lan) = (vec![], vec![], vec![]);
        for run_i in 0..runs() {
            eprintln!("LAN path comparison, one core per side, run {}", run_i + 1);
            delete_subvolumes_in(&local_dir);
            p_local.push(timed(|| sh(&format!("taskset -c 1 btrfs send -q {}/s0 | taskset -c 0 btrfs receive -q {}", snaps.display(), local_dir.display()))));
            for (marked, times) in [(false, &mut p_quic), (true, &mut p_lan)] {
                delete_subvolumes_in(&ship_dir);
                c.configure("alpha", &[("data", policy.clone())]);
                if marked {
                    mark_lan(&c, "alpha", "beta");
                }
                times.push(timed(|| {
                    let out = Command::new("taskset")
                        .args(["-c", "1"])
                        .arg(env!("CARGO_BIN_EXE_snapship"))
                        .args(["sync", "--wait", "0s", "--config"])
                        .arg(c.dir("alpha").join("node.yaml"))
                        .arg("data")
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
                }));
            }
        }
        sh(&format!("taskset -a -cp 0-{} {beta_pid} >/dev/null", std::thread::available_parallelism().unwrap().get() - 1));
        assert_lan_runs(&c, 2 * runs());
        let mb = bytes / 1e6;
        writeln!(out, "\n## Full send of incompressible data: local pipe, QUIC, LAN path, ssh ({:.0} MB, compression none)\n", mb).unwrap();
        writeln!(out, "12 files of 64 MiB of random data; beta's daemon running, `snapship sync` one-shot on alpha; CPU is user + system of every process of the path (both snapship processes and their `btrfs send`/`receive`; for ssh the client, sshd and its session).\n").unwrap();
        writeln!(out, "| path | median time | MB/s | vs local pipe (throughput) | CPU s |\n|---|---|---|---|---|").unwrap();
        for (name, t, cpu) in [
            ("btrfs send \\| btrfs receive (local pipe)", l, lc),
            ("snapship over QUIC (TLS)", q, qc),
            ("snapship over the LAN path (TCP, MAC'd, `encryption: off`)", n, nc),
            ("btrfs send \\| ssh \\| btrfs receive (sshd and its sessions counted)", s, sc),
        ] {
            writeln!(out, "| {name} | {t:.2} s | {:.0} | {:.2} x | {cpu:.2} |", mb / t, l / t).unwrap();
        }
        let (pl, pq, pn) = (median(p_local), median(p_quic), median(p_lan));
        writeln!(out, "\nOne core per side (`taskset`: origin processes on CPU 1, replica processes on CPU 0):\n").unwrap();
        writeln!(out, "| path | median time | MB/s | vs local pipe |\n|---|---|---|---|").unwrap();
        for (name, t) in [("local pipe", pl), ("snapship over QUIC", pq), ("snapship over the LAN path", pn)] {
            writeln!(out, "| {name} | {t:.2} s | {:.0} | {:.2} x |", mb / t, pl / t).unwrap();
        }
        verdicts.push(("LAN path full send >= 0.97 x local pipe", l / n >= 0.97, format!("{:.2} x", l / n)));
        verdicts.push(("QUIC full send (incompressible) >= 0.95 x local pipe", l / q >= 0.95, format!("{:.2} x", l / q)));
        c.stop("beta");
        drop(c);
    }

    // ---- Continuous mode RPO -------------------------------------------------------------
    if want("rpo") {
        eprintln!("continuous mode RPO: 60 s of writes at ~10 MB/s");
        let mut c = Cluster::with_size("bench_rpo", &["alpha", "beta"], 8 * 1024);
        let rpo_src = c.fs["alpha"].subvolume("rpo");
        let rpo_dst = c.mnt("beta").join("rpo");
        let rpo_policy = policy_named("rpo", &rpo_src, &rpo_dst)
            .replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: continuous\ncontinuous:\n  min_interval: 500ms\n");
        c.configure("alpha", &[("rpo", rpo_policy.clone())]);
        c.configure("beta", &[("rpo", rpo_policy)]);
        c.start("beta");
        c.start("alpha");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (rpo_src.join("log"), stop.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // 100 records of 1 KiB every 10 ms: ~10 MB/s
                    for _ in 0..100 {
                        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
                        let mut rec = format!("{n} {ts} ");
                        rec.push_str(&"x".repeat(1023 - rec.len()));
                        rec.push('\n');
                        f.write_all(rec.as_bytes()).unwrap();
                        n += 1;
                    }
                    let due = start + Duration::from_millis(10 * (n / 100));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };
        let mut lags = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
            if t0.elapsed() < Duration::from_secs(5) {
                continue; // the first full send
            }
            if let Some(ts) = last_record_time(&rpo_dst.join("latest/log")) {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
                lags.push((now.saturating_sub(ts)) as f64 / 1e9);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        let (p50, p99, max) = (percentile(&lags, 0.5), percentile(&lags, 0.99), percentile(&lags, 1.0));
        writeln!(out, "\n## Continuous mode RPO (one run, 55 s measured, writes at ~10 MB/s, min_interval 500ms)\n").unwrap();
        writeln!(out, "Age of the newest record visible in the replica's `latest`, sampled every 50 ms ({} samples):\n\n| p50 | p99 | max |\n|---|---|---|\n| {p50:.2} s | {p99:.2} s | {max:.2} s |", lags.len()).unwrap();
        verdicts.push(("RPO p99 <= 2 s", p99 <= 2.0, format!("{p99:.2} s")));
        c.stop("alpha");
        c.stop("beta");
        drop(c);
    }

    // ---- Peak RSS during a 4 GiB stream ---------------------------------------------------
    if want("rss") {
        eprintln!("peak RSS during a 4 GiB stream");
        let mut c = Cluster::with_size("bench_rss", &["alpha", "beta"], 12 * 1024);
        let src = c.fs["alpha"].subvolume("big");
        generate_big(&src, 64);
        let dst = c.mnt("beta").join("big");
        let p = policy_named("big", &src, &dst);
        c.configure("alpha", &[("big", p.clone())]);
        c.configure("beta", &[("big", p)]);
        c.start("beta");
        let beta_pid = c.daemons["beta"].child.as_ref().unwrap().id();
        let mut sync = spawn_sync(&c, "big");
        let mut origin_peak = 0;
        loop {
            origin_peak = origin_peak.max(peak_rss_kib(sync.id()));
            if sync.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let replica_peak = peak_rss_kib(beta_pid);
        writeln!(out, "\n## Peak RSS during a 4 GiB stream (zstd, the default)\n\n| side | peak RSS |\n|---|---|\n| origin (`snapship sync`) | {:.1} MiB |\n| replica (`snapship run`) | {:.1} MiB |", origin_peak as f64 / 1024.0, replica_peak as f64 / 1024.0).unwrap();
        verdicts.push((
            "Peak RSS <= 64 MiB per side",
            origin_peak <= 64 * 1024 && replica_peak <= 64 * 1024,
            format!("origin {:.1} MiB, replica {:.1} MiB", origin_peak as f64 / 1024.0, replica_peak as f64 / 1024.0),
        ));
        c.stop("beta");
        drop(c);
    }

    // ---- 2,000 idle continuous file sets ----------------------------------------------------
    if want("idle") {
        idle_scale(&mut out, &mut verdicts);
    }

    // ---- The WAN: 50 and 200 ms RTT, snapship vs a TCP flow on the same path --------------
    if want("wan") {
        wan_phase(&mut out, &mut verdicts);
    }

    // ---- Catch-up after an outage ----------------------------------------------------------
    if want("catchup") {
        catch_up(&mut out);
    }

    // ---- Verify --------------------------------------------------------------------------
    if want("verify") {
        verify_phase(&mut out, &mut verdicts);
    }

    // ---- Connection faults ------------------------------------------------------------------
    if want("faults") {
        connection_faults(&mut out, &mut verdicts);
    }

    // ---- The small-change cycle alone, many times, on a small file system ---------------
    if want("cycle") {
        small_change_cycle(&mut out);
    }

    // ---- Failover and failback ----------------------------------------------------------------
    if want("failover") {
        failover_phase::run(runs(), &mut out, &mut verdicts);
    }

    // ---- Object-storage replica: upload and restore against Garage -------------------------
    if want("objstore") {
        objstore_phase::object_store(&mut out);
    }

    writeln!(out, "\n## Targets\n\n| target | met | measured |\n|---|---|---|").unwrap();
    for (t, ok, v) in &verdicts {
        writeln!(out, "| {t} | {} | {v} |", if *ok { "yes" } else { "**no**" }).unwrap();
    }
    if let Ok(notes) = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks-notes.md")) {
        writeln!(out, "\n{notes}").unwrap();
    }
    let all = std::env::var_os("SNAPSHIP_BENCH_ONLY").is_none() && runs() >= 3;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(if all { "docs/benchmarks.md" } else { "target/benchmarks-partial.md" });
    std::fs::write(&path, &out).unwrap();
    println!("{out}\nwritten to {}", path.display());
}

/// `snapship sync` of `data` on alpha, through alpha's running daemon; its time. Checks that
/// the daemon did it, and that it took exactly that one snapshot into `origin_snaps` (its own
/// schedule stays quiet during a measurement).
fn sync_through_daemon(c: &Cluster, origin_snaps: &Path) -> f64 {
    let before = snapshots(origin_snaps).len();
    let started = Instant::now();
    let out = c.sync("alpha", "data");
    let t = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sync through alpha's daemon failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("synced by the running snapship run"), "the sync did not go through alpha's daemon:\n{stderr}");
    assert_eq!(snapshots(origin_snaps).len(), before + 1, "alpha's daemon took a snapshot of its own during the measurement");
    t
}

/// The 1 MB change of the transfer phase alone (`SNAPSHIP_BENCH_ONLY=cycle`;
/// `SNAPSHIP_BENCH_CYCLES` cycles, default 15), on a small file system (200 files of 64 KiB):
/// the local pipe, the pipe followed by a sync of the receiving filesystem, and `snapship
/// sync` through alpha's running daemon, the order of pipe and daemon alternating from cycle
/// to cycle, each starting with both file systems synced. A quick, many-sample look at the
/// cycle (a minute or two); the transfer phase has the figure of record, on its large data set.
fn small_change_cycle(out: &mut String) {
    let cycles: usize = std::env::var("SNAPSHIP_BENCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(15).max(1);
    let mut c = Cluster::with_size("bench_cycle", &["alpha", "beta"], 3 * 1024);
    let src = c.fs["alpha"].subvolume("data");
    let snaps = c.mnt("alpha").join("manual");
    let rep = c.mnt("beta").to_path_buf();
    let (local_dir, ship_dir) = (rep.join("local"), rep.join("snapship"));
    std::fs::create_dir_all(&snaps).unwrap();
    std::fs::create_dir_all(&local_dir).unwrap();
    let policy = quiet_policy("data", "alpha", &src, &[("beta", ship_dir.clone())]);
    set_compression(&c, "none", &policy);
    c.configure("beta", &[("data", policy.clone())]);
    c.start("beta");
    let mut rng = Rng(0xc1c1e);
    for i in 0..200 {
        write_file(&src.join(format!("file-{i}.bin")), 64 << 10, &mut rng);
    }
    sh(&format!(
        "btrfs -q subvolume snapshot -r {} {}/c0 && btrfs send -q {}/c0 | btrfs receive -q {}",
        src.display(),
        snaps.display(),
        snaps.display(),
        local_dir.display()
    ));
    c.start("alpha");
    c.sync_ok("alpha", "data");
    let origin_snaps = c.mnt("alpha").join(".snapship/data");
    let mut prev = "c0".to_string();
    let (mut pipe, mut synced, mut daemon) = (vec![], vec![], vec![]);
    for i in 0..cycles {
        // One change per cycle, which each path ships (each from its own previous snapshot).
        write_file(&src.join(format!("change-{i}.bin")), 1 << 20, &mut rng);
        let order: [bool; 2] = if i % 2 == 0 { [true, false] } else { [false, true] };
        for is_pipe in order {
            sh(&format!("sync -f {} {}", src.display(), rep.display()));
            if is_pipe {
                let next = format!("c{}", i + 1);
                let t = timed(|| {
                    sh(&format!(
                        "btrfs -q subvolume snapshot -r {} {s}/{next} && btrfs send -q -p {s}/{prev} {s}/{next} | btrfs receive -q {}",
                        src.display(),
                        local_dir.display(),
                        s = snaps.display()
                    ));
                });
                pipe.push(t);
                synced.push(t + timed(|| sh(&format!("btrfs filesystem sync {}", local_dir.display()))));
                prev = next;
            } else {
                daemon.push(sync_through_daemon(&c, &origin_snaps));
            }
        }
    }
    c.stop("alpha");
    c.stop("beta");
    let (p, ps, d) = (median(pipe), median(synced), median(daemon));
    writeln!(out, "\n## The small-change cycle alone ({cycles} cycles on a small file system, medians; `SNAPSHIP_BENCH_ONLY=cycle`)\n").unwrap();
    writeln!(out, "| path | median time | vs local pipe | vs local pipe + sync |\n|---|---|---|---|").unwrap();
    for (name, t) in
        [("local pipe", p), ("local pipe + `btrfs filesystem sync` of the receiving filesystem", ps), ("snapship sync through alpha's running daemon", d)]
    {
        writeln!(out, "| {name} | {:.1} ms | {:.2} x | {:.2} x |", t * 1e3, t / p, t / ps).unwrap();
    }
}

/// `snapship verify` of a replica's copy (issue 15): the benchmark file set's shape (64 MiB
/// files and 20,000 small ones; 10 big files, so about 0.84 GB) verified in full, side by
/// side with `rsync -c --dry-run` between the same two trees and `sha256sum` of every file of
/// both; then the incremental verify of the next snapshot after a 1 MB change. Data in the
/// page cache for all of them (the machine is shared: no cache dropping).
/// alpha's subvolume `data` replicated to beta's `data` (compression none), the policy
/// configured on both (routes and node extras set before this call are in the configs).
/// Returns the origin subvolume and beta's replica directory.
fn data_to_beta(c: &Cluster) -> (PathBuf, PathBuf) {
    let src = c.fs["alpha"].subvolume("data");
    let dst = c.mnt("beta").join("data");
    let policy = policy("data", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("data", policy.clone())]);
    c.configure("beta", &[("data", policy)]);
    (src, dst)
}

fn verify_phase(out: &mut String, verdicts: &mut Vec<(&'static str, bool, String)>) {
    let mut c = Cluster::with_size("bench_verify", &["alpha", "beta"], 3 * 1024);
    let (src, dst) = data_to_beta(&c);
    c.start("beta");
    eprintln!("verify: generating the data set...");
    generate(&src, 10);
    sh("sync");
    c.sync_ok("alpha", "data");
    let bytes: f64 =
        String::from_utf8_lossy(&Command::new("du").args(["-sb"]).arg(&src).output().unwrap().stdout).split_whitespace().next().unwrap().parse().unwrap();
    let name = snapshots(&dst).pop().unwrap();
    let (ours, theirs) = (c.mnt("alpha").join(".snapship/data").join(&name), dst.join(&name));
    let verify = |args: &[&str]| -> (f64, String) {
        let started = Instant::now();
        let o = snapship().args(["verify", "--config"]).arg(c.dir("alpha").join("node.yaml")).arg("data").args(args).output().unwrap();
        let t = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "verify failed: {text}{}", String::from_utf8_lossy(&o.stderr));
        (t, text.lines().next().unwrap_or("").to_string())
    };
    // Warm the page cache on both trees once, so that every contender reads from memory.
    sh(&format!("find {} {} -type f -print0 | xargs -0 cat > /dev/null", ours.display(), theirs.display()));
    let (mut t_full, mut t_rsync, mut t_sha) = (vec![], vec![], vec![]);
    let mut full_line = String::new();
    for run_i in 0..runs() {
        eprintln!("verify: full, run {}", run_i + 1);
        let (t, line) = verify(&["--full"]);
        t_full.push(t);
        full_line = line;
        t_rsync.push(timed(|| sh(&format!("rsync -a -c -n --delete {}/ {}/ > /dev/null", ours.display(), theirs.display()))));
        t_sha.push(timed(|| sh(&format!("find {} {} -type f -print0 | xargs -0 sha256sum > /dev/null", ours.display(), theirs.display()))));
    }
    let (f, r, h) = (median(t_full), median(t_rsync), median(t_sha));
    writeln!(
        out,
        "\n## Verify ({:.2} GB: 10 files of 64 MiB, 20,000 files of 1-16 KiB; origin and replica on one machine, data in the page cache)\n",
        bytes / 1e9
    )
    .unwrap();
    writeln!(out, "| comparison of the two trees | median time | GB/s (both trees) | vs snapship verify --full |\n|---|---|---|---|").unwrap();
    for (what, t) in [
        ("`snapship verify --full` (BLAKE3 trees on both nodes, over QUIC)", f),
        ("`rsync -a -c -n --delete` (checksums, dry run)", r),
        ("`sha256sum` of every file of both trees", h),
    ] {
        writeln!(out, "| {what} | {t:.2} s | {:.2} | {:.2} x |", 2.0 * bytes / 1e9 / t, t / f).unwrap();
    }
    writeln!(out, "\n`verify --full` reported: `{full_line}`").unwrap();
    verdicts.push(("Full verify faster than rsync -c --dry-run", f < r, format!("{f:.2} s vs {r:.2} s")));
    verdicts.push(("Full verify faster than sha256sum of every file", f < h, format!("{f:.2} s vs {h:.2} s")));

    // Incremental: 1 MB rewritten in one big file, a snapshot shipped, verify of it (the kept
    // hashes of the last verify serve every other file).
    let mut rng = Rng(0x1e55);
    let (mut t_inc, mut inc_line) = (vec![], String::new());
    for run_i in 0..runs() {
        eprintln!("verify: incremental, run {}", run_i + 1);
        let path = src.join(format!("big/{:03}.bin", rng.below(10)));
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut mb = vec![0u8; 1 << 20];
        rng.fill(&mut mb);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(rng.below(63) << 20)).unwrap();
        std::io::Write::write_all(&mut f, &mb).unwrap();
        drop(f);
        c.sync_ok("alpha", "data");
        let (t, line) = verify(&[]);
        t_inc.push(t);
        inc_line = line;
    }
    let i = median(t_inc);
    writeln!(out, "\n| incremental verify after a 1 MB change (next snapshot) | median time |\n|---|---|").unwrap();
    writeln!(out, "| `snapship verify` (command's wall time: start, listings, QUIC, hashing, comparing) | {i:.2} s |").unwrap();
    writeln!(out, "\nIt reported: `{inc_line}`").unwrap();
    verdicts.push(("Incremental verify after a 1 MB change in ~0.8 GB < 1 s", i < 1.0, format!("{i:.2} s")));
    c.stop("beta");
    drop(c);
}

/// UDP datagrams the kernel dropped for want of receive buffer, machine-wide
/// (`RcvbufErrors` in /proc/net/snmp).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// The connection faults of issue 17, each timed: a replica restarted (SIGTERM, SIGKILL)
/// between two syncs, a replica frozen or killed in the commit phase, a 3-minute outage
/// (how soon after the link is back the replica is current), and the datagrams dropped for
/// want of socket buffer on a clean loopback transfer.
fn connection_faults(out: &mut String, verdicts: &mut Vec<(&'static str, bool, String)>) {
    use common::proxy::{Faults, Proxy};
    const STALL: u64 = 5;
    let transfers = format!("transfers:\n  stall_timeout: {STALL}s\n");
    // beta's own watchdogs wait longer: the origin is the one to notice.
    let beta_transfers = "transfers:\n  stall_timeout: 10m\n";
    let mut c = Cluster::with_size("bench_faults", &["alpha", "beta"], 4096);
    let proxy = Proxy::start(format!("127.0.0.1:{}", c.ports["beta"]).parse().unwrap());
    c.route("alpha", "beta", proxy.addr());
    c.node_extra.insert("alpha".into(), transfers.clone());
    c.node_extra.insert("beta".into(), beta_transfers.into());
    let (src, dst) = data_to_beta(&c);
    c.start("beta");
    c.start_with_env("alpha", &[("RUST_LOG", "snapship=debug,warn".into())]);
    std::fs::write(src.join("f"), "0").unwrap();
    c.sync_ok("alpha", "data");
    let log = |c: &Cluster, n: &str| c.daemons.get(n).map(|d| d.log_text()).unwrap_or_default();

    // A restart between two syncs: the second sync's time.
    let restart = |c: &mut Cluster, kill: bool, i: usize| {
        if kill {
            c.kill9("beta");
        } else {
            c.stop("beta");
        }
        c.start("beta");
        std::thread::sleep(Duration::from_secs(3));
        std::fs::write(src.join("f"), format!("{kill} {i}")).unwrap();
        timed(|| {
            c.sync_ok("alpha", "data");
        })
    };
    let term: Vec<f64> = (0..runs()).map(|i| restart(&mut c, false, i)).collect();
    let kill: Vec<f64> = (0..runs()).map(|i| restart(&mut c, true, i)).collect();

    // Dead in the commit phase: the receive frozen (the stream goes whole into the spool),
    // the end sent, then beta frozen or killed.
    let commit = |c: &mut Cluster, kill_it: bool, i: usize| -> f64 {
        write_random(&src.join("big.bin"), 64 << 20, 70 + i as u64);
        let receive = format!("btrfs receive.*{}", dst.display());
        let sent = "stream sent, waiting for the commit";
        let (already_sent, already_failed) = (log(c, "alpha").matches(sent).count(), log(c, "alpha").matches("failed in the commit phase").count());
        let mut sync = spawn_sync(c, "data");
        let pgrep = |pattern: &str| {
            String::from_utf8_lossy(&Command::new("pgrep").args(["-f", pattern]).output().unwrap().stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while pgrep(&receive).is_empty() {
            assert!(Instant::now() < deadline, "no receive started");
            std::thread::sleep(Duration::from_millis(20));
        }
        let signal = |sig: &str, pids: &[String]| pids.iter().for_each(|p| drop(Command::new("kill").args([sig, p]).status()));
        let receives = pgrep(&receive);
        signal("-STOP", &receives);
        while log(c, "alpha").matches(sent).count() <= already_sent {
            std::thread::sleep(Duration::from_millis(20));
        }
        let beta = c.daemons["beta"].child.as_ref().unwrap().id().to_string();
        if kill_it {
            c.kill9("beta");
        } else {
            signal("-STOP", std::slice::from_ref(&beta));
        }
        let dead = Instant::now();
        while log(c, "alpha").matches("failed in the commit phase").count() <= already_failed {
            assert!(dead.elapsed() < Duration::from_secs(120), "alpha never noticed:\n{}", log(c, "alpha"));
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = dead.elapsed().as_secs_f64();
        let _ = sync.wait();
        if kill_it {
            signal("-KILL", &receives);
            wait_for_no_process(&receive);
            c.start("beta");
        } else {
            signal("-CONT", std::slice::from_ref(&beta));
            signal("-CONT", &receives);
        }
        c.sync_ok("alpha", "data");
        took
    };
    let frozen: Vec<f64> = (0..runs()).map(|i| commit(&mut c, false, i)).collect();
    let killed: Vec<f64> = (0..runs()).map(|i| commit(&mut c, true, 10 + i)).collect();

    // A 3-minute outage while a change waits: how soon after the link is back beta has it.
    eprintln!("connection faults: a 3-minute outage");
    proxy.set(Faults::blackhole());
    std::fs::write(src.join("f"), "outage").unwrap();
    let held = snapshots(&dst).len();
    let mut sync = spawn_sync(&c, "data");
    std::thread::sleep(Duration::from_secs(180));
    proxy.set(Faults::none());
    let back = Instant::now();
    while snapshots(&dst).len() <= held {
        assert!(back.elapsed() < Duration::from_secs(600), "beta never caught up:\n{}", log(&c, "alpha"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let outage = back.elapsed().as_secs_f64();
    let _ = sync.wait();

    // Datagrams dropped for want of receive buffer on a clean 512 MiB transfer.
    write_random(&src.join("big.bin"), 512 << 20, 99);
    let (errors_before, datagrams_before) = (udp_rcvbuf_errors(), proxy.forwarded());
    c.sync_ok("alpha", "data");
    let drops = udp_rcvbuf_errors() - errors_before;
    let wire = proxy.forwarded().0 - datagrams_before.0;
    c.stop("alpha");
    c.stop("beta");

    writeln!(out, "\n## Connection faults (alpha's stall_timeout {STALL}s, the QUIC idle timeout the same; medians of {})\n", runs()).unwrap();
    writeln!(out, "| fault | measured |\n|---|---|").unwrap();
    writeln!(out, "| replica restarted (SIGTERM) between two syncs | the second sync took {:.2} s, first attempt |", median(term.clone())).unwrap();
    writeln!(
        out,
        "| replica killed (SIGKILL) and restarted between two syncs | the second sync took {:.2} s, first attempt (the restarted replica's stateless reset) |",
        median(kill.clone())
    )
    .unwrap();
    writeln!(out, "| replica frozen (SIGSTOP) in the commit phase | noticed after {:.2} s, *failed in the commit phase* |", median(frozen.clone())).unwrap();
    writeln!(out, "| replica killed in the commit phase | noticed after {:.2} s, *failed in the commit phase* |", median(killed.clone())).unwrap();
    writeln!(
        out,
        "| 3-minute outage while a change waits (one run) | replica current {outage:.1} s after the link came back (probes every {}s during the backoff) |",
        (STALL as f64 / 4.0).clamp(1.0, 5.0)
    )
    .unwrap();
    writeln!(out, "| clean 512 MiB transfer on loopback | {drops} UDP datagrams dropped for want of receive buffer (RcvbufErrors, machine-wide); {:.1} MB through the proxy |", wire as f64 / 1e6).unwrap();
    let within = |v: &[f64]| median(v.to_vec()) <= STALL as f64 + 1.0;
    verdicts.push((
        "Connection faults noticed within stall_timeout + 1 s",
        within(&term) && within(&kill) && within(&frozen) && within(&killed) && outage <= STALL as f64 + 1.0,
        format!(
            "restart {:.2} / {:.2} s, commit phase {:.2} / {:.2} s, after an outage {outage:.1} s",
            median(term),
            median(kill),
            median(frozen),
            median(killed)
        ),
    ));
}

/// Full sends over a delayed path (benches/support/wan.rs: a network namespace behind a TUN
/// link that delays every packet) at 50 and 200 ms RTT, against a plain TCP flow of the same
/// size on the same path, side by side in each run. beta's daemon runs in the far namespace;
/// `snapship sync` on alpha here. A one-file change synced on the same path gives the fixed
/// cost of a sync (process start, QUIC and TLS handshake, the request round trips, the
/// replica's commit), from which the data phase's own throughput follows.
fn wan_phase(out: &mut String, verdicts: &mut Vec<(&'static str, bool, String)>) {
    let mib: u64 = std::env::var("SNAPSHIP_BENCH_WAN_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    let bytes = mib << 20;
    let path = wan::Wan::start(Duration::from_millis(25));
    let mut c = Cluster::with_size("bench_wan", &["alpha", "beta"], 2048);
    c.route("alpha", "beta", std::net::SocketAddr::new(path.far.into(), c.ports["beta"]));
    let src = c.fs["alpha"].subvolume("data");
    let dst = c.mnt("beta").join("wan");
    let policy = policy("data", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("data", policy.clone())]);
    let beta_conf = c.configure("beta", &[("data", policy)]);
    // beta listens on its namespace's address, not on a loopback alpha cannot reach.
    let text = std::fs::read_to_string(&beta_conf).unwrap().replace("listen: 127.0.0.1:", "listen: 0.0.0.0:");
    std::fs::write(&beta_conf, text).unwrap();
    let log = c.scratch.dir.join("beta-run.log");
    let child = path
        .exec(Path::new(env!("CARGO_BIN_EXE_snapship")))
        .arg("run")
        .arg("--config")
        .arg(&beta_conf)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    c.daemons.insert("beta".into(), Daemon { child: Some(child), log: log.clone() });
    wait_for(Duration::from_secs(20), "beta's daemon in the WAN namespace to run", || std::fs::read_to_string(&log).unwrap_or_default().contains(" running "));
    write_random(&src.join("big.bin"), bytes as usize, 17);
    sh("sync");
    let mut rows = Vec::new();
    for (rtt_ms, loss) in [(50u64, 0.0), (200, 0.0), (200, 0.001)] {
        path.set_delay(Duration::from_millis(rtt_ms / 2));
        path.set_loss(loss);
        let (mut tcp, mut quic, mut small) = (vec![], vec![], vec![]);
        for run_i in 0..runs() {
            eprintln!("WAN {rtt_ms} ms RTT, loss {loss}, run {}", run_i + 1);
            tcp.push(path.tcp_flow(bytes));
            delete_subvolumes_in(&dst);
            quic.push(timed(|| {
                c.sync_ok("alpha", "data");
            }));
            std::fs::write(src.join("small"), format!("{rtt_ms} {run_i}")).unwrap();
            small.push(timed(|| {
                c.sync_ok("alpha", "data");
            }));
        }
        rows.push((rtt_ms, loss, median(tcp), median(quic), median(small)));
    }
    c.stop("beta");
    drop(c);
    drop(path);

    let mb = bytes as f64 / 1e6;
    writeln!(out, "\n## The WAN: full send of {mib} MiB of incompressible data at 50 and 200 ms RTT (compression none)\n").unwrap();
    writeln!(out, "A TUN link into a network namespace delays every packet (no bandwidth cap; loss only in the last row, the same packets dropped each run, both ways); beta's daemon runs behind it, `snapship sync` one-shot on alpha. The TCP flow is a plain socket on the same path, the kernel's defaults (CUBIC, autotuned buffers), timed from `connect` until the sink answered that it had every byte. *Fixed cost* is a sync of a one-file change on the same path (process start, handshake, the request round trips, the replica's commit); the data phase is the full sync less that.\n").unwrap();
    writeln!(out, "| RTT | loss | TCP flow | MB/s | snapship sync | MB/s | vs TCP | fixed cost | data phase MB/s | data phase vs TCP |\n|---|---|---|---|---|---|---|---|---|---|").unwrap();
    for (rtt, loss, t, q, s) in &rows {
        let data = (q - s).max(1e-3);
        writeln!(
            out,
            "| {rtt} ms | {:.1} % | {t:.2} s | {:.1} | {q:.2} s | {:.1} | {:.2} x | {s:.2} s | {:.1} | {:.2} x |",
            loss * 100.0,
            mb / t,
            mb / q,
            t / q,
            mb / data,
            t / data
        )
        .unwrap();
    }
    let (_, _, t, q, _) = rows[1];
    verdicts.push(("WAN: snapship >= 1.0 x a TCP flow at 200 ms RTT", t / q >= 1.0, format!("{:.2} x ({:.1} vs {:.1} MB/s)", t / q, mb / q, mb / t)));
}

/// `SNAPSHIP_BENCH_IDLE` (default 2,000) idle continuous file sets on one node, each with a
/// local replica: the first start (every file set's first snapshot and send), then a
/// restart of the daemon with every file set current: its start-up time, its CPU over 60 s
/// once settled, and its memory.
fn idle_scale(out: &mut String, verdicts: &mut Vec<(&'static str, bool, String)>) {
    let n: usize = std::env::var("SNAPSHIP_BENCH_IDLE").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    eprintln!("{n} idle continuous file sets: creating them");
    let mut c = Cluster::with_size("bench_idle", &["alpha"], 4096);
    let mut policies = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..n {
        let name = format!("fs{i:04}");
        let src = c.fs["alpha"].subvolume(&name);
        std::fs::write(src.join("f"), &name).unwrap();
        let dst = c.mnt("alpha").join("replicas").join(&name);
        policies.push((name.clone(), policy_on("alpha", &name, &src, &dst).replace("mode: snapshot\nschedule: \"@hourly\"\n", "mode: continuous\n")));
        replicas.push(dst);
    }
    let refs: Vec<(&str, String)> = policies.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
    c.configure("alpha", &refs);
    eprintln!("{n} idle continuous file sets: first start");
    let first = Instant::now();
    start_slowly(&mut c, "alpha");
    let first_running = first.elapsed().as_secs_f64();
    // `SNAPSHIP_BENCH_IDLE_WAIT` (seconds, default 3600) bounds the wait: then the table says
    // how many were current by then, and the restart goes on with the rest still catching up.
    let limit = std::env::var("SNAPSHIP_BENCH_IDLE_WAIT").ok().and_then(|v| v.parse().ok()).unwrap_or(3600);
    let current = || replicas.iter().filter(|d| d.join("latest").exists()).count();
    while current() < n && first.elapsed() < Duration::from_secs(limit) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let first_current = first.elapsed().as_secs_f64();
    let current_first = current();
    let first_cpu = cpu_ticks_all(c.daemons["alpha"].child.as_ref().unwrap().id()) as f64 / 100.0;
    c.stop("alpha");

    eprintln!("{n} idle continuous file sets: restart, then 60 s idle");
    let restart = Instant::now();
    start_slowly(&mut c, "alpha");
    let running = restart.elapsed().as_secs_f64();
    let pid = c.daemons["alpha"].child.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_secs(20)); // every file set checked, then idle
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(60));
    let used = (cpu_ticks(pid) - before) as f64 / 100.0;
    let pct = used / 60.0 * 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field =
        |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let (rss, threads) = (field("VmRSS:") / 1024.0, field("Threads:"));
    let warned = c.daemons["alpha"].log_text().matches("cannot watch for changes").count();
    c.stop("alpha");
    drop(c);
    writeln!(out, "\n## {n} idle continuous file sets on one node\n").unwrap();
    writeln!(out, "Each file set a subvolume with one small file and a local replica on the same loop btrfs.\n").unwrap();
    writeln!(out, "| measured | value |\n|---|---|").unwrap();
    writeln!(
        out,
        "| first start: `snapship run` running | {first_running:.2} s |\n| first start: every file set's first snapshot on its replica | {} |",
        if current_first == n { format!("{first_current:.1} s") } else { format!("not within {first_current:.0} s: {current_first} of {n}") }
    )
    .unwrap();
    writeln!(out, "| first start: CPU until then (the daemon and its `btrfs` children) | {first_cpu:.1} s |").unwrap();
    writeln!(out, "| restart (every file set current): running | {running:.2} s |").unwrap();
    writeln!(out, "| CPU over 60 s idle, from 20 s after the restart | {used:.2} s: **{pct:.2} % of one core** |").unwrap();
    writeln!(out, "| memory (RSS) idle | {rss:.1} MiB, {threads:.0} threads |").unwrap();
    writeln!(out, "| file sets that could not watch for changes (inotify) | {warned} |").unwrap();
    verdicts.push(("Idle: 2,000 continuous file sets <= 1 % of one core", pct <= 1.0 && n >= 2000, format!("{pct:.2} % ({n} file sets)")));
}

/// `snapship run` of `node`, waiting (up to 10 minutes) until it is running: a daemon with
/// thousands of file sets may take longer than the 20 s [`Cluster::start`] allows.
fn start_slowly(c: &mut Cluster, node: &str) {
    let log = c.scratch.dir.join(format!("{node}-run.log"));
    let child = snapship().arg("run").arg("--config").arg(c.dir(node).join("node.yaml")).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    c.daemons.insert(node.into(), Daemon { child: Some(child), log: log.clone() });
    wait_for(Duration::from_secs(600), "the daemon to run", || std::fs::read_to_string(&log).unwrap_or_default().contains(" running "));
}

/// Catch-up after an outage: a hybrid file set (continuous, `min_interval` 100ms, plus a
/// schedule) on alpha, beta's daemon stopped while alpha takes `SNAPSHIP_BENCH_CATCHUP`
/// (default 1,000) continuous snapshots and 24 scheduled ones of a steadily written tree;
/// then beta comes back. Measured: the time until beta holds the newest snapshot, and until
/// the backfill of what it missed (default retention: the scheduled snapshots) is done, with the bytes through a counting proxy; against the floor, one
/// incremental from the base to the newest (its stream size, and the local pipe's time).
fn catch_up(out: &mut String) {
    use common::proxy::Proxy;
    let want_continuous: usize = std::env::var("SNAPSHIP_BENCH_CATCHUP").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    const SCHEDULED: usize = 24;
    // Expected outage: a continuous snapshot about every second here (min_interval 100ms, plus
    // the commit before each and taking it, on a loaded machine); the schedule is spread
    // over that, and what was taken is counted and reported.
    let every = (want_continuous as f64 / SCHEDULED as f64).ceil().clamp(2.0, 30.0) as u64; // a seconds field: */N fires about every N s while N <= 30
    let mut c = Cluster::with_size("bench_catchup", &["alpha", "beta"], 4096);
    let proxy = Proxy::start(format!("127.0.0.1:{}", c.ports["beta"]).parse().unwrap());
    c.route("alpha", "beta", proxy.addr());
    c.node_extra.insert("alpha".into(), "transfers:\n  stall_timeout: 10s\n".into());
    let src = c.fs["alpha"].subvolume("data");
    let dst = c.mnt("beta").join("data");
    let policy = policy("data", "alpha", &src, &[("beta", dst.clone())])
        .replace("mode: snapshot\nschedule: \"@hourly\"\n", &format!("mode: hybrid\nschedule: \"*/{every} * * * * *\"\ncontinuous:\n  min_interval: 100ms\n"))
        + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("data", policy.clone())]);
    c.configure("beta", &[("data", policy)]);
    generate_big(&src, 2);
    c.start("beta");
    c.start("alpha");
    let origin_dir = c.mnt("alpha").join(".snapship/data");
    wait_for(Duration::from_secs(120), "the first snapshot on beta", || dst.join("latest").exists());
    std::thread::sleep(Duration::from_secs(3));
    c.stop("beta");
    let base = snapshots(&dst).last().unwrap().clone();
    let taken_before = snapshots(&origin_dir).len();
    eprintln!("catch-up: beta away while alpha takes {want_continuous} continuous and {SCHEDULED} scheduled snapshots");
    // Writes: 16 KiB appended to one of 64 files every 10 ms (about 1.6 MB/s).
    let mut rng = Rng(0xca7c);
    let mut block = vec![0u8; 16 << 10];
    let started = Instant::now();
    let (mut continuous, mut scheduled) = (0, 0);
    while continuous < want_continuous || scheduled < SCHEDULED {
        use std::io::Write;
        for _ in 0..10 {
            rng.fill(&mut block);
            let f = format!("log-{:02}", rng.below(64));
            std::fs::OpenOptions::new().create(true).append(true).open(src.join(f)).unwrap().write_all(&block).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        let names = snapshots(&origin_dir);
        let new = &names[taken_before.min(names.len())..];
        continuous = new.iter().filter(|n| n.ends_with("-c")).count();
        scheduled = new.len() - continuous;
    }
    let away = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1)); // the last change's snapshot
    // The schedule keeps firing while beta catches up: what counts is what was missed by now.
    let missed_names: Vec<String> = snapshots(&origin_dir).into_iter().filter(|n| *n > base).collect();
    let (newest, missed) = (missed_names.last().unwrap().clone(), missed_names.len());
    let snaps = origin_dir.display().to_string();
    let floor_bytes: u64 = String::from_utf8_lossy(
        &Command::new("sh").arg("-c").arg(format!("btrfs send -q -p {snaps}/{base} {snaps}/{newest} | wc -c")).output().unwrap().stdout,
    )
    .trim()
    .parse()
    .unwrap();
    let floor_dir = c.mnt("beta").join("floor");
    std::fs::create_dir_all(&floor_dir).unwrap();
    let floor_time = timed(|| sh(&format!("btrfs send -q -p {snaps}/{base} {snaps}/{newest} | btrfs receive -q {}", floor_dir.display())));
    delete_subvolumes_in(&floor_dir);

    let wire0 = proxy.forwarded().0;
    let back = Instant::now();
    c.start("beta");
    // Current: beta holds the newest snapshot of the outage, or a newer one (RPO first).
    wait_for(Duration::from_secs(600), "beta to be current", || snapshots(&dst).iter().any(|n| *n >= newest));
    let (current, wire_current) = (back.elapsed().as_secs_f64(), proxy.forwarded().0 - wire0);
    // Backfill sends the missed snapshots the replica's retention keeps: with the default
    // (no keys) the scheduled ones; continuous ones only where `within` or `last` keep them.
    let backfilled: Vec<&String> = missed_names.iter().filter(|n| !n.ends_with("-c")).collect();
    wait_for(Duration::from_secs(3600), "the backfill", || {
        let held = snapshots(&dst);
        backfilled.iter().all(|n| held.contains(n))
    });
    let (done, wire_done) = (back.elapsed().as_secs_f64(), proxy.forwarded().0 - wire0);
    c.stop("alpha");
    c.stop("beta");
    drop(c);

    writeln!(out, "\n## Catch-up after an outage ({continuous} continuous and {scheduled} scheduled snapshots missed; one run)\n").unwrap();
    writeln!(out, "A hybrid file set (`min_interval` 100ms, a schedule every {every} s, compression none, default retention: backfill sends the missed scheduled snapshots) written at about 1.6 MB/s; beta's daemon stopped for {away:.0} s while alpha took {missed} snapshots, then started again (the schedule kept firing meanwhile, so a few more followed). Bytes are what went through a counting UDP proxy towards beta (QUIC, framing included). The floor is one incremental from the base to the newest.\n").unwrap();
    writeln!(out, "| | time | bytes |\n|---|---|---|").unwrap();
    writeln!(out, "| floor: one incremental, base to newest (stream size; the local pipe's time) | {floor_time:.2} s | {:.1} MB |", floor_bytes as f64 / 1e6)
        .unwrap();
    writeln!(
        out,
        "| beta current (holds the newest of the outage or newer; from its start) | {current:.2} s | {:.1} MB ({:.2} x the floor) |",
        wire_current as f64 / 1e6,
        wire_current as f64 / floor_bytes as f64
    )
    .unwrap();
    writeln!(
        out,
        "| backfill of the {} missed scheduled snapshots done | {done:.1} s | {:.1} MB ({:.2} x the floor) |",
        backfilled.len(),
        wire_done as f64 / 1e6,
        wire_done as f64 / floor_bytes as f64
    )
    .unwrap();
}

/// `snapship sync` of `fileset` on alpha in the background, reporting each replica's first
/// attempt (`--wait 0s`), its output discarded.
fn spawn_sync(c: &Cluster, fileset: &str) -> std::process::Child {
    snapship()
        .args(["sync", "--wait", "0s", "--config"])
        .arg(c.dir("alpha").join("node.yaml"))
        .arg(fileset)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// CPU seconds (user + system) of this process's waited-for children so far.
fn children_cpu() -> f64 {
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given.
    unsafe { nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: nix::libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU ticks of `pid` and of its children it waited for.
fn cpu_ticks_all(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11..15].iter().map(|v| v.parse::<u64>().unwrap()).sum()
}

/// Rewrites `node`'s config so that its `peers:` entry for `peer` allows the LAN path.
fn mark_lan(c: &Cluster, node: &str, peer: &str) {
    let path = c.dir(node).join("node.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let prefix = format!("  {peer}: ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap().to_string();
    let marked = text.replace(&format!("{line}\n"), &format!("{prefix}{{ address: {}, encryption: off }}\n", &line[prefix.len()..]));
    std::fs::write(&path, marked).unwrap();
}

fn sysinfo_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo").unwrap().lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()).unwrap_or(0)
        / 1024
        / 1024
}

fn generate_big(dir: &Path, files: usize) {
    let mut rng = Rng(0xb16);
    for i in 0..files {
        write_file(&dir.join(format!("{i:03}.bin")), 64 << 20, &mut rng);
    }
    sh("sync");
}

fn policy_named(name: &str, src: &Path, dst: &Path) -> String {
    policy(name, "alpha", src, &[("beta", dst.to_path_buf())])
}

fn policy_on(node: &str, name: &str, src: &Path, dst: &Path) -> String {
    policy(name, node, src, &[(node, dst.to_path_buf())])
}

/// The timestamp of the last whole record of a log file.
fn last_record_time(path: &Path) -> Option<u128> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(4096);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = String::new();
    f.read_to_string(&mut buf).ok()?;
    let last = buf.trim_end_matches('\n').rsplit('\n').next()?;
    last.split(' ').nth(1)?.parse().ok()
}
