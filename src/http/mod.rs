//! The HTTP surface. Handlers are thin: extract, call one function, map the answer to a response
//! type that is also what the OpenAPI document shows. Both route families, `/connection…` (the
//! seed) and `/connections…` (current Nango clients), reach the same handlers; unknown query
//! parameters and `Nango-*` headers are ignored.
//!
//! The router's state, [`HttpState`], is the services' [`AppState`] plus what is the HTTP layer's
//! own: the [`RequestObserver`] behind request ids and the latency histograms of `/metrics`.

mod admin;
mod api_auth;
mod auth;
mod config;
mod connect;
mod connect_ui;
mod connection;
mod connection_list;
mod cors;
mod error;
mod extract;
mod history;
pub mod import;
mod integrations;
mod limits;
mod logos;
mod metrics;
mod oauth;
pub mod observe;
mod openapi;
mod proxy;
mod ready;
mod socket;
mod ui;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::FromRef;
use axum::routing::{MethodRouter, get};
use serde::Serialize;
use tower::ServiceBuilder;
use utoipa::ToSchema;

pub use error::ApiError;
use observe::RequestObserver;

use crate::server::SocketGate;
use crate::state::AppState;

/// Largest request body accepted.
const BODY_LIMIT: usize = 1024 * 1024;

/// What the handlers and layers of the router share: one reference-count increment per clone
/// (axum clones the state for every request, and for every extractor that takes a part of it).
#[derive(Clone, Debug)]
pub struct HttpState(Arc<HttpShared>);

impl std::ops::Deref for HttpState {
    type Target = HttpShared;

    fn deref(&self) -> &HttpShared {
        &self.0
    }
}

impl FromRef<HttpState> for AppState {
    fn from_ref(state: &HttpState) -> Self {
        state.app.clone()
    }
}

impl FromRef<HttpState> for Arc<RequestObserver> {
    fn from_ref(state: &HttpState) -> Self {
        state.requests.clone()
    }
}

impl FromRef<HttpState> for Arc<SocketGate> {
    fn from_ref(state: &HttpState) -> Self {
        state.sockets.clone()
    }
}

/// The parts of [`HttpState`].
#[derive(Debug)]
pub struct HttpShared {
    /// The services.
    app: AppState,
    /// Request ids and the HTTP latency histograms of `/metrics`.
    requests: Arc<RequestObserver>,
    /// The caps on WebSockets.
    sockets: Arc<SocketGate>,
    /// The dashboard's sessions, rebuilds and counted figures.
    ui: Arc<ui::Dashboard>,
}

/// All routes of the service.
pub fn router(state: AppState) -> Router {
    router_with_paths(state).0
}

/// A `Router` that records the path of every `.route(...)`, so the registered paths can be
/// enumerated (the OpenAPI coverage test compares them with the document).
struct Routes {
    router: Router<HttpState>,
    paths: Vec<String>,
}

impl Routes {
    fn new() -> Self {
        Self {
            router: Router::new(),
            paths: Vec::new(),
        }
    }

    /// Records `path` and forwards to [`Router::route`].
    fn route(mut self, path: &str, method_router: MethodRouter<HttpState>) -> Self {
        // A catch-all `{*rest}` is documented as the parameter `{rest}`.
        self.paths.push(path.replace("{*", "{"));
        self.router = self.router.route(path, method_router);
        self
    }

    /// Applies `f` to the inner router (layers); the paths stay as they are.
    fn map(mut self, f: impl FnOnce(Router<HttpState>) -> Router<HttpState>) -> Self {
        self.router = f(self.router);
        self
    }

    /// Forwards to [`Router::merge`], keeping both sets of paths.
    fn merge(mut self, other: Routes) -> Self {
        self.paths.extend(other.paths);
        self.router = self.router.merge(other.router);
        self
    }
}

/// All routes of the service and the path templates (axum syntax, `{param}`) they register.
pub fn router_with_paths(state: AppState) -> (Router, Vec<String>) {
    let mut api = Routes::new();
    for family in ["/connection", "/connections"] {
        api = api
            .route(
                family,
                get(connection_list::list_connections).post(import::import_connection),
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
                get(connection::get_connection)
                    .delete(connection::delete_connection)
                    .patch(connection::patch_connection),
            )
            .route(
                &format!("{family}/{{connection_id}}/history"),
                get(history::get_history),
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
        .route(
            "/connect/sessions",
            axum::routing::post(connect::create_session),
        )
        .route(
            "/connect/sessions/reconnect",
            axum::routing::post(connect::reconnect_session),
        )
        .route("/proxy/{*path}", proxy_methods())
        .route("/admin/projections", get(admin::projections_status))
        .route("/admin/webhooks", get(admin::webhooks_status))
        .route("/metrics", get(metrics::metrics));
    // Outermost, on every route and the fallbacks: request ids, the request's log scope,
    // latency; then the limits (the body limit among them). One stack, applied once per group
    // of routes: `Router::layer`
    // boxes every route again, and each box costs a clone, an allocation and a drop per request
    // (a cached read went from 41.9k to 35.3k instructions with a secret key, 37.5k to 35.7k
    // without, when the four layers became this one stack).
    let requests = Arc::new(RequestObserver::new());
    let stack = ServiceBuilder::new()
        .layer(requests.layer())
        .layer(cors::CorsLayer::new(&state.config.browser_origins))
        .layer(limits::LimitLayer::new(state.clone()));
    let layered = |routes: Routes, stack| {
        routes.map(|router| {
            router
                .method_not_allowed_fallback(method_not_allowed)
                .layer(stack)
        })
    };
    // The API behind the secret key, checked innermost (after the limits); without one the API
    // is open (the stack's optional layer is then empty).
    let secret_key = state.config.secret_key.as_ref().map(auth::require);
    let api = layered(api, stack.clone().option_layer(secret_key));
    // The browser's side of OAuth flows: no secret key (connect checks the public key).
    let flows = Routes::new()
        .route("/oauth/connect/{provider_config_key}", get(oauth::connect))
        .route("/oauth/callback", get(oauth::callback))
        .route(
            "/api-auth/api-key/{provider_config_key}",
            axum::routing::post(api_auth::api_key),
        )
        .route(
            "/api-auth/basic/{provider_config_key}",
            axum::routing::post(api_auth::basic),
        )
        .route(
            "/oauth2/auth/{provider_config_key}",
            axum::routing::post(api_auth::client_credentials),
        )
        .route(
            "/connect/session",
            get(connect::get_session).delete(connect::delete_session),
        )
        // Secret key or session token, checked by the handlers.
        .route(
            "/integrations",
            get(integrations::list_integrations).post(integrations::create_integration),
        )
        .route(
            "/integrations/{unique_key}",
            get(integrations::get_integration)
                .patch(integrations::update_integration)
                .delete(integrations::delete_integration),
        )
        .route("/providers", get(integrations::list_providers))
        .route("/providers/{provider}", get(integrations::get_provider))
        .route("/images/template-logos/{file}", get(logos::logo))
        .route("/", get(socket::websocket))
        // The hosted Connect UI: the page reads its session token itself.
        .route("/connect", get(connect_ui::redirect))
        .route("/connect/", get(connect_ui::page))
        .route("/connect/assets/connect.js", get(connect_ui::script))
        .route("/connect/assets/connect.css", get(connect_ui::style));
    let routes = Routes::new()
        .route("/health", get(health))
        .route("/ready", get(ready::ready))
        .route("/openapi.json", get(openapi::openapi_json))
        // The dashboard's pages are for people: served, not part of the API's document.
        .map(|router| router.merge(ui::routes().router))
        .merge(flows);
    let routes = layered(routes, stack.clone().option_layer(None)).merge(api);
    let router = routes
        .router
        .merge(Router::new().fallback(not_found).layer(stack))
        .with_state(HttpState(Arc::new(HttpShared {
            sockets: Arc::new(SocketGate::new(
                state.config.limits,
                state.server_stats.clone(),
            )),
            ui: Arc::new(ui::Dashboard::new(&state)),
            app: state,
            requests,
        })));
    (router, routes.paths)
}

/// `{"success": true}`.
#[derive(Serialize, ToSchema)]
pub struct Success {
    success: bool,
}

impl Success {
    /// The answer of a write that has nothing else to say.
    pub const YES: Self = Self { success: true };
}

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    result: &'static str,
}

/// Liveness: the process is up and serving.
#[utoipa::path(
    get,
    path = "/health",
    tag = "service",
    responses((status = 200, description = "The process is up", body = Health)),
    security(()),
)]
async fn health() -> Json<Health> {
    Json(Health { result: "ok" })
}

async fn not_found() -> ApiError {
    ApiError::UnknownRoute
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The proxy's handlers by method.
fn proxy_methods() -> axum::routing::MethodRouter<HttpState> {
    axum::routing::post(proxy::proxy_with_body)
        .put(proxy::proxy_with_body)
        .patch(proxy::proxy_with_body)
        // Named, so that the router adds no `Allow` header to the provider's answer (it does to
        // what a fallback answers).
        .get(proxy::proxy)
        .delete(proxy::proxy)
        .head(proxy::proxy)
        .options(proxy::proxy)
        // Every other method (PROPFIND, …).
        .fallback(proxy::proxy)
}
