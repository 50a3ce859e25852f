//! A connection: one end user's grant at one integration, as a pure event-sourced aggregate.
//!
//! A connection's stream is [`stream_id`]`(provider_config_key, connection_id)`, derived
//! deterministically so that two concurrent authorizations of the same connection meet at the
//! store's expected-version check, not in memory (DESIGN.md §2).
//!
//! Invariants [`decide`] keeps:
//! - Generations count every authorization from 1, across deletions: a re-authorization, also one
//!   after a deletion, is the previous generation + 1.
//! - Secrets appear only [`Sealed`]; events name the data key of their generation and carry short
//!   keyed fingerprints computed outside, never a plaintext token.
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

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::event::{DecodeError, DomainEvent};
use crate::keys::Sealed;
use crate::store::StreamId;

/// The stream category of connections.
pub const CATEGORY: &str = "connection";

/// The UUID v5 namespace of connection stream ids. Changing it orphans every existing stream.
pub const STREAM_NAMESPACE: Uuid = Uuid::from_u128(0x9df2_751c_973e_4223_8dcd_5f17_50bf_f5ec);

const EVENT_VERSION: i16 = 1;
const CONNECTION_AUTHORIZED: &str = "ConnectionAuthorized";
const REFRESH_LEASED: &str = "RefreshLeased";
const TOKENS_REFRESHED: &str = "TokensRefreshed";
const REFRESH_FAILED: &str = "RefreshFailed";
const METADATA_SET: &str = "MetadataSet";
const CONNECTION_DELETED: &str = "ConnectionDeleted";

/// The stream of the connection `connection_id` of the integration `provider_config_key`.
///
/// Deterministic, and unambiguous: the pair is encoded as a JSON array before hashing, so
/// `("a", "b:c")` and `("a:b", "c")` are different streams.
pub fn stream_id(provider_config_key: &str, connection_id: &str) -> StreamId {
    // A JSON array of two strings; serializing cannot fail.
    let name = serde_json::to_string(&[provider_config_key, connection_id]).unwrap_or_default();
    StreamId::new(CATEGORY, Uuid::new_v5(&STREAM_NAMESPACE, name.as_bytes()))
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

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// How the credentials were obtained.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// An OAuth 2 authorization-code flow through Grantline.
    Oauth2,
    /// An OAuth 1.0a flow through Grantline.
    Oauth1,
    /// Credentials imported through the API.
    Import,
}

/// The kind of credentials, as the Nango API names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialsType {
    /// OAuth 2 access (and maybe refresh) token.
    #[serde(rename = "OAUTH2")]
    Oauth2,
    /// OAuth 1.0a token and token secret.
    #[serde(rename = "OAUTH1")]
    Oauth1,
    /// A static API key.
    #[serde(rename = "API_KEY")]
    ApiKey,
    /// A username and password.
    #[serde(rename = "BASIC")]
    Basic,
}

/// Short keyed (HMAC) fingerprints of the tokens, computed outside the domain, so that auditors
/// can tell token generations apart without seeing a token.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenFingerprints {
    /// Fingerprint of the access token.
    #[serde(default)]
    pub access_token: Option<String>,
    /// Fingerprint of the refresh token, if there is one.
    #[serde(default)]
    pub refresh_token: Option<String>,
}

/// What started a refresh.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefreshTrigger {
    /// A read found the token stale.
    Read,
    /// The scheduler refreshed ahead of expiry.
    Schedule,
    /// An explicit `force_refresh`; it is not blocked by a permanent failure.
    Force,
}

/// Whether retrying a failed refresh can help.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The grant is gone (`invalid_grant`, other 4xx): no retries until re-authorized or forced.
    Permanent,
    /// Network error, timeout, 5xx: retried with backoff.
    Transient,
}

/// A classified refresh failure. Carries no secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RefreshFailure {
    /// Permanent or transient.
    pub class: FailureClass,
    /// The provider's error code, e.g. `invalid_grant`.
    pub code: Option<String>,
    /// The provider's HTTP status, if it answered.
    pub provider_status: Option<u16>,
    /// A human-readable description (the provider's `error_description` or the network error).
    pub description: Option<String>,
}

/// How [`MetadataSet`] combines with the metadata already there.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetadataMode {
    /// The new object replaces the old one.
    Replace,
    /// Top-level keys of the new object overwrite or add to the old one (shallow merge).
    Merge,
}

/// The connection was authorized (first time, again, or again after a deletion).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnectionAuthorized {
    /// The integration's key.
    pub provider_config_key: String,
    /// The connection's id within the integration.
    pub connection_id: String,
    /// The provider template's name.
    pub provider: String,
    /// How the credentials were obtained.
    pub flow: Flow,
    /// The kind of credentials.
    pub credentials_type: CredentialsType,
    /// 1 for the first authorization, previous + 1 for every later one.
    pub generation: u32,
    /// The data key of this generation.
    pub data_key_id: Uuid,
    /// The credentials, sealed under `data_key_id`.
    pub credentials: Sealed,
    /// Whether the credentials include a refresh token.
    pub has_refresh_token: bool,
    /// When the access token expires, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// Provider-specific configuration (e.g. a subdomain).
    pub connection_config: Map<String, Value>,
    /// Fingerprints of the tokens.
    #[serde(default)]
    pub fingerprints: TokenFingerprints,
    /// When the authorization completed.
    pub authorized_at: DateTime<Utc>,
}

/// A refresher took the lease: it alone may call the provider until `lease_expires_at`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RefreshLeased {
    /// The lease, named again by its outcome.
    pub lease_id: Uuid,
    /// The instance that holds it.
    pub holder: String,
    /// What started the refresh.
    pub trigger: RefreshTrigger,
    /// When the lease was taken.
    pub leased_at: DateTime<Utc>,
    /// When the lease lapses if no outcome follows.
    pub lease_expires_at: DateTime<Utc>,
}

/// The provider returned new tokens under the lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokensRefreshed {
    /// The lease this refresh ran under.
    pub lease_id: Uuid,
    /// The new credentials (the old refresh token kept if none was returned), sealed.
    pub credentials: Sealed,
    /// When the new access token expires, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the credentials include a refresh token.
    pub has_refresh_token: bool,
    /// Whether the provider returned a new refresh token.
    pub refresh_token_rotated: bool,
    /// 1 after authorization, + 1 for every rotation.
    pub refresh_token_generation: u32,
    /// Fingerprints of the tokens.
    #[serde(default)]
    pub fingerprints: TokenFingerprints,
    /// When the refresh completed.
    pub refreshed_at: DateTime<Utc>,
}

/// The refresh under the lease failed; the stored credentials are unchanged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RefreshFailed {
    /// The lease this refresh ran under.
    pub lease_id: Uuid,
    /// What went wrong.
    pub failure: RefreshFailure,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
}

/// The connection's metadata was set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MetadataSet {
    /// A JSON object (decoding refuses anything else).
    pub metadata: Value,
    /// Replace or merge.
    pub mode: MetadataMode,
    /// When it was set.
    pub set_at: DateTime<Utc>,
}

/// The connection was deleted and its data keys shredded; its history stays.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnectionDeleted {
    /// When it was deleted.
    pub deleted_at: DateTime<Utc>,
    /// The data keys destroyed with it: what they sealed is unrecoverable.
    pub shredded_data_keys: Vec<Uuid>,
}

/// Everything that happens to a connection. Stored with the variant's name as `event_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectionEvent {
    /// See [`ConnectionAuthorized`].
    ConnectionAuthorized(ConnectionAuthorized),
    /// See [`RefreshLeased`].
    RefreshLeased(RefreshLeased),
    /// See [`TokensRefreshed`].
    TokensRefreshed(TokensRefreshed),
    /// See [`RefreshFailed`].
    RefreshFailed(RefreshFailed),
    /// See [`MetadataSet`].
    MetadataSet(MetadataSet),
    /// See [`ConnectionDeleted`].
    ConnectionDeleted(ConnectionDeleted),
}

impl DomainEvent for ConnectionEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ConnectionAuthorized(_) => CONNECTION_AUTHORIZED,
            Self::RefreshLeased(_) => REFRESH_LEASED,
            Self::TokensRefreshed(_) => TOKENS_REFRESHED,
            Self::RefreshFailed(_) => REFRESH_FAILED,
            Self::MetadataSet(_) => METADATA_SET,
            Self::ConnectionDeleted(_) => CONNECTION_DELETED,
        }
    }

    fn event_version(&self) -> i16 {
        EVENT_VERSION
    }

    fn to_payload(&self) -> Value {
        match self {
            Self::ConnectionAuthorized(payload) => payload_json(payload),
            Self::RefreshLeased(payload) => payload_json(payload),
            Self::TokensRefreshed(payload) => payload_json(payload),
            Self::RefreshFailed(payload) => payload_json(payload),
            Self::MetadataSet(payload) => payload_json(payload),
            Self::ConnectionDeleted(payload) => payload_json(payload),
        }
    }

    fn decode(event_type: &str, event_version: i16, payload: &Value) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            (CONNECTION_AUTHORIZED, 1) => read(event_type, payload).map(Self::ConnectionAuthorized),
            (REFRESH_LEASED, 1) => read(event_type, payload).map(Self::RefreshLeased),
            (TOKENS_REFRESHED, 1) => read(event_type, payload).map(Self::TokensRefreshed),
            (REFRESH_FAILED, 1) => read(event_type, payload).map(Self::RefreshFailed),
            (METADATA_SET, 1) => {
                let event: MetadataSet = read(event_type, payload)?;
                if !event.metadata.is_object() {
                    return Err(DecodeError::Malformed {
                        event_type: event_type.to_owned(),
                        reason: "metadata is not a JSON object".to_owned(),
                    });
                }
                Ok(Self::MetadataSet(event))
            }
            (CONNECTION_DELETED, 1) => read(event_type, payload).map(Self::ConnectionDeleted),
            _ => Err(DecodeError::Unknown {
                event_type: event_type.to_owned(),
                event_version,
            }),
        }
    }
}

/// A payload as JSON.
fn payload_json<T: Serialize>(payload: &T) -> Value {
    // Serializing into a `Value` fails only for a map with non-string keys or a `Serialize` impl
    // that reports an error. These payloads hold strings, numbers, uuids, RFC 3339 timestamps,
    // base64 and JSON objects, none of which can fail; the pinning tests serialize every type.
    match serde_json::to_value(payload) {
        Ok(value) => value,
        Err(error) => panic!("connection event payloads always serialize: {error}"),
    }
}

/// Reads a payload by borrowing it (`Sealed` deserializes from a borrowed string).
fn read<'a, T: Deserialize<'a>>(event_type: &str, payload: &'a Value) -> Result<T, DecodeError> {
    T::deserialize(payload).map_err(|error| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        reason: error.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

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
    /// The data keys of every generation so far, oldest first, including those of generations
    /// before a deletion (already shredded).
    pub data_key_ids: Vec<Uuid>,
    /// The current credentials, sealed.
    pub credentials: Sealed,
    /// Fingerprints of the current tokens.
    pub fingerprints: TokenFingerprints,
    /// Whether the current credentials include a refresh token.
    pub has_refresh_token: bool,
    /// When the current access token expires, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// Provider-specific configuration.
    pub connection_config: Map<String, Value>,
    /// 1 after authorization, + 1 for every rotated refresh token.
    pub refresh_token_generation: u32,
    /// The open lease: taken, with no outcome yet (possibly expired, i.e. orphaned).
    pub lease: Option<RefreshLease>,
    /// The most recent failure since the last success or authorization.
    pub last_failure: Option<RecordedFailure>,
    /// The permanent failure that blocks non-forced leases, until a success or re-authorization.
    pub blocking_failure: Option<RecordedFailure>,
    /// Transient failures in a row since the last success, authorization or permanent failure.
    pub consecutive_transient_failures: u32,
    /// The metadata object; kept across re-authorizations, emptied by a deletion.
    pub metadata: Map<String, Value>,
    /// When the current generation was authorized.
    pub authorized_at: DateTime<Utc>,
    /// When tokens were last refreshed in this generation.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// When the connection was first authorized (kept across re-authorizations, reset by a
    /// deletion).
    pub created_at: DateTime<Utc>,
    /// When the last event changed it.
    pub updated_at: DateTime<Utc>,
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
    /// The data keys of every generation so far (all shredded).
    pub data_key_ids: Vec<Uuid>,
    /// When it was deleted.
    pub deleted_at: DateTime<Utc>,
}

impl ActiveConnection {
    /// Which connection this is.
    pub fn key(&self) -> ConnectionKey {
        ConnectionKey::new(&self.provider_config_key, &self.connection_id)
    }
}

impl Connection {
    /// The state after `events`, in stream order.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a ConnectionEvent>) -> Self {
        let mut state = Self::default();
        for event in events {
            apply(&mut state, event);
        }
        state
    }

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

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// What may be asked of a connection. Time and provider answers are data here.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectionCommand {
    /// Record (new or renewed) credentials: always allowed, the generation moves on.
    Authorize {
        provider_config_key: String,
        connection_id: String,
        provider: String,
        flow: Flow,
        credentials_type: CredentialsType,
        /// The fresh data key of the new generation.
        data_key_id: Uuid,
        credentials: Sealed,
        has_refresh_token: bool,
        expires_at: Option<DateTime<Utc>>,
        scopes: Vec<String>,
        connection_config: Map<String, Value>,
        fingerprints: TokenFingerprints,
        now: DateTime<Utc>,
    },
    /// Take the refresh lease for `lease_duration`.
    LeaseRefresh {
        lease_id: Uuid,
        /// The instance id of the caller.
        holder: String,
        trigger: RefreshTrigger,
        now: DateTime<Utc>,
        /// Must be positive, and longer than the provider call's timeout.
        lease_duration: Duration,
    },
    /// Record the provider's new tokens under the lease.
    CompleteRefresh {
        lease_id: Uuid,
        credentials: Sealed,
        expires_at: Option<DateTime<Utc>>,
        has_refresh_token: bool,
        /// Whether the provider returned a new refresh token.
        refresh_token_rotated: bool,
        fingerprints: TokenFingerprints,
        now: DateTime<Utc>,
    },
    /// Record a failed refresh under the lease.
    FailRefresh {
        lease_id: Uuid,
        failure: RefreshFailure,
        now: DateTime<Utc>,
    },
    /// Replace or merge the metadata (must be a JSON object).
    SetMetadata {
        metadata: Value,
        mode: MetadataMode,
        now: DateTime<Utc>,
    },
    /// Delete the connection; the caller has shredded `shredded_data_keys`.
    Delete {
        now: DateTime<Utc>,
        shredded_data_keys: Vec<Uuid>,
    },
}

/// Why a connection command was refused. A domain answer, not a failure of the store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRejected {
    /// The connection was never authorized.
    #[error("the connection does not exist")]
    NotFound,
    /// The connection was deleted.
    #[error("the connection was deleted")]
    Deleted,
    /// There is no refresh token to refresh with.
    #[error("the connection has no refresh token")]
    NoRefreshToken,
    /// Another refresher holds an unexpired lease.
    #[error("a refresh is already in progress: {holder} holds the lease until {until}")]
    LeaseHeld {
        holder: String,
        until: DateTime<Utc>,
    },
    /// The last refresh failed permanently and the trigger is not `force`.
    #[error(
        "refreshing is blocked by a permanent failure ({}); re-authorize the connection or force \
         a refresh",
        .code.as_deref().unwrap_or("no error code")
    )]
    RefreshBlocked { code: Option<String> },
    /// The lease is not the open one: never taken, or superseded by a later lease, a
    /// re-authorization or a deletion.
    #[error("refresh lease {lease_id} is not held (superseded, or never taken)")]
    LeaseNotHeld { lease_id: Uuid },
    /// Metadata must be a JSON object.
    #[error("metadata must be a JSON object")]
    MetadataNotObject,
    /// The lease duration is not positive or overflows the calendar.
    #[error("a refresh lease needs a positive duration")]
    InvalidLeaseDuration,
}

// ---------------------------------------------------------------------------------------------
// Decide and apply
// ---------------------------------------------------------------------------------------------

/// The events `command` produces in `state`, or why it is refused.
pub fn decide(
    state: &Connection,
    command: ConnectionCommand,
) -> Result<Vec<ConnectionEvent>, ConnectionRejected> {
    let event = match command {
        ConnectionCommand::Authorize {
            provider_config_key,
            connection_id,
            provider,
            flow,
            credentials_type,
            data_key_id,
            credentials,
            has_refresh_token,
            expires_at,
            scopes,
            connection_config,
            fingerprints,
            now,
        } => ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            provider_config_key,
            connection_id,
            provider,
            flow,
            credentials_type,
            generation: state.generation().saturating_add(1),
            data_key_id,
            credentials,
            has_refresh_token,
            expires_at,
            scopes,
            connection_config,
            fingerprints,
            authorized_at: now,
        }),
        ConnectionCommand::LeaseRefresh {
            lease_id,
            holder,
            trigger,
            now,
            lease_duration,
        } => {
            let active = existing(state)?;
            if !active.has_refresh_token {
                return Err(ConnectionRejected::NoRefreshToken);
            }
            if let Some(lease) = &active.lease
                && !lease.is_expired_at(now)
            {
                return Err(ConnectionRejected::LeaseHeld {
                    holder: lease.holder.clone(),
                    until: lease.expires_at,
                });
            }
            if trigger != RefreshTrigger::Force
                && let Some(blocking) = &active.blocking_failure
            {
                return Err(ConnectionRejected::RefreshBlocked {
                    code: blocking.failure.code.clone(),
                });
            }
            if lease_duration <= Duration::zero() {
                return Err(ConnectionRejected::InvalidLeaseDuration);
            }
            let lease_expires_at = now
                .checked_add_signed(lease_duration)
                .ok_or(ConnectionRejected::InvalidLeaseDuration)?;
            ConnectionEvent::RefreshLeased(RefreshLeased {
                lease_id,
                holder,
                trigger,
                leased_at: now,
                lease_expires_at,
            })
        }
        ConnectionCommand::CompleteRefresh {
            lease_id,
            credentials,
            expires_at,
            has_refresh_token,
            refresh_token_rotated,
            fingerprints,
            now,
        } => {
            let active = holding(state, lease_id)?;
            let refresh_token_generation = if refresh_token_rotated {
                active.refresh_token_generation.saturating_add(1)
            } else {
                active.refresh_token_generation
            };
            ConnectionEvent::TokensRefreshed(TokensRefreshed {
                lease_id,
                credentials,
                expires_at,
                has_refresh_token,
                refresh_token_rotated,
                refresh_token_generation,
                fingerprints,
                refreshed_at: now,
            })
        }
        ConnectionCommand::FailRefresh {
            lease_id,
            failure,
            now,
        } => {
            holding(state, lease_id)?;
            ConnectionEvent::RefreshFailed(RefreshFailed {
                lease_id,
                failure,
                failed_at: now,
            })
        }
        ConnectionCommand::SetMetadata {
            metadata,
            mode,
            now,
        } => {
            existing(state)?;
            if !metadata.is_object() {
                return Err(ConnectionRejected::MetadataNotObject);
            }
            ConnectionEvent::MetadataSet(MetadataSet {
                metadata,
                mode,
                set_at: now,
            })
        }
        ConnectionCommand::Delete {
            now,
            shredded_data_keys,
        } => {
            existing(state)?;
            ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
                deleted_at: now,
                shredded_data_keys,
            })
        }
    };
    Ok(vec![event])
}

/// The active connection, or `NotFound` / `Deleted`.
fn existing(state: &Connection) -> Result<&ActiveConnection, ConnectionRejected> {
    match state {
        Connection::NeverAuthorized => Err(ConnectionRejected::NotFound),
        Connection::Deleted(_) => Err(ConnectionRejected::Deleted),
        Connection::Active(active) => Ok(active),
    }
}

/// The active connection if `lease_id` is its open lease.
fn holding(state: &Connection, lease_id: Uuid) -> Result<&ActiveConnection, ConnectionRejected> {
    match state {
        Connection::NeverAuthorized => Err(ConnectionRejected::NotFound),
        Connection::Active(active)
            if active
                .lease
                .as_ref()
                .is_some_and(|lease| lease.lease_id == lease_id) =>
        {
            Ok(active)
        }
        Connection::Active(_) | Connection::Deleted(_) => {
            Err(ConnectionRejected::LeaseNotHeld { lease_id })
        }
    }
}

/// `state` after `event`.
pub fn apply(state: &mut Connection, event: &ConnectionEvent) {
    match event {
        ConnectionEvent::ConnectionAuthorized(event) => {
            let (mut data_key_ids, metadata, created_at) = match std::mem::take(state) {
                Connection::NeverAuthorized => (Vec::new(), Map::new(), event.authorized_at),
                Connection::Active(active) => {
                    (active.data_key_ids, active.metadata, active.created_at)
                }
                Connection::Deleted(deleted) => {
                    (deleted.data_key_ids, Map::new(), event.authorized_at)
                }
            };
            if !data_key_ids.contains(&event.data_key_id) {
                data_key_ids.push(event.data_key_id);
            }
            *state = Connection::Active(ActiveConnection {
                provider_config_key: event.provider_config_key.clone(),
                connection_id: event.connection_id.clone(),
                provider: event.provider.clone(),
                flow: event.flow,
                credentials_type: event.credentials_type,
                generation: event.generation,
                data_key_ids,
                credentials: event.credentials.clone(),
                fingerprints: event.fingerprints.clone(),
                has_refresh_token: event.has_refresh_token,
                expires_at: event.expires_at,
                scopes: event.scopes.clone(),
                connection_config: event.connection_config.clone(),
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
        ConnectionEvent::ConnectionDeleted(event) => {
            let (generation, data_key_ids) = match std::mem::take(state) {
                Connection::NeverAuthorized => (0, Vec::new()),
                Connection::Active(active) => (active.generation, active.data_key_ids),
                Connection::Deleted(deleted) => (deleted.generation, deleted.data_key_ids),
            };
            *state = Connection::Deleted(DeletedConnection {
                generation,
                data_key_ids,
                deleted_at: event.deleted_at,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    // --- fixtures -----------------------------------------------------------------------------

    /// 2024-05-01T12:00:00Z plus `minutes`.
    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_714_564_800 + minutes * 60, 0).unwrap()
    }

    fn key(n: u128) -> Uuid {
        Uuid::from_u128(0xd000 + n)
    }

    fn lease_id(n: u128) -> Uuid {
        Uuid::from_u128(0x1ea5e + n)
    }

    fn sealed(key_id: Uuid, bytes: &[u8]) -> Sealed {
        Sealed {
            key_id,
            ciphertext: bytes.to_vec(),
        }
    }

    fn fingerprints(access: &str, refresh: &str) -> TokenFingerprints {
        TokenFingerprints {
            access_token: Some(access.to_owned()),
            refresh_token: Some(refresh.to_owned()),
        }
    }

    fn authorize(data_key: Uuid, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::Authorize {
            provider_config_key: "github".to_owned(),
            connection_id: "user-1".to_owned(),
            provider: "github".to_owned(),
            flow: Flow::Oauth2,
            credentials_type: CredentialsType::Oauth2,
            data_key_id: data_key,
            credentials: sealed(data_key, b"authorized"),
            has_refresh_token: true,
            expires_at: Some(now + Duration::hours(1)),
            scopes: vec!["repo".to_owned()],
            connection_config: Map::new(),
            fingerprints: fingerprints("a-auth", "r-auth"),
            now,
        }
    }

    fn authorized(generation: u32, data_key: Uuid, now: DateTime<Utc>) -> ConnectionEvent {
        ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            provider_config_key: "github".to_owned(),
            connection_id: "user-1".to_owned(),
            provider: "github".to_owned(),
            flow: Flow::Oauth2,
            credentials_type: CredentialsType::Oauth2,
            generation,
            data_key_id: data_key,
            credentials: sealed(data_key, b"authorized"),
            has_refresh_token: true,
            expires_at: Some(now + Duration::hours(1)),
            scopes: vec!["repo".to_owned()],
            connection_config: Map::new(),
            fingerprints: fingerprints("a-auth", "r-auth"),
            authorized_at: now,
        })
    }

    fn lease(id: Uuid, trigger: RefreshTrigger, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::LeaseRefresh {
            lease_id: id,
            holder: "instance-a".to_owned(),
            trigger,
            now,
            lease_duration: Duration::seconds(30),
        }
    }

    fn leased(id: Uuid, trigger: RefreshTrigger, now: DateTime<Utc>) -> ConnectionEvent {
        ConnectionEvent::RefreshLeased(RefreshLeased {
            lease_id: id,
            holder: "instance-a".to_owned(),
            trigger,
            leased_at: now,
            lease_expires_at: now + Duration::seconds(30),
        })
    }

    fn complete(id: Uuid, rotated: bool, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::CompleteRefresh {
            lease_id: id,
            credentials: sealed(key(1), b"refreshed"),
            expires_at: Some(now + Duration::hours(1)),
            has_refresh_token: true,
            refresh_token_rotated: rotated,
            fingerprints: fingerprints("a-new", "r-new"),
            now,
        }
    }

    fn refreshed(
        id: Uuid,
        rotated: bool,
        refresh_token_generation: u32,
        now: DateTime<Utc>,
    ) -> ConnectionEvent {
        ConnectionEvent::TokensRefreshed(TokensRefreshed {
            lease_id: id,
            credentials: sealed(key(1), b"refreshed"),
            expires_at: Some(now + Duration::hours(1)),
            has_refresh_token: true,
            refresh_token_rotated: rotated,
            refresh_token_generation,
            fingerprints: fingerprints("a-new", "r-new"),
            refreshed_at: now,
        })
    }

    fn failure(class: FailureClass) -> RefreshFailure {
        match class {
            FailureClass::Permanent => RefreshFailure {
                class,
                code: Some("invalid_grant".to_owned()),
                provider_status: Some(400),
                description: Some("refresh token revoked".to_owned()),
            },
            FailureClass::Transient => RefreshFailure {
                class,
                code: None,
                provider_status: Some(503),
                description: Some("service unavailable".to_owned()),
            },
        }
    }

    fn fail(id: Uuid, class: FailureClass, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::FailRefresh {
            lease_id: id,
            failure: failure(class),
            now,
        }
    }

    fn failed(id: Uuid, class: FailureClass, now: DateTime<Utc>) -> ConnectionEvent {
        ConnectionEvent::RefreshFailed(RefreshFailed {
            lease_id: id,
            failure: failure(class),
            failed_at: now,
        })
    }

    fn set_metadata(metadata: Value, mode: MetadataMode, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::SetMetadata {
            metadata,
            mode,
            now,
        }
    }

    fn metadata_set(metadata: Value, mode: MetadataMode, now: DateTime<Utc>) -> ConnectionEvent {
        ConnectionEvent::MetadataSet(MetadataSet {
            metadata,
            mode,
            set_at: now,
        })
    }

    fn delete(keys: Vec<Uuid>, now: DateTime<Utc>) -> ConnectionCommand {
        ConnectionCommand::Delete {
            now,
            shredded_data_keys: keys,
        }
    }

    fn deleted(keys: Vec<Uuid>, now: DateTime<Utc>) -> ConnectionEvent {
        ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
            deleted_at: now,
            shredded_data_keys: keys,
        })
    }

    fn active(state: &Connection) -> &ActiveConnection {
        state.active().unwrap()
    }

    // --- given / when / then ------------------------------------------------------------------

    struct Given(Connection);

    fn given(events: &[ConnectionEvent]) -> Given {
        Given(Connection::from_events(events))
    }

    impl Given {
        fn when(self, command: ConnectionCommand) -> Then {
            let result = decide(&self.0, command);
            Then {
                state: self.0,
                result,
            }
        }
    }

    struct Then {
        state: Connection,
        result: Result<Vec<ConnectionEvent>, ConnectionRejected>,
    }

    impl Then {
        /// Asserts the decided events and returns the state after them.
        #[track_caller]
        fn then(self, expected: &[ConnectionEvent]) -> Connection {
            assert_eq!(self.result, Ok(expected.to_vec()));
            let mut state = self.state;
            for event in expected {
                apply(&mut state, event);
            }
            state
        }

        #[track_caller]
        fn then_rejected(self, expected: ConnectionRejected) {
            assert_eq!(self.result, Err(expected));
        }
    }

    use FailureClass::{Permanent, Transient};
    use RefreshTrigger::{Force, Read, Schedule};

    // --- authorization ------------------------------------------------------------------------

    #[test]
    fn a_first_authorization_is_generation_one() {
        let state = given(&[])
            .when(authorize(key(1), at(0)))
            .then(&[authorized(1, key(1), at(0))]);
        let active = active(&state);
        assert_eq!(active.generation, 1);
        assert_eq!(active.refresh_token_generation, 1);
        assert_eq!(active.data_key_ids, vec![key(1)]);
        assert_eq!(active.credentials, sealed(key(1), b"authorized"));
        assert_eq!(active.authorized_at, at(0));
    }

    #[test]
    fn a_reauthorization_starts_a_new_generation_and_clears_lease_and_failure() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(60)),
            refreshed(lease_id(1), true, 2, at(60)),
            leased(lease_id(2), Read, at(120)),
            failed(lease_id(2), Permanent, at(120)),
            leased(lease_id(3), Force, at(130)),
        ])
        .when(authorize(key(2), at(140)))
        .then(&[authorized(2, key(2), at(140))]);
        let active = active(&state);
        assert_eq!(active.generation, 2);
        assert_eq!(active.data_key_ids, vec![key(1), key(2)]);
        assert_eq!(active.refresh_token_generation, 1);
        assert_eq!(active.lease, None);
        assert_eq!(active.last_failure, None);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(active.last_refreshed_at, None);
    }

    #[test]
    fn a_reauthorization_keeps_the_metadata() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(json!({"team": "a"}), MetadataMode::Replace, at(1)),
        ])
        .when(authorize(key(2), at(2)))
        .then(&[authorized(2, key(2), at(2))]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"team": "a"})
        );
    }

    #[test]
    fn an_authorization_after_a_deletion_continues_the_generation_count() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            authorized(2, key(2), at(10)),
            metadata_set(json!({"team": "a"}), MetadataMode::Replace, at(11)),
            deleted(vec![key(1), key(2)], at(20)),
        ])
        .when(authorize(key(3), at(30)))
        .then(&[authorized(3, key(3), at(30))]);
        let active = active(&state);
        assert_eq!(active.generation, 3);
        assert_eq!(active.data_key_ids, vec![key(1), key(2), key(3)]);
        assert!(
            active.metadata.is_empty(),
            "a deletion forgets the metadata"
        );
    }

    // --- leases -------------------------------------------------------------------------------

    #[test]
    fn a_lease_is_granted_on_an_active_connection_with_a_refresh_token() {
        let state = given(&[authorized(1, key(1), at(0))])
            .when(lease(lease_id(1), Schedule, at(50)))
            .then(&[leased(lease_id(1), Schedule, at(50))]);
        let lease = active(&state).lease.clone().unwrap();
        assert_eq!(lease.lease_id, lease_id(1));
        assert_eq!(lease.expires_at, at(50) + Duration::seconds(30));
    }

    #[test]
    fn a_second_lease_is_refused_while_the_first_is_unexpired() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ])
        .when(lease(lease_id(2), Force, at(50) + Duration::seconds(29)))
        .then_rejected(ConnectionRejected::LeaseHeld {
            holder: "instance-a".to_owned(),
            until: at(50) + Duration::seconds(30),
        });
    }

    #[test]
    fn a_lease_after_the_first_expired_supersedes_the_orphaned_lease() {
        let now = at(50) + Duration::seconds(30);
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ])
        .when(lease(lease_id(2), Read, now))
        .then(&[leased(lease_id(2), Read, now)]);
        assert_eq!(active(&state).lease.as_ref().unwrap().lease_id, lease_id(2));
    }

    #[test]
    fn a_lease_is_refused_without_a_refresh_token() {
        let mut authorized = authorized(1, key(1), at(0));
        if let ConnectionEvent::ConnectionAuthorized(event) = &mut authorized {
            event.has_refresh_token = false;
        }
        given(&[authorized])
            .when(lease(lease_id(1), Force, at(1)))
            .then_rejected(ConnectionRejected::NoRefreshToken);
    }

    #[test]
    fn a_lease_is_refused_on_a_connection_that_was_never_authorized() {
        given(&[])
            .when(lease(lease_id(1), Read, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn a_lease_is_refused_after_deletion() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(lease(lease_id(1), Force, at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    #[test]
    fn a_lease_needs_a_positive_duration() {
        for lease_duration in [Duration::zero(), Duration::seconds(-1), Duration::MAX] {
            given(&[authorized(1, key(1), at(0))])
                .when(ConnectionCommand::LeaseRefresh {
                    lease_id: lease_id(1),
                    holder: "instance-a".to_owned(),
                    trigger: Read,
                    now: at(1),
                    lease_duration,
                })
                .then_rejected(ConnectionRejected::InvalidLeaseDuration);
        }
    }

    // --- refresh outcomes ---------------------------------------------------------------------

    #[test]
    fn completing_with_the_held_lease_records_the_new_tokens() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ])
        .when(complete(lease_id(1), false, at(51)))
        .then(&[refreshed(lease_id(1), false, 1, at(51))]);
        let active = active(&state);
        assert_eq!(active.credentials, sealed(key(1), b"refreshed"));
        assert_eq!(active.fingerprints, fingerprints("a-new", "r-new"));
        assert_eq!(active.expires_at, Some(at(111)));
        assert_eq!(active.last_refreshed_at, Some(at(51)));
        assert_eq!(active.lease, None);
    }

    #[test]
    fn completing_an_expired_lease_nobody_superseded_is_accepted() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ])
        .when(complete(lease_id(1), false, at(55)))
        .then(&[refreshed(lease_id(1), false, 1, at(55))]);
    }

    #[test]
    fn completing_without_a_lease_is_rejected() {
        given(&[authorized(1, key(1), at(0))])
            .when(complete(lease_id(1), false, at(51)))
            .then_rejected(ConnectionRejected::LeaseNotHeld {
                lease_id: lease_id(1),
            });
    }

    #[test]
    fn completing_a_lease_that_already_has_an_outcome_is_rejected() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            refreshed(lease_id(1), false, 1, at(51)),
        ])
        .when(complete(lease_id(1), false, at(52)))
        .then_rejected(ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(1),
        });
    }

    #[test]
    fn completing_a_superseded_lease_is_rejected() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            leased(lease_id(2), Read, at(51)),
        ])
        .when(complete(lease_id(1), false, at(52)))
        .then_rejected(ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(1),
        });
    }

    #[test]
    fn completing_after_a_reauthorization_is_rejected() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            authorized(2, key(2), at(50)),
        ])
        .when(complete(lease_id(1), false, at(50)))
        .then_rejected(ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(1),
        });
    }

    #[test]
    fn completing_after_a_deletion_is_rejected() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            deleted(vec![key(1)], at(50)),
        ])
        .when(complete(lease_id(1), false, at(50)))
        .then_rejected(ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(1),
        });
    }

    #[test]
    fn failing_a_superseded_lease_is_rejected() {
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            leased(lease_id(2), Read, at(51)),
        ])
        .when(fail(lease_id(1), Permanent, at(52)))
        .then_rejected(ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(1),
        });
    }

    #[test]
    fn an_outcome_on_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(fail(lease_id(1), Transient, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn a_rotated_refresh_token_increments_the_refresh_token_generation() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            refreshed(lease_id(1), true, 2, at(50)),
            leased(lease_id(2), Schedule, at(100)),
        ])
        .when(complete(lease_id(2), true, at(100)))
        .then(&[refreshed(lease_id(2), true, 3, at(100))]);
        assert_eq!(active(&state).refresh_token_generation, 3);
    }

    #[test]
    fn a_kept_refresh_token_keeps_the_refresh_token_generation() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            refreshed(lease_id(1), true, 2, at(50)),
            leased(lease_id(2), Schedule, at(100)),
        ])
        .when(complete(lease_id(2), false, at(100)))
        .then(&[refreshed(lease_id(2), false, 2, at(100))]);
        assert_eq!(active(&state).refresh_token_generation, 2);
    }

    // --- failures -----------------------------------------------------------------------------

    fn permanently_failed() -> Vec<ConnectionEvent> {
        vec![
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            failed(lease_id(1), Permanent, at(50)),
        ]
    }

    #[test]
    fn a_failure_is_recorded_against_the_held_lease_and_keeps_the_credentials() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ])
        .when(fail(lease_id(1), Permanent, at(51)))
        .then(&[failed(lease_id(1), Permanent, at(51))]);
        let active = active(&state);
        assert_eq!(active.credentials, sealed(key(1), b"authorized"));
        assert_eq!(active.fingerprints, fingerprints("a-auth", "r-auth"));
        assert_eq!(active.expires_at, Some(at(60)));
        assert!(active.has_refresh_token);
        assert_eq!(active.lease, None);
        let recorded = active.blocking_failure.clone().unwrap();
        assert_eq!(recorded.failure, failure(Permanent));
        assert_eq!(recorded.failed_at, at(51));
        assert_eq!(active.last_failure, Some(recorded));
    }

    #[test]
    fn a_permanent_failure_blocks_read_and_schedule_leases_but_not_force() {
        for trigger in [Read, Schedule] {
            given(&permanently_failed())
                .when(lease(lease_id(2), trigger, at(60)))
                .then_rejected(ConnectionRejected::RefreshBlocked {
                    code: Some("invalid_grant".to_owned()),
                });
        }
        given(&permanently_failed())
            .when(lease(lease_id(2), Force, at(60)))
            .then(&[leased(lease_id(2), Force, at(60))]);
    }

    #[test]
    fn a_transient_failure_does_not_block_and_is_counted() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            failed(lease_id(1), Transient, at(50)),
            leased(lease_id(2), Schedule, at(51)),
        ])
        .when(fail(lease_id(2), Transient, at(51)))
        .then(&[failed(lease_id(2), Transient, at(51))]);
        let active = active(&state);
        assert_eq!(active.consecutive_transient_failures, 2);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(
            active.last_failure.as_ref().map(|f| f.failure.clone()),
            Some(failure(Transient))
        );
        given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
            failed(lease_id(1), Transient, at(50)),
        ])
        .when(lease(lease_id(2), Read, at(52)))
        .then(&[leased(lease_id(2), Read, at(52))]);
    }

    #[test]
    fn a_transient_failure_of_a_forced_refresh_keeps_the_permanent_block() {
        let mut events = permanently_failed();
        events.extend([
            leased(lease_id(2), Force, at(60)),
            failed(lease_id(2), Transient, at(60)),
        ]);
        given(&events)
            .when(lease(lease_id(3), Schedule, at(70)))
            .then_rejected(ConnectionRejected::RefreshBlocked {
                code: Some("invalid_grant".to_owned()),
            });
    }

    #[test]
    fn a_successful_forced_refresh_lifts_the_block() {
        let mut events = permanently_failed();
        events.push(leased(lease_id(2), Force, at(60)));
        let state = given(&events)
            .when(complete(lease_id(2), true, at(60)))
            .then(&[refreshed(lease_id(2), true, 2, at(60))]);
        let active = active(&state);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(active.last_failure, None);
        assert_eq!(active.consecutive_transient_failures, 0);
        events.push(refreshed(lease_id(2), true, 2, at(60)));
        given(&events)
            .when(lease(lease_id(3), Read, at(70)))
            .then(&[leased(lease_id(3), Read, at(70))]);
    }

    #[test]
    fn a_reauthorization_recovers_from_a_permanent_failure() {
        let mut events = permanently_failed();
        events.push(authorized(2, key(2), at(60)));
        given(&events)
            .when(lease(lease_id(2), Read, at(61)))
            .then(&[leased(lease_id(2), Read, at(61))]);
    }

    // --- metadata -----------------------------------------------------------------------------

    #[test]
    fn metadata_replace_sets_the_whole_object() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(json!({"a": 1, "b": 2}), MetadataMode::Replace, at(1)),
        ])
        .when(set_metadata(json!({"c": 3}), MetadataMode::Replace, at(2)))
        .then(&[metadata_set(json!({"c": 3}), MetadataMode::Replace, at(2))]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"c": 3})
        );
    }

    #[test]
    fn metadata_merge_overwrites_and_adds_top_level_keys_only() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(
                json!({"a": 1, "nested": {"x": 1, "y": 2}}),
                MetadataMode::Replace,
                at(1),
            ),
        ])
        .when(set_metadata(
            json!({"nested": {"x": 9}, "b": 2}),
            MetadataMode::Merge,
            at(2),
        ))
        .then(&[metadata_set(
            json!({"nested": {"x": 9}, "b": 2}),
            MetadataMode::Merge,
            at(2),
        )]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"a": 1, "b": 2, "nested": {"x": 9}})
        );
    }

    #[test]
    fn metadata_that_is_not_an_object_is_rejected() {
        for metadata in [json!([1, 2]), json!("text"), json!(null), json!(3)] {
            given(&[authorized(1, key(1), at(0))])
                .when(set_metadata(metadata, MetadataMode::Merge, at(1)))
                .then_rejected(ConnectionRejected::MetadataNotObject);
        }
    }

    #[test]
    fn metadata_of_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(set_metadata(json!({}), MetadataMode::Replace, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn metadata_after_deletion_is_rejected() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(set_metadata(json!({"a": 1}), MetadataMode::Replace, at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    // --- deletion -----------------------------------------------------------------------------

    #[test]
    fn a_deletion_keeps_the_generation_and_the_data_keys() {
        let state = given(&[authorized(1, key(1), at(0)), authorized(2, key(2), at(1))])
            .when(delete(vec![key(1), key(2)], at(2)))
            .then(&[deleted(vec![key(1), key(2)], at(2))]);
        assert_eq!(
            state,
            Connection::Deleted(DeletedConnection {
                generation: 2,
                data_key_ids: vec![key(1), key(2)],
                deleted_at: at(2),
            })
        );
    }

    #[test]
    fn deleting_twice_is_rejected() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(delete(vec![key(1)], at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    #[test]
    fn deleting_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(delete(Vec::new(), at(2)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn rejections_explain_themselves() {
        assert_eq!(
            ConnectionRejected::RefreshBlocked {
                code: Some("invalid_grant".to_owned())
            }
            .to_string(),
            "refreshing is blocked by a permanent failure (invalid_grant); re-authorize the \
             connection or force a refresh"
        );
        assert_eq!(
            ConnectionRejected::LeaseHeld {
                holder: "instance-a".to_owned(),
                until: at(0)
            }
            .to_string(),
            "a refresh is already in progress: instance-a holds the lease until 2024-05-01 \
             12:00:00 UTC"
        );
    }

    // --- stream ids ---------------------------------------------------------------------------

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

    // --- JSON pinning -------------------------------------------------------------------------

    /// Checks the type name, version and JSON of `event`, and that it decodes back to itself.
    #[track_caller]
    fn assert_pinned(event: &ConnectionEvent, event_type: &str, expected: &Value) {
        assert_eq!(event.event_type(), event_type);
        assert_eq!(event.event_version(), 1);
        assert_eq!(&event.to_payload(), expected);
        assert_eq!(
            ConnectionEvent::decode(event_type, 1, expected).as_ref(),
            Ok(event)
        );
    }

    fn fixed_sealed() -> Sealed {
        sealed(
            Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_00aa),
            b"nonce+ciphertext",
        )
    }

    fn fixed_authorized() -> ConnectionEvent {
        let mut connection_config = Map::new();
        connection_config.insert("subdomain".to_owned(), json!("acme"));
        ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            provider_config_key: "github-prod".to_owned(),
            connection_id: "user-1".to_owned(),
            provider: "github".to_owned(),
            flow: Flow::Oauth2,
            credentials_type: CredentialsType::Oauth2,
            generation: 2,
            data_key_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_00aa),
            credentials: fixed_sealed(),
            has_refresh_token: true,
            expires_at: Some(at(60)),
            scopes: vec!["repo".to_owned(), "user".to_owned()],
            connection_config,
            fingerprints: fingerprints("fp-a", "fp-r"),
            authorized_at: at(0),
        })
    }

    #[test]
    fn connection_authorized_json_is_pinned() {
        assert_pinned(
            &fixed_authorized(),
            "ConnectionAuthorized",
            &json!({
                "provider_config_key": "github-prod",
                "connection_id": "user-1",
                "provider": "github",
                "flow": "oauth2",
                "credentials_type": "OAUTH2",
                "generation": 2,
                "data_key_id": "00000000-0000-4000-8000-0000000000aa",
                "credentials": {
                    "key_id": "00000000-0000-4000-8000-0000000000aa",
                    "ciphertext": "bm9uY2UrY2lwaGVydGV4dA=="
                },
                "has_refresh_token": true,
                "expires_at": "2024-05-01T13:00:00Z",
                "scopes": ["repo", "user"],
                "connection_config": {"subdomain": "acme"},
                "fingerprints": {"access_token": "fp-a", "refresh_token": "fp-r"},
                "authorized_at": "2024-05-01T12:00:00Z"
            }),
        );
    }

    #[test]
    fn flows_and_credential_types_serialize_in_their_stored_forms() {
        assert_eq!(
            vec![
                json!(Flow::Oauth2),
                json!(Flow::Oauth1),
                json!(Flow::Import)
            ],
            vec![json!("oauth2"), json!("oauth1"), json!("import")]
        );
        assert_eq!(
            vec![
                json!(CredentialsType::Oauth2),
                json!(CredentialsType::Oauth1),
                json!(CredentialsType::ApiKey),
                json!(CredentialsType::Basic)
            ],
            vec![
                json!("OAUTH2"),
                json!("OAUTH1"),
                json!("API_KEY"),
                json!("BASIC")
            ]
        );
        assert_eq!(
            vec![json!(Read), json!(Schedule), json!(Force)],
            vec![json!("read"), json!("schedule"), json!("force")]
        );
    }

    #[test]
    fn refresh_leased_json_is_pinned() {
        assert_pinned(
            &ConnectionEvent::RefreshLeased(RefreshLeased {
                lease_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001),
                holder: "instance-a".to_owned(),
                trigger: Schedule,
                leased_at: at(0),
                lease_expires_at: at(1),
            }),
            "RefreshLeased",
            &json!({
                "lease_id": "00000000-0000-4000-8000-000000000001",
                "holder": "instance-a",
                "trigger": "schedule",
                "leased_at": "2024-05-01T12:00:00Z",
                "lease_expires_at": "2024-05-01T12:01:00Z"
            }),
        );
    }

    #[test]
    fn tokens_refreshed_json_is_pinned() {
        assert_pinned(
            &ConnectionEvent::TokensRefreshed(TokensRefreshed {
                lease_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001),
                credentials: fixed_sealed(),
                expires_at: None,
                has_refresh_token: true,
                refresh_token_rotated: true,
                refresh_token_generation: 3,
                fingerprints: TokenFingerprints {
                    access_token: Some("fp-a2".to_owned()),
                    refresh_token: None,
                },
                refreshed_at: at(0),
            }),
            "TokensRefreshed",
            &json!({
                "lease_id": "00000000-0000-4000-8000-000000000001",
                "credentials": {
                    "key_id": "00000000-0000-4000-8000-0000000000aa",
                    "ciphertext": "bm9uY2UrY2lwaGVydGV4dA=="
                },
                "expires_at": null,
                "has_refresh_token": true,
                "refresh_token_rotated": true,
                "refresh_token_generation": 3,
                "fingerprints": {"access_token": "fp-a2", "refresh_token": null},
                "refreshed_at": "2024-05-01T12:00:00Z"
            }),
        );
    }

    #[test]
    fn refresh_failed_json_is_pinned() {
        assert_pinned(
            &ConnectionEvent::RefreshFailed(RefreshFailed {
                lease_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001),
                failure: failure(Permanent),
                failed_at: at(0),
            }),
            "RefreshFailed",
            &json!({
                "lease_id": "00000000-0000-4000-8000-000000000001",
                "failure": {
                    "class": "permanent",
                    "code": "invalid_grant",
                    "provider_status": 400,
                    "description": "refresh token revoked"
                },
                "failed_at": "2024-05-01T12:00:00Z"
            }),
        );
    }

    #[test]
    fn metadata_set_json_is_pinned() {
        assert_pinned(
            &metadata_set(json!({"team": "a", "n": 1}), MetadataMode::Merge, at(0)),
            "MetadataSet",
            &json!({
                "metadata": {"team": "a", "n": 1},
                "mode": "merge",
                "set_at": "2024-05-01T12:00:00Z"
            }),
        );
    }

    #[test]
    fn connection_deleted_json_is_pinned() {
        assert_pinned(
            &deleted(
                vec![Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_00aa)],
                at(0),
            ),
            "ConnectionDeleted",
            &json!({
                "deleted_at": "2024-05-01T12:00:00Z",
                "shredded_data_keys": ["00000000-0000-4000-8000-0000000000aa"]
            }),
        );
    }

    #[test]
    fn decoding_an_unknown_type_or_version_is_unknown() {
        assert_eq!(
            ConnectionEvent::decode("ConnectionRenamed", 1, &json!({})),
            Err(DecodeError::Unknown {
                event_type: "ConnectionRenamed".to_owned(),
                event_version: 1
            })
        );
        let payload = fixed_authorized().to_payload();
        assert_eq!(
            ConnectionEvent::decode("ConnectionAuthorized", 2, &payload),
            Err(DecodeError::Unknown {
                event_type: "ConnectionAuthorized".to_owned(),
                event_version: 2
            })
        );
    }

    #[test]
    fn decoding_a_payload_without_a_required_field_is_malformed() {
        let mut payload = fixed_authorized().to_payload();
        payload.as_object_mut().unwrap().remove("generation");
        let error = ConnectionEvent::decode("ConnectionAuthorized", 1, &payload).unwrap_err();
        let DecodeError::Malformed { event_type, reason } = error else {
            panic!("expected Malformed, got {error:?}");
        };
        assert_eq!(event_type, "ConnectionAuthorized");
        assert!(reason.contains("generation"), "{reason}");
    }

    #[test]
    fn decoding_metadata_that_is_not_an_object_is_malformed() {
        let payload = json!({"metadata": [1], "mode": "replace", "set_at": "2024-05-01T12:00:00Z"});
        assert!(matches!(
            ConnectionEvent::decode("MetadataSet", 1, &payload),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn decoding_a_payload_without_fingerprints_defaults_them() {
        let mut payload = fixed_authorized().to_payload();
        payload.as_object_mut().unwrap().remove("fingerprints");
        let ConnectionEvent::ConnectionAuthorized(event) =
            ConnectionEvent::decode("ConnectionAuthorized", 1, &payload).unwrap()
        else {
            panic!("expected ConnectionAuthorized");
        };
        assert_eq!(event.fingerprints, TokenFingerprints::default());

        let payload = json!({
            "lease_id": "00000000-0000-4000-8000-000000000001",
            "credentials": {"key_id": "00000000-0000-4000-8000-0000000000aa", "ciphertext": ""},
            "expires_at": null,
            "has_refresh_token": false,
            "refresh_token_rotated": false,
            "refresh_token_generation": 1,
            "refreshed_at": "2024-05-01T12:00:00Z"
        });
        assert!(matches!(
            ConnectionEvent::decode("TokensRefreshed", 1, &payload),
            Ok(ConnectionEvent::TokensRefreshed(TokensRefreshed { fingerprints, .. }))
                if fingerprints == TokenFingerprints::default()
        ));
    }
}
