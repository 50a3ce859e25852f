//! The HTTP surface. Handlers are thin: extract, call one function, map the answer. Both route
//! families, `/connection…` (the seed) and `/connections…` (current Nango clients), reach the
//! same handlers; unknown query parameters and `Nango-*` headers are ignored.

mod auth;
mod config;
mod connection;
pub mod error;
mod extract;
mod metrics;
mod oauth;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::get;
use axum::{Json, middleware};
use serde_json::{Value, json};

pub use error::ApiError;

use crate::startup::AppState;

/// Largest request body accepted.
const BODY_LIMIT: usize = 1024 * 1024;

/// All routes of the service.
pub fn router(state: AppState) -> Router {
    let mut api = Router::new();
    for family in ["/connection", "/connections"] {
        api = api
            .route(
                family,
                get(connection::list_connections).post(connection::import_connection),
            )
            .route(
                &format!("{family}/metadata"),
                axum::routing::post(connection::set_metadata)
                    .patch(connection::set_metadata)
                    // This static route shadows `{family}/{connection_id}` for a connection
                    // named `metadata`; GET and DELETE still reach it.
                    .get(connection::get_connection_named_metadata)
                    .delete(connection::delete_connection_named_metadata),
            )
            .route(
                &format!("{family}/{{connection_id}}"),
                get(connection::get_connection).delete(connection::delete_connection),
            )
            .route(
                &format!("{family}/{{connection_id}}/metadata"),
                axum::routing::post(connection::set_metadata_of).patch(connection::set_metadata_of),
            );
    }
    let api = api
        .route(
            "/config",
            get(config::list_configs)
                .post(config::create_config)
                .put(config::update_config),
        )
        .route(
            "/config/{provider_config_key}",
            get(config::get_config).delete(config::delete_config),
        )
        .route("/admin/projections", get(projections_status))
        .route("/metrics", get(metrics::metrics));
    // Without a secret key the API is open: no layer at all on the hot path.
    let api = if state.config.secret_key.is_some() {
        api.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_secret_key,
        ))
    } else {
        api
    };
    // The browser's side of OAuth flows: no secret key (connect checks the public key).
    let flows = Router::new()
        .route("/oauth/connect/{provider_config_key}", get(oauth::connect))
        .route("/oauth/callback", get(oauth::callback))
        .route("/", get(oauth::websocket));
    Router::new()
        .route("/health", get(health))
        .merge(flows)
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Liveness: the process is up and serving.
async fn health() -> Json<Value> {
    Json(json!({ "result": "ok" }))
}

/// `GET /admin/projections`: each projection's checkpoint, the head and the lag.
async fn projections_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let status = state.runner.status().await?;
    Ok(Json(json!({ "projections": status })))
}

async fn not_found() -> ApiError {
    ApiError::UnknownRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
