//! The subscriber of one target: a step that claims the target's lease, reads a batch of the
//! log after its checkpoint and delivers the batch's webhooks in log order, and the loop that
//! runs the step until shutdown.
//!
//! The checkpoint moves past an event only once its webhook was answered 2xx (or it has none),
//! and only while this instance holds the lease: a lost lease ends the step as
//! [`WebhookStep::Busy`] before anything else is sent. A failed delivery holds back everything
//! after it until its retry is due and succeeds (head of line).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::connection::{self, Connection, ConnectionEvent};
use domain::event::DomainEvent;
use domain::store::{EventStore, RecordedEvent, StoreError, StreamId, answered_within};
use quick_cache::sync::Cache;
use url::Url;
use uuid::Uuid;

use super::delivery::Poster;
use super::mapping::{Webhook, webhook_for};
use super::store::{DeliveryState, Outgoing, Target, WebhookStore};
use super::{DeliveryStatus, TargetStatus, WebhookCounters, WebhookError, redact};

/// Events read per step.
const BATCH_SIZE: usize = 100;
/// Lag is counted up to this many events.
const LAG_CAP: usize = 10_000;
/// Streams whose state is kept in memory; past it, one stream at a time is evicted (S3-FIFO:
/// streams seen once go before those seen again), never the whole cache.
const CACHE_CAPACITY: usize = 10_000;
/// How often a subscriber whose target another instance holds looks again.
const BUSY_POLL: Duration = Duration::from_secs(2);
/// Delivered attempts are kept this long for operators, then pruned.
const DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The first and the longest pause after a database error.
const ERROR_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// What one step of a target did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookStep {
    /// Moved the checkpoint past this many events (delivered, or without a webhook).
    Passed(usize),
    /// Caught up: nothing to do.
    Idle,
    /// Another instance holds this target's lease.
    Busy,
    /// The delivery at the head failed; its next attempt is due at this time.
    Retrying(DateTime<Utc>),
}

/// The subscriber of one target.
#[derive(Clone)]
pub struct WebhookSubscriber {
    target: Target,
    url: Url,
    shown: String,
    store: Arc<dyn WebhookStore>,
    log: Arc<dyn EventStore>,
    poster: Poster,
    counters: Arc<WebhookCounters>,
    /// Connection states after the last event passed, by stream: `(stream version, state)`.
    /// Bounded by [`CACHE_CAPACITY`].
    states: Arc<Cache<StreamId, (u32, Connection)>>,
    /// Wakes the loop from a retry's backoff (an operator's "retry now").
    wake: Arc<tokio::sync::Notify>,
}

impl fmt::Debug for WebhookSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSubscriber")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// What became of one event's delivery in a step.
enum Delivery {
    Delivered,
    Retrying(DateTime<Utc>),
    LeaseLost,
}

impl WebhookSubscriber {
    pub(super) fn new(
        target: Target,
        url: &Url,
        store: Arc<dyn WebhookStore>,
        log: Arc<dyn EventStore>,
        poster: Poster,
        counters: Arc<WebhookCounters>,
    ) -> Self {
        Self {
            target,
            shown: redact(url),
            url: url.clone(),
            store,
            log,
            poster,
            counters,
            states: Arc::new(Cache::new(CACHE_CAPACITY)),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Makes the target's deliveries that wait for a retry due now, and wakes this instance's
    /// loop for the target; how many there were. ([`super::WebhookService::retry_now`] also
    /// wakes the loop of the instance that holds the target's lease.)
    pub async fn retry_now(&self) -> Result<u64, WebhookError> {
        let due = self.store.retry_now(&self.target).await?;
        self.wake();
        Ok(due)
    }

    /// Ends the loop's current wait (a retry's backoff, an idle wait) now.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The target's deliveries of the events `event_ids`, most recent attempt first.
    pub async fn deliveries_of(
        &self,
        event_ids: &[Uuid],
    ) -> Result<Vec<DeliveryStatus>, WebhookError> {
        Ok(self.store.deliveries_of(&self.target, event_ids).await?)
    }

    /// The key and lease of this subscriber's target.
    pub(super) fn target(&self) -> &Target {
        &self.target
    }

    /// The target's URL as operators see it.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Steps until `shutdown` completes: woken by new commits, polling otherwise, waiting out
    /// a failed delivery's backoff, backing off after database errors. An attempt in flight at
    /// shutdown is abandoned and made again by whoever next holds the target.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut listener = self.log.listener();
        let mut backoff = ERROR_BACKOFF.0;
        let mut pruned: Option<Instant> = None;
        loop {
            if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                let before = Utc::now()
                    - chrono::Duration::from_std(DELIVERY_RETENTION)
                        .unwrap_or(chrono::Duration::zero());
                if let Err(e) = self.bounded(self.store.prune(&self.target, before)).await {
                    tracing::warn!(webhook.url = %self.shown, error.message = %e, "webhook.prune failed");
                }
                pruned = Some(Instant::now());
            }
            let step = tokio::select! {
                biased;
                () = &mut shutdown => break,
                step = self.step_once(Utc::now()) => step,
            };
            let pause = match step {
                Ok(WebhookStep::Passed(_)) => {
                    backoff = ERROR_BACKOFF.0;
                    continue;
                }
                Ok(WebhookStep::Idle) => {
                    backoff = ERROR_BACKOFF.0;
                    None
                }
                Ok(WebhookStep::Busy) => Some(BUSY_POLL),
                Ok(WebhookStep::Retrying(until)) => {
                    Some((until - Utc::now()).to_std().unwrap_or_default())
                }
                Err(e) => {
                    tracing::error!(webhook.url = %self.shown, error.message = %e, "webhook.step failed; retrying");
                    let pause = backoff;
                    backoff = (backoff * 2).min(ERROR_BACKOFF.1);
                    Some(pause)
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = async {
                    match pause {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => listener.wait().await,
                    }
                } => {}
                () = self.wake.notified() => {}
            }
        }
        if let Err(e) = self.bounded(self.store.release(&self.target)).await {
            tracing::warn!(webhook.url = %self.shown, error.message = %e, "webhook lease not released");
        }
    }

    /// `work` (one call to the database), given up after the lease: a database that stopped
    /// answering on an open connection (a hung pooler) must not hold this target for good, and
    /// past the lease another instance may take it over anyway.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, WebhookError> {
        Ok(answered_within(self.target.lease, work).await?)
    }

    /// One step at `now`: claims the target, reads a batch after its checkpoint and delivers
    /// its webhooks in order, stopping at the first that fails (or whose retry is not due at
    /// `now`). Errors are recorded on the target.
    #[tracing::instrument(name = "webhook.step", skip_all, fields(webhook.url = %self.shown))]
    pub async fn step_once(&self, now: DateTime<Utc>) -> Result<WebhookStep, WebhookError> {
        let outcome = self.step(now).await;
        if let Err(error) = &outcome {
            let message = error.to_string();
            let _ = self
                .bounded(self.store.record_error(&self.target, &message))
                .await;
        }
        outcome
    }

    async fn step(&self, now: DateTime<Utc>) -> Result<WebhookStep, WebhookError> {
        let Some(position) = self.bounded(self.store.claim(&self.target)).await? else {
            return Ok(WebhookStep::Busy);
        };
        let events = self
            .bounded(self.log.read_all(position, BATCH_SIZE))
            .await?;
        if events.is_empty() {
            return Ok(WebhookStep::Idle);
        }
        let mut passed = 0;
        // The last event passed without a webhook, not yet saved as the checkpoint.
        let mut unsaved = None;
        for event in &events {
            // The webhook, and the connection's state after the event (to cache once passed).
            let (webhook, state) = if event.stream_id.category() == connection::CATEGORY {
                let decoded = ConnectionEvent::from_recorded(event)?;
                let mut state = self.prior_state(event).await?;
                let webhook = webhook_for(&state, &decoded, event);
                connection::apply(&mut state, &decoded);
                (webhook, Some(state))
            } else {
                (None, None)
            };
            if let Some(webhook) = webhook {
                match self.deliver(event, &webhook, now).await? {
                    Delivery::Delivered => {}
                    Delivery::Retrying(until) => {
                        if let Some(position) = unsaved {
                            self.bounded(self.store.advance(&self.target, position))
                                .await?;
                        }
                        return Ok(WebhookStep::Retrying(until));
                    }
                    Delivery::LeaseLost => return Ok(WebhookStep::Busy),
                }
                if !self
                    .bounded(self.store.advance(&self.target, event.position))
                    .await?
                {
                    return Ok(WebhookStep::Busy);
                }
                unsaved = None;
            } else {
                unsaved = Some(event.position);
            }
            if let Some(state) = state {
                self.remember(event, state);
            }
            passed += 1;
        }
        if let Some(position) = unsaved
            && !self
                .bounded(self.store.advance(&self.target, position))
                .await?
        {
            return Ok(WebhookStep::Busy);
        }
        Ok(WebhookStep::Passed(passed))
    }

    /// The connection's state before `event`: from the cache when it holds the previous
    /// version, else folded from the stream.
    async fn prior_state(&self, event: &RecordedEvent) -> Result<Connection, WebhookError> {
        let previous = event.stream_version.saturating_sub(1);
        if let Some((version, state)) = self.states.get(&event.stream_id)
            && version == previous
        {
            return Ok(state);
        }
        let mut state = Connection::default();
        let stream = self
            .bounded(self.log.read_stream(&event.stream_id, 0))
            .await?;
        for earlier in stream {
            if earlier.stream_version >= event.stream_version {
                break;
            }
            connection::apply(&mut state, &ConnectionEvent::from_recorded(&earlier)?);
        }
        Ok(state)
    }

    fn remember(&self, event: &RecordedEvent, state: Connection) {
        self.states
            .insert(event.stream_id.clone(), (event.stream_version, state));
    }

    #[tracing::instrument(
        name = "webhook.deliver",
        skip_all,
        fields(global_position = event.position.global, event = webhook.event.name(), attempt)
    )]
    async fn deliver(
        &self,
        event: &RecordedEvent,
        webhook: &Webhook,
        now: DateTime<Utc>,
    ) -> Result<Delivery, WebhookError> {
        let state = self.store.delivery_state(&self.target, event.event_id);
        match self.bounded(state).await? {
            // Answered 2xx before a crash kept the checkpoint from moving.
            Some(DeliveryState::Delivered) => return Ok(Delivery::Delivered),
            Some(DeliveryState::Retrying(next)) if next > now => {
                return Ok(Delivery::Retrying(next));
            }
            _ => {}
        }
        let outgoing = Outgoing {
            id: event.event_id,
            name: webhook.event.name(),
            global_position: event.position.global,
        };
        let Some(attempt) = self
            .bounded(self.store.start_attempt(&self.target, outgoing))
            .await?
        else {
            return Ok(Delivery::LeaseLost);
        };
        tracing::Span::current().record("attempt", attempt);
        let failed = match self
            .poster
            .post(&self.url, event.event_id, attempt, &webhook.body)
            .await
        {
            Ok(status) => {
                self.bounded(self.store.delivered(&self.target, event.event_id, status))
                    .await?;
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(status, "webhook delivered");
                return Ok(Delivery::Delivered);
            }
            Err(failed) => failed,
        };
        self.bounded(self.store.failed(&self.target, event.event_id, &failed))
            .await?;
        self.bounded(self.store.record_error(&self.target, &failed.error))
            .await?;
        self.counters
            .failed_attempts
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            webhook.url = %self.shown,
            event_id = %event.event_id,
            error.message = %failed.error,
            retry_at = %failed.next,
            "webhook delivery failed"
        );
        Ok(Delivery::Retrying(failed.next))
    }

    /// This target's checkpoint, lag, lease and latest deliveries.
    pub async fn status(&self, recent: usize) -> Result<TargetStatus, WebhookError> {
        let head = self.log.head_position().await?;
        let (row, deliveries) = self.store.status(&self.target, recent).await?;
        // Counted in log order: positions alone are not commit order on PostgreSQL.
        let behind = self.log.read_all(row.position, LAG_CAP).await?.len();
        let caught_up = !self.log.committed_after(row.position, head).await?;
        Ok(TargetStatus {
            url: self.shown.clone(),
            checkpoint: row.position.to_string(),
            checkpoint_position: row.position.global,
            head_position: head,
            lag: i64::try_from(behind).unwrap_or(i64::MAX),
            caught_up,
            lease_holder: row.lease_holder,
            lease_expires_at: row.lease_expires_at,
            updated_at: row.updated_at,
            last_error: row.last_error,
            deliveries,
        })
    }
}
