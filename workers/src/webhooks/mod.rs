//! Webhooks driven from the event log: connection created / re-authorized / deleted and refresh
//! failed / recovered, POSTed to each configured URL (a *target*).
//!
//! Each target is a subscriber with its own checkpoint in `webhook_targets`, like a projection:
//! it reads the log after the checkpoint, maps connection events to webhooks and POSTs them one
//! at a time, in log order. Guarantees:
//! - At least once, across crashes and restarts: the checkpoint moves past an event only once
//!   its webhook was answered 2xx (or it has none), so a crash at any point re-delivers and
//!   never skips. The receiver deduplicates by `id` (also sent as `Idempotency-Key`).
//! - Ordered per target: a failed delivery is retried (with a backoff that doubles from the
//!   configured delay, with jitter, up to [`BACKOFF_CAP`]) until it succeeds, and nothing after
//!   it is sent meanwhile (head of line). Every attempt is recorded in `webhook_deliveries`,
//!   with its status and last error, and the wait survives restarts.
//! - One deliverer per target among instances: a lease (holder, expiry) is claimed, renewed and
//!   checked by single statements. No transaction is ever held open across an HTTP call (on
//!   PostgreSQL it would hold back the xid8 horizon that every log reader waits behind).
//! - A target starts at the log's position when it is first registered: it receives what happens
//!   from then on, not the history before it.
//! - Bodies carry no secret: no token, no fingerprint, no provider free text; each is signed with
//!   HMAC-SHA256 under the configured secret, with the time it was sent
//!   (`X-Grantline-Signature: t=<seconds>,sha256=<hex>`; Nango's `X-Nango-Hmac-Sha256` of the
//!   body alone too).
//!
//! Whether an authorization is a creation or a re-authorization, and a refresh a recovery,
//! depends on the connection's state before the event: folded from the stream's earlier events
//! (kept per stream in a bounded in-memory cache, refolded from the store after a restart or an
//! eviction).
//!
//! The rooms: `mapping` (which event makes which webhook, and its body), `delivery` (signing,
//! the POST, retry delays), `subscriber` (a target's step and loop, its lease and checkpoint)
//! and `store` (the tables, one implementation per backend, picked once in
//! [`WebhookService::open`]).

mod delivery;
mod mapping;
mod store;
mod subscriber;

use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::event::UnreadableEvent;
use domain::store::{Backend, Position, StoreError};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

pub use self::delivery::{BACKOFF_CAP, retry_delay, sign};
pub use self::mapping::{Webhook, WebhookEvent, webhook_for};
pub use self::subscriber::{WebhookStep, WebhookSubscriber};

use self::delivery::Poster;
use self::store::Target;

/// The shortest lease; it is longer with long timeouts (see [`WebhookService::open`]). After a
/// crash, the target waits this long before another instance (or the restarted one) takes over.
const MIN_LEASE: Duration = Duration::from_secs(15);

/// How long after it was registered, or last leased by an instance that delivers webhooks, a
/// target still holds the compactor back (see [`slowest_target`]): longer than any planned stop of every
/// instance, so that a restart finds its targets' history whole.
pub const FOLLOWED_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// The checkpoint of the webhook target furthest behind, among those registered or leased in the
/// last [`FOLLOWED_WITHIN`], and its URL (as operators may see it); `None` when there is none.
/// The compactor removes nothing at or after it in a stream: the target still has to map those
/// events, each from the state its stream's earlier events fold to.
pub async fn slowest_target(backend: &Backend) -> Result<Option<(Position, String)>, StoreError> {
    store::open(backend).slowest_followed(FOLLOWED_WITHIN).await
}

/// How webhooks are sent.
#[derive(Clone)]
pub struct WebhookSettings {
    /// The targets.
    pub urls: Vec<Url>,
    /// The HMAC-SHA256 key bodies are signed with.
    pub secret: String,
    /// Timeout of one POST (connecting, sending and the answer's head).
    pub timeout: Duration,
    /// The wait after the first failed attempt; it doubles after each further one.
    pub backoff: Duration,
    /// This instance's name in the leases it takes.
    pub holder: String,
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(redact).collect();
        f.debug_struct("WebhookSettings")
            .field("urls", &urls)
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("backoff", &self.backoff)
            .field("holder", &self.holder)
            .finish()
    }
}

/// Why webhooks cannot be set up or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The database failed or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event of the log cannot be read: the target stops before it.
    #[error(transparent)]
    Unreadable(#[from] UnreadableEvent),
    /// The HTTP client or the signing key could not be built.
    #[error("cannot set up webhooks: {0}")]
    Setup(String),
}

/// Delivery statistics, for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookCounters {
    /// Webhooks answered 2xx.
    pub delivered: AtomicU64,
    /// Attempts that failed (non-2xx answer, timeout, connection error).
    pub failed_attempts: AtomicU64,
}

/// `url` as operators may see it: scheme, host, port and path (no userinfo, query or fragment,
/// which may carry credentials).
pub fn redact(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        let _ = write!(shown, ":{port}");
    }
    shown.push_str(url.path());
    shown
}

/// The key of `url`'s rows: lowercase hex of the SHA-256 of the full URL. Stored in the tables,
/// so it never changes (a new key would register the target afresh, past undelivered events).
fn target_key(url: &Url) -> String {
    hex::encode(Sha256::digest(url.as_str().as_bytes()))
}

/// The webhook subscribers of one instance, one per target. Cheap to clone.
#[derive(Clone)]
pub struct WebhookService {
    subscribers: Arc<[WebhookSubscriber]>,
    counters: Arc<WebhookCounters>,
    /// Where "retry now" is told to the instance that holds a target's lease.
    backend: Backend,
    /// The name this instance holds leases under.
    holder: Arc<str>,
}

/// What an instance tells the others when an operator asks for a target's waiting deliveries
/// now: the holder of the target's lease wakes its loop (any instance may be asked).
#[derive(Serialize, Deserialize)]
struct RetryNow {
    webhook_retry_now: String,
}

impl fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<&str> = self.subscribers.iter().map(|s| s.url()).collect();
        f.debug_struct("WebhookService")
            .field("targets", &targets)
            .field("counters", &self.counters)
            .finish()
    }
}

impl WebhookService {
    /// Builds a subscriber per URL and registers each target (a new one at the log's current
    /// position), so that events appended after this returns are delivered.
    pub async fn open(backend: Backend, settings: WebhookSettings) -> Result<Self, WebhookError> {
        let poster = Poster::new(&settings)?;
        // A lease outlives any one attempt by far, so a live holder never loses it mid-POST.
        let lease = MIN_LEASE.max(settings.timeout.saturating_mul(2) + Duration::from_secs(10));
        let counters = Arc::new(WebhookCounters::default());
        let log = backend.event_store();
        let store = store::open(&backend);
        let mut subscribers: Vec<WebhookSubscriber> = Vec::new();
        for url in &settings.urls {
            let key = target_key(url);
            // A URL listed twice is one target: two subscribers would share its lease.
            if subscribers.iter().any(|s| s.target().key == key) {
                continue;
            }
            let target = Target {
                key,
                holder: settings.holder.clone(),
                lease,
            };
            let subscriber = WebhookSubscriber::new(
                target,
                url,
                store.clone(),
                log.clone(),
                poster.clone(),
                counters.clone(),
            );
            let start = log.last_position().await?;
            store
                .register(subscriber.target(), subscriber.url(), start)
                .await?;
            subscribers.push(subscriber);
        }
        Ok(Self {
            subscribers: subscribers.into(),
            counters,
            holder: settings.holder.as_str().into(),
            backend,
        })
    }

    /// The name this instance holds leases under (the instance's name).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The subscribers, one per target, in the configured order.
    pub fn subscribers(&self) -> &[WebhookSubscriber] {
        &self.subscribers
    }

    /// Delivery statistics of all targets.
    pub fn counters(&self) -> &WebhookCounters {
        &self.counters
    }

    /// Delivers to every target until `shutdown` completes, then hands the leases back.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let shutdown = (Box::pin(shutdown) as BoxFuture<'static, ()>).shared();
        let loops = self.subscribers.iter().map(|s| s.run(shutdown.clone()));
        tokio::join!(
            futures_util::future::join_all(loops),
            self.wake_on_request(shutdown.clone())
        );
    }

    /// Wakes a target's loop when any instance is asked to retry its deliveries now, until
    /// `shutdown`. Messages of other kinds share the channel and are skipped.
    async fn wake_on_request(&self, shutdown: impl Future<Output = ()>) {
        crate::messages::follow(&self.backend, shutdown, |message| {
            // A missed request leaves its deliveries due: the holder sends them when its current
            // wait ends.
            let crate::messages::Message::Received(payload) = message else {
                return;
            };
            let Ok(request) = serde_json::from_str::<RetryNow>(payload) else {
                return;
            };
            if let Some(subscriber) = self
                .subscribers
                .iter()
                .find(|s| s.target().key == request.webhook_retry_now)
            {
                subscriber.wake();
            }
        })
        .await;
    }

    /// Each target's deliveries of the events `event_ids` (say, a connection's), with the
    /// target as operators see it (its URL redacted).
    pub async fn deliveries_of(
        &self,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<(String, DeliveryStatus)>, WebhookError> {
        let mut found = Vec::new();
        for subscriber in self.subscribers.iter() {
            for delivery in subscriber.deliveries_of(event_ids).await? {
                found.push((subscriber.url().to_owned(), delivery));
            }
        }
        Ok(found)
    }

    /// Makes the retrying deliveries of the target shown as `url` due now (see
    /// [`WebhookSubscriber::retry_now`]); `None` when no target is shown so.
    pub async fn retry_now(&self, url: &str) -> Result<Option<u64>, WebhookError> {
        let Some(subscriber) = self.subscribers.iter().find(|s| s.url() == url) else {
            return Ok(None);
        };
        let due = subscriber.retry_now().await?;
        let request = RetryNow {
            webhook_retry_now: subscriber.target().key.clone(),
        };
        let payload = serde_json::to_string(&request).unwrap_or_default();
        if let Err(e) = self.backend.publish(&payload).await {
            // The deliveries are due all the same; the holder sends them when its wait ends.
            tracing::warn!(error.message = %e, "webhook.retry_now cannot reach the other instances");
        }
        Ok(Some(due))
    }

    /// Each target's checkpoint, lag, lease and its `recent` latest deliveries.
    pub async fn status(&self, recent: usize) -> Result<Vec<TargetStatus>, WebhookError> {
        let mut statuses = Vec::with_capacity(self.subscribers.len());
        for subscriber in self.subscribers.iter() {
            statuses.push(subscriber.status(recent).await?);
        }
        Ok(statuses)
    }
}

/// One target's progress, as `/admin/webhooks` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    /// The URL without userinfo, query or fragment.
    pub url: String,
    /// `commit:position` of the last event passed.
    pub checkpoint: String,
    pub checkpoint_position: i64,
    pub head_position: i64,
    /// Events after the checkpoint that a reader can see now (counted up to 10,000).
    pub lag: i64,
    /// Every event committed up to `head_position` is passed (the checkpoint's position need
    /// not reach the head: commit order is not position order on PostgreSQL).
    pub caught_up: bool,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// The latest deliveries, most recent attempt first.
    pub deliveries: Vec<DeliveryStatus>,
}

/// One delivery's attempts.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryStatus {
    pub event_id: Uuid,
    pub event: String,
    pub global_position: i64,
    /// `pending` (an attempt in flight, or cut short), `retrying` or `delivered`.
    pub status: String,
    pub attempts: i64,
    /// The HTTP status of the last answer, if there was one.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub first_attempt_at: DateTime<Utc>,
    pub last_attempt_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn redaction_keeps_scheme_host_port_and_path_only() {
        let url =
            Url::parse("https://user:pw@hooks.example.com:8443/in/grantline?token=s3#x").unwrap();
        assert_eq!(redact(&url), "https://hooks.example.com:8443/in/grantline");
        let url = Url::parse("http://[::1]/hook").unwrap();
        assert_eq!(redact(&url), "http://[::1]/hook");
    }

    #[test]
    fn a_target_is_keyed_by_the_lowercase_hex_sha256_of_its_full_url() {
        let url = Url::parse("https://hooks.example.com/in").unwrap();
        assert_eq!(
            target_key(&url),
            "5d838a1ceaf722de0585104fc96a445532dae7b41323c477285e9d2e29983ee0"
        );
    }
}
