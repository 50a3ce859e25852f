//! OAuth flow sessions: what `/oauth/connect` remembers for `/oauth/callback`.
//!
//! A session is keyed by the random `state` sent to the provider and lives in the
//! `oauth_sessions` table (both backends), outside the event log: it is transient, and nothing
//! about it needs an audit trail until the connection it produces is authorized.
//!
//! Guarantees every [`SessionRepository`] keeps:
//! - [`SessionRepository::take_session`] deletes and returns the row in one statement, so a
//!   state is single-use even when two callbacks carry it at the same moment: exactly one of them
//!   gets the session.
//! - An expired session is still taken (and so consumed) by a callback; refusing it is the
//!   caller's decision, with [`FlowSession::is_expired`]. [`SessionRepository::sweep_sessions`]
//!   deletes the expired rows nobody came back for.
//! - The flow's secrets ([`FlowSecrets`]) are stored only sealed, as [`Sealed`].

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::connect_session::Ownership;
use crate::keys::Sealed;
use crate::store::StoreError;

/// The name of the cookie that binds the flow with `state` to the browser that started it: one
/// per flow (a browser may run several at once), named by a digest of the state, never the
/// state itself.
pub fn binding_cookie_name(state: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(state.as_bytes());
    format!("grantline_flow_{}", hex::encode(&digest[..8]))
}

/// The owner of the data key that seals flow secrets; no stream is named like this.
pub const SESSION_KEY_OWNER: &str = "system-oauth-sessions";

/// One OAuth flow between the redirect to the provider and the callback. Its `Debug` leaves out
/// the state, which works as a single-use bearer token until the callback.
#[derive(Clone, PartialEq)]
pub struct FlowSession {
    /// The random, URL-safe `state` parameter; the row's key.
    pub state: String,
    /// The integration's key.
    pub provider_config_key: String,
    /// The provider template's name at the time of the redirect.
    pub provider: String,
    /// The connection the flow creates or re-authorizes.
    pub connection_id: String,
    /// The `redirect_uri` sent to the provider, which the token request must repeat.
    pub callback_url: String,
    /// Connection configuration from the connect request's `params[...]`.
    pub connection_config: Map<String, Value>,
    /// The scopes requested.
    pub scopes: Vec<String>,
    /// Where to send the outcome, already checked against the allow-list.
    pub api_redirect_url: Option<String>,
    /// The WebSocket client to notify of the outcome.
    pub ws_client_id: Option<String>,
    /// The flow's secrets ([`FlowSecrets`] as JSON), sealed; `None` when there are none.
    pub secrets: Option<Sealed>,
    /// When the flow started.
    pub created_at: DateTime<Utc>,
    /// When the state stops being accepted.
    pub expires_at: DateTime<Utc>,
    /// Tags, end user and connect session of a flow started with a session token.
    pub ownership: Option<Ownership>,
    /// The flow may create its connection but not replace an existing one (started with only
    /// the public key).
    pub only_new: bool,
    /// The flow re-authorizes its connection (a reconnect session) and may not create it: one
    /// deleted while the user was at the provider stays deleted.
    pub only_existing: bool,
}

impl FlowSession {
    /// Whether the state is no longer accepted at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

impl fmt::Debug for FlowSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowSession")
            .field("state", &"<redacted>")
            .field("provider_config_key", &self.provider_config_key)
            .field("provider", &self.provider)
            .field("connection_id", &self.connection_id)
            .field("callback_url", &self.callback_url)
            .field("scopes", &self.scopes)
            .field("api_redirect_url", &self.api_redirect_url)
            .field("ws_client_id", &self.ws_client_id)
            .field("secrets", &self.secrets)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("ownership", &self.ownership)
            .field("only_new", &self.only_new)
            .field("only_existing", &self.only_existing)
            .finish_non_exhaustive()
    }
}

/// The plaintext secrets of a flow, sealed into [`FlowSession::secrets`]: the PKCE verifier of
/// an OAuth 2.0 flow, the request token and its secret of an OAuth 1.0a flow. Its `Debug` shows
/// no value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSecrets {
    /// The PKCE `code_verifier`, when the flow uses PKCE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_verifier: Option<String>,
    /// The OAuth 1.0a request token (temporary credentials), to match the callback's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_token: Option<String>,
    /// The OAuth 1.0a request token's secret, which signs the access-token request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_token_secret: Option<String>,
    /// The value of the cookie set on the browser that started the flow; the callback must
    /// come with it. (Absent in sessions stored before flows were bound to their browser.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_binding: Option<String>,
}

impl fmt::Debug for FlowSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("FlowSecrets")
            .field("code_verifier", &redacted(&self.code_verifier))
            .field("request_token", &redacted(&self.request_token))
            .field(
                "request_token_secret",
                &redacted(&self.request_token_secret),
            )
            .field("browser_binding", &redacted(&self.browser_binding))
            .finish()
    }
}

/// Storage of flow sessions (each database backend implements it).
#[async_trait]
pub trait SessionRepository: Send + Sync {
    /// Stores a new session. A state that exists already is an error (states are random, so
    /// this does not happen by chance).
    async fn create_session(&self, session: &FlowSession) -> Result<(), StoreError>;

    /// The session with this state, left in place; `None` if there is none.
    async fn find_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError>;

    /// Deletes the session with this state and returns it, in one statement; `None` if there is
    /// none (never created, already taken, or swept).
    async fn take_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError>;

    /// Deletes the sessions expired at `now`; returns how many.
    async fn sweep_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// How many sessions are still open at `now`.
    async fn open_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}
