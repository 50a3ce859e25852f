//! A connection: one end user's grant at one integration, as a pure event-sourced aggregate.
//!
//! A connection's stream is [`stream_id`]`(provider_config_key, connection_id)`, derived
//! deterministically so that two concurrent authorizations of the same connection meet at the
//! store's expected-version check, not in memory (DESIGN.md §2).
//!
//! Invariants [`decide`] keeps:
//! - Generations count every authorization from 1, across deletions: a re-authorization, also one
//!   after a deletion, is the previous generation + 1.
//! - Secrets appear only [`Sealed`](crate::keys::Sealed); events name the data key of their
//!   generation and carry short keyed fingerprints computed outside, never a plaintext token.
//! - At most one refresh lease is open: a lease is refused while an unexpired one has no outcome.
//!   An expired lease without outcome is orphaned (its holder crashed or stalled) and the next
//!   lease supersedes it.
//! - An outcome ([`TokensRefreshed`], [`RefreshFailed`]) names the open lease; a later lease, a
//!   re-authorization or a deletion since the lease means it is no longer held. An expired lease
//!   that nobody superseded is still held: the caller's append with the expected version is the
//!   real fence (DESIGN.md §3), `decide` only refuses what is visibly stale.
//! - A permanent failure blocks non-forced leases until a successful refresh or a
//!   re-authorization; transient failures are counted and never block. A failure never changes the
//!   stored credentials.
//! - The refresh-token generation is 1 after each authorization and grows by one each time the
//!   provider returned a new refresh token.
//! - Metadata is always a JSON object.
//!
//! [`apply`] is total and trusts the log: it folds any recorded event, and ignores the few that
//! cannot concern the state they meet (a refresh of a connection that does not exist), which
//! `decide` never produces.
//!
//! Its rooms: `events` (the event types and their stored JSON), `state` (the state and
//! [`apply`]) and `decide` (commands, rejections and [`decide`]). Everything public is
//! re-exported here: callers name `connection::Thing`, whichever room holds it.

mod decide;
mod events;
mod state;

#[cfg(test)]
pub(crate) mod fixtures;

use uuid::Uuid;

use crate::store::StreamId;

pub use decide::{ConnectionCommand, ConnectionRejected, check_metadata, decide};
pub use events::{
    Authorization, ConnectionAuthorized, ConnectionDeleted, ConnectionEvent, CredentialsType,
    FailureClass, Flow, MetadataMode, MetadataSet, OwnershipSet, RefreshFailed, RefreshFailure,
    RefreshLeased, RefreshTrigger, TokenFingerprints, TokensRefreshed, is_authorization,
};
pub use state::{
    ActiveConnection, Connection, DeletedConnection, RecordedFailure, RefreshLease, apply,
};

/// The stream category of connections.
pub const CATEGORY: &str = "connection";

/// The UUID v5 namespace of connection stream ids. Changing it orphans every existing stream.
pub const STREAM_NAMESPACE: Uuid = Uuid::from_u128(0x9df2_751c_973e_4223_8dcd_5f17_50bf_f5ec);

/// The stream of the connection `connection_id` of the integration `provider_config_key`.
///
/// Deterministic, and unambiguous: the pair is encoded as a JSON array before hashing, so
/// `("a", "b:c")` and `("a:b", "c")` are different streams.
pub fn stream_id(provider_config_key: &str, connection_id: &str) -> StreamId {
    // Read on every API request: one allocation for the name, none for formatting.
    let mut name = Vec::with_capacity(provider_config_key.len() + connection_id.len() + 8);
    // A JSON array of two strings; writing it to a vector cannot fail.
    let _ = serde_json::to_writer(&mut name, &[provider_config_key, connection_id]);
    StreamId::from_uuid(CATEGORY, Uuid::new_v5(&STREAM_NAMESPACE, &name))
}

/// Which connection: the integration's `provider_config_key` and the `connection_id` within it.
/// The pair names one stream ([`ConnectionKey::stream_id`]) and travels as one value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey {
    provider_config_key: String,
    connection_id: String,
}

impl ConnectionKey {
    pub fn new(provider_config_key: impl Into<String>, connection_id: impl Into<String>) -> Self {
        Self {
            provider_config_key: provider_config_key.into(),
            connection_id: connection_id.into(),
        }
    }

    /// The integration's key.
    pub fn provider_config_key(&self) -> &str {
        &self.provider_config_key
    }

    /// The connection's id within the integration.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// `(provider_config_key, connection_id)`.
    pub fn into_parts(self) -> (String, String) {
        (self.provider_config_key, self.connection_id)
    }

    /// The connection's stream.
    pub fn stream_id(&self) -> StreamId {
        stream_id(&self.provider_config_key, &self.connection_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_id_is_deterministic_and_pinned() {
        assert_eq!(stream_id("github", "user-1"), stream_id("github", "user-1"));
        assert_eq!(
            stream_id("github", "user-1").as_str(),
            "connection-7bdcb4e7-15c1-5d76-b0b4-21a54a0fe9f4"
        );
        assert_eq!(stream_id("github", "user-1").category(), CATEGORY);
    }

    #[test]
    fn the_stream_id_tells_apart_pairs_that_concatenate_alike() {
        assert_ne!(stream_id("a", "b:c"), stream_id("a:b", "c"));
        assert_ne!(stream_id("a", "bc"), stream_id("ab", "c"));
        assert_ne!(stream_id("a\",\"b", "c"), stream_id("a", "b\",\"c"));
        assert_ne!(stream_id("a", "b"), stream_id("b", "a"));
    }
}
