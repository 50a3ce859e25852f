//! `/config`: provider configs (integrations) as Nango v0.16 has them. The client secret is
//! only returned with `include_creds=true`.

use axum::Json;
use axum::extract::State;
use domain::commands::IntegrationConfig;
use domain::credentials::ClientSecret;
use projections::queries::IntegrationRecord;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::connection::timestamp;
use super::extract::{
    ApiJson, ApiPath, ApiQuery, flag, identifier, in_body, object_body, provider_config_key,
};
use super::{ApiError, Success};
use crate::integrations;
use crate::state::AppState;

/// A provider config (integration) as Nango v0.16 has it.
#[derive(Serialize, ToSchema)]
#[schema(as = Config)]
pub struct ConfigBody {
    id: i64,
    /// Same as `provider_config_key`.
    unique_key: String,
    provider_config_key: String,
    /// The provider template's name.
    provider: String,
    oauth_client_id: String,
    /// Only with `include_creds=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    oauth_client_secret: Option<String>,
    /// Comma-separated.
    oauth_scopes: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

impl ConfigBody {
    fn new(record: &IntegrationRecord, secret: Option<&ClientSecret>) -> Self {
        let i = &record.integration;
        Self {
            id: record.id,
            unique_key: i.provider_config_key.clone(),
            provider_config_key: i.provider_config_key.clone(),
            provider: i.settings.provider.clone(),
            oauth_client_id: i.settings.oauth_client_id.clone(),
            oauth_client_secret: secret.map(|secret| secret.expose().to_owned()),
            oauth_scopes: i.settings.oauth_scopes.join(","),
            created_at: timestamp(i.created_at),
            updated_at: timestamp(i.updated_at.unwrap_or(i.created_at)),
        }
    }
}

/// `GET /config/{provider_config_key}`.
#[derive(Serialize, ToSchema)]
pub struct ConfigEnvelope {
    config: ConfigBody,
}

/// `GET /config`: all configs, without client secrets.
#[derive(Serialize, ToSchema)]
pub struct ConfigList {
    configs: Vec<ConfigBody>,
}

/// `POST`/`PUT /config`: a provider config.
// Fields are taken as the JSON the client sent and checked one by one, for Nango's codes
// (`missing_client_id`, …); the schema says what each must be.
#[derive(Deserialize, ToSchema)]
pub struct ConfigInput {
    #[schema(value_type = String)]
    provider_config_key: Option<Value>,
    /// A provider template's name (built-in or from the providers file).
    #[schema(value_type = String)]
    provider: Option<Value>,
    #[schema(value_type = String)]
    oauth_client_id: Option<Value>,
    #[schema(value_type = String)]
    oauth_client_secret: Option<Value>,
    /// A list, or one string separated by commas or spaces.
    #[schema(value_type = Option<Value>)]
    oauth_scopes: Option<Value>,
}

/// `POST /config`: the new config's id.
#[derive(Serialize, ToSchema)]
pub struct ConfigCreated {
    config_id: i64,
    provider_config_key: String,
}

/// `GET /config`.
#[utoipa::path(
    get,
    path = "/config",
    tag = "integrations",
    responses(
        (status = 200, description = "All provider configs, without client secrets", body = ConfigList),
    ),
)]
pub async fn list_configs(State(state): State<AppState>) -> Result<Json<ConfigList>, ApiError> {
    let records = integrations::list(&state).await?;
    let configs = records.iter().map(|r| ConfigBody::new(r, None)).collect();
    Ok(Json(ConfigList { configs }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetConfigQuery {
    /// `true` (or `1`) includes `oauth_client_secret`.
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = bool, default = false)]
    include_creds: Option<bool>,
}

/// `GET /config/:key[?include_creds=true]`.
#[utoipa::path(
    get,
    path = "/config/{provider_config_key}",
    tag = "integrations",
    params(("provider_config_key" = String, Path, description = "The integration's unique key"), GetConfigQuery),
    responses(
        (status = 200, description = "The provider config", body = ConfigEnvelope),
        (status = 400, description = "Invalid key or flag", body = super::error::ErrorBody),
        (status = 404, description = "No such provider config (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
)]
pub async fn get_config(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetConfigQuery>,
) -> Result<Json<ConfigEnvelope>, ApiError> {
    identifier(&key, "provider_config_key")?;
    let with_secret = query.include_creds == Some(true);
    let (record, secret) = integrations::get(&state, &key, with_secret).await?;
    let config = ConfigBody::new(&record, secret.as_ref());
    Ok(Json(ConfigEnvelope { config }))
}

impl ConfigInput {
    /// The key and the configuration the body asks for, checked field by field.
    fn into_config(self) -> Result<(String, IntegrationConfig), ApiError> {
        let key =
            provider_config_key(text(self.provider_config_key, "provider_config_key")?.as_deref())
                .map_err(in_body)?;
        let provider = text(self.provider, "provider")?.ok_or(ApiError::MissingField {
            code: "missing_provider_template",
            message: "missing provider",
        })?;
        identifier(&provider, "provider").map_err(in_body)?;
        // Required for OAuth providers only: the service checks against the template.
        let oauth_client_id = text(self.oauth_client_id, "oauth_client_id")?.unwrap_or_default();
        identifier(&oauth_client_id, "oauth_client_id").map_err(in_body)?;
        let client_secret =
            text(self.oauth_client_secret, "oauth_client_secret")?.unwrap_or_default();
        secret_text(&client_secret, "oauth_client_secret")?;
        let oauth_scopes = scopes(self.oauth_scopes)?;
        Ok((
            key,
            IntegrationConfig {
                provider,
                oauth_client_id,
                client_secret: ClientSecret::new(client_secret),
                oauth_scopes,
                display_name: None,
            },
        ))
    }
}

/// The body of `POST`/`PUT /config`: an object with at least one field (else `missing_body`).
fn config_input(body: Value) -> Result<ConfigInput, ApiError> {
    if body.is_null() || body.as_object().is_some_and(|fields| fields.is_empty()) {
        return Err(ApiError::MissingField {
            code: "missing_body",
            message: "missing body",
        });
    }
    object_body(body)
}

/// A client secret goes into token requests (a form body or Basic authorization): no control
/// characters, as `POST /integrations` also requires.
pub(super) fn secret_text(value: &str, field: &str) -> Result<(), ApiError> {
    match value.chars().any(char::is_control) {
        true => Err(ApiError::InvalidBody(format!(
            "{field} contains control characters"
        ))),
        false => Ok(()),
    }
}

/// A text field, trimmed; blank is absent.
fn text(value: Option<Value>, field: &str) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(ApiError::InvalidBody(format!("{field} must be a string"))),
    }
}

/// Scopes as a list or a string separated by commas or spaces.
fn scopes(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let split = |s: &str| -> Vec<String> {
        s.split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(split(&s)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::InvalidBody("oauth_scopes must hold strings".into()))
            })
            .collect(),
        Some(_) => Err(ApiError::InvalidBody(
            "oauth_scopes must be a string or a list of strings".into(),
        )),
    }
}

/// `POST /config`: 200 `{config_id}`; 409 `duplicate_provider_config` if the key exists.
#[utoipa::path(
    post,
    path = "/config",
    tag = "integrations",
    request_body = ConfigInput,
    responses(
        (status = 200, description = "Created", body = ConfigCreated),
        (status = 400, description = "A field is missing (`missing_*`) or invalid, or the provider has no template (`unknown_provider_template`)", body = super::error::ErrorBody),
        (status = 409, description = "The key exists already (`duplicate_provider_config`)", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
)]
pub async fn create_config(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<ConfigCreated>, ApiError> {
    let (key, config) = config_input(body)?.into_config()?;
    let config_id = integrations::create(&state, &key, config).await?;
    Ok(Json(ConfigCreated {
        config_id,
        provider_config_key: key,
    }))
}

/// `PUT /config`: replaces a config; 400 `unknown_provider_config` if there is none.
#[utoipa::path(
    put,
    path = "/config",
    tag = "integrations",
    request_body = ConfigInput,
    responses(
        (status = 200, description = "Replaced", body = Success),
        (status = 400, description = "A field is missing or invalid, the provider has no template (`unknown_provider_template`), or there is no such config (`unknown_provider_config`)", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
)]
pub async fn update_config(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Success>, ApiError> {
    let (key, config) = config_input(body)?.into_config()?;
    integrations::update(&state, &key, config).await?;
    Ok(Json(Success::YES))
}

/// `DELETE /config/:key`: deletes the config and all its connections.
#[utoipa::path(
    delete,
    path = "/config/{provider_config_key}",
    tag = "integrations",
    params(("provider_config_key" = String, Path, description = "The integration's unique key")),
    responses(
        (status = 200, description = "Deleted, with its connections", body = Success),
        (status = 400, description = "Invalid key", body = super::error::ErrorBody),
        (status = 404, description = "No such provider config (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
)]
pub async fn delete_config(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Success>, ApiError> {
    identifier(&key, "provider_config_key")?;
    integrations::delete(&state, &key).await?;
    Ok(Json(Success::YES))
}
