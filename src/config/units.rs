//! Value types of the config files that check themselves while being read.
//!
//! Each type parses from a YAML string and, when the string is wrong, fails with a message
//! that says what would be valid. serde then attaches the key and position.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Implements `Deserialize` through `FromStr` for a type whose error is a `String`.
macro_rules! deserialize_from_str {
    ($ty:ty) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(<D::Error as serde::de::Error>::custom)
            }
        }
    };
}
pub(crate) use deserialize_from_str;

/// A duration written the human way: `1s`, `500ms`, `15m`, `1h 30m`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write a number and a unit, like 500ms, 1s, 15m, 2h or 7d"))
    }
}
deserialize_from_str!(HumanDuration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A transfer rate in bytes per second: `100MiB/s`, `10 MB/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u64);

impl FromStr for ByteRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}; write a size per second, like 100MiB/s, 10MB/s or 512KiB/s");
        let size = s.trim().strip_suffix("/s").ok_or_else(bad)?;
        let bytes = size.trim().parse::<bytesize::ByteSize>().map_err(|_| bad())?.as_u64();
        if bytes == 0 {
            return Err(format!("rate {s:?} is zero; leave bandwidth_limit out for no limit"));
        }
        Ok(ByteRate(bytes))
    }
}
deserialize_from_str!(ByteRate);

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", bytesize::ByteSize(self.0).display().iec())
    }
}

/// A size in bytes: `64MiB`, `4 GiB`, `500MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|_| format!("invalid size {s:?}; write a number and a unit, like 64MiB, 4GiB or 500MB"))
    }
}
deserialize_from_str!(ByteSize);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

/// How send streams are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd at the given level (1..=19); `zstd` alone means level 3, zstd's own default.
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(3)
    }
}

impl Compression {
    /// The zstd level, or `None` for no compression.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Zstd(level) => Some(level),
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = "valid: none, zstd, or zstd:LEVEL with LEVEL from 1 to 19";
        match s.trim() {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::default()),
            other => {
                let level = other.strip_prefix("zstd:").ok_or_else(|| format!("unknown compression {s:?}; {valid}"))?;
                match level.parse::<i32>() {
                    Ok(n) if (1..=19).contains(&n) => Ok(Compression::Zstd(n)),
                    _ => Err(format!("invalid zstd level {level:?}; {valid}")),
                }
            }
        }
    }
}
deserialize_from_str!(Compression);

/// A node or file set name: what certificates, snapshot names and paths are built from, so
/// it is kept to letters, digits, `.`, `_` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(pub String);

impl FromStr for Name {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if s.is_empty() || s.len() > 64 || !s.chars().all(ok_char) || s.starts_with(['.', '-']) {
            return Err(format!("invalid name {s:?}; use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"));
        }
        Ok(Name(s.to_string()))
    }
}
deserialize_from_str!(Name);

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("1s".parse::<HumanDuration>().unwrap().0, Duration::from_secs(1));
        assert_eq!("15m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(900));
        assert_eq!("1h 30m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(5400));
        let err = "10 parsecs".parse::<HumanDuration>().unwrap_err();
        assert!(err.contains("15m"), "{err}");
        assert!("".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn rates() {
        assert_eq!("100MiB/s".parse::<ByteRate>().unwrap().0, 100 * 1024 * 1024);
        assert_eq!("10 MB/s".parse::<ByteRate>().unwrap().0, 10_000_000);
        assert!("100MiB".parse::<ByteRate>().unwrap_err().contains("per second"));
        assert!("fast/s".parse::<ByteRate>().is_err());
        assert!("0B/s".parse::<ByteRate>().unwrap_err().contains("zero"));
        assert_eq!("64MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert!("lots".parse::<ByteSize>().unwrap_err().contains("like 64MiB"));
    }

    #[test]
    fn compression() {
        assert_eq!("none".parse::<Compression>().unwrap().zstd_level(), None);
        assert_eq!("zstd".parse::<Compression>().unwrap().zstd_level(), Some(3));
        assert_eq!("zstd:7".parse::<Compression>().unwrap(), Compression::Zstd(7));
        assert!("zstd:0".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().unwrap_err().contains("valid: none, zstd"));
    }

    #[test]
    fn names() {
        assert!("alpha".parse::<Name>().is_ok());
        assert!("web-01.lan".parse::<Name>().is_ok());
        assert!("a b".parse::<Name>().is_err());
        assert!("../x".parse::<Name>().is_err());
        assert!("-x".parse::<Name>().is_err());
        assert!("".parse::<Name>().is_err());
    }
}
