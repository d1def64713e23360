//! Value types of the config file that parse from strings: durations,
//! duration ranges, byte sizes, times of day and time zones. Each rejects a
//! bad value while parsing, so the error carries the file position.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A humantime duration such as `"45s"`, `"2h"` or `"1day"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Dur, String> {
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            format!("invalid duration \"{s}\" ({e}); write it like \"45s\", \"20m\" or \"2h\"")
        })
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A uniform range of durations, `"30s..20m"`; a single duration means a
/// range of one value.
///
/// ```
/// use colloquy::config::DurRange;
/// let r: DurRange = "30s..20m".parse().unwrap();
/// assert_eq!((r.lo.as_secs(), r.hi.as_secs()), (30, 1200));
/// assert!("20m..30s".parse::<DurRange>().unwrap_err().contains("reversed"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurRange {
    pub lo: Duration,
    pub hi: Duration,
}

impl DurRange {
    pub const fn fixed(secs: u64) -> DurRange {
        DurRange {
            lo: Duration::from_secs(secs),
            hi: Duration::from_secs(secs),
        }
    }

    pub const fn between(lo: u64, hi: u64) -> DurRange {
        DurRange {
            lo: Duration::from_secs(lo),
            hi: Duration::from_secs(hi),
        }
    }
}

impl FromStr for DurRange {
    type Err = String;

    fn from_str(s: &str) -> Result<DurRange, String> {
        let (lo, hi) = match s.split_once("..") {
            Some((lo, hi)) => (lo.parse::<Dur>()?, hi.parse::<Dur>()?),
            None => {
                let d = s.parse::<Dur>()?;
                (d, d)
            }
        };
        if lo > hi {
            return Err(format!(
                "range \"{s}\" is reversed: its start must not be after its end"
            ));
        }
        Ok(DurRange { lo: lo.0, hi: hi.0 })
    }
}

impl fmt::Display for DurRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", Dur(self.lo), Dur(self.hi))
    }
}

/// A number of bytes: an integer or a string like `"64MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .replace('_', "")
            .parse()
            .map_err(|_| format!("invalid size \"{s}\"; write it like \"64MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size \"{s}\": unknown unit \"{other}\" (use B, KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size \"{s}\" is too large"))
    }
}

/// A wall-clock time of day, `"09:00"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(pub chrono::NaiveTime);

impl FromStr for TimeOfDay {
    type Err = String;

    fn from_str(s: &str) -> Result<TimeOfDay, String> {
        chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map(TimeOfDay)
            .map_err(|_| format!("invalid time of day \"{s}\"; write it like \"09:00\""))
    }
}

/// An IANA time zone, `"Europe/Berlin"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(pub chrono_tz::Tz);

impl FromStr for Zone {
    type Err = String;

    fn from_str(s: &str) -> Result<Zone, String> {
        s.trim().parse::<chrono_tz::Tz>().map(Zone).map_err(|_| {
            format!("unknown time zone \"{s}\"; use an IANA name like \"Europe/Berlin\"")
        })
    }
}

/// A moment in UTC, written in RFC 3339: `"2026-03-07T00:00:00Z"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment(pub crate::clock::Timestamp);

impl FromStr for Moment {
    type Err = String;

    fn from_str(s: &str) -> Result<Moment, String> {
        chrono::DateTime::parse_from_rfc3339(s.trim())
            .map(|t| Moment(crate::clock::Timestamp(t.timestamp_millis())))
            .map_err(|_| format!("\"{s}\" is not a time like \"2026-03-07T00:00:00Z\""))
    }
}

/// Deserializes any `FromStr` value from a TOML string.
macro_rules! deserialize_from_str {
    ($($ty:ty => $what:literal),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(FromStrVisitor::<$ty>::new($what))
            }
        }
    )*};
}

deserialize_from_str! {
    Dur => "a duration string like \"45s\"",
    DurRange => "a duration range like \"30s..20m\"",
    TimeOfDay => "a time of day like \"09:00\"",
    Zone => "a time zone name like \"Europe/Berlin\"",
    Moment => "a time like \"2026-03-07T00:00:00Z\"",
    ByteSize => "a size like \"64MiB\" or a number of bytes",
}

struct FromStrVisitor<T> {
    what: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> FromStrVisitor<T> {
    fn new(what: &'static str) -> Self {
        FromStrVisitor {
            what,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = String>> Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        // Only sizes accept a bare number; the others reject it through their
        // own parser with a message that shows the expected form.
        v.to_string()
            .parse()
            .map_err(|_| E::custom(format!("expected {}, got the number {v}", self.what)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values() {
        assert_eq!("45s".parse::<Dur>().unwrap(), Dur::secs(45));
        assert_eq!("1day".parse::<Dur>().unwrap(), Dur::secs(86_400));
        assert_eq!(
            "30s..20m".parse::<DurRange>().unwrap(),
            DurRange::between(30, 1200)
        );
        assert_eq!("5m".parse::<DurRange>().unwrap(), DurRange::fixed(300));
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!("1_000".parse::<ByteSize>().unwrap(), ByteSize(1000));
        assert!("09:30".parse::<TimeOfDay>().is_ok());
        assert!("Europe/Berlin".parse::<Zone>().is_ok());
    }

    #[test]
    fn rejects_bad_values_with_a_sentence() {
        assert!("5 parsecs"
            .parse::<Dur>()
            .unwrap_err()
            .contains("invalid duration"));
        assert!("20m..30s"
            .parse::<DurRange>()
            .unwrap_err()
            .contains("reversed"));
        assert!("Mars/Base"
            .parse::<Zone>()
            .unwrap_err()
            .contains("unknown time zone"));
        assert!("25:00".parse::<TimeOfDay>().is_err());
        assert!("3 bananas"
            .parse::<ByteSize>()
            .unwrap_err()
            .contains("unknown unit"));
    }
}
