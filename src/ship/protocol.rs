//! The snapship protocol, version 1: what origin and replica say to each other.
//!
//! Every request is one QUIC bidirectional stream, opened by the origin:
//! ```text
//! list:     O: hello, list{fileset}           R: snapshots{..} | error
//! transfer: O: hello, begin{fileset, snapshot, identity, base, compression}
//!                                             R: ready | error
//!           O: data frames..., end{bytes, blake3}
//!                                             R: committed | error   (an error may come early)
//! ```
//! Who the peer is comes from its verified certificate, never from a message, and where a
//! received snapshot lands comes from the replica's own policy: no message carries a path.

use serde::{Deserialize, Serialize};

use crate::config::units::Compression;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello { version: u32 },
    List { fileset: String },
    Snapshots {
        snapshots: Vec<WireSnapshot>,
        /// The replica receives the compact stream format (btrfs send protocol 2).
        #[serde(default)]
        compact: bool,
    },
    Begin { fileset: String, snapshot: String, identity: String, base: Option<String>, compression: WireCompression },
    Ready,
    /// After the last data frame: the uncompressed stream's length and BLAKE3 hash.
    End { bytes: u64, blake3: String },
    Committed { snapshot: String },
    Error { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireSnapshot {
    pub name: String,
    pub identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireCompression {
    None,
    Zstd,
}

impl From<Compression> for WireCompression {
    fn from(c: Compression) -> Self {
        match c.zstd_level() {
            None => WireCompression::None,
            Some(_) => WireCompression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    Version,
    /// The peer may not do this (not the file set's origin, or this node is not its replica).
    Unauthorized,
    /// Not a request this node understands at this point.
    BadRequest,
    /// Another transfer into the same replica is running.
    Busy,
    /// The stream failed its checksum.
    Checksum,
    /// The filesystem refused the stream.
    ReceiveFailed,
    /// The origin gave up part way (its send failed).
    Aborted,
}

impl Message {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("messages always serialize")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Message, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("malformed message: {e}"))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error { code, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = Message::Begin {
            fileset: "projects".into(),
            snapshot: "snapship-20260101T000000.000Z".into(),
            identity: "u1".into(),
            base: None,
            compression: WireCompression::Zstd,
        };
        let json = m.to_json();
        assert!(String::from_utf8_lossy(&json).starts_with("{\"type\":\"begin\""));
        assert_eq!(Message::from_json(&json).unwrap(), m);
        let e = Message::error(ErrorCode::Unauthorized, "no");
        assert_eq!(Message::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        assert!(Message::from_json(b"{\"type\":\"launch_missiles\"}").is_err());
        // A sender cannot smuggle in fields the protocol does not have (like a target path).
        let begin = br#"{"type":"begin","fileset":"x","snapshot":"s","identity":"i","base":null,"compression":"none","path":"/etc"}"#;
        assert!(Message::from_json(begin).unwrap_err().contains("unknown field `path`"));
        assert!(Message::from_json(b"not json").is_err());
    }
}
