//! Snapshot names: `snapship-20261123T174005.123Z`.
//!
//! A name carries its UTC creation time to the millisecond, so names sort by time, tell an
//! admin when they were taken, and mark the snapshots snapship made (the only ones it will
//! ever delete). Two snapshots never share a name: a new name is always later than the newest
//! existing one, even when several are taken within one millisecond or the clock stepped back.

use std::fmt;

use chrono::{DateTime, Duration, NaiveDateTime, SubsecRound, Utc};

pub const PREFIX: &str = "snapship-";
const FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName {
    // Field order matters for Ord: time first.
    time: DateTime<Utc>,
    text: String,
}

impl SnapshotName {
    /// Parses a name snapship made; anything else is `None`.
    pub fn parse(text: &str) -> Option<SnapshotName> {
        let stamp = text.strip_prefix(PREFIX)?;
        let time = NaiveDateTime::parse_from_str(stamp, FORMAT).ok()?.and_utc();
        let name = SnapshotName::at(time);
        (name.text == text).then_some(name)
    }

    /// The name for a snapshot taken at `now`, strictly after `newest` if given.
    pub fn next(now: DateTime<Utc>, newest: Option<&SnapshotName>) -> SnapshotName {
        let mut time = now.trunc_subsecs(3);
        if let Some(newest) = newest {
            if time <= newest.time {
                time = newest.time + Duration::milliseconds(1);
            }
        }
        SnapshotName::at(time)
    }

    /// The name just after this one, for when a name turned out to be taken.
    pub fn successor(&self) -> SnapshotName {
        SnapshotName::at(self.time + Duration::milliseconds(1))
    }

    fn at(time: DateTime<Utc>) -> SnapshotName {
        let time = time.trunc_subsecs(3);
        SnapshotName { text: format!("{PREFIX}{}", time.format(FORMAT)), time }
    }

    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }

    pub fn as_str(&self) -> &str {
        &self.text
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
        let n = SnapshotName::next(t, None);
        assert_eq!(n.as_str(), "snapship-20261123T174005.123Z");
        assert_eq!(SnapshotName::parse(n.as_str()), Some(n.clone()));
        assert_eq!(n.time(), t);
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for other in ["latest", "snapship-", "snapship-2026", "manual-backup", "snapship-20261323T000000.000Z", "snapship-20261123T174005.123Zx"] {
            assert_eq!(SnapshotName::parse(other), None, "{other}");
        }
    }

    #[test]
    fn never_collides_and_sorts_by_time() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let a = SnapshotName::next(t, None);
        let b = SnapshotName::next(t, Some(&a)); // same millisecond
        let c = SnapshotName::next(t - Duration::seconds(5), Some(&b)); // clock stepped back
        assert!(a < b && b < c);
        assert!(a.as_str() < b.as_str() && b.as_str() < c.as_str());
        assert_eq!(a.successor(), b);
    }
}
