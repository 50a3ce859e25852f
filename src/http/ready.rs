//! `GET /ready`: whether this instance should get traffic (`/health` only says it is alive).
//!
//! Ready means: the database answers, its schema is at (or past) the latest migration this
//! binary embeds, and every projection is at most `GRANTLINE_READY_MAX_LAG` events behind the
//! log. The answer is `200 {"status": "ready", "checks": {...}, "failing": []}` or
//! `503 {"status": "not_ready", "checks": {...}, "failing": ["projections", ...]}`; each check is
//! `{"status": "ok" | "failing" | "skipped", ...}` with a `message` unless ok. Every check has a
//! deadline, so a database that hangs makes a 503, not a hung probe. No secret key is needed:
//! load balancers call it, and it tells nothing about connections or credentials.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::state::AppState;

/// The deadline of each check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The readiness answer.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "service",
    responses(
        (status = 200, description = "Ready for traffic", body = super::openapi::Readiness),
        (status = 503, description = "Not ready; `failing` names the checks that failed",
            body = super::openapi::Readiness),
    ),
    security(()),
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let (checks, failing) = check(&state).await;
    let (status, word) = if failing.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let body = json!({ "status": word, "checks": checks, "failing": failing });
    (status, Json(body)).into_response()
}

fn failing(message: impl Into<String>) -> Value {
    json!({ "status": "failing", "message": message.into() })
}

fn skipped() -> Value {
    json!({ "status": "skipped", "message": "the database does not answer" })
}

/// Runs the checks; returns them by name, and the names of those that failed.
async fn check(state: &AppState) -> (Map<String, Value>, Vec<&'static str>) {
    let mut checks = Map::new();
    let mut failed = Vec::new();
    let applied = match tokio::time::timeout(CHECK_TIMEOUT, state.backend.applied_migration()).await
    {
        Ok(Ok(applied)) => applied,
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: the database does not answer");
            checks.insert("database".into(), failing("the database does not answer"));
            checks.insert("migrations".into(), skipped());
            checks.insert("projections".into(), skipped());
            return (checks, vec!["database"]);
        }
        Err(_) => {
            tracing::warn!("readiness: the database did not answer in time");
            checks.insert(
                "database".into(),
                failing(format!(
                    "the database did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                )),
            );
            checks.insert("migrations".into(), skipped());
            checks.insert("projections".into(), skipped());
            return (checks, vec!["database"]);
        }
    };
    checks.insert("database".into(), json!({ "status": "ok" }));

    let expected = state.backend.latest_migration();
    if applied >= expected {
        checks.insert(
            "migrations".into(),
            json!({ "status": "ok", "applied": applied, "expected": expected }),
        );
    } else {
        let mut check = failing(format!(
            "the schema is at migration {applied}, this binary needs {expected}: run \
             `grantline migrate` or restart an instance of this version"
        ));
        check["applied"] = applied.into();
        check["expected"] = expected.into();
        checks.insert("migrations".into(), check);
        failed.push("migrations");
    }

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
                json!({ "status": "ok" })
            } else {
                failed.push("projections");
                failing(format!(
                    "more than {max_lag} events behind the log: {}",
                    behind.join(", ")
                ))
            };
            check["max_lag"] = max_lag.into();
            check["lag"] = Value::Object(lag);
            checks.insert("projections".into(), check);
        }
        Ok(Err(e)) => {
            tracing::warn!(error.message = %e, "readiness: projection status unavailable");
            checks.insert(
                "projections".into(),
                failing("the projection checkpoints cannot be read"),
            );
            failed.push("projections");
        }
        Err(_) => {
            checks.insert(
                "projections".into(),
                failing(format!(
                    "the projection checkpoints were not read within {}s",
                    CHECK_TIMEOUT.as_secs()
                )),
            );
            failed.push("projections");
        }
    }
    (checks, failed)
}
