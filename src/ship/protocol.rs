//! The snapship protocol, version 6: what origin and replica say to each other.
//!
//! Every request is one QUIC bidirectional stream, opened by the origin:
//! ```text
//! list:     O: hello, list{fileset}           R: snapshots{.., partial} | error
//!           (also a replica to its origin, for `snapship list`: the origin answers with its
//!           own snapshots)
//! transfer: O: hello, begin{fileset, snapshot, identity, base, compression, compact, resume, lan}
//!                                             R: ready | lan_ready{transfer, key} | error
//!           (after lan_ready the data frames and end go over the LAN path's TCP connection,
//!           `lan.rs`; everything the replica says stays on this stream)
//!           O: data frames..., end{bytes, blake3}
//!                                             R: ack{offset}..., committed | error
//! verify:   O: hello, verify{fileset, snapshot, full}
//!                                             R: verify_root{root} | error
//!           O: verify_dir{path, after}        R: verify_entries{entries, more} | error
//!           ... (one page per request, only where the origin's tree differs)
//!           O: verify_done                    R: verify_done
//! describe: X: hello, describe{fileset?}      Y: described{node, policy?} | error
//!           (`snapship check --peers`, from any peer: the node it is, and its policy for a
//!           file set both are members of, as canonical YAML, to compare with the asker's)
//! holds:    M: hello, holds{fileset}          N: snapshots{..} | error
//!           (any member asks any other what it holds: names and identities, read-only)
//! fetch:    M: hello, fetch{fileset, snapshot}
//!                                             N: fetched{snapshot, base, bytes} | error
//!           (N ships the snapshot to M, and only to M, as a transfer of its own: N opens
//!           list and begin to M, which admits them only while it awaits this fetch)
//! ```
//! The replica acknowledges the stream offsets it holds (in its spool) as they grow. A cut
//! transfer stays with the replica for a while, and `snapshots` reports it as `partial`: the
//! origin regenerates the same stream, checks that its first `offset` bytes hash to what
//! the replica holds, and sends a `begin` with `resume` to go on from there. Offsets and
//! hashes are of the uncompressed send stream.
//! Who the peer is comes from its verified certificate, never from a message, and where a
//! received snapshot lands comes from the replica's own policy: no message carries a path.

use serde::{Deserialize, Serialize};

use crate::config::units::Compression;
use crate::snapshot::tree::Entry;
pub use crate::store::Epoch;

/// 3: the file set's epoch in `list`, `begin`, `snapshots` and fencing errors.
/// 4: `verify`, `verify_dir` and their answers (`snapship verify`).
/// 5: the room a replica has: `free` in `snapshots`, `room` in a `no_space` error, so that
/// an origin waits for room, checking with `list`, instead of resending blindly.
/// Also in 5: `lan` in `begin`, answered by `lan_ready` (the LAN path, `lan.rs`).
/// 6: `holds`, `fetch` and `fetched`: a member gets a snapshot another member holds (promote
/// fetches the survivors' newest first; `restore --from NODE`); `describe` and `described`
/// (`snapship check --peers`).
pub const VERSION: u32 = 6;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello {
        version: u32,
    },
    List {
        fileset: String,
        /// The epoch the asking origin acts in.
        epoch: Epoch,
    },
    Snapshots {
        snapshots: Vec<WireSnapshot>,
        /// The replica receives the compact stream format (btrfs send protocol 2).
        #[serde(default)]
        compact: bool,
        /// A transfer into this file set that was cut and can be resumed.
        #[serde(default)]
        partial: Option<Partial>,
        /// The newest epoch the replica knows.
        epoch: Epoch,
        /// On a relay (cascades): the replicas it feeds, and theirs, as it last saw them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        downstream: Vec<Hop>,
        /// Bytes free where the replica receives this file set, if it can tell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        free: Option<u64>,
    },
    Begin {
        fileset: String,
        snapshot: String,
        identity: String,
        base: Option<String>,
        compression: WireCompression,
        /// The stream is in the backend's compact format.
        #[serde(default)]
        compact: bool,
        /// Go on with the replica's partial transfer from this point, instead of from zero.
        #[serde(default)]
        resume: Option<ResumeFrom>,
        /// The stream is `zfs send -t` of the replica's resume token: it continues the
        /// partial receive the replica's filesystem kept.
        #[serde(default)]
        from_token: bool,
        /// The epoch the sending origin acts in.
        epoch: Epoch,
        /// The origin would send the stream over the LAN path (`ship/lan.rs`), if the replica
        /// allows it for this origin too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        lan: bool,
    },
    Ready,
    /// Instead of `ready`, to a `begin` with `lan`: send the stream over the LAN path, on a
    /// TCP connection presenting this one-time ticket (hex: a transfer id and a MAC key).
    LanReady {
        transfer: String,
        key: String,
    },
    /// The replica holds the stream up to `offset`.
    Ack {
        offset: u64,
    },
    /// After the last data frame: the uncompressed stream's length and BLAKE3 hash.
    End {
        bytes: u64,
        blake3: String,
    },
    Committed {
        snapshot: String,
    },
    /// A planned switchover: the origin (acting in `epoch`) asks this replica to become the
    /// origin from `snapshot`, which it has just received, and has frozen its own writes.
    Handover {
        fileset: String,
        snapshot: String,
        epoch: Epoch,
    },
    /// The replica took over: it is the origin in `epoch`.
    TookOver {
        epoch: Epoch,
    },
    /// Asks a member what it holds of `fileset` (its home: received copies, or an origin's
    /// own snapshots), answered by `snapshots`; any member of the file set may ask.
    Holds {
        fileset: String,
    },
    /// Asks a member to ship `snapshot` (a name it listed in `holds`) of `fileset` to the
    /// asker, incrementally from the newest base both hold; answered once it was received.
    /// No field names a target: the snapshot goes to the authenticated asker only.
    Fetch {
        fileset: String,
        snapshot: String,
    },
    /// The asker has `snapshot` now, shipped from `base` (`None`: a full stream) in `bytes`
    /// stream bytes (0: it held it already).
    Fetched {
        snapshot: String,
        #[serde(default)]
        base: Option<String>,
        bytes: u64,
    },
    /// Asks for the hash tree of `snapshot` (a name) as the replica holds it, authorized like
    /// `list`; `full`: rehash every file rather than reuse the replica's cached hashes.
    Verify {
        fileset: String,
        snapshot: String,
        #[serde(default)]
        full: bool,
        epoch: Epoch,
    },
    /// The root of the replica's tree of the snapshot (metadata and hash).
    VerifyRoot {
        root: Entry,
    },
    /// The entries of the directory at `path` (names from the root) after the name `after`.
    VerifyDir {
        path: Vec<String>,
        #[serde(default)]
        after: Option<String>,
    },
    /// One page of a directory's entries, sorted by name; `more`: ask again after the last.
    VerifyEntries {
        entries: Vec<Entry>,
        more: bool,
    },
    /// The origin has compared all it needed; the replica answers it in kind and closes.
    VerifyDone,
    /// `snapship check --peers`: who are you, and (with a file set both nodes are members
    /// of) what is your policy for it.
    Describe {
        #[serde(default)]
        fileset: Option<String>,
    },
    /// The answer to `describe`: the node this is, and its policy for the file set asked
    /// about, as canonical YAML (comments and key order gone: see `Policy::document`).
    Described {
        node: String,
        #[serde(default)]
        policy: Option<String>,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// With [`ErrorCode::Fenced`]: the newer epoch the peer knows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
        /// With [`ErrorCode::NoSpace`]: the room the replica has, and what the stream needed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<Room>,
    },
}

/// How much room a replica has for a file set's streams: bytes free on its filesystem (or
/// pool) when it answered (the failed receive's partial may still be being freed), the
/// stream bytes it had taken when the receive failed, and the stream's length when it had
/// all of it (`None`: it failed before the end, needing more than it took).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Room {
    pub free: u64,
    #[serde(default)]
    pub received: u64,
    #[serde(default)]
    pub needed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireSnapshot {
    pub name: String,
    pub identity: String,
}

/// One replica a relay feeds, as the relay last saw it: for the origin's status of the whole
/// tree. Only shown, never acted on; the receiver checks it against its own policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hop {
    pub node: String,
    /// The newest snapshot it holds.
    pub newest: Option<String>,
    /// Its lag behind the relay, in whole seconds.
    pub lag_seconds: Option<u64>,
    #[serde(default)]
    pub backfill_pending: usize,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The replicas it feeds in turn.
    #[serde(default)]
    pub downstream: Vec<Hop>,
}

/// A cut transfer the replica keeps: which stream, and how much of it it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partial {
    pub snapshot: String,
    /// The identities of the snapshot and of the base the stream is incremental from.
    pub identity: String,
    pub base: Option<String>,
    pub compact: bool,
    /// Stream bytes held, and the BLAKE3 of those bytes.
    pub offset: u64,
    pub blake3: String,
    /// Modern ZFS: the dataset's `receive_resume_token`, left by a receive that died with
    /// the replica's process; the origin resumes with `zfs send -t` instead of an offset.
    #[serde(default)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeFrom {
    pub offset: u64,
    /// BLAKE3 of the origin's regenerated stream up to `offset`: it matched the replica's.
    pub blake3: String,
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
    /// The origin gave up part way (its send failed), or the transfer was cut.
    Aborted,
    /// The replica's filesystem (or its spool) is full.
    NoSpace,
    /// A peer or a `btrfs`/`zfs` process made no progress for the stall timeout.
    Stalled,
    /// The partial transfer to resume is not there (any more) or not at that offset.
    CannotResume,
    /// The sender is not the origin of the newest epoch the peer knows (it was promoted
    /// elsewhere): it must stop acting as origin.
    Fenced,
}

impl Message {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("messages always serialize")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Message, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("malformed message: {e}"))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error { code, message: message.into(), epoch: None, room: None }
    }

    /// A `no_space` refusal saying how much room there is.
    pub fn no_space(message: impl Into<String>, room: Room) -> Message {
        Message::Error { code: ErrorCode::NoSpace, message: message.into(), epoch: None, room: Some(room) }
    }

    /// A refusal of an origin whose epoch is older than `known`.
    pub fn fenced(known: &Epoch, message: impl Into<String>) -> Message {
        Message::Error { code: ErrorCode::Fenced, message: message.into(), epoch: Some(known.clone()), room: None }
    }

    /// The message's type as it is on the wire (`begin`, `ack`...): what an error about an
    /// unexpected message names, without echoing what a peer put in it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::List { .. } => "list",
            Message::Snapshots { .. } => "snapshots",
            Message::Begin { .. } => "begin",
            Message::Ready => "ready",
            Message::LanReady { .. } => "lan_ready",
            Message::Ack { .. } => "ack",
            Message::End { .. } => "end",
            Message::Committed { .. } => "committed",
            Message::Handover { .. } => "handover",
            Message::TookOver { .. } => "took_over",
            Message::Holds { .. } => "holds",
            Message::Fetch { .. } => "fetch",
            Message::Fetched { .. } => "fetched",
            Message::Verify { .. } => "verify",
            Message::VerifyRoot { .. } => "verify_root",
            Message::VerifyDir { .. } => "verify_dir",
            Message::VerifyEntries { .. } => "verify_entries",
            Message::VerifyDone => "verify_done",
            Message::Describe { .. } => "describe",
            Message::Described { .. } => "described",
            Message::Error { .. } => "error",
        }
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
            compact: true,
            resume: Some(ResumeFrom { offset: 7, blake3: "ab".into() }),
            from_token: false,
            epoch: Epoch { number: 2, origin: "beta".into() },
            lan: true,
        };
        let json = m.to_json();
        assert!(String::from_utf8_lossy(&json).starts_with("{\"type\":\"begin\""));
        assert_eq!(Message::from_json(&json).unwrap(), m);
        let listing = Message::Snapshots {
            downstream: vec![],
            snapshots: vec![WireSnapshot { name: "snapship-20260101T000000.000Z".into(), identity: "u0".into() }],
            compact: false,
            partial: Some(Partial {
                snapshot: "snapship-20260101T010000.000Z".into(),
                identity: "u1".into(),
                base: Some("u0".into()),
                compact: false,
                offset: 0,
                blake3: String::new(),
                token: Some("1-e604ea4bf-e0-789c63a2".into()),
            }),
            epoch: Epoch { number: 0, origin: "alpha".into() },
            free: Some(1 << 30),
        };
        assert_eq!(Message::from_json(&listing.to_json()).unwrap(), listing);
        let e = Message::error(ErrorCode::Unauthorized, "no");
        assert_eq!(Message::from_json(&e.to_json()).unwrap(), e);
        let full = Message::no_space("full", Room { free: 7, received: 8, needed: Some(9) });
        assert_eq!(Message::from_json(&full.to_json()).unwrap(), full);
    }

    #[test]
    fn verify_messages_round_trip_and_carry_names_only() {
        use crate::snapshot::tree::{FileType, Meta};
        let entry = Entry {
            name: "a.txt".into(),
            meta: Meta { kind: FileType::File, mode: 0o644, uid: 1, gid: 2, size: 3, mtime: (4, 5), xattrs: vec![("user.x".into(), "h".into())], target: None },
            hash: "c0ffee".into(),
        };
        for m in [
            Message::Verify {
                fileset: "projects".into(),
                snapshot: "snapship-20260101T000000.000Z".into(),
                full: true,
                epoch: Epoch { number: 0, origin: "alpha".into() },
            },
            Message::VerifyRoot { root: entry.clone() },
            Message::VerifyDir { path: vec!["docs".into()], after: Some("a.txt".into()) },
            Message::VerifyEntries { entries: vec![entry], more: false },
            Message::VerifyDone,
        ] {
            assert_eq!(Message::from_json(&m.to_json()).unwrap(), m);
        }
        let with_path = br#"{"type":"verify","fileset":"x","snapshot":"s","epoch":{"number":0,"origin":"a"},"path":"/etc"}"#;
        assert!(Message::from_json(with_path).unwrap_err().contains("unknown field `path`"));
    }

    #[test]
    fn fetch_messages_round_trip_and_carry_no_target() {
        for m in [
            Message::Holds { fileset: "projects".into() },
            Message::Fetch { fileset: "projects".into(), snapshot: "snapship-20260101T000000.000Z".into() },
            Message::Fetched { snapshot: "snapship-20260101T000000.000Z".into(), base: None, bytes: 7 },
        ] {
            assert_eq!(Message::from_json(&m.to_json()).unwrap(), m);
        }
        // A fetch names no node to ship to, nor a path: the asker is the target.
        let to = br#"{"type":"fetch","fileset":"x","snapshot":"s","to":"delta"}"#;
        assert!(Message::from_json(to).unwrap_err().contains("unknown field `to`"));
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
