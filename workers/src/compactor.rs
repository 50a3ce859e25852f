//! The compactor: bounds the history by removing what [`domain::compaction::plan`] allows once it
//! is past retention (routine refresh cycles after `GRANTLINE_HISTORY_RETENTION`; superseded
//! failures, lapsed leases and metadata changes after `GRANTLINE_HISTORY_LIFECYCLE_RETENTION`,
//! when set).
//!
//! A pass follows the log from the compactor's cursor through the events recorded before the
//! cutoff, a batch at a time; for each connection stream a batch touches, it plans from the
//! whole stream and hands the plans and the new cursor to the store in one transaction. A stream
//! is looked at again whenever more of its events pass the cursor, so what a later event
//! supersedes goes then. A webhook target that is behind (see [`webhooks::slowest_target`])
//! holds the pass back at its checkpoint: nothing at or after it goes, in the log or in a
//! stream, until the target has delivered it. Two compactors (instances with the role) never
//! remove twice: the store moves the cursor only from where the pass found it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use domain::compaction::{self, Cutoffs};
use domain::connection;
use domain::store::{Backend, RecordedEvent, StoreError, StreamCompaction, answered_within};

use crate::webhooks;
use futures_util::{StreamExt, TryStreamExt};

/// How long routine cycles and lifecycle events stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Routine refresh cycles (a lease and its successful refresh).
    pub routine: Duration,
    /// Superseded failures, lapsed leases and metadata changes; `None`: forever.
    pub lifecycle: Option<Duration>,
}

impl Retention {
    /// The default: routine cycles for 90 days, lifecycle events forever.
    pub const DEFAULT: Self = Self {
        routine: Duration::from_secs(90 * 24 * 3600),
        lifecycle: None,
    };

    /// What is old enough to go at `now`.
    pub fn cutoffs(&self, now: DateTime<Utc>) -> Cutoffs {
        let before = |age: Duration| {
            TimeDelta::from_std(age)
                .ok()
                .and_then(|age| now.checked_sub_signed(age))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        Cutoffs {
            routine: before(self.routine),
            lifecycle: self.lifecycle.map(before),
        }
    }
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Events the pass looked at (those past the cutoff).
    pub events_read: u64,
    /// Streams it removed events from.
    pub streams: u64,
    pub routine_cycles: u64,
    pub lifecycle_events: u64,
    pub events_removed: u64,
    /// The pass stopped at the checkpoint of a webhook target that is behind (what comes after
    /// it stays until the target has delivered it).
    pub held_back: bool,
}

/// Totals over the compactor's passes, for `/metrics`.
#[derive(Debug, Default)]
pub struct CompactorCounters {
    pub passes: AtomicU64,
    pub errors: AtomicU64,
    pub events_removed: AtomicU64,
    pub routine_cycles: AtomicU64,
    pub lifecycle_events: AtomicU64,
    /// When the last pass finished, UNIX seconds (0: none yet).
    pub last_pass_at: AtomicU64,
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another compactor moved the cursor meanwhile; what this pass did so far stays.
    #[error("another compactor is running; this pass stopped")]
    Busy,
}

/// How many events a pass reads at a time.
const BATCH: usize = 1000;

/// How many streams are read at once while planning.
const CONCURRENT_STREAMS: usize = 8;

/// How long one database call of a pass may take: a database that stopped answering on an open
/// connection (a hung pooler) must not stop compaction for good. (A batch's removal is one
/// transaction: given up, it is rolled back.)
const CALL_LIMIT: Duration = Duration::from_secs(300);

async fn bounded<T>(work: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    answered_within(CALL_LIMIT, work).await
}

/// Runs compaction passes.
#[derive(Clone, Debug)]
pub struct Compactor {
    backend: Backend,
    retention: Retention,
    counters: Arc<CompactorCounters>,
}

impl Compactor {
    pub fn new(backend: Backend, retention: Retention) -> Self {
        Self {
            backend,
            retention,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> &CompactorCounters {
        &self.counters
    }

    /// One pass through what is past retention at `now`, reporting after every batch.
    #[tracing::instrument(name = "compactor.pass", skip_all)]
    pub async fn pass(
        &self,
        now: DateTime<Utc>,
        mut progress: impl FnMut(&PassReport),
    ) -> Result<PassReport, CompactionError> {
        let cutoffs = self.retention.cutoffs(now);
        // Anything recorded before the later cutoff may be removable.
        let scan_before = cutoffs
            .lifecycle
            .map_or(cutoffs.routine, |l| l.max(cutoffs.routine));
        let mut report = PassReport::default();
        // A webhook target still has to map what comes after its checkpoint, each event from
        // the state its stream's earlier events fold to: nothing from there on may go.
        let slowest = bounded(webhooks::slowest_target(&self.backend)).await?;
        let horizon = slowest.as_ref().map(|(position, _)| *position);
        let passed = |e: &RecordedEvent| horizon.is_none_or(|h| e.position <= h);
        let mut cursor = bounded(self.backend.compaction().compaction_cursor()).await?;
        loop {
            let batch = bounded(self.backend.events().read_all(cursor, BATCH)).await?;
            let old: Vec<_> = batch
                .iter()
                .take_while(|e| e.recorded_at < scan_before && passed(e))
                .collect();
            if let Some(next) = batch.get(old.len())
                && next.recorded_at < scan_before
                && let Some((position, url)) = &slowest
            {
                report.held_back = true;
                tracing::warn!(
                    webhook.url = %url,
                    webhook.checkpoint = %position,
                    "compactor: a webhook target has not delivered the history past retention \
                     yet; it stays until the target has"
                );
            }
            let Some(last) = old.last() else {
                break;
            };
            let to = last.position;
            let streams: BTreeSet<_> = old
                .iter()
                .filter(|e| e.stream_id.category() == connection::CATEGORY)
                .map(|e| e.stream_id.clone())
                .collect();
            let plans: Vec<StreamCompaction> = futures_util::stream::iter(streams)
                .map(|stream| async move {
                    let events = bounded(self.backend.events().read_stream(&stream, 0)).await?;
                    let unpassed = events.iter().position(|e| !passed(e));
                    let events = &events[..unpassed.unwrap_or(events.len())];
                    Ok::<_, StoreError>(match compaction::plan(events, cutoffs) {
                        Ok(plan) => plan,
                        Err(unreadable) => {
                            tracing::warn!(
                                stream_id = %stream,
                                error.message = %unreadable,
                                "compactor: an event of the stream cannot be read; it is left whole"
                            );
                            None
                        }
                    })
                })
                .buffer_unordered(CONCURRENT_STREAMS)
                .try_filter_map(|plan| async move { Ok(plan) })
                .try_collect()
                .await?;
            let compacted = self.backend.compaction().compact(&plans, cursor, to, now);
            let removed = bounded(compacted).await?.ok_or(CompactionError::Busy)?;
            report.events_read += old.len() as u64;
            report.streams += plans.len() as u64;
            report.routine_cycles += plans.iter().map(|p| p.routine_cycles).sum::<u64>();
            report.lifecycle_events += plans.iter().map(|p| p.lifecycle_events).sum::<u64>();
            report.events_removed += removed;
            progress(&report);
            cursor = to;
            if old.len() < batch.len() || batch.len() < BATCH {
                break;
            }
        }
        self.count(&report);
        Ok(report)
    }

    /// Adds a finished pass to the counters.
    fn count(&self, report: &PassReport) {
        let c = &self.counters;
        c.passes.fetch_add(1, Ordering::Relaxed);
        c.events_removed
            .fetch_add(report.events_removed, Ordering::Relaxed);
        c.routine_cycles
            .fetch_add(report.routine_cycles, Ordering::Relaxed);
        c.lifecycle_events
            .fetch_add(report.lifecycle_events, Ordering::Relaxed);
        let now = u64::try_from(Utc::now().timestamp()).unwrap_or(0);
        c.last_pass_at.store(now, Ordering::Relaxed);
    }

    /// Runs a pass now and then every `interval` until `shutdown` completes; a failed pass is
    /// logged and tried again at the next interval.
    pub async fn run(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            match self.pass(Utc::now(), |_| {}).await {
                Ok(report) if report.events_removed > 0 => tracing::info!(
                    events_removed = report.events_removed,
                    routine_cycles = report.routine_cycles,
                    lifecycle_events = report.lifecycle_events,
                    streams = report.streams,
                    "compactor: history past retention removed"
                ),
                Ok(_) => {}
                Err(error) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error.message = %error, "compactor: the pass stopped");
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_are_the_retentions_before_now_and_never_overflow() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let cutoffs = Retention::DEFAULT.cutoffs(now);
        assert_eq!(cutoffs.routine, now - TimeDelta::days(90));
        assert_eq!(cutoffs.lifecycle, None);
        let forever = Retention {
            routine: Duration::MAX,
            lifecycle: Some(Duration::from_secs(3600)),
        };
        let cutoffs = forever.cutoffs(now);
        assert_eq!(cutoffs.routine, DateTime::<Utc>::MIN_UTC);
        assert_eq!(cutoffs.lifecycle, Some(now - TimeDelta::hours(1)));
    }
}
