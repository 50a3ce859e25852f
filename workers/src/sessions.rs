//! The session sweeper: deletes the flow sessions whose `state` has expired, expired connect
//! sessions, and the sign-outs of dashboard sessions that have expired anyway.
//!
//! A callback already refuses an expired session ([`domain::oauth_session::FlowSession`] is taken
//! once and checked against the clock), so sweeping is housekeeping, not security: it keeps
//! `oauth_sessions` to the flows that can still finish. Any number of instances may sweep the same
//! database; a session is deleted once whoever gets there first.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{Backend, StoreError, answered_within};

/// How often expired sessions are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes the sessions expired at `now`; returns how many.
pub async fn sweep_once(backend: &Backend, now: DateTime<Utc>) -> Result<u64, StoreError> {
    let swept = backend.sessions().sweep_sessions(now).await?
        + backend
            .connect_sessions()
            .sweep_connect_sessions(now)
            .await?
        + backend.sign_outs().sweep_sign_outs(now).await?;
    if swept > 0 {
        tracing::debug!(swept, "expired oauth, connect and dashboard sessions swept");
    }
    Ok(swept)
}

/// Sweeps expired sessions every [`SWEEP_INTERVAL`] until `shutdown` completes. A failed sweep is
/// logged and tried again at the next tick.
pub async fn run(backend: Backend, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {
                // Bounded: a database that stopped answering on an open connection (a hung
                // pooler) must not stop the sweeps for good.
                let swept = answered_within(SWEEP_INTERVAL, sweep_once(&backend, Utc::now()));
                if let Err(e) = swept.await {
                    tracing::warn!(error.message = %e, "sweeping oauth sessions failed");
                }
            }
        }
    }
}
