//! The fault suite: what production does to the service, done to real `grantline serve`
//! processes on PostgreSQL, with the in-process fake provider. Each scenario prints its figures.
//!
//! - `postgres_restart`: PostgreSQL restarted under reads, imports and forced refreshes. Cached
//!   reads keep answering, the rest get 503 with `Retry-After`, everything recovers without
//!   restarting Grantline, and every acknowledged import is readable afterwards.
//! - `kill_import`: `kill -9` of one instance in the middle of an import burst; every
//!   acknowledged import is readable from another instance.
//! - `kill_refresh`: `kill -9` of the instance holding a refresh lease while the provider is
//!   slow; the orphaned lease lapses and another instance's next read refreshes once.
//! - `provider_hang`, `provider_503`: a provider that accepts and never answers, one that
//!   answers 503; reads of valid tokens keep answering, the scheduler backs off, no pool waits.
//! - `soak`: mixed load (reads, imports, forced refreshes, webhooks, WebSockets opening and
//!   closing) for `FAULT_SOAK_SECONDS` (600); RSS and open file descriptors after warm-up and at
//!   the end, answers by status.
//!
//! `cargo bench --bench faults` runs them all; `FAULTS=kill_import,soak` picks some. It
//! restarts this machine's PostgreSQL (`pg_ctlcluster`), so do not run it beside the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_service;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fake_service::fake_provider::{FakeProvider, TokenMode};
use fake_service::{KEY, Setup};
use futures_util::StreamExt;
use serde_json::json;
use support::Server;
use tokio::sync::Mutex;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::var("FAULTS").ok();
    let chosen = |name: &str| {
        only.as_deref()
            .is_none_or(|list| list.split(',').any(|n| n.trim() == name))
    };
    if chosen("postgres_restart") {
        postgres_restart().await;
    }
    if chosen("kill_import") {
        kill_import().await;
    }
    if chosen("kill_refresh") {
        kill_refresh().await;
    }
    if chosen("provider_hang") {
        provider_trouble("provider_hang", TokenMode::Slow(Duration::from_secs(3600))).await;
    }
    if chosen("provider_503") {
        provider_trouble("provider_503", TokenMode::Status(503)).await;
    }
    if chosen("soak") {
        soak().await;
    }
}

/// Answers by status (0: no answer at all), and how many 503s carried `Retry-After`.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    retry_after: u64,
}

impl Tally {
    fn record(&mut self, response: &Result<reqwest::Response, reqwest::Error>) {
        let status = response.as_ref().map_or(0, |r| r.status().as_u16());
        *self.by_status.entry(status).or_default() += 1;
        if status == 503
            && let Ok(r) = response
            && r.headers().contains_key("retry-after")
        {
            self.retry_after += 1;
        }
    }

    fn count(&self, status: impl Fn(u16) -> bool) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| status(**s))
            .map(|(_, n)| n)
            .sum()
    }

    fn line(&self) -> String {
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| {
                format!(
                    "{}: {n}",
                    if *s == 0 {
                        "none".into()
                    } else {
                        s.to_string()
                    }
                )
            })
            .collect();
        format!(
            "{} ({} of the 503s with Retry-After)",
            statuses.join(", "),
            self.retry_after
        )
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client")
}

/// Starts this build on `setup` with the integration, and `n` imported connections `c0…`
/// whose tokens expire in `expires_in` seconds.
async fn started(setup: &Setup, extra: &[&str], n: usize, expires_in: i64) -> Server {
    let server = setup.start(extra, "info");
    let client = client();
    setup.create_integration(&client, &server.base).await;
    for i in 0..n {
        let tokens = FakeProvider::tokens(i);
        setup
            .import(
                &client,
                &server.base,
                &format!("c{i}"),
                (&tokens.0, &tokens.1),
                expires_in,
            )
            .await;
        // Read once: in use, so the scheduler refreshes it ahead of expiry.
        let _ = client
            .get(connection_url(&server.base, &format!("c{i}")))
            .send()
            .await;
    }
    server
}

fn connection_url(base: &str, id: &str) -> String {
    format!("{base}/connection/{id}?provider_config_key={KEY}")
}

fn import_body(id: &str) -> serde_json::Value {
    json!({ "provider_config_key": KEY, "connection_id": id, "access_token": format!("t-{id}"),
            "expires_at": chrono::Utc::now().timestamp() + 3600 })
}

/// Imports `id` at `base`: the answer, and `id` again if it was acknowledged (201).
async fn import(
    client: &reqwest::Client,
    base: &str,
    id: String,
) -> (Result<reqwest::Response, reqwest::Error>, Option<String>) {
    let response = client
        .post(format!("{base}/connection"))
        .json(&import_body(&id))
        .send()
        .await;
    let acknowledged = response.as_ref().is_ok_and(|r| r.status() == 201);
    (response, acknowledged.then_some(id))
}

fn kill_9(server: &Server) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status();
}

/// Which of `ids` another instance at `base` cannot read.
async fn unreadable(base: &str, ids: &[String]) -> Vec<String> {
    let client = client();
    let mut lost = Vec::new();
    for id in ids {
        let status = client
            .get(connection_url(base, id))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        if status != 200 {
            lost.push(format!("{id} ({status})"));
        }
    }
    lost
}

fn postgres_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .expect("a PostgreSQL cluster under /etc/postgresql")
}

async fn postgres_restart() {
    println!("== postgres_restart");
    let setup = Setup::new().await;
    let server = started(&setup, &["--database-pool-wait", "2s"], 100, 3600).await;
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(Mutex::new(Tally::default()));
    let writes = Arc::new(Mutex::new(Tally::default()));
    let refreshes = Arc::new(Mutex::new(Tally::default()));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let first_write_after = Arc::new(Mutex::new(None::<Instant>));
    let mut load = Vec::new();
    for reader in 0..4 {
        let (base, stop, reads) = (base.clone(), stop.clone(), reads.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let mut n = reader;
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .get(connection_url(&base, &format!("c{}", n % 100)))
                    .send()
                    .await;
                reads.lock().await.record(&response);
                n += 4;
            }
        }));
    }
    for writer in 0..2 {
        let (base, stop, writes, acknowledged, first) = (
            base.clone(),
            stop.clone(),
            writes.clone(),
            acknowledged.clone(),
            first_write_after.clone(),
        );
        load.push(tokio::spawn(async move {
            let client = client();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (response, id) = import(&client, &base, format!("w{writer}-{n}")).await;
                if let Some(id) = id {
                    acknowledged.lock().await.push(id);
                    first.lock().await.get_or_insert_with(Instant::now);
                }
                writes.lock().await.record(&response);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let (base, stop, refreshes) = (base.clone(), stop.clone(), refreshes.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let url = format!(
                    "{}&force_refresh=true",
                    connection_url(&base, &format!("c{}", n % 100))
                );
                let response = client.get(url).send().await;
                refreshes.lock().await.record(&response);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = (
        reads.lock().await.count(|s| s == 200),
        writes.lock().await.count(|s| s == 201),
    );
    first_write_after.lock().await.take();
    let restart = Instant::now();
    let status = tokio::task::spawn_blocking(|| {
        std::process::Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &postgres_version(),
                "main",
                "restart",
                "-m",
                "fast",
            ])
            .status()
    })
    .await
    .expect("the restart task")
    .expect("pg_ctlcluster runs");
    let restarted = Instant::now();
    assert!(status.success(), "pg_ctlcluster restart failed");
    // The first write acknowledged after the restart began.
    *first_write_after.lock().await = None;
    tokio::time::sleep(Duration::from_secs(15)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let recovered = first_write_after
        .lock()
        .await
        .map(|at| at.saturating_duration_since(restarted));
    let ids = acknowledged.lock().await.clone();
    let lost = unreadable(&base, &ids).await;
    println!(
        "restart took {:.1} s (pg_ctlcluster restart -m fast)",
        (restarted - restart).as_secs_f64()
    );
    println!(
        "before the restart: {} reads, {} imports answered",
        before.0, before.1
    );
    println!("reads:     {}", reads.lock().await.line());
    println!("imports:   {}", writes.lock().await.line());
    println!("refreshes: {}", refreshes.lock().await.line());
    println!(
        "first import acknowledged {} after PostgreSQL was back; acknowledged imports: {}, unreadable afterwards: {} {:?}",
        recovered.map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        ids.len(),
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    println!("peak RSS {:.1} MB", server.peak_rss_mb());
}

async fn kill_import() {
    println!("== kill_import");
    let setup = Setup::new().await;
    let a = started(&setup, &[], 0, 3600).await;
    let b = setup.start(&["--roles", "api"], "info");
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut burst = Vec::new();
    for writer in 0..16 {
        let (base, acknowledged, tally) = (a.base.clone(), acknowledged.clone(), tally.clone());
        burst.push(tokio::spawn(async move {
            let client = client();
            for n in 0.. {
                let (response, id) = import(&client, &base, format!("k{writer}-{n}")).await;
                let failed = response.is_err();
                if let Some(id) = id {
                    acknowledged.lock().await.push(id);
                }
                tally.lock().await.record(&response);
                if failed {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill_9(&a);
    for task in burst {
        let _ = task.await;
    }
    let ids = acknowledged.lock().await.clone();
    let lost = unreadable(&b.base, &ids).await;
    println!(
        "imports against the killed instance: {}",
        tally.lock().await.line()
    );
    println!(
        "acknowledged: {}, unreadable from the other instance: {} {:?}",
        ids.len(),
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
}

async fn kill_refresh() {
    println!("== kill_refresh");
    let setup = Setup::new().await;
    // The provider keeps a rotated refresh token valid for a minute (as Xero does): the killed
    // instance's refresh reached the provider and rotated the token, but was never recorded.
    setup.fake.set_refresh_grace(Duration::from_secs(60));
    let lease = ["--refresh-lease", "6s", "--provider-timeout", "5s"];
    let a = started(&setup, &lease, 1, 3600).await;
    let b = setup.start(&[&lease[..], &["--roles", "api"]].concat(), "info");
    setup.fake.set_mode(TokenMode::Slow(Duration::from_secs(4)));
    let url = format!("{}&force_refresh=true", connection_url(&a.base, "c0"));
    let orphan = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls_before_kill = setup.fake.refresh_requests();
    kill_9(&a);
    let killed = Instant::now();
    let _ = orphan.await;
    setup.fake.set_mode(TokenMode::Json);
    let client = client();
    let mut tally = Tally::default();
    let refreshed_after = loop {
        let response = client
            .get(format!(
                "{}&force_refresh=true",
                connection_url(&b.base, "c0")
            ))
            .send()
            .await;
        let ok = response.as_ref().is_ok_and(|r| r.status() == 200);
        tally.record(&response);
        if ok {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            panic!("no refresh succeeded within 60 s: {}", tally.line());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "provider refresh calls: {calls_before_kill} before the kill, {} in all",
        setup.fake.refresh_requests()
    );
    println!(
        "the other instance's forced read succeeded {:.1} s after the kill (lease 6 s); its answers until then: {}",
        refreshed_after.as_secs_f64(),
        tally.line()
    );
}

async fn provider_trouble(name: &str, mode: TokenMode) {
    println!("== {name}");
    let seconds: u64 = support::setting("FAULT_PROVIDER_SECONDS", 60);
    let setup = Setup::new().await;
    let server = started(
        &setup,
        &[
            "--roles",
            "api,projections,scheduler",
            "--refresh-schedule",
            "*/5 * * * * *",
            "--refresh-margin",
            "1m",
            "--refresh-window",
            "30m",
            "--provider-timeout",
            "2s",
            "--refresh-lease",
            "5s",
        ],
        50,
        600,
    )
    .await;
    setup.fake.set_mode(mode);
    let client = client();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut latencies = Vec::new();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let sent = Instant::now();
        let response = client
            .get(connection_url(&server.base, &format!("c{}", n % 50)))
            .send()
            .await;
        latencies.push(sent.elapsed());
        tally.record(&response);
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned()
    };
    println!("reads of valid tokens over {seconds} s: {}", tally.line());
    println!(
        "read latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "provider refresh calls: {} for 50 connections due, scheduler ticks every 5 s",
        setup.fake.refresh_requests()
    );
    println!(
        "after: database connections open {}, waiting {}; peak RSS {:.1} MB",
        gauge("grantline_database_connections{state=\"open\"}"),
        gauge("grantline_database_waiting"),
        server.peak_rss_mb()
    );
}

/// The current RSS (MB) and open file descriptors of process `pid`.
fn rss_and_fds(pid: u32) -> (f64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (rss, fds)
}

/// A webhook receiver that answers 200 and counts what it received.
async fn webhook_receiver(received: Arc<AtomicU64>) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/hook",
        post(move || {
            let received = received.clone();
            async move {
                received.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/hook")
}

async fn soak() {
    let seconds: u64 = support::setting("FAULT_SOAK_SECONDS", 600);
    println!("== soak ({seconds} s)");
    let setup = Setup::new().await;
    let received = Arc::new(AtomicU64::new(0));
    let hook = webhook_receiver(received.clone()).await;
    let server = started(
        &setup,
        &[
            "--webhook-urls",
            &hook,
            "--webhook-secret",
            "soak-webhook-secret",
            "--roles",
            "api,projections,scheduler,webhooks",
        ],
        200,
        3600,
    )
    .await;
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sockets = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for worker in 0..6u64 {
        let (base, stop, tally, sockets) =
            (base.clone(), stop.clone(), tally.clone(), sockets.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let mut n = worker;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c{}", n % 200);
                let response = match n % 10 {
                    // Imports re-authorize a bounded set of connections.
                    0 => Some(
                        client
                            .post(format!("{base}/connection"))
                            .json(&import_body(&format!("s{}", n % 500)))
                            .send()
                            .await,
                    ),
                    1 => Some(
                        client
                            .get(format!("{}&force_refresh=true", connection_url(&base, &id)))
                            .send()
                            .await,
                    ),
                    2 => {
                        let url = format!("{}/", base.replacen("http://", "ws://", 1));
                        if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await {
                            let _ = socket.next().await;
                            let _ = socket.close(None).await;
                            sockets.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    _ => Some(client.get(connection_url(&base, &id)).send().await),
                };
                if let Some(response) = response {
                    tally.lock().await.record(&response);
                }
                n += 6;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let warm_up = Duration::from_secs((seconds / 10).clamp(10, 60));
    tokio::time::sleep(warm_up).await;
    let after_warm_up = rss_and_fds(server.pid());
    let mut samples = vec![after_warm_up];
    let started = Instant::now();
    while started.elapsed() + warm_up < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        samples.push(rss_and_fds(server.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let end = rss_and_fds(server.pid());
    let tally = tally.lock().await;
    let max_rss = samples.iter().map(|s| s.0).fold(0.0, f64::max);
    let max_fds = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let trace: Vec<String> = samples
        .iter()
        .map(|(rss, fds)| format!("{rss:.0}/{fds}"))
        .collect();
    println!("RSS MB / fds every 10 s after warm-up: {}", trace.join(" "));
    println!("answers: {}", tally.line());
    println!(
        "5xx: {}; WebSockets opened and closed: {}; webhooks received: {}",
        tally.count(|s| s >= 500),
        sockets.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed)
    );
    println!(
        "after warm-up ({} s): RSS {:.1} MB, {} fds; at the end: RSS {:.1} MB ({:+.1}%), {} fds ({:+.1}%); highest sample: {:.1} MB, {} fds",
        warm_up.as_secs(),
        after_warm_up.0,
        after_warm_up.1,
        end.0,
        (end.0 / after_warm_up.0 - 1.0) * 100.0,
        end.1,
        (end.1 as f64 / after_warm_up.1 as f64 - 1.0) * 100.0,
        max_rss,
        max_fds
    );
}
