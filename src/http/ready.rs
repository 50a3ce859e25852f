//! `GET /ready`: whether this instance should get traffic (`/health` only says it is alive).
//!
//! Ready means: the database answers, its schema is at (or past) the latest migration this
//! binary embeds, this instance's master key is still one the database knows (a rotation run
//! with another key retires it), and every projection is at most `GRANTLINE_READY_MAX_LAG`
//! events behind the log. The answer is `200 {"status": "ready", "checks": {...}, "failing": []}` or
//! `503 {"status": "not_ready", "checks": {...}, "failing": ["projections", ...]}`; each check is
//! `{"status": "ok" | "failing" | "skipped", ...}` with a `message` unless ok. Every check has a
//! deadline, so a database that hangs makes a 503, not a hung probe. No secret key is needed:
//! load balancers call it, and it tells nothing about connections or credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::state::AppState;

/// The deadline of each check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /ready`: whether this instance should get traffic.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// Each check by name (`database`, `migrations`, `projections`): `{"status": "ok" |
    /// "failing" | "skipped", "message"?, …}`.
    #[schema(value_type = Object)]
    checks: BTreeMap<&'static str, Check>,
    /// The names of the checks that failed.
    failing: Vec<&'static str>,
}

/// One check: how it went, why when not ok, and what it measured.
#[derive(Default, Serialize)]
struct Check {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// The migration the schema is at, and the one this binary needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<i64>,
    /// The lag allowed, and each projection's.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_lag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<Map<String, Value>>,
}

impl Check {
    fn ok() -> Self {
        Self {
            status: "ok",
            ..Self::default()
        }
    }

    fn failing(message: impl Into<String>) -> Self {
        Self {
            status: "failing",
            message: Some(message.into()),
            ..Self::default()
        }
    }

    fn skipped() -> Self {
        Self {
            status: "skipped",
            message: Some("the database does not answer".into()),
            ..Self::default()
        }
    }
}

/// The readiness answer.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "service",
    responses(
        (status = 200, description = "Ready for traffic", body = Readiness),
        (status = 503, description = "Not ready; `failing` names the checks that failed",
            body = Readiness),
    ),
    security(()),
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (checks, failing) = check(&state).await;
    let (status, word) = if failing.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let readiness = Readiness {
        status: word,
        checks,
        failing,
    };
    (status, Json(readiness))
}

/// Runs the checks; returns them by name, and the names of those that failed.
async fn check(state: &AppState) -> (BTreeMap<&'static str, Check>, Vec<&'static str>) {
    let mut checks = BTreeMap::new();
    let mut failed = Vec::new();
    let applied = match tokio::time::timeout(CHECK_TIMEOUT, state.backend.applied_migration()).await
    {
        Ok(Ok(applied)) => applied,
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: the database does not answer");
            checks.insert("database", Check::failing("the database does not answer"));
            checks.insert("migrations", Check::skipped());
            checks.insert("projections", Check::skipped());
            checks.insert("master_key", Check::skipped());
            return (checks, vec!["database"]);
        }
        Err(_) => {
            tracing::warn!("readiness: the database did not answer in time");
            checks.insert(
                "database",
                Check::failing(format!(
                    "the database did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                )),
            );
            checks.insert("migrations", Check::skipped());
            checks.insert("projections", Check::skipped());
            checks.insert("master_key", Check::skipped());
            return (checks, vec!["database"]);
        }
    };
    checks.insert("database", Check::ok());

    let expected = state.backend.latest_migration();
    let mut migrations = if applied >= expected {
        Check::ok()
    } else {
        failed.push("migrations");
        Check::failing(format!(
            "the schema is at migration {applied}, this binary needs {expected}: run \
             `grantline migrate` or restart an instance of this version"
        ))
    };
    migrations.applied = Some(applied);
    migrations.expected = Some(expected);
    checks.insert("migrations", migrations);

    let max_lag = state.config.ready_max_lag;
    match tokio::time::timeout(CHECK_TIMEOUT, state.runner.status()).await {
        Ok(Ok(statuses)) => {
            let lag: Map<String, Value> = statuses
                .iter()
                .map(|s| (s.name.clone(), s.lag.into()))
                .collect();
            let behind: Vec<&str> = statuses
                .iter()
                .filter(|s| u64::try_from(s.lag).unwrap_or(0) > max_lag)
                .map(|s| s.name.as_str())
                .collect();
            let mut check = if behind.is_empty() {
                Check::ok()
            } else {
                failed.push("projections");
                Check::failing(format!(
                    "more than {max_lag} events behind the log: {}",
                    behind.join(", ")
                ))
            };
            check.max_lag = Some(max_lag);
            check.lag = Some(lag);
            checks.insert("projections", check);
        }
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: projection status unavailable");
            checks.insert(
                "projections",
                Check::failing("the projection checkpoints cannot be read"),
            );
            failed.push("projections");
        }
        Err(_) => {
            checks.insert(
                "projections",
                Check::failing(format!(
                    "the projection checkpoints were not read within {}s",
                    CHECK_TIMEOUT.as_secs()
                )),
            );
            failed.push("projections");
        }
    }
    let master_key = match tokio::time::timeout(
        CHECK_TIMEOUT,
        state.commands.vault().active_key_retired(),
    )
    .await
    {
        Ok(Ok(false)) => Check::ok(),
        Ok(Ok(true)) => Check::failing(format!(
            "this instance's master key (id {}) was retired by a key rotation: restart it with \
             the current key in GRANTLINE_ENCRYPTION_KEY",
            state.commands.vault().active_key_id()
        )),
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: the master keys were not read");
            Check::failing("the master keys were not read")
        }
        Err(_) => Check::failing(format!(
            "the master keys were not read within {}s",
            CHECK_TIMEOUT.as_secs()
        )),
    };
    if master_key.status != "ok" {
        failed.push("master_key");
    }
    checks.insert("master_key", master_key);
    (checks, failed)
}
