//! Length-prefixed frames, the unit of everything on a snapship stream.
//!
//! ```text
//! kind: u8 | length: u32 big-endian | payload: length bytes
//! kind 1 (message): payload is one protocol message as JSON
//! kind 2 (data):    payload is crc32c: u32 big-endian | a chunk of the (compressed) stream
//! ```
//! The decoder is a pure function over a buffer, so it can be fuzzed and tested without I/O;
//! [`FrameReader`] feeds it from an async stream. Every data frame carries a CRC of its
//! bytes, checked before they go anywhere: a corrupted chunk never reaches `btrfs receive`.
//!
//! A frame's size is checked against its kind's limit from the header alone, before any
//! room is made for it: a peer announcing a huge frame makes us allocate nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Larger data frames are refused as malformed: this bounds what one frame can make us buffer.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Larger message frames are refused: messages are small JSON (the largest, a listing of
/// snapshots, is about 100 bytes per snapshot), so a peer gets no megabytes per stream out
/// of the control path. 64 KiB holds a listing of some 600 snapshots.
pub const MAX_MESSAGE: usize = 64 << 10;
const HEADER: usize = 5;
/// A data frame's header with its checksum: what goes before the chunk.
pub const DATA_HEADER: usize = HEADER + 4;
const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message, JSON-encoded.
    Message(Bytes),
    /// A chunk of stream data; its CRC has been checked.
    Data(Bytes),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { kind: &'static str, len: usize, limit: usize },
    #[error("data frame of {0} bytes is too short to hold its checksum")]
    ShortData(usize),
    #[error("data frame checksum mismatch: sent {sent:08x}, received bytes give {got:08x} (corrupted in flight)")]
    Checksum { sent: u32, got: u32 },
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
}

impl Frame {
    /// Encodes a message frame.
    pub fn message(json: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + json.len());
        out.put_u8(KIND_MESSAGE);
        out.put_u32(json.len() as u32);
        out.put_slice(json);
        out.freeze()
    }

    /// Encodes the header of a data frame for `chunk` (checksum included); the chunk follows.
    pub fn data_header(chunk: &[u8]) -> [u8; DATA_HEADER] {
        let mut out = [0u8; DATA_HEADER];
        out[0] = KIND_DATA;
        out[1..5].copy_from_slice(&((chunk.len() + 4) as u32).to_be_bytes());
        out[5..9].copy_from_slice(&crc32c::crc32c(chunk).to_be_bytes());
        out
    }

    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)`: need more bytes.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if kind != KIND_MESSAGE && kind != KIND_DATA {
            return Err(FrameError::UnknownKind(kind));
        }
        let (name, limit) = if kind == KIND_MESSAGE { ("message", MAX_MESSAGE) } else { ("data", MAX_PAYLOAD) };
        if len > limit {
            return Err(FrameError::TooLarge { kind: name, len, limit });
        }
        if buf.len() < HEADER + len {
            buf.reserve(HEADER + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER);
        let mut payload = buf.split_to(len).freeze();
        if kind == KIND_MESSAGE {
            return Ok(Some(Frame::Message(payload)));
        }
        if payload.len() < 4 {
            return Err(FrameError::ShortData(payload.len()));
        }
        let sent = payload.get_u32();
        let got = crc32c::crc32c(&payload);
        if sent != got {
            return Err(FrameError::Checksum { sent, got });
        }
        Ok(Some(Frame::Data(payload)))
    }
}

/// Data frames larger than this are handed on in an allocation of their own size (by every
/// [`FrameSource`]), so that the replica may keep them as they are without pinning more.
pub const OWN_ALLOCATION: usize = 64 << 10;

/// Where an incoming stream's frames come from: a [`FrameReader`] over a byte stream (QUIC),
/// or the LAN path's checked records (`lan::LanFrames`). Either hands on a data frame larger
/// than [`OWN_ALLOCATION`] in an allocation of its own.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    fn next(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Frame>>> + Send;
}

impl<R: AsyncRead + Unpin + Send> FrameSource for FrameReader<R> {
    fn next(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Frame>>> + Send {
        FrameReader::next(self)
    }
}

/// Reads frames from an async byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// A large frame being read into a buffer of its own, and its length on the wire.
    large: Option<(BytesMut, usize)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: BytesMut::with_capacity(64 * 1024), large: None }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    ///
    /// A large frame is read into a buffer of its own once its header is in (its header was
    /// checked by then): its bytes are copied only from the stream, not once more out of a
    /// shared buffer.
    ///
    /// # Cancel safety
    /// Cancel-safe: what was read stays in the reader for the next call.
    pub async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf).map_err(invalid)? {
                return Ok(Some(match frame {
                    Frame::Data(chunk) if chunk.len() > OWN_ALLOCATION => Frame::Data(Bytes::copy_from_slice(&chunk)),
                    other => other,
                }));
            }
            if self.buf.len() >= HEADER {
                // `decode` checked the header: the frame's kind is known, its length within limits.
                let total = HEADER + u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if total - HEADER > OWN_ALLOCATION {
                    let mut frame = BytesMut::with_capacity(total);
                    frame.extend_from_slice(&self.buf);
                    self.buf.clear();
                    self.large = Some((frame, total));
                }
            }
            if let Some((frame, total)) = &mut self.large {
                while frame.len() < *total {
                    let want = (*total - frame.len()) as u64;
                    if (&mut self.inner).take(want).read_buf(frame).await? == 0 {
                        return Err(invalid(FrameError::Truncated(frame.len())));
                    }
                }
                let (mut frame, _) = self.large.take().expect("a large frame under way");
                return Frame::decode(&mut frame).map_err(invalid);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(invalid(FrameError::Truncated(self.buf.len()))) };
            }
        }
    }
}

pub(crate) fn invalid(e: FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_frame(chunk: &[u8]) -> Vec<u8> {
        let mut v = Frame::data_header(chunk).to_vec();
        v.extend_from_slice(chunk);
        v
    }

    #[test]
    fn round_trip_in_any_split() {
        let mut wire = Frame::message(b"{\"type\":\"ready\"}").to_vec();
        wire.extend(data_frame(b"hello world"));
        wire.extend(data_frame(b""));
        // Feed the bytes in every possible two-part split.
        for cut in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut frames = Vec::new();
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                frames.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                frames.push(f);
            }
            assert_eq!(
                frames,
                [Frame::Message(Bytes::from_static(b"{\"type\":\"ready\"}")), Frame::Data(Bytes::from_static(b"hello world")), Frame::Data(Bytes::new())],
                "cut at {cut}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn flipped_byte_is_caught() {
        let mut wire = data_frame(b"some stream bytes");
        let last = wire.len() - 1;
        wire[last] ^= 0x01;
        let err = Frame::decode(&mut BytesMut::from(&wire[..])).unwrap_err();
        assert!(matches!(err, FrameError::Checksum { .. }), "{err}");
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(Frame::decode(&mut BytesMut::from(&[9u8, 0, 0, 0, 0][..])), Err(FrameError::UnknownKind(9)));
        let huge = [2u8, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Frame::decode(&mut BytesMut::from(&huge[..])), Err(FrameError::TooLarge { kind: "data", len: u32::MAX as usize, limit: MAX_PAYLOAD }));
        assert_eq!(Frame::decode(&mut BytesMut::from(&[2u8, 0, 0, 0, 2, 0, 0][..])), Err(FrameError::ShortData(2)));
    }

    #[test]
    fn message_frames_are_small_and_refused_before_any_allocation() {
        let at_limit = [&[1u8][..], &(MAX_MESSAGE as u32).to_be_bytes()].concat();
        let mut buf = BytesMut::from(&at_limit[..]);
        assert_eq!(Frame::decode(&mut buf), Ok(None), "a message of exactly the limit is fine");
        let over = [&[1u8][..], &(MAX_MESSAGE as u32 + 1).to_be_bytes()].concat();
        let mut buf = BytesMut::from(&over[..]);
        let capacity = buf.capacity();
        assert_eq!(Frame::decode(&mut buf), Err(FrameError::TooLarge { kind: "message", len: MAX_MESSAGE + 1, limit: MAX_MESSAGE }));
        assert_eq!(buf.capacity(), capacity, "no room was made for the refused frame");
        // Data frames keep their own, larger limit.
        let data = [&[2u8][..], &(MAX_PAYLOAD as u32).to_be_bytes()].concat();
        assert_eq!(Frame::decode(&mut BytesMut::from(&data[..])), Ok(None));
    }

    #[tokio::test]
    async fn a_large_frame_arrives_whole_through_its_own_buffer() {
        let chunk: Vec<u8> = (0..3 * OWN_ALLOCATION).map(|i| i as u8).collect();
        let mut wire = Frame::message(b"{}").to_vec();
        wire.extend(data_frame(&chunk));
        wire.extend(data_frame(b"small"));
        // Through a pipe that carries a few KiB at a time.
        let (mut tx, rx) = tokio::io::duplex(4096);
        let sent = wire.clone();
        let writer = tokio::spawn(async move { tokio::io::AsyncWriteExt::write_all(&mut tx, &sent).await.unwrap() });
        let mut r = FrameReader::new(rx);
        assert_eq!(r.next().await.unwrap(), Some(Frame::Message(Bytes::from_static(b"{}"))));
        assert_eq!(r.next().await.unwrap(), Some(Frame::Data(Bytes::from(chunk))));
        assert_eq!(r.next().await.unwrap(), Some(Frame::Data(Bytes::from_static(b"small"))));
        writer.await.unwrap();
        assert_eq!(r.next().await.unwrap(), None);
        // Cut inside the large frame.
        let mut r = FrameReader::new(&wire[..7 + 1000]);
        r.next().await.unwrap();
        let err = r.next().await.unwrap_err();
        assert!(err.to_string().contains("ended inside a frame"), "{err}");
    }

    #[tokio::test]
    async fn reader_reports_truncation_and_clean_end() {
        let wire = data_frame(b"abc");
        let mut r = FrameReader::new(&wire[..wire.len() - 1]);
        let err = r.next().await.unwrap_err();
        assert!(err.to_string().contains("ended inside a frame"), "{err}");
        let mut r = FrameReader::new(&wire[..]);
        assert_eq!(r.next().await.unwrap(), Some(Frame::Data(Bytes::from_static(b"abc"))));
        assert_eq!(r.next().await.unwrap(), None);
    }
}
