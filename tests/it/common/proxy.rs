//! A UDP fault-injection proxy for the integration tests: it sits between an origin (QUIC
//! client) and a replica (QUIC server) and can cut the network, lose, delay, jitter, reorder
//! or corrupt datagrams, or let only small packets through (a peer that stays connected but
//! makes no progress). Tests are synchronous, so the proxy runs a tokio runtime on its own
//! thread and is steered through [`Proxy::set`]; dropping the [`Proxy`] stops the thread and
//! closes every socket.
//!
//! It works like a NAT: each client source address gets its own upstream socket (connected to
//! the upstream), and replies on that socket go back to that client through the listening
//! socket. A client that comes back from a new port (a restarted origin) gets a new mapping.
//!
//! Random choices come from a small PRNG seeded per proxy ([`Proxy::start_seeded`], or a fixed
//! seed), so a run that sends the same datagrams in the same order makes the same choices.
#![allow(dead_code)]

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// How long a datagram picked for reordering waits for a successor before it goes out alone.
const HOLD_MAX: Duration = Duration::from_millis(50);
/// The seed of [`Proxy::start`].
const DEFAULT_SEED: u64 = 0x5eed_0f5a_f50b_1e00;

/// The faults a [`Proxy`] applies, to both directions.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Drop everything, both ways (a cut network). Also drops datagrams already queued by a
    /// delay when it is set.
    pub blackhole: bool,
    /// Probability of dropping a datagram.
    pub drop: f64,
    /// Added one-way latency.
    pub delay: Duration,
    /// Extra random delay in `[0, jitter)` (datagrams may then overtake one another).
    pub jitter: Duration,
    /// Probability that a datagram is held back and sent right after the next one (or alone
    /// after 50 ms if no next one comes).
    pub reorder: f64,
    /// Probability of flipping one byte in a datagram.
    pub corrupt: f64,
    /// Drop datagrams larger than this: a peer that stays connected (small ACK/PING packets
    /// pass) but makes no progress (data packets never arrive).
    pub max_datagram: Option<usize>,
}

impl Faults {
    /// Forward everything unchanged.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Drop everything, both ways.
    pub fn blackhole() -> Faults {
        Faults { blackhole: true, ..Faults::default() }
    }

    /// Only datagrams up to 200 bytes pass: QUIC ACKs and PINGs keep the connection alive,
    /// data packets never arrive. Set it once the connection is up: the handshake's Initial
    /// packets are padded to 1200 bytes and would not pass either.
    pub fn stall() -> Faults {
        Faults { max_datagram: Some(200), ..Faults::default() }
    }

    /// Drops with probability `drop` and adds `delay` one way.
    pub fn lossy(drop: f64, delay: Duration) -> Faults {
        Faults { drop, delay, ..Faults::default() }
    }

    /// Adds `delay` one way, nothing else.
    pub fn delayed(delay: Duration) -> Faults {
        Faults { delay, ..Faults::default() }
    }
}

/// A running proxy; see the module documentation.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:<ephemeral>, forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        Self::start_seeded(upstream, DEFAULT_SEED)
    }

    /// Like [`Proxy::start`], with the seed of its random choices.
    pub fn start_seeded(upstream: SocketAddr, seed: u64) -> Proxy {
        let listener = StdUdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("proxy: cannot bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(Faults::none()),
            rng: Mutex::new(Rng(seed)),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            clients: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("udp-proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy: tokio runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = serve(s, listener) => {}
                    }
                });
                // Dropping the runtime here drops every relay and sender task, and with them
                // every socket.
                drop(rt);
            })
            .expect("proxy: cannot spawn its thread");
        Proxy { addr, shared, stop: Some(stop), thread: Some(thread) }
    }

    /// Where clients send to (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address datagrams are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Changes the faults applied from now on, both directions.
    pub fn set(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// The faults applied now.
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Payload bytes forwarded client->upstream and upstream->client so far.
    pub fn forwarded(&self) -> (u64, u64) {
        (self.shared.up_bytes.load(Ordering::SeqCst), self.shared.down_bytes.load(Ordering::SeqCst))
    }

    /// Datagrams dropped so far (any reason, either direction).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Client addresses seen so far (one NAT mapping each).
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic on the proxy thread must not turn into a double panic here.
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    rng: Mutex<Rng>,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    dropped: AtomicU64,
    clients: AtomicUsize,
}

impl Shared {
    /// What happens to a datagram just received: `None` if it is dropped, otherwise when it
    /// goes out, possibly corrupted, and whether it is held back for reordering.
    fn decide(&self, payload: &[u8]) -> Option<Item> {
        let f = lock(&self.faults).clone();
        // Always the same draws per datagram, so a seed reproduces a run.
        let (r_drop, r_reorder, r_corrupt, index, mask, jitter) = {
            let mut rng = lock(&self.rng);
            (rng.f64(), rng.f64(), rng.f64(), rng.next_u64(), rng.next_u64(), rng.next_u64())
        };
        let too_big = f.max_datagram.is_some_and(|max| payload.len() > max);
        if f.blackhole || too_big || r_drop < f.drop {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        let mut data = payload.to_vec();
        if r_corrupt < f.corrupt && !data.is_empty() {
            let i = (index % data.len() as u64) as usize;
            data[i] ^= (mask % 255) as u8 + 1; // never 0: the byte always changes
        }
        let jitter_ns = f.jitter.as_nanos().min(u64::MAX as u128) as u64;
        let extra = if jitter_ns > 0 { Duration::from_nanos(jitter % jitter_ns) } else { Duration::ZERO };
        Some(Item { at: Instant::now() + f.delay + extra, seq: 0, hold: r_reorder < f.reorder, data })
    }

    fn blackholed(&self) -> bool {
        lock(&self.faults).blackhole
    }
}

/// splitmix64: small, fast, good enough for fault injection.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): `p = 1.0` always fires, `p = 0.0` never.
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A datagram scheduled to go out at `at`; ties go in arrival order (`seq`).
struct Item {
    at: Instant,
    seq: u64,
    hold: bool,
    data: Vec<u8>,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    // Reversed: BinaryHeap is a max-heap, the earliest item must come out first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// Receives on the listening socket, creating a mapping per new client address.
async fn serve(shared: Arc<Shared>, listener: StdUdpSocket) {
    let listener = Arc::new(UdpSocket::from_std(listener).expect("proxy: listener into tokio"));
    let mut flows: HashMap<SocketAddr, mpsc::UnboundedSender<Item>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match listener.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if let std::collections::hash_map::Entry::Vacant(e) = flows.entry(client) {
            match open_flow(&shared, &listener, client).await {
                Ok(tx) => {
                    e.insert(tx);
                    shared.clients.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
            }
        }
        if let Some(item) = shared.decide(&buf[..n]) {
            let _ = flows[&client].send(item);
        }
    }
}

/// A new mapping for `client`: an upstream socket, a sender task per direction, and a task
/// relaying replies from upstream towards the client. Returns where to queue upward datagrams.
async fn open_flow(shared: &Arc<Shared>, listener: &Arc<UdpSocket>, client: SocketAddr) -> std::io::Result<mpsc::UnboundedSender<Item>> {
    let bind: SocketAddr = if shared.upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let upstream = UdpSocket::bind(bind).await?;
    upstream.connect(shared.upstream).await?;
    let upstream = Arc::new(upstream);

    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    tokio::spawn(sender(shared.clone(), up_rx, upstream.clone(), None, Direction::Up));
    tokio::spawn(sender(shared.clone(), down_rx, listener.clone(), Some(client), Direction::Down));

    let (s, up) = (shared.clone(), upstream);
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match up.recv(&mut buf).await {
                Ok(n) => {
                    if let Some(item) = s.decide(&buf[..n]) {
                        let _ = down_tx.send(item);
                    }
                }
                // ECONNREFUSED after an ICMP port unreachable (upstream not listening yet).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    Ok(up_tx)
}

/// Sends one direction of one mapping: a delay queue ordered by (due time, arrival), plus at
/// most one datagram held back for reordering.
async fn sender(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Item>, socket: Arc<UdpSocket>, to: Option<SocketAddr>, dir: Direction) {
    let mut queue: BinaryHeap<Item> = BinaryHeap::new();
    let mut held: Option<(Item, Instant)> = None;
    let mut seq = 0u64;
    let far = || Instant::now() + Duration::from_secs(3600);
    loop {
        let next_at = queue.peek().map(|i| i.at);
        let flush_at = held.as_ref().map(|(_, t)| *t);
        tokio::select! {
            item = rx.recv() => {
                let Some(mut item) = item else { return };
                if item.hold && held.is_none() {
                    let until = item.at.max(Instant::now()) + HOLD_MAX;
                    held = Some((item, until));
                    continue;
                }
                item.seq = seq;
                seq += 1;
                let at = item.at;
                queue.push(item);
                if let Some((mut h, _)) = held.take() {
                    // Right after the one that overtook it.
                    h.at = h.at.max(at);
                    h.seq = seq;
                    seq += 1;
                    queue.push(h);
                }
            }
            _ = tokio::time::sleep_until(next_at.unwrap_or_else(far)), if next_at.is_some() => {
                let now = Instant::now();
                while queue.peek().is_some_and(|i| i.at <= now) {
                    let item = queue.pop().unwrap();
                    send(&shared, &socket, to, dir, &item.data).await;
                }
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(far)), if flush_at.is_some() => {
                let (mut h, _) = held.take().unwrap();
                h.seq = seq;
                seq += 1;
                queue.push(h);
            }
        }
    }
}

async fn send(shared: &Shared, socket: &UdpSocket, to: Option<SocketAddr>, dir: Direction, data: &[u8]) {
    // A cut set while datagrams wait in the delay queue cuts them too.
    if shared.blackholed() {
        shared.dropped.fetch_add(1, Ordering::SeqCst);
        return;
    }
    // Counted before sending, so a test that saw the datagram arrive also sees it counted.
    let counter = match dir {
        Direction::Up => &shared.up_bytes,
        Direction::Down => &shared.down_bytes,
    };
    counter.fetch_add(data.len() as u64, Ordering::SeqCst);
    let _ = match to {
        Some(addr) => socket.send_to(data, addr).await,
        None => socket.send(data).await,
    };
}
