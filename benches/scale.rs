//! Scale benchmark, in two parts.
//!
//! **Storage, rebuild, start-up** (on PostgreSQL, the real `grantline serve` binary):
//! `BENCH_DB_SIZE` connections (default 20,000; empty or 0 to skip) with GitHub-sized tokens
//! (40- and 80-character access and refresh tokens), the first 2,000 imported through
//! `POST /connection` 32 at a time and the rest through `grantline import FILE`: both import
//! rates, the bytes per connection (database size before and after, and
//! per table with its indexes), the bytes per refresh cycle (2,000 forced refreshes against the
//! in-process fake provider), the start-up time on the filled database, and the rebuild rate of
//! the connections read model (`grantline projections rebuild connections`); then
//! `BENCH_REFRESH_ROUNDS` (default 10) more rounds of forced refreshes of the same 2,000
//! connections, and the rebuild rate of that log of refresh cycles. With `BENCH_BASELINE_BIN`
//! (a release build of an earlier commit) the same part runs first with that binary, on a
//! database of its own, so that a change's before and after come from one run.
//!
//! **The simulated day** (`BENCH_SIZE`, default 1,000,000; 0 to skip):
//!
//! A virtual 24 hours for `BENCH_SIZE` connections (default 1,000,000) with hourly tokens, of
//! which `BENCH_READ_SHARE` (default 5%) are read during the day, `BENCH_READS_PER_DAY` times
//! each (default 24) at uniformly random times; the same connections were in use the day
//! before. Three policies run over the same connections and reads, with a tick every virtual
//! minute:
//!
//! - **grantline**: the real [`RefreshPolicy`] at its defaults (window 20 min, in use = read
//!   within 24 h, keep-alive after 7 days for a provider that documents no refresh-token
//!   lifetime, 10,000 connections per tick), its query built by the scheduler's own
//!   [`RefreshPolicy::query_at`] and evaluated by [`DueQuery::reason`] (what the store's SQL
//!   selects); reads refresh within the 15-minute margin. Again with the earlier 30-minute
//!   window, with 17 minutes (as late as the margin and a tick allow), and with a 5-minute
//!   margin (`GRANTLINE_REFRESH_MARGIN=5m`) and a 7-minute window;
//! - **every expiring token** (the scheduler before demand-aware refresh): every refreshable
//!   connection expiring within 30 minutes, soonest first, 10,000 per tick, plus the 7-day
//!   keep-alive; reads within the margin;
//! - **Nango's policy**: refresh on read within a 15-minute margin, and a keep-alive of every
//!   connection not refreshed for a day (its cron; modelled as running every minute).
//!
//! Reported per policy: provider token calls, events appended (a refresh cycle is two: the lease
//! and its outcome; reads append none), and the reads of in-use connections that had to wait
//! for a provider. Initial state: tokens issued at a uniformly random time in the last hour,
//! keep-alive ages spread uniformly over the last 7 days (1 day for Nango's), and each in-use
//! connection last read at a random time in the 24 hours before.
//!
//! `cargo bench --bench scale` (`BENCH_DB_SIZE`, `BENCH_REFRESH_ROUNDS`, `BENCH_SIZE`,
//! `BENCH_READ_SHARE`, `BENCH_READS_PER_DAY`, `BENCH_SEED`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake_service;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use projections::queries::{DueFacts, DueQuery, DueReason};
use support::setting;
use workers::scheduler::{RefreshPolicy, TICK_LIMIT};

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// Token lifetime.
const TOKEN: i64 = HOUR;
/// The read margin (GRANTLINE_REFRESH_MARGIN's default, Nango's REFRESH_MARGIN).
const MARGIN: i64 = 15 * MINUTE;
/// The provider every simulated connection belongs to (one without a documented lifetime).
const PROVIDER: &str = "github";

/// One connection, times in virtual seconds.
#[derive(Clone, Copy)]
struct Conn {
    expires_at: i64,
    renewed_at: i64,
    last_read_at: Option<i64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// With the scheduler's window and the read margin, in minutes.
    Grantline(i64, i64),
    EveryExpiring,
    Nango,
}

#[derive(Default)]
struct Tally {
    provider_calls: u64,
    scheduled: u64,
    on_read: u64,
    keep_alive: u64,
    events: u64,
    reads: u64,
    reads_waited: u64,
    tokens_expired_at_read: u64,
}

fn at(origin: DateTime<Utc>, t: i64) -> DateTime<Utc> {
    origin + chrono::Duration::seconds(t)
}

#[tokio::main]
async fn main() {
    let db_size: usize = setting("BENCH_DB_SIZE", 20_000);
    if db_size > 0 {
        if let Some(baseline) = support::baseline() {
            println!("Baseline: {}", baseline.display());
            storage(db_size, &baseline).await;
            println!("This build:");
        }
        storage(db_size, &support::grantline()).await;
    }
    let size: usize = setting("BENCH_SIZE", 1_000_000);
    if size > 0 {
        simulated_day(size);
    }
}

/// The database's size and each table's (with its indexes), in bytes.
async fn sizes(client: &tokio_postgres::Client) -> (i64, Vec<(String, i64)>) {
    let total: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let tables = client
        .query(
            "SELECT c.relname::text, pg_total_relation_size(c.oid) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (total, tables)
}

/// Prints each table's growth from `before` to `after`, per one of `count` things (`per`).
fn growth(before: &[(String, i64)], after: &[(String, i64)], count: usize, per: &str) {
    for (table, size) in after {
        let was = before
            .iter()
            .find(|(t, _)| t == table)
            .map_or(0, |(_, s)| *s);
        if size - was != 0 {
            println!(
                "    {table:<24} {:>8.0} bytes per {per}",
                (size - was) as f64 / count as f64
            );
        }
    }
}

/// The storage part with the `grantline` binary at `binary`.
async fn storage(n: usize, binary: &std::path::Path) {
    use futures_util::StreamExt;
    let mut setup = fake_service::Setup::new().await;
    setup.binary = binary.to_owned();
    let client = reqwest::Client::new();
    let server = setup.start(&["--roles", "api,projections"], "warn,grantline=info");
    setup.create_integration(&client, &server.base).await;
    let pg = setup.db.postgres_client().await;
    pg.batch_execute("CHECKPOINT").await.unwrap();
    let (before, tables_before) = sizes(&pg).await;
    let alphabet: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').collect();
    let token = |rng: &mut fastrand::Rng, prefix: &str, len: usize| {
        let mut t = prefix.to_owned();
        t.extend((prefix.len()..len).map(|_| alphabet[rng.usize(..alphabet.len())]));
        t
    };
    let mut rng = fastrand::Rng::with_seed(3);
    let tokens: Vec<(String, String)> = (0..n)
        .map(|_| (token(&mut rng, "gho_", 40), token(&mut rng, "ghr_", 80)))
        .collect();
    // The first ones through the API, the rest through `grantline import`.
    let through_api = n.min(2000);
    let started = Instant::now();
    futures_util::stream::iter(tokens.iter().take(through_api).enumerate())
        .map(|(i, (access, refresh))| {
            let (setup, client, base) = (&setup, &client, &server.base);
            async move {
                setup
                    .import(client, base, &format!("c{i:07}"), (access, refresh), 3600)
                    .await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let api_secs = started.elapsed().as_secs_f64();
    let expires_at = chrono::Utc::now().timestamp() + 3600;
    let file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut out = std::io::BufWriter::new(file.as_file());
        for (i, (access, refresh)) in tokens.iter().enumerate().skip(through_api) {
            let line = serde_json::json!({
                "provider_config_key": fake_service::KEY, "connection_id": format!("c{i:07}"),
                "access_token": access, "refresh_token": refresh, "expires_at": expires_at,
            });
            writeln!(out, "{line}").unwrap();
        }
    }
    let started = Instant::now();
    let output = std::process::Command::new(&setup.binary)
        .arg("import")
        .arg(file.path())
        .env("GRANTLINE_DATABASE_URL", setup.db.url())
        .env("GRANTLINE_ENCRYPTION_KEY", &setup.key)
        .output()
        .unwrap();
    let bulk_secs = started.elapsed().as_secs_f64();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    support::caught_up(&client, &server.base, None).await;
    pg.batch_execute("VACUUM ANALYZE").await.unwrap();
    let (after, tables_after) = sizes(&pg).await;
    println!(
        "Storage: {through_api} connections imported through POST /connection (32 at a time) in \
         {api_secs:.1} s: {:.0} connections/s",
        through_api as f64 / api_secs
    );
    let bulk = n - through_api;
    println!(
        "  {bulk} through `grantline import FILE` in {bulk_secs:.1} s, the whole command (check, \
         write, read models): {:.0} connections/s; it reports:",
        bulk as f64 / bulk_secs
    );
    for line in report.lines() {
        println!("    {line}");
    }
    println!(
        "  database {:.1} MB -> {:.1} MB: {:.0} bytes per connection, indexes included; by table:",
        before as f64 / 1e6,
        after as f64 / 1e6,
        (after - before) as f64 / n as f64
    );
    growth(&tables_before, &tables_after, n, "connection");

    // Refresh cycles: a forced refresh of some of them, once each.
    let cycles = n.min(2000);
    let (before, tables_before) = (after, tables_after);
    force_refreshes(&client, &server.base, cycles).await;
    support::caught_up(&client, &server.base, None).await;
    pg.batch_execute("VACUUM ANALYZE").await.unwrap();
    let (after, tables_after) = sizes(&pg).await;
    println!(
        "  {cycles} refresh cycles (lease + refreshed, the fake provider's token sizes): {:.0} bytes \
         per cycle; by table:",
        (after - before) as f64 / cycles as f64
    );
    growth(&tables_before, &tables_after, cycles, "cycle");
    drop(server);

    // Start-up on the filled database, then a rebuild.
    let started = Instant::now();
    let server = setup.start(&["--roles", "api,projections"], "warn,grantline=info");
    let startup = started.elapsed();
    let health = client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap()
        .status();
    println!(
        "  start-up on the filled database: listening after {:.2} s (health {health})",
        startup.as_secs_f64()
    );
    drop(server);
    rebuild(&setup, &pg, "").await;

    // A log of refresh cycles: the same connections refreshed round after round.
    let rounds: usize = setting("BENCH_REFRESH_ROUNDS", 10);
    if rounds > 0 {
        let server = setup.start(&["--roles", "api,projections"], "warn,grantline=info");
        let started = Instant::now();
        for _ in 0..rounds {
            force_refreshes(&client, &server.base, cycles).await;
        }
        let took = started.elapsed().as_secs_f64();
        support::caught_up(&client, &server.base, None).await;
        drop(server);
        println!(
            "  {rounds} more rounds of {cycles} forced refreshes in {took:.1} s ({:.0}/s)",
            (rounds * cycles) as f64 / took
        );
        rebuild(&setup, &pg, " after them").await;
    }
}

/// Forces a refresh of connections `c0000000` to `c{count - 1}`, 16 at a time.
async fn force_refreshes(client: &reqwest::Client, base: &str, count: usize) {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let response = client
                .get(format!(
                    "{base}/connection/c{i:07}?provider_config_key={}&force_refresh=true",
                    fake_service::KEY
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Rebuilds the connections read model with `grantline projections rebuild connections` and
/// prints the rate.
async fn rebuild(setup: &fake_service::Setup, pg: &tokio_postgres::Client, when: &str) {
    let started = Instant::now();
    let output = std::process::Command::new(&setup.binary)
        .args(["projections", "rebuild", "connections"])
        .env("GRANTLINE_DATABASE_URL", setup.db.url())
        .env("GRANTLINE_ENCRYPTION_KEY", &setup.key)
        .output()
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{output:?}");
    let events: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "  rebuild of the connections read model{when}: {events} events in {took:.1} s (process \
         included): {:.0} events/s\n",
        events as f64 / took
    );
}

fn simulated_day(size: usize) {
    let share: f64 = setting("BENCH_READ_SHARE", 0.05);
    let reads_per_day: usize = setting("BENCH_READS_PER_DAY", 24);
    let seed: u64 = setting("BENCH_SEED", 7);

    let mut rng = fastrand::Rng::with_seed(seed);
    let in_use = ((size as f64) * share).round() as usize;
    // The connections, and the day's reads: (time, connection), in time order.
    let initial: Vec<Conn> = (0..size)
        .map(|i| Conn {
            expires_at: rng.i64(0..TOKEN),
            renewed_at: -rng.i64(0..7 * DAY),
            last_read_at: (i < in_use).then(|| -rng.i64(1..DAY)),
        })
        .collect();
    let mut reads: Vec<(i64, usize)> = (0..in_use)
        .flat_map(|i| (0..reads_per_day).map(move |_| i))
        .map(|i| (rng.i64(0..DAY), i))
        .collect();
    reads.sort_unstable();

    println!(
        "Simulated day: {size} connections, hourly tokens, {in_use} ({:.1}%) read {reads_per_day} \
         times each during the day ({} reads); a tick every minute; seed {seed}",
        share * 100.0,
        reads.len()
    );
    println!(
        "{:<26} {:>14} {:>12} {:>10} {:>12} {:>14} {:>16} {:>9}",
        "policy",
        "provider calls",
        "scheduled",
        "on read",
        "keep-alive",
        "events/day",
        "reads waited",
        "took"
    );
    for (name, policy) in [
        ("grantline (window 20 min)", Policy::Grantline(20, 15)),
        ("grantline, window 30 min", Policy::Grantline(30, 15)),
        ("grantline, window 17 min", Policy::Grantline(17, 15)),
        ("grantline, margin 5, w. 7", Policy::Grantline(7, 5)),
        ("every expiring token", Policy::EveryExpiring),
        ("Nango (read + daily)", Policy::Nango),
    ] {
        let started = Instant::now();
        let tally = simulate(policy, initial.clone(), &reads);
        println!(
            "{name:<26} {:>14} {:>12} {:>10} {:>12} {:>14} {:>9} ({:.2}%) {:>7.1} s",
            tally.provider_calls,
            tally.scheduled,
            tally.on_read,
            tally.keep_alive,
            tally.events,
            tally.reads_waited,
            tally.reads_waited as f64 * 100.0 / tally.reads.max(1) as f64,
            started.elapsed().as_secs_f64(),
        );
        if tally.tokens_expired_at_read > 0 {
            println!(
                "  of the waiting reads, {} found the token already expired",
                tally.tokens_expired_at_read
            );
        }
    }
}

fn simulate(policy: Policy, mut conns: Vec<Conn>, reads: &[(i64, usize)]) -> Tally {
    let origin = Utc::now();
    let (window, margin) = match policy {
        Policy::Grantline(window, margin) => (window, margin * MINUTE),
        _ => (20, MARGIN),
    };
    let grantline = RefreshPolicy {
        window: Duration::from_secs(window.unsigned_abs() * 60),
        active_for: Duration::from_secs(24 * 3600),
        idle_after: Duration::from_secs(7 * 24 * 3600),
        keep_alive: BTreeMap::new(),
        budget: None,
    };
    if policy == Policy::Nango {
        // Nango's keep-alive looks back one day: spread the last refreshes over it.
        let mut rng = fastrand::Rng::with_seed(11);
        for conn in &mut conns {
            conn.renewed_at = conn.renewed_at.max(-rng.i64(0..DAY));
        }
    }
    let mut tally = Tally::default();
    let refresh = |conn: &mut Conn, now: i64, tally: &mut Tally| {
        conn.expires_at = now + TOKEN;
        conn.renewed_at = now;
        tally.provider_calls += 1;
        tally.events += 2;
    };
    let mut next_read = 0;
    let mut due: Vec<(i64, usize, bool)> = Vec::new();
    for minute in 0..(DAY / MINUTE) {
        let now = minute * MINUTE;
        // The reads of this minute, each at its own second.
        while next_read < reads.len() && reads[next_read].0 < now + MINUTE {
            let (t, i) = reads[next_read];
            next_read += 1;
            let conn = &mut conns[i];
            tally.reads += 1;
            if conn.expires_at - t <= margin {
                tally.reads_waited += 1;
                if conn.expires_at <= t {
                    tally.tokens_expired_at_read += 1;
                }
                tally.on_read += 1;
                refresh(conn, t, &mut tally);
            }
            conn.last_read_at = Some(t);
        }
        // The tick at the end of the minute.
        let now = now + MINUTE;
        due.clear();
        match policy {
            Policy::Grantline(..) => {
                let query: DueQuery = grantline.query_at(at(origin, now));
                for (i, conn) in conns.iter().enumerate() {
                    let facts = DueFacts {
                        provider: PROVIDER,
                        expires_at: Some(at(origin, conn.expires_at)),
                        renewed_at: at(origin, conn.renewed_at),
                        last_read_at: conn.last_read_at.map(|t| at(origin, t)),
                    };
                    if let Some(reason) = query.reason(&facts) {
                        // The store lists the expiring ones first, soonest first, then the
                        // keep-alives, oldest first.
                        let (rank, key) = match reason {
                            DueReason::Expiring => (0, conn.expires_at),
                            DueReason::KeepAlive => (1, conn.renewed_at),
                        };
                        due.push((rank * (1 << 40) + key, i, reason == DueReason::KeepAlive));
                    }
                }
            }
            Policy::EveryExpiring => {
                for (i, conn) in conns.iter().enumerate() {
                    if conn.expires_at < now + 30 * MINUTE {
                        due.push((conn.expires_at, i, false));
                    } else if conn.renewed_at < now - 7 * DAY {
                        due.push((1 << 40, i, true));
                    }
                }
            }
            Policy::Nango => {
                for (i, conn) in conns.iter().enumerate() {
                    if conn.renewed_at < now - DAY {
                        due.push((conn.renewed_at, i, true));
                    }
                }
            }
        }
        let limit = if policy == Policy::Nango {
            usize::MAX
        } else {
            TICK_LIMIT
        };
        // Which ones a tick takes (all refreshed at the tick's time: their order is moot).
        if due.len() > limit {
            due.select_nth_unstable(limit);
        }
        for &(_, i, keep_alive) in due.iter().take(limit) {
            tally.scheduled += 1;
            if keep_alive {
                tally.keep_alive += 1;
            }
            refresh(&mut conns[i], now, &mut tally);
        }
    }
    tally
}
