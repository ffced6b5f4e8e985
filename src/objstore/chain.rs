//! What an object store holds, as pure logic over its manifests: which snapshots can be
//! restored (those with a chain of streams back to a full one), when the next stream must
//! be full, and which streams retention may delete (those no kept snapshot's chain uses).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::snapshot::{Snapshot, SnapshotName};

/// One stored send stream, written (sealed) only after all its parts are: its presence is
/// what makes the stream count as held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub fileset: String,
    pub snapshot: String,
    /// The snapshot's identity, and the base's the stream is incremental from (none: full).
    pub identity: String,
    pub base: Option<String>,
    /// The stream is in the backend's compact format.
    pub compact: bool,
    /// Plain bytes of the whole stream and their BLAKE3.
    pub size: u64,
    pub blake3: String,
    /// The data object's key, below the file set's root in the store.
    pub object: String,
    pub parts: Vec<Part>,
    pub uploaded: DateTime<Utc>,
}

/// One part of a stream: its plain size and hash, and the size of its sealed bytes in the
/// data object (parts follow each other in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub plain: u64,
    pub sealed: u64,
    pub blake3: String,
}

impl Manifest {
    /// Each part with its index and its byte range in the data object (parts follow each
    /// other there, sealed).
    pub fn sealed_ranges(&self) -> Vec<(usize, std::ops::Range<u64>, Part)> {
        let mut at = 0u64;
        self.parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let r = at..at + p.sealed;
                at += p.sealed;
                (i, r, p.clone())
            })
            .collect()
    }
}

/// The key a stream's objects share: `NAME.IDENTITY.full` or `NAME.IDENTITY.from.BASE`.
pub fn stream_key(snapshot: &str, identity: &str, base: Option<&str>) -> String {
    match base {
        None => format!("{snapshot}.{identity}.full"),
        Some(b) => format!("{snapshot}.{identity}.from.{b}"),
    }
}

/// Whether `s` may go into an object key: identities and snapshot names only use these.
pub fn key_safe(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && s != "." && s != ".."))
}

/// The shortest chain of streams that restores `identity`: a full stream first, then each
/// incremental on the one before it. `None` if some link is missing.
pub fn chain<'a>(manifests: &'a [Manifest], identity: &str) -> Option<Vec<&'a Manifest>> {
    // Shortest chain length per identity, relaxed until nothing changes (a chain is at most
    // as long as the number of manifests, which bounds the rounds too).
    let mut best: BTreeMap<&str, (usize, usize)> = BTreeMap::new(); // identity -> (length, manifest)
    for _ in 0..=manifests.len() {
        let mut changed = false;
        for (i, m) in manifests.iter().enumerate() {
            let len = match &m.base {
                None => Some(1),
                Some(b) => best.get(b.as_str()).map(|(l, _)| l + 1),
            };
            if let Some(len) = len {
                if best.get(m.identity.as_str()).is_none_or(|(l, _)| len < *l) {
                    best.insert(&m.identity, (len, i));
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut out = Vec::new();
    let mut at = identity;
    while let Some((_, i)) = best.get(at) {
        let m = &manifests[*i];
        out.push(m);
        match &m.base {
            None => {
                out.reverse();
                return Some(out);
            }
            Some(b) => at = b,
        }
        if out.len() > manifests.len() {
            return None;
        }
    }
    None
}

/// The snapshots that can be restored, oldest first, once each.
pub fn held(manifests: &[Manifest]) -> Vec<Snapshot> {
    let mut out: Vec<Snapshot> = Vec::new();
    for m in manifests {
        if out.iter().any(|s| s.identity == m.identity) || chain(manifests, &m.identity).is_none() {
            continue;
        }
        if let Some(name) = SnapshotName::parse(&m.snapshot) {
            out.push(Snapshot { name, identity: m.identity.clone(), local_id: None, parent_local_id: None });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether the next stream must be full: nothing is held yet, or the chain of the newest
/// snapshot starts with a full stream older than `full_every`, or its incrementals add up to
/// more than `ratio` of that full stream's size.
pub fn full_due(manifests: &[Manifest], now: DateTime<Utc>, full_every: Duration, ratio: f64) -> bool {
    let Some(newest) = held(manifests).pop() else { return true };
    let Some(chain) = chain(manifests, &newest.identity) else { return true };
    let full = chain[0];
    let age = SnapshotName::parse(&full.snapshot).map(|n| now - n.time()).unwrap_or_default();
    if age.to_std().unwrap_or_default() >= full_every {
        return true;
    }
    let incrementals: u64 = chain[1..].iter().map(|m| m.size).sum();
    incrementals as f64 > ratio * full.size as f64
}

/// The streams no snapshot in `keep` (identities) needs: each kept snapshot keeps the
/// streams of its shortest chain, everything else may go.
pub fn unneeded<'a>(manifests: &'a [Manifest], keep: &[String]) -> Vec<&'a Manifest> {
    let mut needed: Vec<&str> = Vec::new();
    for identity in keep {
        for m in chain(manifests, identity).unwrap_or_default() {
            needed.push(&m.object);
        }
    }
    manifests.iter().filter(|m| !needed.contains(&m.object.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(hour: u32) -> String {
        format!("snapship-20260101T{hour:02}0000.000Z")
    }

    fn m(hour: u32, identity: &str, base: Option<&str>, size: u64) -> Manifest {
        let snapshot = name(hour);
        Manifest {
            fileset: "projects".into(),
            object: format!("streams/{}", stream_key(&snapshot, identity, base)),
            snapshot,
            identity: identity.into(),
            base: base.map(Into::into),
            compact: false,
            size,
            blake3: "h".into(),
            parts: Vec::new(),
            uploaded: Utc::now(),
        }
    }

    fn ids(chain: Option<Vec<&Manifest>>) -> Vec<String> {
        chain.unwrap_or_default().iter().map(|m| m.object.trim_start_matches("streams/").to_string()).collect()
    }

    fn at(hour: u32) -> DateTime<Utc> {
        SnapshotName::parse(&name(hour)).unwrap().time()
    }

    #[test]
    fn chains_go_back_to_a_full_stream_by_the_shortest_way() {
        let ms = vec![m(1, "a", None, 100), m(2, "b", Some("a"), 10), m(3, "c", Some("b"), 10), m(3, "c", None, 100), m(4, "d", Some("c"), 5)];
        assert_eq!(ids(chain(&ms, "b")), [stream_key(&name(1), "a", None), stream_key(&name(2), "b", Some("a"))]);
        // c is held two ways: its own full stream is the shorter chain, and d builds on it.
        assert_eq!(ids(chain(&ms, "c")), [stream_key(&name(3), "c", None)]);
        assert_eq!(ids(chain(&ms, "d")), [stream_key(&name(3), "c", None), stream_key(&name(4), "d", Some("c"))]);
        assert!(chain(&ms, "x").is_none());
        let names: Vec<String> = held(&ms).iter().map(|s| s.identity.clone()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_missing_link_makes_a_snapshot_not_held() {
        // b's stream was deleted (or never finished): c cannot be restored.
        let ms = vec![m(1, "a", None, 100), m(3, "c", Some("b"), 10)];
        assert!(chain(&ms, "c").is_none());
        assert_eq!(held(&ms).len(), 1);
        // And a cycle of incrementals without a full one is not a chain.
        let cycle = vec![m(1, "a", Some("b"), 1), m(2, "b", Some("a"), 1)];
        assert!(chain(&cycle, "a").is_none() && held(&cycle).is_empty());
    }

    #[test]
    fn a_new_full_is_due_by_age_or_by_the_size_of_the_incrementals() {
        let day = Duration::from_secs(86400);
        assert!(full_due(&[], at(1), day, 0.5), "nothing held yet");
        let mut ms = vec![m(1, "a", None, 100), m(2, "b", Some("a"), 30)];
        assert!(!full_due(&ms, at(3), day, 0.5));
        assert!(full_due(&ms, at(1) + chrono::Duration::days(1), day, 0.5), "the full is a day old");
        ms.push(m(3, "c", Some("b"), 21));
        assert!(full_due(&ms, at(3), day, 0.5), "51 bytes of incrementals on a 100-byte full");
        assert!(!full_due(&ms, at(3), day, 0.6));
        // Once the new full is there, the chain of the newest starts over.
        ms.push(m(3, "c", None, 100));
        assert!(!full_due(&ms, at(3), day, 0.5));
    }

    #[test]
    fn retention_deletes_only_streams_no_kept_snapshot_depends_on() {
        let ms = vec![m(1, "a", None, 100), m(2, "b", Some("a"), 10), m(3, "c", Some("b"), 10), m(3, "c", None, 100), m(4, "d", Some("c"), 5)];
        // Keeping b keeps a's full stream too; c's incremental is not needed (its full is).
        let gone: Vec<String> = ids(Some(unneeded(&ms, &["b".into(), "d".into()])));
        assert_eq!(gone, [stream_key(&name(3), "c", Some("b"))]);
        // Keeping only the newest: the old chain goes whole.
        let gone = ids(Some(unneeded(&ms, &["d".into()])));
        assert_eq!(gone, [stream_key(&name(1), "a", None), stream_key(&name(2), "b", Some("a")), stream_key(&name(3), "c", Some("b"))]);
        // Every snapshot still held after deleting those is restorable.
        let left: Vec<Manifest> = ms.iter().filter(|x| !gone.iter().any(|g| x.object.ends_with(g.as_str()))).cloned().collect();
        assert!(chain(&left, "d").is_some());
    }

    #[test]
    fn only_plain_names_go_into_keys() {
        assert!(key_safe("1b4e28ba-2fa1-11d2-883f-0016d3cca427") && key_safe("1234567890") && key_safe(&name(1)));
        for bad in ["", "..", "a/b", "a b", "ä"] {
            assert!(!key_safe(bad), "{bad:?}");
        }
    }
}
