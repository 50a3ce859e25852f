//! Pages of other sites call the API from a browser (`@nangohq/frontend` on the app's own
//! origin): preflights are answered and answers are marked readable for the allowed origins
//! (`GRANTLINE_BROWSER_ORIGINS`; by default any with a secret key, loopback ones without), and
//! the same origins may open the WebSocket. Requests without `Origin` carry no CORS headers.

use domain::testing::TestDatabase;
use reqwest::Method;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, VARY,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{TestApp, new_key, spawn_app_with, spawn_app_with_secret};

const SECRET: &str = "cors-test-secret-key-0123456789ab";
const APP: &str = "https://app.example.com";

/// The preflight a browser sends before a page of `origin` posts JSON with a key.
async fn preflight(app: &TestApp, path: &str, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url(path))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

/// `GET /connections` as a page of `origin` sends it, with the secret key when there is one.
async fn list_from(app: &TestApp, origin: Option<&str>, secret: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url("/connections"));
    if let Some(origin) = origin {
        request = request.header("Origin", origin);
    }
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    request.send().await.unwrap()
}

fn header<'a>(
    response: &'a reqwest::Response,
    name: &reqwest::header::HeaderName,
) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

/// Opens the WebSocket as a page of `origin`; its HTTP status when refused.
async fn websocket(app: &TestApp, origin: &str) -> Result<(), u16> {
    let mut request = app
        .url("/")
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Origin", origin.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn with_a_secret_key_pages_of_any_origin_may_call_the_api() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with_secret(&db, &new_key(), SECRET).await;

    for path in [
        "/api-auth/api-key/some-key",
        "/connections",
        "/connect/session",
    ] {
        let answer = preflight(&app, path, APP).await;
        assert_eq!(answer.status(), 200, "{path}");
        assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));
        assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_METHODS), Some("POST"));
        assert_eq!(
            header(&answer, &ACCESS_CONTROL_ALLOW_HEADERS),
            Some("authorization, content-type")
        );
        // Never with cookies: the dashboard's session is not for other sites' pages.
        assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_CREDENTIALS), None);
    }

    let listed = list_from(&app, Some(APP), Some(SECRET)).await;
    assert_eq!(listed.status(), 200);
    assert_eq!(header(&listed, &ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));
    // The key is still required: CORS only lets the page read what the API answers.
    let refused = list_from(&app, Some(APP), None).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(header(&refused, &ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));

    // A server's request (no Origin) gets no CORS headers at all.
    let plain = list_from(&app, None, Some(SECRET)).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(header(&plain, &ACCESS_CONTROL_ALLOW_ORIGIN), None);
    assert_eq!(header(&plain, &VARY), None);

    // The frontend's OAuth flow listens on the WebSocket from the app's own page.
    websocket(&app, APP).await.unwrap();
}

#[tokio::test]
async fn without_a_secret_key_only_pages_served_from_this_machine_may_read_answers() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(&db, &new_key(), &[]).await;

    let foreign = preflight(&app, "/connections", "https://evil.example").await;
    assert_eq!(header(&foreign, &ACCESS_CONTROL_ALLOW_ORIGIN), None);
    let read = list_from(&app, Some("https://evil.example"), None).await;
    assert_eq!(read.status(), 200);
    assert_eq!(header(&read, &ACCESS_CONTROL_ALLOW_ORIGIN), None);
    assert_eq!(websocket(&app, "https://evil.example").await, Err(403));

    for local in [
        "http://localhost:5173",
        "http://127.0.0.1:8080",
        "http://[::1]:3000",
    ] {
        let answer = preflight(&app, "/connections", local).await;
        assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_ORIGIN), Some(local));
        assert!(
            header(&answer, &VARY).is_some_and(|vary| vary.contains("origin")),
            "the answer depends on the origin"
        );
        let read = list_from(&app, Some(local), None).await;
        assert_eq!(header(&read, &ACCESS_CONTROL_ALLOW_ORIGIN), Some(local));
        websocket(&app, local).await.unwrap();
    }
}

#[tokio::test]
async fn listed_origins_are_the_only_ones_allowed() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(
        &db,
        &new_key(),
        &[
            "--secret-key",
            SECRET,
            // As an operator may write it: upper case, a trailing slash, the default port.
            "--browser-origins",
            "https://APP.example.com:443/, http://localhost:5173",
        ],
    )
    .await;
    let answer = preflight(&app, "/connections", APP).await;
    assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_ORIGIN), Some(APP));
    let other = preflight(&app, "/connections", "https://other.example.com").await;
    assert_eq!(header(&other, &ACCESS_CONTROL_ALLOW_ORIGIN), None);
    websocket(&app, APP).await.unwrap();
    assert_eq!(websocket(&app, "https://other.example.com").await, Err(403));
}

#[tokio::test]
async fn an_empty_setting_means_the_default() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(
        &db,
        &new_key(),
        &["--secret-key", SECRET, "--browser-origins", " "],
    )
    .await;
    let answer = preflight(&app, "/connections", APP).await;
    assert_eq!(header(&answer, &ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));
}
