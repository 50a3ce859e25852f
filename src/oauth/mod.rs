//! OAuth flows (DESIGN §5, §6): `/oauth/connect` sends the user to the provider, and
//! `/oauth/callback` exchanges the code for tokens and records the connection.
//!
//! Rooms: [`connect`] starts a flow, [`callback`] finishes it, [`redirect`] decides where the
//! browser goes afterwards, [`signature`] signs and checks what the app and Grantline exchange,
//! [`report`] tells the flow's WebSocket client, and [`error`] says why a flow failed.
//!
//! Guarantees:
//! - The `state` is 256 random bits, URL-safe, stored with the flow in `oauth_sessions`, accepted
//!   once ([`domain::oauth_session::SessionRepository::take_session`]) and only until it
//!   expires; expired sessions are also swept ([`workers::sessions`]).
//! - PKCE S256 is used unless the template disables it; the verifier (and, for OAuth 1.0a, the
//!   request token's secret) is stored sealed under a data key owned by [`SESSION_KEY_OWNER`].
//! - OAuth 1.0a (HMAC-SHA1 or PLAINTEXT) gets its request token at connect, carries the state
//!   in its callback URL, and checks that the callback's `oauth_token` is the flow's.
//! - The `redirect_uri` is always `GRANTLINE_SERVER_URL/oauth/callback`, and the token request
//!   repeats the one the session was started with.
//! - `api_redirect_url` is used only when its origin is on `GRANTLINE_REDIRECT_ALLOWLIST`; any
//!   other value fails the flow at connect, before anything is stored, and is never redirected
//!   to.
//! - A success is reported only after the authorization is in the log and in the read model, so
//!   the very next `GET /connection` sees the provider's tokens.
//! - No secret (client secret, code, verifier, token) appears in a [`FlowError`]'s message.

mod callback;
mod connect;
mod error;
mod form;
mod redirect;
mod report;
mod signature;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use domain::catalog::{self, Template};
use domain::keys::KeyError;
use domain::oauth_session::SESSION_KEY_OWNER;
use domain::store::StreamId;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value};
use uuid::Uuid;
use workers::provider::ProviderClient;

pub use callback::callback;
pub use connect::{BindingCookie, ConnectRequest, Started, connect};
pub use error::FlowError;
pub use form::{Entered, authorize_with};
pub use redirect::{error_redirect, success_redirect};
pub use report::{Completed, Failure, Report, SocketMessage, report_failure, report_success};

use crate::state::AppState;

/// The flow machinery the handlers share: the provider client and the sealing key of sessions.
#[derive(Debug)]
pub struct Flows {
    provider: ProviderClient,
    session_key: tokio::sync::OnceCell<Uuid>,
    /// Flows each client address may start (`GRANTLINE_FLOWS_PER_MINUTE`).
    starts: DefaultKeyedRateLimiter<IpAddr>,
}

impl Flows {
    /// Flows whose token requests end within `provider_timeout`, `per_minute` of them started
    /// by any one client address.
    pub fn new(provider_timeout: Duration, per_minute: usize) -> anyhow::Result<Self> {
        let per_minute = u32::try_from(per_minute)
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            provider: ProviderClient::new(provider_timeout)?,
            session_key: tokio::sync::OnceCell::new(),
            starts: RateLimiter::keyed(Quota::per_minute(per_minute)),
        })
    }

    /// Whether `client` may start one more flow now (counted when it may).
    fn may_start(&self, client: IpAddr) -> bool {
        // Clients that have not come back for a minute are forgotten.
        if self.starts.len() > 10_000 {
            self.starts.retain_recent();
        }
        self.starts
            .check_key(&crate::server::client_key(client))
            .is_ok()
    }

    /// The data key that seals flow secrets: made once per process, on the first flow.
    async fn session_key(&self, state: &AppState) -> Result<Uuid, KeyError> {
        self.session_key
            .get_or_try_init(|| async {
                state
                    .commands
                    .vault()
                    .create_data_key(&StreamId::from_raw(SESSION_KEY_OWNER))
                    .await
            })
            .await
            .copied()
    }
}

/// The template named `provider`.
fn flow_template<'a>(state: &'a AppState, provider: &str) -> Result<&'a Template, FlowError> {
    state
        .catalog
        .get(provider)
        .ok_or_else(|| FlowError::UnknownTemplate(provider.to_owned()))
}

/// A template URL filled from the connection config.
fn fill_url(url: &str, params: &BTreeMap<String, String>) -> Result<String, FlowError> {
    catalog::interpolate_url(url, params).map_err(|e| FlowError::UrlParam(e.to_string()))
}

/// The text of `name` in a provider's answer; empty when it is missing or not text.
fn text_field(answer: &Map<String, Value>, name: &str) -> String {
    answer
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A template's parameters as the pairs of a request.
fn pairs(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
