//! Arbitrary bytes as a snapship stream: the frame decoder and the protocol message parser
//! must never panic, and what they accept must be exactly what the encoder writes.
//!
//! The input is decoded three ways, which must agree frame for frame and end the same way:
//! all at once, fed in small pieces (as the network delivers it), and through the async
//! `FrameReader` the transfer code uses.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use snapship::ship::frame::{Frame, FrameError, FrameReader, MAX_MESSAGE, MAX_PAYLOAD};
use snapship::ship::protocol::Message;

const HEADER: usize = 5;

/// How decoding a byte stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The decoder wanted more bytes; this many were left unconsumed.
    NeedMore(usize),
    Failed(FrameError),
}

fuzz_target!(|data: &[u8]| {
    let (frames, end) = decode_all(data);
    for frame in &frames {
        if let Frame::Message(json) = frame {
            check_message(json);
        }
    }

    // The same bytes arriving in pieces give the same frames and the same end.
    let piece = 1 + data.len() % 17;
    let (frames_pieces, end_pieces) = decode_in_pieces(data, piece);
    assert_eq!(frames_pieces, frames, "fed in pieces of {piece}");
    assert_eq!(end_pieces, end, "fed in pieces of {piece}");

    // And FrameReader: a clean end only between frames, else the decoder's error or truncation.
    let mut reader = FrameReader::new(data);
    let mut read = Vec::new();
    let outcome = futures::executor::block_on(async {
        loop {
            match reader.next().await {
                Ok(Some(frame)) => read.push(frame),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    assert_eq!(read, frames, "FrameReader");
    match (&end, outcome) {
        (End::NeedMore(0), Ok(())) => {}
        (End::NeedMore(left), Err(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(inner(&e), Some(&FrameError::Truncated(*left)), "{e}");
        }
        (End::Failed(want), Err(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            assert_eq!(inner(&e), Some(want), "{e}");
        }
        (end, outcome) => panic!("decoder ended with {end:?}, FrameReader with {outcome:?}"),
    }
});

/// Decodes frames from the front of `data` until the decoder fails or needs more bytes,
/// checking each step.
fn decode_all(data: &[u8]) -> (Vec<Frame>, End) {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        let at = data.len() - before;
        let result = Frame::decode(&mut buf);
        // A decode never claims more bytes than it was given, nor grows the buffer.
        let consumed = before.checked_sub(buf.len()).expect("decode grew the buffer");
        assert_eq!(&data[at + consumed..], &buf[..], "decode must consume only from the front");
        match result {
            Ok(None) => {
                assert_eq!(consumed, 0, "`need more bytes` must leave the buffer alone");
                // It really is short: no header yet, or the header's payload is not all there.
                let rest = &data[at..];
                if rest.len() >= HEADER {
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    assert!(rest.len() < HEADER + len, "asked for more with a whole frame buffered");
                }
                return (frames, End::NeedMore(before));
            }
            Ok(Some(frame)) => {
                let wire = &data[at..at + consumed];
                check_frame(&frame, wire);
                frames.push(frame);
            }
            Err(e) => {
                check_error(&e, &data[at..], consumed);
                return (frames, End::Failed(e));
            }
        }
    }
}

/// Like [`decode_all`], but the bytes arrive `piece` at a time and the decoder is asked
/// after each arrival, as [`FrameReader`] does.
fn decode_in_pieces(data: &[u8], piece: usize) -> (Vec<Frame>, End) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, End::Failed(e)),
            }
        }
    }
    (frames, End::NeedMore(buf.len()))
}

/// A decoded frame is within the limits and is exactly what the encoder writes for it.
fn check_frame(frame: &Frame, wire: &[u8]) {
    let encoded = match frame {
        Frame::Message(json) => {
            assert!(json.len() <= MAX_MESSAGE, "message of {} bytes", json.len());
            Frame::message(json).to_vec()
        }
        Frame::Data(chunk) => {
            // The CRC takes 4 of the payload's bytes.
            assert!(chunk.len() + 4 <= MAX_PAYLOAD, "data chunk of {} bytes", chunk.len());
            let mut v = Frame::data_header(chunk).to_vec();
            v.extend_from_slice(chunk);
            v
        }
    };
    assert_eq!(encoded, wire, "re-encoding {frame:?} gives other bytes");
    let mut again = BytesMut::from(&encoded[..]);
    assert_eq!(Frame::decode(&mut again).as_ref(), Ok(&Some(frame.clone())));
    assert!(again.is_empty());
}

/// An error describes the bytes it was raised for.
fn check_error(e: &FrameError, rest: &[u8], consumed: usize) {
    let _ = e.to_string();
    match *e {
        FrameError::UnknownKind(kind) => {
            assert_eq!(kind, rest[0]);
            assert!(kind != 1 && kind != 2);
        }
        FrameError::TooLarge { len, limit, .. } => assert!(len > limit && (limit == MAX_MESSAGE || limit == MAX_PAYLOAD)),
        FrameError::ShortData(len) => {
            assert_eq!(rest[0], 2);
            assert!(len < 4);
            assert_eq!(consumed, HEADER + len);
        }
        FrameError::Checksum { sent, got } => {
            assert_eq!(rest[0], 2);
            assert_ne!(sent, got);
        }
        FrameError::Truncated(_) => panic!("the pure decoder never reports truncation: {e}"),
    }
}

/// Whatever the peer sends as a message parses or is refused; what parses round-trips.
fn check_message(json: &[u8]) {
    match Message::from_json(json) {
        Ok(m) => {
            let back = Message::from_json(&m.to_json()).expect("a message we serialize parses");
            assert_eq!(back, m);
        }
        Err(e) => assert!(e.starts_with("malformed message"), "{e}"),
    }
}

fn inner(e: &std::io::Error) -> Option<&FrameError> {
    e.get_ref()?.downcast_ref::<FrameError>()
}
