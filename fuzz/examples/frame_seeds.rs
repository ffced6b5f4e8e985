//! Writes the seed inputs of the `frame_decode` target: short, valid streams made with the
//! project's own encoders, so the fuzzer starts from frames that get past the header checks.
//!
//! ```text
//! cd fuzz && cargo run --example frame_seeds -- seeds/frame_decode
//! ```

use std::path::PathBuf;

use snapship::ship::frame::Frame;
use snapship::ship::protocol::{ErrorCode, Message, Partial, ResumeFrom, VERSION, WireCompression, WireSnapshot};

fn message(m: &Message) -> Vec<u8> {
    Frame::message(&m.to_json()).to_vec()
}

fn data(chunk: &[u8]) -> Vec<u8> {
    let mut v = Frame::data_header(chunk).to_vec();
    v.extend_from_slice(chunk);
    v
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: frame_seeds DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let hash = blake3_of_nothing();

    let hello = message(&Message::Hello { version: VERSION });
    let list = [hello.clone(), message(&Message::List { fileset: "projects".into() })].concat();
    let snapshots = message(&Message::Snapshots {
        snapshots: vec![WireSnapshot { name: "2024-05-01T10:00:00Z".into(), identity: "uuid-1".into() }],
        compact: true,
        partial: Some(Partial {
            snapshot: "2024-05-01T10:15:00Z".into(),
            identity: "uuid-2".into(),
            base: Some("uuid-1".into()),
            compact: true,
            offset: 4096,
            blake3: hash.clone(),
            token: Some("1-e604ea4bf-e0-789c63a2".into()),
        }),
    });
    let transfer = [
        hello.clone(),
        message(&Message::Begin {
            fileset: "projects".into(),
            snapshot: "2024-05-01T10:15:00Z".into(),
            identity: "uuid-2".into(),
            base: Some("uuid-1".into()),
            compression: WireCompression::Zstd,
            compact: false,
            resume: Some(ResumeFrom { offset: 4096, blake3: hash.clone() }),
            from_token: false,
        }),
        data(b"btrfs-stream\0chunk"),
        data(b""),
        message(&Message::End { bytes: 18, blake3: hash }),
    ]
    .concat();
    let replies =
        [message(&Message::Ready), message(&Message::Ack { offset: 18 }), message(&Message::Committed { snapshot: "2024-05-01T10:15:00Z".into() })].concat();
    let error = message(&Message::error(ErrorCode::CannotResume, "no partial transfer at offset 4096"));

    for (name, bytes) in [("list", list), ("snapshots", snapshots), ("transfer", transfer), ("replies", replies), ("error", error)] {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}

/// A fixed, well-formed hash string (64 hex digits), without depending on blake3 here.
fn blake3_of_nothing() -> String {
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262".into()
}
