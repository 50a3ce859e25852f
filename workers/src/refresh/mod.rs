//! The refresh service: the only code that refreshes OAuth 2.0 tokens. The read path and the
//! scheduler ([`crate::scheduler`]) use it; it implements the fenced protocol of DESIGN.md §3:
//!
//! 1. Load the connection's stream head (version `v`); a token that is fresh there is answered.
//! 2. An unexpired `RefreshLeased` without outcome at the head: wait until an event follows it
//!    (woken by the store's [`Listener`](domain::store::Listener), which polls, so this works
//!    across processes) or the lease expires, then go to 1.
//! 3. Append `RefreshLeased` expecting `v`; a conflict means someone else moved first: go to 1.
//! 4. Call the provider with a timeout strictly shorter than the lease (checked by
//!    [`RefreshService::new`]).
//! 5. Append `TokensRefreshed` / `RefreshFailed` expecting `v + 1` (the fence, see
//!    [`Commands::complete_refresh`]): metadata appended meanwhile does not break it; another
//!    lease, a re-authorization or a deletion does, and then the new tokens are dropped and
//!    logged as an error with the connection id.
//!
//! Within one process, concurrent callers for the same connection join one spawned refresh
//! (a map of shared futures keyed by stream): a caller that goes away (an HTTP client hanging
//! up) does not abandon a lease between the provider's answer and the append.
//!
//! Failure policy: an answer refused with a 4xx (`invalid_grant`, …) other than 429, or an
//! unusable token URL, is permanent: non-forced refreshes are refused without calling the
//! provider until a forced refresh or a re-authorization. 5xx, 429, timeouts, network errors and
//! 2xx answers that are not token responses are transient: retried, but not before a backoff
//! that doubles from [`TRANSIENT_BACKOFF_BASE`] up to [`TRANSIENT_BACKOFF_CAP`] after each
//! failure in a row. Failures never change the stored credentials.

mod exchange;
mod protocol;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::catalog::Catalog;
use domain::commands::{CommandError, Commands, Loaded};
use domain::connection::{
    ActiveConnection, Connection, ConnectionKey, ConnectionRejected, RecordedFailure,
    RefreshFailure, RefreshTrigger,
};
use domain::credentials::Credentials;
use domain::keys::KeyError;
use domain::store::{StoreError, StreamId};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use projections::ReadModels;
use uuid::Uuid;

use crate::provider::{ClientBuildError, ProviderClient};

/// The wait after the first transient failure before the provider is asked again.
pub const TRANSIENT_BACKOFF_BASE: Duration = Duration::from_secs(1);

/// The longest wait between transient retries.
pub const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(300);

/// How often a waiter looks at the stream when no wake-up comes.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// How many times the protocol starts over (a lost race, a lease waited out) before giving up.
const MAX_ROUNDS: u32 = 16;

/// The refresh policy of one instance.
#[derive(Clone, Debug)]
pub struct RefreshSettings {
    /// Refresh when the token expires within this margin (a template's
    /// `token_expiration_buffer` overrides it).
    pub margin: Duration,
    /// How long a lease lasts.
    pub lease: Duration,
    /// The provider call's timeout; strictly shorter than `lease`.
    pub provider_timeout: Duration,
    /// This instance's name in the leases it takes.
    pub holder: String,
}

/// Why the service cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The provider could answer after the lease passed to another refresher.
    #[error(
        "the provider timeout ({timeout:?}) must be strictly shorter than the refresh lease \
         ({lease:?})"
    )]
    TimeoutNotShorterThanLease { timeout: Duration, lease: Duration },
    /// The HTTP client.
    #[error(transparent)]
    Client(#[from] ClientBuildError),
}

/// When a scheduled refresh finds a connection due, besides the read margin: an access token
/// expiring before `expiring_before`, or tokens last refreshed (or authorized) before
/// `idle_before`.
#[derive(Clone, Copy, Debug)]
pub struct ScheduledDue {
    pub expiring_before: DateTime<Utc>,
    pub idle_before: DateTime<Utc>,
}

impl ScheduledDue {
    /// Whether `active` is due by these bounds (refreshability is checked by the caller).
    pub fn covers(&self, active: &ActiveConnection) -> bool {
        let renewed_at = active.last_refreshed_at.unwrap_or(active.authorized_at);
        active
            .expires_at
            .is_some_and(|expires_at| expires_at < self.expiring_before)
            || renewed_at < self.idle_before
    }
}

/// A connection whose token is fresh (or cannot be refreshed: no refresh token, not OAuth 2.0).
#[derive(Clone, Debug)]
pub struct Fresh {
    /// The stream as of the answer.
    pub loaded: Loaded<Connection>,
    /// Its current credentials, opened.
    pub credentials: Credentials,
    /// Whether this call's own lease refreshed them.
    pub refreshed: bool,
}

/// Why a refresh gave no fresh token. Carries no secret.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RefreshError {
    /// The connection was never authorized.
    #[error("the connection does not exist")]
    NotFound,
    /// The connection was deleted.
    #[error("the connection was deleted")]
    Deleted,
    /// The last refresh failed permanently; only a forced refresh or a re-authorization tries
    /// again.
    #[error("refreshing the token failed permanently: {}", describe(&.0.failure))]
    Permanent(RecordedFailure),
    /// The last refresh failed transiently; it is tried again from `retry_at`.
    #[error("refreshing the token failed ({}); retrying from {retry_at}", describe(&.failure.failure))]
    Transient {
        failure: RecordedFailure,
        retry_at: DateTime<Utc>,
    },
    /// The lease was lost before the outcome was appended (only from [`RefreshService::record`];
    /// the protocol itself starts over).
    #[error("the refresh lease was lost before its outcome was recorded")]
    LeaseLost,
    /// The database cannot be reached.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug, broken data, a run of lost races).
    #[error("{0}")]
    Internal(String),
}

fn describe(failure: &RefreshFailure) -> String {
    let mut text = match failure.provider_status {
        Some(status) => format!("the provider answered HTTP {status}"),
        None => "the provider was not reached".to_owned(),
    };
    if let Some(code) = &failure.code {
        text.push_str(&format!(" with {code}"));
    }
    text
}

impl From<CommandError> for RefreshError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Connection(ConnectionRejected::NotFound) => Self::NotFound,
            CommandError::Connection(ConnectionRejected::Deleted) => Self::Deleted,
            CommandError::Store(StoreError::Database(cause))
            | CommandError::Keys(KeyError::Store(StoreError::Database(cause))) => {
                Self::Unavailable(cause)
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<projections::ProjectionError> for RefreshError {
    fn from(e: projections::ProjectionError) -> Self {
        match e {
            projections::ProjectionError::Store(StoreError::Database(cause)) => {
                Self::Unavailable(cause)
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

/// A lease this instance holds: the stream right after it.
#[derive(Clone, Debug)]
pub struct Leased {
    /// The stream as of the lease (`version` is the lease's).
    pub loaded: Loaded<Connection>,
    /// The lease's id.
    pub lease_id: Uuid,
}

/// What the provider answered: the new credentials and whether the refresh token rotated, or
/// the classified failure.
pub type ProviderAnswer = Result<(Credentials, bool), RefreshFailure>;

type SharedRefresh = Shared<BoxFuture<'static, Result<Fresh, RefreshError>>>;

/// Counters of the refresh service, for `/metrics`.
#[derive(Debug, Default)]
pub struct RefreshCounters {
    /// Provider refresh calls, by trigger: read, schedule, force, rejected.
    pub provider_calls: [AtomicU64; 4],
    /// Outcomes by trigger (read, schedule, force, rejected) and outcome (refreshed, failed
    /// permanently, failed transiently, lease lost).
    pub outcomes: [[AtomicU64; 4]; 4],
    /// Callers that joined an in-process refresh.
    pub joined: AtomicU64,
    /// Waits on another holder's lease.
    pub lease_waits: AtomicU64,
    /// Sum of provider call durations, in microseconds.
    pub provider_micros: AtomicU64,
}

/// The refresh service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RefreshService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: Commands,
    /// Where the integrations (client id and sealed secret) are read from.
    read_models: ReadModels,
    catalog: Arc<Catalog>,
    client: ProviderClient,
    settings: RefreshSettings,
    in_flight: Mutex<HashMap<(StreamId, bool), (u64, SharedRefresh)>>,
    next_id: AtomicU64,
    counters: RefreshCounters,
}

impl RefreshService {
    /// A service refreshing through `commands`, with templates from `catalog`. Refuses a
    /// provider timeout that is not strictly shorter than the lease.
    pub fn new(
        commands: Commands,
        read_models: ReadModels,
        catalog: Arc<Catalog>,
        settings: RefreshSettings,
    ) -> Result<Self, SettingsError> {
        if settings.provider_timeout >= settings.lease {
            return Err(SettingsError::TimeoutNotShorterThanLease {
                timeout: settings.provider_timeout,
                lease: settings.lease,
            });
        }
        let client = ProviderClient::new(settings.provider_timeout)?;
        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                read_models,
                catalog,
                client,
                settings,
                in_flight: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                counters: RefreshCounters::default(),
            }),
        })
    }

    /// The counters.
    pub fn counters(&self) -> &RefreshCounters {
        &self.inner.counters
    }

    /// Whether `active`'s token is due at `now`: OAuth 2.0 with a refresh token, and an expiry
    /// within the margin. A token with no known expiry is never due (only a forced refresh
    /// refreshes it).
    pub fn needs_refresh(&self, active: &ActiveConnection, now: DateTime<Utc>) -> bool {
        self.inner.needs_refresh(active, now)
    }

    /// A fresh token for the connection, refreshing it if it is due (or if `trigger` is
    /// [`RefreshTrigger::Force`]) by the protocol of the module docs. Concurrent calls for the
    /// same connection in this process share one refresh.
    pub async fn refresh(
        &self,
        key: &ConnectionKey,
        trigger: RefreshTrigger,
    ) -> Result<Fresh, RefreshError> {
        self.refresh_when(key, trigger, None).await
    }

    /// A scheduler's refresh ([`RefreshTrigger::Schedule`]): as [`Self::refresh`], but the
    /// connection is also due when `due` says so (a window wider than the margin, keep-alive of
    /// idle refresh tokens). One that another scheduler refreshed meanwhile is no longer due and
    /// is answered without calling the provider.
    pub async fn refresh_scheduled(
        &self,
        key: &ConnectionKey,
        due: ScheduledDue,
    ) -> Result<Fresh, RefreshError> {
        self.refresh_when(key, RefreshTrigger::Schedule, Some(due))
            .await
    }

    /// A refresh after the provider rejected the token read at `read_at` (an upstream 401):
    /// refreshed unless it was renewed (refreshed or re-authorized) since, so that any number of
    /// callers that saw the same token rejected cause one provider call.
    pub async fn refresh_rejected(
        &self,
        key: &ConnectionKey,
        read_at: DateTime<Utc>,
    ) -> Result<Fresh, RefreshError> {
        let due = ScheduledDue {
            expiring_before: DateTime::<Utc>::MIN_UTC,
            idle_before: read_at,
        };
        self.refresh_when(key, RefreshTrigger::Rejected, Some(due))
            .await
    }

    async fn refresh_when(
        &self,
        key: &ConnectionKey,
        trigger: RefreshTrigger,
        due: Option<ScheduledDue>,
    ) -> Result<Fresh, RefreshError> {
        let stream_id = key.stream_id();
        let slot = (stream_id, trigger == RefreshTrigger::Force);
        let shared = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((_, shared)) = in_flight.get(&slot) {
                self.inner.counters.joined.fetch_add(1, Ordering::Relaxed);
                shared.clone()
            } else {
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                let inner = self.inner.clone();
                let (key, owned_slot) = (key.clone(), slot.clone());
                // Spawned: the refresh runs to its outcome even if every caller goes away. It
                // logs in the span of the caller that started it (a scheduler tick) and names
                // the request that started it, if one did.
                let refresh = async move {
                    // A query the database never answers (a hung pooler) would keep this attempt,
                    // and every later caller that joins it, waiting for good. Past twice the
                    // lease, another instance may have taken over anyway: give it up.
                    let limit = inner.settings.lease.saturating_mul(2);
                    let attempt = inner.ensure_fresh(&key, trigger, due);
                    let result = tokio::time::timeout(limit, attempt)
                        .await
                        .unwrap_or_else(|_| {
                            tracing::warn!(
                                connection_id = key.connection_id(),
                                limit_ms = limit.as_millis() as u64,
                                "refresh: the attempt did not finish within twice the lease (a \
                             database query unanswered?); given up"
                            );
                            Err(RefreshError::Unavailable(format!(
                                "the refresh did not finish within {limit:?}"
                            )))
                        });
                    let mut in_flight = inner
                        .in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if in_flight.get(&owned_slot).is_some_and(|(i, _)| *i == id) {
                        in_flight.remove(&owned_slot);
                    }
                    result
                };
                let task = tokio::spawn(tracing::Instrument::instrument(
                    domain::log_scope::carried(refresh),
                    tracing::Span::current(),
                ));
                let shared = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(RefreshError::Internal(format!(
                            "the refresh task failed: {e}"
                        )))
                    })
                }
                .boxed()
                .shared();
                in_flight.insert(slot, (id, shared.clone()));
                shared
            }
        };
        shared.await
    }

    /// Step 3 alone: loads the head and takes the lease on it (one attempt). For tests that
    /// play a refresher that dies between steps.
    pub async fn lease(
        &self,
        key: &ConnectionKey,
        trigger: RefreshTrigger,
    ) -> Result<Leased, RefreshError> {
        let loaded = self.inner.head(key).await?;
        self.inner.lease(loaded, trigger).await
    }

    /// Step 4 alone: the provider's answer to a refresh under `leased`.
    pub async fn call_provider(&self, leased: &Leased) -> Result<ProviderAnswer, RefreshError> {
        self.inner
            .call_provider(leased, RefreshTrigger::Force)
            .await
    }

    /// Step 5 alone: appends the outcome under the fence.
    pub async fn record(
        &self,
        leased: Leased,
        answer: ProviderAnswer,
    ) -> Result<Fresh, RefreshError> {
        self.inner.record(leased, answer).await
    }
}

/// The counters' index of a trigger: read, schedule, force, rejected.
fn trigger_slot(trigger: RefreshTrigger) -> usize {
    match trigger {
        RefreshTrigger::Read => 0,
        RefreshTrigger::Schedule => 1,
        RefreshTrigger::Force => 2,
        RefreshTrigger::Rejected => 3,
    }
}
