//! Proxy benchmark: the overhead of `/proxy/*` on the real `grantline serve` binary
//! (PostgreSQL backend) against the in-process fake provider's API.
//!
//! 1. The same small authenticated GET (`/api/echo`) sent directly to the fake provider and
//!    through the proxy, 32 concurrent clients, alternating for several rounds in one run:
//!    requests/s, p50 and p99 of each (medians over the rounds), the ratio and the added p99.
//! 2. A large download (`BENCH_DOWNLOAD_MB`, default 100 MB) through the proxy, read and
//!    discarded by the client: the server's peak RSS before and after.
//!
//! `cargo bench --bench proxy` (`BENCH_SECONDS` per measurement, default 5; `BENCH_ROUNDS`,
//! default 3). The load generator runs in this process, beside the fake provider, on the same
//! cores as the server: both paths pay for it alike.
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds: u64 = setting("BENCH_SECONDS", 5);
    let rounds: usize = setting("BENCH_ROUNDS", 3usize).max(1);
    let download_mb: usize = setting("BENCH_DOWNLOAD_MB", 100);

    let setup = Setup::with_template("  proxy:\n    base_url: {base}\n").await;
    let server = setup.start(&[], "warn,grantline::startup=info");
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

    let direct_url = format!("{}/api/echo", setup.fake.base);
    let proxy_url = format!("{}/proxy/api/echo", server.base);
    let direct = move |c: &reqwest::Client| c.get(&direct_url).bearer_auth(ACCESS);
    let proxied = move |c: &reqwest::Client| {
        c.get(&proxy_url)
            .header("Connection-Id", "c1")
            .header("Provider-Config-Key", KEY)
    };
    // Warm both paths (connections, the replica, the data key).
    load(&client, 1, direct.clone()).await;
    load(&client, 1, proxied.clone()).await;

    let (mut d_rps, mut d_p50, mut d_p99) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p_rps, mut p_p50, mut p_p99) = (Vec::new(), Vec::new(), Vec::new());
    let (mut server_cpu, mut proxied_requests) = (0.0, 0.0);
    for round in 1..=rounds {
        let d = load(&client, seconds, direct.clone()).await;
        let cpu_before = support::cpu_seconds(server.pid());
        let p = load(&client, seconds, proxied.clone()).await;
        server_cpu += support::cpu_seconds(server.pid()) - cpu_before;
        proxied_requests += p.requests_per_second * seconds as f64;
        println!(
            "round {round}: direct {:.0} req/s p50 {:.2} ms p99 {:.2} ms ({} failed) | proxy {:.0} \
             req/s p50 {:.2} ms p99 {:.2} ms ({} failed)",
            d.requests_per_second,
            d.p50_ms,
            d.p99_ms,
            d.failures,
            p.requests_per_second,
            p.p50_ms,
            p.p99_ms,
            p.failures
        );
        d_rps.push(d.requests_per_second);
        d_p50.push(d.p50_ms);
        d_p99.push(d.p99_ms);
        p_rps.push(p.requests_per_second);
        p_p50.push(p.p50_ms);
        p_p99.push(p.p99_ms);
    }
    let (d_rps, p_rps) = (median(d_rps), median(p_rps));
    let (d_p99, p_p99) = (median(d_p99), median(p_p99));
    println!(
        "small GET, c={CONCURRENCY}, medians of {rounds} rounds of {seconds} s: direct {d_rps:.0} \
         req/s (p50 {:.2} ms, p99 {d_p99:.2} ms), proxy {p_rps:.0} req/s (p50 {:.2} ms, p99 \
         {p_p99:.2} ms): {:.0}% of direct, p99 +{:.2} ms",
        median(d_p50),
        median(p_p50),
        100.0 * p_rps / d_rps,
        p_p99 - d_p99
    );

    println!(
        "server CPU per proxied call: {:.0} µs (user and system)",
        server_cpu / proxied_requests * 1e6
    );

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
        "download of {download_mb} MB through the proxy in {:.2} s: server peak RSS {before:.1} MB \
         before, {after:.1} MB after (+{:.1} MB)",
        started.elapsed().as_secs_f64(),
        after - before
    );
    server.stop();
}
