//! API benchmark: `GET /connection/:id` with a fresh token on the real `grantline serve` binary
//! (PostgreSQL backend), 32 connections with `wrk`: the open API, the API with a secret key
//! (every request authenticated, as production runs it) and a bare axum handler that returns the
//! same JSON bytes from memory (the ceiling), measured in turn for several rounds in one run, so
//! the machine's drift hits all three; medians are reported. Also the server's peak RSS.
//!
//! `cargo bench --bench api` (needs `wrk`: `apt-get install wrk`; `BENCH_SECONDS` overrides 10 s
//! per phase, `BENCH_ROUNDS` the 3 rounds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use domain::testing::TestDatabase;
use serde_json::{Value, json};

const CONNECTIONS: usize = 1000;

struct WrkResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1)
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
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        non_2xx: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse().unwrap_or(0.0),
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

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A running `grantline serve` (PostgreSQL) with `CONNECTIONS` fresh connections imported.
struct Server {
    process: std::process::Child,
    base: String,
    _db: TestDatabase,
}

impl Server {
    /// Starts the binary; with `secret`, the API requires it as a bearer token.
    async fn start(secret: Option<&str>) -> Self {
        let db = TestDatabase::postgres().await;
        let key = domain::keys::MasterKey::generate().1.as_str().to_owned();
        let mut command = Command::new(env!("CARGO_BIN_EXE_grantline"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("GRANTLINE_DATABASE_URL", db.url())
            .env("GRANTLINE_ENCRYPTION_KEY", &key)
            .env("RUST_LOG", "warn,grantline=info")
            .stderr(Stdio::piped());
        if let Some(secret) = secret {
            command.env("GRANTLINE_SECRET_KEY", secret);
        }
        let mut process = command.spawn().unwrap();
        let stderr = process.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines.next().expect("the server starts").unwrap();
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && entry["message"] == "grantline listening"
            {
                break entry["port"].as_u64().unwrap();
            }
        };
        // Keep draining the server's log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let authorized = |request: reqwest::RequestBuilder| match secret {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        };
        authorized(client.post(format!("{base}/config")))
            .json(
                &json!({"provider_config_key": "github", "provider": "github",
                "oauth_client_id": "id", "oauth_client_secret": "secret", "oauth_scopes": "repo"}),
            )
            .send()
            .await
            .unwrap();
        let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
        for n in 0..CONNECTIONS {
            let response = authorized(client.post(format!("{base}/connection")))
                .json(
                    &json!({"provider_config_key": "github", "connection_id": format!("c{n}"),
                    "access_token": format!("gho_{n:0>36}"), "refresh_token": format!("ghr_{n:0>36}"),
                    "expires_at": expires, "raw": {"token_type": "bearer", "scope": "repo"}}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }
        Self {
            process,
            base,
            _db: db,
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.process.id().to_string()])
            .status();
        let _ = self.process.wait();
    }
}

/// A wrk script requesting random connections, with `header` on every request.
fn script(name: &str, header: Option<&str>) -> std::path::PathBuf {
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
            CONNECTIONS - 1
        ),
    )
    .unwrap();
    path
}

#[tokio::main]
async fn main() {
    const SECRET: &str = "bench-secret-key-0123456789";
    let open = Server::start(None).await;
    let sample = reqwest::get(format!(
        "{}/connection/c1?provider_config_key=github",
        open.base
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();

    // The ceiling: the same bytes from memory, on a bare axum handler in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ceiling_port = listener.local_addr().unwrap().port();
    let body = sample.clone();
    let app = Router::new().route(
        "/connection/{id}",
        get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Both servers run side by side (the idle one costs nothing); the three targets are
    // measured in turn, ROUNDS times, so that a slow spell of the machine hits all of them.
    let secured = Server::start(Some(SECRET)).await;
    let plain = script("open", None);
    let with_header = script("secret", Some(&format!("Bearer {SECRET}")));
    let targets = [
        ("grantline", open.base.clone(), plain.clone()),
        (
            "grantline secret key",
            secured.base.clone(),
            with_header.clone(),
        ),
        (
            "bare axum (ceiling)",
            format!("http://127.0.0.1:{ceiling_port}"),
            plain.clone(),
        ),
    ];
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds() {
        for (i, (_, url, script)) in targets.iter().enumerate() {
            let (url, script) = (url.clone(), script.clone());
            let result = tokio::task::spawn_blocking(move || wrk(&url, &script))
                .await
                .unwrap();
            results[i].push(result);
        }
    }
    let rss = peak_rss_mb(open.process.id());
    open.stop();
    secured.stop();

    println!(
        "GET /connection/:id, {CONNECTIONS} connections, 32 concurrent, PostgreSQL; {} rounds of \
         {} s per target, interleaved; medians (and every round's req/s)",
        rounds(),
        seconds()
    );
    let medians: Vec<f64> = results
        .iter()
        .map(|r| median(r, |r| r.requests_per_second))
        .collect();
    for ((name, _, _), rounds) in targets.iter().zip(&results) {
        let each: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.0}", r.requests_per_second))
            .collect();
        println!(
            "{name:<20} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   non-2xx {}   ({})",
            median(rounds, |r| r.requests_per_second),
            median(rounds, |r| r.p50_ms),
            median(rounds, |r| r.p99_ms),
            rounds.iter().map(|r| r.non_2xx).sum::<u64>(),
            each.join(", ")
        );
    }
    println!(
        "grantline / ceiling  {:.1}% (with secret key {:.1}%)   server peak RSS {rss:.1} MB",
        medians[0] / medians[2] * 100.0,
        medians[1] / medians[2] * 100.0
    );
    let _ = std::fs::remove_file(&plain);
    let _ = std::fs::remove_file(&with_header);
}
