//! Go-style durations as written in a spec (`90s`, `15m`, `1h30m`).
//!
//! A namespace admin writes these, so they are foreign input: parsing uses
//! checked arithmetic and a ceiling, never panics, and a value that does not
//! parse still deserializes. One bad object must never stop a watch (a list
//! fails to decode as a whole) or the process; it is refused later, by
//! validation, on that object alone.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration any spec field may hold: one year. Longer values are
/// refused at admission and, for objects admitted before this bound, when
/// the operator reads them.
pub const MAX: Duration = Duration::from_secs(8760 * 3600);
/// The longest text accepted as a duration.
pub const MAX_TEXT: usize = 32;
/// What the CRD schema admits: at most four `<number><unit>` parts with at
/// most six integer and nine fraction digits each, so CEL's `duration()`
/// never overflows before the range rule runs.
pub const PATTERN: &str = r"^([0-9]{1,6}(\.[0-9]{1,9})?(ns|us|µs|ms|s|m|h)){1,4}$";

/// A duration from a spec: the text as written and what it parsed to.
#[derive(Clone, PartialEq, Eq)]
pub struct SpecDuration {
    raw: String,
    value: Result<Duration, DurationError>,
}

/// Why a spec duration is refused. Messages quote at most a short prefix of
/// the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("is not a string")]
    NotAString,
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_TEXT} characters")]
    TooLongText,
    #[error("is negative")]
    Negative,
    #[error("{0:?} is not a Go duration such as 90s, 15m or 1h30m")]
    Syntax(String),
    #[error("{0:?} is longer than the maximum of 8760h (one year)")]
    OverMax(String),
}

impl SpecDuration {
    /// Parses `text`; the result (good or bad) is kept with it.
    pub fn new(text: impl Into<String>) -> Self {
        let raw = text.into();
        let value = parse(&raw);
        SpecDuration { raw, value }
    }

    /// The parsed duration, or why it is refused.
    pub fn get(&self) -> Result<Duration, DurationError> {
        self.value.clone()
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl From<Duration> for SpecDuration {
    fn from(d: Duration) -> Self {
        SpecDuration::new(crate::rotation::format_duration(d))
    }
}

impl fmt::Debug for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpecDuration({:?})", short(&self.raw))
    }
}

impl fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&short(&self.raw))
    }
}

/// At most 40 characters of `s`, for messages.
fn short(s: &str) -> String {
    if s.chars().count() <= 40 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(40).collect::<String>())
    }
}

/// Parses a Go duration (without sign, as the CRD admits) into at most [`MAX`].
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    if s.len() > MAX_TEXT {
        return Err(DurationError::TooLongText);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(DurationError::Negative);
    }
    if rest.is_empty() {
        return Err(DurationError::Empty);
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let syntax = || DurationError::Syntax(short(s));
    let max_nanos = MAX.as_nanos();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(syntax());
        }
        let (unit, after) = split_unit(after).ok_or_else(syntax)?;
        rest = after;
        // Integer part: checked, and past the ceiling as soon as it is.
        let mut int: u128 = 0;
        for d in int_part.bytes() {
            int = int
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(d - b'0')))
                .filter(|v| v.saturating_mul(unit) <= max_nanos)
                .ok_or_else(|| DurationError::OverMax(short(s)))?;
        }
        // Fraction: the first 18 digits are plenty for nanoseconds of hours.
        let digits = &frac_part[..frac_part.len().min(18)];
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        for d in digits.bytes() {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        let part = int * unit + frac * unit / scale;
        total = total
            .checked_add(part)
            .filter(|t| *t <= max_nanos)
            .ok_or_else(|| DurationError::OverMax(short(s)))?;
    }
    // total <= MAX in nanoseconds, which fits in u64.
    Ok(Duration::from_nanos(
        u64::try_from(total).unwrap_or(u64::MAX),
    ))
}

/// The unit at the start of `s` in nanoseconds, and what follows it.
fn split_unit(s: &str) -> Option<(u128, &str)> {
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    // Longest first: `ms` before `m`.
    UNITS
        .iter()
        .filter(|(u, _)| s.starts_with(u))
        .max_by_key(|(u, _)| u.len())
        .map(|(u, n)| (*n, &s[u.len()..]))
}

impl Serialize for SpecDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for SpecDuration {
    /// Never fails on a well-formed document: a value of another type is
    /// kept as refused, so the object still decodes.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(s) => SpecDuration::new(s),
            other => SpecDuration {
                raw: short(&other.to_string()),
                value: Err(DurationError::NotAString),
            },
        })
    }
}

impl JsonSchema for SpecDuration {
    fn schema_name() -> Cow<'static, str> {
        "SpecDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schema(None, None)
    }
}

/// The schema of a duration field with an optional range, checked at
/// admission by CEL (`min`/`max` are Go durations such as `5m`).
pub fn schema(min: Option<&str>, max: Option<&str>) -> schemars::Schema {
    let max = max.unwrap_or("8760h");
    let (rule, message) = match min {
        Some(min) => (
            format!("duration(self) >= duration('{min}') && duration(self) <= duration('{max}')"),
            format!("must be a duration between {min} and {max}"),
        ),
        None => (
            format!("duration(self) <= duration('{max}')"),
            format!("must be a duration of at most {max}"),
        ),
    };
    schemars::json_schema!({
        "type": "string",
        "maxLength": MAX_TEXT,
        "pattern": PATTERN,
        "x-kubernetes-validations": [{"rule": rule, "message": message}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_what_go_parses_within_the_range() {
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("3us"), Duration::from_micros(3));
        assert_eq!(ok("3µs"), Duration::from_micros(3));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("+2m"), Duration::from_secs(120));
        assert_eq!(ok("8760h"), MAX);
        assert_eq!(
            ok("0.3333333333333333333h"),
            Duration::from_secs(1200) - Duration::from_nanos(1)
        );
    }

    #[test]
    fn hostile_values_are_refused_not_panicked_on() {
        for s in [
            "99999999999999999999h",
            "8761h",
            "8760h1ns",
            "525601m",
            "18446744073709551615s",
            "9223372036854775807ns9223372036854775807ns",
        ] {
            assert!(
                matches!(
                    parse(s),
                    Err(DurationError::OverMax(_) | DurationError::TooLongText)
                ),
                "{s}: {:?}",
                parse(s)
            );
        }
        for s in [
            "", "h", "1", "1d", "1.s.", "s1", "1h-1m", "..5s", "1hh", "½h",
        ] {
            assert!(parse(s).is_err(), "{s}");
        }
        assert_eq!(parse("-1s"), Err(DurationError::Negative));
        assert_eq!(parse(&"9".repeat(1000)), Err(DurationError::TooLongText));
    }

    #[test]
    fn a_bad_value_still_decodes_and_says_why_later() {
        #[derive(Deserialize)]
        struct Spec {
            lifetime: SpecDuration,
            other: SpecDuration,
        }
        let spec: Spec =
            serde_json::from_str(r#"{"lifetime": "99999999999999999999h", "other": 12}"#).unwrap();
        let e = spec.lifetime.get().unwrap_err().to_string();
        assert!(e.contains("maximum of 8760h"), "{e}");
        assert_eq!(spec.other.get(), Err(DurationError::NotAString));
        assert_eq!(
            serde_json::to_string(&SpecDuration::new("1h")).unwrap(),
            r#""1h""#
        );
    }
}
