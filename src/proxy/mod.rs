//! `/proxy/*`: a call to the provider's API with the connection's credential put in by the
//! server (README, "The proxy").
//!
//! - The token is fresh before the call (the read path's refresh-on-read).
//! - An upstream 401 is taken as evidence that the token died early: the connection is
//!   refreshed through the fence unless someone renewed it since it was read
//!   ([`connections::after_rejection`]), and the call is sent once more with the new token. Any
//!   number of calls that saw the same token rejected cause one provider refresh.
//! - Network errors, 5xx, 429 and the caller's `Retry-On` statuses are retried up to `Retries`
//!   times, after `Retry-After` or an exponential backoff with jitter, all within
//!   `GRANTLINE_PROXY_TIMEOUT`.
//! - Bodies stream both ways; a request body small enough to keep (at most 1 MiB) is kept so
//!   that it can be sent again. An OAuth 1.0a call's form body is always kept (up to 1 MiB),
//!   since its parameters are signed.
//! - A host the caller chose is checked where the connection is made ([`guard`]); redirects
//!   are followed by the proxy itself ([`redirect`]); `Decompress: true` decodes the answer
//!   ([`decompress`]).

mod clients;
mod decompress;
mod guard;
mod redirect;
mod stats;
mod upstream;

use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode};
use bytes::Bytes;
use chrono::Utc;
use domain::connection::ConnectionKey;

pub use self::clients::{Clients, ClientsError};
pub use self::stats::{DURATION_BUCKETS, IntegrationStats, ProxyStats};
use self::upstream::{Attempt, Target};
use crate::connections::{self, ConnectionsError};
use crate::state::AppState;

/// The largest request body the proxy takes.
pub const MAX_BODY: u64 = 100 * 1024 * 1024;
/// The largest request body kept for a second attempt; larger ones stream once.
const REPLAYABLE_BODY: u64 = 1024 * 1024;

/// A proxied call as the caller asked for it.
pub struct ProxyCall {
    pub key: ConnectionKey,
    pub method: Method,
    /// The provider's path after `/proxy`, with the query (starts with `/`).
    pub endpoint: String,
    /// Headers for the provider: the caller's `Nango-Proxy-*` (prefix removed) and
    /// `Content-Type`.
    pub headers: HeaderMap,
    pub body: Body,
    /// The body's announced length, if any.
    pub body_length: Option<u64>,
    pub retries: u32,
    pub retry_on: Vec<u16>,
    pub base_url_override: Option<String>,
    /// `Decompress`: the answer's body decoded (gzip, deflate).
    pub decompress: bool,
    /// `Forward-Headers-On-Redirect`: the credential sent again on a redirect to the same host.
    pub forward_headers_on_redirect: bool,
    /// Sent to the provider as `X-Request-Id`.
    pub request_id: String,
}

/// Why a proxied call got no answer from the provider.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("unknown provider config key {0:?}")]
    UnknownProviderConfig(String),
    #[error(transparent)]
    Connection(#[from] ConnectionsError),
    #[error("the provider {0:?} has no proxy base URL; send Base-Url-Override")]
    NoBaseUrl(String),
    #[error("Base-Url-Override may not name {0:?} (GRANTLINE_PROXY_ALLOWED_HOSTS)")]
    OverrideNotAllowed(String),
    #[error("{0:?} resolves to a loopback, private or link-local address")]
    BlockedDestination(String),
    #[error("the proxy does not sign {0} credentials yet")]
    UnsupportedAuthMode(&'static str),
    #[error("the upstream URL is not valid: {0}")]
    InvalidUrl(String),
    /// The connection's credential (or a template header filled from it) cannot be sent in
    /// a header: it holds control characters. Re-import or re-authorize the connection.
    #[error(
        "the connection's credentials cannot be sent: {0} would hold characters a header cannot"
    )]
    UnusableCredential(&'static str),
    #[error("the request body is larger than the proxy takes")]
    BodyTooLarge,
    #[error("the provider could not be reached")]
    Unreachable,
    #[error("the provider did not answer in time")]
    Timeout,
}

/// The proxy's HTTP clients ([`Clients`]).
pub fn client() -> Result<Clients, ClientsError> {
    Clients::new()
}

/// Sends `call` to the provider and returns its answer (status, useful headers, body streamed).
/// Its span is at DEBUG: at INFO it cost every proxied call 4.6k of 139k instructions, and the
/// request's own span already carries its id and route.
#[tracing::instrument(
    name = "proxy.call",
    level = "debug",
    skip_all,
    fields(provider_config_key = %call.key.provider_config_key(), method = %call.method)
)]
pub async fn call(state: &AppState, call: ProxyCall) -> Result<Response<Body>, ProxyError> {
    let started = Instant::now();
    let key = call.key.provider_config_key().to_owned();
    let result = send(state, call).await;
    // A key that names no integration is not counted: callers cannot add label values.
    if !matches!(result, Err(ProxyError::UnknownProviderConfig(_))) {
        state.proxy_stats.record(
            &key,
            result.as_ref().map(Response::status).ok(),
            started.elapsed(),
        );
    }
    result
}

async fn send(state: &AppState, call: ProxyCall) -> Result<Response<Body>, ProxyError> {
    let mut read_at = Utc::now();
    // From the replica: a connection of a deleted integration is not found, and its provider
    // names the template (no integration query on the hot path).
    let mut view = connections::with_credentials(state, &call.key)
        .await
        .map_err(|e| match e {
            ConnectionsError::UnknownProviderConfig(key) => ProxyError::UnknownProviderConfig(key),
            other => other.into(),
        })?;
    let provider = view.connection.connection.provider.clone();
    let template = state
        .catalog
        .get(&provider)
        .ok_or(ProxyError::NoBaseUrl(provider))?;
    let target = Target::new(
        &state.config.proxy,
        template,
        &view.connection.connection.connection_config,
        call.base_url_override.as_deref(),
        &call.endpoint,
    )?;
    let oauth1 = match &**view.credentials {
        domain::credentials::Credentials::OAuth1 { .. } => {
            Some(oauth1_signer(state, &call.key, template).await?)
        }
        _ => None,
    };
    let deadline = tokio::time::Instant::now() + state.config.proxy.timeout;
    let watch = || upstream::BreakWatch {
        stats: state.proxy_stats.clone(),
        provider_config_key: call.key.provider_config_key().to_owned(),
    };
    // An OAuth 1.0a signature covers a form body's parameters (RFC 5849 §3.4.1.3.1).
    let signs_form = oauth1.is_some() && is_form(&call.headers);
    let mut body = Some(body_of(call.body, call.body_length, signs_form).await?);
    let form: Vec<(String, String)> = match &body {
        Some(upstream::RequestBody::Kept(bytes)) if signs_form => {
            url::form_urlencoded::parse(bytes).into_owned().collect()
        }
        _ => Vec::new(),
    };
    let mut attempt = 0u32;
    let mut rejected_once = false;
    loop {
        let sending = match &body {
            Some(upstream::RequestBody::Kept(bytes)) => upstream::RequestBody::Kept(bytes.clone()),
            _ => body
                .take()
                .unwrap_or(upstream::RequestBody::Kept(Bytes::new())),
        };
        let replayable = matches!(sending, upstream::RequestBody::Kept(_));
        let outcome = Attempt {
            oauth1: oauth1.as_ref(),
            clients: &state.proxy_client,
            config: &state.config.proxy,
            target: &target,
            method: &call.method,
            headers: &call.headers,
            form: &form,
            credentials: &view.credentials,
            template,
            connection_config: &view.connection.connection.connection_config,
            request_id: &call.request_id,
            forward_on_redirect: call.forward_headers_on_redirect,
            decompress: call.decompress,
        }
        .send(sending, deadline)
        .await;
        let retry_left = replayable && attempt < call.retries;
        match outcome {
            Ok(upstream::Answer {
                response,
                credentialed,
            }) => {
                let status = response.status();
                if status == StatusCode::UNAUTHORIZED
                    && credentialed
                    && replayable
                    && !rejected_once
                    && view.connection.connection.renewable()
                {
                    rejected_once = true;
                    state.proxy_stats.rejected(call.key.provider_config_key());
                    view = connections::after_rejection(state, &call.key, read_at).await?;
                    read_at = Utc::now();
                    continue;
                }
                if retry_left && retryable(status, &call.retry_on) {
                    let asked = upstream::retry_after(response.headers(), template);
                    // A wait past the deadline: the provider's own answer says more than a 504.
                    if upstream::wait(asked, attempt + 1, deadline).await.is_err() {
                        return Ok(upstream::passthrough(response, call.decompress, watch()));
                    }
                    attempt += 1;
                    state.proxy_stats.retried(call.key.provider_config_key());
                    continue;
                }
                return Ok(upstream::passthrough(response, call.decompress, watch()));
            }
            Err(ProxyError::Unreachable) if retry_left => {
                attempt += 1;
                state.proxy_stats.retried(call.key.provider_config_key());
                upstream::wait(None, attempt, deadline).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The integration's client, which signs an OAuth 1.0a connection's calls (read from the
/// database: OAuth 1.0a is rare, and the hot path stays without an integration query).
async fn oauth1_signer(
    state: &AppState,
    key: &ConnectionKey,
    template: &domain::catalog::Template,
) -> Result<upstream::Oauth1Signer, ProxyError> {
    let integration =
        projections::queries::find_integration(&state.read_models, key.provider_config_key())
            .await
            .map_err(ConnectionsError::from)?
            .ok_or_else(|| ProxyError::UnknownProviderConfig(key.provider_config_key().to_owned()))?
            .integration;
    let consumer_secret = state
        .commands
        .reveal_client_secret(&integration)
        .await
        .map_err(ConnectionsError::command(key))?;
    Ok(upstream::Oauth1Signer {
        consumer_key: integration.settings.oauth_client_id.clone(),
        consumer_secret,
        method: template
            .signature_method
            .unwrap_or(domain::catalog::SignatureMethod::HmacSha1),
    })
}

/// Statuses worth another attempt: 5xx, 429 and those the caller listed.
fn retryable(status: StatusCode, retry_on: &[u16]) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || retry_on.contains(&status.as_u16())
}

/// Whether the caller's body is a form (`application/x-www-form-urlencoded`).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The request body: kept in memory when it is small enough to send again (or `must_keep`,
/// up to the same size), else streamed once.
async fn body_of(
    body: Body,
    length: Option<u64>,
    must_keep: bool,
) -> Result<upstream::RequestBody, ProxyError> {
    match length {
        Some(length) if length > MAX_BODY => Err(ProxyError::BodyTooLarge),
        Some(length) if length > REPLAYABLE_BODY && must_keep => Err(ProxyError::BodyTooLarge),
        _ if must_keep => {
            let bytes = axum::body::to_bytes(body, REPLAYABLE_BODY as usize)
                .await
                .map_err(|_| ProxyError::BodyTooLarge)?;
            Ok(upstream::RequestBody::Kept(bytes))
        }
        Some(length) if length <= REPLAYABLE_BODY => {
            let bytes = axum::body::to_bytes(body, REPLAYABLE_BODY as usize)
                .await
                .map_err(|_| ProxyError::BodyTooLarge)?;
            Ok(upstream::RequestBody::Kept(bytes))
        }
        _ => Ok(upstream::RequestBody::Streamed(body)),
    }
}
