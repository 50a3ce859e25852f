//! What operators observe: latency histograms and projection lag in `/metrics`, `/ready`,
//! request ids, and a scan of everything the real binary logs (JSON, at trace level) through a
//! full OAuth flow, refreshes, a refresh failure and a deletion, for secrets.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain::testing::TestDatabase;
use reqwest::StatusCode;
use reqwest::header::LOCATION;
use serde_json::{Value, json};

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider, TokenMode};
use crate::{TestApp, assert_error, config_on, new_key, ok_json, spawn_app, spawn_with_state};

domain::on_both_backends!(
    metrics_show_latency_histograms_by_route_template_method_and_status,
    every_answer_carries_a_request_id_and_a_sane_incoming_one_is_echoed,
    ready_is_ok_on_a_migrated_database_and_fails_when_a_projection_lags,
    ready_fails_once_a_key_rotation_retired_the_instances_master_key,
);

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_fails_naming_the_database_when_it_is_gone() {
        super::ready_without_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_logs_of_a_full_flow_hold_request_ids_and_no_secret() {
        super::log_scan().await;
    }

    #[tokio::test]
    async fn metrics_show_how_long_an_open_transaction_has_held_the_log_back() {
        super::horizon_age().await;
    }
}

/// An open transaction with an xid holds back every log reader; `/metrics` shows for how long.
async fn horizon_age() {
    let db = TestDatabase::postgres().await;
    let app = spawn_app(&db, &new_key()).await;
    let blocker = db.hold_horizon().await;
    // Held briefly: the horizon is the whole cluster's, so this stalls every test's readers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    let age = samples(&text)["grantline_log_horizon_age_seconds"];
    // Other tests' transactions may be older still; this one is at least this old.
    assert!(age >= 0.3, "horizon age {age}");
    blocker.batch_execute("COMMIT").await.unwrap();
}

const HISTOGRAM: &str = "grantline_http_request_duration_seconds";

/// The samples of `/metrics` by name and label set: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

async fn metrics_show_latency_histograms_by_route_template_method_and_status(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    let created = app
        .post_json(
            "/config",
            &json!({
                "provider_config_key": "github-1", "provider": "github",
                "oauth_client_id": "id", "oauth_client_secret": "secret",
            }),
        )
        .await;
    assert!(created.status().is_success());
    for _ in 0..3 {
        app.get_ok("/config/github-1").await;
    }
    assert_eq!(app.get("/config/nope").await.status(), 404);
    assert_eq!(app.get("/no/such/route/42").await.status(), 404);

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(&format!("# TYPE {HISTOGRAM} histogram")),
        "{text}"
    );
    let samples = samples(&text);

    // The route template is the label, never the raw path.
    assert!(!text.contains("route=\"/config/github-1\""), "{text}");
    assert!(!text.contains("/no/such/route"), "{text}");
    let labels = |route: &str, method: &str, status: u16| {
        format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"")
    };
    for (labels, requests) in [
        (labels("/config/{provider_config_key}", "GET", 200), 3.0),
        (labels("/config/{provider_config_key}", "GET", 404), 1.0),
        (labels("/config", "POST", 200), 1.0),
        (labels("unmatched", "GET", 404), 1.0),
    ] {
        let count = samples
            .get(&format!("{HISTOGRAM}_count{{{labels}}}"))
            .unwrap_or_else(|| panic!("no {labels} in {text}"));
        assert_eq!(*count, requests, "{labels}");
        // Cumulative buckets: never decreasing, ending at the count.
        let buckets: Vec<f64> = samples
            .iter()
            .filter(|(series, _)| series.starts_with(&format!("{HISTOGRAM}_bucket{{{labels},le=")))
            .map(|(_, value)| *value)
            .collect();
        assert_eq!(buckets.len(), 15, "14 bounds and +Inf: {labels}");
        let inf = samples[&format!("{HISTOGRAM}_bucket{{{labels},le=\"+Inf\"}}")];
        assert_eq!(inf, requests);
        let mut finite: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(series, value)| {
                let le = series
                    .strip_prefix(&format!("{HISTOGRAM}_bucket{{{labels},le=\""))?
                    .strip_suffix("\"}")?;
                Some((le.parse::<f64>().ok()?, *value))
            })
            .collect();
        finite.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            finite.windows(2).all(|pair| pair[0].1 <= pair[1].1),
            "{labels}: {finite:?}"
        );
        assert!(finite.last().unwrap().1 <= inf);
        let sum = samples[&format!("{HISTOGRAM}_sum{{{labels}}}")];
        assert!(sum > 0.0 && sum < 10.0 * requests, "{labels}: sum {sum}");
    }

    // The projections' lag and checkpoint age, and the scheduler's tick histogram.
    for projection in ["connections", "integrations"] {
        let lag = samples
            .get(&format!(
                "grantline_projection_lag_events{{projection=\"{projection}\"}}"
            ))
            .unwrap_or_else(|| panic!("no lag of {projection} in {text}"));
        assert!(*lag >= 0.0);
        assert!(samples.contains_key(&format!(
            "grantline_projection_checkpoint_age_seconds{{projection=\"{projection}\"}}"
        )));
    }
    assert!(samples.contains_key("grantline_scheduler_tick_duration_seconds_bucket{le=\"+Inf\"}"));
    assert!(samples.contains_key("grantline_scheduler_ticks_total"));
}

async fn every_answer_carries_a_request_id_and_a_sane_incoming_one_is_echoed(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    let id_of = |response: &reqwest::Response| {
        response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let mut seen = HashSet::new();
    for path in ["/health", "/ready", "/config", "/no/such/route", "/metrics"] {
        let response = app.get(path).await;
        let id = id_of(&response).unwrap_or_else(|| panic!("no x-request-id on {path}"));
        assert!(!id.is_empty() && id.len() <= 64, "{id}");
        assert!(seen.insert(id), "request ids are unique");
    }
    // A refused method is answered with an id too.
    let response = app.client.put(app.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert!(id_of(&response).is_some());

    let echoed = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "lb-7f3a:42")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&echoed).as_deref(), Some("lb-7f3a:42"));
    for insane in ["two words", "<script>", &"x".repeat(65)] {
        let replaced = app
            .client
            .get(app.url("/health"))
            .header("x-request-id", insane)
            .send()
            .await
            .unwrap();
        let id = id_of(&replaced).unwrap();
        assert_ne!(id, insane);
        assert!(seen.insert(id));
    }
}

/// A rotation run with a new key while this instance still has only the old one: its data
/// keys could not be wrapped any more, and `/ready` says so instead of staying ready.
async fn ready_fails_once_a_key_rotation_retired_the_instances_master_key(db: &TestDatabase) {
    let old = new_key();
    let app = spawn_app(db, &old).await;
    app.create_github_integration("rotated-SECRET").await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["master_key"]["status"], "ok");

    let new = new_key();
    let output = crate::cli::grantline_on(db, &new)
        .env("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", &old)
        .args(["keys", "rotate"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["failing"], json!(["master_key"]), "{body}");
    let message = body["checks"]["master_key"]["message"].as_str().unwrap();
    assert!(message.contains("retired by a key rotation"), "{message}");
    assert!(
        !message.contains(&old) && !message.contains(&new),
        "{message}"
    );
}

/// `GET /ready` as status and JSON body.
async fn ready(app: &crate::TestApp) -> (StatusCode, Value) {
    let response = app.get("/ready").await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn ready_is_ok_on_a_migrated_database_and_fails_when_a_projection_lags(db: &TestDatabase) {
    // A secret key is set: load balancers still need none for /health and /ready.
    let key = new_key();
    let args = [
        "--secret-key",
        "observe-test-secret-key-0123456789",
        "--roles",
        "api",
        "--ready-max-lag",
        "0",
    ];
    let (app, state) = spawn_with_state(config_on(db, &key, &args)).await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["failing"], json!([]));
    assert_eq!(body["checks"]["database"]["status"], "ok");
    let migrations = &body["checks"]["migrations"];
    assert_eq!(migrations["status"], "ok");
    let files = std::fs::read_dir(format!(
        "{}/migrations/{}",
        env!("CARGO_MANIFEST_DIR"),
        state.backend.kind()
    ))
    .unwrap()
    .count();
    assert_eq!(migrations["expected"], files as i64, "{body}");
    assert_eq!(migrations["applied"], migrations["expected"]);
    assert_eq!(body["checks"]["projections"]["status"], "ok");
    assert_eq!(body["checks"]["projections"]["lag"]["integrations"], 0);
    assert_eq!(app.get("/health").await.status(), 200);

    // No projection runs on this instance: an appended event leaves the integrations behind.
    let created = app
        .client
        .post(app.url("/config"))
        .bearer_auth("observe-test-secret-key-0123456789")
        .json(&json!({
            "provider_config_key": "github-1", "provider": "github",
            "oauth_client_id": "id", "oauth_client_secret": "secret",
        }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());
    // On PostgreSQL a reader sees an event once no older transaction of the cluster is open
    // (the xid8 horizon): other tests' transactions may hide it for a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let (status, body) = ready(&app).await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["failing"], json!(["projections"]));
    let projections = &body["checks"]["projections"];
    assert_eq!(projections["status"], "failing");
    assert_eq!(projections["lag"]["integrations"], 1);
    assert_eq!(projections["max_lag"], 0);
    assert!(
        projections["message"]
            .as_str()
            .unwrap()
            .contains("integrations"),
        "{body}"
    );
    assert_eq!(body["checks"]["database"]["status"], "ok");
    // /metrics shows the same lag, and how old the unapplied event is.
    let metrics = app
        .get_with_key("/metrics", "observe-test-secret-key-0123456789")
        .await
        .text()
        .await
        .unwrap();
    let samples = samples(&metrics);
    assert_eq!(
        samples["grantline_projection_lag_events{projection=\"integrations\"}"], 1.0,
        "{metrics}"
    );
    let age = samples["grantline_projection_checkpoint_age_seconds{projection=\"integrations\"}"];
    assert!((0.0..600.0).contains(&age), "{metrics}");

    // Caught up, it is ready again.
    state.runner.catch_up().await.unwrap();
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
}

async fn ready_without_database() {
    let db = TestDatabase::postgres().await;
    let app = spawn_app(&db, &new_key()).await;
    assert_eq!(ready(&app).await.0, 200);
    drop(db);
    let (status, body) = ready(&app).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["failing"], json!(["database"]));
    assert_eq!(body["checks"]["database"]["status"], "failing");
    assert_eq!(body["checks"]["migrations"]["status"], "skipped");
    assert_eq!(body["checks"]["projections"]["status"], "skipped");
    assert_eq!(app.get("/health").await.status(), 200, "still alive");
}

/// The running binary, its stderr lines collected as they come.
struct Server {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    address: String,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_grantline"));
        for (name, _) in std::env::vars() {
            if name.starts_with("GRANTLINE_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let collected = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && entry["message"] == "grantline listening"
                {
                    let _ = port_tx.send(entry["port"].as_u64());
                }
                collected.lock().unwrap().push(line);
            }
        });
        let port = match port_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(port)) => port,
            _ => {
                let _ = child.kill();
                panic!(
                    "the server did not log its port: {:?}",
                    lines.lock().unwrap()
                );
            }
        };
        Self {
            child,
            lines,
            reader: Some(reader),
            address: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Stops the server with SIGTERM and returns every line it logged.
    fn stop(mut self) -> Vec<String> {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `x-request-id` of a response.
fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn log_scan() {
    let db = TestDatabase::postgres().await;
    let fake = FakeProvider::start().await;
    let (_dir, providers) = fake.providers_file("");
    let encryption_key = new_key();
    let secret_key = format!("observe-secret-{}", uuid::Uuid::new_v4().simple());
    let server = Server::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--roles",
            "api,projections",
            "--providers-file",
            providers.to_str().unwrap(),
        ],
        &[
            ("GRANTLINE_DATABASE_URL", db.url()),
            ("GRANTLINE_ENCRYPTION_KEY", &encryption_key),
            ("GRANTLINE_SECRET_KEY", &secret_key),
            // With a secret key, a flow needs a session, an hmac or (to create) the public key.
            ("GRANTLINE_PUBLIC_KEY", "observe-public-key"),
            ("GRANTLINE_LOG_FORMAT", "json"),
            // Everything, the dependencies named so that their output is not capped: the
            // database driver's statement parameters are scanned too.
            (
                "RUST_LOG",
                "trace,tokio_postgres=trace,hyper=trace,hyper_util=trace,reqwest=trace",
            ),
        ],
    );
    let url = |path: &str| format!("{}{path}", server.address);
    let api = TestApp::client_of(&server.address);
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let mut ids = Vec::new();

    let created = api
        .client
        .post(url("/config"))
        .bearer_auth(&secret_key)
        .json(&json!({
            "provider_config_key": "fake", "provider": "fake",
            "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
        }))
        .send()
        .await
        .unwrap();
    ids.push(request_id(&created));
    ok_json(created).await;

    // The flow: connect → the provider's authorize → the callback.
    let connect = browser
        .get(url(
            "/oauth/connect/fake?connection_id=user-1&public_key=observe-public-key",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(connect.status(), StatusCode::FOUND);
    ids.push(request_id(&connect));
    let authorize = connect.headers()[LOCATION].to_str().unwrap().to_owned();
    let at_provider = browser.get(&authorize).send().await.unwrap();
    assert_eq!(at_provider.status(), StatusCode::FOUND);
    let callback = at_provider.headers()[LOCATION].to_str().unwrap().to_owned();
    let code = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let completed = browser.get(&callback).send().await.unwrap();
    assert_eq!(completed.status(), StatusCode::OK);
    let callback_id = request_id(&completed);
    ids.push(callback_id.clone());
    let verifier = fake.last_token_call().params["code_verifier"].clone();

    // The tokens searched for were really issued and stored.
    let path = "/connection/user-1?provider_config_key=fake";
    let read = api.get_with_key(path, &secret_key).await;
    ids.push(request_id(&read));
    let body = ok_json(read).await;
    let (access, refresh) = FakeProvider::tokens(1);
    assert_eq!(body["credentials"]["access_token"], access.as_str());
    assert_eq!(body["credentials"]["refresh_token"], refresh.as_str());

    // A forced refresh, then one the provider refuses.
    fake.accept_refresh_token(&refresh);
    let forced_path = format!("{path}&force_refresh=true");
    let forced = api.get_with_key(&forced_path, &secret_key).await;
    let refresh_id = request_id(&forced);
    ids.push(refresh_id.clone());
    let body = ok_json(forced).await;
    let (access_r1, refresh_r1) = FakeProvider::refreshed_tokens(1);
    assert_eq!(body["credentials"]["access_token"], access_r1.as_str());
    fake.set_mode(TokenMode::InvalidGrant);
    let refused = api.get_with_key(&forced_path, &secret_key).await;
    let failure_id = request_id(&refused);
    ids.push(failure_id.clone());
    assert_error(refused, 424, "connection_refresh_failed").await;
    assert_eq!(fake.refresh_requests(), 2);

    let deleted = api
        .client
        .delete(url(path))
        .bearer_auth(&secret_key)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    ids.push(request_id(&deleted));

    let lines = server.stop();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tokio_postgres") && l.contains("parameters")),
        "trace logging of the dependencies is on"
    );

    // Every line is JSON; a line logged inside a request names the request.
    let entries: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let request_of = |entry: &Value| -> Option<String> {
        entry["spans"]
            .as_array()?
            .iter()
            .find(|span| span["name"] == "http.request")
            .map(|span| span["request_id"].as_str().unwrap_or_default().to_owned())
    };
    for entry in &entries {
        if entry["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["name"] == "http.request"))
        {
            let id = request_of(entry).unwrap();
            assert!(!id.is_empty(), "{entry}");
            let span = entry["spans"][0].clone();
            assert!(
                span["method"].is_string() && span["route"].is_string(),
                "{entry}"
            );
        }
    }
    let logged = |message: &str, id: &str| {
        entries
            .iter()
            .any(|e| e["message"] == message && request_of(e).as_deref() == Some(id))
    };
    for id in &ids {
        assert!(logged("request finished", id), "no line for request {id}");
    }
    assert!(logged("oauth flow completed", &callback_id));
    assert!(logged("tokens refreshed", &refresh_id));
    assert!(logged("refresh failed", &failure_id));
    // Routes are templates: the callback's query (with the code) is not a span field.
    assert!(entries.iter().any(|e| {
        request_of(e).as_deref() == Some(callback_id.as_str())
            && e["spans"][0]["route"] == "/oauth/callback"
    }));

    let secrets = [
        ("access token", access),
        ("refresh token", refresh),
        ("refreshed access token", access_r1),
        ("refreshed refresh token", refresh_r1),
        ("authorization code", code),
        ("PKCE verifier", verifier),
        ("client secret", CLIENT_SECRET.to_owned()),
        ("API secret key", secret_key),
        ("encryption key", encryption_key),
    ];
    for (what, secret) in &secrets {
        assert!(
            secret.len() >= 8,
            "{what} {secret:?} is too short to search for"
        );
        for line in &lines {
            assert!(
                !line.contains(secret.as_str()),
                "the {what} is in a log line: {line}"
            );
        }
    }
}
