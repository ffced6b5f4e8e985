//! Self-test of the UDP fault-injection proxy (tests/common/proxy.rs) against a UDP echo
//! server: forwarding and byte counts, NAT mappings, blackhole, max_datagram, delay and order,
//! drop, corrupt, reorder. No root needed. Timing is only ever asserted as a lower bound.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::proxy::{Faults, Proxy};

/// How long to wait for a datagram that must arrive (only reached when a test fails).
const ARRIVES: Duration = Duration::from_secs(2);
/// How long to wait for a datagram that must not arrive.
const SILENCE: Duration = Duration::from_millis(150);

/// A UDP echo server on 127.0.0.1 that also records what it received.
struct Echo {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = sock.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_535];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    r.lock().unwrap().push(buf[..n].to_vec());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Echo { addr, received, stop, thread: Some(thread) }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket connected to the proxy.
fn client(proxy: &Proxy) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(proxy.addr()).unwrap();
    sock
}

fn recv(sock: &UdpSocket, timeout: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 65_535];
    match sock.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// Sends `payload` and returns the echo, failing if none comes.
fn echo(sock: &UdpSocket, payload: &[u8]) -> Vec<u8> {
    sock.send(payload).unwrap();
    recv(sock, ARRIVES).expect("no echo through the proxy")
}

#[test]
fn forwards_and_counts_bytes() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    let sock = client(&proxy);
    assert_eq!(echo(&sock, b"hello"), b"hello");
    assert_eq!(echo(&sock, &[7u8; 1000]), vec![7u8; 1000]);
    assert_eq!(proxy.forwarded(), (1005, 1005));
    assert_eq!(proxy.dropped(), 0);
    assert_eq!(proxy.clients(), 1);
}

#[test]
fn each_client_address_gets_its_own_mapping() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    let (a, b) = (client(&proxy), client(&proxy));
    a.send(b"from a").unwrap();
    b.send(b"from b").unwrap();
    assert_eq!(recv(&a, ARRIVES).unwrap(), b"from a");
    assert_eq!(recv(&b, ARRIVES).unwrap(), b"from b");
    // A client restarted on a new port gets a new mapping and still works.
    drop(a);
    let c = client(&proxy);
    assert_eq!(echo(&c, b"from c"), b"from c");
    assert_eq!(proxy.clients(), 3);
}

#[test]
fn blackhole_drops_everything_until_lifted() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    let sock = client(&proxy);
    assert_eq!(echo(&sock, b"before"), b"before");

    proxy.set(Faults::blackhole());
    sock.send(b"cut").unwrap();
    assert_eq!(recv(&sock, SILENCE), None);
    crate::common::wait_for(ARRIVES, "the cut datagram to be counted", || proxy.dropped() == 1);
    assert!(server.received().iter().all(|d| d != b"cut"), "the upstream saw a datagram through a blackhole");

    proxy.set(Faults::none());
    assert_eq!(echo(&sock, b"after"), b"after");
    assert_eq!(proxy.forwarded(), (11, 11));
}

#[test]
fn max_datagram_passes_small_drops_large() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    proxy.set(Faults::stall());
    let sock = client(&proxy);
    assert_eq!(echo(&sock, &[1u8; 200]), vec![1u8; 200]);
    sock.send(&[2u8; 1200]).unwrap();
    assert_eq!(recv(&sock, SILENCE), None);
    crate::common::wait_for(ARRIVES, "the large datagram to be dropped", || proxy.dropped() == 1);
    // Small ones still pass afterwards: the "connection" stays up.
    assert_eq!(echo(&sock, &[3u8; 40]), vec![3u8; 40]);
    assert_eq!(proxy.forwarded(), (240, 240));
}

#[test]
fn delay_adds_latency_and_keeps_order() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    let delay = Duration::from_millis(100);
    proxy.set(Faults::delayed(delay));
    let sock = client(&proxy);
    let t = Instant::now();
    assert_eq!(echo(&sock, b"slow"), b"slow");
    assert!(t.elapsed() >= 2 * delay, "round trip {:?} is shorter than twice the one-way delay {delay:?}", t.elapsed());

    // With a delay but no jitter or reorder, order is preserved both ways, and a delayed
    // datagram does not hold up the ones behind it beyond their own delay.
    proxy.set(Faults::delayed(Duration::from_millis(20)));
    for i in 0..50u32 {
        sock.send(&i.to_be_bytes()).unwrap();
    }
    let got: Vec<u32> = (0..50).map(|_| u32::from_be_bytes(recv(&sock, ARRIVES).expect("lost a delayed datagram")[..4].try_into().unwrap())).collect();
    assert_eq!(got, (0..50).collect::<Vec<_>>());
    assert_eq!(proxy.dropped(), 0);
}

#[test]
fn drop_all_drops_everything() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    proxy.set(Faults::lossy(1.0, Duration::ZERO));
    let sock = client(&proxy);
    for i in 0..5u8 {
        sock.send(&[i; 32]).unwrap();
    }
    crate::common::wait_for(ARRIVES, "five dropped datagrams", || proxy.dropped() == 5);
    assert_eq!(recv(&sock, SILENCE), None);
    assert_eq!(proxy.forwarded(), (0, 0));
    assert!(server.received().is_empty());
}

#[test]
fn corrupt_all_changes_payloads() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    proxy.set(Faults { corrupt: 1.0, ..Faults::none() });
    let sock = client(&proxy);
    for i in 0..5u8 {
        let sent = vec![i; 64];
        let got = echo(&sock, &sent);
        assert_eq!(got.len(), sent.len(), "corruption changes bytes, not lengths");
        // One byte flipped each way: the upstream always sees exactly one changed byte.
        let seen = server.received().last().unwrap().clone();
        assert_eq!(seen.iter().zip(&sent).filter(|(a, b)| a != b).count(), 1, "upstream got {seen:?}");
        assert_ne!(got, seen, "the reply was not corrupted");
    }
    assert_eq!(proxy.dropped(), 0);
}

#[test]
fn reorder_delivers_everything() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    proxy.set(Faults { reorder: 1.0, ..Faults::none() });
    let sock = client(&proxy);
    // An odd count: the last datagram has no successor and goes out alone after a while.
    for i in 0..5u8 {
        sock.send(&[i]).unwrap();
    }
    let mut got: Vec<u8> = (0..5).map(|_| recv(&sock, ARRIVES).expect("a held datagram never came")[0]).collect();
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
    assert_eq!(proxy.dropped(), 0);
}

#[test]
fn drop_stops_the_proxy() {
    let server = Echo::start();
    let proxy = Proxy::start(server.addr);
    let sock = client(&proxy);
    assert_eq!(echo(&sock, b"x"), b"x");
    drop(proxy);
    // Nothing forwards any more: a datagram to the proxy's old address never reaches the
    // server. (Binding that port again to show it is free would race with the other tests,
    // whose sockets bind port 0 all the time and may just have been given it.)
    let _ = sock.send(b"after drop");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!server.received().iter().any(|d| d == b"after drop"), "the proxy still forwards after drop");
}
