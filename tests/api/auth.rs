//! API authentication (DESIGN §5): with a secret key, `Bearer <key>` and `Basic base64(<key>:)`
//! are accepted and everything else is a 401 with its code; without one, any `Authorization`
//! header is ignored.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use domain::testing::TestDatabase;
use reqwest::header::AUTHORIZATION;
use reqwest::header::HeaderValue;
use serde_json::json;

use crate::{TestApp, assert_error, new_key, ok_json, spawn_app, spawn_app_with_secret};

const KEY: &str = "3f2a0c4e-6f0b-4b8e-9d41-7a1c2b3d4e5f";

fn basic(user_and_password: &str) -> String {
    format!("Basic {}", BASE64.encode(user_and_password))
}

async fn get_with(
    app: &TestApp,
    path: &str,
    authorization: Option<HeaderValue>,
) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    request.send().await.unwrap()
}

fn header(value: &str) -> Option<HeaderValue> {
    Some(HeaderValue::from_str(value).unwrap())
}

/// Every protected route refuses what it must and accepts both header forms.
async fn a_configured_secret_key_guards_the_api(db: &TestDatabase) {
    let app = spawn_app_with_secret(db, &new_key(), KEY).await;

    // Refused requests do not reach the handler: nothing is written.
    let refused = app
        .post_json(
            "/config",
            &json!({ "provider_config_key": "k", "provider": "github",
                     "oauth_client_id": "i", "oauth_client_secret": "s" }),
        )
        .await;
    assert_error(refused, 401, "missing_auth_header").await;

    let bearer = format!("Bearer {KEY}");
    let created = app
        .client
        .post(app.url("/config"))
        .header(AUTHORIZATION, &bearer)
        .json(&json!({ "provider_config_key": "k", "provider": "github",
                       "oauth_client_id": "i", "oauth_client_secret": "s" }))
        .send()
        .await
        .unwrap();
    ok_json(created).await;

    let refused = app
        .client
        .post(app.url("/config"))
        .header(AUTHORIZATION, "Bearer not-the-key")
        .json(&json!({ "provider_config_key": "k2", "provider": "github",
                       "oauth_client_id": "i", "oauth_client_secret": "s" }))
        .send()
        .await
        .unwrap();
    assert_error(refused, 401, "invalid_secret_key").await;

    let accepted = [
        bearer.clone(),
        format!("bearer {KEY}"),
        format!("Bearer  {KEY} "),
        basic(&format!("{KEY}:")),
        basic(KEY),
    ];
    let wrong = [
        "Bearer not-the-key".to_owned(),
        format!("Bearer {KEY}x"),
        format!("Bearer {}", &KEY[..KEY.len() - 1]),
        format!("Bearer {}", KEY.to_uppercase()),
        basic("not-the-key:"),
        basic(&format!("{KEY}x:")),
    ];
    let malformed = [
        "Token x",
        "Basic !!!",
        "Bearer",
        "Basic",
        KEY,
        "Digest username=\"x\"",
    ];

    for path in [
        "/connection",
        "/connections",
        "/config",
        "/config/k",
        "/connection/c?provider_config_key=k",
    ] {
        for value in &accepted {
            let response = get_with(&app, path, header(value)).await;
            let status = response.status();
            // Authenticated: the handler answers (the connection `c` does not exist).
            if path.starts_with("/connection/c") {
                assert_error(response, 404, "unknown_connection").await;
            } else {
                assert!(status.is_success(), "{path} with {value:?}: {status}");
            }
        }
        assert_error(get_with(&app, path, None).await, 401, "missing_auth_header").await;
        for value in &wrong {
            let error = assert_error(
                get_with(&app, path, header(value)).await,
                401,
                "invalid_secret_key",
            )
            .await;
            assert!(
                !error.to_string().contains(KEY),
                "the key is not echoed: {error}"
            );
        }
        for value in malformed {
            assert_error(
                get_with(&app, path, header(value)).await,
                401,
                "malformed_auth_header",
            )
            .await;
        }
        let not_utf8 = HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
        assert_error(
            get_with(&app, path, Some(not_utf8)).await,
            401,
            "malformed_auth_header",
        )
        .await;
    }

    // Writes behind the key work with either form; the refused write above left nothing behind.
    let list = app
        .client
        .get(app.url("/config"))
        .header(AUTHORIZATION, basic(&format!("{KEY}:")))
        .send()
        .await
        .unwrap();
    let list = ok_json(list).await;
    let configs = list["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 1, "{list}");
    assert_eq!(configs[0]["unique_key"], "k");

    // Health stays open, with or without a header.
    assert_eq!(app.get("/health").await.status(), 200);
    assert_eq!(
        get_with(&app, "/health", header("Bearer wrong"))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_secret_key_guards_the_api_on_postgres() {
    let db = TestDatabase::postgres().await;
    a_configured_secret_key_guards_the_api(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_secret_key_guards_the_api_on_sqlite() {
    let db = TestDatabase::sqlite();
    a_configured_secret_key_guards_the_api(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_key_any_authorization_header_is_ignored() {
    let db = TestDatabase::postgres().await;
    let app = spawn_app(&db, &new_key()).await;
    let headers = [
        None,
        header("Bearer "),
        header("Bearer"),
        header("Bearer anything"),
        header("Token x"),
        header("Basic !!!"),
        header(&basic("whatever:")),
        Some(HeaderValue::from_bytes(b"Bearer \xff").unwrap()),
    ];
    for (i, value) in headers.iter().enumerate() {
        let response = get_with(&app, "/connection", value.clone()).await;
        assert_eq!(
            ok_json(response).await["connections"]
                .as_array()
                .unwrap()
                .len(),
            0,
            "{value:?}"
        );
        let mut request = app.client.post(app.url("/config")).json(&json!({
            "provider_config_key": format!("k{i}"), "provider": "github",
            "oauth_client_id": "i", "oauth_client_secret": "s",
        }));
        if let Some(value) = value {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let created = request.send().await.unwrap();
        assert_eq!(created.status(), 200, "{value:?}");
    }
    let list = ok_json(get_with(&app, "/config", header("Bearer ")).await).await;
    assert_eq!(list["configs"].as_array().unwrap().len(), headers.len());
}
