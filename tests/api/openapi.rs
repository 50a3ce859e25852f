//! `/openapi.json` on PostgreSQL: an OpenAPI 3.1 document with every parameter and the error
//! schema; every route the router registers is documented and every documented operation is
//! served (probed on a running server); the documented security matches the secret key check;
//! real answers match their documented schemas.

use std::collections::{BTreeMap, BTreeSet};

use domain::testing::TestDatabase;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{TestApp, config_on, new_key, spawn_with_state, strings};

/// The methods probed on every path.
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Operations that need no secret key (the flows and the credential forms check a session
/// token, the public key or an `hmac` from the query; the Connect UI's page reads its token
/// itself; logos are public).
const OPEN: [(&str, &str); 14] = [
    ("get", "/"),
    ("get", "/images/template-logos/{file}"),
    ("get", "/connect"),
    ("get", "/connect/"),
    ("get", "/connect/assets/connect.js"),
    ("get", "/connect/assets/connect.css"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/openapi.json"),
    ("get", "/oauth/connect/{provider_config_key}"),
    ("get", "/oauth/callback"),
    ("post", "/api-auth/api-key/{provider_config_key}"),
    ("post", "/api-auth/basic/{provider_config_key}"),
    ("post", "/oauth2/auth/{provider_config_key}"),
];

/// Operations that take a connect session's token instead of the secret key.
const SESSION: [(&str, &str); 2] = [("get", "/connect/session"), ("delete", "/connect/session")];

/// Operations that take the secret key or a connect session's token.
const KEY_OR_SESSION: [(&str, &str); 4] = [
    ("get", "/integrations"),
    ("get", "/integrations/{unique_key}"),
    ("get", "/providers"),
    ("get", "/providers/{provider}"),
];

/// Whether `operation` documents the scheme `name`.
fn requires(operation: &Value, name: &str) -> bool {
    operation["security"]
        .as_array()
        .is_some_and(|s| s.iter().any(|r| r.get(name).is_some()))
}

/// A parameter's name and whether it is required.
type Param = (&'static str, bool);

async fn spawn(db: &TestDatabase, extra: &[&str]) -> (TestApp, grantline::state::AppState) {
    spawn_with_state(config_on(db, &new_key(), extra)).await
}

pub(crate) async fn document(app: &TestApp) -> Value {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    response.json().await.unwrap()
}

/// `(method, path template) -> operation` for every documented operation.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if [
                "get", "put", "post", "delete", "patch", "options", "head", "trace",
            ]
            .contains(&method.as_str())
            {
                out.insert((method.clone(), path.clone()), operation.clone());
            }
        }
    }
    out
}

/// The `{name}`s of a path template.
fn template_params(path: &str) -> BTreeSet<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(str::to_owned)
        .collect()
}

/// `path` with sample values for its `{params}`.
fn sample_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment == "{provider}" {
                // An unknown template is Nango's 404 `not_found`, like an unknown route.
                "github"
            } else if segment == "{file}" {
                "github.svg"
            } else if segment.starts_with('{') && segment.ends_with('}') {
                "probe-value"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// One request as a client would send it, without following redirects; a `GET /` is a
/// WebSocket handshake (that route only serves upgrades).
async fn probe(client: &reqwest::Client, app: &TestApp, method: Method, path: &str) -> Probe {
    let mut request = client.request(method.clone(), app.url(&sample_path(path)));
    if method == Method::GET && path == "/" {
        request = request
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    } else if method != Method::GET && method != Method::DELETE {
        request = request.json(&json!({}));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let code = if status == StatusCode::SWITCHING_PROTOCOLS {
        None
    } else {
        let text = response.text().await.unwrap_or_default();
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
    };
    Probe { status, code }
}

struct Probe {
    status: StatusCode,
    code: Option<String>,
}

impl Probe {
    /// Whether a handler answered: not the router's 405, not its unknown-route 404.
    fn served(&self) -> bool {
        self.status != StatusCode::METHOD_NOT_ALLOWED
            && !(self.status == StatusCode::NOT_FOUND && self.code.as_deref() == Some("not_found"))
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_error_schema_and_every_parameter() {
    let db = TestDatabase::postgres().await;
    let (app, _) = spawn(&db, &[]).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    // The one error shape, and the security schemes.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["Error"]["properties"]["error"]["$ref"],
        "#/components/schemas/ErrorDetail"
    );
    assert_eq!(schemas["Error"]["required"], json!(["error"]));
    let detail = &schemas["ErrorDetail"];
    assert_eq!(detail["required"], json!(["code", "message", "payload"]));
    assert_eq!(detail["properties"]["payload"]["type"], "object");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["secret_key"]["scheme"], "bearer");
    assert_eq!(schemes["secret_key_basic"]["scheme"], "basic");

    let operations = operations(&doc);
    let mut ids = BTreeSet::new();
    for ((method, path), operation) in &operations {
        let what = format!("{method} {path}");
        let id = operation["operationId"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "{what}: operationId {id} twice");
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{what}"
        );
        // Each `{param}` of the path is a required path parameter, and only those.
        let parameters = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let in_path: BTreeSet<String> = parameters
            .iter()
            .filter(|p| p["in"] == "path")
            .inspect(|p| assert_eq!(p["required"], true, "{what}: {p}"))
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(in_path, template_params(path), "{what}");
        for parameter in &parameters {
            assert!(parameter["schema"].is_object(), "{what}: {parameter}");
        }
        // Operations behind the secret key document it and its error answer.
        let secured = operation["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("secret_key").is_some()));
        let open = OPEN.contains(&(method.as_str(), path.as_str()));
        let session = SESSION.contains(&(method.as_str(), path.as_str()));
        assert_eq!(
            secured,
            !open && !session,
            "{what}: security {}",
            operation["security"]
        );
        assert_eq!(
            requires(operation, "connect_session_token"),
            session || KEY_OR_SESSION.contains(&(method.as_str(), path.as_str())),
            "{what}: security {}",
            operation["security"]
        );
        if secured {
            assert_eq!(
                operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Error",
                "{what}"
            );
        }
        // Bodies where the handler reads one.
        let takes_body = ["post", "put", "patch"].contains(&method.as_str());
        assert_eq!(operation["requestBody"].is_object(), takes_body, "{what}");
    }

    // The parameters each operation takes, in both route families.
    let key = ("provider_config_key", true);
    let expected: Vec<(&str, &str, Vec<Param>)> = vec![
        ("get", "{family}", vec![("connectionId", false)]),
        (
            "get",
            "{family}/{connection_id}",
            vec![
                ("connection_id", true),
                key,
                ("force_refresh", false),
                ("refresh_token", false),
            ],
        ),
        (
            "get",
            "{family}/metadata",
            vec![key, ("force_refresh", false), ("refresh_token", false)],
        ),
        (
            "delete",
            "{family}/{connection_id}",
            vec![("connection_id", true), key],
        ),
        ("delete", "{family}/metadata", vec![key]),
        (
            "post",
            "{family}/{connection_id}/metadata",
            vec![("connection_id", true), key],
        ),
        (
            "patch",
            "{family}/{connection_id}/metadata",
            vec![("connection_id", true), key],
        ),
        (
            "get",
            "{family}/{connection_id}/history",
            vec![
                ("connection_id", true),
                key,
                ("after", false),
                ("limit", false),
            ],
        ),
        (
            "get",
            "/config/{provider_config_key}",
            vec![("provider_config_key", true), ("include_creds", false)],
        ),
        (
            "delete",
            "/config/{provider_config_key}",
            vec![("provider_config_key", true)],
        ),
        (
            "get",
            "/oauth/connect/{provider_config_key}",
            vec![
                ("provider_config_key", true),
                ("connection_id", false),
                ("connect_session_token", false),
                ("public_key", false),
                ("hmac", false),
                ("params", false),
                ("authorization_params", false),
                ("scopes", false),
                ("api_redirect_url", false),
                ("ws_client_id", false),
            ],
        ),
        (
            "get",
            "/oauth/callback",
            vec![
                ("state", true),
                ("code", false),
                ("error", false),
                ("error_description", false),
                ("oauth_token", false),
                ("oauth_verifier", false),
            ],
        ),
    ];
    for (method, template, parameters) in expected {
        for family in ["/connection", "/connections"] {
            let path = template.replace("{family}", family);
            let operation = operations
                .get(&(method.to_owned(), path.clone()))
                .unwrap_or_else(|| panic!("{method} {path} is not documented"));
            let documented = operation["parameters"].as_array().unwrap();
            for (name, required) in &parameters {
                let parameter = documented
                    .iter()
                    .find(|p| p["name"] == *name)
                    .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"));
                assert_eq!(
                    parameter["required"].as_bool().unwrap_or(false),
                    *required,
                    "{method} {path}: {parameter}"
                );
            }
        }
    }
    let connect = &operations[&(
        "get".to_owned(),
        "/oauth/connect/{provider_config_key}".to_owned(),
    )];
    let params = connect["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "params")
        .unwrap();
    assert_eq!(params["style"], "deepObject");
}

#[tokio::test]
async fn every_route_of_the_router_is_documented_and_every_documented_operation_is_served() {
    let db = TestDatabase::postgres().await;
    let (app, state) = spawn(&db, &[]).await;
    let doc = document(&app).await;
    let documented = operations(&doc);
    let (_, paths) = grantline::http::router_with_paths(state);
    assert!(paths.len() > 10, "{paths:?}");
    let client = no_redirects();

    let mut undocumented = Vec::new();
    for path in &paths {
        for method in METHODS {
            let answer = probe(&client, &app, method.clone(), path).await;
            if answer.status == StatusCode::METHOD_NOT_ALLOWED {
                continue;
            }
            let key = (method.as_str().to_lowercase(), path.clone());
            if !documented.contains_key(&key) {
                undocumented.push(format!("{method} {path} ({})", answer.status));
            }
        }
    }
    assert!(
        undocumented.is_empty(),
        "served but missing from /openapi.json: {undocumented:?}"
    );

    let mut unserved = Vec::new();
    for (method, path) in documented.keys() {
        if !paths.contains(path) {
            unserved.push(format!("{method} {path}: no such route"));
            continue;
        }
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let answer = probe(&client, &app, method.clone(), path).await;
        if !answer.served() {
            unserved.push(format!("{method} {path}: {}", answer.status));
        }
    }
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
}

#[tokio::test]
async fn the_documented_security_matches_the_secret_key_check() {
    let db = TestDatabase::postgres().await;
    let (app, _) = spawn(&db, &["--secret-key", "openapi-test-secret-key-0123456789"]).await;
    // The document itself is open.
    let doc = document(&app).await;
    let client = no_redirects();
    for ((method, path), operation) in operations(&doc) {
        let secured =
            requires(&operation, "secret_key") || requires(&operation, "connect_session_token");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let answer = probe(&client, &app, method.clone(), &path).await;
        assert_eq!(
            answer.status == StatusCode::UNAUTHORIZED,
            secured,
            "{method} {path} answered {} without a key",
            answer.status
        );
    }
}

#[tokio::test]
async fn real_answers_match_their_documented_schemas() {
    let db = TestDatabase::postgres().await;
    let (app, _) = spawn(&db, &[]).await;
    let doc = document(&app).await;
    let check = |method: &str, path: &str, status: u16, body: &Value| {
        let schema = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
            ["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status} is not documented"
        );
        let mut problems = Vec::new();
        conforms(&doc, schema, body, "$", &mut problems);
        assert!(
            problems.is_empty(),
            "{method} {path} {status}: {problems:?}\n{body}"
        );
    };
    let call = |method: Method, path: &str, body: Option<Value>| {
        let mut request = app.client.request(method, app.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let config = json!({
        "provider_config_key": "crm",
        "provider": "github",
        "oauth_client_id": "client-id",
        "oauth_client_secret": "client-secret",
        "oauth_scopes": "repo,user",
    });
    let (status, body) = call(Method::POST, "/config", Some(config.clone())).await;
    check("post", "/config", status, &body);
    let (status, body) = call(Method::PUT, "/config", Some(config)).await;
    check("put", "/config", status, &body);
    let (status, body) = call(Method::GET, "/config", None).await;
    check("get", "/config", status, &body);
    let (status, body) = call(Method::GET, "/config/crm?include_creds=true", None).await;
    check("get", "/config/{provider_config_key}", status, &body);
    assert!(body["config"]["oauth_client_secret"].is_string());

    // Each kind of credentials under a template of its kind.
    for (key, provider) in [
        ("crm1", "twitter"),
        ("crmk", "openai"),
        ("crmb", "jira-basic"),
    ] {
        let body = json!({ "provider_config_key": key, "provider": provider,
                           "oauth_client_id": "client-id", "oauth_client_secret": "s" });
        assert_eq!(call(Method::POST, "/config", Some(body)).await.0, 200);
    }
    let imports = [
        json!({ "provider_config_key": "crm", "connection_id": "flat", "access_token": "a1",
            "refresh_token": "r1", "expires_at": "2030-01-02T03:04:05Z",
            "raw": { "access_token": "a1" } }),
        json!({ "provider_config_key": "crm1", "connection_id": "one",
            "credentials": { "type": "OAUTH1", "oauth_token": "t", "oauth_token_secret": "s" } }),
        json!({ "provider_config_key": "crmk", "connection_id": "key",
            "credentials": { "type": "API_KEY", "apiKey": "k" } }),
        json!({ "provider_config_key": "crmb", "connection_id": "basic",
            "credentials": { "type": "BASIC", "username": "u", "password": "p" } }),
        json!({ "provider_config_key": "crm", "connection_id": "metadata", "access_token": "a2" }),
    ];
    for import in imports {
        let (status, body) = call(Method::POST, "/connections", Some(import)).await;
        assert_eq!(status, 201, "{body}");
        check("post", "/connections", status, &body);
    }
    for (path, template) in [
        (
            "/connection/flat?provider_config_key=crm",
            "/connection/{connection_id}",
        ),
        (
            "/connections/flat?provider_config_key=crm&refresh_token=false",
            "/connections/{connection_id}",
        ),
        (
            "/connection/one?provider_config_key=crm1",
            "/connection/{connection_id}",
        ),
        (
            "/connection/key?provider_config_key=crmk",
            "/connection/{connection_id}",
        ),
        (
            "/connection/basic?provider_config_key=crmb",
            "/connection/{connection_id}",
        ),
        (
            "/connection/metadata?provider_config_key=crm",
            "/connection/metadata",
        ),
        ("/connection", "/connection"),
        ("/connections?connectionId=flat", "/connections"),
        (
            "/connection/flat/history?provider_config_key=crm",
            "/connection/{connection_id}/history",
        ),
        ("/health", "/health"),
        ("/admin/projections", "/admin/projections"),
        ("/admin/webhooks", "/admin/webhooks"),
        ("/ready", "/ready"),
    ] {
        let (status, body) = call(Method::GET, path, None).await;
        check("get", template, status, &body);
    }
    let metadata = json!({ "connection_id": ["flat", "metadata"], "provider_config_key": "crm",
        "metadata": { "a": 1 } });
    let (status, body) = call(Method::POST, "/connection/metadata", Some(metadata.clone())).await;
    check("post", "/connection/metadata", status, &body);
    let (status, body) = call(Method::PATCH, "/connections/metadata", Some(metadata)).await;
    check("patch", "/connections/metadata", status, &body);
    let path = "/connection/{connection_id}/metadata";
    let (status, body) = call(
        Method::PATCH,
        "/connection/flat/metadata?provider_config_key=crm",
        Some(json!({ "b": 2 })),
    )
    .await;
    check("patch", path, status, &body);

    // Errors, in the documented error shape.
    let (status, body) = call(
        Method::GET,
        "/connection/nobody?provider_config_key=crm",
        None,
    )
    .await;
    check("get", "/connection/{connection_id}", status, &body);
    let (status, body) = call(Method::POST, "/config", Some(json!({ "provider": "x" }))).await;
    check("post", "/config", status, &body);

    for (path, template) in [
        (
            "/connection/flat?provider_config_key=crm",
            "/connection/{connection_id}",
        ),
        (
            "/connections/metadata?provider_config_key=crm",
            "/connections/metadata",
        ),
        ("/config/crm", "/config/{provider_config_key}"),
    ] {
        let (status, body) = call(Method::DELETE, path, None).await;
        check("delete", template, status, &body);
    }
    // A history with an authorization, metadata changes and the deletion, shredded.
    let (status, body) = call(
        Method::GET,
        "/connections/flat/history?provider_config_key=crm",
        None,
    )
    .await;
    check("get", "/connections/{connection_id}/history", status, &body);
    let types = strings(&body["events"], "type");
    assert!(types.contains(&"connection_deleted"), "{body}");
    assert!(types.contains(&"metadata_set"), "{body}");
}

/// Checks `value` against `schema`, the subset of JSON Schema the document uses: `$ref`,
/// `oneOf`, `type` (one or a list), `enum`, `required`, `properties` (no undocumented field
/// unless `additionalProperties` allows it) and `items`.
pub(crate) fn conforms(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    problems: &mut Vec<String>,
) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "unresolved {reference}");
        return conforms(doc, target, value, at, problems);
    }
    if let Some(choices) = schema["oneOf"].as_array() {
        let matching = choices
            .iter()
            .filter(|choice| {
                let mut inner = Vec::new();
                conforms(doc, choice, value, at, &mut inner);
                inner.is_empty()
            })
            .count();
        if matching != 1 {
            problems.push(format!("{at}: matches {matching} of the oneOf choices"));
        }
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            problems.push(format!("{at}: {value} is not {types:?}"));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(fields) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten() {
            if !fields.contains_key(name.as_str().unwrap()) {
                problems.push(format!("{at}: missing {name}"));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, field) in fields {
                match properties.get(name) {
                    Some(property) => {
                        conforms(doc, property, field, &format!("{at}.{name}"), problems)
                    }
                    None if schema.get("additionalProperties").is_some() => {}
                    None => problems.push(format!("{at}: undocumented field {name}")),
                }
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            conforms(doc, schema, item, &format!("{at}[{i}]"), problems);
        }
    }
}
