//! Proxy benchmark: the overhead of `/proxy/*` on the real `grantline serve` binary
//! (PostgreSQL backend) against the in-process fake provider's API.
//!
//! 1. **An upstream that answers at once**: the same small authenticated GET (`/api/echo`) sent
//!    directly to the fake provider, through two bare pass-through proxies, and through
//!    Grantline's proxy, 32 concurrent clients, in turn for several rounds in one run:
//!    requests/s, p50 and p99 of each (medians over the rounds), Grantline's share of direct and
//!    of each bare proxy, its added p99, and each proxy's CPU per call. Every process shares the
//!    same cores, so this measures CPU: the bare proxies (each its own process, forwarding with the
//!    bearer token put in and nothing else: one with reqwest, as Grantline's, one with
//!    hyper-util's client) show what any proxy pays here for a second server and client hop.
//! 2. **An upstream at a provider's distance**: the same four paths, with an API that answers
//!    after `BENCH_UPSTREAM_MS` (default 20 ms; `/api/wait`): each proxy's share of the direct
//!    rate and the p50 and p99 it adds, as a caller sees them.
//! 3. A large download (`BENCH_DOWNLOAD_MB`, default 100 MB) through the proxy, read and
//!    discarded by the client: the server's peak RSS before and after.
//!
//! `cargo bench --bench proxy` (`BENCH_SECONDS` per measurement, default 5; `BENCH_ROUNDS`,
//! default 3). The load generator runs in this process, beside the fake provider, on the same
//! cores as the servers: every path pays for it alike.
//!
//! With `BENCH_BASELINE_BIN` (a release build of an earlier commit) a second `grantline serve`
//! from it runs beside this build's, on the same database, and its proxy is a fifth path in
//! every round: a change's before and after from one run.
//!
//! With `BENCH_PROXY_CPUS` (a `taskset` CPU list, e.g. `1`) every proxy process (Grantline's and
//! the bare ones) runs on those CPUs and this process (load generator and fake provider) on
//! `BENCH_WORLD_CPUS` (default `0`): the deployment where the proxy has its own host, and the
//! callers and the provider are elsewhere. Direct calls then get the world's CPUs only, as
//! they would without the proxy's host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)] // shared with the refresh benchmarks; this one uses part of it
mod fake_service;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::setting;

use fake_service::{KEY, Setup};

const CONCURRENCY: usize = 32;
const ACCESS: &str = "fake-access-bench";

struct Load {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: u64,
}

/// `CONCURRENCY` clients sending `request` back to back for `seconds`.
async fn load(
    client: &reqwest::Client,
    seconds: u64,
    request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Load {
    let request = Arc::new(request);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, request, stop) = (client.clone(), request.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match request(&client).send().await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            latencies.push(sent.elapsed());
                        }
                        _ => failures += 1,
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.unwrap();
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Load {
        requests_per_second: latencies.len() as f64 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        failures,
    }
}

/// Every thread of process `pid` on `cpus` (a `taskset` list).
fn pin(pid: u32, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(status.success(), "taskset -a -cp {cpus} {pid}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One way of sending the small GET, with each round's figures.
struct Path {
    name: &'static str,
    send: Arc<dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync>,
    /// The proxy process whose CPU is counted per call.
    pid: Option<u32>,
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_per_call: Vec<f64>,
}

impl Path {
    fn new(
        name: &'static str,
        pid: Option<u32>,
        send: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            send: Arc::new(send),
            pid,
            rps: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
            cpu_per_call: Vec::new(),
        }
    }
}

/// Measures `paths` in turn for `rounds` rounds of `seconds` after a warm-up, printing each
/// round; returns the medians as (requests/s, p50, p99) per path.
async fn compare(
    client: &reqwest::Client,
    paths: &mut [Path],
    rounds: usize,
    seconds: u64,
) -> Vec<(f64, f64, f64)> {
    for path in paths.iter() {
        let send = path.send.clone();
        load(client, 1, move |c| send(c)).await;
    }
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for path in paths.iter_mut() {
            let send = path.send.clone();
            let cpu_before = path.pid.map(support::cpu_seconds);
            let l = load(client, seconds, move |c| send(c)).await;
            if let (Some(pid), Some(before)) = (path.pid, cpu_before) {
                let calls = l.requests_per_second * seconds as f64;
                path.cpu_per_call
                    .push((support::cpu_seconds(pid) - before) / calls * 1e6);
            }
            line += &format!(
                " | {} {:.0}/s p50 {:.2} p99 {:.2} ms{}",
                path.name,
                l.requests_per_second,
                l.p50_ms,
                l.p99_ms,
                match l.failures {
                    0 => String::new(),
                    n => format!(" ({n} failed)"),
                }
            );
            path.rps.push(l.requests_per_second);
            path.p50.push(l.p50_ms);
            path.p99.push(l.p99_ms);
        }
        println!("{line}");
    }
    paths
        .iter()
        .map(|p| {
            (
                median(p.rps.clone()),
                median(p.p50.clone()),
                median(p.p99.clone()),
            )
        })
        .collect()
}

/// Prints each path's medians, and what each proxy adds to the direct path (the first).
fn summary(paths: &[Path], medians: &[(f64, f64, f64)]) {
    for (path, (rps, p50, p99)) in paths.iter().zip(medians) {
        println!(
            "  {:<24} {rps:>8.0} req/s   p50 {p50:.2} ms   p99 {p99:.2} ms{}",
            path.name,
            match path.cpu_per_call.is_empty() {
                true => String::new(),
                false => format!(
                    "   proxy CPU {:.0} µs per call",
                    median(path.cpu_per_call.clone())
                ),
            }
        );
    }
    let (direct_rps, direct_p50, direct_p99) = medians[0];
    for (path, (rps, p50, p99)) in paths.iter().zip(medians).skip(1) {
        println!(
            "  {}: {:.1}% of direct, p50 +{:.2} ms, p99 +{:.2} ms",
            path.name,
            100.0 * rps / direct_rps,
            p50 - direct_p50,
            p99 - direct_p99,
        );
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Ok(kind) = std::env::var(bare::KIND) {
        return bare::serve(&kind).await;
    }
    let seconds: u64 = setting("BENCH_SECONDS", 5);
    let rounds: usize = setting("BENCH_ROUNDS", 3usize).max(1);
    let download_mb: usize = setting("BENCH_DOWNLOAD_MB", 100);
    let upstream_ms: u64 = setting("BENCH_UPSTREAM_MS", 20);

    let mut setup = Setup::with_template("  proxy:\n    base_url: {base}\n").await;
    let server = setup.start(&[], "warn,grantline::startup=info");
    // The earlier build, on the same database (instances share one): started after this
    // build's, so that this one's migrations are the ones applied.
    let baseline = std::env::var_os("BENCH_BASELINE_BIN").map(|binary| {
        let own = std::mem::replace(&mut setup.binary, binary.into());
        let baseline = setup.start(&[], "warn,grantline::startup=info");
        setup.binary = own;
        baseline
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    setup.create_integration(&client, &server.base).await;
    setup
        .import(
            &client,
            &server.base,
            "c1",
            (ACCESS, "fake-refresh-bench"),
            86_400,
        )
        .await;
    let with_reqwest = bare::Running::start("reqwest", &setup.fake.base);
    let with_hyper = bare::Running::start("hyper", &setup.fake.base);
    if let Ok(proxies) = std::env::var("BENCH_PROXY_CPUS") {
        let world = std::env::var("BENCH_WORLD_CPUS").unwrap_or_else(|_| "0".to_owned());
        pin(std::process::id(), &world);
        let baseline_pid = baseline.as_ref().map(|b| b.pid());
        for pid in [server.pid(), with_reqwest.pid(), with_hyper.pid()]
            .into_iter()
            .chain(baseline_pid)
        {
            pin(pid, &proxies);
        }
        println!("proxies on CPUs {proxies}, load generator and fake provider on CPUs {world}\n");
    }

    let direct = |url: String| move |c: &reqwest::Client| c.get(&url).bearer_auth(ACCESS);
    let proxied = |url: String| {
        move |c: &reqwest::Client| {
            c.get(&url)
                .header("Connection-Id", "c1")
                .header("Provider-Config-Key", KEY)
        }
    };
    let bare = |url: String| move |c: &reqwest::Client| c.get(&url);
    // The same provider endpoint, directly and through each proxy.
    let paths_to = |endpoint: &str| {
        let mut paths = vec![
            Path::new(
                "direct",
                None,
                direct(format!("{}{endpoint}", setup.fake.base)),
            ),
            Path::new(
                "bare proxy, reqwest",
                Some(with_reqwest.pid()),
                bare(format!("{}/proxy{endpoint}", with_reqwest.base)),
            ),
            Path::new(
                "bare proxy, hyper-util",
                Some(with_hyper.pid()),
                bare(format!("{}/proxy{endpoint}", with_hyper.base)),
            ),
            Path::new(
                "grantline proxy",
                Some(server.pid()),
                proxied(format!("{}/proxy{endpoint}", server.base)),
            ),
        ];
        if let Some(baseline) = &baseline {
            paths.push(Path::new(
                "grantline, baseline",
                Some(baseline.pid()),
                proxied(format!("{}/proxy{endpoint}", baseline.base)),
            ));
        }
        paths
    };

    println!(
        "1. small GET (/api/echo), an upstream that answers at once, c={CONCURRENCY}, {rounds} \
         rounds of {seconds} s"
    );
    let mut paths = paths_to("/api/echo");
    let medians = compare(&client, &mut paths, rounds, seconds).await;
    summary(&paths, &medians);
    let [_, with_reqwest_m, with_hyper_m, grantline_m, ..] = medians[..] else {
        unreachable!("four paths or more")
    };
    println!(
        "  grantline: {:.0}% of the bare reqwest proxy, {:.0}% of the bare hyper-util proxy",
        100.0 * grantline_m.0 / with_reqwest_m.0,
        100.0 * grantline_m.0 / with_hyper_m.0,
    );

    println!(
        "\n2. small GET (/api/wait), an upstream that answers after {upstream_ms} ms, \
         c={CONCURRENCY}, {rounds} rounds of {seconds} s"
    );
    let mut paths = paths_to(&format!("/api/wait?ms={upstream_ms}"));
    let medians = compare(&client, &mut paths, rounds, seconds).await;
    summary(&paths, &medians);
    drop((with_reqwest, with_hyper, baseline));

    let before = server.peak_rss_mb();
    let started = Instant::now();
    let response = client
        .get(format!(
            "{}/proxy/api/large?bytes={}",
            server.base,
            download_mb * 1024 * 1024
        ))
        .header("Connection-Id", "c1")
        .header("Provider-Config-Key", KEY)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let mut received = 0usize;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, download_mb * 1024 * 1024);
    let after = server.peak_rss_mb();
    println!(
        "\n3. download of {download_mb} MB through the proxy in {:.2} s: server peak RSS \
         {before:.1} MB before, {after:.1} MB after (+{:.1} MB)",
        started.elapsed().as_secs_f64(),
        after - before
    );
    server.stop();
}

/// Pass-through proxies with none of Grantline's work (no key check, no connection, no header
/// rules, no metrics): the method, path and query forwarded with the bench's bearer token, the
/// status, content type and body streamed back. Each runs as this executable in its own
/// process, as Grantline does.
mod bare {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Body;
    use axum::extract::{Request, State};
    use axum::http::{HeaderValue, StatusCode, Uri, header};
    use axum::response::{IntoResponse, Response};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    /// The variable that makes this executable a bare proxy (`reqwest` or `hyper`).
    pub const KIND: &str = "BENCH_BARE_PROXY";
    /// The provider's address it forwards to.
    const UPSTREAM: &str = "BENCH_BARE_UPSTREAM";

    /// A bare proxy process, ended when dropped.
    pub struct Running {
        child: Child,
        /// `http://127.0.0.1:<port>`.
        pub base: String,
    }

    impl Running {
        pub fn start(kind: &str, upstream: &str) -> Self {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .env(KIND, kind)
                .env(UPSTREAM, upstream)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut port = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut port)
                .unwrap();
            Self {
                child,
                base: format!("http://127.0.0.1:{}", port.trim()),
            }
        }
    }

    impl Running {
        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    struct Upstream<C> {
        base: String,
        client: C,
        authorization: HeaderValue,
    }

    /// Serves until killed, after printing its port.
    pub async fn serve(kind: &str) {
        let base = std::env::var(UPSTREAM).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        let authorization = HeaderValue::try_from(format!("Bearer {}", super::ACCESS)).unwrap();
        let app = match kind {
            "reqwest" => Router::new()
                .fallback(with_reqwest)
                .with_state(Arc::new(Upstream {
                    base,
                    client: reqwest::Client::new(),
                    authorization,
                })),
            _ => Router::new()
                .fallback(with_hyper)
                .with_state(Arc::new(Upstream {
                    base,
                    client: Client::builder(TokioExecutor::new()).build_http::<Body>(),
                    authorization,
                })),
        };
        axum::serve(listener, app).await.unwrap();
    }

    /// Where a proxied request goes: the path after `/proxy`, with the query.
    fn target(base: &str, uri: &Uri) -> String {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        format!("{base}{}", path.strip_prefix("/proxy").unwrap_or(path))
    }

    async fn with_reqwest(
        State(upstream): State<Arc<Upstream<reqwest::Client>>>,
        request: Request,
    ) -> Response {
        let url = target(&upstream.base, request.uri());
        let sent = upstream
            .client
            .request(request.method().clone(), url)
            .header(header::AUTHORIZATION, upstream.authorization.clone())
            .send()
            .await;
        let Ok(answer) = sent else {
            return StatusCode::BAD_GATEWAY.into_response();
        };
        let mut response = Response::builder().status(answer.status());
        if let Some(kind) = answer.headers().get(header::CONTENT_TYPE) {
            response = response.header(header::CONTENT_TYPE, kind.clone());
        }
        // The body as an `http_body::Body`, which keeps its length and its end.
        let body = axum::http::Response::from(answer).into_body();
        response.body(Body::new(body)).unwrap()
    }

    async fn with_hyper(
        State(upstream): State<Arc<Upstream<Client<HttpConnector, Body>>>>,
        request: Request,
    ) -> Response {
        let Ok(uri) = target(&upstream.base, request.uri()).parse::<Uri>() else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let outgoing = axum::http::Request::builder()
            .method(request.method().clone())
            .uri(uri)
            .header(header::AUTHORIZATION, upstream.authorization.clone())
            .body(Body::empty())
            .unwrap();
        let Ok(answer) = upstream.client.request(outgoing).await else {
            return StatusCode::BAD_GATEWAY.into_response();
        };
        let (parts, body) = answer.into_parts();
        let mut response = Response::builder().status(parts.status);
        if let Some(kind) = parts.headers.get(header::CONTENT_TYPE) {
            response = response.header(header::CONTENT_TYPE, kind.clone());
        }
        response.body(Body::new(body)).unwrap()
    }
}
