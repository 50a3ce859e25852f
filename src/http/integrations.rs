//! Today's Nango routes for integrations and providers: `/integrations` (the same integrations
//! as `/config`, in Nango's current shape and `{"data": …}` envelope) and `/providers` (the
//! template catalog). Reads take the secret key or a connect session's token (the Connect UI
//! reads with the session's token, and sees only the integrations the session allows); writes
//! and `include=credentials` take the secret key.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use chrono::Utc;
use domain::catalog::Template;
use domain::commands::IntegrationConfig;
use domain::connect_session::ConnectSession;
use domain::credentials::ClientSecret;
use projections::queries::IntegrationRecord;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;
use workers::provider::split_scopes;

use super::auth::{is_secret, presented};
use super::connection::timestamp;
use super::extract::{ApiJson, ApiPath, ApiQuery, identifier, in_body, object_body};
use super::logos::logo_url;
use super::{ApiError, Success};
use crate::state::AppState;
use crate::{connect_sessions, integrations};

/// Who is asking: the holder of the secret key (or anyone, in open mode), or a connect session.
enum Caller {
    Key,
    Session(Box<ConnectSession>),
}

impl Caller {
    /// Whether it may see the integration `key`.
    fn sees(&self, key: &str) -> bool {
        match self {
            Self::Key => true,
            Self::Session(session) => session.allows(key),
        }
    }
}

/// The caller of a read: the secret key, else a live session token.
async fn reader(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(secret) = &state.config.secret_key else {
        return Ok(Caller::Key);
    };
    let presented = presented(headers)?;
    if is_secret(&presented, secret.expose().as_bytes()) {
        return Ok(Caller::Key);
    }
    if domain::connect_session::plausible_token(&presented) {
        let session = connect_sessions::find(state, &presented, Utc::now()).await?;
        return Ok(Caller::Session(Box::new(session)));
    }
    Err(ApiError::InvalidSecretKey)
}

/// The caller of a write: the secret key only.
async fn writer(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match reader(state, headers).await? {
        Caller::Key => Ok(()),
        Caller::Session(_) => Err(ApiError::InvalidSecretKey),
    }
}

/// A template as `/providers` shows it.
fn provider_json(template: &Template, server_url: &str) -> Value {
    let mut body = json!({
        "name": template.name,
        "display_name": template.display_name.as_deref().unwrap_or(&template.name),
        "logo_url": logo_url(server_url, &template.name),
        "auth_mode": template.auth_mode.as_str(),
        "authorization_params": template.authorization_params,
        "token_params": template.token_params,
        "scope_separator": template.scope_separator,
        "default_scopes": template.default_scopes,
        "disable_pkce": template.disable_pkce,
        "docs": template.docs,
    });
    // API-key and Basic templates have no OAuth URLs; client credentials no authorization URL.
    for (field, url) in [
        ("authorization_url", &template.authorization_url),
        ("token_url", &template.token_url),
    ] {
        if !url.is_empty() {
            body[field] = json!(url);
        }
    }
    if let Some(base_url) = &template.proxy.base_url {
        // Where the provider's API lives; the headers and query carry placeholders only.
        body["proxy"] = json!({
            "base_url": base_url,
            "headers": template.proxy.headers,
            "query": template.proxy.query,
        });
    }
    body
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProvidersQuery {
    /// A case-insensitive regular expression the template's name matches (a plain word matches
    /// names that contain it).
    #[param(required = false)]
    search: Option<String>,
}

/// `GET /providers[?search=]`: the provider templates.
#[utoipa::path(
    get,
    path = "/providers",
    tag = "integrations",
    params(ProvidersQuery),
    responses(
        (status = 200, description = "`{\"data\": [provider…]}`", body = Value),
        (status = 401, description = "Neither the secret key nor a session token",
            body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = []), ("connect_session_token" = [])),
)]
pub async fn list_providers(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ProvidersQuery>,
) -> Result<Json<Value>, ApiError> {
    reader(&state, &headers).await?;
    let search = match &query.search {
        Some(pattern) => Some(name_pattern(pattern)?),
        None => None,
    };
    let data: Vec<Value> = state
        .catalog
        .templates()
        .filter(|t| search.as_ref().is_none_or(|s| s.is_match(&t.name)))
        .map(|t| provider_json(t, &state.config.server_url))
        .collect();
    Ok(Json(json!({ "data": data })))
}

/// The largest compiled `search` pattern: room for any name-like pattern, not for a program
/// that takes long to build.
const MAX_PATTERN: usize = 64 * 1024;

/// `search` as the case-insensitive regular expression Nango takes it for.
fn name_pattern(search: &str) -> Result<regex::Regex, ApiError> {
    identifier(search, "search")?;
    regex::RegexBuilder::new(search)
        .case_insensitive(true)
        .size_limit(MAX_PATTERN)
        .build()
        .map_err(|_| {
            ApiError::InvalidQuery(
                "search must be a regular expression of a provider's name".into(),
            )
        })
}

/// `GET /providers/:provider`: one template.
#[utoipa::path(
    get,
    path = "/providers/{provider}",
    tag = "integrations",
    params(("provider" = String, Path, description = "The template's name")),
    responses(
        (status = 200, description = "`{\"data\": provider}`", body = Value),
        (status = 404, description = "No such template (`not_found`)", body = super::error::ErrorBody),
        (status = 401, description = "Neither the secret key nor a session token",
            body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = []), ("connect_session_token" = [])),
)]
pub async fn get_provider(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(provider): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    reader(&state, &headers).await?;
    identifier(&provider, "provider")?;
    let template = state
        .catalog
        .get(&provider)
        .ok_or_else(|| ApiError::UnknownProvider(provider.clone()))?;
    Ok(Json(
        json!({ "data": provider_json(template, &state.config.server_url) }),
    ))
}

/// An integration in Nango's current shape.
fn integration_json(
    record: &IntegrationRecord,
    secret: Option<&ClientSecret>,
    state: &AppState,
) -> Value {
    let i = &record.integration;
    let mut body = json!({
        "unique_key": i.provider_config_key,
        "provider": i.settings.provider,
        // Its own name, else its template's, else the template's key.
        "display_name": i.settings.display_name.as_deref().unwrap_or_else(|| {
            state
                .catalog
                .get(&i.settings.provider)
                .and_then(|t| t.display_name.as_deref())
                .unwrap_or(&i.settings.provider)
        }),
        "logo": logo_url(&state.config.server_url, &i.settings.provider),
        "forward_webhooks": true,
        "created_at": timestamp(i.created_at),
        "updated_at": timestamp(i.updated_at.unwrap_or(i.created_at)),
    });
    if let Some(secret) = secret.filter(|_| !i.settings.oauth_client_id.is_empty()) {
        body["credentials"] = json!({
            "type": "OAUTH2",
            "client_id": i.settings.oauth_client_id,
            "client_secret": secret.expose(),
            "scopes": i.settings.oauth_scopes.join(","),
            "webhook_secret": null,
        });
    }
    body
}

/// `GET /integrations`: every integration (a session sees those it allows).
#[utoipa::path(
    get,
    path = "/integrations",
    tag = "integrations",
    responses(
        (status = 200, description = "`{\"data\": [integration…]}`", body = Value),
        (status = 401, description = "Neither the secret key nor a session token",
            body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = []), ("connect_session_token" = [])),
)]
pub async fn list_integrations(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = reader(&state, &headers).await?;
    let data: Vec<Value> = integrations::list(&state)
        .await?
        .iter()
        .filter(|r| caller.sees(&r.integration.provider_config_key))
        .map(|r| integration_json(r, None, &state))
        .collect();
    Ok(Json(json!({ "data": data })))
}

/// Every `include` value of `query`: repeated, comma-separated, or both.
fn includes(query: Option<&str>) -> Vec<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == "include")
        .flat_map(|(_, value)| {
            value
                .split(',')
                .map(|part| part.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `GET /integrations/:unique_key[?include=credentials]`.
#[utoipa::path(
    get,
    path = "/integrations/{unique_key}",
    tag = "integrations",
    params(
        ("unique_key" = String, Path, description = "The integration's key"),
        ("include" = Option<String>, Query, description = "`credentials` adds the client id, \
            secret and scopes (secret key only); `webhook` is accepted and adds nothing. Repeated \
            or comma-separated."),
    ),
    responses(
        (status = 200, description = "`{\"data\": integration}`", body = Value),
        (status = 404, description = "No such integration", body = super::error::ErrorBody),
        (status = 401, description = "Neither the secret key nor a session token",
            body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = []), ("connect_session_token" = [])),
)]
pub async fn get_integration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let caller = reader(&state, &headers).await?;
    identifier(&key, "unique_key")?;
    let with_secret = includes(query.as_deref())
        .iter()
        .any(|i| i == "credentials");
    if with_secret && !matches!(caller, Caller::Key) {
        return Err(ApiError::InvalidSecretKey);
    }
    if !caller.sees(&key) {
        return Err(ApiError::ProviderConfigNotFound(key));
    }
    let (record, secret) = integrations::get(&state, &key, with_secret).await?;
    Ok(Json(
        json!({ "data": integration_json(&record, secret.as_ref(), &state) }),
    ))
}

/// `credentials` of a `POST`/`PATCH /integrations` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsInput {
    #[serde(rename = "type")]
    kind: String,
    client_id: String,
    client_secret: String,
    #[serde(default)]
    scopes: Option<String>,
    #[serde(default)]
    webhook_secret: Option<String>,
}

/// A `POST /integrations` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateInput {
    provider: String,
    unique_key: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    forward_webhooks: Option<bool>,
    #[serde(default)]
    credentials: Option<CredentialsInput>,
}

/// A `PATCH /integrations/:key` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInput {
    #[serde(default)]
    unique_key: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    forward_webhooks: Option<bool>,
    #[serde(default)]
    credentials: Option<CredentialsInput>,
}

/// Fields Grantline does not keep: refused rather than silently dropped.
fn unkept(forward_webhooks: Option<bool>) -> Result<(), ApiError> {
    if forward_webhooks == Some(false) {
        return Err(ApiError::InvalidBody(
            "forward_webhooks: Grantline does not forward provider webhooks".into(),
        ));
    }
    Ok(())
}

/// A `display_name`: 1 to 255 characters (Nango's bounds) that display as they read (no control
/// characters, no bidirectional or zero-width ones: end users see the name on the Connect page).
fn display_name(name: Option<String>) -> Result<Option<String>, ApiError> {
    match name {
        Some(name) if name.trim().is_empty() || name.chars().count() > 255 => Err(
            ApiError::InvalidBody("display_name must be 1 to 255 characters".into()),
        ),
        Some(name) if !domain::bounds::displayable(&name) => Err(ApiError::InvalidBody(
            "display_name contains control, bidirectional or zero-width characters".into(),
        )),
        name => Ok(name),
    }
}

fn config_of(
    state: &AppState,
    provider: String,
    credentials: CredentialsInput,
) -> Result<IntegrationConfig, ApiError> {
    if !matches!(credentials.kind.as_str(), "OAUTH2" | "OAUTH1") {
        return Err(ApiError::InvalidBody(format!(
            "credentials.type: {:?} integrations are not supported",
            credentials.kind
        )));
    }
    // The credentials must be of the kind the provider's flow uses: an OAuth 1.0a client under
    // an OAuth 2 template (or any client under an API-key one) would never be used.
    if let Some(template) = state.catalog.get(&provider)
        && template.auth_mode.as_str() != credentials.kind
    {
        return Err(ApiError::InvalidBody(format!(
            "credentials.type: provider {provider:?} does not take {} credentials (its auth mode \
             is {})",
            credentials.kind,
            template.auth_mode.as_str()
        )));
    }
    if credentials.webhook_secret.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::InvalidBody(
            "credentials.webhook_secret: provider webhooks are not supported".into(),
        ));
    }
    identifier(&credentials.client_id, "credentials.client_id").map_err(in_body)?;
    if credentials.client_secret.is_empty() {
        return Err(ApiError::InvalidBody(
            "credentials.client_secret is required".into(),
        ));
    }
    super::config::secret_text(&credentials.client_secret, "credentials.client_secret")?;
    let scopes = split_scopes(&credentials.scopes.unwrap_or_default());
    Ok(IntegrationConfig {
        provider,
        oauth_client_id: credentials.client_id,
        client_secret: ClientSecret::new(credentials.client_secret),
        oauth_scopes: scopes,
        display_name: None,
    })
}

/// `POST /integrations`: a new integration (the same as `POST /config`).
#[utoipa::path(
    post,
    path = "/integrations",
    tag = "integrations",
    request_body(content = Value, description = "`provider`, `unique_key`, `credentials` \
        {type: OAUTH2|OAUTH1, client_id, client_secret, scopes}"),
    responses(
        (status = 200, description = "`{\"data\": integration}`", body = Value),
        (status = 400, description = "`invalid_body`", body = super::error::ErrorBody),
        (status = 409, description = "The key exists", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn create_integration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    writer(&state, &headers).await?;
    let input: CreateInput = object_body(body)?;
    unkept(input.forward_webhooks)?;
    let name = display_name(input.display_name)?;
    identifier(&input.unique_key, "unique_key").map_err(in_body)?;
    identifier(&input.provider, "provider").map_err(in_body)?;
    // API-key and Basic providers need no credentials; the service refuses an OAuth provider
    // without them.
    let mut config = match input.credentials {
        Some(credentials) => config_of(&state, input.provider, credentials)?,
        None => IntegrationConfig {
            provider: input.provider,
            oauth_client_id: String::new(),
            client_secret: ClientSecret::new(String::new()),
            oauth_scopes: Vec::new(),
            display_name: None,
        },
    };
    config.display_name = name;
    integrations::create(&state, &input.unique_key, config).await?;
    let (record, _) = integrations::get(&state, &input.unique_key, false).await?;
    Ok(Json(
        json!({ "data": integration_json(&record, None, &state) }),
    ))
}

/// `PATCH /integrations/:unique_key`: new credentials.
#[utoipa::path(
    patch,
    path = "/integrations/{unique_key}",
    tag = "integrations",
    params(("unique_key" = String, Path, description = "The integration's key")),
    request_body(content = Value, description = "`credentials` {type, client_id, client_secret, \
        scopes}; a rename (`unique_key`) is refused"),
    responses(
        (status = 200, description = "`{\"data\": integration}`", body = Value),
        (status = 400, description = "`invalid_body`", body = super::error::ErrorBody),
        (status = 404, description = "No such integration", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn update_integration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    writer(&state, &headers).await?;
    identifier(&key, "unique_key")?;
    let input: UpdateInput = object_body(body)?;
    unkept(input.forward_webhooks)?;
    let name = display_name(input.display_name)?;
    if input.unique_key.as_ref().is_some_and(|k| *k != key) {
        return Err(ApiError::InvalidBody(
            "unique_key: integrations cannot be renamed".into(),
        ));
    }
    let (record, _) = integrations::get(&state, &key, false).await?;
    match (input.credentials, name) {
        (Some(credentials), name) => {
            let provider = record.integration.settings.provider.clone();
            let mut config = config_of(&state, provider, credentials)?;
            config.display_name = name;
            integrations::update(&state, &key, config).await?;
        }
        // A new name alone: the credentials stay as the log has them.
        (None, Some(name)) => integrations::rename(&state, &key, &name).await?,
        (None, None) => {}
    }
    let (record, _) = integrations::get(&state, &key, false).await?;
    Ok(Json(
        json!({ "data": integration_json(&record, None, &state) }),
    ))
}

/// `DELETE /integrations/:unique_key`: the integration and its connections.
#[utoipa::path(
    delete,
    path = "/integrations/{unique_key}",
    tag = "integrations",
    params(("unique_key" = String, Path, description = "The integration's key")),
    responses(
        (status = 200, description = "Deleted", body = Success),
        (status = 404, description = "No such integration", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn delete_integration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Success>, ApiError> {
    writer(&state, &headers).await?;
    identifier(&key, "unique_key")?;
    integrations::delete(&state, &key).await?;
    Ok(Json(Success::YES))
}
