//! Cron expressions as admins write them.
//!
//! The `cron` crate wants a seconds field; admins write the classic five fields. We accept
//! five fields (second 0 is implied), six fields with seconds first, and the `@hourly`-style
//! shorthands. Schedules fire in UTC, so they never skip or repeat an hour when the clocks
//! change; write the hours in UTC. Weekday numbers are crontab(5)'s: 0 or 7 Sunday, 1 Monday.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::units::deserialize_from_str;

#[derive(Clone)]
pub struct CronSchedule {
    text: String,
    schedule: ::cron::Schedule,
}

impl CronSchedule {
    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

const SHORTHANDS: &[&str] = &["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"];

impl FromStr for CronSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let valid = "valid: 5 fields \"MIN HOUR DAY MONTH WEEKDAY\" (like \"*/15 * * * *\"), \
                     6 fields with seconds first (like \"*/2 * * * * *\"), or one of @hourly, @daily, \
                     @weekly, @monthly, @yearly";
        let expanded = if text.starts_with('@') {
            if !SHORTHANDS.contains(&text) {
                return Err(format!("unknown cron shorthand {text:?}; {valid}"));
            }
            text.to_string()
        } else {
            let mut fields: Vec<&str> = text.split_whitespace().collect();
            match fields.len() {
                5 => fields.insert(0, "0"),
                6 => {}
                n => return Err(format!("cron expression {text:?} has {n} fields; {valid}")),
            }
            let weekday = crontab_weekdays(fields[5]).map_err(|e| format!("cron expression {text:?}: {e}; {valid}"))?;
            fields[5] = &weekday;
            fields.join(" ")
        };
        let schedule = ::cron::Schedule::from_str(&expanded).map_err(|e| format!("invalid cron expression {text:?}: {e}; {valid}"))?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err(format!("cron expression {text:?} never fires"));
        }
        Ok(CronSchedule { text: text.to_string(), schedule })
    }
}
deserialize_from_str!(CronSchedule);

const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// The weekday field with its numbers read as crontab(5) reads them (0 or 7 Sunday, 1
/// Monday, ... 6 Saturday; ranges and steps over them) and written as names, which the `cron`
/// crate reads the same way: it numbers weekdays from 1 = Sunday, so `1-5` would otherwise
/// mean Sunday to Thursday. Names, `*` and `?` pass as they are.
fn crontab_weekdays(field: &str) -> Result<String, String> {
    if !field.bytes().any(|b| b.is_ascii_digit()) {
        return Ok(field.to_string());
    }
    let number = |t: &str| -> Result<usize, String> {
        match t.parse::<usize>() {
            Ok(n) if n <= 7 => Ok(n),
            _ => Err(format!("weekday {t:?} is not a number from 0 to 7 (0 and 7 are Sunday) or a name like MON")),
        }
    };
    let mut days = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, s.parse::<usize>().ok().filter(|s| *s > 0).ok_or_else(|| format!("weekday step {s:?} is not a positive number"))?),
            None => (item, 1),
        };
        let (first, last) = match range.split_once('-') {
            _ if range == "*" => (0, 6),
            Some((a, b)) => (number(a)?, number(b)?),
            None if step > 1 => (number(range)?, 6),
            None => (number(range)?, number(range)?),
        };
        if first > last {
            return Err(format!("weekday range {range:?} runs backwards"));
        }
        days.extend((first..=last).step_by(step).map(|d| d % 7));
    }
    days.sort_unstable();
    days.dedup();
    Ok(days.iter().map(|d| WEEKDAYS[*d]).collect::<Vec<_>>().join(","))
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronSchedule({:?})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn five_fields_mean_second_zero() {
        let c: CronSchedule = "*/15 * * * *".parse().unwrap();
        assert_eq!(c.next_after(at(2026, 1, 1, 10, 7, 30)), Some(at(2026, 1, 1, 10, 15, 0)));
        assert_eq!(c.next_after(at(2026, 1, 1, 23, 50, 0)), Some(at(2026, 1, 2, 0, 0, 0)));
    }

    #[test]
    fn six_fields_have_seconds() {
        let c: CronSchedule = "*/2 * * * * *".parse().unwrap();
        assert_eq!(c.next_after(at(2026, 1, 1, 0, 0, 1)), Some(at(2026, 1, 1, 0, 0, 2)));
    }

    #[test]
    fn shorthands() {
        let c: CronSchedule = "@hourly".parse().unwrap();
        assert_eq!(c.next_after(at(2026, 1, 1, 10, 0, 0)), Some(at(2026, 1, 1, 11, 0, 0)));
        assert!("@sometimes".parse::<CronSchedule>().unwrap_err().contains("@hourly"));
    }

    #[test]
    fn rejects_garbage_with_help() {
        for bad in ["* * *", "61 * * * *", "every minute", "* * * * * * * *"] {
            let err = bad.parse::<CronSchedule>().unwrap_err();
            assert!(err.contains("valid: 5 fields"), "{bad}: {err}");
        }
    }

    #[test]
    fn weekday_numbers_are_crontabs() {
        use chrono::Datelike;
        // 2026-12-01 is a Tuesday.
        let from = at(2026, 12, 1, 4, 0, 0);
        let next = |w: &str| w.parse::<CronSchedule>().unwrap().next_after(from).unwrap();
        assert_eq!(next("0 3 * * 1").weekday(), chrono::Weekday::Mon);
        assert_eq!(next("0 3 * * 0").weekday(), chrono::Weekday::Sun);
        assert_eq!(next("0 3 * * 7").weekday(), chrono::Weekday::Sun);
        assert_eq!(next("0 3 * * 1-5"), at(2026, 12, 2, 3, 0, 0));
        assert_eq!(next("0 3 * * 6,0").weekday(), chrono::Weekday::Sat);
        assert_eq!(next("0 3 * * */2"), at(2026, 12, 3, 3, 0, 0), "0,2,4,6: Thursday next");
        assert_eq!(next("0 3 * * MON-FRI"), at(2026, 12, 2, 3, 0, 0));
        assert_eq!(next("0 0 3 * * 1").weekday(), chrono::Weekday::Mon, "six fields read weekdays alike");
        for bad in ["0 3 * * 8", "0 3 * * 5-1", "0 3 * * 1/0"] {
            let e = bad.parse::<CronSchedule>().unwrap_err();
            assert!(e.contains("weekday"), "{bad}: {e}");
        }
    }
}
