//! Appends to several existing streams in one atomic write ([`super::EventStore::append_streams`]):
//! a change that must reach every one of a set of connections or none.

use super::{NewEvent, StoreError, StreamId};

/// Events for one existing stream, to be appended if it is at `expected`.
#[derive(Clone, Debug)]
pub struct StreamAppend {
    pub stream: StreamId,
    /// The version the stream must be at (≥ 1: the stream exists).
    pub expected: u32,
    pub events: Vec<NewEvent>,
}

/// Refuses what no backend may write: a stream twice, one without events, or at version 0.
pub(super) fn check_stream_appends(appends: &[StreamAppend]) -> Result<(), StoreError> {
    if appends.iter().any(|a| a.events.is_empty()) {
        return Err(StoreError::InvalidAppend("an append without events"));
    }
    if appends.iter().any(|a| a.expected == 0) {
        return Err(StoreError::InvalidAppend(
            "append_streams appends to existing streams only",
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(appends.len());
    if !appends.iter().all(|a| seen.insert(a.stream.as_str())) {
        return Err(StoreError::InvalidAppend("the same stream twice"));
    }
    Ok(())
}
