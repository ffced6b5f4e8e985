//! Retention plans: which snapshots to keep on one side, and why.
//!
//! Rules (per side, from the policy): keep every snapshot younger than `within`, the `last`
//! newest, and the newest snapshot in each of the `hourly`/`daily`/`weekly`/`monthly` most
//! recent hours/days/ISO weeks/months that hold one (UTC; buckets without snapshots do not
//! count, so an outage never makes history expire faster). In hybrid mode only scheduled
//! snapshots fill those buckets: continuous ones live by `within` and `last` alone.
//!
//! Whatever the rules say, the plan keeps the newest snapshot, the common base of every
//! replica and snapshots in flight; the caller passes the latter two as protections. A side
//! with no rules at all is not pruned. Planning is pure, so it is tested with built histories
//! and a fixed `now`.

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::{Mode, Policy, Retention};
use crate::snapshot::{Kind, Snapshot, SnapshotName};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Newest,
    /// The common base of this replica: the next incremental send starts from it.
    CommonBase(String),
    /// Being sent or received right now.
    InFlight,
    Within,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    /// The side has no retention rules: nothing is pruned.
    NoRules,
    /// Changed after it was received (`snapshot::is_tampered`): kept for the admin to look at.
    Tampered,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Newest => f.write_str("newest"),
            Reason::Tampered => f.write_str("changed after it was received: kept for you to look at"),
            Reason::CommonBase(replica) => write!(f, "common base of {replica}"),
            Reason::InFlight => f.write_str("in flight"),
            Reason::Within => f.write_str("within"),
            Reason::Last => f.write_str("last"),
            Reason::Hourly => f.write_str("hourly"),
            Reason::Daily => f.write_str("daily"),
            Reason::Weekly => f.write_str("weekly"),
            Reason::Monthly => f.write_str("monthly"),
            Reason::NoRules => f.write_str("no retention rules"),
        }
    }
}

/// One snapshot's fate: kept for these reasons, or deleted when there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: SnapshotName,
    pub keep: BTreeSet<Reason>,
}

impl Entry {
    pub fn delete(&self) -> bool {
        self.keep.is_empty()
    }
}

/// Plans retention for `names` (any order); returns entries oldest first.
/// `hybrid`: only scheduled snapshots fill the hourly/daily/weekly/monthly buckets.
pub fn plan(names: &[SnapshotName], rules: &Retention, hybrid: bool, now: DateTime<Utc>, protect: &[(SnapshotName, Reason)]) -> Vec<Entry> {
    let mut entries: Vec<Entry> = names.iter().cloned().collect::<BTreeSet<_>>().into_iter().map(|name| Entry { name, keep: BTreeSet::new() }).collect();
    let no_rules = [rules.last, rules.hourly, rules.daily, rules.weekly, rules.monthly].iter().all(Option::is_none) && rules.within.is_none();
    for e in entries.iter_mut() {
        if no_rules {
            e.keep.insert(Reason::NoRules);
        }
        for (name, reason) in protect {
            if *name == e.name {
                e.keep.insert(reason.clone());
            }
        }
        if let Some(within) = rules.within {
            let age = now.signed_duration_since(e.name.time());
            if age.to_std().map_or(true, |age| age < within.0) {
                e.keep.insert(Reason::Within);
            }
        }
    }
    if let Some(newest) = entries.last_mut() {
        newest.keep.insert(Reason::Newest);
    }
    if let Some(n) = rules.last {
        for e in entries.iter_mut().rev().take(n as usize) {
            e.keep.insert(Reason::Last);
        }
    }
    /// The bucket a time falls in: (year, day or week or month, hour, 0).
    type Bucket = fn(DateTime<Utc>) -> (i32, u32, u32, u32);
    let grid: [(Option<u32>, Reason, Bucket); 4] = [
        (rules.hourly, Reason::Hourly, |t| (t.year(), t.ordinal(), t.hour(), 0)),
        (rules.daily, Reason::Daily, |t| (t.year(), t.ordinal(), 0, 0)),
        (rules.weekly, Reason::Weekly, |t| (t.iso_week().year(), t.iso_week().week(), 0, 0)),
        (rules.monthly, Reason::Monthly, |t| (t.year(), t.month(), 0, 0)),
    ];
    for (count, reason, bucket) in grid {
        let Some(count) = count else { continue };
        let mut seen = Vec::new();
        for e in entries.iter_mut().rev() {
            if hybrid && e.name.kind() == Kind::Continuous {
                continue;
            }
            let b = bucket(e.name.time());
            if seen.contains(&b) {
                continue;
            }
            if seen.len() == count as usize {
                break;
            }
            seen.push(b);
            e.keep.insert(reason.clone());
        }
    }
    entries
}

/// One side's snapshots and the plan for them.
pub struct SidePlan {
    pub snapshots: Vec<Snapshot>,
    pub entries: Vec<Entry>,
}

impl SidePlan {
    /// Plans `snapshots` (one side of `policy`'s file set) by `rules`, keeping `protect`.
    pub fn new(snapshots: Vec<Snapshot>, policy: &Policy, rules: &Retention, protect: &[(SnapshotName, Reason)], now: DateTime<Utc>) -> SidePlan {
        let names: Vec<SnapshotName> = snapshots.iter().map(|s| s.name.clone()).collect();
        let entries = plan(&names, rules, policy.mode == Mode::Hybrid, now, protect);
        SidePlan { snapshots, entries }
    }

    /// The snapshots the plan deletes.
    pub fn doomed(&self) -> impl Iterator<Item = &Snapshot> {
        self.entries.iter().filter(|e| e.delete()).filter_map(|e| self.snapshots.iter().find(|s| s.name == e.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::HumanDuration;
    use chrono::{Duration, TimeZone};

    fn t(s: &str) -> DateTime<Utc> {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap().and_utc()
    }

    fn name(s: &str) -> SnapshotName {
        SnapshotName::next(t(s), None, Kind::Scheduled)
    }

    fn cname(s: &str) -> SnapshotName {
        SnapshotName::next(t(s), None, Kind::Continuous)
    }

    fn rules(within: Option<&str>, last: Option<u32>, hourly: Option<u32>, daily: Option<u32>, weekly: Option<u32>, monthly: Option<u32>) -> Retention {
        Retention { within: within.map(|w| w.parse::<HumanDuration>().unwrap()), last, hourly, daily, weekly, monthly }
    }

    /// (time, kept?) pairs of a plan, oldest first, for compact expectations.
    fn kept(plan: &[Entry]) -> Vec<(String, bool)> {
        plan.iter().map(|e| (e.name.time().format("%m-%d %H:%M").to_string(), !e.delete())).collect()
    }

    struct Case {
        what: &'static str,
        history: Vec<SnapshotName>,
        rules: Retention,
        hybrid: bool,
        now: &'static str,
        protect: Vec<(SnapshotName, Reason)>,
        keep: Vec<&'static str>,
    }

    #[test]
    fn table() {
        let every_15m_for_3h: Vec<SnapshotName> =
            (0..12).map(|i| SnapshotName::next(t("2026-03-01 09:00") + Duration::minutes(15 * i), None, Kind::Scheduled)).collect();
        let daily_for_40d: Vec<SnapshotName> = (0..40).map(|i| SnapshotName::next(t("2026-01-01 03:00") + Duration::days(i), None, Kind::Scheduled)).collect();
        let cases = vec![
            Case {
                what: "last 2 keeps the two newest",
                history: every_15m_for_3h.clone(),
                rules: rules(None, Some(2), None, None, None, None),
                hybrid: false,
                now: "2026-03-01 12:00",
                protect: vec![],
                keep: vec!["03-01 11:30", "03-01 11:45"],
            },
            Case {
                what: "within 40m keeps what is younger than 40 minutes",
                history: every_15m_for_3h.clone(),
                rules: rules(Some("40m"), None, None, None, None, None),
                hybrid: false,
                now: "2026-03-01 12:00",
                protect: vec![],
                keep: vec!["03-01 11:30", "03-01 11:45"],
            },
            Case {
                what: "hourly 2 keeps the newest of each of the two newest hours",
                history: every_15m_for_3h.clone(),
                rules: rules(None, None, Some(2), None, None, None),
                hybrid: false,
                now: "2026-03-01 12:00",
                protect: vec![],
                keep: vec!["03-01 10:45", "03-01 11:45"],
            },
            Case {
                what: "the common base and a snapshot in flight survive any rule",
                history: every_15m_for_3h.clone(),
                rules: rules(None, Some(1), None, None, None, None),
                hybrid: false,
                now: "2026-03-01 12:00",
                protect: vec![(every_15m_for_3h[1].clone(), Reason::CommonBase("beta".into())), (every_15m_for_3h[5].clone(), Reason::InFlight)],
                keep: vec!["03-01 09:15", "03-01 10:15", "03-01 11:45"],
            },
            Case {
                what: "weekly 2 and monthly 2 over 40 daily snapshots",
                history: daily_for_40d.clone(),
                rules: rules(None, None, None, None, Some(2), Some(2)),
                hybrid: false,
                now: "2026-02-10 00:00",
                protect: vec![],
                // Newest (Feb 9, Monday of ISO week 7: also weekly and monthly), Feb 8 (Sunday,
                // end of week 6), Jan 31 (newest of January).
                keep: vec!["01-31 03:00", "02-08 03:00", "02-09 03:00"],
            },
            Case {
                what: "daily 3 counts days that hold snapshots, not calendar days",
                history: vec![name("2026-01-01 10:00"), name("2026-01-05 10:00"), name("2026-01-05 11:00"), name("2026-01-20 10:00"), name("2026-01-21 10:00")],
                rules: rules(None, None, None, Some(3), None, None),
                hybrid: false,
                now: "2026-06-01 00:00",
                protect: vec![],
                keep: vec!["01-05 11:00", "01-20 10:00", "01-21 10:00"],
            },
            Case {
                what: "no rules: nothing is deleted",
                history: every_15m_for_3h.clone(),
                rules: Retention::default(),
                hybrid: false,
                now: "2026-03-01 12:00",
                protect: vec![],
                keep: every_15m_for_3h.iter().map(|n| Box::leak(n.time().format("%m-%d %H:%M").to_string().into_boxed_str()) as &str).collect(),
            },
            Case {
                what: "hybrid: continuous snapshots do not fill the hourly grid",
                history: vec![
                    name("2026-03-01 09:00"),
                    cname("2026-03-01 09:30"),
                    cname("2026-03-01 10:10"),
                    name("2026-03-01 10:00"),
                    cname("2026-03-01 10:50"),
                    cname("2026-03-01 10:55"),
                ],
                rules: rules(Some("10m"), None, Some(5), None, None, None),
                hybrid: true,
                now: "2026-03-01 11:00",
                protect: vec![],
                // Scheduled 09:00 and 10:00 are the hourly history; 10:55 is within 10 minutes (and newest).
                keep: vec!["03-01 09:00", "03-01 10:00", "03-01 10:55"],
            },
            Case {
                what: "empty history plans nothing",
                history: vec![],
                rules: rules(None, Some(3), None, None, None, None),
                hybrid: false,
                now: "2026-03-01 11:00",
                protect: vec![],
                keep: vec![],
            },
        ];
        for c in cases {
            let p = plan(&c.history, &c.rules, c.hybrid, t(c.now), &c.protect);
            let got: Vec<String> = kept(&p).into_iter().filter(|(_, k)| *k).map(|(n, _)| n).collect();
            assert_eq!(got, c.keep, "{}", c.what);
            // The newest is always kept.
            if let Some(last) = p.last() {
                assert!(last.keep.contains(&Reason::Newest), "{}", c.what);
            }
        }
    }

    #[test]
    fn reasons_are_all_reported() {
        let h = [name("2026-03-01 09:00"), name("2026-03-01 10:00")];
        let p = plan(
            &h,
            &rules(Some("1d"), Some(1), Some(1), None, None, None),
            false,
            Utc.with_ymd_and_hms(2026, 3, 1, 11, 0, 0).unwrap(),
            &[(h[1].clone(), Reason::CommonBase("beta".into()))],
        );
        let reasons: Vec<String> = p[1].keep.iter().map(|r| r.to_string()).collect();
        assert_eq!(reasons, ["newest", "common base of beta", "within", "last", "hourly"]);
        assert_eq!(p[0].keep.iter().map(|r| r.to_string()).collect::<Vec<_>>(), ["within"]);
    }
}
