//! The fake provider's API, for the proxy: it checks the token like a real API (a token the
//! provider minted works until it is revoked; an OAuth 1.0a signature must cover the method,
//! URL, query and form body), and has a flaky endpoint, a rate-limited one, a slow one, a large
//! download, one that breaks off mid-answer, a redirecting one and a gzip-encoded one.

use std::collections::{HashMap, HashSet};
use std::io::Write;
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
    /// Calls `/api/limited` refuses (429, `Retry-After: 1`, or `?after=`'s value) before it
    /// answers.
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
    /// `request` (method, URL and body) with the fake's consumer secret and the token's secret.
    fn authorized(&self, headers: &HeaderMap, request: Option<Signed<'_>>) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if given.starts_with("OAuth ") {
            return request.is_some_and(|request| self.oauth1_valid(given, headers, request));
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
    fn oauth1_valid(&self, header: &str, headers: &HeaderMap, (method, uri, body): Signed) -> bool {
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
        // A form body's parameters are signed too (RFC 5849 §3.4.1.3.1).
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let body_params = form
            .then(|| url::form_urlencoded::parse(body).into_owned())
            .into_iter()
            .flatten();
        let signed: Vec<(String, String)> = oauth
            .iter()
            .filter(|(k, _)| k != "oauth_signature")
            .cloned()
            .chain(body_params)
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
        .route("/api/cut", get(cut))
        .route("/api/slow", get(slow))
        .route("/api/trickle", get(trickle))
        .route("/api/wait", get(wait))
        .route("/api/redirect", any(redirect))
        .route("/api/landing", any(landing))
        .route("/api/gzip", get(gzip))
        .with_state(state)
}

/// 401 unless authorized; counts the call.
fn check(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    check_request(state, headers, None)
}

/// What an OAuth 1.0a signature covers: the method, the URL (path and query) and the body.
type Signed<'a> = (&'a Method, &'a Uri, &'a [u8]);

/// [`check`], with the request an OAuth 1.0a signature covers.
fn check_request(
    state: &ApiState,
    headers: &HeaderMap,
    request: Option<Signed<'_>>,
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
    if let Some(refused) = check_request(&state, &headers, Some((&method, &uri, &body))) {
        return refused;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    (
        [
            ("x-request-id", "upstream-id"),
            ("x-secret-header", "not-for-the-caller"),
            ("x-ratelimit-remaining", "4999"),
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
        // `?after=…`: whatever `Retry-After` a provider may send ("inf", 1e30, …).
        let after = uri
            .query()
            .and_then(|q| q.strip_prefix("after="))
            .unwrap_or("1")
            .to_owned();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, after),
                (
                    header::HeaderName::from_static("x-provider-error-id"),
                    "e-429".into(),
                ),
                (header::SET_COOKIE, "provider-session=1".into()),
                // What would speak for the proxy's own origin, and a header of this hop only.
                (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".into()),
                (header::STRICT_TRANSPORT_SECURITY, "max-age=63072000".into()),
                (
                    header::HeaderName::from_static("clear-site-data"),
                    "\"cookies\"".into(),
                ),
                // Not text: a byte that is not ASCII.
                (header::CONNECTION, "x-hop-only, café".into()),
                (header::HeaderName::from_static("x-hop-only"), "1".into()),
                // What a web server in front of the proxy would act on.
                (
                    header::HeaderName::from_static("x-accel-redirect"),
                    "/internal/secret".into(),
                ),
            ],
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

/// Announces `bytes` bytes, sends half of them and breaks off, as a provider that fails
/// mid-answer.
async fn cut(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(size): Query<Size>,
) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let half = Ok(Bytes::from(vec![b'x'; size.bytes / 2]));
    // The break comes after the first half has gone out.
    let broken = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Err(std::io::Error::other("the provider broke off"))
    });
    let chunks = futures_util::StreamExt::chain(futures_util::stream::iter([half]), broken);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.bytes.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// What `/api/trickle` sends last: bytes shaped like the server's own bare 400, as a hostile
/// or unlucky provider could.
pub const TRICKLE_TAIL: &str = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                                date: Sat, 05 Dec 2026 05:38:55 GMT\r\n\r\n";

/// 1,000 bytes of `A`, then, 1.5 s later, [`TRICKLE_TAIL`]: an answer that takes its time.
async fn trickle(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let first =
        futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![b'A'; 1000]))]);
    let last = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(Bytes::from_static(TRICKLE_TAIL.as_bytes()))
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(futures_util::StreamExt::chain(first, last)),
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

/// How long `/api/wait` takes to answer.
#[derive(serde::Deserialize)]
struct Wait {
    ms: u64,
}

/// A small answer after `ms` milliseconds (at most 10 s): an API as far away as a real
/// provider's.
async fn wait(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(wait): Query<Wait>,
) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    tokio::time::sleep(Duration::from_millis(wait.ms.min(10_000))).await;
    Json(json!({"ok": true})).into_response()
}

/// A redirect (after the credential check): `status` (302 unless given) to `to`, or to itself
/// when `to` is absent (a loop).
async fn redirect(
    State(state): State<Arc<ApiState>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let status = query
        .get("status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FOUND);
    let to = query.get("to").cloned().unwrap_or_else(|| uri.to_string());
    (status, [(header::LOCATION, to)], "moved").into_response()
}

/// Where redirects land: no credential needed; tells what credential headers arrived (whether
/// they did, never their values), the method and the body.
async fn landing(method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let present = |name: &str| headers.contains_key(name);
    Json(json!({
        "authorization": present("authorization"),
        "x-token-copy": present("x-token-copy"),
        "x-static": headers.get("x-static").and_then(|v| v.to_str().ok()),
        "method": method.as_str(),
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

/// The text the gzip endpoint compresses: `bytes` bytes of it.
pub fn gzip_text(bytes: usize) -> Vec<u8> {
    b"grantline proxies gzip. "
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect()
}

/// [`gzip_text`] of `?bytes=` (1000 unless given), gzip-encoded.
async fn gzip(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = check(&state, &headers) {
        return refused;
    }
    let bytes = query
        .get("bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or(1000);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&gzip_text(bytes)).unwrap();
    let body = encoder.finish().unwrap();
    (
        [
            (header::CONTENT_TYPE, "text/plain"),
            (header::CONTENT_ENCODING, "gzip"),
        ],
        body,
    )
        .into_response()
}
