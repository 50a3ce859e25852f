//! Bad input is an answer, not a crash: a table of malformed requests, each with the status and
//! code it must get, on PostgreSQL and SQLite. None may answer 5xx, every error has the one JSON
//! shape, and nothing is half-written.

use domain::testing::TestDatabase;
use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use crate::{TestApp, error_shape_problem, new_key, ok_json, spawn_app};

domain::on_both_backends!(every_malformed_request_gets_its_4xx_and_writes_nothing);

enum Body {
    None,
    Json(Value),
    /// Raw bytes with this `Content-Type`, or none.
    Raw(Option<&'static str>, Vec<u8>),
}

struct Case {
    method: Method,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Body,
    status: u16,
    code: &'static str,
}

fn case(
    method: Method,
    path: impl Into<String>,
    body: Body,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        method,
        path: path.into(),
        headers: Vec::new(),
        body,
        status,
        code,
    }
}

fn get(path: impl Into<String>, status: u16, code: &'static str) -> Case {
    case(Method::GET, path, Body::None, status, code)
}

/// A `GET` case for each of `paths`, all answered `status` with `code`.
fn gets(
    status: u16,
    code: &'static str,
    paths: impl IntoIterator<Item = String>,
) -> impl Iterator<Item = Case> {
    paths.into_iter().map(move |path| get(path, status, code))
}

fn delete(path: impl Into<String>, status: u16, code: &'static str) -> Case {
    case(Method::DELETE, path, Body::None, status, code)
}

fn post(path: &str, body: Value, status: u16, code: &'static str) -> Case {
    case(Method::POST, path, Body::Json(body), status, code)
}

/// `POST /connection` of a valid import with `changes` (see [`import_body`]), answered 400 `code`.
fn bad_import(changes: Value, code: &'static str) -> Case {
    post("/connection", import_body(changes), 400, code)
}

/// `POST /config` of a valid body with `changes` (see [`config_body`]), answered 400 `code`.
fn bad_config(changes: Value, code: &'static str) -> Case {
    post("/config", config_body(changes), 400, code)
}

/// `POST /connections` of the connection `n1` of `gh` with the nested `credentials`, answered
/// 400 `code`.
fn bad_credentials(credentials: Value, code: &'static str) -> Case {
    let body = json!({ "provider_config_key": "gh", "connection_id": "n1",
                       "credentials": credentials });
    post("/connections", body, 400, code)
}

fn with_header(mut case: Case, name: &'static str, value: &'static str) -> Case {
    case.headers.push((name, value));
    case
}

/// A complete, valid import into `gh`, with `changes` applied (a `null` removes the field).
fn import_body(changes: Value) -> Value {
    changed(
        json!({
            "provider_config_key": "gh",
            "connection_id": "new-one",
            "access_token": "fresh_access",
            "refresh_token": "fresh_refresh",
            "expires_at": "2030-01-01T00:00:00Z",
        }),
        changes,
    )
}

/// A complete, valid `/config` body, with `changes` applied (a `null` removes the field).
fn config_body(changes: Value) -> Value {
    changed(
        json!({
            "provider_config_key": "fresh",
            "provider": "github",
            "oauth_client_id": "id",
            "oauth_client_secret": "secret",
            "oauth_scopes": "repo",
        }),
        changes,
    )
}

/// The object `body` with the fields of `changes` set (a `null` removes the field).
fn changed(mut body: Value, changes: Value) -> Value {
    let (Value::Object(fields), Value::Object(changes)) = (&mut body, changes) else {
        unreachable!("both are objects")
    };
    for (field, value) in changes {
        if value.is_null() {
            fields.remove(&field);
        } else {
            fields.insert(field, value);
        }
    }
    body
}

fn cases() -> Vec<Case> {
    let long_id = "x".repeat(300);
    let oversized = {
        let mut body = import_body(json!({ "connection_id": "too-big" }));
        body["access_token"] = json!("a".repeat(1024 * 1024 + 1));
        serde_json::to_vec(&body).unwrap()
    };
    let key = "provider_config_key=gh";
    let mut cases = vec![
        // GET /connection/:id: the provider config key.
        get("/connection/c1", 400, "missing_provider_config"),
        get(
            "/connection/c1?provider_config_key=",
            400,
            "missing_provider_config",
        ),
        get(
            "/connection/c1?provider_config_key=%20%20",
            400,
            "missing_provider_config",
        ),
        get("/connections/c1?foo=bar", 400, "missing_provider_config"),
        get(
            "/connection/c1?provider_config_key=nope",
            400,
            "unknown_provider_config",
        ),
        get(
            format!("/connection/nobody?{key}"),
            404,
            "unknown_connection",
        ),
        get(format!("/connections/C1?{key}"), 404, "unknown_connection"),
    ];
    // Query flags, and identifiers in the query: query errors, not path errors.
    cases.extend(gets(
        400,
        "invalid_query_params",
        [
            format!("/connection/c1?{key}&force_refresh=yes"),
            format!("/connection/c1?{key}&refresh_token=maybe"),
            format!("/connections/c1?{key}&refresh_token=TRUE!"),
            "/config/gh?include_creds=sure".to_owned(),
            "/connection/c1?provider_config_key=g%01h".to_owned(),
            format!("/connection?connectionId={long_id}"),
            "/connections?connectionId=%00".to_owned(),
            // Not UTF-8 once decoded: `%ff` and `%fe` would both read as U+FFFD.
            "/connection/c1?provider_config_key=g%ffh".to_owned(),
            format!("/connections?search=ok%C3&{key}"),
            "/integrations?x=%fe".to_owned(),
        ],
    ));
    // Path segments.
    cases.extend(gets(
        400,
        "invalid_uri_params",
        [
            format!("/connection/%00?{key}"),
            format!("/connection/a%01b?{key}"),
            format!("/connection/%FF?{key}"),
            format!("/connection/ok%C3?{key}"),
            format!("/connection/{long_id}?{key}"),
            "/config/%00".to_owned(),
        ],
    ));
    cases.extend([
        delete(
            format!("/connection/c1?provider_config_key={}", "k".repeat(300)),
            400,
            "invalid_query_params",
        ),
        delete(format!("/connections/%FF?{key}"), 400, "invalid_uri_params"),
        // DELETE /connection/:id.
        delete("/connection/c1", 400, "missing_provider_config"),
        delete(
            "/connection/c1?provider_config_key=",
            400,
            "missing_provider_config",
        ),
        delete(
            "/connection/c1?provider_config_key=nope",
            400,
            "unknown_provider_config",
        ),
        // Nango answers an unknown connection's delete with 400, every other read with 404.
        delete(
            format!("/connection/nobody?{key}"),
            400,
            "unknown_connection",
        ),
        delete(
            format!("/connection/{long_id}?{key}"),
            400,
            "invalid_uri_params",
        ),
        // POST /connection: the body as a whole.
        case(
            Method::POST,
            "/connection",
            Body::Raw(Some("application/json"), br#"{"connection_id": "#.to_vec()),
            400,
            "invalid_json",
        ),
        case(
            Method::POST,
            "/connections",
            Body::Raw(Some("application/json"), b"".to_vec()),
            400,
            "invalid_json",
        ),
        case(
            Method::POST,
            "/connection",
            Body::Raw(
                Some("text/plain"),
                import_body(json!({})).to_string().into_bytes(),
            ),
            415,
            "invalid_content_type",
        ),
        case(
            Method::POST,
            "/connection",
            Body::Raw(
                Some("application/x-www-form-urlencoded"),
                b"provider_config_key=gh&connection_id=form".to_vec(),
            ),
            415,
            "invalid_content_type",
        ),
        case(
            Method::POST,
            "/connections",
            Body::Raw(None, import_body(json!({})).to_string().into_bytes()),
            415,
            "invalid_content_type",
        ),
        // Two types for one body: refused before any handler picks one.
        with_header(
            case(
                Method::POST,
                "/connection",
                Body::Raw(
                    Some("application/json"),
                    import_body(json!({})).to_string().into_bytes(),
                ),
                400,
                "invalid_content_type",
            ),
            "Content-Type",
            "text/plain",
        ),
        case(
            Method::POST,
            "/connection",
            Body::Raw(Some("application/json"), oversized),
            413,
            "payload_too_large",
        ),
        post(
            "/connection",
            json!([import_body(json!({}))]),
            400,
            "invalid_body",
        ),
        post("/connection", json!(42), 400, "invalid_body"),
        post("/connections", json!(null), 400, "invalid_body"),
        post("/connection", json!({}), 400, "missing_provider_config"),
        // POST /connection: fields.
        bad_import(json!({ "connection_id": null }), "missing_connection"),
        bad_import(json!({ "connection_id": " " }), "missing_connection"),
        // An organization without its end user would be dropped.
        post(
            "/connections",
            json!({ "provider_config_key": "gh", "organization": { "id": "o5" },
                    "credentials": { "type": "OAUTH2", "access_token": "a" } }),
            400,
            "invalid_body",
        ),
        bad_import(json!({ "refreshToken": "r" }), "invalid_body"),
        // The camel-case spelling of a field that matters is refused, not ignored.
        post(
            "/connections",
            json!({ "provider_config_key": "gh", "connectionId": "c7",
                    "credentials": { "type": "OAUTH2", "access_token": "a" } }),
            400,
            "invalid_body",
        ),
        // Per-connection webhook URLs are not kept: refused, not dropped.
        bad_import(
            json!({ "webhook_url_override": "https://hooks.example.com/x" }),
            "invalid_body",
        ),
        post(
            "/connections",
            json!({ "provider_config_key": "gh", "webhook_url_override": "https://h.example/x",
                    "credentials": { "type": "OAUTH2", "access_token": "a" } }),
            400,
            "invalid_body",
        ),
        // Kept as sent, so a padded id would be another connection than it looks.
        bad_import(json!({ "connection_id": "new-one " }), "invalid_body"),
        bad_import(json!({ "connection_id": "\u{a0}new-one" }), "invalid_body"),
        post(
            "/connections/metadata",
            json!({ "connection_id": ["a", " b"], "provider_config_key": "gh", "metadata": {} }),
            400,
            "invalid_body",
        ),
        bad_import(json!({ "access_token": null }), "missing_access_token"),
        bad_import(json!({ "access_token": "" }), "missing_access_token"),
        bad_import(
            json!({ "provider_config_key": "nope" }),
            "unknown_provider_config",
        ),
        bad_import(
            json!({ "provider_config_key": "" }),
            "missing_provider_config",
        ),
        bad_import(json!({ "connection_id": 5 }), "invalid_body"),
        bad_import(json!({ "provider_config_key": 5 }), "invalid_body"),
        bad_import(json!({ "access_token": 5 }), "invalid_body"),
        bad_import(json!({ "refresh_token": ["r"] }), "invalid_body"),
        bad_import(json!({ "connection_id": long_id.clone() }), "invalid_body"),
        bad_import(json!({ "connection_id": "bell\u{7}" }), "invalid_body"),
        bad_import(
            json!({ "provider_config_key": "k".repeat(300) }),
            "invalid_body",
        ),
        bad_import(json!({ "expires_at": "next tuesday" }), "invalid_body"),
        bad_import(json!({ "expires_at": true }), "invalid_body"),
        bad_import(
            json!({ "expires_at": null, "expires_in": -5 }),
            "invalid_body",
        ),
        bad_import(json!({ "metadata": [1, 2] }), "invalid_body"),
        bad_import(json!({ "metadata": "text" }), "invalid_body"),
        bad_import(json!({ "connection_config": 1 }), "invalid_body"),
        bad_import(json!({ "raw": "token=abc" }), "invalid_body"),
        post(
            "/connection",
            json!({ "provider_config_key": "gh", "connection_id": "o1", "oauth_token": "t" }),
            400,
            "missing_oauth_token_secret",
        ),
        bad_credentials(json!({ "type": "SAML", "assertion": "x" }), "invalid_body"),
        bad_credentials(json!({ "access_token": "x" }), "invalid_body"),
        bad_credentials(json!("x"), "invalid_body"),
        bad_credentials(json!({ "type": "OAUTH2" }), "missing_access_token"),
        bad_credentials(json!({ "type": "API_KEY" }), "missing_api_key"),
        bad_credentials(
            json!({ "type": "BASIC", "password": "p" }),
            "missing_username",
        ),
        // Nesting deeper than any token response, and NUL characters (PostgreSQL's jsonb refuses
        // them).
        case(
            Method::POST,
            "/connection",
            Body::Raw(
                Some("application/json"),
                format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            ),
            400,
            "invalid_json",
        ),
        bad_import(json!({ "connection_id": "nul\u{0}" }), "invalid_body"),
        bad_import(
            json!({ "metadata": { "note": "nul\u{0}" } }),
            "invalid_body",
        ),
        bad_import(
            json!({ "connection_config": { "nul\u{0}": "x" } }),
            "invalid_body",
        ),
        // Values the log could not read back: nesting past its bounds (126 and 127 levels once
        // passed the body parser and then poisoned the log), too many keys, too many bytes.
        bad_import(json!({ "metadata": nested(127) }), "invalid_json"),
        bad_import(json!({ "metadata": nested(126) }), "invalid_body"),
        bad_import(json!({ "metadata": nested(33) }), "invalid_body"),
        bad_import(json!({ "connection_config": nested(126) }), "invalid_body"),
        bad_import(json!({ "raw": nested(126) }), "invalid_body"),
        bad_import(json!({ "metadata": many_keys(1_001) }), "invalid_body"),
        bad_import(
            json!({ "metadata": { "k".repeat(257): 1 } }),
            "invalid_body",
        ),
        bad_import(
            json!({ "metadata": { "big": "x".repeat(65 * 1024) } }),
            "invalid_body",
        ),
        post(
            &format!("/connection/c1/metadata?{key}"),
            nested(126),
            400,
            "invalid_body",
        ),
        case(
            Method::PATCH,
            format!("/connection/c1/metadata?{key}"),
            Body::Json(json!({ "a": nested(40) })),
            400,
            "invalid_body",
        ),
        case(
            Method::PATCH,
            format!("/connection/c1/metadata?{key}"),
            Body::Json(many_keys(1_000)),
            400,
            "invalid_body",
        ),
        post(
            "/connection/metadata",
            json!({ "connection_id": ["c1"], "provider_config_key": "gh",
                    "metadata": nested(126) }),
            400,
            "invalid_body",
        ),
        // Times outside 1970..=9999: `expires_in` of 8.2e12 seconds once panicked the handler,
        // and year 10000 was served back as `+10000-…`.
        bad_import(
            json!({ "expires_at": null, "expires_in": 8_200_000_000_000_i64 }),
            "invalid_body",
        ),
        bad_import(
            json!({ "expires_at": null, "expires_in": i64::MAX }),
            "invalid_body",
        ),
        bad_import(json!({ "expires_at": 253_402_300_800_i64 }), "invalid_body"),
        bad_import(json!({ "expires_at": -1 }), "invalid_body"),
        bad_import(json!({ "expires_at": i64::MAX }), "invalid_body"),
        bad_import(
            json!({ "expires_at": "1969-12-31T23:59:59Z" }),
            "invalid_body",
        ),
        bad_credentials(
            json!({ "type": "OAUTH2", "access_token": "a", "expires_at": "+10000-01-01T00:00:00Z" }),
            "invalid_body",
        ),
        // Metadata of one connection.
        post(
            &format!("/connection/c1/metadata?{key}"),
            json!({ "nul\u{0}": 1 }),
            400,
            "invalid_body",
        ),
        case(
            Method::PATCH,
            format!("/connections/c1/metadata?{key}"),
            Body::Json(json!({ "deep": { "nul": ["\u{0}"] } })),
            400,
            "invalid_body",
        ),
        post(
            &format!("/connection/c1/metadata?{key}"),
            json!([1, 2]),
            400,
            "invalid_body",
        ),
        post(
            &format!("/connections/c1/metadata?{key}"),
            json!(null),
            400,
            "invalid_body",
        ),
        case(
            Method::PATCH,
            format!("/connection/c1/metadata?{key}"),
            Body::Json(json!("text")),
            400,
            "invalid_body",
        ),
        post(
            "/connection/c1/metadata",
            json!({ "a": 1 }),
            400,
            "missing_provider_config",
        ),
        post(
            &format!("/connection/nobody/metadata?{key}"),
            json!({}),
            404,
            "unknown_connection",
        ),
        post(
            "/connection/c1/metadata?provider_config_key=nope",
            json!({}),
            400,
            "unknown_provider_config",
        ),
        case(
            Method::POST,
            format!("/connection/c1/metadata?{key}"),
            Body::Raw(Some("application/json"), b"{'a': 1}".to_vec()),
            400,
            "invalid_json",
        ),
        case(
            Method::PATCH,
            format!("/connection/c1/metadata?{key}"),
            Body::Raw(Some("text/plain"), b"{}".to_vec()),
            415,
            "invalid_content_type",
        ),
        post(
            &format!("/connection/%00/metadata?{key}"),
            json!({}),
            400,
            "invalid_uri_params",
        ),
        // Metadata of several connections.
        post(
            "/connections/metadata",
            json!({ "provider_config_key": "gh", "metadata": {} }),
            400,
            "missing_connection",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": 5, "provider_config_key": "gh", "metadata": {} }),
            400,
            "invalid_body",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": [], "provider_config_key": "gh", "metadata": {} }),
            400,
            "invalid_body",
        ),
        post(
            "/connection/metadata",
            json!({ "connection_id": ["c1", 3], "provider_config_key": "gh", "metadata": {} }),
            400,
            "invalid_body",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": "c1", "provider_config_key": "gh", "metadata": [1] }),
            400,
            "invalid_body",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": "c1", "provider_config_key": "gh" }),
            400,
            "invalid_body",
        ),
        case(
            Method::PATCH,
            "/connections/metadata",
            Body::Json(json!({ "connection_id": "c1", "metadata": {} })),
            400,
            "missing_provider_config",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": "c1", "provider_config_key": "nope", "metadata": {} }),
            400,
            "unknown_provider_config",
        ),
        post(
            "/connections/metadata",
            json!({ "connection_id": ["c1", "nobody"], "provider_config_key": "gh",
                    "metadata": { "written": true } }),
            404,
            "unknown_connection",
        ),
        post("/connections/metadata", json!(["c1"]), 400, "invalid_body"),
        // /config.
        post("/config", json!({}), 400, "missing_body"),
        post("/config", json!(null), 400, "missing_body"),
        post("/config", json!([1]), 400, "invalid_body"),
        bad_config(
            json!({ "provider_config_key": null }),
            "missing_provider_config",
        ),
        bad_config(json!({ "provider": null }), "missing_provider_template"),
        bad_config(json!({ "provider": "" }), "missing_provider_template"),
        bad_config(
            json!({ "provider": "no-such-provider" }),
            "unknown_provider_template",
        ),
        case(
            Method::PUT,
            "/config",
            Body::Json(config_body(
                json!({ "provider_config_key": "gh", "provider": "no-such-provider" }),
            )),
            400,
            "unknown_provider_template",
        ),
        bad_config(json!({ "oauth_client_id": null }), "missing_client_id"),
        bad_config(
            json!({ "oauth_client_secret": null }),
            "missing_client_secret",
        ),
        bad_config(json!({ "oauth_client_id": "id\u{0}" }), "invalid_body"),
        bad_config(
            json!({ "oauth_client_id": "a\r\nX-Injected: 1" }),
            "invalid_body",
        ),
        bad_config(json!({ "oauth_client_id": "c".repeat(300) }), "invalid_body"),
        bad_config(json!({ "oauth_client_secret": "s\u{1}" }), "invalid_body"),
        bad_config(
            json!({ "oauth_scopes": ["repo", "nul\u{0}"] }),
            "invalid_body",
        ),
        bad_config(
            json!({ "provider_config_key": "k".repeat(300) }),
            "invalid_body",
        ),
        bad_config(json!({ "oauth_scopes": 5 }), "invalid_body"),
        bad_config(json!({ "oauth_client_id": 5 }), "invalid_body"),
        post(
            "/config",
            config_body(json!({ "provider_config_key": "gh" })),
            409,
            "duplicate_provider_config",
        ),
        case(
            Method::POST,
            "/config",
            Body::Raw(Some("application/json"), b"{\"provider\":".to_vec()),
            400,
            "invalid_json",
        ),
        case(
            Method::PUT,
            "/config",
            Body::Json(config_body(json!({ "provider_config_key": "nope" }))),
            400,
            "unknown_provider_config",
        ),
        case(
            Method::PUT,
            "/config",
            Body::Json(json!({})),
            400,
            "missing_body",
        ),
        get("/config/unknown", 404, "unknown_provider_config"),
        delete("/config/unknown", 404, "unknown_provider_config"),
        // Routes and methods; `Nango-*` and (without a secret key) `Authorization` are ignored.
        get("/nope", 404, "not_found"),
        with_header(
            get("/connection/c1/extra/segment", 404, "not_found"),
            "Nango-Is-Sync",
            "true",
        ),
        with_header(
            case(
                Method::PUT,
                format!("/connection/c1?{key}"),
                Body::None,
                405,
                "method_not_allowed",
            ),
            "Authorization",
            "Bearer ",
        ),
        delete("/connection", 405, "method_not_allowed"),
        case(
            Method::PATCH,
            "/config",
            Body::Json(json!({})),
            405,
            "method_not_allowed",
        ),
        with_header(
            get(
                format!("/connection/nobody?{key}"),
                404,
                "unknown_connection",
            ),
            "Nango-Is-Dry-Run",
            "true",
        ),
    ]);
    cases
}

/// An object nested `levels` deep (itself level 1).
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({}), |inner, _| json!({ "a": inner }))
}

/// An object with `count` members.
fn many_keys(count: usize) -> Value {
    Value::Object((0..count).map(|i| (format!("k{i}"), json!(i))).collect())
}

/// The server's body limit: a larger announced body is refused from its headers alone.
const BODY_LIMIT: usize = 1024 * 1024;

/// The status and body of the answer to `case`.
async fn send(app: &TestApp, case: &Case) -> (u16, String) {
    if let Body::Raw(content_type, bytes) = &case.body
        && bytes.len() > BODY_LIMIT
    {
        return announce_only(app, case, *content_type, bytes.len()).await;
    }
    let mut request = app.client.request(case.method.clone(), app.url(&case.path));
    for (name, value) in &case.headers {
        request = request.header(*name, *value);
    }
    request = match &case.body {
        Body::None => request,
        Body::Json(value) => request.json(value),
        Body::Raw(content_type, bytes) => {
            let request = match content_type {
                Some(content_type) => request.header(CONTENT_TYPE, *content_type),
                None => request,
            };
            request.body(bytes.clone())
        }
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Sends only the head of a request that announces a body of `length` bytes, and reads the
/// answer. (Sending the body too races the server's early refusal: it closes the socket with
/// the unread bytes, and the client's write fails with a broken pipe before it reads the 413.)
async fn announce_only(
    app: &TestApp,
    case: &Case,
    content_type: Option<&str>,
    length: usize,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url::Url::parse(&app.url(&case.path)).unwrap();
    let address = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {length}\r\n",
        case.method,
        &url[url::Position::BeforePath..],
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    for (name, value) in &case.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("the server answers an oversized announcement without waiting for the body")
    .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn every_malformed_request_gets_its_4xx_and_writes_nothing(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    ok_json(
        app.post_json(
            "/config",
            &json!({ "provider_config_key": "gh", "provider": "github",
                     "oauth_client_id": "id", "oauth_client_secret": "secret" }),
        )
        .await,
    )
    .await;
    let response = app
        .post_json(
            "/connection",
            &json!({ "provider_config_key": "gh", "connection_id": "c1", "access_token": "t1",
                     "metadata": { "kept": true } }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let before = app.get_ok("/connection/c1?provider_config_key=gh").await;

    let cases = cases();
    assert!(cases.len() >= 35);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let label = format!("case {i}, {} {}", case.method, truncate(&case.path));
        let (status, text) = send(&app, case).await;
        if status >= 500 {
            failures.push(format!("{label}: answered {status}: {text}"));
            continue;
        }
        let body: Value = match serde_json::from_str(&text) {
            Ok(body) => body,
            Err(e) => {
                failures.push(format!("{label}: {status}, not JSON ({e}): {text:?}"));
                continue;
            }
        };
        if let Some(problem) = error_shape_problem(&body) {
            failures.push(format!("{label}: bad error shape, {problem}: {text}"));
        }
        let code = body["error"]["code"].as_str().unwrap_or("<none>");
        if status != case.status || code != case.code {
            failures.push(format!(
                "{label}: expected {} {}, got {status} {code}: {}",
                case.status,
                case.code,
                truncate(&text)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // The log is readable to its end: the projections keep up.
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());

    // Nothing was half-written: the connection list, the connection and the configs are as the
    // setup left them.
    assert_eq!(app.listed("connection_id").await, ["c1"]);
    assert_eq!(
        app.get_ok("/connection/c1?provider_config_key=gh").await,
        before
    );
    let configs = app.get_ok("/config").await;
    let configs = configs["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 1, "{configs:?}");
    assert_eq!(configs[0]["unique_key"], "gh");
    assert_eq!(
        app.get_ok("/config/gh?include_creds=true").await["config"]["oauth_client_secret"],
        "secret"
    );
}

fn truncate(text: &str) -> String {
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_owned()
    }
}
