//! The fake provider's API, for the proxy: it checks the token like a real API (a token the
//! provider minted works until it is revoked), and has a flaky endpoint, a rate-limited one, a
//! slow one and a large download.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;

use super::fake_provider::FakeProvider;

/// What the API remembers.
#[derive(Default)]
pub struct ApiState {
    revoked: Mutex<HashSet<String>>,
    /// Calls `/api/flaky` fails (503) before it answers.
    flaky_left: AtomicUsize,
    /// Calls `/api/limited` refuses (429, `Retry-After: 1`) before it answers.
    limited_left: AtomicUsize,
    /// Requests that reached an API route (any answer).
    pub calls: AtomicUsize,
    /// Requests refused with 401.
    pub unauthorized: AtomicUsize,
    /// The provider's address, which OAuth 1.0a signatures cover.
    pub base: Mutex<String>,
}

impl ApiState {
    /// Makes `token` stop working, as a provider that revoked it early.
    pub fn revoke(&self, token: &str) {
        self.revoked.lock().unwrap().insert(token.to_owned());
    }

    pub fn fail_next(&self, flaky: usize, limited: usize) {
        self.flaky_left.store(flaky, Ordering::SeqCst);
        self.limited_left.store(limited, Ordering::SeqCst);
    }

    /// Whether `headers` carry a live credential; an OAuth 1.0a signature must be valid for
    /// `request` (method and URL) with the fake's consumer secret and the token's secret.
    fn authorized(&self, headers: &HeaderMap, request: Option<(&Method, &Uri)>) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if given.starts_with("OAuth ") {
            return request.is_some_and(|(method, uri)| self.oauth1_valid(given, method, uri));
        }
        if let Some(token) = given.strip_prefix("Bearer ") {
            let minted = token.starts_with("fake-access-") || token.starts_with("cc-token-");
            return (minted || token == FakeProvider::API_KEY)
                && !self.revoked.lock().unwrap().contains(token);
        }
        let (user, password) = FakeProvider::LOGIN;
        given == format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
    }
}

impl ApiState {
    fn oauth1_valid(&self, header: &str, method: &Method, uri: &Uri) -> bool {
        let Some(oauth) = workers::oauth1::parse_authorization_header(header) else {
            return false;
        };
        let field = |name: &str| {
            oauth
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        // Tokens the fake issued: `fake-access-oauth1-N`, whose secret is known.
        let Some(n) = field("oauth_token")
            .and_then(|t| t.strip_prefix("fake-access-oauth1-").map(str::to_owned))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return false;
        };
        if field("oauth_consumer_key").as_deref() != Some(super::fake_provider::CLIENT_ID) {
            return false;
        }
        let method_name = match field("oauth_signature_method").as_deref() {
            Some("HMAC-SHA1") => domain::catalog::SignatureMethod::HmacSha1,
            Some("PLAINTEXT") => domain::catalog::SignatureMethod::Plaintext,
            _ => return false,
        };
        let signed: Vec<(String, String)> = oauth
            .iter()
            .filter(|(k, _)| k != "oauth_signature")
            .cloned()
            .collect();
        let url = format!("{}{uri}", self.base.lock().unwrap());
        let Ok(url) = url::Url::parse(&url) else {
            return false;
        };
        let base = workers::oauth1::signature_base_string(method.as_str(), &url, &signed);
        let (_, secret) = FakeProvider::oauth1_tokens(n);
        let expected = workers::oauth1::sign(
            method_name,
            &base,
            super::fake_provider::CLIENT_SECRET,
            &secret,
        );
        expected.ok() == field("oauth_signature")
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/echo", any(echo))
        .route("/api/flaky", get(flaky))
        .route("/api/limited", get(limited))
        .route("/api/large", get(large))
        .route("/api/slow", get(slow))
        .with_state(state)
}

/// 401 unless authorized; counts the call.
fn check(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    check_request(state, headers, None)
}

/// [`check`], with the request an OAuth 1.0a signature covers.
fn check_request(
    state: &ApiState,
    headers: &HeaderMap,
    request: Option<(&Method, &Uri)>,
) -> Option<Response> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    if state.authorized(headers, request) {
        return None;
    }
    state.unauthorized.fetch_add(1, Ordering::SeqCst);
    Some(
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_token"})),
        )
            .into_response(),
    )
}

/// What the request was: method, path, query, some headers, the body.
async fn echo(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = check_request(&state, &headers, Some((&method, &uri))) {
        return refused;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    (
        [
            ("x-request-id", "upstream-id"),
            ("x-secret-header", "not-for-the-caller"),
        ],
        Json(json!({
            "method": method.as_str(),
            "path": uri.path(),
            "query": uri.query(),
            "x-custom": header("x-custom"),
            "content-type": header("content-type"),
            "x-request-id": header("x-request-id"),
            "nango-proxy-x-custom": header("nango-proxy-x-custom"),
            "connection-id": header("connection-id"),
            "body": String::from_utf8_lossy(&body),
        })),
    )
        .into_response()
}

async fn flaky(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let failing = state
        .flaky_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    Json(json!({"ok": true})).into_response()
}

async fn limited(State(state): State<Arc<ApiState>>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let refusing = state
        .limited_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refusing {
        // The standard header, or (`?style=reset`) a rate-limit reset time in Unix seconds.
        if uri.query() == Some("style=reset") {
            let reset = (chrono::Utc::now().timestamp() + 2).to_string();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("x-ratelimit-reset", reset)],
                "slow down",
            )
                .into_response();
        }
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "slow down",
        )
            .into_response();
    }
    Json(json!({"ok": true})).into_response()
}

#[derive(serde::Deserialize)]
struct Size {
    bytes: usize,
}

/// `bytes` bytes, streamed in 64 KiB chunks.
async fn large(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(size): Query<Size>,
) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    const CHUNK: usize = 64 * 1024;
    let chunks = (0..size.bytes.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(size.bytes - i * CHUNK);
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; len]))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

async fn slow(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    Json(json!({"ok": true})).into_response()
}
