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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::catalog::{self, Catalog};
use domain::commands::{CommandError, Commands, LeaseRefresh, Loaded};
use domain::connection::{
    ActiveConnection, Connection, ConnectionKey, ConnectionRejected, CredentialsType, FailureClass,
    RecordedFailure, RefreshFailure, RefreshTrigger,
};
use domain::credentials::Credentials;
use domain::keys::KeyError;
use domain::store::{StoreError, StreamId};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde_json::Value;
use uuid::Uuid;

use crate::provider::{ClientBuildError, ProviderClient, TokenError, TokenRequest};

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
    /// Provider refresh calls, by trigger: read, schedule, force.
    pub provider_calls: [AtomicU64; 3],
    /// Outcomes by trigger (read, schedule, force) and outcome (refreshed, failed permanently,
    /// failed transiently, lease lost).
    pub outcomes: [[AtomicU64; 4]; 3],
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
                // logs in the span of the caller that started it (a request, a scheduler tick).
                let refresh = async move {
                    let result = inner.ensure_fresh(&key, trigger, due).await;
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
                    refresh,
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

/// The counters' index of a trigger: read, schedule, force.
fn trigger_slot(trigger: RefreshTrigger) -> usize {
    match trigger {
        RefreshTrigger::Read => 0,
        RefreshTrigger::Schedule => 1,
        RefreshTrigger::Force => 2,
    }
}

impl Inner {
    fn needs_refresh(&self, active: &ActiveConnection, now: DateTime<Utc>) -> bool {
        if active.credentials_type != CredentialsType::Oauth2 || !active.has_refresh_token {
            return false;
        }
        let Some(expires_at) = active.expires_at else {
            return false;
        };
        let margin = self
            .catalog
            .get(&active.provider)
            .and_then(|template| template.token_expiration_buffer)
            .map_or(self.settings.margin, Duration::from_secs);
        let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
        expires_at.signed_duration_since(now) < margin
    }

    /// When a transiently failed connection may be tried again, if it failed transiently last.
    fn retry_at(active: &ActiveConnection) -> Option<DateTime<Utc>> {
        let last = active.last_failure.as_ref()?;
        if last.failure.class != FailureClass::Transient {
            return None;
        }
        let exponent = active
            .consecutive_transient_failures
            .saturating_sub(1)
            .min(16);
        let wait = TRANSIENT_BACKOFF_BASE
            .saturating_mul(1 << exponent)
            .min(TRANSIENT_BACKOFF_CAP);
        Some(last.failed_at + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX))
    }

    /// The protocol of the module docs.
    #[tracing::instrument(
        name = "refresh.ensure_fresh",
        skip_all,
        fields(
            provider_config_key = %key.provider_config_key(),
            connection_id = %key.connection_id(),
            trigger = ?trigger,
        )
    )]
    async fn ensure_fresh(
        &self,
        key: &ConnectionKey,
        trigger: RefreshTrigger,
        due: Option<ScheduledDue>,
    ) -> Result<Fresh, RefreshError> {
        let forced = trigger == RefreshTrigger::Force;
        let requested_at = Utc::now();
        for _ in 0..MAX_ROUNDS {
            // 1. The head: from the read model's snapshot plus the events after it.
            let loaded = self.head(key).await?;
            let now = Utc::now();
            let active = match &loaded.state {
                Connection::Active(active) => active,
                Connection::NeverAuthorized => return Err(RefreshError::NotFound),
                Connection::Deleted(_) => return Err(RefreshError::Deleted),
            };
            // A forced refresh is satisfied by any refresh (or authorization) since it was asked.
            let renewed_since = active.authorized_at >= requested_at
                || active.last_refreshed_at.is_some_and(|t| t >= requested_at);
            let refreshable =
                active.credentials_type == CredentialsType::Oauth2 && active.has_refresh_token;
            if !refreshable
                || (forced && renewed_since)
                || (!forced
                    && !self.needs_refresh(active, now)
                    && !due.is_some_and(|due| due.covers(active)))
            {
                return self.fresh(loaded, false).await;
            }
            // 2. Someone holds the lease: wait for its outcome or its expiry.
            if let Some(lease) = &active.lease
                && !lease.is_expired_at(now)
            {
                let until = lease.expires_at;
                self.wait_for_outcome(&loaded, until).await?;
                continue;
            }
            if !forced {
                if let Some(blocking) = &active.blocking_failure {
                    return Err(RefreshError::Permanent(blocking.clone()));
                }
                if let (Some(retry_at), Some(failure)) =
                    (Self::retry_at(active), &active.last_failure)
                    && now < retry_at
                {
                    return Err(RefreshError::Transient {
                        failure: failure.clone(),
                        retry_at,
                    });
                }
            }
            // 3. The lease.
            let leased = match self.lease(loaded, trigger).await {
                Ok(leased) => leased,
                Err(RefreshError::LeaseLost) => continue,
                Err(e) => return Err(e),
            };
            // 4. The provider.
            let answer = self.call_provider(&leased, trigger).await?;
            // 5. The outcome, fenced.
            match self.record(leased, answer).await {
                Err(RefreshError::LeaseLost) => continue,
                other => return other,
            }
        }
        Err(RefreshError::Internal(format!(
            "the connection kept changing; gave up after {MAX_ROUNDS} rounds"
        )))
    }

    /// The connection at its stream's head (from the read model's snapshot when the command
    /// service has snapshots, see [`Commands::with_snapshots`]).
    async fn head(&self, key: &ConnectionKey) -> Result<Loaded<Connection>, RefreshError> {
        Ok(self.commands.load_connection(key).await?)
    }

    /// Takes the lease on `loaded` (one attempt). A lost race is [`RefreshError::LeaseLost`].
    async fn lease(
        &self,
        loaded: Loaded<Connection>,
        trigger: RefreshTrigger,
    ) -> Result<Leased, RefreshError> {
        let lease_id = Uuid::new_v4();
        let lease = LeaseRefresh {
            lease_id,
            holder: self.settings.holder.clone(),
            trigger,
            lease_duration: chrono::Duration::from_std(self.settings.lease)
                .unwrap_or(chrono::Duration::MAX),
            now: Utc::now(),
        };
        match self.commands.lease_refresh(loaded, lease).await {
            Ok(loaded) => Ok(Leased { loaded, lease_id }),
            Err(
                CommandError::Store(StoreError::Conflict { .. })
                | CommandError::Connection(ConnectionRejected::LeaseHeld { .. }),
            ) => Err(RefreshError::LeaseLost),
            Err(CommandError::Connection(ConnectionRejected::RefreshBlocked { .. })) => {
                Err(RefreshError::LeaseLost)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until an event follows `loaded.version` or `until` passes.
    async fn wait_for_outcome(
        &self,
        loaded: &Loaded<Connection>,
        until: DateTime<Utc>,
    ) -> Result<(), RefreshError> {
        self.counters.lease_waits.fetch_add(1, Ordering::Relaxed);
        let events = self.commands.backend().events();
        // Made before the first read, so no commit after that read goes unnoticed.
        let mut listener = events.listener();
        loop {
            if !events
                .read_stream(&loaded.stream_id, loaded.version)
                .await
                .map_err(CommandError::from)?
                .is_empty()
            {
                return Ok(());
            }
            let now = Utc::now();
            if now >= until {
                return Ok(());
            }
            let remaining = (until - now).to_std().unwrap_or_default();
            listener.wait_at_most(remaining.min(WAIT_POLL)).await;
        }
    }

    /// The provider's answer to a refresh of `leased`'s current credentials.
    async fn call_provider(
        &self,
        leased: &Leased,
        trigger: RefreshTrigger,
    ) -> Result<ProviderAnswer, RefreshError> {
        let Some(active) = leased.loaded.state.active() else {
            return Err(RefreshError::Deleted);
        };
        let permanent = |code: &str, description: String| RefreshFailure {
            class: FailureClass::Permanent,
            code: Some(code.to_owned()),
            provider_status: None,
            description: Some(description),
        };
        let credentials = self.commands.reveal_credentials(active).await?;
        let Credentials::OAuth2 {
            refresh_token: Some(refresh_token),
            raw: old_raw,
            ..
        } = &credentials
        else {
            return Err(RefreshError::Internal(
                "the leased connection has no OAuth 2.0 refresh token".into(),
            ));
        };
        let backend = self.commands.backend();
        let Some(integration) =
            projections::queries::find_integration(backend, &active.provider_config_key).await?
        else {
            return Ok(Err(permanent(
                "unknown_provider_config",
                format!("no integration {:?}", active.provider_config_key),
            )));
        };
        let integration = integration.integration;
        let Some(template) = self.catalog.get(&integration.provider) else {
            return Ok(Err(permanent(
                "unknown_provider_template",
                format!("no provider template {:?}", integration.provider),
            )));
        };
        let client_secret = self.commands.reveal_client_secret(&integration).await?;
        let config_params: BTreeMap<String, String> = active
            .connection_config
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect();
        let url = template
            .refresh_url
            .as_deref()
            .unwrap_or(&template.token_url);
        let url = match catalog::interpolate_url(url, &config_params) {
            Ok(url) => url,
            Err(e) => return Ok(Err(permanent("invalid_token_url", e.to_string()))),
        };
        let extra = if template.refresh_params.is_empty() {
            &template.token_params
        } else {
            &template.refresh_params
        };
        let mut params: Vec<(String, String)> =
            extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        params.push(("grant_type".into(), "refresh_token".into()));
        params.push(("refresh_token".into(), refresh_token.clone()));
        let request = TokenRequest {
            token_url: &url,
            client_id: &integration.oauth_client_id,
            client_secret: &client_secret,
            authorization_method: template.authorization_method,
            body_format: template.body_format,
            params,
        };
        self.counters.provider_calls[trigger_slot(trigger)].fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        // The client's own timeout bounds the call; this one is a second guard.
        let answer = match tokio::time::timeout(
            self.settings.provider_timeout,
            self.client.request_token(&request, Utc::now()),
        )
        .await
        {
            Ok(answer) => answer,
            Err(_) => Err(TokenError::Timeout(self.settings.provider_timeout)),
        };
        self.counters.provider_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(match answer {
            Ok(token) => {
                let rotated = token
                    .refresh_token
                    .as_ref()
                    .is_some_and(|new| new != refresh_token);
                // The new answer's fields over the old ones: a refresh answer often lacks fields
                // the authorization had (and the kept refresh token stays in `raw` too).
                let mut raw = old_raw.as_object().cloned().unwrap_or_default();
                raw.extend(token.raw);
                Ok((
                    Credentials::OAuth2 {
                        access_token: token.access_token,
                        refresh_token: token.refresh_token.or_else(|| Some(refresh_token.clone())),
                        expires_at: token.expires_at,
                        raw: Value::Object(raw),
                    },
                    rotated,
                ))
            }
            Err(e) => Err(classify(&e)),
        })
    }

    /// Appends the outcome under the fence.
    async fn record(&self, leased: Leased, answer: ProviderAnswer) -> Result<Fresh, RefreshError> {
        let Leased { loaded, lease_id } = leased;
        let stream_id = loaded.stream_id.clone();
        // The lease this outcome closes says what started the refresh.
        let trigger = match &loaded.state {
            Connection::Active(active) => active.lease.as_ref().map(|lease| lease.trigger),
            _ => None,
        };
        let outcomes =
            &self.counters.outcomes[trigger_slot(trigger.unwrap_or(RefreshTrigger::Read))];
        let result = match &answer {
            Ok((credentials, rotated)) => {
                self.commands
                    .complete_refresh(loaded, lease_id, credentials, *rotated, Utc::now())
                    .await
            }
            Err(failure) => {
                self.commands
                    .fail_refresh(loaded, lease_id, failure.clone(), Utc::now())
                    .await
            }
        };
        let loaded = match result {
            Ok(loaded) => loaded,
            Err(
                CommandError::Connection(ConnectionRejected::LeaseNotHeld { .. })
                | CommandError::Keys(KeyError::Shredded(_)),
            ) => {
                outcomes[3].fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    stream_id = %stream_id,
                    lease_id = %lease_id,
                    "the refresh lease was lost (another lease, a re-authorization or a deletion \
                     came first); the provider's answer is dropped"
                );
                return Err(RefreshError::LeaseLost);
            }
            Err(e) => return Err(e.into()),
        };
        match answer {
            Ok((credentials, _)) => {
                outcomes[0].fetch_add(1, Ordering::Relaxed);
                tracing::info!(stream_version = loaded.version, "tokens refreshed");
                Ok(Fresh {
                    loaded,
                    credentials,
                    refreshed: true,
                })
            }
            Err(_) => {
                let Some(active) = loaded.state.active() else {
                    return Err(RefreshError::Deleted);
                };
                let Some(failure) = active.last_failure.clone() else {
                    return Err(RefreshError::Internal(
                        "a recorded failure is missing from the state".into(),
                    ));
                };
                tracing::warn!(
                    stream_version = loaded.version,
                    class = ?failure.failure.class,
                    code = failure.failure.code.as_deref().unwrap_or(""),
                    "refresh failed"
                );
                match failure.failure.class {
                    FailureClass::Permanent => {
                        outcomes[1].fetch_add(1, Ordering::Relaxed);
                        Err(RefreshError::Permanent(failure))
                    }
                    FailureClass::Transient => {
                        outcomes[2].fetch_add(1, Ordering::Relaxed);
                        let retry_at = Self::retry_at(active).unwrap_or(failure.failed_at);
                        Err(RefreshError::Transient { failure, retry_at })
                    }
                }
            }
        }
    }

    /// `loaded` with its credentials opened.
    async fn fresh(
        &self,
        loaded: Loaded<Connection>,
        refreshed: bool,
    ) -> Result<Fresh, RefreshError> {
        let Some(active) = loaded.state.active() else {
            return Err(RefreshError::Deleted);
        };
        let credentials = self.commands.reveal_credentials(active).await?;
        Ok(Fresh {
            loaded,
            credentials,
            refreshed,
        })
    }
}

/// The failure a provider error is recorded as. No secret: [`TokenError`] messages carry none.
fn classify(error: &TokenError) -> RefreshFailure {
    let class = match error {
        // A 2xx that is not a token answer is usually a maintenance page: try again later.
        TokenError::Malformed(_) => FailureClass::Transient,
        other if other.is_retryable() => FailureClass::Transient,
        _ => FailureClass::Permanent,
    };
    let (code, provider_status) = match error {
        TokenError::Refused { status, error, .. } => (error.clone(), Some(*status)),
        TokenError::Timeout(_) => (Some("timeout".to_owned()), None),
        TokenError::Network(_) => (Some("network_error".to_owned()), None),
        TokenError::InvalidUrl(_) => (Some("invalid_token_url".to_owned()), None),
        TokenError::Malformed(_) => (Some("malformed_response".to_owned()), None),
    };
    RefreshFailure {
        class,
        code,
        provider_status,
        description: Some(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_grant_is_permanent_and_server_errors_timeouts_are_transient() {
        let refused = |status| TokenError::Refused {
            status,
            error: Some("invalid_grant".into()),
            description: None,
        };
        assert_eq!(classify(&refused(400)).class, FailureClass::Permanent);
        assert_eq!(classify(&refused(401)).class, FailureClass::Permanent);
        assert_eq!(classify(&refused(503)).class, FailureClass::Transient);
        assert_eq!(classify(&refused(429)).class, FailureClass::Transient);
        let timeout = classify(&TokenError::Timeout(Duration::from_secs(1)));
        assert_eq!(timeout.class, FailureClass::Transient);
        assert_eq!(timeout.code.as_deref(), Some("timeout"));
        let failure = classify(&refused(400));
        assert_eq!(failure.code.as_deref(), Some("invalid_grant"));
        assert_eq!(failure.provider_status, Some(400));
    }
}
