//! Cron expressions as admins write them.
//!
//! The `cron` crate wants a seconds field; admins write the classic five fields. We accept
//! five fields (second 0 is implied), six fields with seconds first, and the `@hourly`-style
//! shorthands. Schedules fire in UTC, so they never skip or repeat an hour when the clocks
//! change; write the hours in UTC.

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
            match text.split_whitespace().count() {
                5 => format!("0 {text}"),
                6 => text.to_string(),
                n => return Err(format!("cron expression {text:?} has {n} fields; {valid}")),
            }
        };
        let schedule = ::cron::Schedule::from_str(&expanded).map_err(|e| format!("invalid cron expression {text:?}: {e}; {valid}"))?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err(format!("cron expression {text:?} never fires"));
        }
        Ok(CronSchedule { text: text.to_string(), schedule })
    }
}
deserialize_from_str!(CronSchedule);

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
}
