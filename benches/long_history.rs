//! Long-history benchmark: forced refreshes of one connection as its stream grows, on the real
//! `grantline serve` binary (PostgreSQL, roles api and projections) against the in-process fake
//! provider without latency. Every refresh appends two events (lease and outcome), so a
//! connection refreshed hourly gains ~17,500 events a year; a refresh must not slow down with
//! them. Reports the latency of the first refreshes and of the last ones after thousands, in one
//! run, and their ratio.
//!
//! `cargo bench --bench long_history` (`BENCH_REFRESHES` overrides 5,000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_service;
mod support;

use std::time::{Duration, Instant};

use fake_service::Setup;
use support::setting;

/// Refreshes measured at each end.
const WINDOW: usize = 200;

fn refreshes() -> usize {
    setting("BENCH_REFRESHES", 5_000usize).max(2 * WINDOW)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn describe(latencies: &[Duration]) -> (f64, f64) {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    (percentile(&sorted, 0.5), percentile(&sorted, 0.99))
}

#[tokio::main]
async fn main() {
    let n = refreshes();
    let setup = Setup::new().await;
    let server = setup.start(&["--roles", "api,projections"], "warn,grantline=info");
    let base = server.base.clone();
    let client = reqwest::Client::new();
    setup.create_integration(&client, &base).await;
    setup
        .import(&client, &base, "long", ("at-long", "rt-long"), 3600)
        .await;

    let url = format!("{base}/connection/long?provider_config_key=fake&force_refresh=true");
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        response.bytes().await.unwrap();
        latencies.push(t.elapsed());
    }
    let total = started.elapsed();
    server.stop();

    let (first_p50, first_p99) = describe(&latencies[..WINDOW]);
    let (last_p50, last_p99) = describe(&latencies[n - WINDOW..]);
    println!(
        "Forced refreshes of one connection, one at a time, fake provider without latency, \
         PostgreSQL: {n} refreshes in {:.1} s ({:.0}/s); the stream ends at {} events",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        1 + 2 * n
    );
    println!(
        "first {WINDOW:<5} (stream    1..{:>6})  p50 {first_p50:>6.2} ms  p99 {first_p99:>6.2} ms",
        1 + 2 * WINDOW
    );
    println!(
        "last  {WINDOW:<5} (stream {:>6}..{:>6})  p50 {last_p50:>6.2} ms  p99 {last_p99:>6.2} ms",
        1 + 2 * (n - WINDOW),
        1 + 2 * n
    );
    println!(
        "last / first p50 {:.2}   provider refresh calls {}",
        last_p50 / first_p50,
        setup.fake.refresh_requests()
    );
}
