//! The LAN path: a transfer's stream over a plain TCP connection, authenticated and
//! integrity-checked but not encrypted, for peers both nodes mark `encryption: off`.
//!
//! The control conversation stays on QUIC with mutual TLS. For a `begin` that asks for it
//! (the origin marks the replica), a replica that marks the origin too answers `lan_ready`
//! with a one-time ticket instead of `ready`: a random transfer id and a random 32-byte key,
//! sent over the authenticated, encrypted QUIC stream, so the key is bound to the peer's
//! certificate. The origin then opens a TCP connection to the replica (the port of its QUIC
//! `listen:` address) and sends the same frames it would have sent on the QUIC stream, one
//! frame per MAC'd record (the replica hands a frame that is its record on without copying
//! it, [`LanFrames`]):
//!
//! ```text
//! hello:  "snapLAN1" | transfer id (16) | MAC(key; seq 0 | transfer id)
//! record: length u32 big-endian | payload (length bytes) | MAC(key; seq | length | payload)
//! ```
//! The MAC is keyed BLAKE3 (32 bytes) over a sequence number counted by both sides (data
//! records from 1), so a record cannot be forged, changed, replayed, reordered or dropped
//! without the replica noticing; a cut at a record boundary is caught by the protocol, whose
//! stream only ends cleanly with its `end` marker. The replica checks each record's MAC
//! before any byte of it goes further ([`LanFrames`]): nothing unauthenticated reaches the frame
//! decoder, let alone `btrfs receive`. A failed check ends the connection (logged), and the
//! transfer is treated as cut: the replica keeps what it held before the bad record.
//!
//! Acknowledgements, errors and the commit still come back on the QUIC stream, so resume,
//! stalls and bandwidth limits work as on QUIC: only the bytes of the stream take another way.
//!
//! The replica's listener ([`bind`], [`serve`]) admits at most [`MAX_HANDSHAKES`]
//! connections still presenting their ticket, [`MAX_HANDSHAKES_PER_SOURCE`] of them from one
//! source address (each gets [`HELLO_TIMEOUT`]); a connection beyond that, or with an unknown
//! transfer id or a wrong MAC, is closed and logged (refusals for want of slots at most every
//! [`REFUSALS_LOGGED_EVERY`], with their count). Tickets
//! exist only while their `begin` waits ([`TICKET_TIMEOUT`]), are used once, and are issued
//! only to authorized requests, which the QUIC admission already bounds per peer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frame::{Frame, FrameSource};
use super::transfer::IncomingError;
use super::{Dialer, RequestStream};

/// What a LAN connection starts with.
const MAGIC: &[u8; 8] = b"snapLAN1";
const ID_LEN: usize = 16;
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_LEN: usize = MAGIC.len() + ID_LEN + MAC_LEN;
/// The largest record: longer writes are cut into several. A longer length in a header is
/// refused before anything is read or allocated for it.
pub const MAX_RECORD: usize = 1 << 20;
/// How long the replica's `begin` waits for the origin's TCP connection with its ticket.
pub const TICKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connection has to present its ticket.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connections presenting their ticket at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Of those, from one source (an IPv4 address, an IPv6 /64): anyone who reaches the port (no
/// certificate needed) could otherwise hold every slot with silent connections and keep the
/// origin's out. An origin opens one per transfer: at most 8 from its origin duty to one
/// peer at once, plus what it relays and ships to fetching members.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// How often a refusal for want of slots is logged at most (with the count since).
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);
/// How long the origin tries to open the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A one-time ticket for one transfer's TCP connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    pub transfer: [u8; ID_LEN],
    pub key: [u8; KEY_LEN],
}

impl Ticket {
    fn random() -> Ticket {
        let mut t = Ticket { transfer: [0; ID_LEN], key: [0; KEY_LEN] };
        getrandom::fill(&mut t.transfer).expect("the OS random number generator");
        getrandom::fill(&mut t.key).expect("the OS random number generator");
        t
    }

    /// The ticket as sent in `lan_ready` (hex).
    pub fn to_wire(&self) -> (String, String) {
        (hex(&self.transfer), hex(&self.key))
    }

    /// The ticket from `lan_ready`, if both values are hex of the right length.
    pub fn from_wire(transfer: &str, key: &str) -> Option<Ticket> {
        Some(Ticket { transfer: unhex(transfer)?, key: unhex(key)? })
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({}, key hidden)", hex(&self.transfer))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The MAC of record `seq` with `payload` (and of the hello, seq 0, over the transfer id).
fn mac(key: &[u8; KEY_LEN], seq: u64, payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&seq.to_be_bytes());
    h.update(&(payload.len() as u32).to_be_bytes());
    h.update(payload);
    h.finalize()
}

// ---------------------------------------------------------------------------------------
// The origin's side.

/// A [`Dialer`] for a peer this node marks `encryption: off`: request streams as `inner`
/// opens them (QUIC), and the LAN path's TCP connections to `address`.
pub struct LanDialer {
    address: String,
    inner: Arc<dyn Dialer>,
}

impl LanDialer {
    /// `address`: the peer's `HOST:PORT` from `peers:` (its QUIC address; the LAN path uses
    /// the same port on TCP).
    pub fn new(address: String, inner: Arc<dyn Dialer>) -> LanDialer {
        LanDialer { address, inner }
    }
}

#[async_trait]
impl Dialer for LanDialer {
    async fn open(&self) -> Result<RequestStream> {
        self.inner.open().await
    }

    async fn reset(&self) {
        self.inner.reset().await
    }

    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        self.inner.explain(e)
    }

    fn lan_address(&self) -> Option<&str> {
        Some(&self.address)
    }
}

/// How long transfers to an address go over QUIC after the LAN path's TCP connection to it
/// could not be opened, before the LAN path is tried again.
pub const LAN_FALLBACK: Duration = Duration::from_secs(300);

/// The LAN addresses whose TCP connection could not be opened lately, and until when they are
/// passed over: one memory for the process (every file set and endpoint to that replica), so
/// that replication goes on over QUIC, encrypted, rather than fail at each transfer.
static DOWN: Mutex<Option<HashMap<String, std::time::Instant>>> = Mutex::new(None);

/// Whether transfers should ask for the LAN path to `address` now (see [`LAN_FALLBACK`]).
pub fn usable(address: &str) -> bool {
    let mut down = DOWN.lock().expect("lan fallback lock");
    let map = down.get_or_insert_with(HashMap::new);
    match map.get(address) {
        Some(until) if std::time::Instant::now() < *until => false,
        Some(_) => {
            map.remove(address);
            tracing::info!(address, "trying the LAN path again");
            true
        }
        None => true,
    }
}

fn mark_down(address: &str) {
    DOWN.lock().expect("lan fallback lock").get_or_insert_with(HashMap::new).insert(address.to_string(), std::time::Instant::now() + LAN_FALLBACK);
}

/// Opens the TCP connection of the LAN path to `node` at `address` (HOST:PORT) and presents
/// `ticket`; the writer for the transfer's frames. A connection that cannot be opened fails
/// this transfer, and transfers to `address` go over QUIC for [`LAN_FALLBACK`].
pub async fn connect(node: &str, address: &str, ticket: &Ticket) -> Result<LanWriter<TcpStream>> {
    let attempt = async {
        let mut tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&ticket.transfer);
        hello.extend_from_slice(mac(&ticket.key, 0, &ticket.transfer).as_bytes());
        tcp.write_all(&hello).await?;
        Ok::<_, io::Error>(tcp)
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| anyhow!("no TCP connection within {}s", CONNECT_TIMEOUT.as_secs()))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot open the LAN path to `{node}` at {address} (TCP): `{node}` listens for it on TCP at the port of its `listen:` address; let TCP through there, or drop `encryption: off` for `{node}` under `peers` to send over QUIC"
            )
        });
    let tcp = tcp.inspect_err(|e| {
        mark_down(address);
        tracing::warn!(replica = node, "{e:#}: transfers to `{node}` go over QUIC (encrypted) for the next {} minutes", LAN_FALLBACK.as_secs() / 60);
    })?;
    Ok(LanWriter::new(tcp, ticket.key))
}

/// Writes the bytes given to it as MAC'd records to `inner`.
///
/// Each write becomes one record (at most [`MAX_RECORD`] of it), written through to `inner`
/// before the write returns: nothing waits in this writer for a flush, so a stream that
/// pauses still reaches the replica whole. The record goes out in vectored writes of its
/// length, the caller's bytes themselves and its MAC: the payload is not copied here.
///
/// # Cancel safety
/// A write that returned `Pending` has its record under way: as with `write_all`, the caller
/// must retry with the same bytes (or drop the writer); a flush or shutdown meanwhile is an
/// error. A write that failed drops the record.
pub struct LanWriter<W> {
    inner: W,
    key: [u8; KEY_LEN],
    seq: u64,
    /// The record under way: its length and MAC, the length of the caller's write it holds,
    /// and how much of the record (length, payload, MAC) went out.
    head: [u8; 4],
    tag: [u8; MAC_LEN],
    pending: Option<usize>,
    pos: usize,
    /// The flip test hook: the payload byte at this offset is flipped after its MAC; the
    /// record that holds it goes out from `flipped`, a copy.
    flip: Option<u64>,
    flipped: Option<Vec<u8>>,
    payload_bytes: u64,
}

impl<W: AsyncWrite + Unpin> LanWriter<W> {
    fn new(inner: W, key: [u8; KEY_LEN]) -> Self {
        // The LAN path takes the flip hook, so that the flip happens on its wire, after the
        // MAC (the frame's CRC is then intact, and the MAC is what must catch it).
        let flip = super::transfer::flip_hook();
        Self::with_flip(inner, key, flip)
    }

    fn with_flip(inner: W, key: [u8; KEY_LEN], flip: Option<u64>) -> Self {
        LanWriter { inner, key, seq: 1, head: [0; 4], tag: [0; MAC_LEN], pending: None, pos: 0, flip, flipped: None, payload_bytes: 0 }
    }

    /// Starts the record of `payload`.
    fn encode(&mut self, payload: &[u8]) {
        self.head = (payload.len() as u32).to_be_bytes();
        self.tag = *mac(&self.key, self.seq, payload).as_bytes();
        if let Some(offset) = self.flip
            && offset < self.payload_bytes + payload.len() as u64
        {
            let mut copy = payload.to_vec();
            copy[(offset - self.payload_bytes) as usize] ^= 0x01;
            tracing::warn!(offset, "test hook: flipped one byte on the LAN path");
            self.flipped = Some(copy);
            self.flip = None;
        }
        self.payload_bytes += payload.len() as u64;
        self.seq += 1;
        self.pos = 0;
        self.pending = Some(payload.len());
    }

    fn abandon(&mut self) {
        self.pending = None;
        self.flipped = None;
        self.pos = 0;
    }

    /// Writes the rest of the record under way, whose payload is `payload`.
    fn drain(&mut self, cx: &mut TaskContext<'_>, payload: &[u8]) -> Poll<io::Result<()>> {
        let Some(len) = self.pending else { return Poll::Ready(Ok(())) };
        let flipped = self.flipped.take();
        let payload = flipped.as_deref().unwrap_or(&payload[..len]);
        let total = 4 + len + MAC_LEN;
        let result = loop {
            if self.pos == total {
                break Ok(());
            }
            let pos = self.pos;
            let parts = [&self.head[pos.min(4)..], &payload[pos.saturating_sub(4).min(len)..], &self.tag[pos.saturating_sub(4 + len)..]];
            let slices = parts.map(io::IoSlice::new);
            match Pin::new(&mut self.inner).poll_write_vectored(cx, &slices) {
                Poll::Pending => {
                    self.flipped = flipped.clone();
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => break Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.pos += n,
                Poll::Ready(Err(e)) => break Err(e),
            }
        };
        match result {
            Ok(()) => self.pending = None,
            Err(_) => self.abandon(),
        }
        Poll::Ready(result)
    }

    /// A flush or shutdown: only between records (the bytes of one under way are the caller's).
    fn between_records(&self) -> io::Result<()> {
        match self.pending {
            None => Ok(()),
            Some(_) => Err(io::Error::other("the LAN path's writer was flushed in the middle of a record")),
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LanWriter<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            this.encode(&buf[..buf.len().min(MAX_RECORD)]);
        }
        let len = this.pending.expect("a record under way");
        if buf.len() < len {
            this.abandon();
            return Poll::Ready(Err(io::Error::other("the LAN path's writer was given other bytes to retry a write with")));
        }
        ready!(this.drain(cx, buf))?;
        Poll::Ready(Ok(len))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.between_records()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.between_records()?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------
// The replica's side.

/// The tickets handed out and not used yet, by transfer id.
#[derive(Default)]
pub struct LanTickets {
    waiting: Mutex<HashMap<[u8; ID_LEN], Waiting>>,
}

struct Waiting {
    key: [u8; KEY_LEN],
    connected: oneshot::Sender<TcpStream>,
}

/// A ticket handed out: waits for its connection; dropping it withdraws the ticket.
pub struct Pending {
    ticket: Ticket,
    peer: String,
    tickets: Arc<LanTickets>,
    connected: Option<oneshot::Receiver<TcpStream>>,
}

impl LanTickets {
    pub fn new() -> Arc<LanTickets> {
        Arc::default()
    }

    /// A fresh ticket for one transfer from `peer`.
    pub fn issue(self: &Arc<Self>, peer: &str) -> Pending {
        let ticket = Ticket::random();
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("tickets lock").insert(ticket.transfer, Waiting { key: ticket.key, connected: tx });
        Pending { ticket, peer: peer.to_string(), tickets: self.clone(), connected: Some(rx) }
    }

    /// Hands `tcp`, whose hello is `hello`, to the transfer it names, if the ticket is known
    /// and the MAC right; otherwise why not (the connection is then dropped).
    fn admit(&self, hello: &[u8; HELLO_LEN], tcp: TcpStream) -> Result<(), &'static str> {
        if &hello[..MAGIC.len()] != MAGIC {
            return Err("it does not speak the LAN path's protocol");
        }
        let id: [u8; ID_LEN] = hello[MAGIC.len()..MAGIC.len() + ID_LEN].try_into().expect("sized");
        let sent: [u8; MAC_LEN] = hello[MAGIC.len() + ID_LEN..].try_into().expect("sized");
        let mut waiting = self.waiting.lock().expect("tickets lock");
        let Some(w) = waiting.get(&id) else { return Err("it presented an unknown transfer id") };
        // blake3::Hash compares in constant time.
        if mac(&w.key, 0, &id) != blake3::Hash::from(sent) {
            return Err("its ticket's MAC is wrong");
        }
        let w = waiting.remove(&id).expect("found above");
        w.connected.send(tcp).map_err(|_| "its transfer gave up waiting")
    }
}

impl Pending {
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// The transfer's frames, once the origin's TCP connection presented the ticket (within
    /// `within`), out of checked records.
    pub async fn connected(mut self, within: Duration) -> Result<LanFrames<TcpStream>> {
        let rx = self.connected.take().expect("waited once");
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(tcp)) => Ok(LanFrames::new(tcp, self.ticket.key, self.peer.clone())),
            Ok(Err(_)) => bail!("the LAN listener of this node stopped"),
            Err(_) => bail!(
                "the origin's TCP connection for the LAN path did not arrive within {}s; is TCP to this node's `listen:` port let through?",
                within.as_secs()
            ),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.tickets.waiting.lock().expect("tickets lock").remove(&self.ticket.transfer);
    }
}

/// The frames inside the MAC'd records read from `inner`, each record checked before any of
/// it is looked at; the stream's clean end is the connection's end at a record and frame
/// boundary.
///
/// The origin writes each frame as one record, so a frame usually is its record's payload,
/// handed on as it was read (no copy). A frame that shares its record with others, or spans
/// records, is copied out, so that every frame handed on holds an allocation of its own size
/// (see [`FrameSource`]): a hostile origin cannot make a spooled frame pin a larger one.
pub struct LanFrames<R> {
    inner: Option<R>,
    key: [u8; KEY_LEN],
    peer: String,
    /// The next record's sequence number.
    seq: u64,
    /// Checked bytes not yet decoded into frames, and whether they are exactly one record.
    buf: BytesMut,
    whole_record: bool,
}

impl<R: AsyncRead + Send + Unpin> LanFrames<R> {
    pub fn new(inner: R, key: [u8; KEY_LEN], peer: String) -> Self {
        LanFrames { inner: Some(inner), key, peer, seq: 1, buf: BytesMut::new(), whole_record: false }
    }

    /// # Cancel safety
    /// Not cancel-safe: a call given up may lose part of a record, and the stream is over
    /// (the replica's frame task gives up only to end the stream).
    async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf).map_err(super::frame::invalid)? {
                // The frame was its record, all of it: it holds that record's allocation alone.
                let compact = self.whole_record && self.buf.is_empty();
                self.whole_record = false;
                return Ok(Some(match frame {
                    Frame::Data(chunk) if !compact => Frame::Data(Bytes::copy_from_slice(&chunk)),
                    other => other,
                }));
            }
            let Some(inner) = self.inner.as_mut() else { return Err(io::Error::other("the LAN path's connection was dropped after an error")) };
            let seq = self.seq;
            match read_record(inner, &self.key, seq).await {
                Ok(Some(record)) => {
                    self.seq += 1;
                    if self.buf.is_empty() {
                        self.buf = record;
                        self.whole_record = true;
                    } else {
                        self.buf.extend_from_slice(&record);
                        self.whole_record = false;
                    }
                }
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => return Err(super::frame::invalid(super::frame::FrameError::Truncated(self.buf.len()))),
                Err(e) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        tracing::warn!(peer = %self.peer, record = seq, "dropping the LAN path's connection: {e}");
                    }
                    self.inner = None; // closes the connection
                    return Err(e);
                }
            }
        }
    }
}

impl<R: AsyncRead + Send + Unpin> FrameSource for LanFrames<R> {
    fn next(&mut self) -> impl std::future::Future<Output = io::Result<Option<Frame>>> + Send {
        self.next_frame()
    }
}

/// Record `seq`: its checked payload, `None` at a clean end before it.
async fn read_record<R: AsyncRead + Unpin>(inner: &mut R, key: &[u8; KEY_LEN], seq: u64) -> io::Result<Option<BytesMut>> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = inner.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(tampered(format!("the connection ended inside record {seq}"))) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_RECORD {
        return Err(tampered(format!("record {seq} announces {len} bytes, more than the limit of {MAX_RECORD}")));
    }
    // Read straight into the record's own buffer (not zeroed first: `read_buf` fills it).
    let mut body = BytesMut::with_capacity(len + MAC_LEN);
    while body.len() < len + MAC_LEN {
        let want = len + MAC_LEN - body.len();
        if (&mut *inner).take(want as u64).read_buf(&mut body).await? == 0 {
            return Err(tampered(format!("the connection ended inside record {seq}")));
        }
    }
    let sent: [u8; MAC_LEN] = body[len..].try_into().expect("sized");
    if mac(key, seq, &body[..len]) != blake3::Hash::from(sent) {
        return Err(tampered(format!("record {seq} fails its MAC (changed, replayed or out of order in flight)")));
    }
    body.truncate(len);
    Ok(Some(body))
}

fn tampered(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, IncomingError::Tampered(why))
}

/// Binds the replica's LAN listener (TCP, at the address and port of its QUIC `listen:`), so
/// that a port in use is an error at start-up.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} (TCP, the LAN path)"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts LAN connections until `shutdown` and hands each, once it presented a valid ticket,
/// to the transfer waiting for it. Every handshake task is tracked and waited for.
pub async fn serve(listener: std::net::TcpListener, tickets: Arc<LanTickets>, shutdown: CancellationToken) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot serve the LAN path: {e}");
            return;
        }
    };
    let tasks = TaskTracker::new();
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let sources = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    let mut refusals = Refusals::default();
    loop {
        // Cancel safety: `accept` hands a connection over only when it returns it.
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("LAN path: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(source) = Source::take(&sources, remote.ip()) else {
            refusals.refused(
                remote,
                &format!("{MAX_HANDSHAKES_PER_SOURCE} connections from that address are presenting their tickets already (the limit per address)"),
            );
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            refusals.refused(remote, &format!("{MAX_HANDSHAKES} connections are presenting their tickets already (the limit)"));
            continue;
        };
        let (tickets, shutdown) = (tickets.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _held = (permit, source);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = handshake(tcp, remote, &tickets) => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// One handshake slot of a source address, given back on drop.
struct Source {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Source {
    fn take(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Source> {
        // One host on IPv6 commonly has a whole /64 to pick addresses from.
        let ip = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
            v4 => v4,
        };
        let mut held = sources.lock().expect("sources lock");
        let n = held.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Source { sources: sources.clone(), ip })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let mut held = self.sources.lock().expect("sources lock");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Connections refused for want of slots, logged at most every [`REFUSALS_LOGGED_EVERY`]:
/// a flood of them must not flood the log.
#[derive(Default)]
struct Refusals {
    logged: Option<std::time::Instant>,
    since: u64,
}

impl Refusals {
    fn refused(&mut self, remote: SocketAddr, why: &str) {
        self.since += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= REFUSALS_LOGGED_EVERY) {
            tracing::warn!(%remote, refused = self.since, "LAN path: refusing a connection: {why} (connections refused since the last such line: {})", self.since);
            self.logged = Some(std::time::Instant::now());
            self.since = 0;
        }
    }
}

async fn handshake(mut tcp: TcpStream, remote: SocketAddr, tickets: &LanTickets) {
    let mut hello = [0u8; HELLO_LEN];
    match tokio::time::timeout(HELLO_TIMEOUT, tcp.read_exact(&mut hello)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return tracing::warn!(%remote, "LAN path: dropping a connection that sent no complete ticket: {e}"),
        Err(_) => return tracing::warn!(%remote, "LAN path: dropping a connection that sent no ticket within {}s", HELLO_TIMEOUT.as_secs()),
    }
    let _ = tcp.set_nodelay(true);
    match tickets.admit(&hello, tcp) {
        Ok(()) => tracing::debug!(%remote, "LAN path: connection admitted"),
        Err(why) => tracing::warn!(%remote, "LAN path: dropping a connection: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data frame of `chunk`, as the origin writes it (one write).
    fn data_frame(chunk: &[u8]) -> Vec<u8> {
        [&Frame::data_header(chunk)[..], chunk].concat()
    }

    /// The data frames read from `wire` until its end, and whether each was handed on
    /// without a copy (it was its record).
    async fn frames_of(wire: Vec<u8>, key: [u8; KEY_LEN]) -> io::Result<Vec<Bytes>> {
        let mut frames = LanFrames::new(std::io::Cursor::new(wire), key, "alpha".into());
        let mut out = Vec::new();
        while let Some(frame) = frames.next_frame().await? {
            match frame {
                Frame::Data(chunk) => out.push(chunk),
                Frame::Message(_) => panic!("no messages here"),
            }
        }
        Ok(out)
    }

    /// `data` in data frames of 1000 bytes, one record each, through the LAN path.
    async fn through(data: &[u8], tamper: impl FnOnce(&mut Vec<u8>)) -> io::Result<Vec<u8>> {
        let key = [7u8; KEY_LEN];
        let mut wire = Vec::new();
        {
            let mut w = LanWriter::with_flip(&mut wire, key, None);
            for piece in data.chunks(1000) {
                w.write_all(&data_frame(piece)).await.unwrap();
            }
            w.shutdown().await.unwrap();
        }
        tamper(&mut wire);
        Ok(frames_of(wire, key).await?.concat())
    }

    fn code(e: io::Error) -> String {
        let code = IncomingError::code_of(&anyhow::Error::from(e));
        format!("{code:?}")
    }

    #[tokio::test]
    async fn records_arrive_whole_and_checked() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(through(&data, |_| {}).await.unwrap(), data);
        assert_eq!(through(b"", |_| {}).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn a_changed_dropped_replayed_or_swapped_record_is_refused() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let record = 4 + super::super::frame::DATA_HEADER + 1000 + MAC_LEN;
        let err = through(&data, |w| w[10] ^= 1).await.unwrap_err();
        assert!(err.to_string().contains("record 1 fails its MAC"), "{err}");
        assert_eq!(code(err), "Checksum");
        // Dropped: record 2 arrives where record 1 was expected.
        assert!(through(&data, |w| drop(w.drain(..record))).await.is_err());
        // Replayed: record 1 twice.
        assert!(through(&data, |w| *w = [&w[..record], &w[..]].concat()).await.is_err());
        // Swapped.
        assert!(through(&data, |w| *w = [&w[record..2 * record], &w[..record], &w[2 * record..]].concat()).await.is_err());
        // Cut inside a record.
        let err = through(&data, |w| w.truncate(record + 10)).await.unwrap_err();
        assert!(err.to_string().contains("ended inside record 2"), "{err}");
        // A huge length is refused from the header.
        let err = through(&data, |w| w[..4].copy_from_slice(&u32::MAX.to_be_bytes())).await.unwrap_err();
        assert!(err.to_string().contains("more than the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_record_under_another_key_is_refused() {
        let mut wire = Vec::new();
        let mut w = LanWriter::with_flip(&mut wire, [1; KEY_LEN], None);
        w.write_all(&data_frame(b"hello")).await.unwrap();
        let err = frames_of(wire, [2; KEY_LEN]).await.unwrap_err();
        assert!(err.to_string().contains("fails its MAC"), "{err}");
    }

    #[tokio::test]
    async fn a_frame_alone_in_its_record_is_handed_on_as_read_others_are_copied_out() {
        let key = [3u8; KEY_LEN];
        let mut wire = Vec::new();
        let mut w = LanWriter::with_flip(&mut wire, key, None);
        w.write_all(&data_frame(&[1; 5000])).await.unwrap();
        // Two frames in one record, then one frame cut across two records.
        w.write_all(&[data_frame(&[2; 100]), data_frame(&[3; 200])].concat()).await.unwrap();
        let split = data_frame(&[4; 300]);
        w.write_all(&split[..50]).await.unwrap();
        w.write_all(&split[50..]).await.unwrap();
        let mut frames = LanFrames::new(std::io::Cursor::new(wire), key, "alpha".into());
        let mut got = Vec::new();
        while let Some(Frame::Data(chunk)) = frames.next_frame().await.unwrap() {
            got.push(chunk);
        }
        assert_eq!(got.iter().map(|c| (c[0], c.len())).collect::<Vec<_>>(), [(1, 5000), (2, 100), (3, 200), (4, 300)]);
    }

    #[tokio::test]
    async fn the_flip_hook_changes_the_wire_after_the_mac() {
        let key = [5u8; KEY_LEN];
        let mut wire = Vec::new();
        let mut w = LanWriter::with_flip(&mut wire, key, Some(1500));
        let frame = data_frame(&[0u8; 1000]);
        w.write_all(&frame).await.unwrap();
        w.write_all(&frame).await.unwrap();
        let second = &wire[4 + frame.len() + MAC_LEN + 4..][..frame.len()];
        assert_eq!(second[1500 - frame.len()], frame[1500 - frame.len()] ^ 1, "the byte at payload offset 1500 went out flipped");
        let mut frames = LanFrames::new(std::io::Cursor::new(wire), key, "alpha".into());
        assert!(matches!(frames.next_frame().await.unwrap(), Some(Frame::Data(_))));
        let err = frames.next_frame().await.unwrap_err();
        assert!(err.to_string().contains("record 2 fails its MAC"), "{err}");
    }

    #[test]
    fn tickets_go_over_the_wire_as_hex() {
        let t = Ticket::random();
        let (id, key) = t.to_wire();
        assert_eq!(Ticket::from_wire(&id, &key), Some(t.clone()));
        assert_eq!(Ticket::from_wire(&id[1..], &key), None);
        assert_eq!(Ticket::from_wire(&id, &key.replace(|c: char| c.is_ascii_digit(), "g")), None);
        assert!(!format!("{t:?}").contains(&key), "a ticket's key never goes to a log");
        assert_ne!(Ticket::random(), t);
    }

    /// A listener with one ticket out; the connections a hostile client makes get nothing.
    #[tokio::test]
    async fn the_listener_admits_only_a_known_ticket_with_its_mac() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let tickets = LanTickets::new();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, tickets.clone(), shutdown.clone()));
        let pending = tickets.issue("alpha");
        let good = pending.ticket().clone();

        // A guessed transfer id, then the right id with a MAC under a guessed key: closed.
        let guessed = Ticket::random();
        let wrong_key = Ticket { transfer: good.transfer, key: guessed.key };
        for t in [&guessed, &wrong_key] {
            let mut w = connect("beta", &addr.to_string(), t).await.unwrap();
            w.write_all(b"data").await.ok();
            let mut tcp = w.inner;
            let mut buf = [0u8; 1];
            assert_eq!(tcp.read(&mut buf).await.unwrap_or(0), 0, "the replica closed the connection");
        }
        // The ticket is still good for its owner, once.
        let mut w = connect("beta", &addr.to_string(), &good).await.unwrap();
        let mut frames = pending.connected(Duration::from_secs(5)).await.unwrap();
        w.write_all(&data_frame(b"the stream")).await.unwrap();
        w.shutdown().await.unwrap();
        assert_eq!(frames.next_frame().await.unwrap(), Some(Frame::Data(Bytes::from_static(b"the stream"))));
        assert_eq!(frames.next_frame().await.unwrap(), None);
        let mut again = connect("beta", &addr.to_string(), &good).await.unwrap().inner;
        assert_eq!(again.read(&mut [0u8; 1]).await.unwrap_or(0), 0, "a used ticket is refused");
        assert!(tickets.waiting.lock().unwrap().is_empty());
        shutdown.cancel();
        server.await.unwrap();
    }
}
