//! `/proxy/*` against the fake provider's API, on both backends: the credential goes in and the
//! caller's secrets do not, an upstream 401 causes one fenced refresh however many calls saw
//! it, retries, streaming, and every refusal as a JSON answer with a code.

use std::sync::atomic::Ordering;

use domain::testing::TestDatabase;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::assert_error;
use crate::fake_provider::FakeProvider;
use crate::fake_service::{FakeService, ID, KEY};

domain::on_both_backends!(
    a_proxied_call_carries_the_credential_and_the_callers_headers_and_passes_the_answer_back,
    an_upstream_401_refreshes_once_through_the_fence_for_concurrent_calls,
    failures_are_retried_as_asked_within_the_deadline,
    bad_proxy_calls_get_a_json_answer_with_a_code,
    a_large_download_streams_through,
);

/// Request headers of a case.
type Headers = Vec<(&'static str, String)>;

/// The `fake` template with its API's base URL.
const WITH_API: &str = "  proxy:\n    base_url: {base}\n    retry:\n      at: X-RateLimit-Reset\n";
const ACCESS: &str = "fake-access-import-1";
const REFRESH: &str = "fake-refresh-import-1";

async fn service(db: &TestDatabase, args: &[&str]) -> FakeService {
    let service = FakeService::on(db)
        .template(WITH_API)
        .args(args)
        .start()
        .await;
    service.import(ID, ACCESS, REFRESH, Some(3600)).await;
    service
}

/// A proxied `method path` for the connection `id`, with extra headers.
async fn call(
    service: &FakeService,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let app = service.app();
    let mut request = app
        .client
        .request(method, app.url(&format!("/proxy{path}")))
        .header("Connection-Id", ID)
        .header("Provider-Config-Key", KEY);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn a_proxied_call_carries_the_credential_and_the_callers_headers_and_passes_the_answer_back(
    db: &TestDatabase,
) {
    let service = service(db, &[]).await;
    let response = call(
        &service,
        Method::GET,
        "/api/echo?x=1&y=two",
        &[
            ("Nango-Proxy-X-Custom", "custom-value"),
            ("Authorization", "Bearer the-callers-own-secret"),
            ("Base-Url-Override", ""),
            ("Retries", "0"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/echo");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["x-custom"], "custom-value");
    assert!(echo["nango-proxy-x-custom"].is_null(), "{echo}");
    assert!(
        echo["connection-id"].is_null(),
        "our headers stay here: {echo}"
    );
    assert!(echo["x-request-id"].is_string(), "{echo}");
    // The provider got the connection's token, not the caller's secret (it answered 200), and
    // only the useful answer headers came back.
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.get("x-secret-header").is_none());

    let response = service
        .app()
        .client
        .post(service.app().url("/proxy/api/echo"))
        .header("Connection-Id", ID)
        .header("Provider-Config-Key", KEY)
        .json(&json!({"hello": "world"}))
        .send()
        .await
        .unwrap();
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["content-type"], "application/json");
    assert_eq!(echo["body"], r#"{"hello":"world"}"#);

    let metrics = service.app().get("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .contains("grantline_proxy_calls_total{provider_config_key=\"fake\",status=\"2xx\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains(ACCESS));
    assert!(
        metrics.contains("# TYPE grantline_proxy_request_duration_seconds histogram"),
        "{metrics}"
    );
    for line in [
        "grantline_proxy_request_duration_seconds_bucket{provider_config_key=\"fake\",le=\"+Inf\"} 2",
        "grantline_proxy_request_duration_seconds_count{provider_config_key=\"fake\"} 2",
        "grantline_proxy_request_duration_seconds_bucket{provider_config_key=\"fake\",le=\"60\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
}

async fn an_upstream_401_refreshes_once_through_the_fence_for_concurrent_calls(db: &TestDatabase) {
    let service = service(db, &[]).await;
    // The provider revokes the token before it expires.
    service.fake.api.revoke(ACCESS);
    let calls = (0..10).map(|_| async {
        let response = call(&service, Method::GET, "/api/echo", &[]).await;
        response.status()
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        service.fake.refresh_requests(),
        1,
        "one refresh for ten 401s"
    );
    let (access, _) = FakeProvider::refreshed_tokens(1);
    let body = service
        .app()
        .get_ok("/connection/conn-1?provider_config_key=fake")
        .await;
    assert_eq!(body["credentials"]["access_token"], access);
    let history = service
        .app()
        .get_ok("/connection/conn-1/history?provider_config_key=fake")
        .await;
    let leased = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "refresh_leased")
        .cloned()
        .unwrap_or_default();
    assert_eq!(leased["trigger"], "rejected", "{history}");

    // A 401 after the refresh is the provider's answer: passed back, not refreshed again.
    service.fake.api.revoke(&access);
    let response = call(&service, Method::GET, "/api/echo", &[]).await;
    assert_eq!(response.status(), StatusCode::OK, "refreshed once more");
    let (again, _) = FakeProvider::refreshed_tokens(2);
    service.fake.api.revoke(&again);
    // Revoked right after its refresh, the new token is rejected too: one refresh per call.
    let response = call(&service, Method::GET, "/api/echo", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(service.fake.refresh_requests(), 3);
}

async fn failures_are_retried_as_asked_within_the_deadline(db: &TestDatabase) {
    let service = service(db, &[]).await;
    let api = &service.fake.api;
    api.fail_next(2, 0);
    let response = call(&service, Method::GET, "/api/flaky", &[]).await;
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no retries asked"
    );
    api.fail_next(2, 0);
    let response = call(&service, Method::GET, "/api/flaky", &[("Retries", "3")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    api.fail_next(5, 0);
    let response = call(&service, Method::GET, "/api/flaky", &[("Retries", "1")]).await;
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "retries used up"
    );

    api.fail_next(0, 1);
    let started = std::time::Instant::now();
    let response = call(&service, Method::GET, "/api/limited", &[("Retries", "1")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "Retry-After honoured"
    );

    // The template's rate-limit header (a reset time) sets the wait too.
    api.fail_next(0, 1);
    let started = std::time::Instant::now();
    let response = call(
        &service,
        Method::GET,
        "/api/limited?style=reset",
        &[("Retries", "1")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "reset honoured"
    );

    // A status the caller names is retried too.
    api.fail_next(1, 0);
    let response = call(
        &service,
        Method::GET,
        "/api/flaky",
        &[("Retries", "1"), ("Retry-On", "409,503")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let metrics = service.app().get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("grantline_proxy_retries_total{provider_config_key=\"fake\"}"),
        "{metrics}"
    );
}

async fn bad_proxy_calls_get_a_json_answer_with_a_code(db: &TestDatabase) {
    let service = service(
        db,
        &[
            "--proxy-timeout",
            "2s",
            "--proxy-allowed-hosts",
            "localhost,nowhere.invalid",
        ],
    )
    .await;
    let app = service.app();
    let send = |headers: Vec<(&'static str, String)>, path: &'static str| {
        let mut request = app.client.get(app.url(path));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let both = |id: &str, key: &str| {
        vec![
            ("Connection-Id", id.to_owned()),
            ("Provider-Config-Key", key.to_owned()),
        ]
    };
    let cases: Vec<(Headers, &str, u16, &str)> = vec![
        (vec![], "/proxy/api/echo", 400, "invalid_headers"),
        (
            vec![("Connection-Id", ID.into())],
            "/proxy/api/echo",
            400,
            "invalid_headers",
        ),
        (
            [both(ID, KEY), vec![("Retries", "many".into())]].concat(),
            "/proxy/api/echo",
            400,
            "invalid_headers",
        ),
        (
            [both(ID, KEY), vec![("Retry-On", "5xx".into())]].concat(),
            "/proxy/api/echo",
            400,
            "invalid_headers",
        ),
        (
            both(ID, "nope"),
            "/proxy/api/echo",
            404,
            "unknown_provider_config",
        ),
        (
            both("nobody", KEY),
            "/proxy/api/echo",
            404,
            "unknown_connection",
        ),
        (
            [
                both(ID, KEY),
                vec![("Base-Url-Override", "https://evil.example".into())],
            ]
            .concat(),
            "/proxy/api/echo",
            400,
            "base_url_override_not_allowed",
        ),
        (
            [
                both(ID, KEY),
                vec![("Base-Url-Override", "http://localhost:1".into())],
            ]
            .concat(),
            "/proxy/api/echo",
            400,
            "blocked_destination",
        ),
        (
            [
                both(ID, KEY),
                vec![("Base-Url-Override", "https://nowhere.invalid".into())],
            ]
            .concat(),
            "/proxy/api/echo",
            502,
            "upstream_unreachable",
        ),
        (both(ID, KEY), "/proxy/api/slow", 504, "upstream_timeout"),
    ];
    for (headers, path, status, code) in cases {
        let response = send(headers.clone(), path).await.unwrap();
        let error = assert_error(response, status, code).await;
        assert!(!error.to_string().contains(ACCESS), "{headers:?}: {error}");
    }
    // No token was sent anywhere a refusal points.
    assert_eq!(service.fake.api.unauthorized.load(Ordering::SeqCst), 0);
    // A key that names no integration adds no series to /metrics.
    let metrics = service.app().get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("provider_config_key=\"nope\""), "{metrics}");
}

async fn a_large_download_streams_through(db: &TestDatabase) {
    let service = service(db, &[]).await;
    let size = 8 * 1024 * 1024 + 17;
    let response = call(
        &service,
        Method::GET,
        &format!("/api/large?bytes={size}"),
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), size);
    assert!(body.iter().all(|b| *b == b'x'));
}
