//! The hosted Connect UI (`/connect/`), in a real browser: headless Chromium driven by
//! `playwright-core` (`tests/node/connect_ui.mjs`) against the `grantline` binary on PostgreSQL,
//! with the in-process fake provider behind an OAuth 2 integration and an API-key one. The script
//! connects through a session's `connect_link` (OAuth popup and API-key form), through
//! `@nangohq/frontend`'s `openConnectUI` from another site's page, through a reconnect session,
//! and shows what an expired, deleted or unknown token and a refused integration look like. It
//! saves a screenshot of every state under a temporary directory whose path the test prints.
//!
//! Headers and routes that need no browser are checked first, on the service in process.

use std::process::Command;
use std::time::Duration;

use domain::testing::TestDatabase;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cli::grantline;
use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider};
use crate::node::{
    Running, install_client, node_dir, require_chromium, require_node, run_script,
    serve_on_loopback, wait_healthy,
};
use crate::{TestApp, new_key, spawn_app_with_secret};

/// The server's secret key.
const SECRET: &str = "connect-ui-test-secret-0123456789abcdef";

/// The script runs in well under a minute; past this it is stuck, not slow.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// `POST path` with the secret key, expecting `status`; the answer's JSON.
async fn post_with_key(app: &TestApp, path: &str, body: &Value, status: StatusCode) -> Value {
    let response = app
        .client
        .post(app.url(path))
        .bearer_auth(SECRET)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), status, "POST {path}");
    response.json().await.unwrap()
}

/// The value of the header `name` (which must be there).
fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn the_connect_ui_page_and_assets_are_served_with_their_security_headers() {
    let db = TestDatabase::postgres().await;
    let app = spawn_app_with_secret(&db, &new_key(), SECRET).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // No secret key needed: the page reads its session token itself.
    let token = format!("nango_connect_session_{}", "ab".repeat(32));
    let page = no_redirects
        .get(app.url(&format!(
            "/connect/?session_token={token}&apiURL=https%3A%2F%2Fapi.example%3A8443"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "referrer-policy"), "no-referrer");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    assert_eq!(header(&page, "cache-control"), "no-store");
    // The app that opened the UI may frame it.
    assert!(page.headers().get("x-frame-options").is_none());
    let csp = header(&page, "content-security-policy").to_owned();
    assert!(!csp.contains("frame-ancestors"), "{csp}");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing: {csp}");
    }
    let connect_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("connect-src "))
        .unwrap_or_else(|| panic!("no connect-src: {csp}"));
    let own = app.address.clone();
    let own_socket = own.replacen("http://", "ws://", 1);
    for source in [
        "'self'",
        own.as_str(),
        own_socket.as_str(),
        "https://api.example:8443",
        "wss://api.example:8443",
    ] {
        assert!(
            connect_src.split(' ').any(|s| s == source),
            "{source} missing: {connect_src}"
        );
    }
    // The server never writes the token into the page.
    let html = page.text().await.unwrap();
    assert!(!html.contains(&token));
    assert!(html.contains("assets/connect.js"), "{html}");

    // `/connect` goes to the page, query kept.
    let moved = no_redirects
        .get(app.url(&format!("/connect?session_token={token}&apiURL=x")))
        .send()
        .await
        .unwrap();
    assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        header(&moved, "location"),
        format!("connect/?session_token={token}&apiURL=x")
    );
    assert_eq!(header(&moved, "referrer-policy"), "no-referrer");
    let resolved = app
        .get(&format!("/connect?session_token={token}"))
        .await
        .url()
        .clone();
    assert_eq!(resolved.path(), "/connect/");
    assert_eq!(
        resolved.query(),
        Some(format!("session_token={token}").as_str())
    );

    for (path, content_type) in [
        (
            "/connect/assets/connect.js",
            "text/javascript; charset=utf-8",
        ),
        ("/connect/assets/connect.css", "text/css; charset=utf-8"),
    ] {
        let asset = app.get(path).await;
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&asset, "content-type"), content_type, "{path}");
        assert_eq!(header(&asset, "x-content-type-options"), "nosniff");
        assert!(!asset.text().await.unwrap().is_empty());
    }
    let unknown = app.get("/connect/assets/other.js").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_user_connects_through_the_connect_ui_in_a_real_browser() {
    require_node();
    let chromium = require_chromium();
    let node_dir = node_dir();
    install_client(&node_dir);

    let db = TestDatabase::postgres().await;
    let fake = FakeProvider::start().await;
    let (dir, providers) = fake.providers_file(
        "fake-key:\n  auth_mode: API_KEY\n  proxy:\n    base_url: {base}\n    headers:\n      \
         authorization: Bearer ${apiKey}\n    verification:\n      endpoints: [/api/me]\n",
    );
    let (command, base) = serve_on_loopback(grantline(), SECRET, &providers, db.url());
    let mut server = Running::spawn(command, dir.path().join("grantline.log"));
    wait_healthy(&mut server, &base).await;
    let app = TestApp::client_of(&base);

    // The integrations, as the app's backend makes them.
    post_with_key(
        &app,
        "/integrations",
        &json!({
            "provider": "fake", "unique_key": "fake-crm",
            "credentials": {
                "type": "OAUTH2", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "scopes": "read",
            },
        }),
        StatusCode::OK,
    )
    .await;
    post_with_key(
        &app,
        "/integrations",
        &json!({"provider": "fake-key", "unique_key": "fake-keys"}),
        StatusCode::OK,
    )
    .await;

    // A session that has expired: made now, then aged in the database (sessions live 30
    // minutes).
    let expired = post_with_key(
        &app,
        "/connect/sessions",
        &json!({"end_user": {"id": "late-user"}}),
        StatusCode::CREATED,
    )
    .await;
    let expired = expired["data"]["token"].as_str().unwrap().to_owned();
    let aged = db
        .postgres_client()
        .await
        .execute(
            "UPDATE connect_sessions SET created_at = now() - interval '2 hours', \
             expires_at = now() - interval '1 hour' WHERE token_hash = $1",
            &[&domain::connect_session::token_hash(&expired)],
        )
        .await
        .unwrap();
    assert_eq!(aged, 1);

    let screenshots = tempfile::tempdir().unwrap();
    println!("screenshots: {}", screenshots.path().display());
    let mut command = Command::new("node");
    command
        .arg("connect_ui.mjs")
        .current_dir(&node_dir)
        .env("GRANTLINE_URL", &base)
        .env("GRANTLINE_SECRET", SECRET)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOTS_DIR", screenshots.path())
        .env("EXPIRED_TOKEN", &expired)
        .env("OAUTH_INTEGRATION", "fake-crm")
        .env("API_KEY_INTEGRATION", "fake-keys")
        .env("FAKE_API_KEY", FakeProvider::API_KEY);
    let printed = run_script(
        command,
        dir.path().join("connect_ui.log"),
        SCRIPT_TIMEOUT,
        &server,
    )
    .await;
    println!("{printed}");
    // Kept for a look with --no-capture; set GRANTLINE_KEEP_SCREENSHOTS to keep them after.
    if std::env::var_os("GRANTLINE_KEEP_SCREENSHOTS").is_some() {
        let kept = screenshots.keep();
        println!("screenshots kept in {}", kept.display());
    }
}
