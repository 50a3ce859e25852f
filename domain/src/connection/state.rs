//! A connection as its events leave it: the state, and [`apply`], which folds one event into it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::ConnectionKey;
use super::events::{
    ConnectionEvent, CredentialsType, FailureClass, Flow, MetadataMode, RefreshFailure,
    RefreshTrigger, TokenFingerprints,
};
use crate::connect_session::Ownership;
use crate::keys::Sealed;

/// A connection as its events leave it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one state per loaded stream; boxing would only add an allocation"
)]
pub enum Connection {
    /// No event yet.
    #[default]
    NeverAuthorized,
    /// Authorized and not deleted since.
    Active(ActiveConnection),
    /// Deleted; a later authorization continues the generation count.
    Deleted(DeletedConnection),
}

/// The state of an authorized connection.
///
/// Stored as JSON in read-model rows and snapshots. An absent `Option` is left out (about 90
/// bytes of nulls per row); serde reads a missing `Option` field as `None` with or without
/// `#[serde(default)]`, so builds from before this read the rows too.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ActiveConnection {
    /// The integration's key.
    pub provider_config_key: String,
    /// The connection's id within the integration.
    pub connection_id: String,
    /// The provider template's name.
    pub provider: String,
    /// How the current credentials were first obtained.
    pub flow: Flow,
    /// The kind of credentials.
    pub credentials_type: CredentialsType,
    /// The current authorization's generation (≥ 1).
    pub generation: u32,
    /// The current generation's data key, as a one-element list. (It once listed every
    /// generation's key, which grew each snapshot and cached copy with every re-authorization;
    /// the shape stays so that instances of earlier versions read the same rows during a rolling
    /// upgrade. A deletion names the keys the key store holds live for the stream.)
    pub data_key_ids: Vec<Uuid>,
    /// The current credentials, sealed.
    pub credentials: Sealed,
    /// Fingerprints of the current tokens.
    pub fingerprints: TokenFingerprints,
    /// Whether the current credentials include a refresh token.
    pub has_refresh_token: bool,
    /// When the current access token expires, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// Provider-specific configuration.
    pub connection_config: Map<String, Value>,
    /// 1 after authorization, + 1 for every rotated refresh token.
    pub refresh_token_generation: u32,
    /// The open lease: taken, with no outcome yet (possibly expired, i.e. orphaned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<RefreshLease>,
    /// The most recent failure since the last success or authorization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<RecordedFailure>,
    /// The permanent failure that blocks non-forced leases, until a success or re-authorization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocking_failure: Option<RecordedFailure>,
    /// Transient failures in a row since the last success, authorization or permanent failure.
    pub consecutive_transient_failures: u32,
    /// The metadata object; kept across re-authorizations, emptied by a deletion.
    pub metadata: Map<String, Value>,
    /// When the current generation was authorized.
    pub authorized_at: DateTime<Utc>,
    /// When tokens were last refreshed in this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// When the connection was first authorized (kept across re-authorizations, reset by a
    /// deletion).
    pub created_at: DateTime<Utc>,
    /// When the last event changed it.
    pub updated_at: DateTime<Utc>,
    /// Tags and end user, from the last authorization through a connect session or a patch.
    #[serde(default, skip_serializing_if = "Ownership::is_empty")]
    pub ownership: Ownership,
}

/// A lease without an outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RefreshLease {
    /// The lease's id.
    pub lease_id: Uuid,
    /// The instance that holds it.
    pub holder: String,
    /// What started the refresh.
    pub trigger: RefreshTrigger,
    /// When it was taken.
    pub leased_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
}

impl RefreshLease {
    /// Whether the lease has lapsed at `now` (a lapsed lease no longer blocks a new one).
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// A failure as recorded in state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecordedFailure {
    /// The lease the failed refresh ran under.
    pub lease_id: Uuid,
    /// What went wrong.
    pub failure: RefreshFailure,
    /// When.
    pub failed_at: DateTime<Utc>,
}

/// The state of a deleted connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeletedConnection {
    /// The last generation before the deletion.
    pub generation: u32,
    /// The data keys its deletion shredded (every live key of the stream then).
    pub data_key_ids: Vec<Uuid>,
    /// When it was deleted.
    pub deleted_at: DateTime<Utc>,
    /// Which connection it was and when it was created, so that a read model rebuilt from the
    /// log keeps them as the live one does (empty in states recorded before they were kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_config_key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connection_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

impl ActiveConnection {
    /// Which connection this is.
    pub fn key(&self) -> ConnectionKey {
        ConnectionKey::new(&self.provider_config_key, &self.connection_id)
    }

    /// Whether its token can be renewed without the user: OAuth 2 with a refresh token, or a
    /// client-credentials grant (which asks again with the stored client credentials).
    pub fn renewable(&self) -> bool {
        match self.credentials_type {
            CredentialsType::Oauth2 => self.has_refresh_token,
            CredentialsType::Oauth2Cc => true,
            _ => false,
        }
    }
}

impl Connection {
    /// The last authorization's generation; 0 if never authorized.
    pub fn generation(&self) -> u32 {
        match self {
            Self::NeverAuthorized => 0,
            Self::Active(active) => active.generation,
            Self::Deleted(deleted) => deleted.generation,
        }
    }

    /// The active state, unless never authorized or deleted.
    pub fn active(&self) -> Option<&ActiveConnection> {
        match self {
            Self::Active(active) => Some(active),
            Self::NeverAuthorized | Self::Deleted(_) => None,
        }
    }
}

/// `state` after `event`.
pub fn apply(state: &mut Connection, event: &ConnectionEvent) {
    match event {
        ConnectionEvent::ConnectionAuthorized(event) => {
            let (metadata, created_at, ownership) = match std::mem::take(state) {
                Connection::NeverAuthorized | Connection::Deleted(_) => {
                    (Map::new(), event.authorized_at, Ownership::default())
                }
                Connection::Active(active) => {
                    (active.metadata, active.created_at, active.ownership)
                }
            };
            let authorization = event.authorization.clone();
            let ownership = if authorization.ownership.is_empty() {
                ownership
            } else {
                *authorization.ownership
            };
            *state = Connection::Active(ActiveConnection {
                provider_config_key: authorization.provider_config_key,
                connection_id: authorization.connection_id,
                provider: authorization.provider,
                flow: authorization.flow,
                credentials_type: authorization.credentials_type,
                generation: event.generation,
                data_key_ids: vec![authorization.data_key_id],
                credentials: authorization.credentials,
                fingerprints: authorization.fingerprints,
                has_refresh_token: authorization.has_refresh_token,
                expires_at: authorization.expires_at,
                scopes: authorization.scopes,
                connection_config: authorization.connection_config,
                refresh_token_generation: 1,
                lease: None,
                last_failure: None,
                blocking_failure: None,
                consecutive_transient_failures: 0,
                metadata,
                authorized_at: event.authorized_at,
                last_refreshed_at: None,
                created_at,
                updated_at: event.authorized_at,
                ownership,
            });
        }
        ConnectionEvent::RefreshLeased(event) => {
            if let Connection::Active(active) = state {
                active.lease = Some(RefreshLease {
                    lease_id: event.lease_id,
                    holder: event.holder.clone(),
                    trigger: event.trigger,
                    leased_at: event.leased_at,
                    expires_at: event.lease_expires_at,
                });
                active.updated_at = event.leased_at;
            }
        }
        ConnectionEvent::TokensRefreshed(event) => {
            if let Connection::Active(active) = state {
                active.credentials = event.credentials.clone();
                active.fingerprints = event.fingerprints.clone();
                active.expires_at = event.expires_at;
                active.has_refresh_token = event.has_refresh_token;
                active.refresh_token_generation = event.refresh_token_generation;
                active.lease = None;
                active.last_failure = None;
                active.blocking_failure = None;
                active.consecutive_transient_failures = 0;
                active.last_refreshed_at = Some(event.refreshed_at);
                active.updated_at = event.refreshed_at;
            }
        }
        ConnectionEvent::RefreshFailed(event) => {
            if let Connection::Active(active) = state {
                let recorded = RecordedFailure {
                    lease_id: event.lease_id,
                    failure: event.failure.clone(),
                    failed_at: event.failed_at,
                };
                match event.failure.class {
                    FailureClass::Permanent => {
                        active.blocking_failure = Some(recorded.clone());
                        active.consecutive_transient_failures = 0;
                    }
                    FailureClass::Transient => {
                        active.consecutive_transient_failures =
                            active.consecutive_transient_failures.saturating_add(1);
                    }
                }
                active.last_failure = Some(recorded);
                active.lease = None;
                active.updated_at = event.failed_at;
            }
        }
        ConnectionEvent::MetadataSet(event) => {
            // `decide` and `decode` only let objects through.
            if let (Connection::Active(active), Value::Object(metadata)) = (state, &event.metadata)
            {
                match event.mode {
                    MetadataMode::Replace => active.metadata = metadata.clone(),
                    MetadataMode::Merge => {
                        for (key, value) in metadata {
                            active.metadata.insert(key.clone(), value.clone());
                        }
                    }
                }
                active.updated_at = event.set_at;
            }
        }
        ConnectionEvent::OwnershipSet(event) => {
            if let Connection::Active(active) = state {
                active.ownership = event.ownership.clone();
                active.updated_at = event.set_at;
            }
        }
        ConnectionEvent::ConnectionDeleted(event) => {
            let mut deleted = DeletedConnection {
                generation: state.generation(),
                data_key_ids: event.shredded_data_keys.clone(),
                deleted_at: event.deleted_at,
                provider_config_key: String::new(),
                connection_id: String::new(),
                provider: String::new(),
                created_at: None,
            };
            if let Connection::Active(active) = state {
                deleted.provider_config_key = active.provider_config_key.clone();
                deleted.connection_id = active.connection_id.clone();
                deleted.provider = active.provider.clone();
                deleted.created_at = Some(active.created_at);
            }
            *state = Connection::Deleted(deleted);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::connection::fixtures::{active, authorized, key};
    use crate::scenario::at;

    /// The fields an authorized connection without a refresh yet leaves out.
    const LEFT_OUT: [&str; 4] = [
        "lease",
        "last_failure",
        "blocking_failure",
        "last_refreshed_at",
    ];

    #[test]
    fn an_absent_option_is_left_out_of_the_stored_json_and_read_back_as_none() {
        let mut state = Connection::default();
        apply(&mut state, &authorized(1, key(1), at(0)));
        let json = serde_json::to_value(&state).unwrap();
        let stored = json["Active"].as_object().unwrap();
        for field in LEFT_OUT {
            assert!(!stored.contains_key(field), "{field} in {json}");
        }
        assert_eq!(serde_json::from_value::<Connection>(json).unwrap(), state);

        // The shape rows had before: every field, absent ones as null.
        let mut earlier = serde_json::to_value(active(&state)).unwrap();
        for field in LEFT_OUT {
            earlier[field] = Value::Null;
        }
        let read: ActiveConnection = serde_json::from_value(earlier).unwrap();
        assert_eq!(&read, active(&state));

        // An earlier build's struct, without `#[serde(default)]`, reads a missing `Option`.
        #[derive(Deserialize)]
        struct Earlier {
            lease: Option<RefreshLease>,
            last_refreshed_at: Option<DateTime<Utc>>,
        }
        let earlier: Earlier = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(earlier.lease.is_none() && earlier.last_refreshed_at.is_none());
    }
}
