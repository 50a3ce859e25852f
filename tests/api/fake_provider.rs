//! An in-process OAuth 2.0 provider that behaves like a real one, for the flow tests.
//!
//! `/authorize` (also `/{tenant}/authorize`) checks the client id and answers 302 back to the
//! `redirect_uri` with a single-use `code` and the `state`, or with
//! `error=access_denied&error_description=…` when told to deny. `/token` (also
//! `/{tenant}/token`) takes a form or JSON body, checks client authentication (body or HTTP
//! Basic), the code, the redirect URI and the PKCE verifier against the challenge it saw, and
//! issues tokens. It can be told to be slow, to answer 5xx, to answer a non-JSON body, or to
//! answer form-encoded; it counts token requests and records what it was sent.
//!
//! Under `/oauth1/` it is an OAuth 1.0a provider: `request_token` and `access_token` check the
//! consumer key and the signature (HMAC-SHA1 or PLAINTEXT) of every request, `authorize`
//! answers 302 to the `oauth_callback` with the token and a verifier (or `denied=`), and the
//! verifier and request token are single-use.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

pub const CLIENT_ID: &str = "fake-client-id";
pub const CLIENT_SECRET: &str = "fake-client-SECRET-5c1e";

/// How `/token` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// JSON tokens.
    Json,
    /// Form-encoded tokens.
    Form,
    /// Sleeps this long, then answers JSON tokens.
    Slow(Duration),
    /// Answers this status with a JSON error.
    Status(u16),
    /// Answers 200 with an HTML page.
    NotJson,
    /// Answers 400 `invalid_grant` (the grant is gone).
    InvalidGrant,
    /// JSON tokens, the refresh answer with an extra field `padding` of this many characters.
    Padded(usize),
}

/// The refresh tokens the fake accepts: each use rotates the token; a spent token is refused
/// with `invalid_grant` (and, if told, revokes the whole family, as Salesforce does), except
/// within a grace period after its rotation (as Xero does).
#[derive(Default)]
struct RefreshTokens {
    /// Live tokens, and for rotated ones the end of their grace period.
    live: HashMap<String, Option<std::time::Instant>>,
    grace: Duration,
    revoke_family_on_reuse: bool,
    issued: usize,
}

/// What `/token` was sent.
#[derive(Clone, Debug)]
pub struct TokenCall {
    pub tenant: Option<String>,
    pub params: BTreeMap<String, String>,
    pub basic_auth: bool,
    pub json_body: bool,
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: Option<(String, String)>,
    scope: Option<String>,
    tenant: Option<String>,
}

/// An OAuth 1.0a request token the fake issued.
struct RequestToken {
    secret: String,
    callback: String,
    verifier: Option<String>,
}

struct Inner {
    /// The `jti` of every client assertion accepted: a replayed one is refused.
    assertions: HashSet<String>,
    /// The header of the last client assertion accepted (`alg`, thumbprints).
    last_assertion: Option<jsonwebtoken::Header>,
    deny: bool,
    request_tokens: HashMap<String, RequestToken>,
    mode: TokenMode,
    codes: HashMap<String, Grant>,
    authorize_calls: Vec<(Option<String>, BTreeMap<String, String>)>,
    token_calls: Vec<TokenCall>,
    issued: usize,
    refresh: RefreshTokens,
}

struct Shared {
    inner: Mutex<Inner>,
    token_requests: AtomicUsize,
    refresh_requests: AtomicUsize,
    api_requests: AtomicUsize,
    base: Mutex<String>,
}

/// A running fake provider, stopped when dropped.
pub struct FakeProvider {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its API (`/api/...`, see `fake_api.rs`).
    pub api: Arc<super::fake_api::ApiState>,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl FakeProvider {
    /// A providers file (in a new temporary directory, kept while the `TempDir` lives) with one
    /// OAuth 2 template named `fake` pointing at this provider, followed by the YAML `extra`
    /// (more lines of it, or more templates), in which `{base}` stands for this provider's
    /// address.
    pub fn providers_file(&self, extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("providers.yaml");
        std::fs::write(
            &file,
            format!(
                "fake:\n  auth_mode: OAUTH2\n  authorization_url: {base}/authorize\n  token_url: \
                 {base}/token\n{extra}",
                base = self.base,
                extra = extra.replace("{base}", &self.base),
            ),
        )
        .unwrap();
        (dir, file)
    }

    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                assertions: HashSet::new(),
                last_assertion: None,
                deny: false,
                request_tokens: HashMap::new(),
                mode: TokenMode::Json,
                codes: HashMap::new(),
                authorize_calls: Vec::new(),
                token_calls: Vec::new(),
                issued: 0,
                refresh: RefreshTokens::default(),
            }),
            token_requests: AtomicUsize::new(0),
            refresh_requests: AtomicUsize::new(0),
            api_requests: AtomicUsize::new(0),
            base: Mutex::new(String::new()),
        });
        let router = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/{tenant}/authorize", get(authorize_tenant))
            .route("/{tenant}/token", post(token_tenant))
            .route("/oauth1/request_token", post(oauth1_request_token))
            .route("/oauth1/authorize", get(oauth1_authorize))
            .route("/oauth1/access_token", post(oauth1_access_token))
            .route("/api/me", get(api_me))
            .with_state(shared.clone());
        let api = Arc::new(super::fake_api::ApiState::default());
        let router = router.merge(super::fake_api::router(api.clone()));
        let (address, stop) = serve_locally(router).await;
        let base = format!("http://{address}");
        base.clone_into(&mut shared.base.lock().unwrap());
        base.clone_into(&mut api.base.lock().unwrap());
        Self {
            base,
            api,
            shared,
            _stop: stop,
        }
    }

    /// The API key `/api/me` accepts (as `Authorization: Bearer`).
    pub const API_KEY: &'static str = "fake-api-key-7f3c";
    /// The username and password `/api/me` accepts (as HTTP Basic).
    pub const LOGIN: (&'static str, &'static str) = ("fake-user", "fake-pass-91d2");

    /// The client of a client-credentials grant that `/token` accepts.
    pub const CC_CLIENT: (&'static str, &'static str) = ("cc-client", "cc-secret-5e0a");

    /// The token the `n`-th token request gets in a client-credentials grant.
    pub fn cc_token(n: usize) -> String {
        format!("cc-token-{n}")
    }

    /// How many requests `/api/me` got.
    pub fn api_requests(&self) -> usize {
        self.shared.api_requests.load(Ordering::SeqCst)
    }

    /// Makes `/authorize` refuse (or stop refusing).
    pub fn deny(&self, deny: bool) {
        self.shared.inner.lock().unwrap().deny = deny;
    }

    pub fn set_mode(&self, mode: TokenMode) {
        self.shared.inner.lock().unwrap().mode = mode;
    }

    /// How many `grant_type=refresh_token` requests reached `/token`.
    pub fn refresh_requests(&self) -> usize {
        self.shared.refresh_requests.load(Ordering::SeqCst)
    }

    /// Makes `token` a live refresh token (one the service imported).
    pub fn accept_refresh_token(&self, token: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.refresh.live.insert(token.to_owned(), None);
    }

    /// A rotated refresh token keeps working for `grace` (Xero: 30 minutes); zero is strict.
    pub fn set_refresh_grace(&self, grace: Duration) {
        self.shared.inner.lock().unwrap().refresh.grace = grace;
    }

    /// Reusing a spent refresh token revokes every live one (Salesforce).
    pub fn revoke_family_on_reuse(&self, revoke: bool) {
        self.shared
            .inner
            .lock()
            .unwrap()
            .refresh
            .revoke_family_on_reuse = revoke;
    }

    /// The tokens the n-th successful refresh (from 1) issues.
    pub fn refreshed_tokens(n: usize) -> (String, String) {
        (format!("fake-access-r{n}"), format!("fake-refresh-r{n}"))
    }

    /// How many requests reached `/token`.
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// The header of the last client assertion the provider accepted.
    pub fn last_assertion(&self) -> Option<jsonwebtoken::Header> {
        self.shared.inner.lock().unwrap().last_assertion.clone()
    }

    /// The query of the last `/authorize` request, and its tenant.
    pub fn last_authorize(&self) -> (Option<String>, BTreeMap<String, String>) {
        self.shared
            .inner
            .lock()
            .unwrap()
            .authorize_calls
            .last()
            .cloned()
            .expect("no authorize request yet")
    }

    /// The last request `/token` accepted for checking.
    pub fn last_token_call(&self) -> TokenCall {
        self.shared
            .inner
            .lock()
            .unwrap()
            .token_calls
            .last()
            .cloned()
            .expect("no token request yet")
    }

    /// The OAuth 1.0a token credentials of the n-th token request (from 1).
    pub fn oauth1_tokens(n: usize) -> (String, String) {
        (
            format!("fake-access-oauth1-{n}"),
            format!("fake-refresh-oauth1-secret-{n}"),
        )
    }

    /// The tokens the n-th issue (from 1) carries.
    pub fn tokens(n: usize) -> (String, String) {
        (format!("fake-access-{n}"), format!("fake-refresh-{n}"))
    }
}

/// Serves `router` on a random port of 127.0.0.1 in the background until the returned sender is
/// dropped; returns the address it listens on.
pub async fn serve_locally(router: Router) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (address, stop)
}

async fn authorize(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    authorize_for(&shared, None, query)
}

async fn authorize_tenant(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    authorize_for(&shared, Some(tenant), query)
}

fn authorize_for(
    shared: &Shared,
    tenant: Option<String>,
    query: BTreeMap<String, String>,
) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    inner.authorize_calls.push((tenant.clone(), query.clone()));
    let field = |name: &str| query.get(name).cloned().unwrap_or_default();
    if field("client_id") != CLIENT_ID || field("response_type") != "code" {
        return (StatusCode::BAD_REQUEST, "unknown client or response type").into_response();
    }
    let Ok(mut back) = url::Url::parse(&field("redirect_uri")) else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response();
    };
    if inner.deny {
        back.query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("error_description", "The user said <no> & left")
            .append_pair("state", &field("state"));
    } else {
        inner.issued += 1;
        let code = format!("code-{}-{}", inner.issued, uuid::Uuid::new_v4().simple());
        let challenge = query
            .get("code_challenge")
            .map(|c| (c.clone(), field("code_challenge_method")));
        inner.codes.insert(
            code.clone(),
            Grant {
                client_id: field("client_id"),
                redirect_uri: field("redirect_uri"),
                challenge,
                scope: query.get("scope").cloned(),
                tenant: tenant.clone(),
            },
        );
        back.query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", &field("state"))
            .append_pair("tenant_hint", tenant.as_deref().unwrap_or("none"));
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

/// The provider's API: 200 with [`FakeProvider::API_KEY`] as a bearer token or
/// [`FakeProvider::LOGIN`] as HTTP Basic, else 401.
async fn api_me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    shared.api_requests.fetch_add(1, Ordering::SeqCst);
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (user, password) = FakeProvider::LOGIN;
    let basic = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
    if given == format!("Bearer {}", FakeProvider::API_KEY) || given == basic {
        Json(json!({"id": "me"})).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        )
            .into_response()
    }
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    token_for(&shared, None, &headers, &body).await
}

async fn token_tenant(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token_for(&shared, Some(tenant), &headers, &body).await
}

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The test clients' keys: RSA 2048 (with a self-signed certificate) and EC P-256, as PKCS#8
/// PEM; and an EC P-384 key, which the client cannot sign with.
pub const RSA_KEY: &str = include_str!("keys/rsa.key");
pub const RSA_CERTIFICATE: &str = include_str!("keys/rsa.crt");
pub const EC_KEY: &str = include_str!("keys/ec.key");
pub const EC_P384_KEY: &str = include_str!("keys/ec384.key");
const PUBLIC_KEYS: [(&str, jsonwebtoken::Algorithm); 2] = [
    (include_str!("keys/rsa.pub"), jsonwebtoken::Algorithm::RS256),
    (include_str!("keys/ec.pub"), jsonwebtoken::Algorithm::ES256),
];

/// Whether `assertion` is a JWT signed by a test key, issued by and about `client_id`, for
/// `endpoint`, current, and not seen before (RFC 7523 §3).
fn client_assertion_valid(
    inner: &mut Inner,
    assertion: &str,
    client_id: &str,
    endpoint: &str,
) -> bool {
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
        jti: String,
    }
    for (public, algorithm) in PUBLIC_KEYS {
        let key = match algorithm {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes())
            }
            _ => jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()),
        }
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.set_audience(&[endpoint]);
        validation.set_issuer(&[client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        if let Ok(data) = jsonwebtoken::decode::<Claims>(assertion, &key, &validation) {
            let fresh = data.claims.sub == client_id && inner.assertions.insert(data.claims.jti);
            if fresh {
                inner.last_assertion = Some(data.header);
            }
            return fresh;
        }
    }
    false
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token_for(
    shared: &Shared,
    tenant: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let n = shared.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let refreshing = body_field(headers, body, "grant_type").as_deref() == Some("refresh_token");
    if refreshing {
        shared.refresh_requests.fetch_add(1, Ordering::SeqCst);
    }
    let mode = shared.inner.lock().unwrap().mode;
    match mode {
        TokenMode::InvalidGrant => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "grant revoked");
        }
        TokenMode::Slow(delay) => tokio::time::sleep(delay).await,
        TokenMode::Status(status) => {
            return oauth_error(
                StatusCode::from_u16(status).unwrap(),
                "server_error",
                "try later",
            );
        }
        TokenMode::NotJson => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>Maintenance</body></html>",
            )
                .into_response();
        }
        TokenMode::Json | TokenMode::Form | TokenMode::Padded(_) => {}
    }
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut params: BTreeMap<String, String> = if json_body {
        match serde_json::from_slice::<BTreeMap<String, String>>(body) {
            Ok(params) => params,
            Err(_) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "bad JSON"),
        }
    } else {
        url::form_urlencoded::parse(body).into_owned().collect()
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| STANDARD.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok());
    let basic_auth = basic.is_some();
    let (client_id, client_secret) = match basic {
        Some(pair) => {
            let (id, secret) = pair.split_once(':').unwrap_or((&pair, ""));
            (id.to_owned(), secret.to_owned())
        }
        None => (
            params.get("client_id").cloned().unwrap_or_default(),
            params.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    params.remove("client_secret");
    let mut inner = shared.inner.lock().unwrap();
    inner.token_calls.push(TokenCall {
        tenant: tenant.clone(),
        params: params.clone(),
        basic_auth,
        json_body,
    });
    let field = |name: &str| params.get(name).cloned().unwrap_or_default();
    if field("grant_type") == "client_credentials" {
        // A client-credentials grant: the connection's own client, a new token each time,
        // authenticated by its secret or by a JWT signed with one of the test keys.
        let (id, secret) = FakeProvider::CC_CLIENT;
        let authenticated = if params.contains_key("client_assertion_type") {
            let endpoint = match &tenant {
                Some(tenant) => format!("{}/{tenant}/token", shared.base.lock().unwrap()),
                None => format!("{}/token", shared.base.lock().unwrap()),
            };
            let assertion = field("client_assertion");
            field("client_assertion_type") == JWT_BEARER
                && client_id == id
                && client_assertion_valid(&mut inner, &assertion, id, &endpoint)
        } else {
            client_id == id && client_secret == secret
        };
        if !authenticated {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "bad client");
        }
        let answer = json!({
            "access_token": FakeProvider::cc_token(n),
            "token_type": "bearer",
            "expires_in": 3600,
            "scope": field("scope"),
        });
        return (StatusCode::OK, axum::Json(answer)).into_response();
    }
    if client_id != CLIENT_ID || client_secret != CLIENT_SECRET {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "bad client");
    }
    if field("grant_type") == "refresh_token" {
        return refresh_grant(&mut inner.refresh, &field("refresh_token"), mode);
    }
    if field("grant_type") != "authorization_code" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "");
    }
    let Some(grant) = inner.codes.remove(&field("code")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown or used code",
        );
    };
    if grant.client_id != client_id || grant.redirect_uri != field("redirect_uri") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri mismatch",
        );
    }
    if grant.tenant != tenant {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "wrong tenant");
    }
    match (&grant.challenge, params.get("code_verifier")) {
        (Some((challenge, method)), Some(verifier)) => {
            let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
            if method != "S256" || &computed != challenge {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "PKCE failed");
            }
        }
        (Some(_), None) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "code_verifier required",
            );
        }
        (None, Some(_)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "no challenge was sent",
            );
        }
        (None, None) => {}
    }
    let (access, refresh) = FakeProvider::tokens(n);
    let answer = json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "bearer",
        "expires_in": 3600,
        "scope": grant.scope.unwrap_or_default(),
        "instance_url": format!("https://{}.fake.test", tenant.as_deref().unwrap_or("www")),
    });
    if mode == TokenMode::Form {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(answer.as_object().unwrap().iter().map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            }))
            .finish();
        return form(body);
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

/// One field of a form or JSON body.
fn body_field(headers: &HeaderMap, body: &[u8], name: &str) -> Option<String> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        serde_json::from_slice::<Value>(body)
            .ok()?
            .get(name)?
            .as_str()
            .map(str::to_owned)
    } else {
        url::form_urlencoded::parse(body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// `grant_type=refresh_token`: rotates a live token; refuses a spent one.
fn refresh_grant(tokens: &mut RefreshTokens, presented: &str, mode: TokenMode) -> Response {
    let now = std::time::Instant::now();
    let usable = match tokens.live.get(presented) {
        Some(None) => true,
        Some(Some(grace_until)) => now < *grace_until,
        None => false,
    };
    if !usable {
        if tokens.revoke_family_on_reuse {
            tokens.live.clear();
        }
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "refresh token spent or unknown",
        );
    }
    if tokens.grace.is_zero() {
        tokens.live.remove(presented);
    } else if tokens.live.get(presented) == Some(&None) {
        tokens
            .live
            .insert(presented.to_owned(), Some(now + tokens.grace));
    }
    tokens.issued += 1;
    let (access, refresh) = FakeProvider::refreshed_tokens(tokens.issued);
    tokens.live.insert(refresh.clone(), None);
    let mut answer = json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "bearer",
        "expires_in": 3600,
    });
    if let TokenMode::Padded(n) = mode {
        answer["padding"] = json!("p".repeat(n));
    }
    if mode == TokenMode::Form {
        return form(format!(
            "access_token={access}&refresh_token={refresh}&expires_in=3600"
        ));
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

/// The answer to a refused OAuth 1.0a request.
fn oauth1_problem(problem: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
        format!("oauth_problem={problem}"),
    )
        .into_response()
}

/// The protocol parameters of a signed OAuth 1.0a request, if its signature is valid for the
/// consumer secret and the token secret the fake gave out; else the `oauth_problem`.
fn verify_oauth1(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<BTreeMap<String, String>, &'static str> {
    let header_text = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("parameter_absent")?;
    let oauth =
        workers::oauth1::parse_authorization_header(header_text).ok_or("parameter_rejected")?;
    let fields: BTreeMap<String, String> = oauth.iter().cloned().collect();
    if fields.get("oauth_consumer_key").map(String::as_str) != Some(CLIENT_ID) {
        return Err("consumer_key_unknown");
    }
    let method = match fields.get("oauth_signature_method").map(String::as_str) {
        Some("HMAC-SHA1") => domain::catalog::SignatureMethod::HmacSha1,
        Some("PLAINTEXT") => domain::catalog::SignatureMethod::Plaintext,
        _ => return Err("signature_method_rejected"),
    };
    let token_secret = match fields.get("oauth_token") {
        Some(token) => match shared.inner.lock().unwrap().request_tokens.get(token) {
            Some(issued) => issued.secret.clone(),
            None => return Err("token_rejected"),
        },
        None => String::new(),
    };
    let signed: Vec<(String, String)> = oauth
        .iter()
        .filter(|(k, _)| k != "oauth_signature")
        .cloned()
        .chain(url::form_urlencoded::parse(body).into_owned())
        .collect();
    let url = url::Url::parse(&format!("{}{path}", shared.base.lock().unwrap())).unwrap();
    let base = workers::oauth1::signature_base_string("POST", &url, &signed);
    let expected = workers::oauth1::sign(method, &base, CLIENT_SECRET, &token_secret).unwrap();
    if fields.get("oauth_signature") != Some(&expected) {
        return Err("signature_invalid");
    }
    Ok(fields)
}

/// A 200 answer with a form-encoded body.
fn form(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
        body,
    )
        .into_response()
}

async fn oauth1_request_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fields = match verify_oauth1(&shared, "/oauth1/request_token", &headers, &body) {
        Ok(fields) => fields,
        Err(problem) => return oauth1_problem(problem),
    };
    let Some(callback) = fields.get("oauth_callback").cloned() else {
        return (StatusCode::BAD_REQUEST, "oauth_problem=parameter_absent").into_response();
    };
    let mut inner = shared.inner.lock().unwrap();
    inner.issued += 1;
    let token = format!("request-token-{}", inner.issued);
    let secret = format!("request-SECRET-{}", uuid::Uuid::new_v4().simple());
    inner.request_tokens.insert(
        token.clone(),
        RequestToken {
            secret: secret.clone(),
            callback,
            verifier: None,
        },
    );
    form(format!(
        "oauth_token={token}&oauth_token_secret={secret}&oauth_callback_confirmed=true"
    ))
}

async fn oauth1_authorize(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let mut inner = shared.inner.lock().unwrap();
    inner.authorize_calls.push((None, query.clone()));
    let token = query.get("oauth_token").cloned().unwrap_or_default();
    let deny = inner.deny;
    let Some(issued) = inner.request_tokens.get_mut(&token) else {
        return (StatusCode::BAD_REQUEST, "unknown oauth_token").into_response();
    };
    let mut back = url::Url::parse(&issued.callback).unwrap();
    if deny {
        back.query_pairs_mut().append_pair("denied", &token);
    } else {
        let verifier = format!("verifier-{}", uuid::Uuid::new_v4().simple());
        issued.verifier = Some(verifier.clone());
        back.query_pairs_mut()
            .append_pair("oauth_token", &token)
            .append_pair("oauth_verifier", &verifier);
    }
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

async fn oauth1_access_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = shared.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let fields = match verify_oauth1(&shared, "/oauth1/access_token", &headers, &body) {
        Ok(fields) => fields,
        Err(problem) => return oauth1_problem(problem),
    };
    let mut inner = shared.inner.lock().unwrap();
    let token = fields.get("oauth_token").cloned().unwrap_or_default();
    let Some(issued) = inner.request_tokens.remove(&token) else {
        return (StatusCode::UNAUTHORIZED, "oauth_problem=token_used").into_response();
    };
    if issued.verifier.is_none() || issued.verifier.as_ref() != fields.get("oauth_verifier") {
        return (StatusCode::UNAUTHORIZED, "oauth_problem=verifier_invalid").into_response();
    }
    let (token, secret) = FakeProvider::oauth1_tokens(n);
    form(format!(
        "oauth_token={token}&oauth_token_secret={secret}&user_id=42&screen_name=ada"
    ))
}
