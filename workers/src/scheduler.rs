//! The proactive refresh scheduler. On a cron schedule it refreshes, ahead of expiry, the
//! connections in use (read within `active_for`) whose access token expires within a window
//! wider than the read margin, so their reads rarely wait for a provider; connections nobody
//! reads are left to be refreshed on their next read. Separately it keeps refresh tokens alive:
//! a connection whose tokens were last issued longer ago than its provider's keep-alive age
//! (half the unused lifetime the provider documents, else `idle_after`) is refreshed once, read
//! or not. Permanently failed connections are skipped; transiently failed ones are retried once
//! their backoff has passed. Calls to each integration's provider are paced by a budget
//! (requests per second, with jitter), so a storm of due connections never trips its rate
//! limit. README, "Refresh policy".
//!
//! It refreshes only through the [`RefreshService`], whose lease guarantees that several
//! schedulers (and readers) on one database never refresh one refresh-token generation twice: a
//! connection another scheduler just refreshed is no longer due and is answered without calling
//! the provider. Due connections come from the `connections` read model and the recorded reads,
//! so a tick sees what the projection runner has caught up to; the refresh service itself works
//! on the event stream.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use projections::ReadModels;
use projections::queries::{DueQuery, DueReason};

use crate::refresh::{RefreshError, RefreshService, ScheduledDue};

/// The most connections one tick refreshes; the rest wait for the next tick.
pub const TICK_LIMIT: usize = 10_000;

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Connections the read model showed as due.
    pub due: usize,
    /// Refreshed by this tick.
    pub refreshed: usize,
    /// Whose refresh failed in this tick (permanently or transiently) or could not be tried.
    pub failed: usize,
    /// Not refreshed and not failed: refreshed by someone else meanwhile, deleted, waiting out a
    /// transient backoff, or blocked by an earlier permanent failure.
    pub skipped: usize,
}

/// Tick statistics, for `/metrics`.
#[derive(Debug, Default)]
pub struct SchedulerCounters {
    /// Ticks finished (including those that failed to list due connections).
    pub ticks: AtomicU64,
    /// Ticks that could not list the due connections.
    pub tick_errors: AtomicU64,
    /// Sums over all ticks of the [`TickReport`] fields.
    pub due: AtomicU64,
    pub refreshed: AtomicU64,
    pub failed: AtomicU64,
    pub skipped: AtomicU64,
    /// Sum of tick durations, in microseconds.
    pub tick_micros: AtomicU64,
    /// Completed ticks by duration: `tick_buckets[i]` counts the ticks that took at most
    /// [`TICK_BUCKETS`]`[i]` seconds and more than the bound before it; the last slot counts the
    /// rest (not cumulative).
    pub tick_buckets: [AtomicU64; TICK_BUCKETS.len() + 1],
    /// Duration of the last completed tick, in microseconds.
    pub last_tick_micros: AtomicU64,
    /// When the last tick finished, in seconds since the epoch (0: never).
    pub last_tick_unix: AtomicI64,
    /// Connections found due because they are in use and expiring, and for a keep-alive.
    pub due_expiring: AtomicU64,
    pub due_keep_alive: AtomicU64,
    /// Scheduled refreshes that waited for their integration's budget, and for how long in all
    /// (microseconds).
    pub budget_waits: AtomicU64,
    pub budget_wait_micros: AtomicU64,
}

/// Upper bounds, in seconds, of the tick duration histogram's buckets.
pub const TICK_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Why a tick could not run.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    /// The due connections could not be listed.
    #[error("cannot list the connections due for refresh: {0}")]
    Query(#[from] projections::ProjectionError),
    /// Listing them took longer than the scheduler's query limit (a database that stopped
    /// answering): given up, the next tick tries again.
    #[error("listing the connections due for refresh took longer than {0:?}; given up")]
    Unanswered(Duration),
}

/// Which connections the scheduler refreshes, and how fast.
#[derive(Clone, Debug)]
pub struct RefreshPolicy {
    /// Connections in use whose access token expires within this are refreshed.
    pub window: Duration,
    /// A connection read within this is in use.
    pub active_for: Duration,
    /// Keep-alive age of providers that document no refresh-token lifetime.
    pub idle_after: Duration,
    /// Keep-alive age per provider (template name) that documents one.
    pub keep_alive: BTreeMap<String, Duration>,
    /// Scheduled refreshes per second and integration (`None`: unpaced).
    pub budget: Option<NonZeroU32>,
}

impl RefreshPolicy {
    /// The keep-alive ages of `catalog`'s templates that document how long an unused refresh
    /// token lives: half of that.
    pub fn keep_alive_of(catalog: &domain::catalog::Catalog) -> BTreeMap<String, Duration> {
        catalog
            .templates()
            .filter_map(|template| {
                let days = template.refresh_token_idle_days?;
                Some((
                    template.name.clone(),
                    Duration::from_secs(u64::from(days) * 86_400 / 2),
                ))
            })
            .collect()
    }

    /// The query of a tick at `now`.
    pub fn query_at(&self, now: DateTime<Utc>) -> DueQuery {
        let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let before = |d: Duration| {
            now.checked_sub_signed(span(d))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        let mut groups: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        for (provider, age) in &self.keep_alive {
            groups.entry(*age).or_default().push(provider.clone());
        }
        DueQuery {
            expiring_before: now
                .checked_add_signed(span(self.window))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            read_since: before(self.active_for),
            keep_alive: groups
                .into_iter()
                .map(|(age, providers)| (providers, before(age)))
                .collect(),
            renewed_before: before(self.idle_after),
        }
    }
}

/// Paces scheduled refreshes per integration.
type Budget = governor::DefaultKeyedRateLimiter<String>;

/// The scheduler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Scheduler {
    refresh: RefreshService,
    read_models: ReadModels,
    policy: RefreshPolicy,
    budget: Option<Arc<Budget>>,
    concurrency: usize,
    limit: usize,
    query_limit: Duration,
    counters: Arc<SchedulerCounters>,
}

impl Scheduler {
    /// A scheduler refreshing through `refresh` the connections of `read_models` that `policy`
    /// finds due, `concurrency` at a time (at least one).
    pub fn new(
        refresh: RefreshService,
        read_models: ReadModels,
        policy: RefreshPolicy,
        concurrency: usize,
    ) -> Self {
        let budget = policy.budget.map(|rate| {
            Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(
                rate,
            )))
        });
        Self {
            refresh,
            read_models,
            policy,
            budget,
            concurrency: concurrency.max(1),
            limit: TICK_LIMIT,
            query_limit: Duration::from_secs(60),
            counters: Arc::new(SchedulerCounters::default()),
        }
    }

    /// How long listing the due connections may take before the tick gives up (at least 10 s;
    /// default a minute), so that a query the database never answers cannot stop the scheduler.
    pub fn with_query_limit(mut self, limit: Duration) -> Self {
        self.query_limit = limit.max(Duration::from_secs(10));
        self
    }

    /// At most `limit` connections per tick (at least one).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// The tick statistics.
    pub fn counters(&self) -> &SchedulerCounters {
        &self.counters
    }

    /// The policy.
    pub fn policy(&self) -> &RefreshPolicy {
        &self.policy
    }

    /// Waits for `integration`'s budget, plus a jitter of up to one interval, so that refreshes
    /// paced together do not reach the provider in lockstep.
    async fn pace(&self, integration: &str) {
        let (Some(budget), Some(rate)) = (&self.budget, self.policy.budget) else {
            return;
        };
        let started = Instant::now();
        let key = integration.to_owned();
        if budget.check_key(&key).is_err() {
            budget.until_key_ready(&key).await;
            let interval = Duration::from_secs(1) / rate.get();
            tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
            self.counters.budget_waits.fetch_add(1, Ordering::Relaxed);
            self.counters.budget_wait_micros.fetch_add(
                u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
    }

    /// One tick at `now`: refreshes the connections due then, `concurrency` at a time.
    #[tracing::instrument(name = "scheduler.tick", skip_all)]
    pub async fn tick_once(&self, now: DateTime<Utc>) -> Result<TickReport, TickError> {
        let started = Instant::now();
        let started_at = Utc::now();
        let query = self.policy.query_at(now);
        // Inside the lease, a connection is refreshed only if it is still due by these bounds
        // (the loosest keep-alive one): one someone refreshed meanwhile is not.
        let due = ScheduledDue {
            expiring_before: query.expiring_before,
            idle_before: query
                .keep_alive
                .iter()
                .map(|(_, before)| *before)
                .fold(query.renewed_before, DateTime::max),
        };
        let listed = tokio::time::timeout(
            self.query_limit,
            projections::queries::due_for_refresh(&self.read_models, &query, self.limit),
        )
        .await
        .map_err(|_| TickError::Unanswered(self.query_limit))
        .and_then(|listed| listed.map_err(TickError::from));
        let connections = match listed {
            Ok(connections) => connections,
            Err(e) => {
                self.counters.ticks.fetch_add(1, Ordering::Relaxed);
                self.counters.tick_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let keep_alive = connections
            .iter()
            .filter(|(_, reason)| *reason == DueReason::KeepAlive)
            .count();
        self.counters
            .due_keep_alive
            .fetch_add(keep_alive as u64, Ordering::Relaxed);
        self.counters
            .due_expiring
            .fetch_add((connections.len() - keep_alive) as u64, Ordering::Relaxed);
        let mut report = TickReport {
            due: connections.len(),
            ..TickReport::default()
        };
        let mut outcomes = futures_util::stream::iter(connections)
            .map(|(key, _)| async move {
                self.pace(key.provider_config_key()).await;
                let outcome = self.refresh.refresh_scheduled(&key, due).await;
                (key, outcome)
            })
            .buffer_unordered(self.concurrency);
        while let Some((key, outcome)) = outcomes.next().await {
            match outcome {
                Ok(fresh) if fresh.refreshed => report.refreshed += 1,
                Ok(_) | Err(RefreshError::NotFound | RefreshError::Deleted) => report.skipped += 1,
                Err(RefreshError::Permanent(failure)) if failure.failed_at < started_at => {
                    report.skipped += 1;
                }
                Err(RefreshError::Transient { failure, .. }) if failure.failed_at < started_at => {
                    report.skipped += 1;
                }
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(
                        provider_config_key = %key.provider_config_key(),
                        connection_id = %key.connection_id(),
                        error.message = %e,
                        "scheduled refresh failed"
                    );
                }
            }
        }
        let c = &self.counters;
        c.ticks.fetch_add(1, Ordering::Relaxed);
        c.due.fetch_add(report.due as u64, Ordering::Relaxed);
        c.refreshed
            .fetch_add(report.refreshed as u64, Ordering::Relaxed);
        c.failed.fetch_add(report.failed as u64, Ordering::Relaxed);
        c.skipped
            .fetch_add(report.skipped as u64, Ordering::Relaxed);
        let elapsed = started.elapsed();
        c.tick_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        c.last_tick_micros.store(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let bucket = TICK_BUCKETS
            .iter()
            .position(|bound| elapsed.as_secs_f64() <= *bound)
            .unwrap_or(TICK_BUCKETS.len());
        c.tick_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        c.last_tick_unix
            .store(Utc::now().timestamp(), Ordering::Relaxed);
        Ok(report)
    }

    /// Ticks at every time of `schedule` until `shutdown` completes. A tick in progress when
    /// `shutdown` completes is abandoned: its refreshes run on to their outcome in the refresh
    /// service, and an orphaned lease is retried after it expires.
    pub async fn run(&self, schedule: cron::Schedule, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let Some(next) = schedule.upcoming(Utc).next() else {
                tracing::warn!("the refresh schedule has no future time; the scheduler stops");
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
            let started = Instant::now();
            tokio::select! {
                () = &mut shutdown => return,
                result = self.tick_once(Utc::now()) => match result {
                    Ok(report) => tracing::info!(
                        due = report.due,
                        refreshed = report.refreshed,
                        failed = report.failed,
                        skipped = report.skipped,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "refresh tick"
                    ),
                    Err(e) => tracing::error!(error.message = %e, "refresh tick failed"),
                },
            }
        }
    }
}
