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
//!   HMAC-SHA256 under the configured secret (`X-Grantline-Signature: sha256=<hex>`, and the same
//!   hex as `X-Nango-Hmac-Sha256`).
//!
//! Whether an authorization is a creation or a re-authorization, and a refresh a recovery,
//! depends on the connection's state before the event: folded from the stream's earlier events
//! (cached in memory per stream, refolded from the store after a restart or a cache miss).

mod store;

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use domain::connection::{self, Connection, ConnectionEvent};
use domain::event::{DomainEvent, UnreadableEvent};
use domain::store::{Backend, EventStore, RecordedEvent, StoreError, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

use self::store::{DeliveryState, Failed, Target, WebhookStore};

/// The longest wait between two attempts of one delivery.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Events read per step.
const BATCH_SIZE: usize = 100;
/// Lag is counted up to this many events.
const LAG_CAP: usize = 10_000;
/// Streams whose state is kept in memory (the cache is emptied when it is full).
const CACHE_CAPACITY: usize = 10_000;
/// How often a subscriber whose target another instance holds looks again.
const BUSY_POLL: Duration = Duration::from_secs(2);
/// The shortest lease; it is longer with long timeouts (see [`WebhookService::open`]). After a
/// crash, the target waits this long before another instance (or the restarted one) takes over.
const MIN_LEASE: Duration = Duration::from_secs(15);
/// Delivered attempts are kept this long for operators, then pruned.
const DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The first and the longest pause after a database error.
const ERROR_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

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

/// The kinds of webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookEvent {
    /// A connection was authorized that did not exist or had been deleted.
    ConnectionCreated,
    /// An existing connection was authorized again.
    ConnectionReauthorized,
    /// A connection was deleted.
    ConnectionDeleted,
    /// A refresh failed.
    RefreshFailed,
    /// A refresh succeeded after one or more failures.
    RefreshRecovered,
}

impl WebhookEvent {
    /// The `event` field of the body.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectionCreated => "connection.created",
            Self::ConnectionReauthorized => "connection.reauthorized",
            Self::ConnectionDeleted => "connection.deleted",
            Self::RefreshFailed => "refresh.failed",
            Self::RefreshRecovered => "refresh.recovered",
        }
    }

    /// Nango's `operation` for it.
    fn operation(self) -> &'static str {
        match self {
            Self::ConnectionCreated => "creation",
            Self::ConnectionReauthorized => "override",
            Self::ConnectionDeleted => "deletion",
            Self::RefreshFailed | Self::RefreshRecovered => "refresh",
        }
    }
}

/// A webhook ready to be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub event: WebhookEvent,
    pub body: Value,
}

/// The webhook of `event` (recorded as `recorded`), given the connection's state before it;
/// `None` for events without one (leases, metadata, a refresh that did not follow a failure).
pub fn webhook_for(
    prior: &Connection,
    event: &ConnectionEvent,
    recorded: &RecordedEvent,
) -> Option<Webhook> {
    let (kind, occurred_at, identity) = match event {
        ConnectionEvent::ConnectionAuthorized(authorized) => {
            let kind = match prior {
                Connection::Active(_) => WebhookEvent::ConnectionReauthorized,
                Connection::NeverAuthorized | Connection::Deleted(_) => {
                    WebhookEvent::ConnectionCreated
                }
            };
            let identity = Identity {
                provider_config_key: &authorized.provider_config_key,
                connection_id: &authorized.connection_id,
                provider: &authorized.provider,
                auth_mode: json!(authorized.credentials_type),
                generation: authorized.generation,
            };
            (kind, authorized.authorized_at, identity)
        }
        ConnectionEvent::ConnectionDeleted(deleted) => (
            WebhookEvent::ConnectionDeleted,
            deleted.deleted_at,
            Identity::of(prior.active()?),
        ),
        ConnectionEvent::RefreshFailed(failed) => (
            WebhookEvent::RefreshFailed,
            failed.failed_at,
            Identity::of(prior.active()?),
        ),
        ConnectionEvent::TokensRefreshed(refreshed) => {
            let active = prior.active()?;
            active.last_failure.as_ref()?;
            (
                WebhookEvent::RefreshRecovered,
                refreshed.refreshed_at,
                Identity::of(active),
            )
        }
        ConnectionEvent::RefreshLeased(_) | ConnectionEvent::MetadataSet(_) => return None,
    };
    let mut body = json!({
        "id": recorded.event_id,
        "event": kind.name(),
        "occurred_at": occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "provider_config_key": identity.provider_config_key,
        "connection_id": identity.connection_id,
        "provider": identity.provider,
        "generation": identity.generation,
        "global_position": recorded.position.global,
        // Nango's auth webhook fields.
        "from": "grantline",
        "type": "auth",
        "operation": kind.operation(),
        "success": kind != WebhookEvent::RefreshFailed,
        "connectionId": identity.connection_id,
        "providerConfigKey": identity.provider_config_key,
        "authMode": identity.auth_mode,
    });
    match event {
        ConnectionEvent::ConnectionAuthorized(authorized) => {
            body["flow"] = json!(authorized.flow);
        }
        ConnectionEvent::RefreshFailed(failed) => {
            // The provider's free-text description is not forwarded: it is theirs, not ours.
            let class = json!(failed.failure.class);
            body["error"] = json!({
                "type": failed.failure.code.as_ref().map_or(class.clone(), |code| json!(code)),
                "description": class,
            });
            body["failure"] = json!({
                "class": failed.failure.class,
                "code": failed.failure.code,
                "provider_status": failed.failure.provider_status,
            });
        }
        ConnectionEvent::TokensRefreshed(refreshed) => {
            body["refresh_token_generation"] = json!(refreshed.refresh_token_generation);
            body["expires_at"] = json!(
                refreshed
                    .expires_at
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
            );
        }
        _ => {}
    }
    Some(Webhook { event: kind, body })
}

/// Who a webhook is about.
struct Identity<'a> {
    provider_config_key: &'a str,
    connection_id: &'a str,
    provider: &'a str,
    auth_mode: Value,
    generation: u32,
}

impl<'a> Identity<'a> {
    fn of(active: &'a connection::ActiveConnection) -> Self {
        Self {
            provider_config_key: &active.provider_config_key,
            connection_id: &active.connection_id,
            provider: &active.provider,
            auth_mode: json!(active.credentials_type),
            generation: active.generation,
        }
    }
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

/// Hex of HMAC-SHA256 of `body` under `secret`, as the signature headers carry it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            hex(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// The wait before attempt `attempts + 1`: `base` doubled per earlier failure, capped at
/// [`BACKOFF_CAP`], less up to a quarter at random so that targets do not retry in step.
pub fn retry_delay(base: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    let delay = base.saturating_mul(1 << doublings).min(BACKOFF_CAP);
    let jitter = (Uuid::new_v4().as_u128() % 1024) as f64 / 1024.0;
    delay.mul_f64(1.0 - 0.25 * jitter)
}

/// The webhook subscribers of one instance, one per target. Cheap to clone.
#[derive(Clone)]
pub struct WebhookService {
    subscribers: Arc<[WebhookSubscriber]>,
    counters: Arc<WebhookCounters>,
}

impl fmt::Debug for WebhookService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let targets: Vec<&str> = self.subscribers.iter().map(|s| s.shown.as_str()).collect();
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
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("grantline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Setup(e.to_string()))?;
        // A lease outlives any one attempt by far, so a live holder never loses it mid-POST.
        let lease = MIN_LEASE.max(settings.timeout.saturating_mul(2) + Duration::from_secs(10));
        let counters = Arc::new(WebhookCounters::default());
        let log = backend.event_store();
        let store = store::open(&backend);
        let secret: Arc<[u8]> = Arc::from(settings.secret.as_bytes());
        let mut subscribers: Vec<WebhookSubscriber> = Vec::new();
        for url in &settings.urls {
            let key = hex(&Sha256::digest(url.as_str().as_bytes()));
            // A URL listed twice is one target: two subscribers would share its lease.
            if subscribers.iter().any(|s| s.target.key == key) {
                continue;
            }
            let subscriber = WebhookSubscriber {
                target: Target {
                    key,
                    holder: settings.holder.clone(),
                    lease,
                },
                shown: redact(url),
                url: url.clone(),
                store: store.clone(),
                log: log.clone(),
                http: http.clone(),
                secret: secret.clone(),
                backoff: settings.backoff,
                timeout: settings.timeout,
                counters: counters.clone(),
                states: Arc::new(Mutex::new(HashMap::new())),
            };
            let start = log.last_position().await?;
            store
                .register(&subscriber.target, &subscriber.shown, start)
                .await?;
            subscribers.push(subscriber);
        }
        Ok(Self {
            subscribers: subscribers.into(),
            counters,
        })
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
        futures_util::future::join_all(loops).await;
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

/// The subscriber of one target.
#[derive(Clone)]
pub struct WebhookSubscriber {
    target: Target,
    url: Url,
    shown: String,
    store: Arc<dyn WebhookStore>,
    log: Arc<dyn EventStore>,
    http: reqwest::Client,
    secret: Arc<[u8]>,
    backoff: Duration,
    timeout: Duration,
    counters: Arc<WebhookCounters>,
    /// Connection states after the last event passed, by stream: `(stream version, state)`.
    states: Arc<Mutex<HashMap<StreamId, (u32, Connection)>>>,
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
                if let Err(e) = self
                    .store
                    .prune(
                        &self.target,
                        Utc::now()
                            - chrono::Duration::from_std(DELIVERY_RETENTION)
                                .unwrap_or(chrono::Duration::zero()),
                    )
                    .await
                {
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
            }
        }
        if let Err(e) = self.store.release(&self.target).await {
            tracing::warn!(webhook.url = %self.shown, error.message = %e, "webhook lease not released");
        }
    }

    /// One step at `now`: claims the target, reads a batch after its checkpoint and delivers
    /// its webhooks in order, stopping at the first that fails (or whose retry is not due at
    /// `now`). Errors are recorded on the target.
    #[tracing::instrument(name = "webhook.step", skip_all, fields(webhook.url = %self.shown))]
    pub async fn step_once(&self, now: DateTime<Utc>) -> Result<WebhookStep, WebhookError> {
        let outcome = self.step(now).await;
        if let Err(error) = &outcome {
            let _ = self
                .store
                .record_error(&self.target, &error.to_string())
                .await;
        }
        outcome
    }

    async fn step(&self, now: DateTime<Utc>) -> Result<WebhookStep, WebhookError> {
        let Some(position) = self.store.claim(&self.target).await? else {
            return Ok(WebhookStep::Busy);
        };
        let events = self.log.read_all(position, BATCH_SIZE).await?;
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
                            self.store.advance(&self.target, position).await?;
                        }
                        return Ok(WebhookStep::Retrying(until));
                    }
                    Delivery::LeaseLost => return Ok(WebhookStep::Busy),
                }
                if !self.store.advance(&self.target, event.position).await? {
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
            && !self.store.advance(&self.target, position).await?
        {
            return Ok(WebhookStep::Busy);
        }
        Ok(WebhookStep::Passed(passed))
    }

    /// The connection's state before `event`: from the cache when it holds the previous
    /// version, else folded from the stream.
    async fn prior_state(&self, event: &RecordedEvent) -> Result<Connection, WebhookError> {
        let previous = event.stream_version.saturating_sub(1);
        {
            let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((version, state)) = states.get(&event.stream_id)
                && *version == previous
            {
                return Ok(state.clone());
            }
        }
        let mut state = Connection::default();
        for earlier in self.log.read_stream(&event.stream_id, 0).await? {
            if earlier.stream_version >= event.stream_version {
                break;
            }
            connection::apply(&mut state, &ConnectionEvent::from_recorded(&earlier)?);
        }
        Ok(state)
    }

    fn remember(&self, event: &RecordedEvent, state: Connection) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if states.len() >= CACHE_CAPACITY && !states.contains_key(&event.stream_id) {
            states.clear();
        }
        states.insert(event.stream_id.clone(), (event.stream_version, state));
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
        match self
            .store
            .delivery_state(&self.target, event.event_id)
            .await?
        {
            // Answered 2xx before a crash kept the checkpoint from moving.
            Some(DeliveryState::Delivered) => return Ok(Delivery::Delivered),
            Some(DeliveryState::Retrying(next)) if next > now => {
                return Ok(Delivery::Retrying(next));
            }
            _ => {}
        }
        let Some(attempt) = self
            .store
            .start_attempt(
                &self.target,
                event.event_id,
                webhook.event.name(),
                event.position.global,
            )
            .await?
        else {
            return Ok(Delivery::LeaseLost);
        };
        tracing::Span::current().record("attempt", attempt);
        let body = webhook.body.to_string().into_bytes();
        let signature = sign(&self.secret, &body);
        let sent = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Grantline-Signature", format!("sha256={signature}"))
            .header("X-Nango-Hmac-Sha256", &signature)
            .header("Idempotency-Key", event.event_id.to_string())
            .header("X-Grantline-Delivery-Attempt", attempt.to_string())
            .body(body)
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => {
                let status = response.status().as_u16();
                self.store
                    .delivered(&self.target, event.event_id, status)
                    .await?;
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(status, "webhook delivered");
                return Ok(Delivery::Delivered);
            }
            Ok(response) => {
                let status = response.status().as_u16();
                (Some(status), format!("the receiver answered HTTP {status}"))
            }
            Err(e) if e.is_timeout() => {
                (None, format!("no answer within {}", humanize(self.timeout)))
            }
            Err(e) => (None, transport_error(e)),
        };
        let (status, error) = failure;
        let next = Utc::now()
            + chrono::Duration::from_std(retry_delay(self.backoff, attempt))
                .unwrap_or(chrono::Duration::MAX);
        let failed = Failed {
            status,
            error,
            next,
        };
        self.store
            .failed(&self.target, event.event_id, &failed)
            .await?;
        self.store.record_error(&self.target, &failed.error).await?;
        let Failed { error, .. } = failed;
        self.counters
            .failed_attempts
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            webhook.url = %self.shown,
            event_id = %event.event_id,
            error.message = %error,
            retry_at = %next,
            "webhook delivery failed"
        );
        Ok(Delivery::Retrying(next))
    }

    /// This target's checkpoint, lag, lease and latest deliveries.
    pub async fn status(&self, recent: usize) -> Result<TargetStatus, WebhookError> {
        let head = self.log.head_position().await?;
        let (row, deliveries) = self.store.status(&self.target, recent).await?;
        // Counted in log order: positions alone are not commit order on PostgreSQL.
        let behind = self.log.read_all(row.position, LAG_CAP).await?.len();
        Ok(TargetStatus {
            url: self.shown.clone(),
            checkpoint: row.position.to_string(),
            checkpoint_position: row.position.global,
            head_position: head,
            lag: i64::try_from(behind).unwrap_or(i64::MAX),
            lease_holder: row.lease_holder,
            lease_expires_at: row.lease_expires_at,
            updated_at: row.updated_at,
            last_error: row.last_error,
            deliveries,
        })
    }
}

fn humanize(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// A transport error's causes, without the URL (which may carry credentials).
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::TimeZone;
    use domain::connection::{
        ConnectionAuthorized, ConnectionDeleted, CredentialsType, FailureClass, Flow, MetadataMode,
        MetadataSet, RefreshFailed, RefreshFailure, RefreshLeased, RefreshTrigger,
        TokenFingerprints, TokensRefreshed,
    };
    use domain::keys::Sealed;
    use domain::store::Position;
    use serde_json::Map;

    use super::*;

    fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap() + chrono::Duration::minutes(minute)
    }

    fn sealed() -> Sealed {
        Sealed {
            key_id: Uuid::nil(),
            ciphertext: b"sealed".to_vec(),
        }
    }

    fn authorized(generation: u32) -> ConnectionEvent {
        ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            provider_config_key: "github-prod".to_owned(),
            connection_id: "user-1".to_owned(),
            provider: "github".to_owned(),
            flow: Flow::Import,
            credentials_type: CredentialsType::Oauth2,
            generation,
            data_key_id: Uuid::from_u128(u128::from(generation)),
            credentials: sealed(),
            has_refresh_token: true,
            expires_at: None,
            scopes: Vec::new(),
            connection_config: Map::new(),
            fingerprints: TokenFingerprints {
                access_token: Some("fp-access".to_owned()),
                refresh_token: Some("fp-refresh".to_owned()),
            },
            authorized_at: at(0),
        })
    }

    fn leased() -> ConnectionEvent {
        ConnectionEvent::RefreshLeased(RefreshLeased {
            lease_id: Uuid::nil(),
            holder: "a".to_owned(),
            trigger: RefreshTrigger::Read,
            leased_at: at(1),
            lease_expires_at: at(2),
        })
    }

    fn failed(code: Option<&str>) -> ConnectionEvent {
        ConnectionEvent::RefreshFailed(RefreshFailed {
            lease_id: Uuid::nil(),
            failure: RefreshFailure {
                class: FailureClass::Permanent,
                code: code.map(str::to_owned),
                provider_status: Some(400),
                description: Some("provider says: token abc123 revoked".to_owned()),
            },
            failed_at: at(3),
        })
    }

    fn refreshed() -> ConnectionEvent {
        ConnectionEvent::TokensRefreshed(TokensRefreshed {
            lease_id: Uuid::nil(),
            credentials: sealed(),
            expires_at: Some(at(60)),
            has_refresh_token: true,
            refresh_token_rotated: true,
            refresh_token_generation: 2,
            fingerprints: TokenFingerprints::default(),
            refreshed_at: at(4),
        })
    }

    fn deleted() -> ConnectionEvent {
        ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
            deleted_at: at(5),
            shredded_data_keys: Vec::new(),
        })
    }

    fn recorded(event: &ConnectionEvent) -> RecordedEvent {
        RecordedEvent {
            position: Position {
                commit: 7,
                global: 42,
            },
            stream_id: connection::stream_id("github-prod", "user-1"),
            stream_version: 1,
            event_id: Uuid::from_u128(99),
            event_type: event.event_type().to_owned(),
            event_version: 1,
            payload: event.to_payload(),
            metadata: json!({}),
            recorded_at: at(0),
        }
    }

    /// The webhook names produced by `events` in order, folding the state as the subscriber does.
    fn names(events: &[ConnectionEvent]) -> Vec<Option<&'static str>> {
        let mut state = Connection::default();
        events
            .iter()
            .map(|event| {
                let webhook = webhook_for(&state, event, &recorded(event));
                connection::apply(&mut state, event);
                webhook.map(|w| w.event.name())
            })
            .collect()
    }

    #[test]
    fn authorizations_are_creations_unless_the_connection_exists() {
        assert_eq!(
            names(&[authorized(1), authorized(2), deleted(), authorized(3)]),
            [
                Some("connection.created"),
                Some("connection.reauthorized"),
                Some("connection.deleted"),
                Some("connection.created"),
            ]
        );
    }

    #[test]
    fn a_refresh_is_a_recovery_only_after_a_failure() {
        assert_eq!(
            names(&[
                authorized(1),
                leased(),
                refreshed(),
                leased(),
                failed(None),
                leased(),
                failed(Some("invalid_grant")),
                leased(),
                refreshed(),
                leased(),
                refreshed(),
            ]),
            [
                Some("connection.created"),
                None,
                None,
                None,
                Some("refresh.failed"),
                None,
                Some("refresh.failed"),
                None,
                Some("refresh.recovered"),
                None,
                None,
            ]
        );
        // A re-authorization clears the failures: the next refresh recovers nothing.
        assert_eq!(
            names(&[authorized(1), failed(None), authorized(2), refreshed()]),
            [
                Some("connection.created"),
                Some("refresh.failed"),
                Some("connection.reauthorized"),
                None
            ]
        );
    }

    #[test]
    fn metadata_and_leases_have_no_webhook() {
        let metadata = ConnectionEvent::MetadataSet(MetadataSet {
            metadata: json!({"a": 1}),
            mode: MetadataMode::Merge,
            set_at: at(1),
        });
        assert_eq!(
            names(&[authorized(1), metadata, leased()]),
            [Some("connection.created"), None, None]
        );
    }

    #[test]
    fn bodies_carry_nango_fields_and_no_secret_or_provider_text() {
        let mut state = Connection::default();
        connection::apply(&mut state, &authorized(1));
        let event = failed(Some("invalid_grant"));
        let webhook = webhook_for(&state, &event, &recorded(&event)).unwrap();
        let body = &webhook.body;
        assert_eq!(body["id"], "00000000-0000-0000-0000-000000000063");
        assert_eq!(body["event"], "refresh.failed");
        assert_eq!(body["occurred_at"], "2024-05-01T12:03:00.000Z");
        assert_eq!(body["from"], "grantline");
        assert_eq!(body["type"], "auth");
        assert_eq!(body["operation"], "refresh");
        assert_eq!(body["success"], false);
        assert_eq!(body["connectionId"], "user-1");
        assert_eq!(body["providerConfigKey"], "github-prod");
        assert_eq!(body["provider"], "github");
        assert_eq!(body["authMode"], "OAUTH2");
        assert_eq!(body["generation"], 1);
        assert_eq!(
            body["error"],
            json!({"type": "invalid_grant", "description": "permanent"})
        );
        let text = body.to_string();
        for secret in ["abc123", "fp-access", "fp-refresh", "c2VhbGVk"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // Without a provider code the class is the type.
        let event = failed(None);
        let webhook = webhook_for(&state, &event, &recorded(&event)).unwrap();
        assert_eq!(webhook.body["error"]["type"], "permanent");
    }

    #[test]
    fn redaction_keeps_scheme_host_port_and_path_only() {
        let url =
            Url::parse("https://user:pw@hooks.example.com:8443/in/grantline?token=s3#x").unwrap();
        assert_eq!(redact(&url), "https://hooks.example.com:8443/in/grantline");
        let url = Url::parse("http://[::1]/hook").unwrap();
        assert_eq!(redact(&url), "http://[::1]/hook");
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_retry_delay_doubles_with_jitter_up_to_the_cap() {
        let base = Duration::from_secs(1);
        for (attempts, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (500, 300)] {
            let delay = retry_delay(base, attempts);
            let full = Duration::from_secs(full);
            assert!(
                delay <= full && delay >= full.mul_f64(0.75),
                "{attempts}: {delay:?}"
            );
        }
    }
}
