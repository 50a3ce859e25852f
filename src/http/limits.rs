//! The server's limits as the router applies them: a request that announces a body larger than
//! the server takes is refused at once with `413`, before a byte of it is read, and a request
//! that takes longer than `GRANTLINE_REQUEST_TIMEOUT` (a body trickled in, a handler stuck) is
//! answered `408`. Both are counted for `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, BODY_LIMIT};
use crate::state::AppState;

/// Applies the request limits around `next`.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let refused = &state.server_stats.refused;
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|length| length > BODY_LIMIT as u64) {
        refused.body_too_large.fetch_add(1, Ordering::Relaxed);
        return ApiError::PayloadTooLarge.into_response();
    }
    match tokio::time::timeout(state.config.limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            refused.request_timeout.fetch_add(1, Ordering::Relaxed);
            ApiError::RequestTimeout.into_response()
        }
    }
}
