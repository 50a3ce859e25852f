//! OAuth 2.0 flows end to end, on PostgreSQL and SQLite, against the in-process fake provider
//! (`fake_provider.rs`): the browser is a reqwest client that does not follow redirects, so every
//! hop (connect → provider → callback → outcome) is checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::connection::ConnectionKey;
use domain::oauth_session::FlowSession;
use domain::testing::TestDatabase;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use url::Url;

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider, TokenMode};
use grantline::config::Config;

use crate::{TestApp, assert_error, config_on, new_key, ok_json, spawn_config};

domain::on_both_backends!(
    a_pkce_flow_records_the_providers_tokens_and_the_next_read_sees_them,
    the_session_keeps_the_flow_with_its_verifier_sealed,
    without_pkce_the_client_authenticates_with_basic_auth_and_a_json_body,
    connection_config_params_fill_the_provider_urls,
    the_scopes_and_authorization_params_of_the_request_shape_the_authorize_url,
    a_provider_denial_reaches_the_page_as_its_code_without_the_providers_text,
    a_callback_without_a_known_state_is_refused_at_once,
    a_state_is_accepted_once_even_by_concurrent_callbacks,
    an_expired_state_is_refused_without_calling_the_provider,
    expired_sessions_are_swept_and_live_ones_kept,
    a_slow_token_endpoint_fails_the_flow_at_the_timeout,
    a_failing_token_endpoint_is_a_token_error_not_a_server_error,
    a_non_json_token_answer_is_a_token_error,
    form_encoded_tokens_are_accepted,
    an_allow_listed_api_redirect_url_gets_the_outcome_with_its_query_kept,
    an_api_redirect_url_off_the_allow_list_gets_a_page_and_no_redirect,
    a_success_redirect_is_signed_with_the_secret_key,
    a_second_authorization_is_generation_two_with_the_new_tokens,
    connect_refuses_unknown_integrations_templates_and_missing_ids,
    hmac_and_public_key_are_required_when_configured,
    a_websocket_client_hears_the_outcome_of_its_flow,
    an_oauth1_flow_records_signed_token_credentials,
    oauth1_denials_replays_and_foreign_tokens_are_refused,
    anonymous_flow_starts_are_limited_per_address_and_in_all,
);

const APP_ORIGIN: &str = "http://app.example.test";
pub(crate) const SECRET_KEY: &str = "grantline-test-secret-key-0123456789";

/// A service with three integrations on fake-provider templates, and a browser.
pub(crate) struct Env {
    pub(crate) app: TestApp,
    pub(crate) fake: FakeProvider,
    pub(crate) browser: reqwest::Client,
    secret_key: bool,
    /// The master key and the providers file, for a second instance on the same database.
    key: String,
    providers: PathBuf,
    _dir: tempfile::TempDir,
}

/// The templates beside `fake` (see [`FakeProvider::providers_file`]), `{base}` standing for the
/// provider's address: `fake` gets PKCE, body auth, a form body and metadata; `fake-basic` no
/// PKCE, HTTP Basic and a JSON body; `fake-tenant` URLs with `${connectionConfig.subdomain}` and
/// `,` between scopes; `fake-oauth1` and `fake-oauth1-plain` are OAuth 1.0a with HMAC-SHA1 and
/// PLAINTEXT signatures; `fake-key` (API key) and `fake-login` (Basic) are checked against the
/// provider's `/api/me`, `fake-key-unchecked` is not checked; `fake-cc` is a client-credentials
/// grant at `/token`, and `fake-cc-jwt` one whose client must authenticate with a signed JWT.
const TEMPLATES: &str = "  authorization_params:
    access_type: offline
  token_response_metadata:
    - instance_url
  redirect_uri_metadata:
    - tenant_hint
fake-basic:
  auth_mode: OAUTH2
  authorization_url: {base}/authorize
  token_url: {base}/token
  disable_pkce: true
  authorization_method: header
  body_format: json
fake-tenant:
  auth_mode: OAUTH2
  authorization_url: {base}/${connectionConfig.subdomain}/authorize
  token_url: {base}/${connectionConfig.subdomain}/token
  scope_separator: ','
  token_response_metadata:
    - instance_url
fake-oauth1:
  auth_mode: OAUTH1
  request_url: {base}/oauth1/request_token
  authorization_url: {base}/oauth1/authorize
  token_url: {base}/oauth1/access_token
  signature_method: HMAC-SHA1
  proxy:
    base_url: {base}
  authorization_params:
    expiration: never
  token_response_metadata:
    - user_id
fake-oauth1-plain:
  auth_mode: OAUTH1
  request_url: {base}/oauth1/request_token
  authorization_url: {base}/oauth1/authorize
  token_url: {base}/oauth1/access_token
  signature_method: PLAINTEXT
fake-key:
  auth_mode: API_KEY
  proxy:
    base_url: {base}
    headers:
      authorization: Bearer ${apiKey}
    verification:
      endpoints: [/api/me]
fake-login:
  auth_mode: BASIC
  proxy:
    base_url: {base}
    verification:
      method: GET
      endpoints: [/api/me]
fake-key-unchecked:
  auth_mode: API_KEY
fake-cc:
  auth_mode: OAUTH2_CC
  token_url: {base}/token
fake-cc-jwt:
  auth_mode: OAUTH2_CC
  token_url: {base}/token
  token_request_auth_method: private_key_jwt
";

/// `grantline serve` for these tests on `db` with master key `key`: the providers file
/// `providers`, the app's origin allowed as a redirect, and the flags `extra`.
fn config(db: &TestDatabase, key: &str, providers: &Path, extra: &[&str]) -> Config {
    let mut args = vec![
        "--redirect-allowlist",
        APP_ORIGIN,
        "--providers-file",
        providers.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    config_on(db, key, &args)
}

pub(crate) async fn env(db: &TestDatabase, extra: &[&str]) -> Env {
    let fake = FakeProvider::start().await;
    let (dir, providers) = fake.providers_file(TEMPLATES);
    let key = new_key();
    let app = spawn_config(config(db, &key, &providers, extra)).await;
    let env = Env {
        app,
        fake,
        browser: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(true)
            .build()
            .unwrap(),
        secret_key: extra.contains(&"--secret-key"),
        key,
        providers,
        _dir: dir,
    };
    for (key, provider, scopes) in [
        ("fake", "fake", "read,write"),
        ("fake-basic", "fake-basic", "read"),
        ("fake-tenant", "fake-tenant", "read,write"),
        ("fake-oauth1", "fake-oauth1", "read,write"),
        ("fake-oauth1-plain", "fake-oauth1-plain", ""),
        ("fake-key", "fake-key", ""),
        ("fake-login", "fake-login", ""),
        ("fake-key-unchecked", "fake-key-unchecked", ""),
        ("fake-cc", "fake-cc", "read"),
        ("fake-cc-jwt", "fake-cc-jwt", ""),
    ] {
        env.create_config(key, provider, scopes).await;
    }
    env
}

impl Env {
    async fn create_config(&self, key: &str, provider: &str, scopes: &str) {
        self.create_config_with(key, provider, scopes, CLIENT_SECRET)
            .await;
    }

    async fn create_config_with(&self, key: &str, provider: &str, scopes: &str, secret: &str) {
        let mut request = self.app.client.post(self.app.url("/config")).json(&json!({
            "provider_config_key": key,
            "provider": provider,
            "oauth_client_id": CLIENT_ID,
            "oauth_client_secret": secret,
            "oauth_scopes": scopes,
        }));
        if self.secret_key {
            request = request.bearer_auth(SECRET_KEY);
        }
        ok_json(request.send().await.unwrap()).await;
    }

    /// `GET /connection/:id`, expecting 200.
    pub(crate) async fn connection(&self, key: &str, id: &str) -> Value {
        let mut request = self.app.client.get(
            self.app
                .url(&format!("/connection/{id}?provider_config_key={key}")),
        );
        if self.secret_key {
            request = request.bearer_auth(SECRET_KEY);
        }
        ok_json(request.send().await.unwrap()).await
    }

    /// Asserts the flow recorded no connection `id` of `key`: reading it does not answer 200.
    async fn assert_not_connected(&self, key: &str, id: &str) {
        let status = self
            .app
            .get(&format!("/connection/{id}?provider_config_key={key}"))
            .await
            .status();
        assert_ne!(status, StatusCode::OK, "{key}/{id} is connected");
    }

    pub(crate) async fn connect(&self, key: &str, query: &str) -> reqwest::Response {
        self.get(&self.app.url(&format!("/oauth/connect/{key}?{query}")))
            .await
    }

    pub(crate) async fn get(&self, url: &str) -> reqwest::Response {
        self.browser.get(url).send().await.unwrap()
    }

    /// Connects, expecting a 302 to the fake provider; returns the authorization URL.
    pub(crate) async fn start(&self, key: &str, query: &str) -> Url {
        let response = self.connect(key, query).await;
        let status = response.status();
        let location = location(&response);
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::FOUND, "{body}");
        let location = location.unwrap();
        assert!(location.starts_with(&self.fake.base), "{location}");
        Url::parse(&location).unwrap()
    }

    /// The provider's answer to `authorization_url`: the callback URL it sends the browser to.
    pub(crate) async fn authorize(&self, authorization_url: &Url) -> String {
        let response = self.get(authorization_url.as_str()).await;
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = location(&response).unwrap();
        assert!(
            location.starts_with(&self.app.url("/oauth/callback?")),
            "{location}"
        );
        location
    }

    /// A whole flow; returns the outcome (the callback's answer).
    pub(crate) async fn flow(&self, key: &str, query: &str) -> reqwest::Response {
        let authorization_url = self.start(key, query).await;
        let callback = self.authorize(&authorization_url).await;
        self.get(&callback).await
    }
}

pub(crate) fn location(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn query_of(url: &str) -> Map<String, Value> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect()
}

/// Asserts a 200 success page for `connection_id`; returns it.
async fn success_page(response: reqwest::Response, key: &str, connection_id: &str) -> String {
    let status = response.status();
    let content_type = response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(content_type.starts_with("text/html"));
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(
        body.contains("\"eventType\":\"AUTHORIZATION_SUCEEDED\""),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "\"data\":{{\"connectionId\":\"{connection_id}\",\"providerConfigKey\":\"{key}\"}}"
        )),
        "{body}"
    );
    assert!(body.contains("window.opener.postMessage"));
    // Today's Nango message too, also on the channel its Connect UI listens on.
    assert!(
        body.contains(r#"{"type":"nango_oauth_callback_success"}"#),
        "{body}"
    );
    assert!(
        body.contains("BroadcastChannel('nango-oauth-callback')"),
        "{body}"
    );
    assert_no_secrets(&body);
    body
}

/// Asserts a 400 error page reporting `error_type`, without a redirect; returns it.
pub(crate) async fn error_page(response: reqwest::Response, error_type: &str) -> String {
    let status = response.status();
    assert!(response.headers().get(LOCATION).is_none());
    let content_type = response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(content_type.starts_with("text/html"));
    assert!(
        body.contains("\"eventType\":\"AUTHORIZATION_FAILED\""),
        "{body}"
    );
    assert!(
        body.contains(&format!("\"errorType\":\"{error_type}\""))
            && body.contains("\"type\":\"nango_oauth_callback_error\""),
        "expected today's message too: {body}"
    );
    assert!(
        body.contains(&format!("\"type\":\"{error_type}\"")),
        "expected {error_type}: {body}"
    );
    assert_no_secrets(&body);
    body
}

/// No token, code or client secret in `text`.
fn assert_no_secrets(text: &str) {
    for secret in [
        "fake-access",
        "fake-refresh",
        CLIENT_SECRET,
        "code-",
        "request-SECRET",
        "verifier-",
    ] {
        assert!(!text.contains(secret), "{secret:?} leaked into: {text}");
    }
}

async fn a_pkce_flow_records_the_providers_tokens_and_the_next_read_sees_them(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let authorization_url = env.start("fake", "connection_id=user-1").await;
    let query = query_of(authorization_url.as_str());
    assert_eq!(authorization_url.path(), "/authorize");
    assert_eq!(query["response_type"], "code");
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(
        query["redirect_uri"],
        env.app.url("/oauth/callback").as_str()
    );
    assert_eq!(query["scope"], "read write");
    assert_eq!(query["access_type"], "offline", "the template's params");
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["code_challenge"].as_str().unwrap().len(), 43);
    let state = query["state"].as_str().unwrap();
    assert!(state.len() >= 22, "at least 128 bits");
    assert!(
        state
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "URL-safe: {state}"
    );

    let callback = env.authorize(&authorization_url).await;
    let outcome = env.get(&callback).await;
    success_page(outcome, "fake", "user-1").await;

    let call = env.fake.last_token_call();
    assert!(!call.basic_auth && !call.json_body);
    assert_eq!(call.params["grant_type"], "authorization_code");
    assert_eq!(call.params["client_id"], CLIENT_ID);
    assert_eq!(call.params["redirect_uri"], env.app.url("/oauth/callback"));
    assert!(call.params.contains_key("code_verifier"));

    // Read-your-writes: the very next read has the provider's tokens.
    let connection = env.connection("fake", "user-1").await;
    let (access, refresh) = FakeProvider::tokens(1);
    let credentials = &connection["credentials"];
    assert_eq!(credentials["type"], "OAUTH2");
    assert_eq!(credentials["access_token"], access.as_str());
    assert_eq!(credentials["refresh_token"], refresh.as_str());
    assert_eq!(credentials["raw"]["token_type"], "bearer");
    let expires_at: DateTime<Utc> = credentials["expires_at"].as_str().unwrap().parse().unwrap();
    let in_an_hour = Utc::now() + chrono::Duration::seconds(3600);
    assert!(
        (expires_at - in_an_hour).num_seconds().abs() < 60,
        "{expires_at}"
    );
    assert_eq!(
        connection["connection_config"],
        json!({ "instance_url": "https://www.fake.test", "tenant_hint": "none" }),
        "token_response_metadata and redirect_uri_metadata"
    );
    assert_eq!(connection["provider"], "fake");
}

async fn the_session_keeps_the_flow_with_its_verifier_sealed(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let authorization_url = env
        .start(
            "fake",
            "connection_id=user-1&params[region]=eu&api_redirect_url=http%3A%2F%2Fapp.example.test%2Fdone&ws_client_id=ws-1",
        )
        .await;
    let state = query_of(authorization_url.as_str())["state"]
        .as_str()
        .unwrap()
        .to_owned();
    let backend = db.open().await;
    let session: FlowSession = backend
        .sessions()
        .take_session(&state)
        .await
        .unwrap()
        .expect("the session is stored under its state");
    assert_eq!(session.provider_config_key, "fake");
    assert_eq!(session.provider, "fake");
    assert_eq!(session.connection_id, "user-1");
    assert_eq!(session.callback_url, env.app.url("/oauth/callback"));
    assert_eq!(session.scopes, vec!["read", "write"]);
    assert_eq!(
        Value::Object(session.connection_config.clone()),
        json!({ "region": "eu" })
    );
    assert_eq!(
        session.api_redirect_url.as_deref(),
        Some("http://app.example.test/done")
    );
    assert_eq!(session.ws_client_id.as_deref(), Some("ws-1"));
    assert_eq!(
        session.expires_at - session.created_at,
        chrono::Duration::minutes(10)
    );
    let sealed = session.secrets.clone().expect("the PKCE verifier is kept");
    let key = backend
        .keys()
        .data_key(sealed.key_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.owner, "system-oauth-sessions");
    assert!(
        !format!("{session:?}").contains(&state),
        "Debug hides the state"
    );

    // Taken once: the browser's callback now finds nothing.
    let callback = env.authorize(&authorization_url).await;
    error_page(env.get(&callback).await, "state_err").await;
    assert_eq!(env.fake.token_requests(), 0);
}

async fn without_pkce_the_client_authenticates_with_basic_auth_and_a_json_body(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let authorization_url = env.start("fake-basic", "connection_id=user-2").await;
    let query = query_of(authorization_url.as_str());
    assert!(!query.contains_key("code_challenge"));
    assert!(!query.contains_key("code_challenge_method"));
    assert_eq!(query["scope"], "read");
    let callback = env.authorize(&authorization_url).await;
    success_page(env.get(&callback).await, "fake-basic", "user-2").await;

    let call = env.fake.last_token_call();
    assert!(call.basic_auth, "client credentials as HTTP Basic");
    assert!(call.json_body);
    assert!(!call.params.contains_key("client_id"));
    assert!(!call.params.contains_key("code_verifier"));
    let connection = env.connection("fake-basic", "user-2").await;
    assert_eq!(
        connection["credentials"]["access_token"],
        FakeProvider::tokens(1).0.as_str()
    );
}

async fn connection_config_params_fill_the_provider_urls(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let response = env
        .flow("fake-tenant", "connection_id=t-1&params[subdomain]=acme")
        .await;
    success_page(response, "fake-tenant", "t-1").await;
    let (tenant, query) = env.fake.last_authorize();
    assert_eq!(tenant.as_deref(), Some("acme"));
    assert_eq!(query["scope"], "read,write", "the template's separator");
    assert_eq!(env.fake.last_token_call().tenant.as_deref(), Some("acme"));
    let connection = env.connection("fake-tenant", "t-1").await;
    assert_eq!(
        connection["connection_config"],
        json!({ "subdomain": "acme", "instance_url": "https://acme.fake.test" })
    );

    // Unfillable, or a value that would move the URL elsewhere: refused before the provider.
    let body = error_page(
        env.connect("fake-tenant", "connection_id=t-2").await,
        "url_param_err",
    )
    .await;
    assert!(body.contains("subdomain"), "{body}");
    error_page(
        env.connect(
            "fake-tenant",
            "connection_id=t-2&params[subdomain]=evil.example%2Fx%3F",
        )
        .await,
        "url_param_err",
    )
    .await;
    assert_eq!(env.fake.token_requests(), 1);
}

async fn the_scopes_and_authorization_params_of_the_request_shape_the_authorize_url(
    db: &TestDatabase,
) {
    let env = env(db, &[]).await;
    let authorization_url = env
        .start(
            "fake",
            "connection_id=u&scopes=openid,email%20profile&authorization_params[prompt]=consent\
             &authorization_params[access_type]=undefined",
        )
        .await;
    let query = query_of(authorization_url.as_str());
    assert_eq!(query["scope"], "openid email profile");
    assert_eq!(query["prompt"], "consent");
    assert!(!query.contains_key("access_type"), "`undefined` removes it");
    assert_eq!(
        query["redirect_uri"],
        env.app.url("/oauth/callback").as_str()
    );
    // What the flow's safety rests on cannot be set, nor removed.
    for (name, value) in [
        ("state", "forged"),
        ("redirect_uri", "https%3A%2F%2Fevil.example%2F"),
        ("client_id", "other"),
        ("response_type", "token"),
        ("code_challenge", "known"),
        ("code_challenge_method", "undefined"),
    ] {
        let body = error_page(
            env.connect(
                "fake",
                &format!("connection_id=v&authorization_params[{name}]={value}"),
            )
            .await,
            "invalid_param",
        )
        .await;
        assert!(body.contains("cannot be overridden"), "{body}");
    }
    let callback = env.authorize(&authorization_url).await;
    success_page(env.get(&callback).await, "fake", "u").await;
}

async fn a_provider_denial_reaches_the_page_as_its_code_without_the_providers_text(
    db: &TestDatabase,
) {
    let env = env(db, &[]).await;
    env.fake.deny(true);
    let body = error_page(
        env.flow("fake", "connection_id=user-1").await,
        "callback_err",
    )
    .await;
    assert!(body.contains("access_denied"), "{body}");
    // The description is the provider's (or a forger's) text: logged, never shown.
    assert!(!body.contains("The user said"), "{body}");
    assert!(!body.contains("<no>"));
    assert_eq!(env.fake.token_requests(), 0);
    env.assert_not_connected("fake", "user-1").await;
}

async fn a_callback_without_a_known_state_is_refused_at_once(db: &TestDatabase) {
    let env = env(db, &[]).await;
    for query in [
        "",
        "?code=abc",
        "?state=&code=abc",
        "?state=not-a-state&code=abc",
        // Never looked up: NUL once reached PostgreSQL as a 503.
        "?state=a%00b&code=abc",
        "?state=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA%00&code=abc",
        "?state=%FF%FE&code=abc",
    ] {
        let started = Instant::now();
        let response = env
            .get(&env.app.url(&format!("/oauth/callback{query}")))
            .await;
        error_page(response, "state_err").await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(env.fake.token_requests(), 0);
}

async fn a_state_is_accepted_once_even_by_concurrent_callbacks(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let authorization_url = env.start("fake", "connection_id=user-1").await;
    let callback = env.authorize(&authorization_url).await;
    let (a, b, c, d) = tokio::join!(
        env.get(&callback),
        env.get(&callback),
        env.get(&callback),
        env.get(&callback)
    );
    let mut successes = 0;
    for answer in [a, b, c, d] {
        if answer.status() == StatusCode::OK {
            successes += 1;
            success_page(answer, "fake", "user-1").await;
        } else {
            error_page(answer, "state_err").await;
        }
    }
    assert_eq!(successes, 1);
    assert_eq!(env.fake.token_requests(), 1, "one code exchange");
    // Replayed later: still refused.
    error_page(env.get(&callback).await, "state_err").await;
    assert_eq!(env.fake.token_requests(), 1);
}

async fn an_expired_state_is_refused_without_calling_the_provider(db: &TestDatabase) {
    let env = env(db, &["--oauth-session-lifetime", "1s"]).await;
    let authorization_url = env.start("fake", "connection_id=user-1").await;
    let callback = env.authorize(&authorization_url).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = error_page(env.get(&callback).await, "state_err").await;
    assert!(body.contains("expired"), "{body}");
    assert_eq!(env.fake.token_requests(), 0);
    env.assert_not_connected("fake", "user-1").await;
}

fn session(state: &str, created_at: DateTime<Utc>, lifetime: chrono::Duration) -> FlowSession {
    FlowSession {
        only_new: Default::default(),
        only_existing: true,
        ownership: Default::default(),
        state: state.to_owned(),
        provider_config_key: "k".into(),
        provider: "p".into(),
        connection_id: "c".into(),
        callback_url: "http://127.0.0.1:3003/oauth/callback".into(),
        connection_config: Map::from_iter([("subdomain".to_owned(), json!("acme"))]),
        scopes: vec!["a".into(), "b".into()],
        api_redirect_url: None,
        ws_client_id: Some("ws".into()),
        secrets: None,
        created_at,
        expires_at: created_at + lifetime,
    }
}

async fn expired_sessions_are_swept_and_live_ones_kept(db: &TestDatabase) {
    let backend = db.open().await;
    // Whole milliseconds: both backends keep microseconds.
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let old = session(
        "old",
        now - chrono::Duration::minutes(20),
        chrono::Duration::minutes(10),
    );
    let live = session("live", now, chrono::Duration::minutes(10));
    for s in [&old, &live] {
        backend.sessions().create_session(s).await.unwrap();
    }
    // Dashboard sign-outs: kept while their session could still be shown, then swept too.
    let sign_outs = backend.sign_outs();
    sign_outs
        .sign_out("expired", now - chrono::Duration::minutes(1))
        .await
        .unwrap();
    for _ in 0..2 {
        sign_outs
            .sign_out("current", now + chrono::Duration::hours(1))
            .await
            .unwrap();
    }
    assert!(sign_outs.signed_out("current").await.unwrap());
    assert!(!sign_outs.signed_out("never").await.unwrap());
    assert!(
        backend.sessions().create_session(&live).await.is_err(),
        "a state exists once"
    );
    assert_eq!(
        workers::sessions::sweep_once(&backend, now).await.unwrap(),
        2
    );
    assert!(!sign_outs.signed_out("expired").await.unwrap());
    assert!(sign_outs.signed_out("current").await.unwrap());
    assert_eq!(
        workers::sessions::sweep_once(&backend, now).await.unwrap(),
        0
    );
    assert!(
        backend
            .sessions()
            .take_session("old")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        backend.sessions().take_session("live").await.unwrap(),
        Some(live)
    );
    assert!(
        backend
            .sessions()
            .take_session("live")
            .await
            .unwrap()
            .is_none()
    );
}

async fn a_slow_token_endpoint_fails_the_flow_at_the_timeout(db: &TestDatabase) {
    let env = env(db, &["--provider-timeout", "1s"]).await;
    env.fake.set_mode(TokenMode::Slow(Duration::from_secs(4)));
    let authorization_url = env.start("fake", "connection_id=user-1").await;
    let callback = env.authorize(&authorization_url).await;
    let started = Instant::now();
    let body = error_page(env.get(&callback).await, "token_err").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(body.contains("did not answer in time"), "{body}");
    env.assert_not_connected("fake", "user-1").await;
}

async fn a_failing_token_endpoint_is_a_token_error_not_a_server_error(db: &TestDatabase) {
    let env = env(db, &[]).await;
    for status in [500, 503] {
        env.fake.set_mode(TokenMode::Status(status));
        let body = error_page(env.flow("fake", "connection_id=user-1").await, "token_err").await;
        assert!(body.contains(&format!("HTTP {status}")), "{body}");
        assert!(
            body.contains("server_error"),
            "the provider's error: {body}"
        );
    }
    assert_eq!(env.fake.token_requests(), 2);
    env.assert_not_connected("fake", "user-1").await;
}

async fn a_non_json_token_answer_is_a_token_error(db: &TestDatabase) {
    let env = env(db, &[]).await;
    env.fake.set_mode(TokenMode::NotJson);
    let body = error_page(env.flow("fake", "connection_id=user-1").await, "token_err").await;
    assert!(body.contains("not a token response"), "{body}");
    assert!(
        !body.contains("Maintenance"),
        "the provider's page is not echoed"
    );
}

async fn form_encoded_tokens_are_accepted(db: &TestDatabase) {
    let env = env(db, &[]).await;
    env.fake.set_mode(TokenMode::Form);
    success_page(
        env.flow("fake", "connection_id=user-1").await,
        "fake",
        "user-1",
    )
    .await;
    let credentials = env.connection("fake", "user-1").await["credentials"].clone();
    assert_eq!(
        credentials["access_token"],
        FakeProvider::tokens(1).0.as_str()
    );
    assert_eq!(credentials["raw"]["expires_in"], "3600");
    assert!(credentials["expires_at"].is_string());
}

async fn an_allow_listed_api_redirect_url_gets_the_outcome_with_its_query_kept(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let redirect = "api_redirect_url=http%3A%2F%2Fapp.example.test%2Fdone%3Fx%3D1";
    let outcome = env
        .flow("fake", &format!("connection_id=user-1&{redirect}"))
        .await;
    assert_eq!(outcome.status(), StatusCode::FOUND);
    assert_eq!(
        location(&outcome).unwrap(),
        "http://app.example.test/done?x=1&connection_id=user-1&provider_config_key=fake"
    );
    env.connection("fake", "user-1").await;

    env.fake.deny(true);
    let outcome = env
        .flow("fake", &format!("connection_id=user-2&{redirect}"))
        .await;
    assert_eq!(outcome.status(), StatusCode::FOUND);
    let target = location(&outcome).unwrap();
    assert!(target.starts_with("http://app.example.test/done?x=1&message_type=error"));
    let query = query_of(&target);
    assert_eq!(query["error_type"], "callback_err");
    assert!(
        query["error_desc"]
            .as_str()
            .unwrap()
            .contains("(access_denied)")
    );

    // A failure at connect goes there too.
    let outcome = env.connect("fake", redirect).await;
    assert_eq!(outcome.status(), StatusCode::FOUND);
    let query = query_of(&location(&outcome).unwrap());
    assert_eq!(query["error_type"], "missing_connection_id");
}

async fn an_api_redirect_url_off_the_allow_list_gets_a_page_and_no_redirect(db: &TestDatabase) {
    let env = env(db, &[]).await;
    for url in [
        "https%3A%2F%2Fevil.example%2Fdone",
        "https%3A%2F%2Fapp.example.test%2Fdone",
        "http%3A%2F%2Fapp.example.test.evil.example%2F",
        "http%3A%2F%2Fapp.example.test%40evil.example%2F",
        "javascript%3Aalert(1)",
        "not a url",
    ] {
        let response = env
            .connect(
                "fake",
                &format!("connection_id=user-1&api_redirect_url={url}"),
            )
            .await;
        error_page(response, "invalid_api_redirect_url").await;
    }
    // The same origin with another path is fine.
    let response = env
        .connect(
            "fake",
            "connection_id=user-1&api_redirect_url=http%3A%2F%2Fapp.example.test%3A80%2Fother",
        )
        .await;
    assert_eq!(response.status(), StatusCode::FOUND);
}

async fn a_success_redirect_is_signed_with_the_secret_key(db: &TestDatabase) {
    let env = env(db, &["--secret-key", SECRET_KEY, "--public-key", "pk"]).await;
    let outcome = env
        .flow(
            "fake",
            "connection_id=user%201&public_key=pk&api_redirect_url=http%3A%2F%2Fapp.example.test%2Fdone",
        )
        .await;
    assert_eq!(outcome.status(), StatusCode::FOUND);
    let query = query_of(&location(&outcome).unwrap());
    assert_eq!(query["connection_id"], "user 1");
    assert_eq!(query["provider_config_key"], "fake");
    let timestamp = query["timestamp"].as_str().unwrap();
    let age = Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "{age}");
    // What the README tells apps to do: derive the redirect key, sign with it.
    let mut derive = Hmac::<Sha256>::new_from_slice(SECRET_KEY.as_bytes()).unwrap();
    derive.update(b"grantline redirect signature");
    let redirect_key = hex::encode(derive.finalize().into_bytes());
    assert!(!location(&outcome).unwrap().contains(&redirect_key));
    let signature = |connection_id: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(redirect_key.as_bytes()).unwrap();
        mac.update(format!("{connection_id}\nfake\n{timestamp}").as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(query["signature"], signature("user 1").as_str());
    assert_ne!(query["signature"], signature("user 2").as_str());
    env.connection("fake", "user%201").await;
}

async fn a_second_authorization_is_generation_two_with_the_new_tokens(db: &TestDatabase) {
    let env = env(db, &[]).await;
    for _ in 0..2 {
        success_page(
            env.flow("fake", "connection_id=user-1").await,
            "fake",
            "user-1",
        )
        .await;
    }
    let connection = env.connection("fake", "user-1").await;
    let (access, refresh) = FakeProvider::tokens(2);
    assert_eq!(connection["credentials"]["access_token"], access.as_str());
    assert_eq!(connection["credentials"]["refresh_token"], refresh.as_str());
    let backend = db.open().await;
    let read_models = projections::ReadModels::open(&backend);
    let key = ConnectionKey::new("fake", "user-1");
    let record = projections::queries::find_connection(&read_models, &key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.connection.generation, 2);
    let live =
        domain::keys::KeyRepository::live_data_keys(backend.keys(), key.stream_id().as_str())
            .await
            .unwrap();
    assert_eq!(live.len(), 2, "a new data key");
    assert_eq!(live[1], record.connection.credentials.key_id);
    assert_eq!(record.connection.flow, domain::connection::Flow::Oauth2);
}

async fn connect_refuses_unknown_integrations_templates_and_missing_ids(db: &TestDatabase) {
    let env = env(db, &[]).await;
    error_page(env.connect("fake", "").await, "missing_connection_id").await;
    error_page(
        env.connect("fake", "connection_id=%20").await,
        "missing_connection_id",
    )
    .await;
    error_page(
        env.connect("nope", "connection_id=user-1").await,
        "provider_config_err",
    )
    .await;
    // The API refuses a config whose provider has no template...
    let response = env
        .app
        .post_json(
            "/config",
            &json!({"provider_config_key": "ghost", "provider": "no-such-template",
                    "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET}),
        )
        .await;
    crate::assert_error(response, 400, "unknown_provider_template").await;
    // ...but a template can vanish from the providers file after its config was made (here by
    // an instance that had it): connect then refuses the config.
    let (_dir, file) = env.fake.providers_file(&format!(
        "{TEMPLATES}vanishing:\n  auth_mode: OAUTH2\n  authorization_url: {{base}}/authorize\n  \
         token_url: {{base}}/token\n"
    ));
    let providers = file.to_str().unwrap();
    let other = spawn_config(config_on(db, &env.key, &["--providers-file", providers])).await;
    ok_json(
        other
            .post_json(
                "/config",
                &json!({"provider_config_key": "ghost", "provider": "vanishing",
                        "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET}),
            )
            .await,
    )
    .await;
    error_page(
        env.connect("ghost", "connection_id=user-1").await,
        "unknown_config_key",
    )
    .await;
    error_page(
        env.connect("fake", &format!("connection_id={}", "x".repeat(300)))
            .await,
        "invalid_param",
    )
    .await;
}

async fn hmac_and_public_key_are_required_when_configured(db: &TestDatabase) {
    let env = env(
        db,
        &[
            "--hmac-key",
            "hmac-test-key",
            "--public-key",
            "public-test-key",
        ],
    )
    .await;
    let mut mac = Hmac::<Sha256>::new_from_slice(b"hmac-test-key").unwrap();
    mac.update(b"fake:user-1");
    let hmac: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cases = [
        (
            format!("connection_id=user-1&hmac={hmac}"),
            "missing_public_key",
        ),
        (
            format!("connection_id=user-1&hmac={hmac}&public_key=wrong"),
            "invalid_public_key",
        ),
        (
            "connection_id=user-1&public_key=public-test-key".to_owned(),
            "missing_hmac",
        ),
        (
            format!("connection_id=user-2&public_key=public-test-key&hmac={hmac}"),
            "invalid_hmac",
        ),
    ];
    for (query, error_type) in cases {
        error_page(env.connect("fake", &query).await, error_type).await;
    }
    let response = env
        .flow(
            "fake",
            &format!("connection_id=user-1&public_key=public-test-key&hmac={hmac}"),
        )
        .await;
    success_page(response, "fake", "user-1").await;
}

/// A WebSocket client of the service, as `@nangohq/frontend` opens it.
struct Socket {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The `ws_client_id` the service acknowledged it with.
    id: String,
}

impl Socket {
    async fn open(app: &TestApp) -> Self {
        let url = app.url("/").replacen("http://", "ws://", 1);
        let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut socket = Self {
            stream,
            id: String::new(),
        };
        let ack = socket.next().await.expect("an ack");
        assert_eq!(ack["message_type"], "connection_ack");
        socket.id = ack["ws_client_id"].as_str().unwrap().to_owned();
        socket
    }

    /// The query naming `connection_id` and this socket.
    fn query(&self, connection_id: &str) -> String {
        format!("connection_id={connection_id}&ws_client_id={}", self.id)
    }

    /// After a successful flow of `fake` for `connection_id` (whose page `env` checks), the
    /// socket hears the success.
    async fn hears_a_successful_flow(&mut self, env: &Env, connection_id: &str) {
        let outcome = env.flow("fake", &self.query(connection_id)).await;
        success_page(outcome, "fake", connection_id).await;
        assert_eq!(
            self.next().await,
            Some(json!({
                "message_type": "success",
                "provider_config_key": "fake",
                "connection_id": connection_id,
            }))
        );
    }

    /// After a connect to the unknown integration `nope` for `connection_id` fails with an
    /// error page, the socket hears the same error type.
    async fn hears_a_failed_connect(&mut self, env: &Env, connection_id: &str) {
        let page = env.connect("nope", &self.query(connection_id)).await;
        error_page(page, "provider_config_err").await;
        assert_eq!(
            self.next().await.unwrap()["error_type"],
            "provider_config_err"
        );
    }

    /// The next text message as JSON; `None` once the server closed the socket.
    async fn next(&mut self) -> Option<Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("the server answers within 10 s");
            match message {
                Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }
}

async fn a_websocket_client_hears_the_outcome_of_its_flow(db: &TestDatabase) {
    let env = env(db, &[]).await;
    // Without an upgrade, `/` is no route.
    assert_error(env.app.get("/").await, 404, "not_found").await;
    let mut socket = Socket::open(&env.app).await;
    let mut other = Socket::open(&env.app).await;
    socket.hears_a_successful_flow(&env, "user-1").await;
    assert_eq!(socket.next().await, None, "closed after the outcome");

    env.fake.deny(true);
    let mut socket = Socket::open(&env.app).await;
    let outcome = env.flow("fake", &socket.query("user-2")).await;
    error_page(outcome, "callback_err").await;
    let message = socket.next().await.unwrap();
    assert_eq!(message["message_type"], "error");
    assert_eq!(message["error_type"], "callback_err");
    assert_eq!(message["provider_config_key"], "fake");
    assert_eq!(message["connection_id"], "user-2");
    assert!(
        message["error_desc"]
            .as_str()
            .unwrap()
            .contains("(access_denied)")
    );

    // A failure at connect is reported too.
    let mut socket = Socket::open(&env.app).await;
    socket.hears_a_failed_connect(&env, "user-3").await;

    // A callback replayed in another browser is refused there and told to no one else: the
    // socket hears the outcome of the flow's own browser, which still finishes it.
    env.fake.deny(false);
    let mut socket = Socket::open(&env.app).await;
    let callback = env
        .authorize(&env.start("fake", &socket.query("user-4")).await)
        .await;
    let stranger = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    error_page(
        stranger.get(&callback).send().await.unwrap(),
        "state_cookie_err",
    )
    .await;
    success_page(env.get(&callback).await, "fake", "user-4").await;
    assert_eq!(socket.next().await.unwrap()["message_type"], "success");

    // Nothing reached the client that was not named.
    drop(env);
    assert_eq!(other.next().await, None);
}

/// The WebSocket and the callback may land on different instances behind a load balancer: the
/// outcome is relayed to the instance holding the socket.
#[tokio::test]
async fn a_websocket_on_one_instance_hears_a_flow_finished_on_another() {
    let db = TestDatabase::postgres().await;
    let env = env(&db, &[]).await;
    let other = spawn_config(config(&db, &env.key, &env.providers, &[])).await;
    let mut socket = Socket::open(&other).await;
    socket.hears_a_successful_flow(&env, "user-1").await;

    // A failure at connect on the first instance reaches the socket on the other too.
    let mut socket = Socket::open(&other).await;
    socket.hears_a_failed_connect(&env, "user-2").await;
}

#[tokio::test]
async fn an_invalid_providers_file_stops_start_up_naming_the_file_and_entry() {
    let db = TestDatabase::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad-providers.yaml");
    std::fs::write(
        &file,
        "broken:\n  auth_mode: OAUTH2\n  token_url: https://x.example/token\n",
    )
    .unwrap();
    let config = config_on(
        &db,
        &new_key(),
        &["--providers-file", file.to_str().unwrap()],
    );
    let error = grantline::startup::Application::build(config)
        .await
        .expect_err("start-up fails");
    let message = format!("{error:#}");
    assert!(message.contains("GRANTLINE_PROVIDERS_FILE"), "{message}");
    assert!(message.contains("bad-providers.yaml"), "{message}");
    assert!(message.contains("`broken`"), "{message}");
}

async fn an_oauth1_flow_records_signed_token_credentials(db: &TestDatabase) {
    let env = env(db, &[]).await;
    let authorization_url = env.start("fake-oauth1", "connection_id=o-1").await;
    assert_eq!(authorization_url.path(), "/oauth1/authorize");
    let query = query_of(authorization_url.as_str());
    assert_eq!(query["oauth_token"], "request-token-1");
    assert_eq!(query["scope"], "read write");
    assert_eq!(query["expiration"], "never");
    assert!(
        !query.contains_key("state"),
        "OAuth 1.0a carries it in the callback URL"
    );
    let callback = env.authorize(&authorization_url).await;
    assert!(callback.contains("state="), "{callback}");
    success_page(env.get(&callback).await, "fake-oauth1", "o-1").await;

    let connection = env.connection("fake-oauth1", "o-1").await;
    let (token, secret) = FakeProvider::oauth1_tokens(1);
    let credentials = &connection["credentials"];
    assert_eq!(credentials["type"], "OAUTH1");
    assert_eq!(credentials["oauth_token"], token.as_str());
    assert_eq!(credentials["oauth_token_secret"], secret.as_str());
    assert_eq!(credentials["raw"]["screen_name"], "ada");
    assert_eq!(connection["connection_config"], json!({ "user_id": "42" }));

    // The proxy signs calls with the token credentials (method, URL and query signed).
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let proxied = env
            .app
            .client
            .request(
                method.clone(),
                env.app.url("/proxy/api/echo?page=2&q=a%20b"),
            )
            .header("Connection-Id", "o-1")
            .header("Provider-Config-Key", "fake-oauth1")
            .send()
            .await
            .unwrap();
        let echo = ok_json(proxied).await;
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["query"], "page=2&q=a%20b");
    }

    // PLAINTEXT signatures, and no scopes.
    let authorization_url = env.start("fake-oauth1-plain", "connection_id=o-2").await;
    assert!(!query_of(authorization_url.as_str()).contains_key("scope"));
    let callback = env.authorize(&authorization_url).await;
    success_page(env.get(&callback).await, "fake-oauth1-plain", "o-2").await;
    let connection = env.connection("fake-oauth1-plain", "o-2").await;
    assert_eq!(
        connection["credentials"]["oauth_token"],
        FakeProvider::oauth1_tokens(2).0.as_str()
    );
    let read_models = projections::ReadModels::open(&db.open().await);
    let record = projections::queries::find_connection(
        &read_models,
        &ConnectionKey::new("fake-oauth1-plain", "o-2"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(record.connection.flow, domain::connection::Flow::Oauth1);
}

async fn oauth1_denials_replays_and_foreign_tokens_are_refused(db: &TestDatabase) {
    let env = env(db, &[]).await;
    // A callback whose oauth_token belongs to another flow.
    let first = env.start("fake-oauth1", "connection_id=o-1").await;
    let second = env.start("fake-oauth1", "connection_id=o-2").await;
    let first_callback = env.authorize(&first).await;
    let second_callback = env.authorize(&second).await;
    let second_query = query_of(&second_callback);
    let mut forged = Url::parse(&first_callback).unwrap();
    let kept: Vec<(String, String)> = forged
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| k == "state")
        .collect();
    forged
        .query_pairs_mut()
        .clear()
        .extend_pairs(&kept)
        .append_pair("oauth_token", second_query["oauth_token"].as_str().unwrap())
        .append_pair(
            "oauth_verifier",
            second_query["oauth_verifier"].as_str().unwrap(),
        );
    error_page(env.get(forged.as_str()).await, "callback_err").await;
    assert_eq!(env.fake.token_requests(), 0);

    // The second flow still completes, once.
    success_page(env.get(&second_callback).await, "fake-oauth1", "o-2").await;
    error_page(env.get(&second_callback).await, "state_err").await;
    assert_eq!(env.fake.token_requests(), 1);

    // A callback without a verifier.
    let third = env.start("fake-oauth1", "connection_id=o-3").await;
    let callback = env.authorize(&third).await;
    let state = query_of(&callback)["state"].as_str().unwrap().to_owned();
    error_page(
        env.get(&env.app.url(&format!("/oauth/callback?state={state}")))
            .await,
        "callback_err",
    )
    .await;

    // The provider refuses the request token (a wrong client secret): reported at connect.
    env.create_config_with("wrong", "fake-oauth1", "", "not-the-secret")
        .await;
    let body = error_page(env.connect("wrong", "connection_id=o-5").await, "token_err").await;
    assert!(
        body.contains("HTTP 401") && body.contains("signature_invalid"),
        "{body}"
    );
    assert!(!body.contains("not-the-secret"));

    env.fake.deny(true);
    let body = error_page(
        env.flow("fake-oauth1", "connection_id=o-4").await,
        "callback_err",
    )
    .await;
    assert!(body.contains("denied"), "{body}");
    assert_eq!(env.fake.token_requests(), 1);
}

/// Without an HMAC key anyone may start a flow: one address may start only so many a minute,
/// and only so many may be open at once (429 and 503, as error pages).
async fn anonymous_flow_starts_are_limited_per_address_and_in_all(db: &TestDatabase) {
    let env = env(db, &["--flows-per-minute", "3"]).await;
    for n in 0..3 {
        env.start("fake", &format!("connection_id=rate-{n}")).await;
    }
    let refused = env.connect("fake", "connection_id=rate-3").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = refused.text().await.unwrap();
    assert!(body.contains("rate_limit_err"), "{body}");

    // A second instance on the same database, allowing four open flows: three are open.
    let other = spawn_config(config(
        db,
        &env.key,
        &env.providers,
        &["--max-open-flows", "4"],
    ))
    .await;
    let connect = |id: &str| other.url(&format!("/oauth/connect/fake?connection_id={id}"));
    assert_eq!(
        env.get(&connect("open-4")).await.status(),
        StatusCode::FOUND
    );
    let refused = env.get(&connect("open-5")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = refused.text().await.unwrap();
    assert!(body.contains("rate_limit_err"), "{body}");
    let metrics = other.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("grantline_http_refused_total{limit=\"open_flows\"} 1"),
        "{metrics}"
    );
}
