//! API benchmark: `GET /connection/:id` with a fresh token on the real `grantline serve` binary
//! (PostgreSQL backend), 32 connections with `wrk`.
//!
//! 1. The hot path, 1,000 connections read at random: the open API, the API with a secret key
//!    (every request authenticated, as production runs it) and a bare axum handler that returns
//!    the same JSON bytes from memory (the ceiling), measured in turn for several rounds in one
//!    run, so the machine's drift hits all of them; medians are reported, with the servers' peak
//!    RSS. With `BENCH_BASELINE_BIN` (say, a release build of an earlier commit), that binary is
//!    measured in the same rounds, open and with a secret key, for a before/after in one run.
//! 2. Reads spread uniformly over many connections (`BENCH_SCALE`, default 50,000, 100,000 and
//!    200,000; empty to skip), imported with `grantline import` into one database that this
//!    build and the baseline both serve: requests/s, latency and peak RSS as the working set
//!    outgrows the caches (`GRANTLINE_CONNECTION_CACHE` is left at its default), beside reads of
//!    one connection of the same database in the same rounds, with this build's cache counters.
//!
//! `cargo bench --bench api` (needs `wrk`: `apt-get install wrk`; `BENCH_SECONDS` overrides 10 s
//! per measurement, `BENCH_ROUNDS` the 3 rounds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use domain::testing::TestDatabase;
use futures_util::StreamExt;
use serde_json::json;
use support::{Server, setting};

/// Connections of the hot-path measurement.
const CONNECTIONS: usize = 1000;
/// Concurrent imports while seeding.
const SEED_CONCURRENCY: usize = 64;
const SECRET: &str = "bench-secret-key-0123456789abcdef";

struct WrkResult {
    requests_per_second: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    /// The server's CPU time per request (user and system), in microseconds.
    cpu_us: f64,
}

fn seconds() -> u64 {
    setting("BENCH_SECONDS", 10)
}

fn rounds() -> usize {
    setting("BENCH_ROUNDS", 3usize).max(1)
}

/// The connection counts of the spread-out measurement.
fn scale() -> Vec<usize> {
    std::env::var("BENCH_SCALE")
        .unwrap_or_else(|_| "50000,100000,200000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The median of `value` over `results`.
fn median(results: &[WrkResult], value: impl Fn(&WrkResult) -> f64) -> f64 {
    let mut values: Vec<f64> = results.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn parse_latency(text: &str) -> f64 {
    let text = text.trim();
    let (number, unit) =
        text.split_at(text.find(|c: char| c.is_alphabetic()).unwrap_or(text.len()));
    let value: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        _ => f64::NAN,
    }
}

fn wrk(url: &str, script: &std::path::Path) -> WrkResult {
    let output = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{}s", seconds()),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut result = WrkResult {
        requests_per_second: 0.0,
        requests: 0,
        cpu_us: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse().unwrap_or(0.0),
            [count, "requests", "in", ..] => result.requests = count.parse().unwrap_or(0),
            ["50%", value] => result.p50_ms = parse_latency(value),
            ["99%", value] => result.p99_ms = parse_latency(value),
            ["Non-2xx", "or", "3xx", "responses:", value] => {
                result.non_2xx = value.parse().unwrap_or(0);
            }
            _ => {}
        }
    }
    result
}

/// A wrk script requesting connections `c0`..`c{count - 1}` uniformly at random, with `header`
/// on every request.
fn script(name: &str, count: usize, header: Option<&str>) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("grantline-wrk-{name}-{}.lua", std::process::id()));
    let header = header.map_or(String::new(), |h| {
        format!("wrk.headers[\"Authorization\"] = \"{h}\"\n")
    });
    std::fs::write(
        &path,
        format!(
            "math.randomseed(os.time())\n{header}request = function()\n  local id = math.random(0, {})\n  \
             return wrk.format(\"GET\", \"/connection/c\" .. id .. \"?provider_config_key=github\")\nend\n",
            count - 1
        ),
    )
    .unwrap();
    path
}

/// A server measured in the rounds: its name, URL, wrk script and process.
struct Target {
    name: String,
    url: String,
    script: PathBuf,
    pid: u32,
}

/// Measures every target in turn, `rounds()` times; each target's results in round order.
async fn measure(targets: &[Target]) -> Vec<Vec<WrkResult>> {
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds() {
        for (i, target) in targets.iter().enumerate() {
            let (url, script) = (target.url.clone(), target.script.clone());
            let cpu = support::cpu_seconds(target.pid);
            let mut result = tokio::task::spawn_blocking(move || wrk(&url, &script))
                .await
                .unwrap();
            result.cpu_us =
                (support::cpu_seconds(target.pid) - cpu) * 1e6 / result.requests.max(1) as f64;
            results[i].push(result);
        }
    }
    results
}

/// Prints one line per target: median req/s, p50, p99, the server's CPU time per request,
/// non-2xx, and every round's req/s.
fn report(targets: &[Target], results: &[Vec<WrkResult>]) {
    for (target, rounds) in targets.iter().zip(results) {
        let each: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.0}", r.requests_per_second))
            .collect();
        println!(
            "{:<28} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   cpu {:>5.1} us/req   \
             non-2xx {}   ({})",
            target.name,
            median(rounds, |r| r.requests_per_second),
            median(rounds, |r| r.p50_ms),
            median(rounds, |r| r.p99_ms),
            median(rounds, |r| r.cpu_us),
            rounds.iter().map(|r| r.non_2xx).sum::<u64>(),
            each.join(", ")
        );
    }
}

/// Creates the `github` integration on the server at `base`.
async fn configure(client: &reqwest::Client, base: &str, secret: Option<&str>) {
    let mut request = client.post(format!("{base}/config")).json(&json!({
        "provider_config_key": "github", "provider": "github",
        "oauth_client_id": "id", "oauth_client_secret": "secret", "oauth_scopes": "repo"}));
    if let Some(secret) = secret {
        request = request.bearer_auth(secret);
    }
    assert!(request.send().await.unwrap().status().is_success());
}

/// Imports connections `c{from}`..`c{to - 1}` with fresh tokens into the server at `base`.
async fn import(
    client: &reqwest::Client,
    base: &str,
    secret: Option<&str>,
    from: usize,
    to: usize,
) {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    futures_util::stream::iter(from..to)
        .map(|n| {
            let mut request = client.post(format!("{base}/connection")).json(&json!({
                "provider_config_key": "github", "connection_id": format!("c{n}"),
                "access_token": format!("gho_{n:0>36}"), "refresh_token": format!("ghr_{n:0>36}"),
                "expires_at": expires, "raw": {"token_type": "bearer", "scope": "repo"}}));
            if let Some(secret) = secret {
                request = request.bearer_auth(secret);
            }
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// A server of `binary` on a fresh database with the hot path's connections imported.
async fn seeded(binary: &Path, db: &TestDatabase, key: &str, secret: Option<&str>) -> Server {
    let args: Vec<&str> = secret.map_or(Vec::new(), |s| vec!["--secret-key", s]);
    let server = Server::start(binary, db.url(), key, &args, "warn,grantline=info");
    let client = reqwest::Client::new();
    configure(&client, &server.base, secret).await;
    import(&client, &server.base, secret, 0, CONNECTIONS).await;
    server
}

/// The `grantline_cache_*{cache="connections"}` samples of the server at `base`, as one line.
async fn cache_counters(base: &str) -> String {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut counters = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("grantline_cache_")
            && let Some((name, value)) = rest.split_once("{cache=\"connections\"} ")
        {
            counters.push(format!("{name} {value}"));
        }
    }
    counters.join(", ")
}

/// Part 1: the hot path against the ceiling (and the baseline, when given).
async fn hot_path(baseline: Option<&Path>) {
    let key = domain::keys::MasterKey::generate().1.as_str().to_owned();
    let grantline = support::grantline();
    let mut databases = Vec::new();
    let mut servers = Vec::new();
    let mut binaries = vec![("grantline".to_owned(), grantline.as_path())];
    if let Some(baseline) = baseline {
        binaries.push(("baseline".to_owned(), baseline));
    }
    let plain = script("open", CONNECTIONS, None);
    let with_header = script("secret", CONNECTIONS, Some(&format!("Bearer {SECRET}")));
    let mut targets = Vec::new();
    for (name, binary) in &binaries {
        for secret in [None, Some(SECRET)] {
            let db = TestDatabase::postgres().await;
            let server = seeded(binary, &db, &key, secret).await;
            targets.push(Target {
                name: match secret {
                    None => name.clone(),
                    Some(_) => format!("{name} secret key"),
                },
                url: server.base.clone(),
                script: if secret.is_some() {
                    with_header.clone()
                } else {
                    plain.clone()
                },
                pid: server.pid(),
            });
            servers.push(server);
            databases.push(db);
        }
    }
    // The ceiling: the same bytes from memory, on a bare axum handler in this process.
    let sample = reqwest::get(format!(
        "{}/connection/c1?provider_config_key=github",
        servers[0].base
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ceiling_port = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/connection/{id}",
        get(move || {
            let body = sample.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    targets.push(Target {
        name: "bare axum (ceiling)".to_owned(),
        url: format!("http://127.0.0.1:{ceiling_port}"),
        script: plain.clone(),
        pid: std::process::id(),
    });

    // Every server runs side by side (an idle one costs nothing); the targets are measured in
    // turn, ROUNDS times, so that a slow spell of the machine hits all of them.
    let results = measure(&targets).await;
    println!(
        "GET /connection/:id, {CONNECTIONS} connections, 32 concurrent, PostgreSQL; {} rounds of \
         {} s per target, interleaved; medians (and every round's req/s)",
        rounds(),
        seconds()
    );
    report(&targets, &results);
    let medians: Vec<f64> = results
        .iter()
        .map(|r| median(r, |r| r.requests_per_second))
        .collect();
    let ceiling = medians[medians.len() - 1];
    for (i, (name, _)) in binaries.iter().enumerate() {
        println!(
            "{name:<12} / ceiling  {:.1}% (with secret key {:.1}%)   server peak RSS {:.1} MB \
             ({:.1} MB with secret key)",
            medians[2 * i] / ceiling * 100.0,
            medians[2 * i + 1] / ceiling * 100.0,
            servers[2 * i].peak_rss_mb(),
            servers[2 * i + 1].peak_rss_mb(),
        );
    }
    drop(servers);
    let _ = std::fs::remove_file(&plain);
    let _ = std::fs::remove_file(&with_header);
}

/// Part 2: reads spread over more and more connections, on one database both binaries serve.
async fn spread_out(baseline: Option<&Path>, sizes: &[usize]) {
    let key = domain::keys::MasterKey::generate().1.as_str().to_owned();
    let db = TestDatabase::postgres().await;
    let grantline = Server::start(
        &support::grantline(),
        db.url(),
        &key,
        &[],
        "warn,grantline=info",
    );
    let client = reqwest::Client::new();
    configure(&client, &grantline.base, None).await;
    let baseline =
        baseline.map(|binary| Server::start(binary, db.url(), &key, &[], "warn,grantline=info"));
    println!(
        "\nGET /connection/:id, ids uniform over N connections, 32 concurrent, PostgreSQL, \
         default caches; {} rounds of {} s per target, interleaved",
        rounds(),
        seconds()
    );
    let mut imported = 0;
    for &size in sizes {
        let started = Instant::now();
        bulk_import(&db, &key, imported, size);
        support::caught_up(&client, &grantline.base, None).await;
        println!(
            "N = {size}: imported {} more through `grantline import` in {:.0} s (projections \
             included)",
            size - imported,
            started.elapsed().as_secs_f64()
        );
        imported = size;
        let script = script(&format!("spread-{size}"), size, None);
        let hot = script_one(&format!("hot-{size}"), size / 2);
        let mut targets = vec![
            Target {
                name: format!("grantline one id, N={size}"),
                url: grantline.base.clone(),
                script: hot.clone(),
                pid: grantline.pid(),
            },
            Target {
                name: format!("grantline N={size}"),
                url: grantline.base.clone(),
                script: script.clone(),
                pid: grantline.pid(),
            },
        ];
        if let Some(baseline) = &baseline {
            targets.push(Target {
                name: format!("baseline N={size}"),
                url: baseline.base.clone(),
                script: script.clone(),
                pid: baseline.pid(),
            });
        }
        let results = measure(&targets).await;
        report(&targets, &results);
        println!(
            "  peak RSS grantline {:.1} MB{}; grantline cache: {}",
            grantline.peak_rss_mb(),
            baseline.as_ref().map_or(String::new(), |b| format!(
                ", baseline {:.1} MB",
                b.peak_rss_mb()
            )),
            cache_counters(&grantline.base).await
        );
        let _ = std::fs::remove_file(&script);
        let _ = std::fs::remove_file(&hot);
    }
}

/// A wrk script that reads the one connection `c{id}`.
fn script_one(name: &str, id: usize) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("grantline-wrk-{name}-{}.lua", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "request = function()\n  return wrk.format(\"GET\", \"/connection/c{id}?provider_config_key=github\")\nend\n"
        ),
    )
    .unwrap();
    path
}

/// Imports `c{from}`..`c{to - 1}` (tokens as [`import`] makes them) with `grantline import`.
fn bulk_import(db: &TestDatabase, key: &str, from: usize, to: usize) {
    use std::io::Write;
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut out = std::io::BufWriter::new(file.as_file());
        for n in from..to {
            let line = json!({
                "provider_config_key": "github", "connection_id": format!("c{n}"),
                "access_token": format!("gho_{n:0>36}"), "refresh_token": format!("ghr_{n:0>36}"),
                "expires_at": expires, "raw": {"token_type": "bearer", "scope": "repo"}});
            writeln!(out, "{line}").unwrap();
        }
    }
    let output = std::process::Command::new(support::grantline())
        .arg("import")
        .arg(file.path())
        .env("GRANTLINE_DATABASE_URL", db.url())
        .env("GRANTLINE_ENCRYPTION_KEY", key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[tokio::main]
async fn main() {
    let baseline = support::baseline();
    hot_path(baseline.as_deref()).await;
    let sizes = scale();
    if !sizes.is_empty() {
        spread_out(baseline.as_deref(), &sizes).await;
    }
}
