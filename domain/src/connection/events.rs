//! A connection's events and their stored form: a stable `event_type` per variant, version 1
//! payloads as JSON, pinned by the tests below.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::connect_session::Ownership;
use crate::event::{DecodeError, DomainEvent, payload_json, read_payload};
use crate::keys::Sealed;

const EVENT_VERSION: i16 = 1;
const CONNECTION_AUTHORIZED: &str = "ConnectionAuthorized";
const REFRESH_LEASED: &str = "RefreshLeased";
const TOKENS_REFRESHED: &str = "TokensRefreshed";
const REFRESH_FAILED: &str = "RefreshFailed";
const METADATA_SET: &str = "MetadataSet";
const OWNERSHIP_SET: &str = "OwnershipSet";
const CONNECTION_DELETED: &str = "ConnectionDeleted";

/// Whether `event` (of a connection stream) is an authorization: credentials set by a flow or
/// an import, which the ones after it are refreshed from.
pub fn is_authorization(event: &crate::store::RecordedEvent) -> bool {
    event.event_type == CONNECTION_AUTHORIZED
}

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
    /// Credentials the user entered (an API key, a username and password), through a connect
    /// session or the public key.
    Form,
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
    /// An OAuth 2 client-credentials token.
    #[serde(rename = "OAUTH2_CC")]
    Oauth2Cc,
}

impl CredentialsType {
    /// The API's spelling: `OAUTH2`, `API_KEY`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oauth2 => "OAUTH2",
            Self::Oauth1 => "OAUTH1",
            Self::ApiKey => "API_KEY",
            Self::Basic => "BASIC",
            Self::Oauth2Cc => "OAUTH2_CC",
        }
    }
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
    /// The provider rejected the token (HTTP 401 to a proxied call) before it expired: refreshed
    /// unless someone renewed it since it was read.
    Rejected,
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

/// What an authorization records, whatever generation it becomes: the connection, where its
/// credentials came from, and the credentials themselves, sealed. Asked for by
/// `ConnectionCommand::Authorize`; its fields stand flat in the `ConnectionAuthorized` payload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Authorization {
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
    /// The data key of the new generation.
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
    /// Tags, end user and connect session, when the authorization came through a session
    /// (empty: the connection keeps what it had).
    #[serde(default, skip_serializing_if = "Ownership::is_empty")]
    pub ownership: Box<Ownership>,
}

/// The connection was authorized (first time, again, or again after a deletion).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnectionAuthorized {
    /// The connection and its new credentials.
    #[serde(flatten)]
    pub authorization: Authorization,
    /// 1 for the first authorization, previous + 1 for every later one.
    pub generation: u32,
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

/// The connection's tags and end user were replaced (`PATCH /connections/:id`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OwnershipSet {
    /// What the connection carries from now on.
    #[serde(flatten)]
    pub ownership: Ownership,
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
    /// See [`OwnershipSet`].
    OwnershipSet(Box<OwnershipSet>),
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
            Self::OwnershipSet(_) => OWNERSHIP_SET,
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
            Self::OwnershipSet(payload) => payload_json(payload),
            Self::ConnectionDeleted(payload) => payload_json(payload),
        }
    }

    fn decode(event_type: &str, event_version: i16, payload: &str) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            (CONNECTION_AUTHORIZED, 1) => {
                read_payload(event_type, payload).map(Self::ConnectionAuthorized)
            }
            (REFRESH_LEASED, 1) => read_payload(event_type, payload).map(Self::RefreshLeased),
            (TOKENS_REFRESHED, 1) => read_payload(event_type, payload).map(Self::TokensRefreshed),
            (REFRESH_FAILED, 1) => read_payload(event_type, payload).map(Self::RefreshFailed),
            (METADATA_SET, 1) => {
                let event: MetadataSet = read_payload(event_type, payload)?;
                if !event.metadata.is_object() {
                    return Err(DecodeError::Malformed {
                        event_type: event_type.to_owned(),
                        reason: "metadata is not a JSON object".to_owned(),
                    });
                }
                Ok(Self::MetadataSet(event))
            }
            (OWNERSHIP_SET, 1) => read_payload(event_type, payload)
                .map(Box::new)
                .map(Self::OwnershipSet),
            (CONNECTION_DELETED, 1) => {
                read_payload(event_type, payload).map(Self::ConnectionDeleted)
            }
            _ => Err(DecodeError::Unknown {
                event_type: event_type.to_owned(),
                event_version,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connection::fixtures::*;
    use crate::scenario::{assert_malformed_without, assert_pinned, assert_unknown, at};

    use FailureClass::Permanent;
    use RefreshTrigger::{Force, Read, Schedule};

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
            authorization: Authorization {
                ownership: Default::default(),
                provider_config_key: "github-prod".to_owned(),
                connection_id: "user-1".to_owned(),
                provider: "github".to_owned(),
                flow: Flow::Oauth2,
                credentials_type: CredentialsType::Oauth2,
                data_key_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_00aa),
                credentials: fixed_sealed(),
                has_refresh_token: true,
                expires_at: Some(at(60)),
                scopes: vec!["repo".to_owned(), "user".to_owned()],
                connection_config,
                fingerprints: fingerprints("fp-a", "fp-r"),
            },
            generation: 2,
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
            json!([Flow::Oauth2, Flow::Oauth1, Flow::Import]),
            json!(["oauth2", "oauth1", "import"])
        );
        assert_eq!(
            json!([
                CredentialsType::Oauth2,
                CredentialsType::Oauth1,
                CredentialsType::ApiKey,
                CredentialsType::Basic
            ]),
            json!(["OAUTH2", "OAUTH1", "API_KEY", "BASIC"])
        );
        assert_eq!(
            json!([Read, Schedule, Force]),
            json!(["read", "schedule", "force"])
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
        assert_unknown::<ConnectionEvent>("ConnectionRenamed", 1, &json!({}));
        assert_unknown::<ConnectionEvent>(
            "ConnectionAuthorized",
            2,
            &fixed_authorized().to_payload(),
        );
    }

    #[test]
    fn decoding_a_payload_without_a_required_field_is_malformed() {
        assert_malformed_without(&fixed_authorized(), "ConnectionAuthorized", "generation");
    }

    #[test]
    fn decoding_metadata_that_is_not_an_object_is_malformed() {
        let payload = json!({"metadata": [1], "mode": "replace", "set_at": "2024-05-01T12:00:00Z"});
        assert!(matches!(
            ConnectionEvent::decode("MetadataSet", 1, &payload.to_string()),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn decoding_a_payload_without_fingerprints_defaults_them() {
        let mut payload = fixed_authorized().to_payload();
        payload.as_object_mut().unwrap().remove("fingerprints");
        let ConnectionEvent::ConnectionAuthorized(event) =
            ConnectionEvent::decode("ConnectionAuthorized", 1, &payload.to_string()).unwrap()
        else {
            panic!("expected ConnectionAuthorized");
        };
        assert_eq!(
            event.authorization.fingerprints,
            TokenFingerprints::default()
        );

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
            ConnectionEvent::decode("TokensRefreshed", 1, &payload.to_string()),
            Ok(ConnectionEvent::TokensRefreshed(TokensRefreshed { fingerprints, .. }))
                if fingerprints == TokenFingerprints::default()
        ));
    }
}
