//! `/proxy/*` against the fake provider's API, on both backends: the credential goes in and the
//! caller's secrets do not, an upstream 401 causes one fenced refresh however many calls saw
//! it, retries, streaming, redirects, decompression, OAuth 1.0a form bodies, hosts a caller
//! chose checked where they resolve, and every refusal as a JSON answer with a code.

use std::sync::atomic::Ordering;
use std::time::Duration;

use domain::testing::TestDatabase;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider};
use crate::fake_service::{FakeService, ID, KEY};
use crate::{assert_error, ok_json};

domain::on_both_backends!(
    a_proxied_call_carries_the_credential_and_the_callers_headers_and_passes_the_answer_back,
    an_upstream_401_refreshes_once_through_the_fence_for_concurrent_calls,
    failures_are_retried_as_asked_within_the_deadline,
    bad_proxy_calls_get_a_json_answer_with_a_code,
    a_large_download_streams_through,
    a_streamed_answer_passes_whole_while_the_next_request_comes_early,
    an_answer_that_breaks_off_reaches_the_caller_as_broken,
    a_host_from_a_placeholder_is_checked_where_it_resolves,
    redirects_carry_the_credential_only_when_asked_and_only_to_the_same_host,
    a_compressed_answer_is_decoded_only_when_asked,
    an_oauth1_form_body_is_signed_with_the_call,
    ids_in_any_script_reach_the_proxy_and_answers_carry_only_the_providers_headers,
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
    assert_eq!(
        headers["x-ratelimit-remaining"], "4999",
        "the caller paces itself by it"
    );

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

    // A refusal passed back keeps its headers (not its cookies).
    api.fail_next(0, 1);
    let response = call(&service, Method::GET, "/api/limited", &[("Retries", "0")]).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-provider-error-id"], "e-429");
    for theirs in [
        "set-cookie",
        "access-control-allow-origin",
        "strict-transport-security",
        "clear-site-data",
        "x-hop-only",
        "x-accel-redirect",
    ] {
        assert!(
            response.headers().get(theirs).is_none(),
            "{theirs} came back"
        );
    }

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

    // A wait no clock can hold (or past the deadline) passes the provider's answer back.
    for after in [
        "inf",
        "1e30",
        "99999999999999999999",
        "10000000000000000000",
    ] {
        api.fail_next(0, 1);
        let response = call(
            &service,
            Method::GET,
            &format!("/api/limited?after={after}"),
            &[("Retries", "1")],
        )
        .await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{after}");
    }
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
    for flag in ["Decompress", "Forward-Headers-On-Redirect"] {
        let response = call(&service, Method::GET, "/api/echo", &[(flag, "yes")]).await;
        assert_error(response, 400, "invalid_headers").await;
    }
    // A key that names no integration adds no series to /metrics.
    let metrics = service.app().get("/metrics").await.text().await.unwrap();
    assert!(
        !metrics.contains("provider_config_key=\"nope\""),
        "{metrics}"
    );
}

/// A proxied answer that streams for longer than the header timeout passes through byte for
/// byte while the client already sends its next request (pipelining), even when its last bytes
/// look like the server's own bare error answer; then the next request is answered.
async fn a_streamed_answer_passes_whole_while_the_next_request_comes_early(db: &TestDatabase) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let service = service(db, &["--header-timeout", "1s"]).await;
    let address = service
        .app()
        .address
        .trim_start_matches("http://")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "GET /proxy/api/trickle HTTP/1.1\r\nHost: localhost\r\nConnection-Id: {ID}\r\n\
         Provider-Config-Key: {KEY}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    stream.write_all(next.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("both answers within 10 s")
        .unwrap();
    let received = String::from_utf8_lossy(&received);
    let expected_body = format!("{}{}", "A".repeat(1000), crate::fake_api::TRICKLE_TAIL);
    // Chunked: the body's bytes appear in order, unchanged, between chunk sizes.
    let (first, rest) = received.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{received}");
    let (body, after) = dechunk(rest);
    assert_eq!(body, expected_body, "{received}");
    assert!(after.starts_with("HTTP/1.1 200"), "{received}");
    assert!(after.ends_with(r#"{"result":"ok"}"#), "{received}");
}

/// The body of a chunked answer, and what follows it.
fn dechunk(mut rest: &str) -> (String, &str) {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            return (body, after.strip_prefix("\r\n").unwrap());
        }
        body.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap();
    }
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

/// The provider announces a length and stops short: the caller gets the provider's length and
/// a body that fails, never a short answer that looks whole.
async fn an_answer_that_breaks_off_reaches_the_caller_as_broken(db: &TestDatabase) {
    let service = service(db, &[]).await;
    let size = 256 * 1024;
    let response = call(
        &service,
        Method::GET,
        &format!("/api/cut?bytes={size}"),
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-length"],
        size.to_string().as_str()
    );
    assert!(
        response.bytes().await.is_err(),
        "a broken answer read as whole"
    );
    // Counted for the operator, by integration.
    let metrics = service.app().get("/metrics").await.text().await.unwrap();
    let broken = format!("grantline_proxy_broken_total{{provider_config_key=\"{KEY}\"}} 1");
    assert!(metrics.contains(&broken), "{metrics}");
    // The server is unharmed: the next call goes through.
    let response = call(&service, Method::GET, "/api/echo", &[]).await;
    assert_eq!(ok_json(response).await["path"], "/api/echo");
}

/// A template whose base URL is a connection's `instance_url`, with an API key.
const TENANT: &str = "fake-tenant:\n  auth_mode: API_KEY\n  proxy:\n    base_url: \
                      ${connectionConfig.instance_url}\n    headers:\n      authorization: \
                      Bearer ${apiKey}\n";

async fn a_host_from_a_placeholder_is_checked_where_it_resolves(db: &TestDatabase) {
    let service = FakeService::on(db)
        .template(&format!("{WITH_API}{TENANT}"))
        .start()
        .await;
    service.import(ID, ACCESS, REFRESH, Some(3600)).await;
    let app = service.app();
    let integration = json!({"provider_config_key": "tenant", "provider": "fake-tenant"});
    ok_json(app.post_json("/config", &integration).await).await;
    let base = service.fake.base.clone();
    let port = base.rsplit(':').next().unwrap();
    let instances = [
        ("by-name", format!("http://localhost:{port}")),
        ("by-address", base.clone()),
    ];
    for (id, instance_url) in &instances {
        let import = json!({
            "provider_config_key": "tenant", "connection_id": id,
            "api_key": FakeProvider::API_KEY,
            "connection_config": {"instance_url": instance_url},
        });
        let response = app.post_json("/connection", &import).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
    let calls = service.fake.api.calls.load(Ordering::SeqCst);
    for (id, _) in &instances {
        for retries in ["0", "3"] {
            let response = app
                .client
                .get(app.url("/proxy/api/echo"))
                .header("Connection-Id", *id)
                .header("Provider-Config-Key", "tenant")
                .header("Retries", retries)
                .send()
                .await
                .unwrap();
            assert_error(response, 400, "blocked_destination").await;
        }
    }
    assert_eq!(
        service.fake.api.calls.load(Ordering::SeqCst),
        calls,
        "nothing reached the provider on loopback"
    );
    // The same provider on loopback, named by its template, is reached.
    let response = call(&service, Method::GET, "/api/echo", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// The template of the redirect tests: a header with the token, one without a placeholder.
const WITH_HEADERS: &str = "  proxy:\n    base_url: {base}\n    headers:\n      x-token-copy: \
                            ${accessToken}\n      x-static: plain\n";

async fn redirects_carry_the_credential_only_when_asked_and_only_to_the_same_host(
    db: &TestDatabase,
) {
    let service = FakeService::on(db)
        .template(WITH_HEADERS)
        .args(&["--proxy-allowed-hosts", "localhost"])
        .start()
        .await;
    service.import(ID, ACCESS, REFRESH, Some(3600)).await;
    let app = service.app();
    // The test's own client must not follow the redirects the proxy passes back.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let send = |method: Method, path: String, headers: Vec<(&'static str, &'static str)>| {
        let mut request = client
            .request(method, app.url(&format!("/proxy{path}")))
            .header("Connection-Id", ID)
            .header("Provider-Config-Key", KEY);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request
    };
    let forward = ("Forward-Headers-On-Redirect", "true");
    let to_landing = "/api/redirect?to=/api/landing".to_owned();

    let landing = ok_json(
        send(Method::GET, to_landing.clone(), vec![])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(landing["authorization"], false, "{landing}");
    assert_eq!(landing["x-token-copy"], false, "{landing}");
    assert_eq!(
        landing["x-static"], "plain",
        "a header without a secret still goes"
    );
    let landing = ok_json(
        send(Method::GET, to_landing.clone(), vec![forward])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(landing["authorization"], true, "{landing}");
    assert_eq!(landing["x-token-copy"], true, "{landing}");

    // A hop to a page that needs the token, without it: the 401 is passed back and is no
    // reason to refresh the token.
    let to_echo = "/api/redirect?to=/api/echo".to_owned();
    let response = send(Method::GET, to_echo.clone(), vec![])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(service.fake.refresh_requests(), 0);
    let response = send(Method::GET, to_echo, vec![forward])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // 307 keeps the method and body; 303 turns them into a GET.
    for (status, method, body) in [("307", "POST", "payload"), ("303", "GET", "")] {
        let landing = ok_json(
            send(
                Method::POST,
                format!("/api/redirect?status={status}&to=/api/landing"),
                vec![],
            )
            .body("payload")
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(landing["method"], method, "{status}");
        assert_eq!(landing["body"], body, "{status}");
    }

    // Another host not in GRANTLINE_PROXY_ALLOWED_HOSTS: the redirect is the answer.
    let port = service.fake.base.rsplit(':').next().unwrap().to_owned();
    let elsewhere = format!("http://127.0.0.2:{port}/api/landing");
    let response = send(
        Method::GET,
        format!("/api/redirect?to={elsewhere}"),
        vec![forward],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()["location"], elsewhere.as_str());
    // An allowed host is followed, as a host the caller chose: it must not be on loopback.
    let response = send(
        Method::GET,
        format!("/api/redirect?to=http://localhost:{port}/api/landing"),
        vec![forward],
    )
    .send()
    .await
    .unwrap();
    assert_error(response, 400, "blocked_destination").await;

    // A loop: five redirects followed, then the sixth answer passed back.
    let calls = service.fake.api.calls.load(Ordering::SeqCst);
    let response = send(Method::GET, "/api/redirect".into(), vec![forward])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(service.fake.api.calls.load(Ordering::SeqCst) - calls, 6);
}

async fn a_compressed_answer_is_decoded_only_when_asked(db: &TestDatabase) {
    use std::io::Read;

    let service = service(db, &[]).await;
    let size = 300_000;
    let expected = crate::fake_api::gzip_text(size);
    let path = format!("/api/gzip?bytes={size}");
    let response = call(&service, Method::GET, &path, &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.unwrap();
    assert!(compressed.len() < size / 10, "the bytes as they came");
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut decoded)
        .unwrap();
    assert_eq!(decoded, expected);

    for flag in ["false", "true"] {
        let response = call(&service, Method::GET, &path, &[("Decompress", flag)]).await;
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        if flag == "true" {
            assert!(headers.get("content-encoding").is_none(), "{headers:?}");
            assert_eq!(headers["content-type"], "text/plain");
            assert_eq!(body.as_ref(), expected.as_slice());
        } else {
            assert_eq!(headers["content-encoding"], "gzip");
            assert_eq!(body, compressed);
        }
    }
    // An answer that is not compressed is passed as it is.
    let response = call(
        &service,
        Method::GET,
        "/api/echo",
        &[("Decompress", "true")],
    )
    .await;
    assert_eq!(ok_json(response).await["path"], "/api/echo");
}

/// An OAuth 1.0a template on the fake provider.
const OAUTH1: &str = "fake-oauth1:\n  auth_mode: OAUTH1\n  request_url: \
                      {base}/oauth1/request_token\n  authorization_url: {base}/oauth1/authorize\n  \
                      token_url: {base}/oauth1/access_token\n  signature_method: HMAC-SHA1\n  \
                      proxy:\n    base_url: {base}\n";

async fn an_oauth1_form_body_is_signed_with_the_call(db: &TestDatabase) {
    let service = FakeService::on(db)
        .template(&format!("{WITH_API}{OAUTH1}"))
        .start()
        .await;
    let app = service.app();
    let integration = json!({
        "provider_config_key": "o1", "provider": "fake-oauth1",
        "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
    });
    ok_json(app.post_json("/config", &integration).await).await;
    let (token, secret) = FakeProvider::oauth1_tokens(7);
    let import = json!({
        "provider_config_key": "o1", "connection_id": "o-1",
        "oauth_token": token, "oauth_token_secret": secret,
    });
    let response = app.post_json("/connection", &import).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let request = |method: Method| {
        app.client
            .request(method, app.url("/proxy/api/echo?page=2&q=a%20b"))
            .header("Connection-Id", "o-1")
            .header("Provider-Config-Key", "o1")
    };
    let form = "status=Hello+Ladies+%2B+Gentlemen%2C+a+signed+request%21&emoji=%E2%98%83&empty=";
    for method in [Method::POST, Method::PUT] {
        let response = request(method.clone())
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(form)
            .send()
            .await
            .unwrap();
        let echo = ok_json(response).await;
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["body"], form, "the body as it was signed");
    }
    // A form sent in chunks (no length) is kept and signed too.
    let chunks = futures_util::stream::iter(
        ["a=1&", "b=two"].map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
    );
    let response = request(Method::POST)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(ok_json(response).await["body"], "a=1&b=two");
    // A body that is not a form is not signed; a GET has none.
    let response = request(Method::POST)
        .json(&json!({"status": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = request(Method::GET).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(service.fake.api.unauthorized.load(Ordering::SeqCst), 0);
}

async fn ids_in_any_script_reach_the_proxy_and_answers_carry_only_the_providers_headers(
    db: &TestDatabase,
) {
    let service = service(db, &[]).await;
    let app = service.app();
    // The API takes ids in any script; so does the proxy's header, as UTF-8 (curl, Python)
    // or as Latin-1 (what Node's HTTP client sends for characters up to U+00FF).
    for id in ["ünï-😀", "café"] {
        service
            .import(
                id,
                "fake-access-unicode",
                "fake-refresh-unicode",
                Some(3600),
            )
            .await;
    }
    let sends = [
        ("ünï-😀", "ünï-😀".as_bytes().to_vec()),
        ("café", "café".as_bytes().to_vec()),
        ("café", b"caf\xe9".to_vec()),
    ];
    for (id, bytes) in sends {
        let response = app
            .client
            .get(app.url("/proxy/api/echo"))
            .header(
                "Connection-Id",
                reqwest::header::HeaderValue::from_bytes(&bytes).unwrap(),
            )
            .header("Provider-Config-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{id}");
    }
    // Sent twice, an id is neither guessed nor merged.
    let response = app
        .client
        .get(app.url("/proxy/api/echo"))
        .header("Connection-Id", ID)
        .header("Connection-Id", "someone-else")
        .header("Provider-Config-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "invalid_headers").await;
    // A path that would climb out of the base URL's path is refused.
    // (Sent raw: an HTTP client resolves dot segments before it sends.)
    for climbing in [
        "/proxy/api/../api/echo",
        "/proxy/api/%2e%2E/api/echo",
        "/proxy/./api/echo",
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = app.address.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!(
            "GET {climbing} HTTP/1.1\r\nHost: {address}\r\nConnection-Id: {ID}\r\n\
             Provider-Config-Key: {KEY}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("invalid_proxy_url"),
            "{climbing}: {answer}"
        );
    }
    // The router adds nothing of its own (an `Allow` header) to the provider's answer.
    for method in [Method::GET, Method::DELETE, Method::OPTIONS] {
        let response = call(&service, method.clone(), "/api/echo", &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "{method}");
        assert!(response.headers().get("allow").is_none(), "{method}");
    }
}
