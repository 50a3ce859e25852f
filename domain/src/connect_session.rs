//! Connect sessions (Nango's `/connect/sessions`): a short-lived token an app's backend asks for
//! with the secret key and hands to a browser, which may then start flows for the integrations
//! the session allows, under the end user and tags the session names.
//!
//! Guarantees:
//! - A token is 256 random bits; only its SHA-256 is stored ([`token_hash`]). The token's
//!   `Debug` shows no value.
//! - A session is accepted until [`LIFETIME`] after it was made, or until it is deleted; it is
//!   not used up by a flow (Nango's rule: one session may connect several times).
//! - Its creation and deletion are events of the stream `connect_session-<id>` (never the
//!   token); a connection authorized through it names the session in its own history.
//! - [`Ownership`] (tags and end user) follows Nango's tag rules ([`check_tags`]).

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{DecodeError, DomainEvent, payload_json, read_payload};
use crate::store::{StoreError, StreamId};

/// The category of connect-session streams.
pub const CATEGORY: &str = "connect_session";

/// How long a session is accepted.
pub const LIFETIME: chrono::Duration = chrono::Duration::minutes(30);

/// What every token starts with (Nango's clients recognize it).
pub const TOKEN_PREFIX: &str = "nango_connect_session_";

/// The most tags a connection or session may carry.
pub const MAX_TAGS: usize = 10;

/// A session token: shown once, to the caller that made the session.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// A new random token.
    pub fn generate() -> Self {
        use aes_gcm::aead::rand_core::RngCore;
        let mut bytes = [0u8; 32];
        aes_gcm::aead::OsRng.fill_bytes(&mut bytes);
        Self(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
    }

    /// The token, to give to its caller.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// What is stored of a token, and what a presented token is looked up by.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` could be one this server made (anything else is not looked up).
pub fn plausible_token(token: &str) -> bool {
    token
        .strip_prefix(TOKEN_PREFIX)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An app's end user, as Nango's API describes one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct EndUser {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<Organization>,
}

/// The end user's organization.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Organization {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// Who a connection belongs to, as the app said: its tags and end user, and the connect
/// session it was authorized through.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<EndUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_session_id: Option<Uuid>,
}

impl Ownership {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.end_user.is_none() && self.connect_session_id.is_none()
    }
}

/// A session's defaults for one integration; they win over what the browser sends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ConfigDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_scopes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_params: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_config: Option<Map<String, Value>>,
}

/// The connection a reconnect session re-authorizes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reconnect {
    pub provider_config_key: String,
    pub connection_id: String,
}

/// A connect session, as stored (without its token).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnectSession {
    pub id: Uuid,
    /// The end user (with its organization) the session was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<EndUser>,
    /// The session's tags: derived from the end user, overlaid with the request's.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The integrations it may connect; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_integrations: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub integrations_config_defaults: BTreeMap<String, ConfigDefaults>,
    /// Set for a reconnect session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url_override: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl ConnectSession {
    /// Whether it may start a flow for `provider_config_key`.
    pub fn allows(&self, provider_config_key: &str) -> bool {
        self.allowed_integrations
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|k| k == provider_config_key))
    }

    /// What a connection authorized through it carries.
    pub fn ownership(&self) -> Ownership {
        Ownership {
            tags: self.tags.clone(),
            end_user: self.end_user.clone(),
            connect_session_id: Some(self.id),
        }
    }

    pub fn stream(&self) -> StreamId {
        StreamId::from_uuid(CATEGORY, self.id)
    }
}

/// Storage of connect sessions (each database backend implements it).
#[async_trait]
pub trait ConnectSessionRepository: Send + Sync {
    /// Stores a new session under the hash of its token.
    async fn create_connect_session(
        &self,
        token_hash: &[u8],
        session: &ConnectSession,
    ) -> Result<(), StoreError>;

    /// The session of this token hash, if it exists and has not expired at `now`.
    async fn connect_session(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<ConnectSession>, StoreError>;

    /// Deletes the session of this token hash; whether there was one.
    async fn delete_connect_session(&self, token_hash: &[u8]) -> Result<bool, StoreError>;

    /// Deletes the sessions expired at `now`; returns how many.
    async fn sweep_connect_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// The events of a connect session's stream. The token is never in them.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectSessionEvent {
    /// The session was made (`created_by`: the address of the caller that made it).
    Created {
        session: Box<ConnectSession>,
        created_by: Option<String>,
    },
    /// The session was deleted through its token before it expired.
    Deleted { deleted_at: DateTime<Utc> },
}

#[derive(Serialize, Deserialize)]
struct CreatedPayload {
    #[serde(flatten)]
    session: ConnectSession,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_by: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct DeletedPayload {
    deleted_at: DateTime<Utc>,
}

impl DomainEvent for ConnectSessionEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "ConnectSessionCreated",
            Self::Deleted { .. } => "ConnectSessionDeleted",
        }
    }

    fn event_version(&self) -> i16 {
        1
    }

    fn to_payload(&self) -> Value {
        match self {
            Self::Created {
                session,
                created_by,
            } => payload_json(&CreatedPayload {
                session: (**session).clone(),
                created_by: created_by.clone(),
            }),
            Self::Deleted { deleted_at } => payload_json(&DeletedPayload {
                deleted_at: *deleted_at,
            }),
        }
    }

    fn decode(event_type: &str, event_version: i16, payload: &str) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            ("ConnectSessionCreated", 1) => {
                let p: CreatedPayload = read_payload(event_type, payload)?;
                Ok(Self::Created {
                    session: Box::new(p.session),
                    created_by: p.created_by,
                })
            }
            ("ConnectSessionDeleted", 1) => {
                let p: DeletedPayload = read_payload(event_type, payload)?;
                Ok(Self::Deleted {
                    deleted_at: p.deleted_at,
                })
            }
            _ => Err(DecodeError::Unknown {
                event_type: event_type.to_owned(),
                event_version,
            }),
        }
    }
}

/// Why tags are refused (Nango's rules).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("at most {MAX_TAGS} tags are allowed")]
    TooMany,
    #[error(
        "tag key {0:?} must start with a letter and hold at most 64 letters, digits, '_', '-', '.' or '/'"
    )]
    BadKey(String),
    #[error("tag keys must be unique regardless of case: {0:?}")]
    DuplicateKey(String),
    #[error("the value of tag {0:?} must be 1 to 255 characters, none of them a control character")]
    BadValue(String),
    #[error("tag end_user_email must be an e-mail address")]
    BadEmail,
}

/// Tags as stored: keys lower-cased, checked against Nango's rules.
pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, TagError> {
    if tags.len() > MAX_TAGS {
        return Err(TagError::TooMany);
    }
    let mut checked = BTreeMap::new();
    for (key, value) in tags {
        if !valid_tag_key(key) {
            return Err(TagError::BadKey(key.clone()));
        }
        let lower = key.to_lowercase();
        if value.is_empty() || value.chars().count() > 255 || value.chars().any(char::is_control) {
            return Err(TagError::BadValue(key.clone()));
        }
        if lower == "end_user_email" && !plausible_email(value) {
            return Err(TagError::BadEmail);
        }
        if checked.insert(lower, value.clone()).is_some() {
            return Err(TagError::DuplicateKey(key.clone()));
        }
    }
    Ok(checked)
}

fn valid_tag_key(key: &str) -> bool {
    key.len() <= 64
        && key.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
}

/// An e-mail address as far as a form would check it: `local@domain.tld`, no spaces, ≥ 5
/// characters.
pub fn plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() >= 5
        && email.len() <= 320
        && !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A session's tags: those derived from the end user and organization (lowest priority first:
/// id, e-mail, display name, organization id and name, then the end user's own tags, dropped
/// whole if they would pass the limit), overlaid with `tags`.
pub fn session_tags(
    end_user: Option<&EndUser>,
    end_user_tags: &BTreeMap<String, String>,
    tags: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, TagError> {
    let mut derived = BTreeMap::new();
    let mut put = |key: &str, value: Option<&String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            derived.insert(key.to_owned(), truncate(value, 255));
        }
    };
    if let Some(user) = end_user {
        put("end_user_id", Some(&user.id));
        // An address longer than a tag value (up to 320 characters) is not cut into one that
        // is no address: it gets no tag.
        put(
            "end_user_email",
            user.email.as_ref().filter(|e| e.chars().count() <= 255),
        );
        put("end_user_display_name", user.display_name.as_ref());
        if let Some(org) = &user.organization {
            put("organization_id", Some(&org.id));
            put("organization_display_name", org.display_name.as_ref());
        }
    }
    let own: BTreeMap<String, String> = end_user_tags
        .iter()
        .map(|(k, v)| (k.to_lowercase(), truncate(v, 255)))
        .collect();
    let mut merged = derived.clone();
    merged.extend(own);
    if merged.len() > MAX_TAGS {
        merged = derived;
    }
    merged.extend(check_tags(tags)?);
    check_tags(&merged)
}

fn truncate(value: &str, chars: usize) -> String {
    value.chars().take(chars).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn tags_follow_nangos_rules() {
        assert_eq!(
            check_tags(&map(&[("Team", "Sales")])).unwrap(),
            map(&[("team", "Sales")])
        );
        for bad in ["1abc", "", "a b", "é", &"a".repeat(65)] {
            assert!(check_tags(&map(&[(bad, "v")])).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_tags(&map(&[("a", "1"), ("A", "2")])),
            Err(TagError::DuplicateKey("a".into()))
        );
        for value in ["", "a\0b", "a\nb", "\u{7f}"] {
            assert_eq!(
                check_tags(&map(&[("a", value)])),
                Err(TagError::BadValue("a".into()))
            );
        }
        assert_eq!(
            check_tags(&map(&[("end_user_email", "nope")])),
            Err(TagError::BadEmail)
        );
        let eleven: BTreeMap<_, _> = (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert_eq!(check_tags(&eleven), Err(TagError::TooMany));
    }

    #[test]
    fn a_long_e_mail_address_gets_no_tag() {
        let user = EndUser {
            id: "u1".into(),
            email: Some(format!("{}@b.co", "x".repeat(300))),
            ..EndUser::default()
        };
        let tags = session_tags(Some(&user), &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert_eq!(tags, map(&[("end_user_id", "u1")]));
    }

    #[test]
    fn session_tags_are_derived_from_the_end_user_and_overlaid() {
        let user = EndUser {
            id: "u1".into(),
            email: Some("a@b.co".into()),
            display_name: None,
            organization: Some(Organization {
                id: "o1".into(),
                display_name: None,
            }),
        };
        let tags = session_tags(
            Some(&user),
            &map(&[("Plan", "pro")]),
            &map(&[("end_user_id", "override")]),
        )
        .unwrap();
        assert_eq!(
            tags,
            map(&[
                ("end_user_id", "override"),
                ("end_user_email", "a@b.co"),
                ("organization_id", "o1"),
                ("plan", "pro"),
            ])
        );
    }

    #[test]
    fn connect_session_events_json_is_pinned() {
        use crate::scenario::{assert_pinned, assert_unknown, at};
        use serde_json::json;
        let session = ConnectSession {
            id: Uuid::from_u128(7),
            end_user: Some(EndUser {
                id: "u1".into(),
                email: None,
                display_name: Some("Ann".into()),
                organization: None,
            }),
            tags: map(&[("end_user_id", "u1")]),
            allowed_integrations: Some(vec!["github".into()]),
            integrations_config_defaults: BTreeMap::new(),
            reconnect: None,
            webhook_url_override: None,
            created_at: at(0),
            expires_at: at(30),
        };
        assert_pinned(
            &ConnectSessionEvent::Created {
                session: Box::new(session),
                created_by: Some("127.0.0.1".into()),
            },
            "ConnectSessionCreated",
            &json!({
                "id": "00000000-0000-0000-0000-000000000007",
                "end_user": {"id": "u1", "display_name": "Ann"},
                "tags": {"end_user_id": "u1"},
                "allowed_integrations": ["github"],
                "created_at": "2024-05-01T12:00:00Z",
                "expires_at": "2024-05-01T12:30:00Z",
                "created_by": "127.0.0.1"
            }),
        );
        assert_pinned(
            &ConnectSessionEvent::Deleted { deleted_at: at(1) },
            "ConnectSessionDeleted",
            &json!({"deleted_at": "2024-05-01T12:01:00Z"}),
        );
        assert_unknown::<ConnectSessionEvent>("ConnectSessionCreated", 2, &json!({}));
    }

    #[test]
    fn tokens_are_random_prefixed_and_redacted() {
        let (a, b) = (SessionToken::generate(), SessionToken::generate());
        assert_ne!(a, b);
        assert!(plausible_token(a.expose()));
        assert!(!plausible_token("nango_connect_session_xyz"));
        assert!(!format!("{a:?}").contains(&a.expose()[TOKEN_PREFIX.len()..]));
        assert_eq!(token_hash(a.expose()).len(), 32);
    }
}
