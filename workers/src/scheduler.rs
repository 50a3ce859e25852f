//! The proactive refresh scheduler: on a cron schedule, refreshes the connections whose access
//! token expires within a window (wider than the read margin, so reads rarely wait for a
//! provider) and keeps idle refresh tokens alive by refreshing connections not renewed for a
//! configurable age. Permanently failed connections are skipped; transiently failed ones are
//! retried once their backoff has passed.
//!
//! It refreshes only through the [`RefreshService`], whose lease guarantees that several
//! schedulers (and readers) on one database never refresh one refresh-token generation twice: a
//! connection another scheduler just refreshed is no longer due and is answered without calling
//! the provider. Due connections come from the `connections` read model, so a tick sees what the
//! projection runner has caught up to; the refresh service itself works on the event stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use projections::ReadModels;

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
}

/// Upper bounds, in seconds, of the tick duration histogram's buckets.
pub const TICK_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Why a tick could not run.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    /// The due connections could not be listed.
    #[error("cannot list the connections due for refresh: {0}")]
    Query(#[from] projections::ProjectionError),
}

/// The scheduler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Scheduler {
    refresh: RefreshService,
    read_models: ReadModels,
    window: Duration,
    idle_after: Duration,
    concurrency: usize,
    limit: usize,
    counters: Arc<SchedulerCounters>,
}

impl Scheduler {
    /// A scheduler refreshing through `refresh` the connections of `read_models` expiring within
    /// `window` or not renewed for `idle_after`, `concurrency` at a time (at least one).
    pub fn new(
        refresh: RefreshService,
        read_models: ReadModels,
        window: Duration,
        idle_after: Duration,
        concurrency: usize,
    ) -> Self {
        Self {
            refresh,
            read_models,
            window,
            idle_after,
            concurrency: concurrency.max(1),
            limit: TICK_LIMIT,
            counters: Arc::new(SchedulerCounters::default()),
        }
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

    /// The bounds of a tick at `now`.
    fn due_at(&self, now: DateTime<Utc>) -> ScheduledDue {
        let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        ScheduledDue {
            expiring_before: now
                .checked_add_signed(span(self.window))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            idle_before: now
                .checked_sub_signed(span(self.idle_after))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// One tick at `now`: refreshes the connections due then, `concurrency` at a time.
    #[tracing::instrument(name = "scheduler.tick", skip_all)]
    pub async fn tick_once(&self, now: DateTime<Utc>) -> Result<TickReport, TickError> {
        let started = Instant::now();
        let started_at = Utc::now();
        let due = self.due_at(now);
        let connections = match projections::queries::due_for_refresh(
            &self.read_models,
            due.expiring_before,
            due.idle_before,
            self.limit,
        )
        .await
        {
            Ok(connections) => connections,
            Err(e) => {
                self.counters.ticks.fetch_add(1, Ordering::Relaxed);
                self.counters.tick_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let mut report = TickReport {
            due: connections.len(),
            ..TickReport::default()
        };
        let mut outcomes = futures_util::stream::iter(connections)
            .map(|key| async move {
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
