//! Refresh-storm benchmark: 10,000 connections due at once on the real `grantline serve` binary
//! (PostgreSQL backend, scheduler role, default refresh concurrency), against the in-process
//! fake provider without latency. Reports the time from the scheduler tick to the provider's
//! 10,000th refresh, refreshes per second, and the latency of `GET /connection/:id` for 200
//! other, fresh connections read by 16 concurrent clients during the storm (beside the same load
//! before it, with no storm, as the baseline).
//!
//! Seeding is not part of the storm: a first instance (roles api, projections) imports the
//! connections, reads each once (so they are in use) and is stopped once its projections have
//! caught up (a graceful stop writes the reads it noted); a second instance with the scheduler
//! role, ticking every 5 s and unpaced (`--refresh-rate 0`: the storm measures the refresh path,
//! not the budget), then finds them all due on its first tick.
//!
//! `cargo bench --bench refresh_storm` (`BENCH_CONNECTIONS` overrides 10,000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_service;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_service::{KEY, Setup};
use futures_util::StreamExt;
use serde_json::Value;
use support::{caught_up, setting};

/// Fresh connections read during the storm.
const OTHERS: usize = 200;
/// Concurrent readers of the fresh connections.
const READERS: usize = 16;
/// Concurrent imports while seeding.
const SEED_CONCURRENCY: usize = 32;
/// The scheduler ticks at every multiple of this many seconds.
const TICK_SECONDS: u64 = 5;
/// Length of the baseline read load, before the storm.
const BASELINE: Duration = Duration::from_secs(3);

fn connections() -> usize {
    setting("BENCH_CONNECTIONS", 10_000)
}

/// Imports connection `id` with an access token expiring `expires_in` seconds from now.
/// Imports `id` and reads it once: in use, so the scheduler refreshes it ahead of expiry (the
/// read itself refreshes nothing, the token being outside the read margin).
async fn import(client: &reqwest::Client, base: &str, setup: &Setup, id: String, expires_in: i64) {
    let (access, refresh) = (format!("old-access-{id}"), format!("rt-{id}"));
    setup
        .import(client, base, &id, (&access, &refresh), expires_in)
        .await;
    let read = client
        .get(format!("{base}/connection/{id}?provider_config_key={KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
}

/// What the readers saw: (start, latency) of each 200 answer, and the non-200 count.
#[derive(Default)]
struct Reads {
    samples: Vec<(Instant, Duration)>,
    failed: usize,
}

/// Reads the fresh connections with `READERS` concurrent clients until `stop` is set.
async fn read_load(base: String, stop: Arc<AtomicBool>) -> Reads {
    let tasks: Vec<_> = (0..READERS)
        .map(|reader| {
            let base = base.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut reads = Reads::default();
                let mut n = reader;
                while !stop.load(Ordering::Relaxed) {
                    let url = format!(
                        "{base}/connection/other-{}?provider_config_key={KEY}",
                        n % OTHERS
                    );
                    n += READERS + 1;
                    let started = Instant::now();
                    let ok = match client.get(&url).send().await {
                        Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        reads.samples.push((started, started.elapsed()));
                    } else {
                        reads.failed += 1;
                    }
                }
                reads
            })
        })
        .collect();
    let mut all = Reads::default();
    for task in tasks {
        let reads = task.await.unwrap();
        all.samples.extend(reads.samples);
        all.failed += reads.failed;
    }
    all
}

/// Requests per second, p50 and p99 in ms of the reads started in `[from, to)`.
fn summary(reads: &Reads, from: Instant, to: Instant) -> (usize, f64, f64, f64) {
    let mut latencies: Vec<Duration> = reads
        .samples
        .iter()
        .filter(|(started, _)| *started >= from && *started < to)
        .map(|(_, latency)| *latency)
        .collect();
    latencies.sort_unstable();
    let quantile = |q: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1000.0
    };
    let rate = latencies.len() as f64 / (to - from).as_secs_f64();
    (latencies.len(), rate, quantile(0.50), quantile(0.99))
}

#[tokio::main]
async fn main() {
    let n = connections();
    let setup = Setup::new().await;
    let fake = &setup.fake;
    let client = reqwest::Client::new();

    // Seeding, on an instance without the scheduler. Each refresh logs a line at the service's
    // default filter, as in production.
    let seeder = setup.start(&["--roles", "api,projections"], "info");
    setup.create_integration(&client, &seeder.base).await;
    let seeding = Instant::now();
    // Due: beyond the read margin (15 min), inside the scheduler's window (20 min).
    let due = (0..n).map(|i| (format!("due-{i:05}"), 18 * 60));
    let others = (0..OTHERS).map(|i| (format!("other-{i}"), 24 * 3600));
    futures_util::stream::iter(due.chain(others))
        .map(|(id, expires_in)| import(&client, &seeder.base, &setup, id, expires_in))
        .buffer_unordered(SEED_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    caught_up(&client, &seeder.base, None).await;
    let seeded_in = seeding.elapsed();
    // The baseline: the same read load on the same database, with no storm.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(read_load(seeder.base.clone(), stop.clone()));
    let baseline_started = Instant::now();
    tokio::time::sleep(BASELINE).await;
    stop.store(true, Ordering::Relaxed);
    let baseline_reads = load.await.unwrap();
    let baseline = summary(&baseline_reads, baseline_started, Instant::now());
    seeder.stop();
    assert_eq!(
        fake.refresh_requests(),
        0,
        "nothing is refreshed while seeding"
    );

    // The storm, on an instance with every role, ticking every 5 s.
    let schedule = format!("*/{TICK_SECONDS} * * * * *");
    let server = setup.start(
        &[
            "--roles",
            "api,projections,scheduler",
            "--refresh-schedule",
            &schedule,
            "--refresh-rate",
            "0",
        ],
        "info",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(read_load(server.base.clone(), stop.clone()));
    // The first tick: the provider's first refresh, then back to the tick time it belongs to
    // (the listing of due connections takes milliseconds, never a whole period).
    let first_call = loop {
        if fake.refresh_requests() > 0 {
            break (Instant::now(), SystemTime::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let since_epoch = first_call.1.duration_since(UNIX_EPOCH).unwrap();
    let past_tick = Duration::from_nanos(
        u64::try_from(since_epoch.as_nanos() % u128::from(TICK_SECONDS * 1_000_000_000)).unwrap(),
    );
    let tick = first_call.0 - past_tick;
    let deadline = Instant::now() + Duration::from_secs(300);
    while fake.refresh_requests() < n {
        assert!(
            Instant::now() < deadline,
            "the storm did not finish in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let reads = load.await.unwrap();
    let report = server
        .logged("refresh tick", Duration::from_secs(30))
        .unwrap_or(Value::Null);
    // Nothing more is refreshed: not the fresh connections, not a generation twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let provider_calls = fake.refresh_requests();
    server.stop();

    let storm = done - tick;
    let during = summary(&reads, tick, done);
    println!(
        "Refresh storm: {n} connections due at once, fake provider without latency, PostgreSQL, \
         default refresh concurrency (16); seeding ({} connections) took {:.1} s, not counted",
        n + OTHERS,
        seeded_in.as_secs_f64()
    );
    println!(
        "storm                      {:>8.2} s  from the tick to the {n}th provider refresh \
         (first call +{:.0} ms)",
        storm.as_secs_f64(),
        (first_call.0 - tick).as_secs_f64() * 1000.0
    );
    println!(
        "refreshes/s                {:>8.0}     (target >= 500)",
        n as f64 / storm.as_secs_f64()
    );
    println!(
        "tick report                due {} refreshed {} failed {} skipped {} in {} ms; provider \
         refresh calls {provider_calls}",
        report["due"],
        report["refreshed"],
        report["failed"],
        report["skipped"],
        report["elapsed_ms"]
    );
    for (name, (count, rate, p50, p99)) in [
        ("GET fresh, before storm", baseline),
        ("GET fresh, during storm", during),
    ] {
        println!(
            "{name:<26} {rate:>8.0} req/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  ({count} \
             reads, {READERS} concurrent)"
        );
    }
    println!(
        "GET non-200 / errors       {:>8}",
        baseline_reads.failed + reads.failed
    );
}
