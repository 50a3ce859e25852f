//! `GET /connection/:id/history` (and `/connections/…`): a connection's credential history, paged
//! by stream version. Never a secret (see `domain::history`).

use axum::Json;
use axum::extract::State;
use domain::history::HistoryEntry;
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::extract::{ApiPath, ApiQuery, connection_key};
use crate::history::{self, DEFAULT_PAGE, MAX_PAGE};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    provider_config_key: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// The answer: one page of entries, and where the next page starts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = History)]
pub struct HistoryBody {
    provider_config_key: String,
    connection_id: String,
    /// The events in stream order: `stream_version`, `event_id`, `type`, `recorded_at`,
    /// `generation`, and the fields that apply to the type; never a secret.
    #[schema(value_type = Vec<super::openapi::HistoryEntryDoc>)]
    events: Vec<HistoryEntry>,
    next_after: Option<u32>,
}

/// `GET /connection/:id/history?provider_config_key=K[&after=N][&limit=N]`.
#[utoipa::path(
    get,
    path = "/connection/{connection_id}/history",
    tag = "connections",
    params(
        ("connection_id" = String, Path, description = "The connection's id"),
        ("provider_config_key" = String, Query, description = "The integration the connection belongs to"),
        ("after" = Option<u32>, Query, description = "Entries after this stream version (default 0: from the start)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Entries per page (default 100)"),
    ),
    responses(
        (status = 200, description = "One page of the connection's credential history", body = HistoryBody),
        (status = 400, description = "Missing `provider_config_key`, or invalid `after`/`limit`", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn get_history(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryBody>, ApiError> {
    let key = connection_key(connection_id, query.provider_config_key.as_deref())?;
    let after = parse_after(query.after.as_deref())?;
    let limit = parse_limit(query.limit.as_deref())?;
    let page = history::load_page(&state.backend, &key, after, limit).await?;
    let (provider_config_key, connection_id) = key.into_parts();
    Ok(Json(HistoryBody {
        provider_config_key,
        connection_id,
        events: page.entries,
        next_after: page.next_after,
    }))
}

/// `after`: a stream version, 0 (the default) for the start.
fn parse_after(text: Option<&str>) -> Result<u32, ApiError> {
    match text.map(str::trim) {
        None | Some("") => Ok(0),
        Some(text) => text.parse().map_err(|_| {
            ApiError::InvalidQuery(format!(
                "after must be a stream version (a whole number from 0), not {text:?}"
            ))
        }),
    }
}

/// `limit`: 1 to [`MAX_PAGE`] entries, [`DEFAULT_PAGE`] by default.
fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    match text.map(str::trim) {
        None | Some("") => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
            _ => Err(ApiError::InvalidQuery(format!(
                "limit must be a whole number from 1 to {MAX_PAGE}, not {text:?}"
            ))),
        },
    }
}
