//! Plaintext secrets: a connection's credentials and an integration's client secret.
//!
//! These are what the vault seals into events; outside a sealed value they live only in memory,
//! between a provider (or an import) and the vault, or between the vault and an API answer.
//! Their `Debug` is written by hand and names the kind of secret, never its value, so a secret
//! that reaches a log line or an error through `{:?}` shows as `<redacted>`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bounds::{JsonBounds, in_range};
use crate::connection::{ConnectionRejected, CredentialsType};

mod stored;

const REDACTED: &str = "<redacted>";

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A connection's credentials, tagged by `type` with the Nango API's names (`OAUTH2`, `OAUTH1`,
/// `API_KEY`, `BASIC`). Its `Debug` shows no secret. Serialized, it is the form that gets sealed
/// (`credentials/stored.rs`): no empty fields, and no second copy of a token inside `raw`.
#[derive(Deserialize, Clone, PartialEq)]
#[serde(tag = "type", try_from = "stored::CredentialsFields")]
pub enum Credentials {
    /// OAuth 2 tokens.
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        /// The bearer token.
        access_token: String,
        /// The token to get a new access token with, if the provider gave one.
        #[serde(default)]
        refresh_token: Option<String>,
        /// When the access token expires, if known.
        #[serde(default)]
        expires_at: Option<DateTime<Utc>>,
        /// The provider's whole token response (it contains the tokens too).
        #[serde(default = "empty_object")]
        raw: Value,
    },
    /// OAuth 1.0a token credentials.
    #[serde(rename = "OAUTH1")]
    OAuth1 {
        /// The token.
        oauth_token: String,
        /// The token secret.
        oauth_token_secret: String,
        /// The provider's whole token response.
        #[serde(default = "empty_object")]
        raw: Value,
    },
    /// A static API key.
    #[serde(rename = "API_KEY")]
    ApiKey {
        /// The key.
        api_key: String,
    },
    /// A username and password.
    #[serde(rename = "BASIC")]
    Basic {
        /// The username.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth 2 client-credentials grant: the token, and the client credentials that get
    /// the next one (there is no refresh token).
    #[serde(rename = "OAUTH2_CC")]
    OAuth2Cc {
        /// The bearer token.
        token: String,
        client_id: String,
        /// Empty when the client authenticates with a certificate or key only.
        client_secret: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_certificate: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_private_key: Option<String>,
        /// When the token expires, if known.
        #[serde(default)]
        expires_at: Option<DateTime<Utc>>,
        /// The provider's whole token response.
        #[serde(default = "empty_object")]
        raw: Value,
    },
}

/// Overwrites the strings of `value` (object keys included) with zeros and empties it.
fn wipe_value(value: &mut Value) {
    use zeroize::Zeroize;
    match value {
        Value::String(text) => text.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe_value),
        Value::Object(members) => {
            for (mut name, mut member) in std::mem::take(members) {
                name.zeroize();
                wipe_value(&mut member);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    *value = Value::Null;
}

pub(crate) fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

impl Credentials {
    /// Overwrites every secret held here with zeros, in place (the keys and strings of `raw`
    /// too), before the memory is given back. What is left is empty.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        match self {
            Self::OAuth2 {
                access_token,
                refresh_token,
                raw,
                ..
            } => {
                access_token.zeroize();
                refresh_token.zeroize();
                wipe_value(raw);
            }
            Self::OAuth1 {
                oauth_token,
                oauth_token_secret,
                raw,
            } => {
                oauth_token.zeroize();
                oauth_token_secret.zeroize();
                wipe_value(raw);
            }
            Self::ApiKey { api_key } => api_key.zeroize(),
            Self::Basic { username, password } => {
                username.zeroize();
                password.zeroize();
            }
            Self::OAuth2Cc {
                token,
                client_id,
                client_secret,
                client_certificate,
                client_private_key,
                raw,
                ..
            } => {
                token.zeroize();
                client_id.zeroize();
                client_secret.zeroize();
                client_certificate.zeroize();
                client_private_key.zeroize();
                wipe_value(raw);
            }
        }
    }

    /// The provider's whole answer, for the kinds that keep one.
    fn raw(&self) -> Option<&Value> {
        match self {
            Self::OAuth2 { raw, .. } | Self::OAuth1 { raw, .. } | Self::OAuth2Cc { raw, .. } => {
                Some(raw)
            }
            Self::ApiKey { .. } | Self::Basic { .. } => None,
        }
    }

    /// Checks what a client or provider chose here against the log's bounds: the raw answer
    /// against [`JsonBounds::CLIENT`], the expiry against [`crate::bounds::TimeRange`].
    pub fn check_bounds(&self) -> Result<(), ConnectionRejected> {
        if let Some(raw) = self.raw() {
            JsonBounds::CLIENT
                .check(raw)
                .map_err(|reason| ConnectionRejected::OutOfBounds {
                    field: "raw",
                    reason,
                })?;
        }
        in_range(self.expires_at()).map_err(|reason| ConnectionRejected::TimeOutOfRange {
            field: "expires_at",
            reason,
        })
    }

    /// The kind of credentials, as events and the API name it.
    pub fn credentials_type(&self) -> CredentialsType {
        match self {
            Self::OAuth2 { .. } => CredentialsType::Oauth2,
            Self::OAuth1 { .. } => CredentialsType::Oauth1,
            Self::ApiKey { .. } => CredentialsType::ApiKey,
            Self::Basic { .. } => CredentialsType::Basic,
            Self::OAuth2Cc { .. } => CredentialsType::Oauth2Cc,
        }
    }

    /// The token that authenticates requests: the OAuth 2 access token (or client-credentials
    /// token) or the OAuth 1 `oauth_token`. `None` for an API key or basic credentials.
    pub fn access_token(&self) -> Option<&str> {
        match self {
            Self::OAuth2 { access_token, .. } => Some(access_token),
            Self::OAuth2Cc { token, .. } => Some(token),
            Self::OAuth1 { oauth_token, .. } => Some(oauth_token),
            Self::ApiKey { .. } | Self::Basic { .. } => None,
        }
    }

    /// The OAuth 2 refresh token, if there is a non-empty one.
    pub fn refresh_token(&self) -> Option<&str> {
        match self {
            Self::OAuth2 {
                refresh_token: Some(token),
                ..
            } if !token.is_empty() => Some(token),
            _ => None,
        }
    }

    /// Whether the credentials can be refreshed.
    pub fn has_refresh_token(&self) -> bool {
        self.refresh_token().is_some()
    }

    /// When the OAuth 2 access token expires, if known.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::OAuth2 { expires_at, .. } | Self::OAuth2Cc { expires_at, .. } => *expires_at,
            Self::OAuth1 { .. } | Self::ApiKey { .. } | Self::Basic { .. } => None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the shape: which fields are present and when the token expires, never a value.
        let redacted = &Redacted;
        match self {
            Self::OAuth2 {
                refresh_token,
                expires_at,
                ..
            } => f
                .debug_struct("Credentials::OAuth2")
                .field("access_token", redacted)
                .field("refresh_token", &refresh_token.as_ref().map(|_| Redacted))
                .field("expires_at", expires_at)
                .field("raw", redacted)
                .finish(),
            Self::OAuth1 { .. } => f
                .debug_struct("Credentials::OAuth1")
                .field("oauth_token", redacted)
                .field("oauth_token_secret", redacted)
                .field("raw", redacted)
                .finish(),
            Self::ApiKey { .. } => f
                .debug_struct("Credentials::ApiKey")
                .field("api_key", redacted)
                .finish(),
            Self::Basic { .. } => f
                .debug_struct("Credentials::Basic")
                .field("username", redacted)
                .field("password", redacted)
                .finish(),
            Self::OAuth2Cc { expires_at, .. } => f
                .debug_struct("Credentials::OAuth2Cc")
                .field("token", redacted)
                .field("client_id", redacted)
                .field("client_secret", redacted)
                .field("expires_at", expires_at)
                .field("raw", redacted)
                .finish(),
        }
    }
}

/// An integration's OAuth client secret. Its `Debug` shows no secret.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// Wraps a client secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the token request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientSecret({REDACTED})")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wiping_leaves_no_secret_behind() {
        let mut oauth2 = Credentials::OAuth2 {
            access_token: "gho_SECRET".into(),
            refresh_token: Some("ghr_SECRET".into()),
            expires_at: None,
            raw: json!({"access_token": "gho_SECRET", "nested": [{"id_token": "SECRET"}]}),
        };
        oauth2.wipe();
        let text = serde_json::to_string(&oauth2).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let mut cc = Credentials::OAuth2Cc {
            token: "SECRET".into(),
            client_id: "id".into(),
            client_secret: "SECRET".into(),
            client_certificate: None,
            client_private_key: Some("-----BEGIN PRIVATE KEY----- SECRET".into()),
            expires_at: None,
            raw: json!({}),
        };
        cc.wipe();
        let text = serde_json::to_string(&cc).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
    }

    const SECRETS: [&str; 8] = [
        "access-SECRET-1",
        "refresh-SECRET-2",
        "raw-SECRET-3",
        "token-SECRET-4",
        "token-secret-SECRET-5",
        "api-key-SECRET-6",
        "user-SECRET-7",
        "password-SECRET-8",
    ];

    fn every_kind() -> Vec<Credentials> {
        vec![
            Credentials::OAuth2 {
                access_token: SECRETS[0].to_owned(),
                refresh_token: Some(SECRETS[1].to_owned()),
                expires_at: DateTime::from_timestamp(1_714_564_800, 0),
                raw: json!({ "id_token": SECRETS[2] }),
            },
            Credentials::OAuth1 {
                oauth_token: SECRETS[3].to_owned(),
                oauth_token_secret: SECRETS[4].to_owned(),
                raw: json!({ "extra": SECRETS[2] }),
            },
            Credentials::ApiKey {
                api_key: SECRETS[5].to_owned(),
            },
            Credentials::Basic {
                username: SECRETS[6].to_owned(),
                password: SECRETS[7].to_owned(),
            },
            Credentials::OAuth2Cc {
                token: SECRETS[0].to_owned(),
                client_id: SECRETS[6].to_owned(),
                client_secret: SECRETS[7].to_owned(),
                client_certificate: None,
                client_private_key: Some(SECRETS[4].to_owned()),
                expires_at: DateTime::from_timestamp(1_714_564_800, 0),
                raw: json!({ "access_token": SECRETS[0] }),
            },
        ]
    }

    #[test]
    fn debug_output_names_the_kind_and_shows_no_secret() {
        for credentials in every_kind() {
            for debug in [format!("{credentials:?}"), format!("{credentials:#?}")] {
                assert!(debug.starts_with("Credentials::"), "{debug}");
                assert!(debug.contains(REDACTED), "{debug}");
                assert!(!debug.contains("SECRET"), "a secret in {debug}");
            }
        }
        let oauth2 = format!("{:?}", every_kind()[0]);
        assert!(oauth2.contains("2024-05-01T12:00:00Z"), "{oauth2}");
    }

    #[test]
    fn a_client_secret_debugs_as_redacted_and_serializes_as_a_plain_string() {
        let secret = ClientSecret::new("client-SECRET");
        assert_eq!(format!("{secret:?}"), "ClientSecret(<redacted>)");
        assert_eq!(
            serde_json::to_value(&secret).unwrap(),
            json!("client-SECRET")
        );
        assert_eq!(
            serde_json::from_value::<ClientSecret>(json!("client-SECRET")).unwrap(),
            secret
        );
        assert_eq!(secret.expose(), "client-SECRET");
    }

    #[test]
    fn credentials_serialize_tagged_with_the_nango_type_names() {
        let kinds: Vec<Value> = every_kind()
            .iter()
            .map(|c| serde_json::to_value(c).unwrap()["type"].clone())
            .collect();
        assert_eq!(
            json!(kinds),
            json!(["OAUTH2", "OAUTH1", "API_KEY", "BASIC", "OAUTH2_CC"])
        );
        assert_eq!(
            serde_json::to_value(&every_kind()[0]).unwrap(),
            json!({
                "type": "OAUTH2",
                "access_token": SECRETS[0],
                "refresh_token": SECRETS[1],
                "expires_at": "2024-05-01T12:00:00Z",
                "raw": { "id_token": SECRETS[2] }
            })
        );
        for credentials in every_kind() {
            let json = serde_json::to_value(&credentials).unwrap();
            assert_eq!(
                serde_json::from_value::<Credentials>(json).unwrap(),
                credentials
            );
        }
    }

    #[test]
    fn optional_oauth2_fields_default_when_absent() {
        let credentials: Credentials =
            serde_json::from_value(json!({ "type": "OAUTH2", "access_token": "a" })).unwrap();
        assert_eq!(
            credentials,
            Credentials::OAuth2 {
                access_token: "a".to_owned(),
                refresh_token: None,
                expires_at: None,
                raw: json!({}),
            }
        );
    }

    #[test]
    fn helpers_read_the_tokens_of_each_kind() {
        let [oauth2, oauth1, api_key, basic, cc] = every_kind().try_into().unwrap();
        assert_eq!(cc.credentials_type(), CredentialsType::Oauth2Cc);
        assert_eq!(cc.access_token(), Some(SECRETS[0]));
        assert!(!cc.has_refresh_token());
        assert!(cc.expires_at().is_some());
        assert_eq!(oauth2.credentials_type(), CredentialsType::Oauth2);
        assert_eq!(oauth2.access_token(), Some(SECRETS[0]));
        assert_eq!(oauth2.refresh_token(), Some(SECRETS[1]));
        assert!(oauth2.has_refresh_token());
        assert!(oauth2.expires_at().is_some());

        assert_eq!(oauth1.credentials_type(), CredentialsType::Oauth1);
        assert_eq!(oauth1.access_token(), Some(SECRETS[3]));
        assert_eq!(oauth1.refresh_token(), None);
        assert!(!oauth1.has_refresh_token());

        for (other, kind) in [
            (api_key, CredentialsType::ApiKey),
            (basic, CredentialsType::Basic),
        ] {
            assert_eq!(other.credentials_type(), kind);
            assert_eq!(other.access_token(), None);
            assert_eq!(other.refresh_token(), None);
            assert_eq!(other.expires_at(), None);
        }

        let empty_refresh = Credentials::OAuth2 {
            access_token: "a".to_owned(),
            refresh_token: Some(String::new()),
            expires_at: None,
            raw: json!({}),
        };
        assert!(!empty_refresh.has_refresh_token());
    }
}
