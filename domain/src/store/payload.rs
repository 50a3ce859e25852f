//! A stored event's payload.

use std::fmt;

use serde_json::Value;

/// A stored event's payload: the JSON text the log holds, checked to be JSON when read and parsed
/// once, straight into the event type that reads it (no `Value` tree in between).
#[derive(Clone)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// The payload `text`, if it is JSON.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(Self)
    }

    pub fn from_value(value: &Value) -> Self {
        match serde_json::value::to_raw_value(value) {
            Ok(raw) => Self(raw),
            // A `Value`'s keys are strings, and nothing else can fail.
            Err(error) => panic!("a JSON value always serializes: {error}"),
        }
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The payload as a JSON tree.
    pub fn to_value(&self) -> Value {
        // The text parsed as JSON when the payload was made, so it parses again.
        serde_json::from_str(self.as_str()).unwrap_or(Value::Null)
    }
}

/// Equal payloads hold the same JSON, however it is spaced or its keys ordered.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.to_value() == other.to_value()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON text.
impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
