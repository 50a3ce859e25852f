//! How domain events become log entries and back: a stable type name, a version, a JSON payload.
//!
//! Every event type's JSON is pinned by a test. Added fields carry `#[serde(default)]`; a breaking
//! change gets a new `event_version` and an upcaster in `decode`, so old events still read.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{NewEvent, RecordedEvent};

/// A type whose values are stored as events.
pub trait DomainEvent: Sized {
    /// The stable name stored in `event_type`.
    fn event_type(&self) -> &'static str;
    /// The payload schema version stored in `event_version`.
    fn event_version(&self) -> i16;
    /// The payload as JSON.
    fn to_payload(&self) -> Value;
    /// Reads a stored event from its payload's JSON text, upcasting older versions.
    fn decode(event_type: &str, event_version: i16, payload: &str) -> Result<Self, DecodeError>;

    /// The event ready for appending, with a fresh id.
    fn to_new_event(&self) -> NewEvent {
        NewEvent::new(self.event_type(), self.event_version(), self.to_payload())
    }

    /// Decodes a recorded event, naming its position when it cannot be read.
    fn from_recorded(event: &RecordedEvent) -> Result<Self, UnreadableEvent> {
        Self::decode(
            &event.event_type,
            event.event_version,
            event.payload.as_str(),
        )
        .map_err(|error| UnreadableEvent {
            global_position: event.position.global,
            stream_id: event.stream_id.to_string(),
            stream_version: event.stream_version,
            error,
        })
    }
}

/// A payload as JSON, for [`DomainEvent::to_payload`].
pub(crate) fn payload_json<T: Serialize>(payload: &T) -> Value {
    // Serializing into a `Value` fails only for a map with non-string keys or a `Serialize` impl
    // that reports an error. Event payloads hold strings, numbers, uuids, RFC 3339 timestamps,
    // base64 and JSON objects, none of which can fail; the pinning tests serialize every type.
    match serde_json::to_value(payload) {
        Ok(value) => value,
        Err(error) => panic!("event payloads always serialize: {error}"),
    }
}

/// Reads an `event_type` payload from its JSON text, for [`DomainEvent::decode`].
pub(crate) fn read_payload<'a, T: Deserialize<'a>>(
    event_type: &str,
    payload: &'a str,
) -> Result<T, DecodeError> {
    serde_json::from_str(payload).map_err(|error| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        reason: error.to_string(),
    })
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// This build does not know the type (or this version of it).
    #[error("unknown event type {event_type} version {event_version}")]
    Unknown {
        event_type: String,
        event_version: i16,
    },
    /// The type is known but the payload does not match it.
    #[error("malformed {event_type} payload: {reason}")]
    Malformed { event_type: String, reason: String },
}

/// An event in the log that cannot be read: a reader must stop here, never skip it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "event at global position {global_position} (stream {stream_id}, version {stream_version}) cannot be read: {error}"
)]
pub struct UnreadableEvent {
    pub global_position: i64,
    pub stream_id: String,
    pub stream_version: u32,
    pub error: DecodeError,
}
