//! API-key and Basic connections through `POST /api-auth/api-key/:key` and
//! `POST /api-auth/basic/:key`: authorized by a connect session, checked against the provider's
//! verification endpoint before anything is stored, refused with Nango's codes; on both backends.

use domain::testing::TestDatabase;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::connect_sessions::{history, post, secured, session};
use crate::fake_provider::{EC_KEY, EC_P384_KEY, FakeProvider, RSA_CERTIFICATE, RSA_KEY};
use crate::oauth::{Env, SECRET_KEY};
use crate::{assert_error, ok_json};

domain::on_both_backends!(
    api_key_and_basic_connections_are_verified_stored_and_read_back,
    refused_credentials_change_nothing_and_get_nangos_codes,
    api_key_integrations_need_no_client_credentials,
    client_credentials_connections_fetch_and_renew_their_token_through_the_fence,
    a_client_with_a_private_key_signs_a_new_assertion_for_every_token_request,
);

/// `POST path` with `body` and no key (what a browser sends).
async fn submit(env: &Env, path: &str, body: &Value) -> reqwest::Response {
    env.app
        .client
        .post(env.app.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The live connection ids, any integration.
/// `GET /connections/:id` of `key` with `force_refresh=true`, as JSON.
async fn forced(env: &Env, key: &str, id: &str) -> Value {
    let response = env
        .app
        .client
        .get(env.app.url(&format!(
            "/connections/{id}?provider_config_key={key}&force_refresh=true"
        )))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    ok_json(response).await
}

/// A secured instance and a session token for an end user allowed `integrations`.
async fn with_session(db: &TestDatabase, integrations: &[&str]) -> (Env, String) {
    let env = secured(db).await;
    let token = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u1"}, "allowed_integrations": integrations}),
    )
    .await;
    (env, token)
}

async fn ids(env: &Env) -> Vec<String> {
    let response = env
        .app
        .client
        .get(env.app.url("/connections"))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    let list = ok_json(response).await;
    let mut ids: Vec<String> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connection_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn api_key_and_basic_connections_are_verified_stored_and_read_back(db: &TestDatabase) {
    let env = secured(db).await;
    let token = session(
        &env,
        "/connect/sessions",
        &json!({
            "end_user": {"id": "u1", "email": "ann@example.com"},
            "allowed_integrations": ["fake-key", "fake-login"],
        }),
    )
    .await;

    let answer = submit(
        &env,
        &format!("/api-auth/api-key/fake-key?connect_session_token={token}"),
        &json!({"apiKey": FakeProvider::API_KEY}),
    )
    .await;
    let answer = ok_json(answer).await;
    assert_eq!(answer["providerConfigKey"], "fake-key");
    let id = answer["connectionId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{answer}");
    assert_eq!(env.fake.api_requests(), 1, "verified once");
    let connection = env.connection("fake-key", &id).await;
    assert_eq!(
        connection["credentials"],
        json!({"type": "API_KEY", "apiKey": FakeProvider::API_KEY})
    );
    assert_eq!(connection["provider"], "fake-key");
    assert_eq!(connection["tags"]["end_user_id"], "u1");
    let entries = history(&env, "fake-key", &id).await;
    assert_eq!(entries["events"][0]["flow"], "form", "{entries}");
    assert!(!entries.to_string().contains(FakeProvider::API_KEY));

    let (username, password) = FakeProvider::LOGIN;
    let answer = submit(
        &env,
        &format!("/api-auth/basic/fake-login?connect_session_token={token}"),
        &json!({"username": username, "password": password}),
    )
    .await;
    let basic_id = ok_json(answer).await["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let connection = env.connection("fake-login", &basic_id).await;
    assert_eq!(
        connection["credentials"],
        json!({"type": "BASIC", "username": username, "password": password})
    );
    // The proxy puts each credential where its template says: a bearer API key, HTTP Basic.
    for (key, connection) in [("fake-key", &id), ("fake-login", &basic_id)] {
        let proxied = env
            .app
            .client
            .get(env.app.url("/proxy/api/echo?from=proxy"))
            .bearer_auth(SECRET_KEY)
            .header("Connection-Id", connection.as_str())
            .header("Provider-Config-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(ok_json(proxied).await["query"], "from=proxy", "{key}");
    }
    let bare = env
        .app
        .client
        .get(env.app.url("/proxy/api/echo"))
        .header("Connection-Id", id.as_str())
        .header("Provider-Config-Key", "fake-key")
        .send()
        .await
        .unwrap();
    assert_error(bare, 401, "missing_auth_header").await;
    // A read neither refreshes nor calls the provider.
    let forced = forced(&env, "fake-login", &basic_id).await;
    assert_eq!(forced["credentials"]["type"], "BASIC");
    assert_eq!(env.fake.api_requests(), 2);

    // A reconnect session re-authorizes exactly its connection.
    let reconnect = session(
        &env,
        "/connect/sessions/reconnect",
        &json!({"connection_id": id, "integration_id": "fake-key", "end_user": {"id": "u1"}}),
    )
    .await;
    let answer = submit(
        &env,
        &format!("/api-auth/api-key/fake-key?connect_session_token={reconnect}"),
        &json!({"apiKey": FakeProvider::API_KEY}),
    )
    .await;
    assert_eq!(ok_json(answer).await["connectionId"], id.as_str());
    let entries = history(&env, "fake-key", &id).await;
    assert_eq!(entries["events"].as_array().unwrap().len(), 2, "{entries}");
    // Deleted since, it is not created anew through the reconnect session.
    let connection = env
        .app
        .url(&format!("/connection/{id}?provider_config_key=fake-key"));
    let deleted = env
        .app
        .client
        .delete(&connection)
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    let refused = submit(
        &env,
        &format!("/api-auth/api-key/fake-key?connect_session_token={reconnect}"),
        &json!({"apiKey": FakeProvider::API_KEY}),
    )
    .await;
    assert_error(refused, 400, "invalid_connection").await;
    let gone = env
        .app
        .client
        .get(&connection)
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);

    // A template without verification stores what it is given, asking no one.
    let open = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u2"}}),
    )
    .await;
    let answer = submit(
        &env,
        &format!("/api-auth/api-key/fake-key-unchecked?connect_session_token={open}"),
        &json!({"apiKey": "anything at all"}),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(env.fake.api_requests(), 3);
}

async fn refused_credentials_change_nothing_and_get_nangos_codes(db: &TestDatabase) {
    let env = secured(db).await;
    let token = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u1"}, "allowed_integrations": ["fake-key", "fake-login", "fake"]}),
    )
    .await;
    let open = session(
        &env,
        "/connect/sessions",
        &json!({"end_user": {"id": "u2"}}),
    )
    .await;
    let key = |path: &str| format!("{path}?connect_session_token={token}");
    let good = json!({"apiKey": FakeProvider::API_KEY});
    let cases: Vec<(String, Value, u16, &str)> = vec![
        // The provider refuses the key: checked, not stored.
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": "wrong"}),
            400,
            "connection_test_failed",
        ),
        (
            key("/api-auth/basic/fake-login"),
            json!({"username": "fake-user", "password": "no"}),
            400,
            "connection_test_failed",
        ),
        // The wrong route for the provider's auth mode.
        (
            key("/api-auth/api-key/fake-login"),
            good.clone(),
            400,
            "invalid_auth_mode",
        ),
        (
            key("/api-auth/basic/fake-key"),
            json!({"username": "a", "password": "b"}),
            400,
            "invalid_auth_mode",
        ),
        (
            key("/api-auth/api-key/fake"),
            good.clone(),
            400,
            "invalid_auth_mode",
        ),
        // The session's rules.
        (
            key("/api-auth/api-key/fake-key-unchecked"),
            good.clone(),
            400,
            "integration_not_allowed",
        ),
        (
            format!("/api-auth/api-key/nope?connect_session_token={open}"),
            good.clone(),
            404,
            "unknown_provider_config",
        ),
        (
            format!("{}&connection_id=mine", key("/api-auth/api-key/fake-key")),
            good.clone(),
            400,
            "invalid_query_params",
        ),
        (
            "/api-auth/api-key/fake-key?connection_id=mine".into(),
            good.clone(),
            401,
            "missing_connect_session_token",
        ),
        (
            "/api-auth/api-key/fake-key?connect_session_token=nango_connect_session_00".into(),
            good.clone(),
            401,
            "unknown_connect_session_token",
        ),
        // Bad bodies.
        (
            key("/api-auth/api-key/fake-key"),
            json!({}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": ""}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": 5}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": "a\r\nX-Evil: 1"}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": "k".repeat(1025)}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/api-key/fake-key"),
            json!({"apiKey": "k", "extra": 1}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/basic/fake-login"),
            json!({"username": "a\u{0}", "password": "b"}),
            400,
            "invalid_body",
        ),
        (
            key("/api-auth/basic/fake-login"),
            json!(["a", "b"]),
            400,
            "invalid_body",
        ),
    ];
    for (path, body, status, code) in cases {
        let response = submit(&env, &path, &body).await;
        let error = assert_error(response, status, code).await;
        let text = error.to_string();
        assert!(!text.contains(FakeProvider::API_KEY), "{path}: {text}");
    }
    // Only the two wrong credentials reached the provider; nothing was stored.
    assert_eq!(env.fake.api_requests(), 2);
    assert!(ids(&env).await.is_empty());

    // With neither a session nor a secret key's hmac, the public key alone may create; here
    // there is none, so a bare request is refused (above). An OAuth flow for an API-key
    // provider is refused as well, before any provider is asked.
    let flow = env
        .connect("fake-key", &format!("connect_session_token={token}"))
        .await;
    assert_eq!(flow.status(), StatusCode::BAD_REQUEST);
    assert!(flow.text().await.unwrap().contains("invalid_auth_mode"));
    assert!(ids(&env).await.is_empty());
}

async fn api_key_integrations_need_no_client_credentials(db: &TestDatabase) {
    let env = secured(db).await;
    let created = post(
        &env,
        "/config",
        &json!({"provider_config_key": "keys", "provider": "fake-key"}),
    )
    .await;
    assert!(
        created.status().is_success(),
        "{}",
        created.text().await.unwrap()
    );
    let created = post(
        &env,
        "/integrations",
        &json!({"unique_key": "keys2", "provider": "fake-login"}),
    )
    .await;
    let created = ok_json(created).await;
    assert_eq!(created["data"]["provider"], "fake-login");
    // An OAuth provider still needs them.
    let refused = post(
        &env,
        "/config",
        &json!({"provider_config_key": "o", "provider": "fake"}),
    )
    .await;
    assert_error(refused, 400, "missing_client_id").await;
    let refused = post(
        &env,
        "/integrations",
        &json!({"unique_key": "o", "provider": "fake"}),
    )
    .await;
    assert_error(refused, 400, "missing_client_id").await;
    // The catalog lists the API-key and Basic templates with their auth mode.
    let response = env
        .app
        .client
        .get(env.app.url("/providers/fake-key"))
        .bearer_auth(SECRET_KEY)
        .send()
        .await
        .unwrap();
    let provider = ok_json(response).await;
    assert_eq!(provider["data"]["auth_mode"], "API_KEY", "{provider}");
    // And an imported key for it reads back.
    let imported = post(
        &env,
        "/connections",
        &json!({"provider_config_key": "keys", "connection_id": "k1",
                "credentials": {"type": "API_KEY", "apiKey": "imported"}}),
    )
    .await;
    assert_eq!(imported.status(), StatusCode::CREATED);
    assert_eq!(
        env.connection("keys", "k1").await["credentials"]["apiKey"],
        "imported"
    );
}

async fn client_credentials_connections_fetch_and_renew_their_token_through_the_fence(
    db: &TestDatabase,
) {
    let (env, token) = with_session(db, &["fake-cc", "fake-key"]).await;
    let (client_id, client_secret) = FakeProvider::CC_CLIENT;
    let path = format!("/oauth2/auth/fake-cc?connect_session_token={token}");

    // Refusals first: none stores anything.
    for (route, body, status, code) in [
        (
            path.clone(),
            json!({"client_id": client_id, "client_secret": "wrong"}),
            400,
            "client_credentials_fetch_error",
        ),
        (
            path.clone(),
            json!({"client_secret": client_secret}),
            400,
            "missing_client_id",
        ),
        (
            path.clone(),
            json!({"client_id": client_id}),
            400,
            "missing_client_secret",
        ),
        (
            path.clone(),
            json!({"client_id": client_id, "client_secret": "s", "scope": "x"}),
            400,
            "invalid_body",
        ),
        (
            format!("/oauth2/auth/fake-key?connect_session_token={token}"),
            json!({"client_id": client_id, "client_secret": client_secret}),
            400,
            "invalid_auth_mode",
        ),
        (
            format!("/api-auth/api-key/fake-cc?connect_session_token={token}"),
            json!({"apiKey": "k"}),
            400,
            "invalid_auth_mode",
        ),
    ] {
        let response = submit(&env, &route, &body).await;
        let error = assert_error(response, status, code).await;
        assert!(!error.to_string().contains(client_secret), "{error}");
    }
    assert!(ids(&env).await.is_empty());
    let before = env.fake.token_requests();
    assert_eq!(before, 1, "only the wrong secret reached the provider");

    let answer = submit(
        &env,
        &path,
        &json!({"client_id": client_id, "client_secret": client_secret}),
    )
    .await;
    let id = ok_json(answer).await["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let connection = env.connection("fake-cc", &id).await;
    let credentials = &connection["credentials"];
    assert_eq!(credentials["type"], "OAUTH2_CC", "{connection}");
    assert_eq!(credentials["token"], FakeProvider::cc_token(before + 1));
    assert_eq!(credentials["client_id"], client_id);
    assert_eq!(credentials["client_secret"], client_secret);
    assert!(credentials["expires_at"].is_string());
    assert_eq!(
        credentials["raw"]["scope"], "read",
        "the integration's scopes"
    );

    // A forced read asks again with the connection's client.
    let forced = forced(&env, "fake-cc", &id).await;
    assert_eq!(
        forced["credentials"]["token"],
        FakeProvider::cc_token(before + 2)
    );

    // An expired imported token read by ten callers at once: one provider call, one token.
    let imported = post(
        &env,
        "/connections",
        &json!({"provider_config_key": "fake-cc", "connection_id": "expired",
                "credentials": {"type": "OAUTH2_CC", "token": "old-token", "client_id": client_id,
                                "client_secret": client_secret, "expires_at": "2020-01-01T00:00:00Z"}}),
    )
    .await;
    assert_eq!(imported.status(), StatusCode::CREATED);
    let calls = env.fake.token_requests();
    let reads = (0..10).map(|_| async {
        let response = env
            .app
            .client
            .get(
                env.app
                    .url("/connections/expired?provider_config_key=fake-cc"),
            )
            .bearer_auth(SECRET_KEY)
            .send()
            .await
            .unwrap();
        ok_json(response).await["credentials"]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    let tokens = futures_util::future::join_all(reads).await;
    assert_eq!(env.fake.token_requests(), calls + 1, "one renewal");
    assert!(
        tokens
            .iter()
            .all(|t| *t == FakeProvider::cc_token(calls + 1)),
        "{tokens:?}"
    );
    let entries = history(&env, "fake-cc", "expired").await;
    let types: Vec<&str> = entries["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "connection_authorized",
            "refresh_leased",
            "tokens_refreshed"
        ],
        "{entries}"
    );
    assert!(!entries.to_string().contains(client_secret));
}

/// The DER bytes of the PEM certificate `pem`.
fn der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

async fn a_client_with_a_private_key_signs_a_new_assertion_for_every_token_request(
    db: &TestDatabase,
) {
    use base64::Engine;
    use sha2::{Digest, Sha256};

    let (env, token) = with_session(db, &["fake-cc", "fake-cc-jwt"]).await;
    let (client_id, client_secret) = FakeProvider::CC_CLIENT;
    let path = |key: &str| format!("/oauth2/auth/{key}?connect_session_token={token}");

    // Keys and certificates that cannot be used are refused before any provider is asked.
    for (key, body, code) in [
        (
            "fake-cc",
            json!({"client_id": client_id, "client_private_key": "not a key"}),
            "invalid_body",
        ),
        (
            "fake-cc",
            json!({"client_id": client_id, "client_private_key": EC_P384_KEY}),
            "invalid_body",
        ),
        (
            "fake-cc",
            json!({"client_id": client_id, "client_private_key": RSA_KEY,
                   "client_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
            "invalid_body",
        ),
        // The template asks for a signed assertion; a secret alone cannot make one.
        (
            "fake-cc-jwt",
            json!({"client_id": client_id, "client_secret": client_secret}),
            "client_credentials_fetch_error",
        ),
    ] {
        let error = assert_error(submit(&env, &path(key), &body).await, 400, code).await;
        assert!(!error.to_string().contains("PRIVATE KEY"), "{error}");
    }
    assert!(ids(&env).await.is_empty());
    assert_eq!(env.fake.token_requests(), 0, "no provider was asked");

    // An RSA key with its certificate and no secret: RS256, the certificate's thumbprints.
    let answer = submit(
        &env,
        &path("fake-cc"),
        &json!({"client_id": client_id, "client_private_key": RSA_KEY,
                "client_certificate": RSA_CERTIFICATE}),
    )
    .await;
    let id = ok_json(answer).await["connectionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let header = env
        .fake
        .last_assertion()
        .expect("an assertion was accepted");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert_eq!(
        header.x5t_s256,
        Some(url.encode(Sha256::digest(der(RSA_CERTIFICATE))))
    );
    assert_eq!(
        header.x5t.map(|t| url.decode(t).unwrap().len()),
        Some(20),
        "a SHA-1 thumbprint"
    );
    let connection = env.connection("fake-cc", &id).await;
    let credentials = &connection["credentials"];
    assert_eq!(
        credentials["token"],
        FakeProvider::cc_token(1),
        "{connection}"
    );
    assert_eq!(credentials["client_secret"], "");
    assert_eq!(credentials["client_private_key"], RSA_KEY);
    let entries = history(&env, "fake-cc", &id).await;
    assert!(!entries.to_string().contains("PRIVATE KEY"), "{entries}");

    // A renewal signs a new assertion (the provider refuses a replayed one).
    assert_eq!(
        forced(&env, "fake-cc", &id).await["credentials"]["token"],
        FakeProvider::cc_token(2)
    );

    // An EC key signs with ES256; a template asking for private_key_jwt uses it even beside a
    // secret.
    let answer = submit(
        &env,
        &path("fake-cc-jwt"),
        &json!({"client_id": client_id, "client_secret": "unused", "client_private_key": EC_KEY}),
    )
    .await;
    ok_json(answer).await;
    let header = env.fake.last_assertion().unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.x5t, None);
    assert_eq!(env.fake.token_requests(), 3);
}
