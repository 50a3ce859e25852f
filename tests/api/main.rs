//! End-to-end tests of the `grantline` service and binary, against real PostgreSQL and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod architecture;
mod auth;
mod cli;
mod compaction;
mod connect_sessions;
mod connect_ui;
mod connection_lists;
mod connections;
mod cors;
mod credential_auth;
mod dashboard;
mod db_outage;
mod fake_api;
mod fake_provider;
mod fake_service;
mod history;
mod import;
mod limits;
mod malformed;
mod nango_import;
mod node;
mod node_client;
mod oauth;
mod observe;
mod openapi;
mod operators;
mod proxy;
mod proxy_tls;
mod refresh;
mod scheduler;
mod serve;
mod webhooks;

use clap::Parser;
use domain::testing::TestDatabase;
use grantline::config::{Cli, Command, Config};
use grantline::startup::Application;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

/// A running service on a random port, stopped when dropped (unless it runs elsewhere: see
/// [`TestApp::client_of`]).
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    _stop: Option<oneshot::Sender<()>>,
}

/// Parses `grantline serve` arguments as the binary would. Without `--roles`, the instance runs
/// the API and the projections but not the scheduler, whose ticks (every minute) would make
/// provider call counts depend on the clock; scheduler tests drive `tick_once` themselves.
pub fn serve_config(args: &[&str]) -> Config {
    let mut argv = vec!["grantline", "serve"];
    argv.extend_from_slice(args);
    if !args.contains(&"--roles") {
        argv.extend_from_slice(&["--roles", "api,projections"]);
    }
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Serve(args) => args.validate().unwrap(),
        _ => unreachable!(),
    }
}

/// A fresh master key, base64.
pub fn new_key() -> String {
    domain::keys::MasterKey::generate().1.as_str().to_owned()
}

pub async fn spawn_app(db: &TestDatabase, key: &str) -> TestApp {
    spawn_app_with(db, key, &[]).await
}

/// A running service that requires `secret` as its API secret key.
pub async fn spawn_app_with_secret(db: &TestDatabase, key: &str, secret: &str) -> TestApp {
    spawn_app_with(db, key, &["--secret-key", secret]).await
}

/// A running service on `db` with master key `key` and the `grantline serve` flags `args`.
pub async fn spawn_app_with(db: &TestDatabase, key: &str, args: &[&str]) -> TestApp {
    spawn_config(config_on(db, key, args)).await
}

/// The configuration of `grantline serve` on a random port of 127.0.0.1, on `db` with master key
/// `key`, and the flags `extra`.
pub fn config_on(db: &TestDatabase, key: &str, extra: &[&str]) -> Config {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db.url(),
        "--encryption-key",
        key,
    ];
    args.extend_from_slice(extra);
    serve_config(&args)
}

pub async fn spawn_config(config: Config) -> TestApp {
    spawn_with_state(config).await.0
}

/// Like [`spawn_config`], also handing out the application's shared state (its services).
pub async fn spawn_with_state(config: Config) -> (TestApp, grantline::state::AppState) {
    let app = Application::build(config).await.unwrap();
    let state = app.state().clone();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let app = TestApp {
        address,
        client: reqwest::Client::new(),
        _stop: Some(stop),
    };
    (app, state)
}

impl TestApp {
    /// A client of the service at `address` (`http://127.0.0.1:PORT`) that runs elsewhere, as a
    /// child process; dropping it stops nothing.
    pub fn client_of(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            client: reqwest::Client::new(),
            _stop: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// Sends `body` as JSON with `method`.
    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .request(method, self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send_json(Method::POST, path, body).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send_json(Method::PUT, path, body).await
    }

    pub async fn patch_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send_json(Method::PATCH, path, body).await
    }

    /// `GET path`, expecting 200 and a JSON body.
    pub async fn get_ok(&self, path: &str) -> Value {
        ok_json(self.get(path).await).await
    }

    /// The access token `GET path` answers with 200.
    pub async fn access_token(&self, path: &str) -> String {
        let body = self.get_ok(path).await;
        body["credentials"]["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token in {body}"))
            .to_owned()
    }

    /// The `field` of every connection `GET /connection` lists, in list order.
    pub async fn listed(&self, field: &str) -> Vec<String> {
        let list = self.get_ok("/connection").await;
        strings(&list["connections"], field)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `GET path` with `secret` as the bearer token.
    pub async fn get_with_key(&self, path: &str, secret: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap()
    }

    /// Creates the integration `github` on the GitHub template (client id `id`), expecting
    /// success.
    pub async fn create_github_integration(&self, client_secret: &str) -> Value {
        let body = serde_json::json!({
            "provider_config_key": "github", "provider": "github",
            "oauth_client_id": "id", "oauth_client_secret": client_secret,
        });
        ok_json(self.post_json("/config", &body).await).await
    }

    /// Creates the integration `key` on the built-in template `provider`, expecting success
    /// (a client id and secret go along; templates without an OAuth flow ignore them).
    pub async fn create_integration_of(&self, key: &str, provider: &str) -> Value {
        let body = serde_json::json!({
            "provider_config_key": key, "provider": provider,
            "oauth_client_id": "id", "oauth_client_secret": "client-secret",
        });
        ok_json(self.post_json("/config", &body).await).await
    }

    /// Waits until every projection has applied the log up to its head (events committed by
    /// any process, as the instance's runner sees them).
    pub async fn projected(&self) {
        let mut body = Value::Null;
        for _ in 0..800 {
            body = self.get_ok("/admin/projections").await;
            let caught_up = body["projections"]
                .as_array()
                .is_some_and(|all| all.iter().all(|p| p["caught_up"] == true));
            if caught_up {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the projections did not catch up: {body}");
    }

    /// Imports the connection `id` of `github` with the access token `token`, expecting 201.
    pub async fn import_github(&self, id: &str, token: &str) {
        let body = serde_json::json!({
            "provider_config_key": "github", "connection_id": id, "access_token": token,
        });
        let response = self.post_json("/connection", &body).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
}

/// The string `field` of every item of the JSON array `items`, in order.
pub fn strings<'a>(items: &'a Value, field: &str) -> Vec<&'a str> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .map(|item| {
            item[field]
                .as_str()
                .unwrap_or_else(|| panic!("no string {field:?} in {item}"))
        })
        .collect()
}

/// The JSON body of a 2xx answer; panics with the body otherwise.
pub async fn ok_json(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(
        status.is_success(),
        "expected success, got {status}: {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// Asserts `response` is the JSON error `{"error": {"code", "message", "payload"}}` with this
/// status and code, and returns the error object.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let actual = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(actual, StatusCode::from_u16(status).unwrap(), "{text}");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    assert_error_shape(&body);
    assert_eq!(body["error"]["code"], code, "{text}");
    body["error"].clone()
}

/// Asserts `body` is exactly `{"error": {"code": string, "message": string, "payload": object}}`.
pub fn assert_error_shape(body: &Value) {
    if let Some(problem) = error_shape_problem(body) {
        panic!("{problem}: {body}");
    }
}

/// What is wrong with `body` as an error body, if anything.
pub fn error_shape_problem(body: &Value) -> Option<&'static str> {
    let Some(outer) = body.as_object() else {
        return Some("not an object");
    };
    if outer.len() != 1 {
        return Some("more than `error` at the top");
    }
    let Some(error) = body["error"].as_object() else {
        return Some("no `error` object");
    };
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["code", "message", "payload"] {
        return Some("`error` is not exactly {code, message, payload}");
    }
    if error["code"].as_str().is_none_or(str::is_empty) {
        return Some("`code` is not a non-empty string");
    }
    if error["message"].as_str().is_none_or(str::is_empty) {
        return Some("`message` is not a non-empty string");
    }
    if !error["payload"].is_object() {
        return Some("`payload` is not an object");
    }
    None
}
