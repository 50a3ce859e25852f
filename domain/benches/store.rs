//! Event-store benchmark: single-event appends with an expected version (1 and 16 writers on
//! distinct streams) beside a bare `INSERT` loop into an equivalent table, on PostgreSQL and
//! SQLite, then read-all throughput. Everything runs in one process, side by side.
//!
//! `cargo bench -p grantline-domain --bench store` (phase length: `BENCH_SECONDS`, default 5;
//! PostgreSQL server: `GRANTLINE_TEST_POSTGRES`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use grantline_domain::store::{
    Backend, EventStore, ExpectedVersion, LogReader, NewEvent, Position, StoreOptions, StreamId,
};
use grantline_domain::testing::TestDatabase;
use serde_json::{Value, json};
use uuid::Uuid;

fn payload() -> Value {
    json!({
        "lease_id": Uuid::new_v4(),
        "holder": "grantline-bench-instance",
        "trigger": "schedule",
        "leased_at": "2026-11-28T10:00:00Z",
        "lease_expires_at": "2026-11-28T10:01:00Z",
    })
}

fn seconds() -> Duration {
    let s = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(s)
}

/// Runs `writers` tasks for the phase length; each calls `step(writer, n)` in a loop.
async fn run_phase<F, Fut>(writers: usize, step: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let step = Arc::new(step);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + seconds();
    let mut handles = Vec::new();
    for writer in 0..writers {
        let (step, done) = (step.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                step(writer, n).await;
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Appends through the store: each writer owns a stream and appends at `Exact(previous)`.
async fn store_appends(backend: &Backend, writers: usize, run: &str) -> f64 {
    let backend = backend.clone();
    let run = run.to_owned();
    run_phase(writers, move |writer, n| {
        let backend = backend.clone();
        let stream = StreamId::new("bench", format!("{run}-{writer}"));
        async move {
            let expected = match u32::try_from(n).unwrap() {
                0 => ExpectedVersion::NoStream,
                v => ExpectedVersion::Exact(v),
            };
            backend
                .events()
                .append(
                    &stream,
                    expected,
                    vec![NewEvent::new("RefreshLeased", 1, payload())],
                )
                .await
                .unwrap();
        }
    })
    .await
}

async fn bare_inserts(backend: &Backend, writers: usize, run: &str) -> f64 {
    let backend = backend.clone();
    let run = run.to_owned();
    run_phase(writers, move |writer, n| {
        let backend = backend.clone();
        let stream = format!("bench-{run}-{writer}");
        async move {
            let version = i32::try_from(n).unwrap() + 1;
            match &backend {
                Backend::Postgres(store) => {
                    let client = store.pool().get().await.unwrap();
                    let statement = client
                        .prepare_cached(
                            "INSERT INTO bare_events (stream_id, stream_version, event_id, \
                             event_type, event_version, payload, metadata) \
                             VALUES ($1, $2, $3, 'RefreshLeased', 1, $4, '{}')",
                        )
                        .await
                        .unwrap();
                    client
                        .execute(
                            &statement,
                            &[&stream, &version, &Uuid::new_v4(), &payload()],
                        )
                        .await
                        .unwrap();
                }
                Backend::Sqlite(store) => {
                    store
                        .write(move |conn| {
                            conn.prepare_cached(
                                "INSERT INTO bare_events (stream_id, stream_version, event_id, \
                                 event_type, event_version, payload, metadata, recorded_at) \
                                 VALUES (?1, ?2, ?3, 'RefreshLeased', 1, ?4, '{}', 0)",
                            )
                            .and_then(|mut s| {
                                s.execute(rusqlite::params![
                                    stream,
                                    version,
                                    Uuid::new_v4().to_string(),
                                    payload().to_string()
                                ])
                            })
                            .unwrap();
                            Ok(())
                        })
                        .await
                        .unwrap();
                }
            }
        }
    })
    .await
}

async fn create_bare_table(backend: &Backend) {
    match backend {
        Backend::Postgres(store) => {
            // Same columns, defaults, identity, keys and indexes as `events`; no append logic.
            store
                .pool()
                .get()
                .await
                .unwrap()
                .batch_execute("CREATE TABLE bare_events (LIKE events INCLUDING ALL)")
                .await
                .unwrap();
        }
        Backend::Sqlite(store) => {
            store
                .write(|conn| {
                    conn.execute_batch(
                        "CREATE TABLE bare_events (global_position INTEGER PRIMARY KEY \
                         AUTOINCREMENT, stream_id TEXT NOT NULL, stream_version INTEGER NOT NULL, \
                         event_id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL, event_version \
                         INTEGER NOT NULL, payload TEXT NOT NULL, metadata TEXT NOT NULL, \
                         recorded_at INTEGER NOT NULL, UNIQUE (stream_id, stream_version))",
                    )
                    .unwrap();
                    Ok(())
                })
                .await
                .unwrap();
        }
    }
}

/// Fills the log with `count` more events directly, so read-all has a large log to cross.
async fn fill(backend: &Backend, count: i64) {
    let sample = payload().to_string();
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await.unwrap();
            client
                .execute(
                    "INSERT INTO events (stream_id, stream_version, event_id, event_type, \
                     event_version, payload) \
                     SELECT 'fill-' || (g / 10), g % 10 + 1, gen_random_uuid(), 'RefreshLeased', \
                     1, $2::text::jsonb FROM generate_series(0, $1::bigint - 1) g",
                    &[&count, &sample],
                )
                .await
                .unwrap();
            // Steady state of a log: old rows are all-visible with hint bits set, as autovacuum
            // leaves them; otherwise the first reader pays for setting them.
            client.batch_execute("VACUUM ANALYZE events").await.unwrap();
        }
        Backend::Sqlite(store) => {
            store
                .write(move |conn| {
                    conn.execute(
                        "WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE \
                         n + 1 < ?1) INSERT INTO events (stream_id, stream_version, event_id, \
                         event_type, event_version, payload, recorded_at) \
                         SELECT 'fill-' || (n / 10), n % 10 + 1, lower(hex(randomblob(16))), \
                         'RefreshLeased', 1, ?2, 0 FROM g",
                        rusqlite::params![count, sample],
                    )
                    .unwrap();
                    Ok(())
                })
                .await
                .unwrap();
        }
    }
}

async fn read_all(store: Arc<dyn EventStore>) -> (u64, f64) {
    let start = Instant::now();
    let batch = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut reader = LogReader::new(store, Position::START, batch);
    let mut count = 0u64;
    loop {
        let t = Instant::now();
        let batch = reader.next_batch().await.unwrap();
        if std::env::var("BENCH_DEBUG").is_ok() {
            eprintln!("batch {} in {:?}", batch.len(), t.elapsed());
        }
        if batch.is_empty() {
            break;
        }
        count += batch.len() as u64;
    }
    (count, count as f64 / start.elapsed().as_secs_f64())
}

async fn bench_backend(name: &str, backend: Backend) {
    create_bare_table(&backend).await;
    // Warm the pool and the statement caches.
    store_appends(&backend, 16, "warm").await;

    let mut rows = Vec::new();
    for writers in [1, 16] {
        let store = store_appends(&backend, writers, &format!("s{writers}")).await;
        let bare = bare_inserts(&backend, writers, &format!("b{writers}")).await;
        rows.push((writers, store, bare));
    }
    for (writers, store, bare) in rows {
        println!(
            "{name:<10} {writers:>2} writer(s)  store append {store:>9.0}/s   bare INSERT \
             {bare:>9.0}/s   ratio {:>5.1}%",
            store / bare * 100.0
        );
    }
    fill(&backend, 200_000).await;
    if let (Backend::Postgres(store), true) = (&backend, std::env::var("BENCH_DEBUG").is_ok()) {
        let client = store.pool().get().await.unwrap();
        for row in client.query("EXPLAIN ANALYZE SELECT global_position, transaction_id::text, stream_id, stream_version, event_id, event_type, event_version, payload, metadata, recorded_at FROM events WHERE (transaction_id, global_position) > ('0'::text::xid8, 0) AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY events.transaction_id, events.global_position LIMIT 1000", &[]).await.unwrap() {
            eprintln!("{}", row.get::<_, String>(0));
        }
    }
    let (count, rate) = read_all(backend.event_store()).await;
    println!("{name:<10} read-all     {count} events at {rate:>9.0} events/s");
}

#[tokio::main]
async fn main() {
    let options = StoreOptions {
        pool_size: 20,
        ..StoreOptions::default()
    };
    println!(
        "phase length {:?}; single-event appends with an expected version",
        seconds()
    );
    let pg = TestDatabase::postgres().await;
    bench_backend("postgres", pg.open_with(&options).await).await;
    let sqlite = TestDatabase::sqlite();
    bench_backend("sqlite", sqlite.open_with(&options).await).await;
}
