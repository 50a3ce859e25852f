//! `/admin/…`: what operators see of the loops that follow the log, on any instance.
//! - `GET /admin/projections`: how far each read model is behind the log (the same as
//!   `grantline projections status`).
//! - `GET /admin/webhooks`: each webhook target's progress and its latest deliveries. Targets are
//!   shown redacted (scheme, host, port and path): a URL may carry credentials in its userinfo or
//!   query.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;
use workers::webhooks::{DeliveryStatus, TargetStatus};

use super::ApiError;
use crate::state::AppState;

/// `GET /admin/projections`: each projection's checkpoint and lag.
#[derive(Serialize, ToSchema)]
pub struct ProjectionsStatus {
    projections: Vec<ProjectionStatus>,
}

/// One projection's progress.
#[derive(Serialize, ToSchema)]
pub struct ProjectionStatus {
    name: String,
    /// `commit:position` of the last applied event.
    checkpoint: String,
    checkpoint_position: i64,
    head_position: i64,
    /// Events after the checkpoint that a reader can see now (counted up to 10,000).
    lag: i64,
    /// Everything committed up to `head_position` is applied. (`checkpoint_position` may stay
    /// below `head_position` then: commit order is not position order on PostgreSQL.)
    caught_up: bool,
    #[schema(value_type = String, format = DateTime)]
    updated_at: DateTime<Utc>,
    last_error: Option<String>,
}

impl From<projections::ProjectionStatus> for ProjectionStatus {
    fn from(status: projections::ProjectionStatus) -> Self {
        Self {
            name: status.name,
            checkpoint: status.checkpoint,
            checkpoint_position: status.checkpoint_position,
            head_position: status.head_position,
            lag: status.lag,
            caught_up: status.caught_up,
            updated_at: status.updated_at,
            last_error: status.last_error,
        }
    }
}

/// `GET /admin/projections`: each projection's checkpoint, the head and the lag.
#[utoipa::path(
    get,
    path = "/admin/projections",
    tag = "service",
    responses(
        (status = 200, description = "Each projection's checkpoint and lag",
            body = ProjectionsStatus),
        (status = 503, description = "The database cannot be reached", body = super::error::ErrorBody),
    ),
)]
pub async fn projections_status(
    State(state): State<AppState>,
) -> Result<Json<ProjectionsStatus>, ApiError> {
    let statuses = state.runner.status().await?;
    Ok(Json(ProjectionsStatus {
        projections: statuses.into_iter().map(ProjectionStatus::from).collect(),
    }))
}

/// How many of a target's latest deliveries are shown.
const RECENT_DELIVERIES: usize = 20;

/// `GET /admin/webhooks`: each webhook target's progress and latest deliveries.
#[derive(Serialize, ToSchema)]
pub struct WebhooksStatus {
    /// Per target (its URL redacted to scheme, host, port and path): checkpoint, lag, lease
    /// holder, last error and the most recent deliveries. Empty without webhook targets.
    targets: Vec<WebhookTarget>,
}

/// One webhook target: a URL with its own checkpoint in the log, like a projection.
#[derive(Serialize, ToSchema)]
pub struct WebhookTarget {
    /// Scheme, host, port and path only (a URL may carry credentials).
    url: String,
    /// The position of the last event passed (`commit:global`).
    checkpoint: String,
    checkpoint_position: i64,
    head_position: i64,
    /// Events after the checkpoint (counted up to 10,000).
    lag: i64,
    /// Everything committed up to `head_position` is passed.
    caught_up: bool,
    /// The instance delivering to this target, while its lease lasts.
    lease_holder: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    lease_expires_at: Option<DateTime<Utc>>,
    #[schema(value_type = String, format = DateTime)]
    updated_at: DateTime<Utc>,
    last_error: Option<String>,
    /// The most recent deliveries, newest first.
    deliveries: Vec<WebhookDelivery>,
}

/// The attempts to deliver one event's webhook to one target.
#[derive(Serialize, ToSchema)]
pub struct WebhookDelivery {
    /// The event's id, also the webhook's `id` and `Idempotency-Key`.
    #[schema(value_type = String, format = "uuid")]
    event_id: Uuid,
    /// `connection.created`, `connection.reauthorized`, `connection.deleted`, `refresh.failed`
    /// or `refresh.recovered`.
    event: String,
    global_position: i64,
    /// `pending`, `retrying` or `delivered`.
    status: String,
    attempts: i64,
    /// The receiver's last HTTP status, if it answered.
    last_status: Option<i64>,
    last_error: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    first_attempt_at: DateTime<Utc>,
    #[schema(value_type = String, format = DateTime)]
    last_attempt_at: DateTime<Utc>,
    /// When the next attempt is due (`retrying`).
    #[schema(value_type = Option<String>, format = DateTime)]
    next_attempt_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<String>, format = DateTime)]
    delivered_at: Option<DateTime<Utc>>,
}

impl From<TargetStatus> for WebhookTarget {
    fn from(target: TargetStatus) -> Self {
        Self {
            url: target.url,
            checkpoint: target.checkpoint,
            checkpoint_position: target.checkpoint_position,
            head_position: target.head_position,
            lag: target.lag,
            caught_up: target.caught_up,
            lease_holder: target.lease_holder,
            lease_expires_at: target.lease_expires_at,
            updated_at: target.updated_at,
            last_error: target.last_error,
            deliveries: target
                .deliveries
                .into_iter()
                .map(WebhookDelivery::from)
                .collect(),
        }
    }
}

impl From<DeliveryStatus> for WebhookDelivery {
    fn from(delivery: DeliveryStatus) -> Self {
        Self {
            event_id: delivery.event_id,
            event: delivery.event,
            global_position: delivery.global_position,
            status: delivery.status,
            attempts: delivery.attempts,
            last_status: delivery.last_status,
            last_error: delivery.last_error,
            first_attempt_at: delivery.first_attempt_at,
            last_attempt_at: delivery.last_attempt_at,
            next_attempt_at: delivery.next_attempt_at,
            delivered_at: delivery.delivered_at,
        }
    }
}

/// `GET /admin/webhooks`: per target its checkpoint, lag, lease holder, last error and the most
/// recent deliveries (status, attempts, last HTTP status and error, times). No targets when
/// `GRANTLINE_WEBHOOK_URLS` is empty on this instance.
#[utoipa::path(
    get,
    path = "/admin/webhooks",
    tag = "service",
    responses(
        (status = 200, description = "Each webhook target's progress and latest deliveries",
            body = WebhooksStatus),
        (status = 503, description = "The database cannot be reached", body = super::error::ErrorBody),
    ),
)]
pub async fn webhooks_status(
    State(state): State<AppState>,
) -> Result<Json<WebhooksStatus>, ApiError> {
    let targets = match &state.webhooks {
        Some(webhooks) => webhooks.status(RECENT_DELIVERIES).await?,
        None => Vec::new(),
    };
    Ok(Json(WebhooksStatus {
        targets: targets.into_iter().map(WebhookTarget::from).collect(),
    }))
}
