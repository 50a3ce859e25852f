//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` types of their bodies.
//!
//! The `/connections…` family is not annotated twice: its path items are copied from the
//! `/connection…` ones (the router serves both with the same handlers), with their own operation
//! ids. The document is built once, on first use, and served from memory. It reveals nothing
//! secret, so it is an open route like `/health`. `tests/api/openapi.rs` probes every route the
//! router registers and fails when one is missing here, or when a documented one is not served.

use std::collections::HashSet;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::ApiError;

/// The seed's route family; `/connections…` is a copy of it.
const SEED_FAMILY: &str = "/connection";
const CURRENT_FAMILY: &str = "/connections";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Grantline",
        description = "OAuth connection and token service speaking the Nango Connections API. \
            Every `/connection…` route is also served as `/connections…`. Errors are \
            `{\"error\": {\"code\", \"message\", \"payload\"}}` (schema `Error`). Unknown query \
            parameters and `Nango-*` headers are ignored."
    ),
    paths(
        super::health,
        super::projections_status,
        super::metrics::metrics,
        openapi_json,
        super::connection::list_connections,
        super::connection::import_connection,
        super::connection::get_connection,
        super::connection::delete_connection,
        super::connection::get_connection_named_metadata,
        super::connection::delete_connection_named_metadata,
        super::connection::set_metadata,
        super::connection::set_metadata_of,
        super::history::get_history,
        super::ready::ready,
        super::webhooks::webhooks_status,
        super::config::list_configs,
        super::config::create_config,
        super::config::update_config,
        super::config::get_config,
        super::config::delete_config,
        super::oauth::connect,
        super::oauth::callback,
        super::oauth::websocket,
    ),
    components(schemas(
        super::error::ErrorBody,
        ConnectionList,
        ImportConnection,
        CredentialsInput,
        MetadataUpdate,
        MetadataAnswer,
        Success,
        Config,
        ConfigEnvelope,
        ConfigList,
        ConfigInput,
        ConfigCreated,
        ProjectionsStatus,
        Health,
        Readiness,
        WebhooksStatus,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "connections", description = "Connections and their credentials"),
        (name = "integrations", description = "Provider configs (`/config`)"),
        (name = "oauth", description = "The browser's side of OAuth flows; no secret key"),
        (name = "service", description = "Health, metrics, projections and this document"),
    )
)]
struct ApiDoc;

/// Names of the security schemes; every API operation accepts either.
pub const BEARER: &str = "secret_key";
pub const BASIC: &str = "secret_key_basic";

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some(
            "The secret key as a bearer token. Only enforced when the server runs with a secret \
             key; without one the API is open (and listens on loopback only)."
                .into(),
        );
        let mut basic = Http::new(HttpAuthScheme::Basic);
        basic.description = Some(
            "The secret key as the user name of Basic authentication, with an empty password \
             (`base64(<key>:)`). Only enforced when the server runs with a secret key."
                .into(),
        );
        components.add_security_scheme(BEARER, SecurityScheme::Http(bearer));
        components.add_security_scheme(BASIC, SecurityScheme::Http(basic));
    }
}

/// The document: the annotated operations plus the `/connections…` copies.
fn build() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let copies: Vec<(String, utoipa::openapi::PathItem)> = doc
        .paths
        .paths
        .iter()
        .filter_map(|(path, item)| {
            let rest = path.strip_prefix(SEED_FAMILY)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let mut item = item.clone();
            for operation in operations(&mut item) {
                if let Some(id) = &mut operation.operation_id {
                    id.push_str("_plural");
                }
            }
            Some((format!("{CURRENT_FAMILY}{rest}"), item))
        })
        .collect();
    doc.paths.paths.extend(copies);
    // A handler serving two methods (POST and PATCH metadata) yields one operation id twice;
    // operation ids must be unique, so the later one gets its method appended.
    let mut seen = HashSet::new();
    for item in doc.paths.paths.values_mut() {
        for (method, operation) in [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("patch", &mut item.patch),
        ] {
            if let Some(id) = operation.as_mut().and_then(|o| o.operation_id.as_mut())
                && !seen.insert(id.clone())
            {
                id.push('_');
                id.push_str(method);
                seen.insert(id.clone());
            }
        }
    }
    doc
}

/// The operations of a path item.
fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

static DOCUMENT: OnceLock<Result<String, String>> = OnceLock::new();

/// The document as JSON text, built on first use.
pub fn document() -> Result<&'static str, ApiError> {
    DOCUMENT
        .get_or_init(|| build().to_json().map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| ApiError::Internal(format!("cannot serialize the OpenAPI document: {e}")))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API",
            content_type = "application/json", body = Object),
    ),
    security(()),
)]
pub async fn openapi_json() -> Response {
    match document() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => e.into_response(),
    }
}

// The shapes below describe bodies that the handlers build as JSON values; the tests check real
// answers against them. They are never constructed.

/// `GET /connection`: the connections, without credentials.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConnectionList {
    connections: Vec<ConnectionSummary>,
}

/// One connection of the list.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConnectionSummary {
    /// Internal id.
    id: i64,
    connection_id: String,
    /// The provider config key (as Nango has it).
    provider: String,
    provider_config_key: String,
    /// Creation time, e.g. `2023-03-08T09:43:03.725Z`.
    #[schema(format = DateTime)]
    created: String,
}

/// `POST /connection`: existing credentials to import. Either `credentials: {type, …}` (current
/// Nango) or the credential fields flat in the body (Nango ≤ 0.6x: `access_token`, …, or
/// `oauth_token` + `oauth_token_secret`, or `api_key`, or `username` + `password`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImportConnection {
    provider_config_key: String,
    connection_id: String,
    credentials: Option<CredentialsInput>,
    /// Flat OAuth 2 shape: the access token (required when neither `credentials` nor another
    /// flat shape is given).
    access_token: Option<String>,
    refresh_token: Option<String>,
    /// RFC 3339 time or UNIX seconds.
    #[schema(value_type = Option<Value>)]
    expires_at: Option<Value>,
    /// Seconds from now; used when `expires_at` is absent.
    expires_in: Option<u64>,
    #[schema(value_type = Option<Object>)]
    raw: Option<Map<String, Value>>,
    /// Flat OAuth 1 shape.
    oauth_token: Option<String>,
    oauth_token_secret: Option<String>,
    /// Flat API key shape (also accepted as `apiKey`).
    api_key: Option<String>,
    /// Flat Basic shape.
    username: Option<String>,
    password: Option<String>,
    #[schema(value_type = Option<Object>)]
    connection_config: Option<Map<String, Value>>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
}

/// Credentials of an import, by `type`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
#[serde(tag = "type")]
pub enum CredentialsInput {
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        access_token: String,
        refresh_token: Option<String>,
        /// RFC 3339 time or UNIX seconds.
        #[schema(value_type = Option<Value>)]
        expires_at: Option<Value>,
        /// Seconds from now; used when `expires_at` is absent.
        expires_in: Option<u64>,
        #[schema(value_type = Option<Object>)]
        raw: Option<Map<String, Value>>,
    },
    #[serde(rename = "OAUTH1")]
    OAuth1 {
        oauth_token: String,
        oauth_token_secret: String,
        #[schema(value_type = Option<Object>)]
        raw: Option<Map<String, Value>>,
    },
    /// The key as `apiKey` (or `api_key`).
    #[serde(rename = "API_KEY")]
    ApiKey {
        #[serde(rename = "apiKey")]
        api_key: String,
    },
    #[serde(rename = "BASIC")]
    Basic {
        username: String,
        password: Option<String>,
    },
}

/// `POST`/`PATCH /connection/metadata`: metadata for one or several connections.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MetadataUpdate {
    /// One connection id or a non-empty list of them.
    #[schema(value_type = Value)]
    connection_id: Value,
    provider_config_key: String,
    /// Replaces (POST) or is merged into (PATCH) the stored metadata.
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// The answer to a metadata update: what was written.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MetadataAnswer {
    /// As sent: one id or a list.
    #[schema(value_type = Value)]
    connection_id: Value,
    provider_config_key: String,
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// One entry of a connection's credential history: what happened, when, in which generation,
/// by which instance and trigger. Fields after `generation` appear only on the entry types they
/// concern. Never a secret: tokens only as keyed fingerprints.
#[derive(Serialize, ToSchema)]
#[schema(as = HistoryEntry)]
#[allow(dead_code)]
pub struct HistoryEntryDoc {
    /// The event's version in the connection's stream (from 1); pages are cut by it.
    stream_version: u32,
    #[schema(format = "uuid")]
    event_id: String,
    #[serde(rename = "type")]
    entry_type: HistoryEntryType,
    #[schema(format = DateTime)]
    recorded_at: String,
    /// The authorization generation in force (1 for the first authorization, + 1 for every
    /// later one, also after a deletion).
    generation: u32,
    /// The provider template (authorizations).
    provider: Option<String>,
    /// How the credentials were obtained (authorizations).
    flow: Option<HistoryFlow>,
    /// `OAUTH2`, `OAUTH1`, `API_KEY` or `BASIC` (authorizations).
    credentials_type: Option<String>,
    /// The granted scopes (authorizations).
    scopes: Option<Vec<String>>,
    /// When the access token expires; `null` when unknown (authorizations and refreshes).
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    has_refresh_token: Option<bool>,
    /// 1 after an authorization, + 1 each time the provider returned a new refresh token.
    refresh_token_generation: Option<u32>,
    /// Whether the provider returned a new refresh token (refreshes).
    refresh_token_rotated: Option<bool>,
    fingerprints: Option<HistoryFingerprints>,
    /// What started the refresh (leases and their outcomes).
    trigger: Option<HistoryTrigger>,
    /// The instance that appended the event (for refresh outcomes: the lease's holder).
    instance: Option<String>,
    #[schema(format = "uuid")]
    lease_id: Option<String>,
    #[schema(format = DateTime)]
    lease_expires_at: Option<String>,
    /// What went wrong (failures); never the provider's free text.
    error: Option<HistoryError>,
    /// The mode and the top-level keys set (metadata changes); never the values.
    metadata: Option<HistoryMetadata>,
    /// How many data keys the deletion destroyed (deletions).
    shredded_data_keys: Option<u32>,
    /// Whether the credentials the event sealed can still be opened (authorizations and
    /// refreshes): `shredded` once a deletion destroyed their data key.
    secrets: Option<HistorySecrets>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum HistoryEntryType {
    ConnectionAuthorized,
    RefreshLeased,
    TokensRefreshed,
    RefreshFailed,
    MetadataSet,
    ConnectionDeleted,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum HistoryFlow {
    Oauth2,
    Oauth1,
    Import,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum HistoryTrigger {
    Read,
    Schedule,
    Force,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum HistorySecrets {
    Sealed,
    Shredded,
}

/// Short keyed fingerprints (`fp_` and 16 hex digits, HMAC) of the tokens.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct HistoryFingerprints {
    access_token: Option<String>,
    refresh_token: Option<String>,
}

/// A refresh failure as the audit trail shows it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct HistoryError {
    /// `permanent` (the grant is gone) or `transient`.
    class: String,
    /// The provider's error code, e.g. `invalid_grant`.
    code: Option<String>,
    /// The provider's HTTP status, if it answered.
    provider_status: Option<u16>,
}

/// A metadata change as the audit trail shows it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct HistoryMetadata {
    /// `replace` or `merge`.
    mode: String,
    keys: Vec<String>,
}

/// `{"success": true}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Success {
    success: bool,
}

/// A provider config (integration) as Nango v0.16 has it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Config {
    id: i64,
    /// Same as `provider_config_key`.
    unique_key: String,
    provider_config_key: String,
    /// The provider template's name.
    provider: String,
    oauth_client_id: String,
    /// Only with `include_creds=true`.
    oauth_client_secret: Option<String>,
    /// Comma-separated.
    oauth_scopes: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

/// `GET /config/{provider_config_key}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConfigEnvelope {
    config: Config,
}

/// `GET /config`: all configs, without client secrets.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConfigList {
    configs: Vec<Config>,
}

/// `POST`/`PUT /config`: a provider config.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConfigInput {
    provider_config_key: String,
    /// A provider template's name (built-in or from the providers file).
    provider: String,
    oauth_client_id: String,
    oauth_client_secret: String,
    /// A list, or one string separated by commas or spaces.
    #[schema(value_type = Option<Value>)]
    oauth_scopes: Option<Value>,
}

/// `POST /config`: the new config's id.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ConfigCreated {
    config_id: i64,
    provider_config_key: String,
}

/// `GET /admin/projections`: each projection's checkpoint and lag.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProjectionsStatus {
    projections: Vec<ProjectionStatus>,
}

/// One projection's progress.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProjectionStatus {
    name: String,
    /// `commit:position` of the last applied event.
    checkpoint: String,
    checkpoint_position: i64,
    head_position: i64,
    /// Events after the checkpoint that a reader can see now (counted up to 10,000).
    lag: i64,
    #[schema(format = DateTime)]
    updated_at: String,
    last_error: Option<String>,
}

/// `GET /health`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    /// Always `ok`.
    result: String,
}

/// `GET /ready`: whether this instance should get traffic.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: String,
    /// Each check by name (`database`, `migrations`, `projections`): `{"status": "ok" |
    /// "failing" | "skipped", "message"?, …}`.
    #[schema(value_type = Object)]
    checks: Map<String, Value>,
    /// The names of the checks that failed.
    failing: Vec<String>,
}

/// `GET /admin/webhooks`: each webhook target's progress and latest deliveries.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhooksStatus {
    /// Per target (its URL redacted to scheme, host, port and path): checkpoint, lag, lease
    /// holder, last error and the most recent deliveries. Empty without webhook targets.
    targets: Vec<WebhookTarget>,
}

/// One webhook target: a URL with its own checkpoint in the log, like a projection.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookTarget {
    /// Scheme, host, port and path only (a URL may carry credentials).
    url: String,
    /// The position of the last event passed (`commit:global`).
    checkpoint: String,
    checkpoint_position: i64,
    head_position: i64,
    /// Events after the checkpoint (counted up to 10,000).
    lag: i64,
    /// The instance delivering to this target, while its lease lasts.
    lease_holder: Option<String>,
    #[schema(format = DateTime)]
    lease_expires_at: Option<String>,
    #[schema(format = DateTime)]
    updated_at: String,
    last_error: Option<String>,
    /// The most recent deliveries, newest first.
    deliveries: Vec<WebhookDelivery>,
}

/// The attempts to deliver one event's webhook to one target.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookDelivery {
    /// The event's id, also the webhook's `id` and `Idempotency-Key`.
    #[schema(format = "uuid")]
    event_id: String,
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
    #[schema(format = DateTime)]
    first_attempt_at: String,
    #[schema(format = DateTime)]
    last_attempt_at: String,
    /// When the next attempt is due (`retrying`).
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    delivered_at: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_path_has_a_connections_copy_with_its_own_operation_ids() {
        let mut doc = build();
        let paths = &mut doc.paths.paths;
        let seed: Vec<String> = paths
            .keys()
            .filter(|p| *p == SEED_FAMILY || p.starts_with("/connection/"))
            .cloned()
            .collect();
        assert!(seed.len() >= 4, "{seed:?}");
        for path in &seed {
            let copy = format!("{CURRENT_FAMILY}{}", &path[SEED_FAMILY.len()..]);
            assert!(paths.contains_key(&copy), "{copy} is missing");
        }
        let mut ids = HashSet::new();
        for item in paths.values_mut() {
            for operation in operations(item) {
                let id = operation.operation_id.clone().unwrap();
                assert!(ids.insert(id.clone()), "operation id {id} twice");
            }
        }
    }
}
