//! Connect sessions (Nango's `/connect/sessions`) on both backends: made with the secret key,
//! used by a browser with their token to run flows against the in-process fake provider.

use domain::testing::TestDatabase;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::oauth::{Env, SECRET_KEY, env, error_page};
use crate::{assert_error, ok_json};

domain::on_both_backends!(
    a_session_token_runs_a_flow_that_names_the_connection_and_gives_it_the_sessions_tags,
    a_reconnect_session_reauthorizes_exactly_the_connection_it_names,
    sessions_refuse_bad_bodies_foreign_integrations_chosen_ids_and_dead_tokens,
    with_a_secret_key_a_flow_needs_a_session_or_hmac_and_the_public_key_only_creates,
    with_a_secret_key_and_no_public_key_a_bare_flow_is_refused,
    a_callback_in_another_browser_is_refused_and_the_flow_stays_open,
    patching_a_connection_replaces_its_tags_and_end_user,
    integrations_and_providers_answer_the_key_and_a_session_in_todays_shape,
);

const TOKEN_PREFIX: &str = "nango_connect_session_";

pub(crate) async fn secured(db: &TestDatabase) -> Env {
    env(db, &["--secret-key", SECRET_KEY]).await
}

/// `POST path` with the secret key.
pub(crate) async fn post(env: &Env, path: &str, body: &Value) -> reqwest::Response {
    env.app
        .client
        .post(env.app.url(path))
        .bearer_auth(SECRET_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A new session's token.
pub(crate) async fn session(env: &Env, path: &str, body: &Value) -> String {
    let response = post(env, path, body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created = ok_json(response).await;
    let token = created["data"]["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with(TOKEN_PREFIX), "{created}");
    assert_eq!(token.len(), TOKEN_PREFIX.len() + 64);
    assert!(
        created["data"]["connect_link"]
            .as_str()
            .unwrap()
            .ends_with(&format!("?session_token={token}")),
        "{created}"
    );
    let expires: chrono::DateTime<chrono::Utc> = created["data"]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let minutes = (expires - chrono::Utc::now()).num_minutes();
    assert!((28..=30).contains(&minutes), "{created}");
    token
}

/// `method /connect/session` with the session token.
async fn with_token(env: &Env, method: reqwest::Method, token: &str) -> reqwest::Response {
    env.app
        .client
        .request(method, env.app.url("/connect/session"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The connection id a success page reports.
fn reported_id(page: &str) -> String {
    let start = page.find("\"connectionId\":\"").unwrap() + "\"connectionId\":\"".len();
    page[start..][..page[start..].find('"').unwrap()].to_owned()
}

/// A flow through the session `token` for integration `key`; the connection id it reports.
async fn flow_with(env: &Env, key: &str, token: &str) -> String {
    let response = env
        .flow(key, &format!("connect_session_token={token}"))
        .await;
    let status = response.status();
    let page = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{page}");
    reported_id(&page)
}

pub(crate) async fn history(env: &Env, key: &str, id: &str) -> Value {
    let response = env
        .app
        .client
        .get(env.app.url(&format!(
            "/connection/{id}/history?provider_config_key={key}"
        )))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    ok_json(response).await
}

async fn a_session_token_runs_a_flow_that_names_the_connection_and_gives_it_the_sessions_tags(
    db: &TestDatabase,
) {
    let env = secured(db).await;
    let token = session(
        &env,
        "/connect/sessions",
        &json!({
            "end_user": {"id": "u1", "email": "ann@example.com", "display_name": "Ann"},
            "organization": {"id": "org1"},
            "allowed_integrations": ["fake"],
            "tags": {"Plan": "pro"},
        }),
    )
    .await;

    let shown = ok_json(with_token(&env, reqwest::Method::GET, &token).await).await;
    assert_eq!(shown["data"]["endUser"]["id"], "u1");
    assert_eq!(shown["data"]["endUser"]["organization"]["id"], "org1");
    assert_eq!(shown["data"]["allowed_integrations"], json!(["fake"]));
    assert!(shown["data"].get("isReconnecting").is_none());
    assert!(
        !shown.to_string().contains("pro"),
        "tags are not shown: {shown}"
    );

    let id = flow_with(&env, "fake", &token).await;
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let connection = env.connection("fake", &id).await;
    assert_eq!(
        connection["tags"],
        json!({
            "end_user_id": "u1",
            "end_user_email": "ann@example.com",
            "end_user_display_name": "Ann",
            "organization_id": "org1",
            "plan": "pro",
        })
    );
    assert_eq!(connection["end_user"]["id"], "u1");
    let entries = history(&env, "fake", &id).await;
    let authorized = &entries["events"][0];
    assert_eq!(authorized["type"], "connection_authorized", "{entries}");
    assert!(
        authorized["ownership"]["connect_session_id"].is_string(),
        "{entries}"
    );
    assert_eq!(authorized["ownership"]["tags"]["plan"], "pro");

    // A session is not used up: it connects again, under a new id.
    let second = flow_with(&env, "fake", &token).await;
    assert_ne!(second, id);
}

async fn a_reconnect_session_reauthorizes_exactly_the_connection_it_names(db: &TestDatabase) {
    let env = secured(db).await;
    let imported = post(
        &env,
        "/connection",
        &json!({
            "provider_config_key": "fake",
            "connection_id": "existing",
            "access_token": "imported-access-token",
            "refresh_token": "imported-refresh-token",
        }),
    )
    .await;
    assert!(
        imported.status().is_success(),
        "{}",
        imported.text().await.unwrap()
    );
    let before = env.connection("fake", "existing").await;

    let unknown = post(
        &env,
        "/connect/sessions/reconnect",
        &json!({"connection_id": "missing", "integration_id": "fake", "end_user": {"id": "u2"}}),
    )
    .await;
    assert_error(unknown, 400, "invalid_body").await;

    let token = session(
        &env,
        "/connect/sessions/reconnect",
        &json!({"connection_id": "existing", "integration_id": "fake", "end_user": {"id": "u2"}}),
    )
    .await;
    let shown = ok_json(with_token(&env, reqwest::Method::GET, &token).await).await;
    assert_eq!(shown["data"]["isReconnecting"], true);
    assert_eq!(shown["data"]["allowed_integrations"], json!(["fake"]));

    // Another integration is not the connection it names.
    let elsewhere = env
        .connect("fake-basic", &format!("connect_session_token={token}"))
        .await;
    assert_error(elsewhere, 400, "integration_not_allowed").await;

    assert_eq!(flow_with(&env, "fake", &token).await, "existing");
    let after = env.connection("fake", "existing").await;
    assert_ne!(
        after["credentials"]["access_token"],
        before["credentials"]["access_token"]
    );
    assert_eq!(after["tags"]["end_user_id"], "u2");

    // A reconnect session that names no end user keeps the connection's: it shows it, and the
    // connection is still found by it afterwards.
    let token = session(
        &env,
        "/connect/sessions/reconnect",
        &json!({"connection_id": "existing", "integration_id": "fake"}),
    )
    .await;
    let shown = ok_json(with_token(&env, reqwest::Method::GET, &token).await).await;
    assert_eq!(shown["data"]["endUser"]["id"], "u2", "{shown}");
    // The connection changes hands after the session was made: the session follows, and the
    // re-authorization keeps what the connection has then, not what it had before.
    let patched = env
        .app
        .client
        .patch(
            env.app
                .url("/connections/existing?provider_config_key=fake"),
        )
        .bearer_auth(SECRET_KEY)
        .json(&json!({"end_user": {"id": "u3"}, "tags": {"team": "ops"}}))
        .send()
        .await
        .unwrap();
    assert!(patched.status().is_success());
    let shown = ok_json(with_token(&env, reqwest::Method::GET, &token).await).await;
    assert_eq!(shown["data"]["endUser"]["id"], "u3", "{shown}");
    assert_eq!(flow_with(&env, "fake", &token).await, "existing");
    let listed = env
        .app
        .client
        .get(env.app.url("/connections?endUserId=u3&tags[team]=ops"))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    let listed = ok_json(listed).await;
    let found = &listed["connections"][0];
    assert_eq!(found["connection_id"], "existing", "{listed}");
    assert_eq!(found["end_user"]["id"], "u3", "{listed}");
    assert_eq!(found["tags"]["end_user_id"], "u3", "{listed}");

    let entries = history(&env, "fake", "existing").await;
    let generations: Vec<_> = entries["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "connection_authorized")
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(generations, [1, 2, 3], "{entries}");

    // Deleted since: the session does not create it anew, neither through a flow that was at
    // the provider when it was deleted (refused before the code is redeemed) nor a new one.
    let pending = env
        .authorize(
            &env.start("fake", &format!("connect_session_token={token}"))
                .await,
        )
        .await;
    let existing = |method: reqwest::Method| {
        env.app
            .client
            .request(
                method,
                env.app.url("/connection/existing?provider_config_key=fake"),
            )
            .bearer_auth(SECRET_KEY)
            .send()
    };
    assert!(
        existing(reqwest::Method::DELETE)
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let calls = env.fake.token_requests();
    error_page(env.get(&pending).await, "invalid_connection").await;
    assert_eq!(env.fake.token_requests(), calls, "the code was redeemed");
    let gone = env
        .connect("fake", &format!("connect_session_token={token}"))
        .await;
    error_page(gone, "invalid_connection").await;
    assert_eq!(existing(reqwest::Method::GET).await.unwrap().status(), 404);
}

async fn sessions_refuse_bad_bodies_foreign_integrations_chosen_ids_and_dead_tokens(
    db: &TestDatabase,
) {
    let env = secured(db).await;
    let user = json!({"id": "u1"});
    let eleven: serde_json::Map<String, Value> =
        (0..11).map(|i| (format!("k{i}"), json!("v"))).collect();
    for body in [
        json!({}),
        json!({"allowed_integrations": ["fake"]}),
        json!({"end_user": user, "allowed_integrations": ["nope"]}),
        json!({"end_user": user, "integrations_config_defaults": {"nope": {}}}),
        json!({"end_user": {"id": ""}}),
        json!({"end_user": {"id": "u1", "email": "not-an-email"}}),
        json!({"end_user": {"id": "u1", "unknown": 1}}),
        json!({"end_user": user, "surprise": true}),
        json!({"tags": eleven}),
        json!({"tags": {"1bad": "v"}}),
        json!({"tags": {"a": "1", "A": "2"}}),
        json!({"tags": {"end_user_email": "nope"}}),
        json!({"tags": {"k": ""}}),
        // PostgreSQL's jsonb (the log) cannot hold U+0000.
        json!({"tags": {"k": "v\u{0}"}}),
        json!({"end_user": {"id": "u1", "display_name": "A\u{0}"}}),
        // Names the Connect page and the dashboard show: nothing that reorders or hides text.
        json!({"end_user": {"id": "u1", "display_name": "\u{202E}nimdA"}}),
        json!({"end_user": {"id": "u1", "display_name": "Ad\u{200B}min"}}),
        json!({"end_user": user, "organization": {"id": "o1", "display_name": "Acme\u{2067}"}}),
        json!({"end_user": user, "webhook_url_override": "ftp://x"}),
        json!({"end_user": user, "connection_id": "c"}),
        // An organization is an end user's: alone, it would be dropped.
        json!({"tags": {"k": "v"}, "organization": {"id": "org9"}}),
        json!({"end_user": user, "integrations_config_defaults":
            {"fake": {"authorization_params": {"prompt": "x".repeat(1025)}}}}),
        json!({"end_user": user, "integrations_config_defaults":
            {"fake": {"authorization_params": {"a\nb": "x"}}}}),
        json!({"end_user": user, "integrations_config_defaults":
            {"fake": {"user_scopes": "s".repeat(1025)}}}),
        json!([1, 2]),
    ] {
        let response = post(&env, "/connect/sessions", &body).await;
        assert_error(response, 400, "invalid_body").await;
    }
    // Without the secret key.
    let anonymous = env
        .app
        .client
        .post(env.app.url("/connect/sessions"))
        .json(&json!({"end_user": user}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let token = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": user, "allowed_integrations": ["fake"]}),
    )
    .await;
    let calls = env.fake.token_requests();
    let chosen = env
        .connect(
            "fake",
            &format!("connect_session_token={token}&connection_id=mine"),
        )
        .await;
    assert_error(chosen, 400, "invalid_query_params").await;
    let foreign = env
        .connect("fake-basic", &format!("connect_session_token={token}"))
        .await;
    assert_error(foreign, 400, "integration_not_allowed").await;
    for bogus in [
        "nango_connect_session_nope".to_owned(),
        format!("{TOKEN_PREFIX}{}", "0".repeat(64)),
    ] {
        let refused = env
            .connect("fake", &format!("connect_session_token={bogus}"))
            .await;
        assert_error(refused, 401, "unknown_connect_session_token").await;
        let shown = with_token(&env, reqwest::Method::GET, &bogus).await;
        assert_error(shown, 401, "unknown_connect_session_token").await;
    }
    // The secret key is not a session token.
    let key_as_token = with_token(&env, reqwest::Method::GET, SECRET_KEY).await;
    assert_error(key_as_token, 401, "unknown_connect_session_token").await;

    let deleted = with_token(&env, reqwest::Method::DELETE, &token).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    // The session's life is in the log, and its token is not. (Readers see the log up to the
    // oldest open transaction on the server: another test's can hide the newest events for a
    // moment.)
    let backend = db.open().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let log = loop {
        let log = backend
            .events()
            .read_all(domain::store::Position::START, 10_000)
            .await
            .unwrap();
        let sessions = log
            .iter()
            .filter(|e| e.stream_id.category() == "connect_session")
            .count();
        if sessions >= 2 || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let session_events: Vec<_> = log
        .iter()
        .filter(|e| e.stream_id.category() == "connect_session")
        .collect();
    let types: Vec<_> = session_events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(types, ["ConnectSessionCreated", "ConnectSessionDeleted"]);
    assert_eq!(session_events[0].payload.to_value()["end_user"]["id"], "u1");
    assert!(
        session_events[0].payload.to_value()["created_by"].is_string(),
        "{}",
        session_events[0].payload
    );
    let hex = &token[TOKEN_PREFIX.len()..];
    assert!(log.iter().all(|e| !e.payload.to_string().contains(hex)));
    let after = with_token(&env, reqwest::Method::GET, &token).await;
    assert_error(after, 401, "unknown_connect_session_token").await;
    let again = with_token(&env, reqwest::Method::DELETE, &token).await;
    assert_error(again, 401, "unknown_connect_session_token").await;
    let late = env
        .connect("fake", &format!("connect_session_token={token}"))
        .await;
    assert_error(late, 401, "unknown_connect_session_token").await;
    assert_eq!(
        env.fake.token_requests(),
        calls,
        "a refused flow called the provider"
    );
}

async fn with_a_secret_key_a_flow_needs_a_session_or_hmac_and_the_public_key_only_creates(
    db: &TestDatabase,
) {
    let env = env(db, &["--secret-key", SECRET_KEY, "--public-key", "pk"]).await;
    let page = env.flow("fake", "connection_id=a&public_key=pk").await;
    assert_eq!(page.status(), StatusCode::OK);
    let first = env.connection("fake", "a").await;

    // The public key never replaces a connection: refused at connect, before the provider...
    let calls = env.fake.token_requests();
    error_page(
        env.connect("fake", "connection_id=a&public_key=pk").await,
        "invalid_connection",
    )
    .await;
    assert_eq!(env.fake.token_requests(), calls);
    // ...and at the callback, when another flow created it in between.
    let one = env.start("fake", "connection_id=b&public_key=pk").await;
    let two = env.start("fake", "connection_id=b&public_key=pk").await;
    let one = env.authorize(&one).await;
    let two = env.authorize(&two).await;
    assert_eq!(env.get(&one).await.status(), StatusCode::OK);
    let created = env.connection("fake", "b").await;
    let calls = env.fake.token_requests();
    error_page(env.get(&two).await, "invalid_connection").await;
    assert_eq!(
        env.fake.token_requests(),
        calls,
        "its code was not redeemed"
    );
    let kept = env.connection("fake", "b").await;
    assert_eq!(
        kept["credentials"]["access_token"],
        created["credentials"]["access_token"]
    );
    assert_eq!(
        env.connection("fake", "a").await["credentials"],
        first["credentials"]
    );
}

async fn with_a_secret_key_and_no_public_key_a_bare_flow_is_refused(db: &TestDatabase) {
    let env = secured(db).await;
    let refused = env.connect("fake", "connection_id=mine").await;
    assert_error(refused, 401, "missing_connect_session_token").await;
    assert_eq!(env.fake.token_requests(), 0);
}

async fn a_callback_in_another_browser_is_refused_and_the_flow_stays_open(db: &TestDatabase) {
    let env = secured(db).await;
    let token = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u1"}}),
    )
    .await;
    let started = env
        .connect("fake", &format!("connect_session_token={token}"))
        .await;
    let cookie = started.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("grantline_flow_"), "{cookie}");
    for attribute in [
        "HttpOnly",
        "SameSite=Lax",
        "Path=/oauth/callback",
        "Max-Age=",
    ] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let authorization_url =
        url::Url::parse(started.headers()["location"].to_str().unwrap()).unwrap();
    assert!(
        !cookie.contains(
            authorization_url
                .query_pairs()
                .find(|(k, _)| k == "state")
                .unwrap()
                .1
                .as_ref()
        )
    );
    let callback = env.authorize(&authorization_url).await;
    // The victim's browser: no cookie of this flow.
    let other = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let calls = env.fake.token_requests();
    let refused = other.get(&callback).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let page = refused.text().await.unwrap();
    assert!(page.contains("state_cookie_err"), "{page}");
    assert_eq!(env.fake.token_requests(), calls, "the provider was asked");
    // Nor did the refusal use up the flow: the browser that started it still finishes it.
    let finished = env.get(&callback).await;
    assert_eq!(finished.status(), StatusCode::OK);
    assert_eq!(env.fake.token_requests(), calls + 1);
    let calls = calls + 1;
    // A forged cookie of the right name does not help either.
    let started = env
        .connect("fake", &format!("connect_session_token={token}"))
        .await;
    let cookie = started.headers()["set-cookie"].to_str().unwrap().to_owned();
    let name = cookie.split('=').next().unwrap();
    let authorization_url =
        url::Url::parse(started.headers()["location"].to_str().unwrap()).unwrap();
    let callback = env.authorize(&authorization_url).await;
    let forged = other
        .get(&callback)
        .header("cookie", format!("{name}=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);
    assert!(forged.text().await.unwrap().contains("state_cookie_err"));
    assert_eq!(env.fake.token_requests(), calls);
    assert_eq!(env.get(&callback).await.status(), StatusCode::OK);
}

async fn patching_a_connection_replaces_its_tags_and_end_user(db: &TestDatabase) {
    let env = secured(db).await;
    let imported = post(
        &env,
        "/connection",
        &json!({
            "provider_config_key": "fake",
            "connection_id": "c1",
            "access_token": "imported-access-token",
        }),
    )
    .await;
    assert!(imported.status().is_success());
    let patch = |path: &str, body: Value| {
        env.app
            .client
            .patch(env.app.url(path))
            .bearer_auth(SECRET_KEY)
            .json(&body)
            .send()
    };
    let done = patch(
        "/connections/c1?provider_config_key=fake",
        json!({"end_user": {"id": "u9", "email": "u9@example.com"}, "tags": {"Team": "a"}}),
    )
    .await
    .unwrap();
    assert_eq!(ok_json(done).await, json!({"success": true}));
    let connection = env.connection("fake", "c1").await;
    assert_eq!(
        connection["tags"],
        json!({"end_user_id": "u9", "end_user_email": "u9@example.com", "team": "a"})
    );
    assert_eq!(connection["end_user"]["id"], "u9");

    // Tags alone replace the tags; the end user stays.
    let done = patch(
        "/connection/c1?provider_config_key=fake",
        json!({"tags": {"team": "b"}}),
    )
    .await
    .unwrap();
    ok_json(done).await;
    let connection = env.connection("fake", "c1").await;
    assert_eq!(connection["tags"], json!({"team": "b"}));
    assert_eq!(connection["end_user"]["id"], "u9");
    let entries = history(&env, "fake", "c1").await;
    let types: Vec<_> = entries["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        ["connection_authorized", "ownership_set", "ownership_set"],
        "{entries}"
    );

    for (path, body, status, code) in [
        (
            "/connections/c1?provider_config_key=fake",
            json!({"tags": {"1x": "v"}}),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1?provider_config_key=fake",
            json!({"surprise": 1}),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1?provider_config_key=fake",
            json!({"end_user": {"id": "u", "email": "x"}}),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1?provider_config_key=fake",
            json!({"webhook_url_override": "https://hooks.example.com"}),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1?provider_config_key=fake",
            json!([]),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1?provider_config_key=fake",
            json!({"tags": {"k": "v\u{0}"}}),
            400,
            "invalid_body",
        ),
        (
            "/connections/c1",
            json!({"tags": {}}),
            400,
            "missing_provider_config",
        ),
        (
            "/connections/nope?provider_config_key=fake",
            json!({"tags": {}}),
            404,
            "unknown_connection",
        ),
    ] {
        let refused = patch(path, body).await.unwrap();
        assert_error(refused, status, code).await;
    }
    assert_eq!(
        env.connection("fake", "c1").await["tags"],
        json!({"team": "b"})
    );
}

async fn integrations_and_providers_answer_the_key_and_a_session_in_todays_shape(
    db: &TestDatabase,
) {
    let env = secured(db).await;
    let get = |path: &str, bearer: &str| {
        env.app
            .client
            .get(env.app.url(path))
            .bearer_auth(bearer)
            .send()
    };
    // The key sees every integration; one of them is the `/config` one by another name.
    let all = ok_json(get("/integrations", SECRET_KEY).await.unwrap()).await;
    let keys: Vec<_> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["unique_key"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        keys.contains(&"fake".to_owned()) && keys.len() >= 5,
        "{all}"
    );
    assert!(all["data"][0].get("credentials").is_none());
    let one = ok_json(
        get("/integrations/fake?include=credentials", SECRET_KEY)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(one["data"]["provider"], "fake");
    assert_eq!(one["data"]["credentials"]["type"], "OAUTH2");
    assert_eq!(one["data"]["credentials"]["scopes"], "read,write");
    assert!(one["data"]["credentials"]["client_secret"].is_string());
    // `include` repeated, as Nango takes it.
    let repeated = ok_json(
        get(
            "/integrations/fake?include=webhook&include=credentials",
            SECRET_KEY,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(repeated["data"]["credentials"], one["data"]["credentials"]);

    // A session sees what it allows, and never credentials.
    let token = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u1"}, "allowed_integrations": ["fake"]}),
    )
    .await;
    let seen = ok_json(get("/integrations", &token).await.unwrap()).await;
    assert_eq!(seen["data"].as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen["data"][0]["unique_key"], "fake");
    assert_error(
        get("/integrations/fake-basic", &token).await.unwrap(),
        404,
        "unknown_provider_config",
    )
    .await;
    assert_error(
        get("/integrations/fake?include=credentials", &token)
            .await
            .unwrap(),
        401,
        "invalid_secret_key",
    )
    .await;
    let providers = ok_json(get("/providers?search=FAKE-BA", &token).await.unwrap()).await;
    assert_eq!(providers["data"][0]["name"], "fake-basic", "{providers}");
    assert_eq!(providers["data"].as_array().unwrap().len(), 1);
    // A regular expression, as Nango reads it; a broken one is a 400.
    let anchored = ok_json(
        get("/providers?search=%5Egit(hub%7Clab)%24", &token)
            .await
            .unwrap(),
    )
    .await;
    let names: Vec<&str> = anchored["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"github") && names.contains(&"gitlab"),
        "{names:?}"
    );
    assert_error(
        get("/providers?search=(unclosed", &token).await.unwrap(),
        400,
        "invalid_query_params",
    )
    .await;
    let provider = ok_json(get("/providers/github", &token).await.unwrap()).await;
    assert_eq!(provider["data"]["auth_mode"], "OAUTH2");
    assert_error(
        get("/providers/nope", &token).await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_error(
        get("/providers", "wrong").await.unwrap(),
        401,
        "invalid_secret_key",
    )
    .await;

    // Writes take the key.
    let body = json!({
        "provider": "github", "unique_key": "gh",
        "credentials": {"type": "OAUTH2", "client_id": "cid", "client_secret": "cs", "scopes": "repo,user"},
    });
    let as_session = env
        .app
        .client
        .post(env.app.url("/integrations"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(as_session, 401, "invalid_secret_key").await;
    let created = ok_json(post(&env, "/integrations", &body).await).await;
    assert_eq!(created["data"]["unique_key"], "gh");
    // A read with the key, answered 2xx.
    let app = &env.app;
    let keyed = |path: &'static str| async move {
        ok_json(
            app.client
                .get(app.url(path))
                .bearer_auth(SECRET_KEY)
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    let config = keyed("/config/gh?include_creds=true").await;
    assert_eq!(config["config"]["oauth_scopes"], "repo,user");
    // Without a name of its own, an integration is shown by its template's.
    assert_eq!(created["data"]["display_name"], "GitHub");
    assert_eq!(provider["data"]["display_name"], "GitHub");
    // A name of its own: set, replaced alone (the credentials stay), kept by a credentials
    // update and by the older `/config` routes.
    let named = json!({"provider": "github", "unique_key": "gh-named", "display_name": "Work GitHub",
        "credentials": {"type": "OAUTH2", "client_id": "cid", "client_secret": "cs"}});
    let named = ok_json(post(&env, "/integrations", &named).await).await;
    assert_eq!(named["data"]["display_name"], "Work GitHub");
    let patch = |body: Value| {
        env.app
            .client
            .patch(env.app.url("/integrations/gh-named"))
            .bearer_auth(SECRET_KEY)
            .json(&body)
            .send()
    };
    let renamed = ok_json(
        patch(json!({"display_name": "GitHub at work"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(renamed["data"]["display_name"], "GitHub at work");
    let with_credentials = keyed("/integrations/gh-named?include=credentials").await;
    assert_eq!(with_credentials["data"]["credentials"]["client_id"], "cid");
    assert_eq!(
        with_credentials["data"]["credentials"]["client_secret"],
        "cs"
    );
    let updated = ok_json(
        patch(
            json!({"credentials": {"type": "OAUTH2", "client_id": "cid2", "client_secret": "cs2"}}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(updated["data"]["display_name"], "GitHub at work");
    let replaced = env
        .app
        .client
        .put(env.app.url("/config"))
        .bearer_auth(SECRET_KEY)
        .json(
            &json!({"provider_config_key": "gh-named", "provider": "github",
            "oauth_client_id": "cid3", "oauth_client_secret": "cs3"}),
        )
        .send()
        .await
        .unwrap();
    assert!(replaced.status().is_success());
    let kept = keyed("/integrations/gh-named").await;
    assert_eq!(kept["data"]["display_name"], "GitHub at work", "{kept}");
    // A rename and a credentials update at once: both land, neither undoes the other.
    for round in 0..10 {
        let credentials = json!({"credentials": {"type": "OAUTH2",
            "client_id": format!("cid-{round}"), "client_secret": format!("cs-{round}")}});
        let name = json!({"display_name": format!("name {round}")});
        let (a, b) = tokio::join!(patch(credentials), patch(name));
        assert!(a.unwrap().status().is_success() && b.unwrap().status().is_success());
        let now = keyed("/integrations/gh-named?include=credentials").await;
        assert_eq!(
            now["data"]["display_name"],
            format!("name {round}"),
            "{now}"
        );
        assert_eq!(
            now["data"]["credentials"]["client_id"],
            format!("cid-{round}"),
            "{now}"
        );
        assert_eq!(
            now["data"]["credentials"]["client_secret"],
            format!("cs-{round}"),
            "{now}"
        );
    }
    for bad in [
        json!({"provider": "github", "unique_key": "gh2"}),
        json!({"provider": "nope", "unique_key": "gh3",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh4", "display_name": "",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh4", "display_name": "x".repeat(256),
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh4", "display_name": "a\u{7}b",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh4", "display_name": "\u{202E}buHtiG",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh4", "display_name": "Git\u{FEFF}Hub",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh5",
               "credentials": {"type": "APP", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh6", "surprise": 1}),
    ] {
        let refused = post(&env, "/integrations", &bad).await;
        assert!(refused.status().is_client_error(), "{bad}");
    }
    // Body fields are reported as the body's, not as the path's; credentials of a kind the
    // provider's flow does not use are refused.
    for bad in [
        json!({"provider": "github", "unique_key": "gh10",
               "credentials": {"type": "OAUTH1", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "stripe-api-key", "unique_key": "sk",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh7",
               "credentials": {"type": "OAUTH2", "client_id": "a\r\nX-Injected: 1",
                               "client_secret": "s"}}),
        json!({"provider": "github", "unique_key": "gh8",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s\u{1}"}}),
        json!({"provider": "github", "unique_key": "k\u{0}",
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}}),
    ] {
        assert_error(post(&env, "/integrations", &bad).await, 400, "invalid_body").await;
    }
    // Keys some route could not name: empty, blank, padded, a list separator, a path
    // separator, characters outside Nango's; on both creating routes.
    for key in ["", " ", " gh9", "gh9 ", "a,b", "a/b", "é"] {
        let body = json!({"provider": "github", "unique_key": key,
               "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}});
        let refused = post(&env, "/integrations", &body).await;
        assert!(refused.status() == 400, "{key:?}: {}", refused.status());
        // `/config` trims the key, as every route that takes one does.
        if key.trim() != key && !key.trim().is_empty() {
            continue;
        }
        let config = json!({"provider_config_key": key, "provider": "github",
               "oauth_client_id": "c", "oauth_client_secret": "s"});
        let refused = post(&env, "/config", &config).await;
        assert!(refused.status() == 400, "{key:?}: {}", refused.status());
    }
    let spaced = json!({"provider": "github", "unique_key": "my gh~1:2.3@x_y-z",
           "credentials": {"type": "OAUTH2", "client_id": "c", "client_secret": "s"}});
    assert!(
        post(&env, "/integrations", &spaced)
            .await
            .status()
            .is_success()
    );
    let patch = |path: &str, body: Value| {
        env.app
            .client
            .patch(env.app.url(path))
            .bearer_auth(SECRET_KEY)
            .json(&body)
            .send()
    };
    let updated = patch(
        "/integrations/gh",
        json!({"credentials": {"type": "OAUTH2", "client_id": "cid2", "client_secret": "cs2"}}),
    )
    .await
    .unwrap();
    ok_json(updated).await;
    let shown = ok_json(
        get("/integrations/gh?include=credentials", SECRET_KEY)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(shown["data"]["credentials"]["client_id"], "cid2");
    let rename = patch("/integrations/gh", json!({"unique_key": "other"}))
        .await
        .unwrap();
    assert_error(rename, 400, "invalid_body").await;
    let deleted = env
        .app
        .client
        .delete(env.app.url("/integrations/gh"))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok_json(deleted).await, json!({"success": true}));
    assert_error(
        get("/integrations/gh", SECRET_KEY).await.unwrap(),
        404,
        "unknown_provider_config",
    )
    .await;
}
