//! Checks a btrfs send stream on its way to `btrfs receive`: the stream may only build on the
//! base the replica agreed to.
//!
//! `btrfs receive` looks an incremental stream's parent, and every clone source, up by UUID
//! on the whole mounted filesystem (`--chroot` notwithstanding), so a hostile origin that
//! knows the UUID of any subvolume there could have its content cloned into its replica. The
//! replica has checked that the `begin`'s base is one of its own snapshots; this checks that
//! the stream says the same: its first command makes a new subvolume (a full stream, no base)
//! or a snapshot of exactly that base, and every clone command names the base or the
//! snapshot being received. A command that must be checked is held back whole until it is;
//! everything else flows through unchanged, but for one addition:
//!
//! **The root directory's times.** `btrfs send` (seen with kernel 6.18) sends the times of
//! the subvolume's root directory once, when it has processed the root, but goes on creating
//! new inodes under temporary names in the root and renaming them into place afterwards; each
//! of those bumps the root's mtime on the receiving side, and no later `utimes` puts it back.
//! A full stream of a tree with many directories then arrives with the root's mtime at the
//! receive time (`btrfs send | btrfs receive` alike; `snapship verify` found it). So the last
//! `utimes` of the root is sent again right before the stream's `end`: the copy gets the
//! origin's times, whatever the order of the commands before.
//!
//! Format (btrfs-progs `send.h`, versions 1 to 3): a 17-byte header (`btrfs-stream\0`, a
//! little-endian u32 version), then commands: a u32 length, a u16 command, a u32 crc, and
//! `length` bytes of attributes (u16 type, u16 length, data).

use std::ops::Range;

use anyhow::{Result, bail};

const MAGIC: &[u8; 13] = b"btrfs-stream\0";
const HEADER: usize = 17;
const COMMAND_HEADER: usize = 10;
/// The commands that name other subvolumes.
const C_SUBVOL: u16 = 1;
const C_SNAPSHOT: u16 = 2;
const C_CLONE: u16 = 16;
/// The root directory's times are repeated before the end (see the module comment).
const C_UTIMES: u16 = 20;
const C_END: u16 = 21;
const A_PATH: u16 = 15;
/// Their attributes that matter here.
const A_UUID: u16 = 1;
const A_CLONE_UUID: u16 = 20;
/// A checked command is held in memory whole: these are small (names and numbers).
const MAX_CHECKED: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before the stream header.
    Header,
    /// Before a command header.
    Command,
    /// Inside the body of an unchecked command: this many bytes flow through.
    Passing(usize),
    /// A checked command of this length (header included) is being gathered.
    Holding(usize),
}

/// What to forward, in order, after a [`StreamCheck::push`]: most of the stream is ranges of
/// the bytes just pushed (forwarded as they are, not copied), the rest bytes the check held
/// across pushes or adds.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Pushed(Range<usize>),
    Held(Vec<u8>),
}

impl Piece {
    /// The bytes of this piece, `data` being what was pushed.
    pub fn bytes<'a>(&'a self, data: &'a [u8]) -> &'a [u8] {
        match self {
            Piece::Pushed(range) => &data[range.clone()],
            Piece::Held(bytes) => bytes,
        }
    }
}

/// A push parser: feed it the stream as it comes, forward what it returns.
pub struct StreamCheck {
    /// The identity (uuid) of the snapshot being received, and of its base.
    identity: String,
    base: Option<String>,
    state: State,
    /// Bytes of a header or held command not yet complete.
    held: Vec<u8>,
    /// Where in the bytes being pushed `held` starts, when all of it came in this push (then
    /// it is forwarded as a range of them).
    held_from: Option<usize>,
    /// Subvolume-making commands seen (a stream must make exactly one).
    made: usize,
    /// The last `utimes` of the root directory (path ""), whole, to repeat before `end`.
    root_times: Option<Vec<u8>>,
}

impl StreamCheck {
    pub fn new(identity: &str, base: Option<&str>) -> StreamCheck {
        StreamCheck {
            identity: identity.to_lowercase(),
            base: base.map(str::to_lowercase),
            state: State::Header,
            held: Vec::new(),
            held_from: None,
            made: 0,
            root_times: None,
        }
    }

    /// Takes the next bytes of the stream, `data`; appends to `out` what may be forwarded
    /// now (ranges of `data` and held bytes, in order). An error: the stream does something
    /// the replica did not agree to (forward nothing more).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Piece>) -> Result<()> {
        // What is held from an earlier push is not in `data`.
        self.held_from = None;
        let mut pos = 0;
        while pos < data.len() {
            match self.state {
                State::Passing(left) => {
                    let n = left.min(data.len() - pos);
                    forward(out, pos..pos + n);
                    pos += n;
                    self.state = if n == left { State::Command } else { State::Passing(left - n) };
                }
                State::Header | State::Command | State::Holding(_) => {
                    let want = match self.state {
                        State::Header => HEADER,
                        State::Command => COMMAND_HEADER,
                        State::Holding(total) => total,
                        State::Passing(_) => unreachable!("handled above"),
                    };
                    if self.held.is_empty() {
                        self.held_from = Some(pos);
                    }
                    let n = (want - self.held.len()).min(data.len() - pos);
                    self.held.extend_from_slice(&data[pos..pos + n]);
                    pos += n;
                    if self.held.len() == want {
                        self.complete(out, pos)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// At the end of the stream: it must not stop inside a header or a held command, and must
    /// have made its one subvolume.
    pub fn finish(&self) -> Result<()> {
        if !self.held.is_empty() || matches!(self.state, State::Passing(_) | State::Holding(_)) {
            bail!("the send stream ends inside a command");
        }
        if self.made != 1 {
            bail!("the send stream makes {} subvolumes; a snapshot's stream makes one", self.made);
        }
        Ok(())
    }

    /// `held` holds a whole header or command, which ends at `pos` in the bytes being pushed:
    /// check it, release it, move on.
    fn complete(&mut self, out: &mut Vec<Piece>, pos: usize) -> Result<()> {
        match self.state {
            State::Header => {
                if &self.held[..13] != MAGIC {
                    bail!("not a btrfs send stream (no btrfs-stream header)");
                }
                self.release(out, pos, State::Command);
            }
            State::Command => {
                let len = u32::from_le_bytes(self.held[0..4].try_into().expect("4 bytes")) as usize;
                let cmd = u16::from_le_bytes(self.held[4..6].try_into().expect("2 bytes"));
                if matches!(cmd, C_SUBVOL | C_SNAPSHOT | C_CLONE | C_UTIMES | C_END) {
                    if len > MAX_CHECKED {
                        bail!("a send stream command of {len} bytes where a few hundred are expected");
                    }
                    self.state = State::Holding(COMMAND_HEADER + len);
                    if len == 0 {
                        return self.complete(out, pos);
                    }
                } else {
                    self.release(out, pos, if len == 0 { State::Command } else { State::Passing(len) });
                }
            }
            State::Holding(_) => {
                let cmd = u16::from_le_bytes(self.held[4..6].try_into().expect("2 bytes"));
                match cmd {
                    C_UTIMES => {
                        if attribute(&self.held[COMMAND_HEADER..], A_PATH).is_some_and(<[u8]>::is_empty) {
                            self.root_times = Some(self.held.clone());
                        }
                    }
                    C_END => {
                        if let Some(times) = self.root_times.take() {
                            out.push(Piece::Held(times));
                        }
                    }
                    _ => self.check_command()?,
                }
                self.release(out, pos, State::Command);
            }
            State::Passing(_) => unreachable!("nothing is held while passing"),
        }
        Ok(())
    }

    /// Forwards what is held (which ends at `pos` in the bytes being pushed).
    fn release(&mut self, out: &mut Vec<Piece>, pos: usize, next: State) {
        match self.held_from.take() {
            Some(from) => {
                forward(out, from..pos);
                self.held.clear();
            }
            None => out.push(Piece::Held(std::mem::take(&mut self.held))),
        }
        self.state = next;
    }

    /// The held command (header and attributes) names only what the replica agreed to.
    fn check_command(&mut self) -> Result<()> {
        let cmd = u16::from_le_bytes(self.held[4..6].try_into().expect("2 bytes"));
        let attr = |wanted: u16| attribute(&self.held[COMMAND_HEADER..], wanted).map(uuid_text);
        match cmd {
            C_SUBVOL | C_SNAPSHOT => {
                self.made += 1;
                if self.made > 1 {
                    bail!("the send stream makes a second subvolume");
                }
                if attr(A_UUID).as_deref() != Some(self.identity.as_str()) {
                    bail!("the send stream makes a subvolume of another identity than the snapshot announced");
                }
                let parent = attr(A_CLONE_UUID);
                match (cmd, &self.base, parent) {
                    (C_SUBVOL, None, _) => {}
                    (C_SUBVOL, Some(_), _) => bail!("the send stream is a full stream where an incremental one was announced"),
                    (_, Some(base), Some(parent)) if *base == parent => {}
                    (_, None, _) => bail!("the send stream is incremental where a full stream was announced"),
                    (_, Some(_), _) => bail!("the send stream builds on another parent than the base it announced"),
                }
            }
            _ => {
                let source = attr(A_CLONE_UUID);
                let allowed = source.as_deref() == Some(self.identity.as_str()) || (source.is_some() && source == self.base);
                if !allowed {
                    bail!("the send stream clones from a subvolume that is neither its base nor itself");
                }
            }
        }
        Ok(())
    }
}

/// Appends `range` of the pushed bytes to `out`, as part of the previous piece if it ends there.
fn forward(out: &mut Vec<Piece>, range: Range<usize>) {
    if let Some(Piece::Pushed(last)) = out.last_mut()
        && last.end == range.start
    {
        last.end = range.end;
        return;
    }
    out.push(Piece::Pushed(range));
}

/// The data of the first attribute of `wanted` type among `attrs`.
fn attribute(mut attrs: &[u8], wanted: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let kind = u16::from_le_bytes([attrs[0], attrs[1]]);
        let len = u16::from_le_bytes([attrs[2], attrs[3]]) as usize;
        let data = attrs.get(4..4 + len)?;
        if kind == wanted {
            return Some(data);
        }
        attrs = &attrs[4 + len..];
    }
    None
}

/// A 16-byte uuid as text, the way libbtrfsutil prints it (lowercase, hyphenated).
fn uuid_text(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if hex.len() != 32 {
        return hex;
    }
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 16] = [0x11; 16];
    const BASE: [u8; 16] = [0x22; 16];
    const OTHER: [u8; 16] = [0x33; 16];

    fn tlv(kind: u16, data: &[u8]) -> Vec<u8> {
        [&kind.to_le_bytes()[..], &(data.len() as u16).to_le_bytes(), data].concat()
    }

    fn command(cmd: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = attrs.concat();
        [&(body.len() as u32).to_le_bytes()[..], &cmd.to_le_bytes(), &[0u8; 4], &body].concat()
    }

    fn stream(commands: &[Vec<u8>]) -> Vec<u8> {
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&2u32.to_le_bytes());
        for c in commands {
            s.extend_from_slice(c);
        }
        s
    }

    /// Feeds `bytes` in pieces of `step`; what was forwarded, or the error.
    fn run(bytes: &[u8], base: Option<&[u8; 16]>, step: usize) -> Result<Vec<u8>> {
        let mut check = StreamCheck::new(&uuid_text(&ME), base.map(|b| uuid_text(b)).as_deref());
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            let mut pieces = Vec::new();
            check.push(piece, &mut pieces)?;
            for p in &pieces {
                out.extend_from_slice(p.bytes(piece));
            }
        }
        check.finish()?;
        Ok(out)
    }

    fn write(len: usize) -> Vec<u8> {
        command(15, &[tlv(15, b"f"), tlv(19, &vec![7u8; len])])
    }

    #[test]
    fn a_faithful_stream_passes_unchanged_in_any_pieces() {
        let incremental = stream(&[
            command(C_SNAPSHOT, &[tlv(15, b"snap"), tlv(A_UUID, &ME), tlv(A_CLONE_UUID, &BASE)]),
            write(5000),
            command(C_CLONE, &[tlv(A_CLONE_UUID, &BASE)]),
            command(21, &[]),
        ]);
        for step in [1, 3, 10, 17, 4096, 1 << 20] {
            assert_eq!(run(&incremental, Some(&BASE), step).unwrap(), incremental, "pieces of {step}");
        }
        let full =
            stream(&[command(C_SUBVOL, &[tlv(15, b"snap"), tlv(A_UUID, &ME)]), write(10), command(C_CLONE, &[tlv(A_CLONE_UUID, &ME)]), command(21, &[])]);
        assert_eq!(run(&full, None, 7).unwrap(), full);
    }

    #[test]
    fn the_roots_last_times_are_repeated_before_the_end() {
        let root_times = |t: u8| command(C_UTIMES, &[tlv(A_PATH, b""), tlv(10, &[t; 12])]);
        let other_times = command(C_UTIMES, &[tlv(A_PATH, b"big"), tlv(10, &[9; 12])]);
        let mkfile = command(3, &[tlv(A_PATH, b"o261-7-0")]);
        let head =
            [command(C_SUBVOL, &[tlv(A_PATH, b"snap"), tlv(A_UUID, &ME)]), root_times(1), mkfile.clone(), root_times(2), mkfile.clone(), other_times.clone()];
        let sent = stream(&[&head[..], &[command(C_END, &[])]].concat());
        let wanted = stream(&[&head[..], &[root_times(2), command(C_END, &[])]].concat());
        for step in [1, 5, 64, 1 << 20] {
            assert_eq!(run(&sent, None, step).unwrap(), wanted, "pieces of {step}");
        }
        // Without a root `utimes` nothing is added.
        let plain = stream(&[command(C_SUBVOL, &[tlv(A_UUID, &ME)]), other_times, command(C_END, &[])]);
        assert_eq!(run(&plain, None, 3).unwrap(), plain);
    }

    #[test]
    fn a_stream_that_builds_on_or_clones_from_anything_else_is_refused() {
        let on = |parent: &[u8; 16]| stream(&[command(C_SNAPSHOT, &[tlv(A_UUID, &ME), tlv(A_CLONE_UUID, parent)]), command(21, &[])]);
        assert!(run(&on(&OTHER), Some(&BASE), 5).unwrap_err().to_string().contains("another parent"));
        let clone = stream(&[command(C_SUBVOL, &[tlv(A_UUID, &ME)]), command(C_CLONE, &[tlv(A_CLONE_UUID, &OTHER)])]);
        assert!(run(&clone, None, 5).unwrap_err().to_string().contains("clones from a subvolume"));
        let two = stream(&[command(C_SUBVOL, &[tlv(A_UUID, &ME)]), command(C_SUBVOL, &[tlv(A_UUID, &ME)])]);
        assert!(run(&two, None, 5).unwrap_err().to_string().contains("second subvolume"));
        let other_identity = stream(&[command(C_SUBVOL, &[tlv(A_UUID, &OTHER)])]);
        assert!(run(&other_identity, None, 5).unwrap_err().to_string().contains("another identity"));
        let full_for_incremental = stream(&[command(C_SUBVOL, &[tlv(A_UUID, &ME)])]);
        assert!(run(&full_for_incremental, Some(&BASE), 5).is_err());
        assert!(run(&on(&BASE), None, 5).is_err(), "incremental where a full stream was announced");
        assert!(run(b"not a stream at all, no", None, 4).is_err());
        // Nothing of a refused command is forwarded.
        let mut check = StreamCheck::new(&uuid_text(&ME), Some(&uuid_text(&BASE)));
        let mut out = Vec::new();
        assert!(check.push(&on(&OTHER), &mut out).is_err());
        assert_eq!(out, [Piece::Pushed(0..HEADER)], "only the stream header went through");
    }

    #[test]
    fn a_stream_pushed_in_large_pieces_is_forwarded_as_ranges_of_them() {
        let full = stream(&[command(C_SUBVOL, &[tlv(15, b"snap"), tlv(A_UUID, &ME)]), write(5000), write(70_000), command(21, &[])]);
        let mut check = StreamCheck::new(&uuid_text(&ME), None);
        let mut out = Vec::new();
        check.push(&full, &mut out).unwrap();
        assert_eq!(out, [Piece::Pushed(0..full.len())], "one range, no copy");
    }

    #[test]
    fn uuids_print_as_libbtrfsutil_does() {
        assert_eq!(uuid_text(&[0xab; 16]), "abababab-abab-abab-abab-abababababab");
    }
}
