//! Scale benchmark. So far: the simulated day.
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
//!   window, and with 17 minutes (as late as the margin and a tick allow);
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
//! `cargo bench --bench scale` (`BENCH_SIZE`, `BENCH_READ_SHARE`, `BENCH_READS_PER_DAY`,
//! `BENCH_SEED`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
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
/// The read margin (GRANTLINE_REFRESH_MARGIN, Nango's REFRESH_MARGIN).
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
    /// With the scheduler's window in minutes.
    Grantline(i64),
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

fn main() {
    let size: usize = setting("BENCH_SIZE", 1_000_000);
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
        ("grantline (window 20 min)", Policy::Grantline(20)),
        ("grantline, window 30 min", Policy::Grantline(30)),
        ("grantline, window 17 min", Policy::Grantline(17)),
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
    let window = match policy {
        Policy::Grantline(minutes) => minutes,
        _ => 20,
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
            if conn.expires_at - t <= MARGIN {
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
            Policy::Grantline(_) => {
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
