//! What the log accepts: every value a command records must be readable back by every reader
//! (the event decoders, the read models, both backends). JSON a client chooses (metadata,
//! connection config, a provider's raw token answer) is held to [`JsonBounds`], well inside
//! serde_json's recursion limit of 128 even after the event wraps it; times are held to
//! [`TimeRange`], inside what RFC 3339 and both databases can spell.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::{Map, Value};

/// Limits for one client-chosen JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonBounds {
    /// The deepest nesting of arrays and objects; the value itself is level 1.
    pub depth: usize,
    /// Members of one object or items of one array.
    pub members: usize,
    /// Bytes of one object key.
    pub key_bytes: usize,
    /// Bytes of the whole value as compact JSON.
    pub total_bytes: usize,
}

impl JsonBounds {
    /// Metadata, connection config and a provider's raw token answer.
    pub const CLIENT: Self = Self {
        depth: 32,
        members: 1_000,
        key_bytes: 256,
        total_bytes: 64 * 1024,
    };

    /// Checks `value`; the error says which limit it passes.
    pub fn check(&self, value: &Value) -> Result<(), OutOfBounds> {
        let mut total = 0;
        self.walk(value, 1, &mut total)?;
        self.fits(total)
    }

    /// [`JsonBounds::check`] for an object held as its members.
    pub fn check_object(&self, members: &Map<String, Value>) -> Result<(), OutOfBounds> {
        let mut total = 0;
        self.walk_object(members, 1, &mut total)?;
        self.fits(total)
    }

    fn fits(&self, total: usize) -> Result<(), OutOfBounds> {
        if total > self.total_bytes {
            return Err(OutOfBounds::TooLarge {
                limit: self.total_bytes,
            });
        }
        Ok(())
    }

    /// Walks `value` at `depth`, adding its compact size to `total` (stopping early once past).
    fn walk(&self, value: &Value, depth: usize, total: &mut usize) -> Result<(), OutOfBounds> {
        if *total > self.total_bytes {
            return Ok(());
        }
        match value {
            Value::Null | Value::Bool(true) => *total += 4,
            Value::Bool(false) => *total += 5,
            Value::Number(n) => *total += n.to_string().len(),
            Value::String(s) => *total += json_string_len(s)?,
            Value::Array(items) => {
                self.nest(depth, items.len())?;
                *total += 2 + items.len().saturating_sub(1);
                for item in items {
                    self.walk(item, depth + 1, total)?;
                }
            }
            Value::Object(members) => self.walk_object(members, depth, total)?,
        }
        Ok(())
    }

    /// [`JsonBounds::walk`] for an object.
    fn walk_object(
        &self,
        members: &Map<String, Value>,
        depth: usize,
        total: &mut usize,
    ) -> Result<(), OutOfBounds> {
        self.nest(depth, members.len())?;
        *total += 2 + members.len().saturating_sub(1);
        for (key, member) in members {
            if key.len() > self.key_bytes {
                return Err(OutOfBounds::KeyTooLong {
                    limit: self.key_bytes,
                });
            }
            *total += json_string_len(key)? + 1;
            self.walk(member, depth + 1, total)?;
        }
        Ok(())
    }

    fn nest(&self, depth: usize, members: usize) -> Result<(), OutOfBounds> {
        if depth > self.depth {
            return Err(OutOfBounds::TooDeep { limit: self.depth });
        }
        if members > self.members {
            return Err(OutOfBounds::TooManyMembers {
                limit: self.members,
            });
        }
        Ok(())
    }
}

/// The length of `s` as a JSON string literal, quotes and escapes included; NUL is refused
/// (PostgreSQL's `jsonb` cannot hold it).
fn json_string_len(s: &str) -> Result<usize, OutOfBounds> {
    let mut len = 2;
    for c in s.chars() {
        len += match c {
            '\0' => return Err(OutOfBounds::Nul),
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if c < ' ' => 6,
            c => c.len_utf8(),
        };
    }
    Ok(len)
}

/// Which [`JsonBounds`] limit a value passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutOfBounds {
    /// Nested deeper than the limit.
    #[error("nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// An object or array with more members than the limit.
    #[error("an object or array has more than {limit} members")]
    TooManyMembers { limit: usize },
    /// An object key longer than the limit.
    #[error("an object key is longer than {limit} bytes")]
    KeyTooLong { limit: usize },
    /// A string or key holds U+0000.
    #[error("a string or key holds a NUL (\\u0000) character")]
    Nul,
    /// Larger than the limit as compact JSON.
    #[error("larger than {limit} bytes as JSON")]
    TooLarge { limit: usize },
}

/// The times a connection may carry (expiries, provider answers): from the UNIX epoch to the
/// end of year 9999, so that every time has a four-digit RFC 3339 year and fits both databases.
#[derive(Clone, Copy, Debug)]
pub struct TimeRange;

impl TimeRange {
    /// The earliest time accepted.
    pub fn earliest() -> DateTime<Utc> {
        DateTime::UNIX_EPOCH
    }

    /// The latest time accepted.
    pub fn latest() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Whether `t` is in range.
    pub fn contains(t: DateTime<Utc>) -> bool {
        (Self::earliest()..=Self::latest()).contains(&t)
    }

    /// `seconds` after `now`, when that is in range (`seconds` may be any integer).
    pub fn after(now: DateTime<Utc>, seconds: i64) -> Option<DateTime<Utc>> {
        TimeDelta::try_seconds(seconds)
            .and_then(|delta| now.checked_add_signed(delta))
            .filter(|t| Self::contains(*t))
    }
}

/// A time outside [`TimeRange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("times must lie between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")]
pub struct TimeOutOfRange;

/// Checks an optional time against [`TimeRange`].
pub fn in_range(t: Option<DateTime<Utc>>) -> Result<(), TimeOutOfRange> {
    match t {
        Some(t) if !TimeRange::contains(t) => Err(TimeOutOfRange),
        _ => Ok(()),
    }
}

/// Whether `text` can be shown to a person as it reads: no control characters, none of the
/// bidirectional controls (which can make a name display as another, the "Trojan Source"
/// trick), and none of the invisible characters that can hide inside a look-alike (zero-width
/// space, word joiner, invisible operators, zero-width no-break space). The zero-width joiner
/// and non-joiner stay allowed: emoji sequences and Persian and Indic spelling need them.
pub fn displayable(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() || BIDI_CONTROLS.contains(&c) || hides(c))
}

/// The Arabic letter mark, the left-to-right and right-to-left marks, the embeddings and
/// overrides with their end, and the isolates with theirs.
const BIDI_CONTROLS: &[char] = &[
    '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}',
    '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
];

/// Whether `c` takes no room and joins nothing a reader needs.
fn hides(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn displayable_text_refuses_controls_and_invisible_reordering() {
        for good in [
            "GitHub",
            "Zoë's CRM",
            "\u{05E9}\u{05DC}\u{05D5}\u{05DD}",
            "\u{1F468}\u{200D}\u{1F4BB} dev",
            "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}",
            "",
        ] {
            assert!(displayable(good), "{good:?}");
        }
        for bad in [
            "a\u{0007}b",
            "tab\there",
            "\u{202E}buHtiG",
            "Git\u{200B}Hub",
            "a\u{2066}b\u{2069}",
            "\u{FEFF}x",
            "\u{200F}x",
            "\u{061C}x",
            "\u{0085}x",
        ] {
            assert!(!displayable(bad), "{bad:?}");
        }
    }

    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn depth_counts_the_value_itself_as_level_one() {
        let bounds = JsonBounds::CLIENT;
        assert_eq!(bounds.check(&nested(32)), Ok(()));
        assert_eq!(
            bounds.check(&nested(33)),
            Err(OutOfBounds::TooDeep { limit: 32 })
        );
        assert_eq!(bounds.check(&json!(3)), Ok(()));
    }

    #[test]
    fn the_size_is_the_compact_json_length() {
        let bounds = JsonBounds {
            total_bytes: 1_000_000,
            ..JsonBounds::CLIENT
        };
        for value in [
            json!({"a": [1, -2.5, null, true, false, "x\"\\\n\u{1}é"], "b": {}, "c": []}),
            json!([u64::MAX, i64::MIN, 1e308, 5e-324]),
            json!("plain"),
        ] {
            let mut total = 0;
            bounds.walk(&value, 1, &mut total).unwrap();
            assert_eq!(
                total,
                serde_json::to_string(&value).unwrap().len(),
                "{value}"
            );
        }
    }

    #[test]
    fn members_keys_and_size_are_bounded() {
        let bounds = JsonBounds::CLIENT;
        let many: serde_json::Map<String, Value> =
            (0..1_001).map(|i| (i.to_string(), json!(1))).collect();
        assert_eq!(
            bounds.check(&Value::Object(many)),
            Err(OutOfBounds::TooManyMembers { limit: 1_000 })
        );
        assert_eq!(
            bounds.check(&json!({ "k".repeat(257): 1 })),
            Err(OutOfBounds::KeyTooLong { limit: 256 })
        );
        assert_eq!(
            bounds.check(&json!({ "k": "v".repeat(64 * 1024) })),
            Err(OutOfBounds::TooLarge { limit: 64 * 1024 })
        );
        assert_eq!(bounds.check(&json!(["a\u{0}"])), Err(OutOfBounds::Nul));
        assert_eq!(bounds.check(&json!({ "\u{0}": 1 })), Err(OutOfBounds::Nul));
    }

    #[test]
    fn times_lie_between_the_epoch_and_year_9999() {
        let now = Utc::now();
        assert!(TimeRange::after(now, 3600).is_some());
        assert_eq!(TimeRange::after(now, 8_200_000_000_000), None);
        assert_eq!(TimeRange::after(now, i64::MAX), None);
        assert_eq!(TimeRange::after(now, i64::MIN), None);
        assert_eq!(in_range(Some(TimeRange::latest())), Ok(()));
        assert_eq!(
            in_range(Some(TimeRange::latest() + TimeDelta::seconds(1))),
            Err(TimeOutOfRange)
        );
        assert_eq!(
            in_range(Some(TimeRange::earliest() - TimeDelta::seconds(1))),
            Err(TimeOutOfRange)
        );
        assert_eq!(in_range(None), Ok(()));
    }
}
