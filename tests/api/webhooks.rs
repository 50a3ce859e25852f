//! Webhooks driven from the event log, received by an in-process receiver: every kind arrives
//! once with its fields and a valid signature; failures are retried in order and visible at
//! `/admin/webhooks`; a server killed mid-delivery and restarted delivers every event.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use domain::testing::TestDatabase;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{oneshot, watch};

use crate::fake_provider::{CLIENT_SECRET, FakeProvider, TokenMode, serve_locally};
use crate::fake_service::FakeService;
use crate::{TestApp, new_key, ok_json, serve_config};

const SECRET: &str = "whsec-test-7d1f";

domain::on_both_backends!(
    the_dashboard_shows_a_connections_webhooks_and_retries_a_waiting_one_now,
    every_kind_of_webhook_arrives_once_signed_and_without_secrets,
    compaction_neither_repeats_nor_loses_a_webhook,
    a_target_that_is_behind_holds_compaction_back_and_misses_nothing,
);

domain::on_postgres_only!(
    a_failing_receiver_is_retried_in_order_and_the_attempts_are_visible,
    a_server_killed_mid_delivery_delivers_every_event_after_a_restart,
);

#[test]
fn the_configuration_debug_hides_the_secret_and_url_credentials() {
    let config = serve_config(&[
        "--webhook-urls",
        "https://user:hunter2@hooks.example.com:8443/in?token=tok-5e6f, http://127.0.0.1:9/b",
        "--webhook-secret",
        SECRET,
    ]);
    let webhooks = config.webhooks.as_ref().unwrap();
    assert_eq!(webhooks.urls.len(), 2);
    assert_eq!(webhooks.timeout, Duration::from_secs(10));
    assert_eq!(webhooks.backoff, Duration::from_secs(1));
    let shown = format!("{config:?}");
    for secret in [SECRET, "hunter2", "tok-5e6f"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(
        shown.contains("https://hooks.example.com:8443/in"),
        "{shown}"
    );
    // The default roles include webhooks; without URLs there is nothing to deliver.
    let cli = <grantline::config::Cli as clap::Parser>::try_parse_from(["grantline", "serve"]);
    let grantline::config::Command::Serve(args) = cli.unwrap().command else {
        unreachable!()
    };
    let config = args.validate().unwrap();
    assert!(config.roles.webhooks && config.webhooks.is_none());
}

// --- the receiver ------------------------------------------------------------------------------

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// 200.
    Ok,
    /// 500.
    Fail,
    /// 200 for the first `n` requests answered 200 in all, then hangs until released.
    HangAfter(usize),
}

/// One request the receiver got, and what it answered (0: it hung).
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    raw: Bytes,
    body: Value,
    answered: u16,
}

impl Received {
    fn id(&self) -> &str {
        self.body["id"].as_str().unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }
}

struct ReceiverState {
    mode: Mutex<Mode>,
    received: Mutex<Vec<Received>>,
    /// Requests hanging right now.
    hanging: AtomicUsize,
    release: watch::Sender<bool>,
}

/// An HTTP server on 127.0.0.1 that records every webhook; stopped when dropped.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(ReceiverState {
            mode: Mutex::new(Mode::Ok),
            received: Mutex::new(Vec::new()),
            hanging: AtomicUsize::new(0),
            release: watch::channel(false).0,
        });
        let router = Router::new()
            .route("/hooks/grantline", post(receive))
            .with_state(state.clone());
        let (address, stop) = serve_locally(router).await;
        Self {
            url: format!("http://{address}/hooks/grantline"),
            state,
            _stop: stop,
        }
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Lets every hanging request go (they answer 503).
    fn release_hanging(&self) {
        self.state.release.send_replace(true);
    }

    fn hanging(&self) -> usize {
        self.state.hanging.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests answered 200, in arrival order.
    fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.answered == 200)
            .collect()
    }

    /// Waits until `done` holds for the delivered requests.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let delivered = self.delivered();
            if done(&delivered) {
                return delivered;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; delivered: {:?}",
                delivered
                    .iter()
                    .map(|r| &r.body["event"])
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Decrements the hanging count however the request ends (answered, or dropped by the server
/// when the client goes away).
struct Hanging(Arc<ReceiverState>);

impl Drop for Hanging {
    fn drop(&mut self) {
        self.0.hanging.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let mode = *state.mode.lock().unwrap();
    let answer = {
        let mut received = state.received.lock().unwrap();
        let answered_ok = received.iter().filter(|r| r.answered == 200).count();
        let answer = match mode {
            Mode::Ok => 200,
            Mode::Fail => 500,
            Mode::HangAfter(n) if answered_ok < n => 200,
            Mode::HangAfter(_) => 0,
        };
        received.push(Received {
            headers,
            raw,
            body,
            answered: answer,
        });
        answer
    };
    if answer != 0 {
        return StatusCode::from_u16(answer).unwrap();
    }
    state.hanging.fetch_add(1, Ordering::SeqCst);
    let _guard = Hanging(state.clone());
    let mut release = state.release.subscribe();
    let _ = release.wait_for(|released| *released).await;
    StatusCode::SERVICE_UNAVAILABLE
}

fn signature(raw: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(raw);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks the headers every webhook carries, and that the signatures are right, as the README
/// tells receivers to check them: the timestamped one over `"<t>.<body>"`, within five minutes.
fn assert_signed(request: &Received) {
    assert_eq!(request.header("content-type"), "application/json");
    let header = request.header("x-grantline-signature");
    let (t, given) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",sha256="))
        .unwrap_or_else(|| panic!("{header}"));
    assert_eq!(request.header("x-grantline-timestamp"), t);
    let age = chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap();
    assert!((0..300).contains(&age), "{age}");
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&request.raw);
    assert_eq!(given, signature(&signed));
    assert_eq!(
        request.header("x-nango-hmac-sha256"),
        signature(&request.raw)
    );
    assert_eq!(request.header("idempotency-key"), request.id());
}

fn events(requests: &[Received]) -> Vec<String> {
    requests
        .iter()
        .map(|r| r.body["event"].as_str().unwrap().to_owned())
        .collect()
}

// --- in-process service ------------------------------------------------------------------------

/// A service with the webhooks role delivering to `receiver`, with the fake provider as its
/// integration `fake`.
struct Env(FakeService);

impl std::ops::Deref for Env {
    type Target = FakeService;

    fn deref(&self) -> &FakeService {
        &self.0
    }
}

async fn env(db: &TestDatabase, receiver: &Receiver, backoff: &str) -> Env {
    instances(db, receiver, backoff, 1).await
}

/// [`env`] with `count` instances on the database.
async fn instances(db: &TestDatabase, receiver: &Receiver, backoff: &str, count: usize) -> Env {
    configured(db, receiver, backoff, count, &[]).await
}

/// [`instances`] with `extra` settings.
async fn configured(
    db: &TestDatabase,
    receiver: &Receiver,
    backoff: &str,
    count: usize,
    extra: &[&str],
) -> Env {
    let mut args = vec![
        "--roles",
        "api,projections,webhooks",
        "--webhook-urls",
        &receiver.url,
        "--webhook-secret",
        SECRET,
        "--webhook-timeout",
        "5s",
        "--webhook-backoff",
        backoff,
    ];
    args.extend_from_slice(extra);
    let service = FakeService::on(db)
        .instances(count)
        .args(&args)
        .start()
        .await;
    Env(service)
}

impl Env {
    /// Imports `id` with refresh token `refresh` and an expired access token.
    async fn import(&self, id: &str, refresh: &str) {
        let access = format!("old-access-{refresh}");
        self.0.import(id, &access, refresh, Some(-60)).await;
    }

    /// `/admin/webhooks`' only target, once `ready` holds for it.
    async fn target_when(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let body = self.app().get_ok("/admin/webhooks").await;
            let targets = body["targets"].as_array().unwrap();
            assert_eq!(targets.len(), 1, "{body}");
            if ready(&targets[0]) {
                return targets[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn every_kind_of_webhook_arrives_once_signed_and_without_secrets(db: &TestDatabase) {
    let receiver = Receiver::start().await;
    let env = env(db, &receiver, "100ms").await;
    env.import("conn-1", "rt-0").await;
    env.import("conn-1", "rt-1").await;
    env.fake.set_mode(TokenMode::InvalidGrant);
    let failed = env
        .app()
        .get("/connection/conn-1?provider_config_key=fake")
        .await;
    assert_eq!(failed.status(), 424);
    env.fake.set_mode(TokenMode::Json);
    let forced = "/connection/conn-1?provider_config_key=fake&force_refresh=true";
    env.app().get_ok(forced).await;
    // A refresh that follows a success recovers nothing.
    env.app().get_ok(forced).await;
    let deleted = env
        .app()
        .delete("/connection/conn-1?provider_config_key=fake")
        .await;
    assert!(deleted.status().is_success());
    env.import("conn-1", "rt-2").await;

    let expected = [
        "connection.created",
        "connection.reauthorized",
        "refresh.failed",
        "refresh.recovered",
        "connection.deleted",
        "connection.created",
    ];
    receiver
        .wait_for("six webhooks", |d| d.len() >= expected.len())
        .await;
    // Caught up: every event passed, so nothing more is coming.
    let target = env
        .target_when("the target to catch up", |t| {
            t["lag"] == 0 && t["caught_up"] == true
        })
        .await;
    let received = receiver.received();
    assert_eq!(events(&received), expected);
    assert!(received.iter().all(|r| r.answered == 200));

    let mut ids: Vec<&str> = received.iter().map(Received::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), expected.len(), "one id per event");
    let (access, refresh) = FakeProvider::refreshed_tokens(1);
    for (request, event) in received.iter().zip(expected) {
        assert_signed(request);
        assert_eq!(request.header("x-grantline-delivery-attempt"), "1");
        let body = &request.body;
        assert_eq!(body["event"], event);
        for (field, value) in [
            ("from", "nango"),
            ("type", "auth"),
            ("connection_id", "conn-1"),
            ("connectionId", "conn-1"),
            ("provider_config_key", "fake"),
            ("providerConfigKey", "fake"),
            ("provider", "fake"),
            ("authMode", "OAUTH2"),
        ] {
            assert_eq!(body[field], value, "{field}: {body}");
        }
        assert!(body["occurred_at"].is_string(), "{body}");
        assert_eq!(body["success"], event != "refresh.failed", "{body}");
        let text = String::from_utf8_lossy(&request.raw);
        for secret in [
            "rt-0",
            "rt-1",
            "rt-2",
            "old-access",
            access.as_str(),
            refresh.as_str(),
            CLIENT_SECRET,
            SECRET,
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    let operations: Vec<&Value> = received.iter().map(|r| &r.body["operation"]).collect();
    assert_eq!(
        operations,
        [
            "creation", "override", "refresh", "refresh", "deletion", "creation"
        ]
    );
    let generations: Vec<&Value> = received.iter().map(|r| &r.body["generation"]).collect();
    assert_eq!(generations, [1, 2, 2, 2, 2, 3]);
    assert_eq!(
        received[2].body["error"],
        json!({"type": "invalid_grant", "description": "permanent"})
    );
    assert!(received[3].body.get("error").is_none());

    // Operators see the same: all delivered, once each, no error.
    assert!(target["last_error"].is_null(), "{target}");
    assert_eq!(
        target["url"],
        receiver.url.as_str(),
        "a URL without credentials is shown whole"
    );
    let deliveries = target["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), expected.len(), "{target}");
    for delivery in deliveries {
        assert_eq!(delivery["status"], "delivered", "{target}");
        assert_eq!(delivery["attempts"], 1, "{target}");
        assert_eq!(delivery["last_status"], 200, "{target}");
    }
    let counters = env.state().webhooks.as_ref().unwrap().counters();
    assert_eq!(counters.delivered.load(Ordering::Relaxed), 6);
    assert_eq!(counters.failed_attempts.load(Ordering::Relaxed), 0);
}

async fn compaction_neither_repeats_nor_loses_a_webhook(db: &TestDatabase) {
    let receiver = Receiver::start().await;
    let env = env(db, &receiver, "100ms").await;
    env.import("conn-1", "rt-0").await;
    let forced = "/connection/conn-1?provider_config_key=fake&force_refresh=true";
    for _ in 0..3 {
        env.app().get_ok(forced).await;
    }
    receiver.wait_for("the creation", |d| !d.is_empty()).await;
    env.target_when("the target to catch up", |t| t["lag"] == 0)
        .await;
    // Two routine cycles go; the webhook subscriber is past them already.
    env.app().projected().await;
    let report = env
        .state()
        .compactor
        .pass(chrono::Utc::now() + chrono::TimeDelta::days(91), |_| {})
        .await
        .unwrap();
    assert_eq!(report.routine_cycles, 2, "{report:?}");
    env.fake.set_mode(TokenMode::InvalidGrant);
    assert_eq!(env.app().get(forced).await.status(), 424);
    let deleted = env
        .app()
        .delete("/connection/conn-1?provider_config_key=fake")
        .await;
    assert!(deleted.status().is_success());
    let expected = ["connection.created", "refresh.failed", "connection.deleted"];
    receiver
        .wait_for("three webhooks", |d| d.len() >= expected.len())
        .await;
    let target = env
        .target_when("the target to catch up", |t| t["lag"] == 0)
        .await;
    assert_eq!(events(&receiver.received()), expected);
    let deliveries = target["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), expected.len(), "{target}");
    assert!(
        deliveries
            .iter()
            .all(|d| d["status"] == "delivered" && d["attempts"] == 1),
        "{target}"
    );
}

/// A receiver that is down while the history of its events passes retention gets every webhook
/// once it is back: the compactor removes nothing the target has not delivered, then resumes.
async fn a_target_that_is_behind_holds_compaction_back_and_misses_nothing(db: &TestDatabase) {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Fail);
    let lifecycle = ["--history-lifecycle-retention", "90d"];
    let env = configured(db, &receiver, "100ms", 1, &lifecycle).await;
    env.import("conn-1", "rt-0").await;
    let forced = "/connection/conn-1?provider_config_key=fake&force_refresh=true";
    env.fake.set_mode(TokenMode::InvalidGrant);
    assert_eq!(env.app().get(forced).await.status(), 424);
    env.fake.set_mode(TokenMode::Json);
    for _ in 0..3 {
        env.app().get_ok(forced).await;
    }
    env.app().projected().await;
    let compact = || {
        env.state()
            .compactor
            .pass(chrono::Utc::now() + chrono::TimeDelta::days(91), |_| {})
    };
    // The failure, its lease and two routine cycles are past retention and superseded, but the
    // target has not delivered even the creation.
    let held = compact().await.unwrap();
    assert!(held.held_back, "{held:?}");
    assert_eq!(held.events_removed, 0, "{held:?}");

    receiver.set_mode(Mode::Ok);
    let expected = ["connection.created", "refresh.failed", "refresh.recovered"];
    receiver
        .wait_for("three webhooks", |d| d.len() >= expected.len())
        .await;
    env.target_when("the target to catch up", |t| t["lag"] == 0)
        .await;
    assert_eq!(events(&receiver.delivered()), expected);
    let resumed = compact().await.unwrap();
    assert!(!resumed.held_back, "{resumed:?}");
    assert_eq!(
        (resumed.routine_cycles, resumed.lifecycle_events),
        (2, 2),
        "{resumed:?}"
    );
}

async fn a_failing_receiver_is_retried_in_order_and_the_attempts_are_visible(db: &TestDatabase) {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Fail);
    let env = env(db, &receiver, "1s").await;
    env.import("conn-a", "rt-a").await;
    env.import("conn-b", "rt-b").await;
    env.import("conn-c", "rt-c").await;

    // The first webhook fails and is retried; /admin/webhooks shows the attempts meanwhile.
    // The delivery, the target's last error and the lag are written and read separately (and
    // the lag counts only events past the log's horizon): wait until all three show it.
    let target = env
        .target_when("two failed attempts, the error and the lag", |t| {
            let head = t["deliveries"].as_array().and_then(|d| d.first());
            head.is_some_and(|d| d["attempts"].as_i64() >= Some(2) && d["status"] == "retrying")
                && t["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("HTTP 500"))
                && t["lag"].as_i64() >= Some(3)
        })
        .await;
    let delivery = &target["deliveries"][0];
    assert_eq!(delivery["last_status"], 500, "{target}");
    assert!(delivery["next_attempt_at"].is_string(), "{target}");
    assert!(
        delivery["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 500")),
        "{target}"
    );
    assert!(
        target["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 500")),
        "{target}"
    );
    assert!(target["lag"].as_i64().unwrap() >= 3, "{target}");
    assert_eq!(
        target["deliveries"].as_array().unwrap().len(),
        1,
        "nothing after the failing webhook was attempted: {target}"
    );
    let failing = receiver.received();
    assert!(failing.len() >= 2);
    let first_id = failing[0].id().to_owned();
    assert!(
        failing
            .iter()
            .all(|r| r.id() == first_id && r.answered == 500),
        "only the head was tried"
    );

    receiver.set_mode(Mode::Ok);
    let delivered = receiver
        .wait_for("three deliveries", |d| d.len() >= 3)
        .await;
    let ids: Vec<&Value> = delivered.iter().map(|r| &r.body["connection_id"]).collect();
    assert_eq!(ids, ["conn-a", "conn-b", "conn-c"], "in log order");
    assert_eq!(delivered[0].id(), first_id);
    // The attempts of the head, numbered 1, 2, …, the last one answered 200.
    let attempts: Vec<usize> = receiver
        .received()
        .iter()
        .filter(|r| r.id() == first_id)
        .map(|r| r.header("x-grantline-delivery-attempt").parse().unwrap())
        .collect();
    assert_eq!(attempts, (1..=attempts.len()).collect::<Vec<_>>());
    assert_signed(&delivered[0]);

    let target = env
        .target_when("every delivery recorded", |t| {
            t["lag"] == 0
                && t["deliveries"]
                    .as_array()
                    .is_some_and(|d| d.len() == 3 && d.iter().all(|d| d["status"] == "delivered"))
        })
        .await;
    assert!(target["last_error"].is_null(), "{target}");
    let metrics = env.app().get("/metrics").await.text().await.unwrap();
    let sample = |result: &str| -> f64 {
        let prefix = format!("grantline_webhook_deliveries_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
            .parse()
            .unwrap()
    };
    assert_eq!(sample("delivered"), 3.0);
    assert!(sample("failed") >= 2.0);
    // The operators' view is what the OpenAPI document says it is.
    let doc = crate::openapi::document(env.app()).await;
    let schema = &doc["paths"]["/admin/webhooks"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"];
    let status = env.app().get_ok("/admin/webhooks").await;
    let mut problems = Vec::new();
    crate::openapi::conforms(&doc, schema, &status, "$", &mut problems);
    assert!(problems.is_empty(), "{problems:?}\n{status}");
    let head = target["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event_id"] == first_id.as_str())
        .unwrap();
    assert_eq!(head["attempts"], attempts.len());
    assert_eq!(head["last_status"], 200);
    assert!(head["last_error"].as_str().unwrap().contains("HTTP 500"));
    let counters = env.state().webhooks.as_ref().unwrap().counters();
    assert_eq!(counters.delivered.load(Ordering::Relaxed), 3);
    assert_eq!(
        counters.failed_attempts.load(Ordering::Relaxed),
        attempts.len() as u64 - 1
    );
}

// --- the binary, killed mid-delivery -----------------------------------------------------------

/// The `grantline` binary serving on a random port, killed when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    /// Starts the binary on `db` delivering to `url`, and waits until it listens.
    async fn start(db_url: &str, key: &str, url: &str) -> Self {
        let mut command = crate::cli::grantline();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--roles", "api,projections,webhooks"])
            .args(["--webhook-timeout", "3s", "--webhook-backoff", "100ms"])
            .env("GRANTLINE_DATABASE_URL", db_url)
            .env("GRANTLINE_ENCRYPTION_KEY", key)
            .env("GRANTLINE_WEBHOOK_URLS", url)
            .env("GRANTLINE_WEBHOOK_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let port = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let mut port = None;
            for line in lines.by_ref() {
                let line = line.unwrap();
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && entry["message"] == "grantline listening"
                {
                    port = entry["port"].as_u64();
                    break;
                }
            }
            // Keep draining, so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            port
        })
        .await
        .unwrap();
        let Some(port) = port else {
            let _ = child.kill();
            panic!("the server did not start");
        };
        Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
        }
    }

    /// SIGKILL: no graceful shutdown, no lease handed back.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn a_server_killed_mid_delivery_delivers_every_event_after_a_restart(db: &TestDatabase) {
    let receiver = Receiver::start().await;
    // Three webhooks go through; the fourth hangs until the server is gone.
    receiver.set_mode(Mode::HangAfter(3));
    let key = new_key();
    let server = Server::start(db.url(), &key, &receiver.url).await;
    let api = TestApp::client_of(&server.address);
    api.create_github_integration("secret").await;
    for n in 0..5 {
        api.import_github(&format!("c{n}"), &format!("token-of-c{n}"))
            .await;
    }
    for n in [1, 3] {
        ok_json(
            api.delete(&format!("/connection/c{n}?provider_config_key=github"))
                .await,
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while receiver.hanging() == 0 {
        assert!(Instant::now() < deadline, "no delivery hung");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    assert_eq!(receiver.delivered().len(), 3);

    receiver.set_mode(Mode::Ok);
    receiver.release_hanging();
    let server = Server::start(db.url(), &key, &receiver.url).await;
    TestApp::client_of(&server.address)
        .import_github("c5", "token-of-c5")
        .await;

    // Every connection event with a webhook, per stream in stream order.
    let rows = db
        .postgres_client()
        .await
        .query(
            "SELECT stream_id, event_id FROM events WHERE event_type IN \
             ('ConnectionAuthorized', 'ConnectionDeleted') ORDER BY stream_id, stream_version",
            &[],
        )
        .await
        .unwrap();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for row in &rows {
        let id: uuid::Uuid = row.get(1);
        expected.entry(row.get(0)).or_default().push(id.to_string());
    }
    assert_eq!(rows.len(), 8, "six creations and two deletions");
    let delivered = receiver
        .wait_for("every event delivered", |d| {
            rows.iter().all(|row| {
                let id: uuid::Uuid = row.get(1);
                d.iter().any(|r| r.id() == id.to_string())
            })
        })
        .await;
    // In order per connection: each event's first delivery after its predecessor's.
    let first_delivery = |id: &str| delivered.iter().position(|r| r.id() == id).unwrap();
    for (stream, ids) in &expected {
        let order: Vec<usize> = ids.iter().map(|id| first_delivery(id)).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{stream} out of order: {order:?}"
        );
    }
    for request in &delivered {
        assert_signed(request);
    }
    // The webhook cut short by the kill was sent again, as attempt 2 or later.
    let hung = receiver
        .received()
        .into_iter()
        .find(|r| r.answered == 0)
        .unwrap();
    let redelivered = delivered.iter().find(|r| r.id() == hung.id()).unwrap();
    assert!(
        redelivered
            .header("x-grantline-delivery-attempt")
            .parse::<u32>()
            .unwrap()
            >= 2
    );
    drop(server);
}

/// The dashboard (open mode: no secret key) lists the webhooks made for a connection, and its
/// "retry now" sends a delivery waiting out a long backoff at once.
async fn the_dashboard_shows_a_connections_webhooks_and_retries_a_waiting_one_now(
    db: &TestDatabase,
) {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Fail);
    // The longest backoff: without "retry now" the second attempt waits minutes.
    // Two instances on PostgreSQL; one process owns a SQLite file, so there it is one.
    let count = if db.url().starts_with("sqlite") { 1 } else { 2 };
    let env = instances(db, &receiver, "5m", count).await;
    env.import("conn-a", "rt-a").await;
    let target = env
        .target_when("a delivery waiting for its retry", |t| {
            t["deliveries"][0]["status"] == "retrying"
        })
        .await;
    receiver.set_mode(Mode::Ok);
    // The operator is served by the instance that does not hold the target's lease: the holder
    // must hear of it.
    let holder = target["lease_holder"].as_str().unwrap();
    let index = env
        .states
        .iter()
        .position(|s| s.webhooks.as_ref().unwrap().holder() != holder)
        .unwrap_or(0);
    let app = &env.apps[index];
    let page = |path: &str| {
        let url = app.url(path);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let connection = page("/ui/connections/fake/conn-a").await;
    assert!(connection.contains("Webhooks sent for it"), "{connection}");
    assert!(connection.contains("connection.created"), "{connection}");
    assert!(connection.contains("retrying"), "{connection}");

    let operations = page("/ui/operations").await;
    assert!(operations.contains("Retry now"), "{operations}");
    let csrf = operations
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let shown = operations
        .split("name=\"url\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let retry = |url: String| {
        client
            .post(app.url("/ui/operations/webhooks/retry"))
            .form(&[("csrf", csrf.clone()), ("url", url)])
            .send()
    };
    assert_eq!(
        retry("http://nowhere.example/".into())
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(retry(shown).await.unwrap().status(), 303);
    // Delivered now, not in minutes, and by the holder (woken through the database), not by
    // the other instance taking the lease over once it lapsed.
    receiver
        .wait_for("the retried connection.created", |d| {
            events(d) == ["connection.created"]
        })
        .await;
    let after = env.app().get_ok("/admin/webhooks").await;
    assert_eq!(after["targets"][0]["lease_holder"], holder, "{after}");
}
