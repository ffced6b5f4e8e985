//! A send stream on the wire, both ways: hashing, compression, framing and pacing.
//!
//! ```text
//! origin:  send stream -> BLAKE3 -> zstd -> data frames (crc32c each) -> pacer -> QUIC
//! replica: QUIC -> frames (crc checked) -> bounded channel -> unzstd -> (session: spool, BLAKE3 check at end) -> receive
//! ```
//! Memory stays bounded whatever the stream size: one chunk in flight on the sending side,
//! a small bounded channel on the receiving side, QUIC flow control in between.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_compression::Level;
use async_compression::tokio::bufread::{ZstdDecoder, ZstdEncoder};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;

pub use super::frame::OWN_ALLOCATION;
use super::frame::{DATA_HEADER, Frame, FrameReader, FrameSource};
use super::meter::{Metered, Tally};
use super::protocol::{ErrorCode, Message, WireCompression};
use crate::config::units::{ByteRate, Compression};

/// Bytes of stream per data frame.
pub const CHUNK: usize = 256 * 1024;
/// A partly filled frame goes out when the stream pauses this long.
const FLUSH_AFTER: Duration = Duration::from_millis(500);
/// Data frames buffered between the network and `btrfs receive`.
const CHANNEL_FRAMES: usize = 8;

/// `SNAPSHIP_TEST_FLIP_BYTE=N`: the first transfer of this process flips the wire byte at
/// offset N after computing its frame's checksum, as corruption in flight would. Read only
/// with the `test-hooks` cargo feature: a production binary ignores it.
pub const FLIP_ENV: &str = "SNAPSHIP_TEST_FLIP_BYTE";

pub async fn write_message<W: AsyncWrite + Unpin>(out: &mut W, msg: &Message) -> io::Result<()> {
    out.write_all(&Frame::message(&msg.to_json())).await
}

/// Reads the next frame, which must be a message.
pub async fn read_message<R: AsyncRead + Unpin>(frames: &mut FrameReader<R>) -> Result<Message> {
    match frames.next().await? {
        Some(Frame::Message(json)) => Message::from_json(&json).map_err(|e| IncomingError::Protocol(e).into()),
        Some(Frame::Data(_)) => Err(IncomingError::Protocol("data where a message was expected".into()).into()),
        None => bail!("the peer closed the stream"),
    }
}

/// Keeps a transfer under its bandwidth limit by sleeping before chunks that came too early.
pub struct Pacer {
    rate: Option<u64>,
    start: Instant,
    sent: u64,
}

impl Pacer {
    pub fn new(limit: Option<ByteRate>) -> Pacer {
        Pacer { rate: limit.map(|r| r.0), start: Instant::now(), sent: 0 }
    }

    /// When `n` more bytes may go: the limit is kept on average since the start.
    fn due(&mut self, n: usize) -> Option<Instant> {
        let rate = self.rate?;
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / rate as f64);
        self.sent += n as u64;
        Some(due)
    }

    pub async fn wait(&mut self, n: usize) {
        if let Some(due) = self.due(n) {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// What the sender learned about a stream it wrote.
pub struct Sent {
    /// Uncompressed bytes, and their BLAKE3.
    pub bytes: u64,
    pub blake3: String,
    /// Bytes on the wire (compressed, framed).
    pub wire_bytes: u64,
}

/// Writes `stream` (to its end) as data frames to `out`. The caller sends `End` afterwards.
/// `prefix`: the stream was resumed after this many bytes, which hashed so far as given;
/// the returned length and hash cover the whole stream.
pub async fn write_data<W: AsyncWrite + Unpin>(
    stream: &mut (dyn AsyncRead + Send + Unpin),
    prefix: Option<(u64, blake3::Hasher)>,
    compression: Compression,
    limit: Option<ByteRate>,
    written: &std::sync::atomic::AtomicU64,
    out: &mut W,
) -> Result<Sent> {
    let raw = match prefix {
        None => Metered::hashing(stream),
        Some((bytes, hasher)) => Metered::hashing_from(stream, bytes, hasher),
    };
    let tally: Arc<Tally> = raw.tally();
    let mut source: Box<dyn AsyncRead + Send + Unpin + '_> = match compression.zstd_level() {
        None => Box::new(raw),
        Some(level) => Box::new(ZstdEncoder::with_quality(BufReader::with_capacity(CHUNK, raw), Level::Precise(level))),
    };
    let mut pacer = Pacer::new(limit);
    let mut flip = flip_hook();
    let mut wire_bytes = 0u64;
    // A frame is built in one buffer, its header in front of its chunk, and goes out in one
    // write (on the LAN path: one record).
    let mut buf = BytesMut::with_capacity(DATA_HEADER + CHUNK);
    loop {
        buf.clear();
        buf.resize(DATA_HEADER, 0);
        // Fill a chunk (fewer, larger frames), but send what there is at the end, or when
        // the stream pauses (a slow send must not look like a stalled replica).
        while buf.len() < DATA_HEADER + CHUNK / 2 {
            let empty = buf.len() == DATA_HEADER;
            let read = source.read_buf(&mut buf);
            let n = if empty {
                read.await
            } else {
                match tokio::time::timeout(FLUSH_AFTER, read).await {
                    Ok(n) => n,
                    Err(_) => break,
                }
            };
            if n.context("reading the send stream")? == 0 {
                break;
            }
        }
        let chunk_len = buf.len() - DATA_HEADER;
        if chunk_len == 0 {
            break;
        }
        let header = Frame::data_header(&buf[DATA_HEADER..]);
        buf[..DATA_HEADER].copy_from_slice(&header);
        if let Some(offset) = flip
            && offset < wire_bytes + chunk_len as u64
        {
            let i = DATA_HEADER + (offset - wire_bytes) as usize;
            buf[i] ^= 0x01;
            tracing::warn!(offset, "test hook: flipped one byte in flight");
            flip = None;
        }
        pacer.wait(buf.len()).await;
        out.write_all(&buf).await.context("sending to the replica")?;
        wire_bytes += chunk_len as u64;
        written.store(tally.bytes(), std::sync::atomic::Ordering::Relaxed);
    }
    drop(source);
    Ok(Sent { bytes: tally.bytes(), blake3: tally.digest().expect("hashing tally"), wire_bytes })
}

/// The flip test hook's offset, for the first transfer of the process only (taken by the LAN
/// path's writer where a transfer uses it, so that the byte flips after its MAC).
#[cfg(feature = "test-hooks")]
pub(crate) fn flip_hook() -> Option<u64> {
    static USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let offset = std::env::var(FLIP_ENV).ok()?.parse().ok()?;
    (!USED.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(offset)
}

/// Without the `test-hooks` feature there is no flip hook: the environment is not read.
#[cfg(not(feature = "test-hooks"))]
pub(crate) fn flip_hook() -> Option<u64> {
    None
}

/// Why an incoming stream failed, so the replica can answer with the right code.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("stream checksum mismatch: {bytes} bytes with BLAKE3 {got}, the origin sent {sent_bytes} bytes with {sent} (corrupted in flight)")]
    Checksum { bytes: u64, got: String, sent_bytes: u64, sent: String },
    #[error("the stream ended before its end marker (connection lost?)")]
    Truncated,
    #[error("the origin aborted the transfer: {0}")]
    Aborted(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no data from the origin for {}s (stall timeout)", .0.as_secs())]
    Stalled(Duration),
    /// The LAN path's authentication failed (`lan.rs`): nothing of the record went further.
    #[error("LAN path: {0}")]
    Tampered(String),
}

impl IncomingError {
    /// The protocol code for an error chain that went through an incoming stream.
    pub fn code_of(err: &anyhow::Error) -> ErrorCode {
        for cause in err.chain() {
            if cause.downcast_ref::<crate::snapshot::ReceiveBusy>().is_some() {
                return ErrorCode::Busy;
            }
            let found = cause
                .downcast_ref::<IncomingError>()
                .or_else(|| cause.downcast_ref::<io::Error>().and_then(|e| e.get_ref()).and_then(|e| e.downcast_ref::<IncomingError>()));
            if let Some(e) = found {
                return match e {
                    IncomingError::Checksum { .. } | IncomingError::Tampered(_) => ErrorCode::Checksum,
                    IncomingError::Aborted(_) | IncomingError::Truncated => ErrorCode::Aborted,
                    IncomingError::Protocol(_) => ErrorCode::BadRequest,
                    IncomingError::Stalled(_) => ErrorCode::Stalled,
                };
            }
            let frame_error = cause.downcast_ref::<io::Error>().and_then(|e| e.get_ref()).and_then(|e| e.downcast_ref::<super::frame::FrameError>());
            match frame_error {
                Some(super::frame::FrameError::Checksum { .. }) => return ErrorCode::Checksum,
                Some(super::frame::FrameError::Truncated(_)) => return ErrorCode::Aborted,
                Some(_) => return ErrorCode::BadRequest,
                None => {}
            }
        }
        ErrorCode::ReceiveFailed
    }
}

/// The replica's view of an incoming stream: frames are read by a task into a bounded
/// channel, and [`IncomingData::next_chunk`] yields the decompressed stream. Its clean end
/// means the origin's end marker arrived; whether length and hash match is for the caller to
/// check with [`IncomingData::check_end`] (a resumed stream's hash covers bytes from an
/// earlier connection). Any failure is a read error, never a clean short stream.
pub struct IncomingData {
    chunks: Chunks,
    trailer: Arc<Mutex<Option<(u64, String)>>>,
}

enum Chunks {
    /// The frames' chunks as they came (a large one in an allocation of its own, see
    /// [`FrameSource`]).
    Plain(mpsc::Receiver<io::Result<Bytes>>),
    /// Decompressed, read into `buf`.
    Zstd { reader: Box<dyn AsyncRead + Send + Unpin>, buf: BytesMut },
}

impl IncomingData {
    pub fn new<F: FrameSource + 'static>(mut frames: F, compression: WireCompression, stall: Duration) -> IncomingData {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_FRAMES);
        let trailer: Arc<Mutex<Option<(u64, String)>>> = Arc::default();
        let trailer_in = trailer.clone();
        tokio::spawn(async move {
            let failure = loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(stall, frames.next()) => next,
                    _ = tx.closed() => return, // the reader gave up
                };
                let item = match next {
                    Err(_) => break IncomingError::Stalled(stall),
                    Ok(Ok(Some(Frame::Data(chunk)))) => Ok(chunk),
                    Ok(Ok(Some(Frame::Message(json)))) => match Message::from_json(&json) {
                        Ok(Message::End { bytes, blake3 }) => {
                            *trailer_in.lock().expect("trailer lock") = Some((bytes, blake3));
                            return; // dropping tx ends the stream
                        }
                        Ok(Message::Error { message, .. }) => break IncomingError::Aborted(message),
                        Ok(other) => break IncomingError::Protocol(format!("unexpected {other:?} inside a stream")),
                        Err(e) => break IncomingError::Protocol(e),
                    },
                    Ok(Ok(None)) => break IncomingError::Truncated,
                    Ok(Err(e)) => Err(e),
                };
                if tx.send(item).await.is_err() {
                    return; // the reader gave up
                }
            };
            let _ = tx.send(Err(io::Error::other(failure))).await;
        });
        let chunks = match compression {
            WireCompression::None => Chunks::Plain(rx),
            WireCompression::Zstd => {
                // Read on past the end of the zstd frame, to the end of the stream: only then has
                // the end marker (with the hash to check) arrived, and trailing junk is an error.
                let mut decoder = ZstdDecoder::new(StreamReader::new(ReceiverStream::new(rx)));
                decoder.multiple_members(true);
                Chunks::Zstd { reader: Box::new(decoder), buf: BytesMut::new() }
            }
        };
        IncomingData { chunks, trailer }
    }

    /// The next piece of the (decompressed) stream; `None` at its clean end.
    ///
    /// # Cancel safety
    /// Cancel-safe: a piece is taken out only when it is returned.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match &mut self.chunks {
            Chunks::Plain(frames) => loop {
                match frames.recv().await {
                    Some(Ok(chunk)) if chunk.is_empty() => continue,
                    Some(chunk) => return chunk.map(Some),
                    None => return Ok(None),
                }
            },
            Chunks::Zstd { reader, buf } => {
                buf.reserve(CHUNK);
                match reader.read_buf(buf).await? {
                    0 => Ok(None),
                    _ => Ok(Some(buf.split().freeze())),
                }
            }
        }
    }

    /// Whether a piece [`next_chunk`](Self::next_chunk) returns that is larger than
    /// [`OWN_ALLOCATION`] may be kept as it is: it holds an allocation of its own size (the
    /// frames' chunks). Otherwise (decompressed pieces) it may share a larger buffer, which
    /// keeping it would pin: copy it.
    pub fn own_allocations(&self) -> bool {
        matches!(self.chunks, Chunks::Plain(_))
    }

    /// After the reader's clean end: whether the whole stream, `bytes` long and hashing to
    /// `blake3`, is what the origin sent.
    pub fn check_end(&self, bytes: u64, got: &str) -> Result<(), IncomingError> {
        match self.trailer.lock().expect("trailer lock").clone() {
            None => Err(IncomingError::Truncated),
            Some((sent_bytes, sent)) if sent_bytes != bytes || sent != got => Err(IncomingError::Checksum { bytes, got: got.to_string(), sent_bytes, sent }),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    async fn read_all(incoming: &mut IncomingData) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = incoming.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads an incoming stream to its end and checks it, as the replica's session does.
    async fn read_checked(mut incoming: IncomingData) -> Result<Vec<u8>> {
        let out = read_all(&mut incoming).await?;
        incoming.check_end(out.len() as u64, blake3::hash(&out).to_hex().as_str())?;
        Ok(out)
    }

    async fn round_trip(data: &[u8], compression: Compression) -> Result<Vec<u8>> {
        round_trip_with_late_end(data, compression, Duration::ZERO).await
    }

    /// `delay`: how long the end marker takes after the last data frame.
    async fn round_trip_with_late_end(data: &[u8], compression: Compression, delay: Duration) -> Result<Vec<u8>> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let data = data.to_vec();
        let sender = tokio::spawn(async move {
            // Both halves live until the end marker is written.
            let (_client_read, mut client_write) = tokio::io::split(client);
            let mut src = &data[..];
            let sent = write_data(&mut src, None, compression, None, &Default::default(), &mut client_write).await.unwrap();
            tokio::time::sleep(delay).await;
            write_message(&mut client_write, &Message::End { bytes: sent.bytes, blake3: sent.blake3 }).await.unwrap();
            sent.wire_bytes
        });
        let result = read_checked(IncomingData::new(FrameReader::new(server), compression.into(), STALL)).await;
        sender.await.unwrap();
        result
    }

    #[tokio::test]
    async fn a_resumed_stream_hashes_as_a_whole() {
        let data = sample();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let tail = data[1000..].to_vec();
        let mut prefix = blake3::Hasher::new();
        prefix.update(&data[..1000]);
        tokio::spawn(async move {
            let (_r, mut w) = tokio::io::split(client);
            let mut src = &tail[..];
            let sent = write_data(&mut src, Some((1000, prefix)), Compression::Zstd(1), None, &Default::default(), &mut w).await.unwrap();
            write_message(&mut w, &Message::End { bytes: sent.bytes, blake3: sent.blake3 }).await.unwrap();
        });
        let mut incoming = IncomingData::new(FrameReader::new(server), WireCompression::Zstd, STALL);
        let got = read_all(&mut incoming).await.unwrap();
        assert_eq!(got, data[1000..]);
        incoming.check_end(data.len() as u64, blake3::hash(&data).to_hex().as_str()).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_origin_is_a_stall() {
        let (client, server) = tokio::io::duplex(1024);
        let mut incoming = IncomingData::new(FrameReader::new(server), WireCompression::None, Duration::from_secs(5));
        let err = read_all(&mut incoming).await.unwrap_err();
        assert!(err.to_string().contains("stall timeout"), "{err}");
        assert_eq!(IncomingError::code_of(&anyhow::Error::from(err)), ErrorCode::Stalled);
        drop(client);
    }

    fn sample() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8 ^ (i / 7000) as u8).collect()
    }

    #[tokio::test]
    async fn streams_arrive_whole_with_and_without_compression() {
        let data = sample();
        assert_eq!(round_trip(&data, Compression::None).await.unwrap(), data);
        assert_eq!(round_trip(&data, Compression::Zstd(3)).await.unwrap(), data);
        assert_eq!(round_trip(b"", Compression::Zstd(1)).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn the_end_is_awaited_even_when_the_data_is_complete() {
        // A zstd frame is complete before the end marker arrives: the reader must still wait
        // for the marker (and its hash) before reporting the end.
        let data = b"small incremental stream".repeat(10);
        for c in [Compression::Zstd(3), Compression::None] {
            let got = round_trip_with_late_end(&data, c, Duration::from_millis(100)).await.unwrap();
            assert_eq!(got, data);
        }
    }

    #[tokio::test]
    async fn a_wrong_trailer_is_a_checksum_error() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_r, mut w) = tokio::io::split(client);
        tokio::spawn(async move {
            let mut src: &[u8] = b"abcdef";
            let sent = write_data(&mut src, None, Compression::None, None, &Default::default(), &mut w).await.unwrap();
            write_message(&mut w, &Message::End { bytes: sent.bytes, blake3: blake3::hash(b"other").to_hex().to_string() }).await.unwrap();
        });
        let err = read_checked(IncomingData::new(FrameReader::new(server), WireCompression::None, STALL)).await.unwrap_err();
        assert_eq!(IncomingError::code_of(&err), ErrorCode::Checksum, "{err:#}");
    }

    #[tokio::test]
    async fn a_stream_cut_before_its_end_is_not_a_clean_end() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(client);
            let mut src: &[u8] = b"abcdef";
            write_data(&mut src, None, Compression::None, None, &Default::default(), &mut w).await.unwrap();
            drop((r, w)); // the connection closes without End
        });
        let err = read_checked(IncomingData::new(FrameReader::new(server), WireCompression::None, STALL)).await.unwrap_err();
        assert!(err.to_string().contains("before its end marker"), "{err}");
    }

    #[test]
    fn pacer_spaces_chunks_by_the_rate() {
        let mut p = Pacer::new(Some(ByteRate(1000)));
        let start = p.start;
        assert_eq!(p.due(500), Some(start));
        assert_eq!(p.due(500), Some(start + Duration::from_millis(500)));
        assert_eq!(p.due(10), Some(start + Duration::from_secs(1)));
        assert_eq!(Pacer::new(None).due(1 << 30), None);
    }

    /// A release build (no `test-hooks`) must ignore `SNAPSHIP_TEST_FLIP_BYTE`: this test runs
    /// the one below in a child process with the variable set.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn without_the_feature_the_flip_variable_is_ignored() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ship::transfer::tests::no_flip_hook_whatever_the_environment"])
            .env(FLIP_ENV, "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Also run on its own, where the variable is not set anyway.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn no_flip_hook_whatever_the_environment() {
        assert_eq!(flip_hook(), None);
    }
}
