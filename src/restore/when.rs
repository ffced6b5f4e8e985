//! `--at TIME`: the forms of a point in time that admins write, read into a UTC instant.
//!
//! Pure (the current time is passed in), so every form is tested without a clock:
//! - RFC 3339, with its offset: `2026-11-30T14:00:00Z`, `2026-11-30T15:00:00+01:00`;
//! - a date and time without an offset, taken as UTC (like snapshot names and cron
//!   schedules): `2026-11-30 14:00`, `2026-11-30 14:00:05`, `2026-11-30T14:00`, or a date
//!   alone, `2026-11-30` (its midnight, UTC);
//! - a duration before now: `2h ago`, `1h 30m ago`, `3 days ago` (humantime's units);
//! - `now`.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// What a bad `--at` is answered with: the forms that are accepted.
pub const ACCEPTED: &str = "RFC 3339 (2026-11-30T14:00:00Z, 2026-11-30T15:00:00+01:00), a UTC date and time \
     (2026-11-30 14:00, 2026-11-30 14:00:05, 2026-11-30), a duration ago (2h ago, 1h 30m ago, 3 days ago), or now";

/// Reads `text` as a point in time; `now` is what `now` and `... ago` count from.
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = text.trim();
    let bad = |why: &str| Err(format!("cannot read the time {text:?}{why}; write it as {ACCEPTED}"));
    if t.is_empty() {
        return bad("");
    }
    if t.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(span) = t.strip_suffix("ago").filter(|s| s.ends_with(char::is_whitespace)) {
        return match humantime::parse_duration(span.trim()) {
            Ok(d) => match chrono::Duration::from_std(d).ok().and_then(|d| now.checked_sub_signed(d)) {
                Some(at) => Ok(at),
                None => bad(" (too long ago)"),
            },
            Err(e) => bad(&format!(" ({e})")),
        };
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(t, format) {
            return Ok(at.and_utc());
        }
    }
    if let Ok(day) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    bad("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_time(text, now()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn rfc3339_keeps_its_offset() {
        let t = Utc.with_ymd_and_hms(2026, 11, 30, 14, 0, 0).unwrap();
        assert_eq!(at("2026-11-30T14:00:00Z"), t);
        assert_eq!(at("2026-11-30T15:00:00+01:00"), t);
        assert_eq!(at("2026-11-30T14:00:00.250Z"), t + chrono::Duration::milliseconds(250));
    }

    #[test]
    fn a_time_without_offset_is_utc() {
        let t = Utc.with_ymd_and_hms(2026, 11, 30, 14, 0, 0).unwrap();
        assert_eq!(at("2026-11-30 14:00"), t);
        assert_eq!(at(" 2026-11-30 14:00 "), t);
        assert_eq!(at("2026-11-30T14:00"), t);
        assert_eq!(at("2026-11-30 14:00:05"), t + chrono::Duration::seconds(5));
        assert_eq!(at("2026-11-30 14:00:05.123"), t + chrono::Duration::milliseconds(5123));
        assert_eq!(at("2026-11-30"), Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap());
    }

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(at("now"), now());
        assert_eq!(at("NOW"), now());
        assert_eq!(at("2h ago"), now() - chrono::Duration::hours(2));
        assert_eq!(at("1h 30m ago"), now() - chrono::Duration::minutes(90));
        assert_eq!(at("90min ago"), now() - chrono::Duration::minutes(90));
        assert_eq!(at("3 days ago"), now() - chrono::Duration::days(3));
        assert_eq!(at("10s ago"), now() - chrono::Duration::seconds(10));
    }

    #[test]
    fn bad_input_is_answered_with_the_accepted_forms() {
        for bad in ["", "yesterday", "2h", "ago", "2 parsecs ago", "2026-13-01 00:00", "30/11/2026 14:00", "14:00", "2026-11-30 25:00"] {
            let e = parse_time(bad, now()).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("RFC 3339") && e.contains("2h ago") && e.contains("now"), "{bad}: {e}");
        }
        assert!(parse_time("2 parsecs ago", now()).unwrap_err().contains("unknown time unit"), "humantime's reason is kept");
    }
}
