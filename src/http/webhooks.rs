//! `GET /admin/webhooks`: each webhook target's progress and its latest deliveries, for
//! operators. Targets are shown redacted (scheme, host, port and path): a URL may carry
//! credentials in its userinfo or query.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::ApiError;
use crate::state::AppState;

/// How many of a target's latest deliveries are shown.
const RECENT_DELIVERIES: usize = 20;

/// `GET /admin/webhooks`: per target its checkpoint, lag, lease holder, last error and the most
/// recent deliveries (status, attempts, last HTTP status and error, times). No targets when
/// `GRANTLINE_WEBHOOK_URLS` is empty on this instance.
#[utoipa::path(
    get,
    path = "/admin/webhooks",
    tag = "service",
    responses(
        (status = 200, description = "Each webhook target's progress and latest deliveries",
            body = super::openapi::WebhooksStatus),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 503, description = "The database cannot be reached", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn webhooks_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let targets = match &state.webhooks {
        Some(webhooks) => webhooks.status(RECENT_DELIVERIES).await?,
        None => Vec::new(),
    };
    Ok(Json(json!({ "targets": targets })))
}
