//! The HTTP surface. Handlers are thin: extract, call one function, map the answer.

mod error;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};

pub use error::ApiError;

use crate::startup::AppState;

/// All routes of the service.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Liveness: the process is up and serving.
async fn health() -> Json<Value> {
    Json(json!({ "result": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::UnknownRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
