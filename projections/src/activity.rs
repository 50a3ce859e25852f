//! Which connections are in use: reads noted in memory and written in batches to
//! `connection_reads`, which the scheduler joins to find the connections worth refreshing ahead
//! of expiry (README, "Refresh policy").
//!
//! A read is not a fact about a credential, so it is never an event: the log grows with what
//! happens to credentials, not with traffic. Noting is cheap on the hot path: the replica lets
//! through at most one note per cached connection per minute ([`ConnectionCache::first_read`]),
//! and a note is a map insert under a short lock. The pending map is bounded; past its bound a
//! note is dropped and counted (the connection is then refreshed on read, as any idle one).
//! Several instances write the same table; a stream's time only moves forward, and only by more
//! than a [`STEPS_PER_WINDOW`]th of the activity window (10 minutes of 24 hours): whether a
//! connection is in use then ends at most that much early, and a connection read all day costs
//! one row write per step, not one per minute and instance.
//!
//! [`ConnectionCache::first_read`]: crate::cache::ConnectionCache::first_read

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{StreamId, answered_within};

use crate::ProjectionError;
use crate::store::ReadModels;

/// Notes waiting for a flush, at most.
pub const PENDING_LIMIT: usize = 200_000;

/// How many steps of a stored read time make up the activity window.
pub const STEPS_PER_WINDOW: u32 = 144;

/// The longest step, whatever the window.
const LONGEST_STEP: Duration = Duration::from_secs(24 * 3600);

/// How long writing the reads (or forgetting old ones) may take: a database that stopped
/// answering on an open connection (a hung pooler) must not stop the flushes for good.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

/// Reads noted and not yet written, and what became of them.
#[derive(Debug, Default)]
pub struct ReadActivity {
    pending: Mutex<HashMap<StreamId, DateTime<Utc>>>,
    /// A stored read time is moved only by more than this.
    step: Duration,
    noted: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    flush_errors: AtomicU64,
}

/// Counters of [`ReadActivity`], for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivityStats {
    /// Reads noted (at most one per connection per minute and instance).
    pub noted: u64,
    /// Notes written to the database.
    pub written: u64,
    /// Notes dropped because the pending map was full.
    pub dropped: u64,
    /// Flushes that failed (their notes are kept for the next one, within the bound).
    pub flush_errors: u64,
    /// Notes waiting now.
    pub pending: u64,
}

impl ReadActivity {
    /// Notes for an activity window of `window` (`GRANTLINE_REFRESH_ACTIVE_FOR`).
    pub fn new(window: Duration) -> Self {
        Self {
            step: (window / STEPS_PER_WINDOW).min(LONGEST_STEP),
            ..Self::default()
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, DateTime<Utc>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that `stream_id` was read `at`.
    pub fn note(&self, stream_id: &StreamId, at: DateTime<Utc>) {
        self.noted.fetch_add(1, Ordering::Relaxed);
        self.keep(stream_id, at);
    }

    /// Keeps `stream_id`'s latest read time, if it is pending or the map has room; else counts
    /// it dropped.
    fn keep(&self, stream_id: &StreamId, at: DateTime<Utc>) {
        let mut pending = self.pending();
        if let Some(time) = pending.get_mut(stream_id) {
            *time = (*time).max(at);
        } else if pending.len() < PENDING_LIMIT {
            pending.insert(stream_id.clone(), at);
        } else {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what was noted; on failure the notes go back (those that still fit).
    pub async fn flush_once(&self, read_models: &ReadModels) -> Result<usize, ProjectionError> {
        let taken: Vec<(StreamId, DateTime<Utc>)> = self.pending().drain().collect();
        if taken.is_empty() {
            return Ok(0);
        }
        let count = taken.len();
        let rows = taken
            .iter()
            .map(|(stream_id, at)| (stream_id.as_str().to_owned(), *at))
            .collect();
        let written =
            answered_within(WRITE_LIMIT, read_models.store().note_reads(rows, self.step)).await;
        match written {
            Ok(()) => {
                self.written.fetch_add(count as u64, Ordering::Relaxed);
                Ok(count)
            }
            Err(e) => {
                self.flush_errors.fetch_add(1, Ordering::Relaxed);
                // Back in the map (not counted as new reads).
                for (stream_id, at) in &taken {
                    self.keep(stream_id, *at);
                }
                Err(e)
            }
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> ActivityStats {
        ActivityStats {
            noted: self.noted.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            flush_errors: self.flush_errors.load(Ordering::Relaxed),
            pending: self.pending().len() as u64,
        }
    }

    /// Flushes every `every` until `shutdown`, and once more then; forgets reads older than
    /// `keep` once an hour (the scheduler never looks further back).
    pub async fn run(
        &self,
        read_models: &ReadModels,
        every: Duration,
        keep: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.flush_once(read_models).await {
                tracing::warn!(error.message = %e, "cannot record the connections read");
            }
            if last_prune.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) {
                last_prune = Some(tokio::time::Instant::now());
                let before = chrono::Duration::from_std(keep)
                    .ok()
                    .and_then(|keep| Utc::now().checked_sub_signed(keep));
                let forget =
                    |before| answered_within(WRITE_LIMIT, read_models.store().forget_reads(before));
                if let Some(before) = before
                    && let Err(e) = forget(before).await
                {
                    tracing::warn!(error.message = %e, "cannot prune old reads");
                }
            }
        }
        if let Err(e) = self.flush_once(read_models).await {
            tracing::warn!(error.message = %e, "cannot record the connections read at shutdown");
        }
    }
}
