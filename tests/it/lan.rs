//! The LAN path (src/ship/lan.rs): real nodes on loop btrfs, the control conversation over
//! real QUIC, the stream over real TCP. It delivers identical trees and is really used (the
//! replica logs it); a replica that does not mark the origin receives over QUIC instead; a
//! byte changed on the TCP connection fails its MAC and nothing reaches the replica's file
//! set; a cut TCP connection is resumed; a TCP client with a guessed ticket gets nothing, and
//! a flood of silent connections from one address does not keep the origin out; a LAN path
//! whose TCP connection cannot be opened falls back to QUIC.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::cluster::*;
use crate::common::proxy::Proxy;
use crate::common::*;

const TRANSFERS: &str = "transfers:\n  stall_timeout: 3s\n  resume_window: 10m\n";

/// Rewrites `node`'s config so that its `peers:` entry for `peer` allows the LAN path.
fn mark_lan(c: &Cluster, node: &str, peer: &str) {
    let path = c.dir(node).join("node.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let prefix = format!("  {peer}: ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no peer {peer} in {text}"));
    let address = line[prefix.len()..].to_string();
    let marked = text.replace(&format!("{line}\n"), &format!("{prefix}{{ address: {address}, encryption: off }}\n"));
    std::fs::write(&path, marked).unwrap();
}

/// alpha the origin of `projects`, beta its replica, no compression; `lan`: which sides mark
/// the other `encryption: off` (alpha's, beta's). Only beta's daemon runs.
fn pair(test: &str, lan: (bool, bool), extra: &str) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let mut c = Cluster::with_size(test, &["alpha", "beta"], 400);
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = quiet_policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n" + extra;
    c.node_extra.insert("alpha".into(), TRANSFERS.into());
    c.node_extra.insert("beta".into(), TRANSFERS.into());
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    if lan.0 {
        mark_lan(&c, "alpha", "beta");
    }
    if lan.1 {
        mark_lan(&c, "beta", "alpha");
    }
    c.start("beta");
    (c, src, dst)
}

#[test]
fn the_lan_path_delivers_identical_trees() {
    require_root!();
    let (mut c, src, dst) = pair("lan_identical", (true, true), "");
    fill(&src, 11);
    let out = c.sync_ok("alpha", "projects");
    assert!(out.contains("-> beta: full"), "{out}");
    std::fs::write(src.join("sub/f3.txt"), "changed over the LAN").unwrap();
    std::fs::remove_file(src.join("sub/f4.txt")).unwrap();
    let out = c.sync_ok("alpha", "projects");
    assert!(out.contains("-> beta: incremental from snapship-"), "{out}");

    let names = snapshots(&dst);
    assert_eq!(names.len(), 2);
    let snapdir = c.mnt("alpha").join(".snapship/projects");
    for n in &names {
        assert_eq!(subvol(&dst.join(n)).received.as_deref(), Some(subvol(&snapdir.join(n)).uuid.as_str()));
        assert_same_tree(&snapdir.join(n), &dst.join(n));
    }
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert_eq!(log.matches("receiving over the LAN path").count(), 2, "the transfers did not use the LAN path:\n{log}");
    assert!(!log.contains("asked for the LAN path, which this node does not allow"), "{log}");
    c.stop("beta");
}

#[test]
fn a_replica_that_does_not_mark_the_origin_receives_over_quic() {
    require_root!();
    // alpha marks beta, beta does not mark alpha: beta opens no TCP listener, answers `ready`
    // and the stream goes over QUIC, encrypted (the path both allow), with a warning on beta.
    let (mut c, src, dst) = pair("lan_refused", (true, false), "");
    assert!(TcpStream::connect(("127.0.0.1", c.ports["beta"])).is_err(), "beta listens on TCP though it marks no peer for the LAN path");
    fill(&src, 12);
    c.sync_ok("alpha", "projects");
    std::fs::write(src.join("second"), "x").unwrap();
    c.sync_ok("alpha", "projects");
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert_eq!(log.matches("asked for the LAN path, which this node does not allow for it: receiving over QUIC").count(), 1, "told once per peer:\n{log}");
    assert!(log.contains("encryption: off"), "beta does not say how to allow it:\n{log}");
    assert!(!log.contains("receiving over the LAN path"), "{log}");
    c.stop("beta");

    // The other way round (beta marks alpha, alpha does not mark beta): alpha never asks.
    let (mut c, src, dst) = pair("lan_unasked", (false, true), "");
    fill(&src, 13);
    c.sync_ok("alpha", "projects");
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert!(!log.contains("receiving over the LAN path") && !log.contains("asked for the LAN path"), "{log}");
    c.stop("beta");
}

#[test]
fn a_byte_changed_on_the_lan_path_fails_its_mac_and_nothing_lands() {
    require_root!();
    require_test_hooks();
    let (mut c, src, dst) = pair("lan_tampered", (true, true), "");
    fill(&src, 14);
    let out = snapship()
        .args(["sync", "--wait", "0s", "--config"])
        .arg(c.dir("alpha").join("node.yaml"))
        .arg("projects")
        .env("SNAPSHIP_TEST_FLIP_BYTE", "3000000")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("fails its MAC") && text.contains("Checksum"), "{text}");
    assert!(snapshots(&dst).is_empty(), "a tampered stream became visible");
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("dropping the LAN path's connection") && log.contains("fails its MAC"), "beta did not log the bad MAC:\n{log}");

    // What came before the bad record was good and is kept: the next sync (nothing changed
    // since, so the same snapshot) finishes it from there.
    let text = c.sync_ok("alpha", "projects");
    assert!(text.contains("-> beta: full"), "{text}");
    assert_eq!(snapshots(&dst).len(), 1, "the cut snapshot was finished, and no other taken");
    assert_same_tree(&src, &dst.join("latest"));
    assert!(c.daemons["beta"].log_text().contains("resuming a cut transfer"));
    c.stop("beta");
}

#[test]
fn a_tcp_client_with_a_guessed_ticket_gets_nothing() {
    require_root!();
    let (mut c, src, dst) = pair("lan_hostile", (true, true), "");
    let port = c.ports["beta"];
    // A made-up transfer id and MAC, then junk, then silence: each connection is closed
    // without a byte in answer.
    let mut hello = b"snapLAN1".to_vec();
    hello.extend([0x5a; 16 + 32]);
    for attempt in [hello.clone(), b"GET / HTTP/1.0\r\n\r\n".repeat(4), Vec::new()] {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        tcp.write_all(&attempt).unwrap();
        let mut buf = [0u8; 16];
        let got = tcp.read(&mut buf).unwrap_or(0);
        assert_eq!(got, 0, "beta answered a hostile LAN client");
    }
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("LAN path: dropping a connection: it presented an unknown transfer id"), "{log}");
    assert!(log.contains("does not speak the LAN path's protocol"), "{log}");
    assert!(log.contains("sent no ticket within"), "{log}");
    // beta still serves the real origin.
    fill(&src, 15);
    c.sync_ok("alpha", "projects");
    assert_same_tree(&src, &dst.join("latest"));
    c.stop("beta");
}

/// Anyone who reaches the LAN port (no certificate needed) keeps opening silent connections
/// from one address (127.0.0.2): they take at most their address's share of the handshake
/// slots, and the origin's connection (from 127.0.0.1) still gets in.
#[test]
fn silent_connections_from_one_address_do_not_keep_the_origin_out() {
    require_root!();
    let (mut c, src, dst) = pair("lan_flood", (true, true), "");
    let port = c.ports["beta"];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // 80 at a time, more than every slot, each silent until beta drops it.
                    for _ in 0..80 {
                        let socket = tokio::net::TcpSocket::new_v4().unwrap();
                        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                        if let Ok(tcp) = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await {
                            held.push(tcp);
                        }
                    }
                    held.drain(..held.len().saturating_sub(80));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                held.len()
            })
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    fill(&src, 17);
    let out = c.sync_ok("alpha", "projects");
    stop.store(true, Ordering::Relaxed);
    let held = flood.join().unwrap();
    assert!(held > 0, "the flood opened no connection");
    assert!(out.contains("-> beta: full"), "{out}");
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("receiving over the LAN path"), "the sync did not use the LAN path:\n{log}");
    assert!(log.contains("connections from that address are presenting their tickets already (the limit per address)"), "{log}");
    // The refusals are summed up, not logged one by one.
    let lines = log.lines().filter(|l| l.contains("LAN path: refusing a connection")).count();
    assert!(lines < 10, "{lines} lines for the refused connections");
    c.stop("beta");
}

/// A TCP forwarder on `port` to `upstream` that cuts its first connection after `cut_after`
/// bytes towards the upstream; later connections pass whole.
struct TcpCutter {
    connections: Arc<AtomicUsize>,
    forwarded: Arc<AtomicU64>,
}

impl TcpCutter {
    fn start(listener: TcpListener, upstream: u16, cut_after: u64) -> TcpCutter {
        let connections = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (conns, fwd) = (connections.clone(), forwarded.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let first = conns.fetch_add(1, Ordering::SeqCst) == 0;
                let limit = if first { cut_after } else { u64::MAX };
                let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let fwd = fwd.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent = 0u64;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        fwd.fetch_add(n as u64, Ordering::Relaxed);
                        if sent >= limit {
                            break;
                        }
                    }
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        });
        TcpCutter { connections, forwarded }
    }
}

/// The TCP side of the port alpha reaches beta's QUIC through.
enum TcpPort {
    /// A listener, for the test to forward the LAN path through.
    Listening(TcpListener),
    /// Bound and not listening: a connection is refused, and nobody else can take the port.
    Refusing(#[allow(dead_code)] tokio::net::TcpSocket),
}

/// The LAN pair with alpha reaching beta through a UDP proxy (QUIC), and on the same port
/// over TCP a listener (`listening`) or nothing that accepts. Both daemons run.
fn proxied_pair(test: &str, listening: bool) -> (Cluster, Proxy, TcpPort, std::path::PathBuf, std::path::PathBuf) {
    let mut c = Cluster::with_size(test, &["alpha", "beta"], 400);
    let (proxy, port) = loop {
        let proxy = Proxy::start(format!("127.0.0.1:{}", c.ports["beta"]).parse().unwrap());
        let port = match listening {
            true => TcpListener::bind(proxy.addr()).ok().map(TcpPort::Listening),
            false => tokio::net::TcpSocket::new_v4().ok().filter(|s| s.bind(proxy.addr()).is_ok()).map(TcpPort::Refusing),
        };
        if let Some(port) = port {
            break (proxy, port);
        }
    };
    c.route("alpha", "beta", proxy.addr());
    let src = c.fs["alpha"].subvolume("projects");
    let dst = c.mnt("beta").join("backup/projects");
    let p = quiet_policy("projects", "alpha", &src, &[("beta", dst.clone())]) + "transfer:\n  compression: none\n";
    c.node_extra.insert("alpha".into(), TRANSFERS.into());
    c.node_extra.insert("beta".into(), TRANSFERS.into());
    c.configure("alpha", &[("projects", p.clone())]);
    c.configure("beta", &[("projects", p)]);
    mark_lan(&c, "alpha", "beta");
    mark_lan(&c, "beta", "alpha");
    c.start("beta");
    c.start("alpha");
    (c, proxy, port, src, dst)
}

#[test]
fn a_cut_tcp_connection_is_resumed() {
    require_root!();
    // alpha reaches beta through a UDP proxy (QUIC) and, on the same port, a TCP forwarder
    // that cuts the first LAN connection part way.
    let (mut c, _proxy, TcpPort::Listening(listener), src, dst) = proxied_pair("lan_cut", true) else { unreachable!() };
    let cutter = TcpCutter::start(listener, c.ports["beta"], 8 << 20);
    fill(&src, 16);
    write_random(&src.join("big.bin"), 40 << 20, 16);

    // The first attempt fails at the cut; alpha's daemon retries and resumes.
    let _ = c.sync("alpha", "projects");
    wait_for(Duration::from_secs(120), "beta holding the snapshot", || snapshots(&dst).len() == 1 && dst.join("latest").exists());
    assert_same_tree(&src, &dst.join("latest"));
    assert!(cutter.connections.load(Ordering::SeqCst) >= 2, "the transfer did not reconnect");
    let log = c.daemons["beta"].log_text();
    assert!(log.contains("transfer cut, kept for resuming"), "{log}");
    assert!(log.contains("resuming a cut transfer"), "{log}");
    // Bytes sent twice: at most what was in flight at the cut, not the whole stream again.
    let total = cutter.forwarded.load(Ordering::Relaxed);
    assert!(total < (46 << 20) + (16 << 20), "{total} bytes went over TCP for a 46 MiB stream");
    c.stop("alpha");
    c.stop("beta");
}

/// Both nodes allow the LAN path, but its TCP connection cannot be opened (nothing listens on
/// TCP at the port alpha reaches beta's QUIC through): the attempt fails with what to do, and
/// alpha's daemon sends the retry over QUIC instead of failing again.
#[test]
fn a_lan_path_that_cannot_connect_falls_back_to_quic() {
    require_root!();
    let (mut c, _proxy, _refusing, src, dst) = proxied_pair("lan_fallback", false);
    fill(&src, 18);
    let _ = c.sync("alpha", "projects");
    wait_for(Duration::from_secs(120), "beta holding the snapshot", || snapshots(&dst).len() == 1 && dst.join("latest").exists());
    assert_same_tree(&src, &dst.join("latest"));
    let log = c.daemons["alpha"].log_text();
    assert!(log.contains("cannot open the LAN path to `beta`"), "{log}");
    assert!(log.contains("transfers to `beta` go over QUIC (encrypted) for the next 5 minutes"), "{log}");
    assert!(!log.contains("the replica does not allow the LAN path"), "{log}");
    assert!(!c.daemons["beta"].log_text().contains("receiving over the LAN path"));
    c.stop("alpha");
    c.stop("beta");
}

#[test]
fn a_replica_killed_during_a_lan_transfer_gets_the_snapshot_after_its_restart() {
    require_root!();
    // Slow enough to be killed part way: 46 MiB at 16 MiB/s.
    let (mut c, src, dst) = pair("lan_kill", (true, true), "  bandwidth_limit: 16MiB/s\n");
    c.start("alpha");
    fill(&src, 17);
    write_random(&src.join("big.bin"), 40 << 20, 17);
    let mut sync = snapship()
        .args(["sync", "--wait", "0s", "--config"])
        .arg(c.dir("alpha").join("node.yaml"))
        .arg("projects")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "beta receiving over the LAN path", || c.daemons["beta"].log_text().contains("receiving over the LAN path"));
    std::thread::sleep(Duration::from_millis(800));
    c.kill9("beta");
    assert!(snapshots(&dst).is_empty(), "a snapshot appeared from a cut stream");
    let _ = sync.wait();
    c.start("beta");
    // alpha's daemon retries; beta, finding no session after its crash, gets the stream anew.
    wait_for(Duration::from_secs(120), "beta holding the snapshot", || snapshots(&dst).len() == 1 && dst.join("latest").exists());
    assert_same_tree(&src, &dst.join("latest"));
    assert!(c.daemons["beta"].log_text().contains("receiving over the LAN path"));
    let staging = dst.join(".snapship-staging");
    let left: Vec<String> = visible(&staging).into_iter().filter(|n| n != ".lock").collect();
    assert!(left.is_empty(), "staging not cleaned: {left:?}");
    c.stop("alpha");
    c.stop("beta");
}
