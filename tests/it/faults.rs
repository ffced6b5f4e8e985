//! Fault injection: two nodes (alpha the origin, beta the replica) running `snapship run`,
//! with a UDP proxy between them that cuts, stalls, drops, delays, reorders and corrupts
//! packets on the tests' command; and processes killed with SIGKILL, a replica filesystem
//! that fills up, and a peer that sends malformed frames.
//!
//! Each case asserts that nothing was lost (the replica ends up identical to the origin),
//! nothing partial was ever visible (only complete, read-only received snapshots in the
//! replica directory; staging empty at the end), and that the transfer completes once the
//! fault clears. The cut cases also bound the bytes sent twice.
//!
//! (A peer with a wrong certificate and an origin whose policy names another replica path
//! are in tests/quic.rs, `refusals_write_nothing`; a byte flipped after the checksums in
//! `corrupted_byte_is_caught_and_retry_succeeds`.)

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::cluster::*;
use crate::common::proxy::{Faults, Proxy};
use crate::common::*;

/// Short enough for tests, long enough for a loaded 2-core machine not to trip it.
const TRANSFERS: &str = "transfers:\n  stall_timeout: 3s\n  resume_window: 10m\n";

struct Setup {
    c: Cluster,
    proxy: Proxy,
    src: PathBuf,
    dst: PathBuf,
}

/// alpha ships `projects` to beta through a proxy; both daemons running.
fn setup(test: &str, sizes: (u64, u64), policy_extra: &str) -> Setup {
    setup_with(test, sizes, policy_extra, TRANSFERS)
}

/// As [`setup`], with beta's own `transfers:` section.
fn setup_with(test: &str, sizes: (u64, u64), policy_extra: &str, beta_transfers: &str) -> Setup {
    let mut c = Cluster::with_sizes(test, &[("alpha", sizes.0), ("beta", sizes.1)]);
    let proxy = Proxy::start(format!("127.0.0.1:{}", c.ports["beta"]).parse().unwrap());
    c.route("alpha", "beta", proxy.addr());
    c.node_extra.insert("alpha".into(), TRANSFERS.into());
    c.node_extra.insert("beta".into(), beta_transfers.into());
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n" + policy_extra;
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    c.start("beta");
    c.start("alpha");
    Setup { c, proxy, src, dst }
}

impl Setup {
    /// Starts `snapship sync` (carried out by alpha's daemon) without waiting for it.
    fn start_sync(&self) -> Child {
        snapship()
            .args(["sync", "--wait", "0s", "--config"])
            .arg(self.c.dir("alpha").join("node.yaml"))
            .arg("projects")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until the proxy has carried `bytes` towards beta.
    fn wait_forwarded(&self, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.proxy.forwarded().0 < bytes {
            assert!(Instant::now() < deadline, "the transfer never got to {bytes} bytes (at {})", self.proxy.forwarded().0);
            self.assert_nothing_partial();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until beta holds `n` snapshots, checking all along that nothing partial shows.
    /// A snapshot is moved into place a moment before `latest` is repointed to it: wait for
    /// both.
    fn wait_snapshots(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(180);
        let latest_is_newest = || {
            let newest = snapshots(&self.dst).pop();
            newest.is_some() && std::fs::read_link(self.dst.join("latest")).ok().map(|l| l.to_string_lossy().into_owned()) == newest
        };
        while snapshots(&self.dst).len() < n || !latest_is_newest() {
            self.assert_nothing_partial();
            assert!(
                Instant::now() < deadline,
                "beta never got {n} snapshots:\nalpha:\n{}\nbeta:\n{}",
                self.c.daemons.get("alpha").map(|d| d.log_text()).unwrap_or_default(),
                self.c.daemons.get("beta").map(|d| d.log_text()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every visible entry of the replica directory is a complete received snapshot.
    fn assert_nothing_partial(&self) {
        assert_nothing_partial(&self.dst);
    }

    /// After the fault cleared: identical trees, staging empty.
    fn assert_replica_complete(&self) {
        assert_same_tree(&self.src, &self.dst.join("latest"));
        self.assert_nothing_partial();
        let staging = staging_leftovers(&self.dst);
        assert!(staging.is_empty(), "left in staging: {staging:?}");
    }

    /// alpha's status entry for beta.
    fn replica_status(&self) -> serde_json::Value {
        self.c.status_json("alpha")["origin_of"][0]["replicas"][0].clone()
    }
}

/// The `hello` frame a real origin opens every request with.
fn hello_frame() -> Vec<u8> {
    use snapship::ship::protocol::{Message, VERSION};
    snapship::ship::frame::Frame::message(&Message::Hello { version: VERSION }.to_json()).to_vec()
}

/// A `begin` for `projects` as alpha would send it in epoch 0, of `snapshot` with `identity`.
fn begin_of(snapshot: &str, identity: &str) -> snapship::ship::protocol::Message {
    snapship::ship::protocol::Message::Begin {
        fileset: "projects".into(),
        snapshot: snapshot.into(),
        identity: identity.into(),
        base: None,
        compression: snapship::ship::protocol::WireCompression::None,
        compact: false,
        resume: None,
        from_token: false,
        epoch: snapship::store::Epoch { number: 0, origin: "alpha".into() },
        lan: false,
    }
}

impl Setup {
    /// Plays a hostile alpha (its own valid certificate) to beta, through the proxy: each
    /// payload on a stream of its own, as raw bytes; beta's answer to each (after any `ready`
    /// and acknowledgements), as text.
    fn as_alpha(&self, payloads: Vec<(&str, Vec<u8>)>) -> Vec<String> {
        use snapship::ship::protocol::Message;
        let config = snapship::config::load(&self.c.dir("alpha").join("node.yaml")).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let connector = snapship::ship::quic::Connector::new(&config.node).unwrap();
            let conn = connector.connect("beta", &self.proxy.addr().to_string()).await.unwrap();
            let mut replies = Vec::new();
            for (what, bytes) in payloads {
                let mut handle = conn.handle();
                let (recv, mut send) = handle.open_bidirectional_stream().await.unwrap().split();
                use tokio::io::AsyncWriteExt;
                // The replica may refuse before it has read everything and reset the stream:
                // then the write or the close fails here, and its answer is still to be read.
                if send.write_all(&bytes).await.is_ok() {
                    let _ = send.close().await;
                }
                let mut frames = snapship::ship::frame::FrameReader::new(recv);
                let answer = async {
                    loop {
                        match snapship::ship::transfer::read_message(&mut frames).await {
                            Ok(Message::Ready | Message::Ack { .. }) => continue,
                            other => return other,
                        }
                    }
                };
                let reply = tokio::time::timeout(Duration::from_secs(20), answer).await;
                replies.push(format!("{what}: {reply:?}"));
            }
            replies
        })
    }
}

/// What a receive left in the replica's staging directory (its lock file aside).
fn staging_leftovers(dst: &Path) -> Vec<String> {
    visible(&dst.join(".snapship-staging")).into_iter().filter(|n| n != ".lock").collect()
}

fn assert_nothing_partial(dst: &Path) {
    for name in snapshots(dst) {
        let path = dst.join(&name);
        // A snapshot being deleted by pruning may vanish between listing and looking.
        if !path.exists() {
            continue;
        }
        let facts = subvol(&path);
        assert!(facts.read_only && facts.received.is_some(), "{name} is visible but not a complete received snapshot: {facts:?}");
    }
}

fn finished(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A 1 GiB transfer cut twice: at about 30 % the network goes dark (blackhole), at about 70 %
/// it stalls (small packets pass, so QUIC stays up, but no data gets through). Each time the
/// origin notices within the stall timeout, and when the network is back the transfer goes
/// on from what the replica acknowledged: less than 10 % of the stream is sent twice.
#[test]
fn cuts_at_30_and_70_percent_resume_without_resending() {
    require_root!();
    const SIZE: u64 = 1 << 30;
    let s = setup("faults_cuts", (1600, 1600), "");
    write_random(&s.src.join("big.bin"), SIZE as usize, 41);
    let sync = s.start_sync();

    for (at, faults, what) in [(3 * SIZE / 10, Faults::blackhole(), "blackhole"), (7 * SIZE / 10, Faults::stall(), "stall")] {
        s.wait_forwarded(at);
        let failed_before = s.replica_status()["transfers_failed"].as_u64().unwrap();
        s.proxy.set(faults);
        let cut = Instant::now();
        eprintln!("{what} at {} bytes forwarded", s.proxy.forwarded().0);
        // Until the origin gave up on the transfer (its stall timeout), and a moment more
        // for the replica's.
        let deadline = cut + Duration::from_secs(60);
        while s.replica_status()["transfers_failed"].as_u64().unwrap() == failed_before {
            assert!(Instant::now() < deadline, "alpha never noticed the {what}:\n{}", s.c.daemons["alpha"].log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{what} noticed after {:.1}s", cut.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_secs(1));
        assert!(snapshots(&s.dst).is_empty(), "a snapshot appeared while the network was cut");
        s.proxy.set(Faults::none());
    }
    let cleared = Instant::now();
    let (ok, text) = finished(sync);
    assert!(!ok, "the first attempt cannot have succeeded through the cut: {text}");
    s.wait_snapshots(1);
    eprintln!("complete {:.1}s after the second fault cleared", cleared.elapsed().as_secs_f64());
    s.assert_replica_complete();

    let r = s.replica_status();
    let (sent, shipped, resumes) = (r["bytes_sent"].as_u64().unwrap(), r["bytes_shipped"].as_u64().unwrap(), r["resumes"].as_u64().unwrap());
    let resent = sent.saturating_sub(shipped);
    eprintln!("stream {shipped} bytes, sent {sent}, re-sent {resent} ({:.2} %), {resumes} resumes", 100.0 * resent as f64 / shipped as f64);
    assert!(shipped > SIZE, "{r}");
    assert!(resumes >= 2, "both cuts should have been resumed: {r}");
    assert!(resent * 10 < shipped, "re-sent {resent} of {shipped} bytes: {r}");
    let log = s.c.daemons["alpha"].log_text();
    assert!(log.contains("stall timeout"), "alpha never reported the stall:\n{log}");
}

/// The replica's daemon dies (SIGKILL) mid-transfer: its receive dies with it. Restarted, it
/// shows nothing partial, clears its staging, and the origin's retry delivers everything.
#[test]
fn replica_killed_mid_transfer_cleans_up_and_completes() {
    require_root!();
    let mut s = setup("faults_kill_replica", (700, 700), "");
    write_random(&s.src.join("big.bin"), 256 << 20, 42);
    let sync = s.start_sync();
    s.wait_forwarded(100 << 20);
    s.c.kill9("beta");
    eprintln!("beta killed at {} bytes forwarded", s.proxy.forwarded().0);
    wait_for_no_process(&format!("receive.*{}", s.dst.display()));
    s.assert_nothing_partial();
    assert!(snapshots(&s.dst).is_empty());
    let _ = finished(sync);
    s.c.start("beta");
    let restarted = Instant::now();
    s.wait_snapshots(1);
    eprintln!("complete {:.1}s after beta restarted", restarted.elapsed().as_secs_f64());
    s.assert_replica_complete();
    let r = s.replica_status();
    eprintln!("stream {} bytes, sent {} in all", r["bytes_shipped"], r["bytes_sent"]);
}

/// The origin's daemon dies (SIGKILL) mid-transfer. The replica keeps what it received; the
/// restarted origin finds it listed as partial, checks the regenerated stream against it and
/// goes on from there.
#[test]
fn origin_killed_mid_transfer_resumes_after_restart() {
    require_root!();
    const SIZE: u64 = 256 << 20;
    let mut s = setup("faults_kill_origin", (700, 700), "");
    write_random(&s.src.join("big.bin"), SIZE as usize, 43);
    let sync = s.start_sync();
    s.wait_forwarded(SIZE / 2);
    s.c.kill9("alpha");
    eprintln!("alpha killed at {} bytes forwarded", s.proxy.forwarded().0);
    let _ = finished(sync);
    assert!(snapshots(&s.dst).is_empty());
    s.c.start("alpha");
    let restarted = Instant::now();
    s.wait_snapshots(1);
    eprintln!("complete {:.1}s after alpha restarted", restarted.elapsed().as_secs_f64());
    s.assert_replica_complete();
    let r = s.replica_status();
    eprintln!("after the restart: stream {} bytes, sent {}", r["bytes_shipped"], r["bytes_sent"]);
    // Resumed once, at the first attempt: the listing it resumed from may be behind what the
    // killed origin's connection still fed the replica afterwards (it took that resume too,
    // `role_tests::a_resume_from_a_listing_the_dead_origins_connection_overtook_is_taken`).
    assert_eq!(r["resumes"].as_u64(), Some(1), "the restarted origin should have resumed once: {r}");
    assert_eq!(r["transfers_failed"].as_u64(), Some(0), "the resumed transfer failed first: {r}");
    // Sent since the restart: what the replica did not hold yet.
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(sent < SIZE * 6 / 10, "the restarted origin sent {sent} bytes of a {SIZE} byte stream");
    let beta = s.c.daemons["beta"].log_text();
    assert!(beta.contains("resuming a cut transfer"), "{beta}");
}

/// The replica's filesystem fills up mid-receive: the origin's status names the problem, the
/// partial receive is removed, the origin keeps its snapshots and the common base, and once
/// space is freed the next sync succeeds.
#[test]
fn full_replica_filesystem_is_reported_and_recovers() {
    require_root!();
    let mut s = setup("faults_full", (700, 512), "");
    std::fs::write(s.src.join("small.txt"), "first").unwrap();
    s.c.sync_ok("alpha", "projects");
    let base = snapshots(&s.dst);
    assert_eq!(base.len(), 1);

    // Leave about 80 MiB free on beta, then send 200 MiB.
    let ballast = s.c.mnt("beta").join("ballast.bin");
    let free = nix::sys::statvfs::statvfs(s.c.mnt("beta")).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    write_random(&ballast, free.saturating_sub(80 << 20) as usize, 44);
    run(&mut std::process::Command::new("sync"));
    write_random(&s.src.join("big.bin"), 200 << 20, 45);
    let out = s.c.sync("alpha", "projects");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("NoSpace") && text.contains("no space left on the replica"), "{text}");
    let status = s.replica_status();
    let error = status["last_error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("no space left on the replica"), "status does not say: {status}");
    // Nothing partial; the base is still on both sides.
    assert_eq!(snapshots(&s.dst), base);
    assert!(s.c.mnt("alpha").join(".snapship/projects").join(&base[0]).exists(), "the origin lost the common base");
    let staging = staging_leftovers(&s.dst);
    assert!(staging.is_empty(), "the partial receive was left: {staging:?}");

    eprintln!("reported: {error}");
    std::fs::remove_file(&ballast).unwrap();
    run(&mut std::process::Command::new("sync"));
    let text = s.c.sync_ok("alpha", "projects");
    assert!(text.contains("-> beta: incremental"), "{text}");
    s.assert_replica_complete();
    s.c.stop("alpha");
    s.c.stop("beta");
}

/// A bad network, not a cut: loss, delay with jitter, reordering and corrupted datagrams
/// (which QUIC's packet protection rejects). The stream arrives whole and checked.
#[test]
fn lossy_network_still_delivers() {
    require_root!();
    let s = setup("faults_lossy", (500, 500), "");
    write_random(&s.src.join("big.bin"), 16 << 20, 46);
    fill(&s.src, 47);
    s.proxy.set(Faults { drop: 0.02, delay: Duration::from_millis(5), jitter: Duration::from_millis(3), reorder: 0.02, corrupt: 0.005, ..Faults::default() });
    let start = Instant::now();
    s.c.sync_ok("alpha", "projects");
    eprintln!("lossy: {:.1}s, {} datagrams dropped, {:?} bytes forwarded", start.elapsed().as_secs_f64(), s.proxy.dropped(), s.proxy.forwarded());
    assert!(s.proxy.dropped() > 0, "the proxy dropped nothing: the test tested nothing");
    s.assert_replica_complete();
}

/// A peer with a valid certificate that speaks garbage: random bytes, an oversized frame, a
/// message that is not JSON, a transfer whose data frame is cut in half. The replica refuses
/// each, shows nothing, keeps running, and the next real transfer succeeds.
#[test]
fn malformed_and_truncated_frames_are_refused() {
    require_root!();
    let s = setup("faults_frames", (400, 400), "");
    fill(&s.src, 48);
    use snapship::ship::frame::Frame;
    let hello = hello_frame();
    let begin = [hello.clone(), Frame::message(&begin_of("snapship-20260101T000000.000Z", "00000000-0000-0000-0000-000000000000").to_json()).to_vec()].concat();
    let mut oversized = hello.clone();
    oversized.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff]);
    let not_json = [hello.clone(), Frame::message(b"{not json").to_vec()].concat();
    let mut half_frame = begin.clone();
    let chunk = vec![7u8; 1000];
    half_frame.extend_from_slice(&Frame::data_header(&chunk));
    half_frame.extend_from_slice(&chunk[..500]);
    let replies = s.as_alpha(vec![
        ("garbage", (0..300u32).map(|i| (i * 37 % 256) as u8).collect()),
        ("oversized", oversized),
        ("not json", not_json),
        ("half a data frame", half_frame),
    ]);
    for r in &replies {
        eprintln!("{r}");
        assert!(r.contains("Error {"), "the replica did not refuse: {r}");
    }
    assert!(replies[0].contains("BadRequest") && replies[0].contains("unknown frame kind"), "{}", replies[0]);
    assert!(replies[1].contains("BadRequest") && replies[1].contains("exceeds the limit"), "{}", replies[1]);
    assert!(replies[2].contains("BadRequest") && replies[2].contains("malformed message"), "{}", replies[2]);
    assert!(replies[3].contains("Aborted") && replies[3].contains("ended inside a frame"), "{}", replies[3]);
    assert!(snapshots(&s.dst).is_empty());

    // The replica is unharmed: a real transfer goes through (and replaces the bogus partial).
    s.c.sync_ok("alpha", "projects");
    s.assert_replica_complete();
}

/// A compromised origin (alpha's own valid certificate) sends a burst of snapshots dated a
/// year ahead: retention files snapshots by the time in their names, so they would fill every
/// bucket and push the real history out. The replica refuses each before anything is
/// written, and its history stays.
#[test]
fn future_dated_snapshots_are_refused_and_history_stays() {
    require_root!();
    let s = setup("faults_future", (400, 400), "retention:\n  replica: { last: 3 }\n");
    fill(&s.src, 50);
    s.c.sync_ok("alpha", "projects");
    std::fs::write(s.src.join("second.txt"), "two").unwrap();
    s.c.sync_ok("alpha", "projects");
    let history = snapshots(&s.dst);
    assert_eq!(history.len(), 2, "{history:?}");
    use snapship::ship::frame::Frame;
    let burst = (1..=6)
        .map(|month| {
            let begin = begin_of(&format!("snapship-2099{month:02}01T000000.000Z"), &format!("00000000-0000-0000-0000-00000000000{month}"));
            ("future-dated", [hello_frame(), Frame::message(&begin.to_json()).to_vec()].concat())
        })
        .collect();
    let replies = s.as_alpha(burst);
    for r in &replies {
        assert!(r.contains("BadRequest") && r.contains("ahead of this replica's clock"), "not refused: {r}");
    }
    assert_eq!(snapshots(&s.dst), history, "the burst changed the replica's history");
    // A real snapshot still arrives, and retention keeps by what it can trust.
    std::fs::write(s.src.join("third.txt"), "three").unwrap();
    s.c.sync_ok("alpha", "projects");
    let after = snapshots(&s.dst);
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(history.iter().all(|h| after.contains(h)), "history was pruned: {history:?} -> {after:?}");
}

/// Stuck processes: the origin's `btrfs send` and then the replica's `btrfs receive` are
/// frozen (SIGSTOP) mid-transfer. Each is noticed within the stall timeout, killed and
/// reported, and the transfer completes (resuming after the stuck send).
#[test]
fn stuck_send_and_receive_are_killed_and_the_transfer_completes() {
    require_root!();
    // beta waits longer for data than alpha for its send: the origin's own watchdog must act.
    let s = setup_with("faults_stuck", (700, 700), "", "transfers:\n  stall_timeout: 8s\n");
    write_random(&s.src.join("big.bin"), 256 << 20, 49);
    let freeze = |pattern: &str| {
        let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().unwrap();
        let pids = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert!(!pids.is_empty(), "no process matches `{pattern}`");
        for pid in pids {
            let _ = std::process::Command::new("kill").args(["-STOP", &pid]).status();
        }
    };
    let sync = s.start_sync();
    s.wait_forwarded(60 << 20);
    freeze(&format!("btrfs send.*{}", s.c.mnt("alpha").join(".snapship/projects").display()));
    let frozen = Instant::now();
    let _ = finished(sync);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.c.daemons["alpha"].log_text().contains("produced no data") {
        assert!(Instant::now() < deadline, "alpha never noticed its stuck send:\n{}", s.c.daemons["alpha"].log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("stuck send killed {:.1}s after it froze", frozen.elapsed().as_secs_f64());
    // The retry resumes; freeze the receive while it runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.c.daemons["beta"].log_text().contains("resuming a cut transfer") {
        assert!(Instant::now() < deadline, "alpha never resumed:\n{}", s.c.daemons["beta"].log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    freeze(&format!("btrfs receive.*{}", s.dst.display()));
    let frozen = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.c.daemons["beta"].log_text().contains("it was killed") && !s.c.daemons["beta"].log_text().contains("killing it") {
        assert!(Instant::now() < deadline, "beta never killed its stuck receive:\n{}", s.c.daemons["beta"].log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("stuck receive killed {:.1}s after it froze", frozen.elapsed().as_secs_f64());
    s.wait_snapshots(1);
    s.assert_replica_complete();
    let r = s.replica_status();
    assert!(r["resumes"].as_u64().unwrap() >= 1, "{r}");
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// What the hostile peer saw, counted by its tasks.
#[derive(Default)]
struct Seen {
    streams_opened: std::sync::atomic::AtomicUsize,
    timed_out: std::sync::atomic::AtomicUsize,
}

/// A listed peer with a valid certificate (gamma, in beta's `peers` but origin of nothing)
/// attacks beta while alpha ships a real snapshot to it: six connections at once (beta
/// admits four), a message frame announcing 1 MiB, and then 1,000 request streams that drip
/// their hello one byte a second. Beta refuses the oversized frame without reading it,
/// resets each dripping stream after the first-request time limit, lets the rest wait in
/// QUIC, and serves alpha's transfer meanwhile: it completes, identical, with beta's peak
/// memory bounded.
#[test]
fn a_flood_of_slow_streams_and_an_oversized_message_leave_the_replica_serving() {
    require_root!();
    use std::sync::atomic::Ordering;
    let mut c = Cluster::with_sizes("faults_flood", &[("alpha", 700), ("beta", 700), ("gamma", 200)]);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    c.configure("gamma", &[]);
    c.start("beta");
    let beta_pid = c.daemons["beta"].child.as_ref().unwrap().id();
    let beta_addr = format!("127.0.0.1:{}", c.ports["beta"]);
    write_random(&src.join("big.bin"), 200 << 20, 50);
    fill(&src, 51);

    let gamma = snapship::config::load(&c.dir("gamma").join("node.yaml")).unwrap();
    let seen = std::sync::Arc::new(Seen::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let oversized = rt.block_on(async {
        use snapship::ship::frame::{Frame, FrameReader};
        use snapship::ship::protocol::{Message, VERSION};
        use tokio::io::AsyncWriteExt;
        let connector = std::sync::Arc::new(snapship::ship::quic::Connector::new(&gamma.node).unwrap());
        let mut conns = Vec::new();
        for _ in 0..6 {
            conns.push(connector.connect("beta", &beta_addr).await.unwrap());
        }
        // A message frame announcing 1 MiB, then nothing: refused from its header.
        let mut handle = conns[0].handle();
        let (recv, mut send) = handle.open_bidirectional_stream().await.unwrap().split();
        // (beta may answer and stop the stream before the flush: the reply tells.)
        let _ = send.write_all(&Frame::message(&Message::Hello { version: VERSION }.to_json())).await;
        let _ = send.write_all(&[1, 0, 0x10, 0, 0]).await;
        let _ = send.flush().await;
        let reply = tokio::time::timeout(Duration::from_secs(20), snapship::ship::transfer::read_message(&mut FrameReader::new(recv))).await;
        // 1,000 streams over the connections beta kept, each dripping its hello.
        let hello = Frame::message(&Message::Hello { version: VERSION }.to_json()).to_vec();
        for i in 0..1000 {
            let mut handle = conns[i % conns.len()].handle();
            let (seen, hello) = (seen.clone(), hello.clone());
            tokio::spawn(async move {
                let Ok(stream) = handle.open_bidirectional_stream().await else { return };
                seen.streams_opened.fetch_add(1, Ordering::Relaxed);
                let (recv, mut send) = stream.split();
                let mut frames = FrameReader::new(recv);
                let drip = async {
                    for b in hello {
                        if send.write_all(&[b]).await.is_err() || send.flush().await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    reply = snapship::ship::transfer::read_message(&mut frames) => {
                        if format!("{reply:?}").contains("within 10s") {
                            seen.timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ = drip => {}
                }
            });
        }
        // Keep the connections (the tasks hold handles only) for as long as the runtime runs.
        tokio::spawn(async move {
            let _conns = conns;
            std::future::pending::<()>().await
        });
        format!("{reply:?}")
    });
    eprintln!("oversized message frame: {oversized}");
    assert!(oversized.contains("BadRequest") && oversized.contains("message frame of 1048576 bytes exceeds the limit of 65536"), "{oversized}");

    // The real transfer, while the flood goes on (the hostile tasks run on `rt`'s threads).
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let out = c.sync_ok("alpha", "projects");
    eprintln!("real transfer under the flood: {:.1}s", start.elapsed().as_secs_f64());
    assert!(out.contains("-> beta: full"), "{out}");
    assert_same_tree(&src, &dst.join("latest"));
    assert_nothing_partial(&dst);
    // Long enough for at least one round of dripping streams to hit the time limit.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.timed_out.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no dripping stream was reset after the first-request time limit");
        std::thread::sleep(Duration::from_millis(200));
    }
    let hwm = peak_rss(beta_pid);
    let (opened, timed_out) = (seen.streams_opened.load(Ordering::Relaxed), seen.timed_out.load(Ordering::Relaxed));
    eprintln!(
        "beta peak RSS (VmHWM) {:.1} MiB; hostile streams opened {opened} of 1000, {timed_out} reset after the time limit",
        hwm as f64 / (1 << 20) as f64
    );
    assert!(hwm < 150 << 20, "beta's peak RSS was {hwm} bytes");
    rt.shutdown_background();

    let log = c.daemons["beta"].log_text();
    assert!(
        log.contains("refusing a connection from node \"gamma\"") && log.contains("connections open (the limit per peer)"),
        "beta did not log the refused connections:\n{log}"
    );
    assert!(log.contains("requests under way (the limit)"), "beta did not log the saturated request slots:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    c.stop("beta");
}
