//! A long path on one machine, for the WAN benchmarks: a network namespace joined to this one
//! by two TUN devices, and threads that carry every IP packet across after a fixed one-way
//! delay. There is no `sch_netem` on this kernel; this delays at the packet level, so QUIC's
//! UDP datagrams and a plain TCP flow see the same round-trip time, and each protocol's own
//! windows and congestion control decide its throughput as they would on a real long path
//! (a proxy that terminated TCP would hide TCP's window; this one does not). No bandwidth
//! cap, no jitter; loss only when asked ([`Wan::set_loss`]), the same packets each run.
//!
//! ```text
//! this namespace: 10.213.N.1 (swaN) --[delay]--> 10.213.N.2 (swbN) in namespace snapship-wanN
//!                            <--[delay]--
//! ```
//! Dropping the [`Wan`] stops the threads (closing the TUN devices removes them) and deletes
//! the namespace, and everything started in it with [`Wan::exec`] must have ended before.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

pub struct Wan {
    pub ns: String,
    /// The far end's address (in the namespace); this end is .1 of the same /24.
    pub far: Ipv4Addr,
    /// One-way delay in microseconds, both directions.
    delay_us: Arc<AtomicU64>,
    /// Loss: every packet whose draw is below this (out of 1,000,000) is dropped.
    loss_ppm: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn ip(args: &str) {
    let out = Command::new("sh").arg("-ec").arg(format!("ip {args}")).output().unwrap();
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Opens a TUN device (IP packets, no extra header) named `name`.
fn tun(name: &str) -> File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("no /dev/net/tun");
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and writes back the name into) an ifreq-sized struct.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    file
}

/// Waits up to 100 ms for `file` to be readable.
fn readable(file: &File) -> bool {
    let mut fds = [libc::pollfd { fd: file.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) > 0 }
}

/// Packets on their way one direction: (when due, packet).
type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

impl Wan {
    /// Sets up the namespace and the delaying link (`delay` one way, so the RTT is twice it).
    pub fn start(delay: Duration) -> Wan {
        let n = std::process::id() % 200 + 20;
        let (ns, a, b) = (format!("snapship-wan{n}"), format!("swa{n}"), format!("swb{n}"));
        let (near, far) = (Ipv4Addr::new(10, 213, n as u8, 1), Ipv4Addr::new(10, 213, n as u8, 2));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&format!("netns add {ns}"));
        let (ta, tb) = (tun(&a), tun(&b));
        ip(&format!("link set {b} netns {ns}"));
        ip(&format!("addr add {near}/24 dev {a}"));
        ip(&format!("link set {a} mtu 9000 txqueuelen 20000 up"));
        ip(&format!("-n {ns} link set lo up"));
        ip(&format!("-n {ns} addr add {far}/24 dev {b}"));
        ip(&format!("-n {ns} link set {b} mtu 9000 txqueuelen 20000 up"));
        let delay_us = Arc::new(AtomicU64::new(delay.as_micros() as u64));
        let loss_ppm = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ta, tb) = (Arc::new(ta), Arc::new(tb));
        let mut threads = Vec::new();
        for (from, to) in [(ta.clone(), tb.clone()), (tb, ta)] {
            let queue: Queue = Arc::default();
            let (q, d, s, l) = (queue.clone(), delay_us.clone(), stop.clone(), loss_ppm.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut x = 0x2545_f491_4f6c_dd1du64; // xorshift: the same drops each run
                while !s.load(Ordering::Relaxed) {
                    if !readable(&from) {
                        continue;
                    }
                    let Ok(len) = (&*from).read(&mut buf) else { continue };
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x % 1_000_000 < l.load(Ordering::Relaxed) {
                        continue;
                    }
                    let due = Instant::now() + Duration::from_micros(d.load(Ordering::Relaxed));
                    q.0.lock().unwrap().push_back((due, buf[..len].to_vec()));
                    q.1.notify_one();
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                loop {
                    let next = {
                        let mut g = queue.0.lock().unwrap();
                        while g.is_empty() && !s.load(Ordering::Relaxed) {
                            g = queue.1.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
                        }
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        g.pop_front().unwrap()
                    };
                    if let Some(wait) = next.0.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let _ = (&*to).write(&next.1);
                }
            }));
        }
        Wan { ns, far, delay_us, loss_ppm, stop, threads }
    }

    /// Changes the one-way delay (packets already on the way keep theirs).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Drops this fraction of the packets, each direction (0.001: one in a thousand).
    pub fn set_loss(&self, fraction: f64) {
        self.loss_ppm.store((fraction * 1e6) as u64, Ordering::Relaxed);
    }

    /// A command run in the far namespace (`ip netns exec`, which execs it: the child's pid
    /// is the command's).
    pub fn exec(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// A plain TCP flow of `bytes` from here to a sink in the far namespace, default socket
    /// options and the kernel's default TCP (CUBIC, autotuned buffers): the time from
    /// `connect` until the sink said it had every byte (one round trip for the handshake
    /// and half of one for that answer included, as a sync's own round trips are).
    pub fn tcp_flow(&self, bytes: u64) -> f64 {
        let ns = self.ns.clone();
        let far = self.far;
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = std::thread::spawn(move || {
            // A network namespace is per thread: this one listens in the far one.
            let f = File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: setns on a namespace file, for this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns: {}", std::io::Error::last_os_error());
            let listener = TcpListener::bind((far, 0)).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                match conn.read(&mut buf).unwrap() {
                    0 => break,
                    n => got += n as u64,
                }
            }
            conn.write_all(&[1]).unwrap();
            got
        });
        let addr: SocketAddr = rx.recv().unwrap();
        let mut data = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let t = Instant::now();
        let mut conn = TcpStream::connect(addr).unwrap();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(data.len() as u64) as usize;
            conn.write_all(&data[..n]).unwrap();
            left -= n as u64;
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack).unwrap();
        let took = t.elapsed().as_secs_f64();
        assert_eq!(sink.join().unwrap(), bytes);
        took
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
