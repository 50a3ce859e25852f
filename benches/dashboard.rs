//! Dashboard benchmark: how long the server takes to answer the dashboard's connection list (a
//! page of 50, with each filter) and the page of a connection whose history holds 10,000 events,
//! with 1,000,000 connections on PostgreSQL; and the overview, whose health counts scan every
//! connection (kept 15 s).
//!
//! The release binary serves (roles api and projections, open mode); the connection with the
//! long history is refreshed through the in-process fake provider (two events per refresh), and
//! the others are imported with `grantline import`, each with a tag (`team=tN`, 1,000 teams) and
//! an end user. Each page is requested `BENCH_SAMPLES` times one after another after a warm-up;
//! the latencies are measured by the client on loopback, so they include the round trip.
//!
//! `cargo bench --bench dashboard` (`BENCH_DB_SIZE` 1,000,000, `BENCH_HISTORY` 10,000,
//! `BENCH_SAMPLES` 200).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_service;
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use fake_service::Setup;
use serde_json::json;
use support::setting;

/// The connection with the long history.
const LONG: &str = "long-history";

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Imports connections `c{from}`..`c{to}` of `fake` with `grantline import`, in one file.
fn bulk_import(setup: &Setup, from: usize, to: usize) {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut out = std::io::BufWriter::new(file.as_file());
        for n in from..to {
            let line = json!({
                "provider_config_key": "fake", "connection_id": format!("c{n}"),
                "access_token": format!("at_{n:0>36}"), "refresh_token": format!("rt_{n:0>36}"),
                "expires_at": expires,
                "tags": {"team": format!("t{}", n % 1000)},
                "end_user": {"id": format!("u{n}"), "display_name": format!("User {n}"),
                    "email": format!("user{n}@example.com")},
            });
            writeln!(out, "{line}").unwrap();
        }
    }
    let output = std::process::Command::new(support::grantline())
        .arg("import")
        .arg(file.path())
        .env("GRANTLINE_DATABASE_URL", setup.db.url())
        .env("GRANTLINE_ENCRYPTION_KEY", &setup.key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// `samples` sequential GETs of `path` after a warm-up: p50, p99 and max in ms.
async fn measure(client: &reqwest::Client, base: &str, path: &str, samples: usize) -> [f64; 3] {
    let get = || async {
        let started = Instant::now();
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body = response.bytes().await.unwrap();
        assert!(!body.is_empty());
        started.elapsed()
    };
    for _ in 0..5 {
        get().await;
    }
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        latencies.push(get().await);
    }
    latencies.sort_unstable();
    [
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    ]
}

#[tokio::main]
async fn main() {
    let size: usize = setting("BENCH_DB_SIZE", 1_000_000);
    let history: usize = setting("BENCH_HISTORY", 10_000);
    let samples: usize = setting("BENCH_SAMPLES", 200);
    let setup = Setup::new().await;
    let server = setup.start(
        &["--roles", "api,projections"],
        "warn,grantline=info,grantline::startup=info",
    );
    let base = server.base.clone();
    let client = reqwest::Client::new();
    setup.create_integration(&client, &base).await;

    // The long history: an import, then a forced refresh per two events.
    let started = Instant::now();
    setup
        .import(&client, &base, LONG, ("at-long", "rt-long"), 3600)
        .await;
    let forced = format!("{base}/connection/{LONG}?provider_config_key=fake&force_refresh=true");
    for _ in 0..history.saturating_sub(1) / 2 {
        let response = client.get(&forced).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    println!(
        "history: {} events on {LONG} in {:.0} s",
        1 + 2 * (history.saturating_sub(1) / 2),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let batch = 250_000;
    let mut imported = 0;
    while imported < size {
        let to = (imported + batch).min(size);
        bulk_import(&setup, imported, to);
        imported = to;
        println!(
            "imported {imported} connections in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    support::caught_up(&client, &base, None).await;
    println!(
        "{size} connections imported and projected in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // The overview counts every connection on its first view.
    let t = Instant::now();
    let response = client.get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    println!(
        "overview, counted (every connection, a day of the log): {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // A connection page's first view folds the whole stream; later views extend what it kept.
    let t = Instant::now();
    let response = client
        .get(format!("{base}/ui/connections/fake/{LONG}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    println!(
        "connection page, first view (folds {history} events): {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    let middle = size / 2;
    let pages = [
        ("list, newest first", "/ui/connections".to_owned()),
        (
            "list, integration, page 20",
            "/ui/connections?integration=fake&page=20".to_owned(),
        ),
        (
            "list, tag team=t42",
            "/ui/connections?tag=team%3Dt42".to_owned(),
        ),
        (
            "list, end user",
            format!("/ui/connections?end_user=u{middle}"),
        ),
        ("list, search id", format!("/ui/connections?q=c{middle}")),
        (
            "list, search e-mail",
            format!("/ui/connections?q=user{middle}%40example"),
        ),
        (
            "list, health failed",
            "/ui/connections?health=failed".to_owned(),
        ),
        (
            "list, health expiring",
            "/ui/connections?health=expiring".to_owned(),
        ),
        (
            "connection page, 10,000 events",
            format!("/ui/connections/fake/{LONG}"),
        ),
        (
            "connection page, oldest entries",
            format!("/ui/connections/fake/{LONG}?before=200"),
        ),
        ("overview, kept", "/ui/".to_owned()),
    ];
    println!("\n{size} connections; {samples} sequential requests per page (ms):");
    println!("{:<34} {:>8} {:>8} {:>8}", "page", "p50", "p99", "max");
    for (name, path) in &pages {
        let [p50, p99, max] = measure(&client, &base, path, samples).await;
        println!("{name:<34} {p50:>8.1} {p99:>8.1} {max:>8.1}");
    }
    println!("server peak RSS: {:.0} MB", server.peak_rss_mb());
    server.stop();
}
