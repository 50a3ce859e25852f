//! Steps 1–3 and 5 of the protocol (see the module docs of [`crate::refresh`]): load the head,
//! wait out another holder's lease, take the lease, and append the outcome under the fence.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::commands::{CommandError, LeaseRefresh, Loaded};
use domain::connection::{
    ActiveConnection, Connection, ConnectionKey, ConnectionRejected, FailureClass, RefreshTrigger,
};
use domain::keys::KeyError;
use domain::store::StoreError;
use uuid::Uuid;

use super::{
    Fresh, Inner, Leased, MAX_ROUNDS, ProviderAnswer, RefreshError, ScheduledDue,
    TRANSIENT_BACKOFF_BASE, TRANSIENT_BACKOFF_CAP, WAIT_POLL, trigger_slot,
};

/// The first pause before recording a refresh's outcome again when the database is
/// unavailable; it doubles up to [`OUTCOME_RETRY_MAX`].
const OUTCOME_RETRY_FIRST: Duration = Duration::from_millis(250);
const OUTCOME_RETRY_MAX: Duration = Duration::from_secs(4);

impl Inner {
    pub(super) fn needs_refresh(&self, active: &ActiveConnection, now: DateTime<Utc>) -> bool {
        if !active.renewable() {
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
    pub(super) fn retry_at(active: &ActiveConnection) -> Option<DateTime<Utc>> {
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
    pub(super) async fn ensure_fresh(
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
            let refreshable = active.renewable();
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
    pub(super) async fn head(
        &self,
        key: &ConnectionKey,
    ) -> Result<Loaded<Connection>, RefreshError> {
        Ok(self.commands.load_connection(key).await?)
    }

    /// Takes the lease on `loaded` (one attempt). A lost race is [`RefreshError::LeaseLost`].
    pub(super) async fn lease(
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
    pub(super) async fn wait_for_outcome(
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

    /// Appends the outcome under the fence.
    pub(super) async fn record(
        &self,
        leased: Leased,
        answer: ProviderAnswer,
    ) -> Result<Fresh, RefreshError> {
        let Leased { loaded, lease_id } = leased;
        let stream_id = loaded.stream_id.clone();
        // The lease this outcome closes says what started the refresh.
        let trigger = match &loaded.state {
            Connection::Active(active) => active.lease.as_ref().map(|lease| lease.trigger),
            _ => None,
        };
        let outcomes =
            &self.counters.outcomes[trigger_slot(trigger.unwrap_or(RefreshTrigger::Read))];
        // The provider may have rotated the refresh token: its answer is the only copy, so an
        // unreachable database is waited out for as long as the lease lasts (the fence still
        // decides whether the outcome may land), rather than dropping it at the first error.
        let lease_ends = match &loaded.state {
            Connection::Active(active) => active.lease.as_ref().map(|lease| lease.expires_at),
            _ => None,
        }
        .unwrap_or_else(Utc::now);
        let mut pause = OUTCOME_RETRY_FIRST;
        let result = loop {
            let attempt = match &answer {
                Ok((credentials, rotated)) => {
                    self.commands
                        .complete_refresh(
                            loaded.clone(),
                            lease_id,
                            credentials,
                            *rotated,
                            Utc::now(),
                        )
                        .await
                }
                Err(failure) => {
                    self.commands
                        .fail_refresh(loaded.clone(), lease_id, failure.clone(), Utc::now())
                        .await
                }
            };
            let unavailable = matches!(
                &attempt,
                Err(CommandError::Store(StoreError::Database(_))
                    | CommandError::Keys(KeyError::Store(StoreError::Database(_))))
            );
            if !unavailable || Utc::now() + pause >= lease_ends {
                if unavailable && answer.is_ok() {
                    tracing::error!(
                        stream_id = %stream_id,
                        lease_id = %lease_id,
                        "the database stayed unavailable until the refresh lease ended; the \
                         provider's new tokens are dropped (a rotated refresh token is lost)"
                    );
                }
                break attempt;
            }
            tracing::warn!(
                stream_id = %stream_id,
                "the database is unavailable; recording the refresh outcome again shortly"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(OUTCOME_RETRY_MAX);
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
    pub(super) async fn fresh(
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
