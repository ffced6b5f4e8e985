//! Snapshot names: `snapship-20261123T174005.123Z`, and `...Z-c` for continuous ones.
//!
//! A name carries its UTC creation time to the millisecond, so names sort by time, tell an
//! admin when they were taken, and mark the snapshots snapship made (the only ones it will
//! ever delete). Two snapshots never share a name: a new name is always later than the newest
//! existing one, even when several are taken within one millisecond or the clock stepped back.
//! The `-c` suffix marks a snapshot taken because data changed (continuous and hybrid mode):
//! in hybrid mode retention keeps only the scheduled ones as history.

use std::fmt;

use chrono::{DateTime, Duration, NaiveDateTime, SubsecRound, Utc};

pub const PREFIX: &str = "snapship-";
const FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";
const CONTINUOUS_SUFFIX: &str = "-c";

/// Why a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// On the cron schedule, or by `snapship sync`.
    Scheduled,
    /// Because the data changed.
    Continuous,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName {
    // Field order matters for Ord: time first.
    time: DateTime<Utc>,
    kind: Kind,
    text: String,
}

impl SnapshotName {
    /// Parses a name snapship made; anything else is `None`.
    pub fn parse(text: &str) -> Option<SnapshotName> {
        let stamp = text.strip_prefix(PREFIX)?;
        let (stamp, kind) = match stamp.strip_suffix(CONTINUOUS_SUFFIX) {
            Some(stamp) => (stamp, Kind::Continuous),
            None => (stamp, Kind::Scheduled),
        };
        let time = NaiveDateTime::parse_from_str(stamp, FORMAT).ok()?.and_utc();
        let name = SnapshotName::at(time, kind);
        (name.text == text).then_some(name)
    }

    /// The name for a snapshot taken at `now`, strictly after `newest` if given.
    pub fn next(now: DateTime<Utc>, newest: Option<&SnapshotName>, kind: Kind) -> SnapshotName {
        let mut time = now.trunc_subsecs(3);
        if let Some(newest) = newest {
            if time <= newest.time {
                time = newest.time + Duration::milliseconds(1);
            }
        }
        SnapshotName::at(time, kind)
    }

    /// The name just after this one, for when a name turned out to be taken.
    pub fn successor(&self) -> SnapshotName {
        SnapshotName::at(self.time + Duration::milliseconds(1), self.kind)
    }

    fn at(time: DateTime<Utc>, kind: Kind) -> SnapshotName {
        let time = time.trunc_subsecs(3);
        let suffix = if kind == Kind::Continuous { CONTINUOUS_SUFFIX } else { "" };
        SnapshotName { text: format!("{PREFIX}{}{suffix}", time.format(FORMAT)), time, kind }
    }

    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// In files (the state file) a name is its text; a text that is not a snapship name fails to
/// load, with the file named by the caller.
impl serde::Serialize for SnapshotName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for SnapshotName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SnapshotName::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a snapship snapshot name")))
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn round_trips_and_reads_as_utc() {
        let t = Utc.with_ymd_and_hms(2026, 11, 23, 17, 40, 5).unwrap() + Duration::milliseconds(123);
        let n = SnapshotName::next(t, None, Kind::Scheduled);
        assert_eq!(n.as_str(), "snapship-20261123T174005.123Z");
        assert_eq!(SnapshotName::parse(n.as_str()), Some(n.clone()));
        assert_eq!(n.time(), t);
        let c = SnapshotName::next(t, None, Kind::Continuous);
        assert_eq!(c.as_str(), "snapship-20261123T174005.123Z-c");
        assert_eq!(SnapshotName::parse(c.as_str()).map(|n| n.kind()), Some(Kind::Continuous));
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for other in [
            "latest",
            "snapship-",
            "snapship-2026",
            "manual-backup",
            "snapship-20261323T000000.000Z",
            "snapship-20261123T174005.123Zx",
            "snapship-20261123T174005.123Z-x",
        ] {
            assert_eq!(SnapshotName::parse(other), None, "{other}");
        }
    }

    #[test]
    fn never_collides_and_sorts_by_time() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let a = SnapshotName::next(t, None, Kind::Scheduled);
        let b = SnapshotName::next(t, Some(&a), Kind::Continuous); // same millisecond
        let c = SnapshotName::next(t - Duration::seconds(5), Some(&b), Kind::Scheduled); // clock stepped back
        assert!(a < b && b < c);
        assert!(a.as_str() < b.as_str() && b.as_str() < c.as_str());
        assert_eq!(a.successor().time(), b.time());
    }
}
