//! `/config`: provider configs (integrations) as Nango v0.16 has them. The client secret is
//! only returned with `include_creds=true`.

use axum::Json;
use axum::extract::State;
use domain::commands::IntegrationConfig;
use domain::credentials::ClientSecret;
use projections::queries::IntegrationRecord;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::IntoParams;

use super::ApiError;
use super::connection::timestamp;
use super::extract::{
    ApiJson, ApiPath, ApiQuery, flag, identifier, in_body, provider_config_key, without_nul,
};
use crate::integrations;
use crate::state::AppState;

fn config_json(record: &IntegrationRecord, secret: Option<&ClientSecret>) -> Value {
    let i = &record.integration;
    let mut out = json!({
        "id": record.id,
        "unique_key": i.provider_config_key,
        "provider_config_key": i.provider_config_key,
        "provider": i.provider,
        "oauth_client_id": i.oauth_client_id,
        "oauth_scopes": i.oauth_scopes.join(","),
        "created_at": timestamp(i.created_at),
        "updated_at": timestamp(i.updated_at.unwrap_or(i.created_at)),
    });
    if let (Some(secret), Value::Object(fields)) = (secret, &mut out) {
        fields.insert("oauth_client_secret".into(), secret.expose().into());
    }
    out
}

/// `GET /config`.
#[utoipa::path(
    get,
    path = "/config",
    tag = "integrations",
    responses(
        (status = 200, description = "All provider configs, without client secrets", body = super::openapi::ConfigList),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn list_configs(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let configs: Vec<Value> = integrations::list(&state)
        .await?
        .iter()
        .map(|r| config_json(r, None))
        .collect();
    Ok(Json(json!({ "configs": configs })))
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
        (status = 200, description = "The provider config", body = super::openapi::ConfigEnvelope),
        (status = 400, description = "Invalid key or flag", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 404, description = "No such provider config (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn get_config(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetConfigQuery>,
) -> Result<Json<Value>, ApiError> {
    identifier(&key, "provider_config_key")?;
    let with_secret = query.include_creds == Some(true);
    let (record, secret) = integrations::get(&state, &key, with_secret).await?;
    Ok(Json(
        json!({ "config": config_json(&record, secret.as_ref()) }),
    ))
}

/// The body of `POST`/`PUT /config`, checked field by field for Nango's error codes.
fn parse_config(body: &Value) -> Result<(String, IntegrationConfig), ApiError> {
    without_nul(body)?;
    let fields = match body {
        Value::Object(fields) if !fields.is_empty() => fields,
        Value::Object(_) | Value::Null => {
            return Err(ApiError::MissingField {
                code: "missing_body",
                message: "missing body",
            });
        }
        _ => {
            return Err(ApiError::InvalidBody(
                "the body must be a JSON object".into(),
            ));
        }
    };
    let text = |field: &str| -> Result<Option<String>, ApiError> {
        match fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(ApiError::InvalidBody(format!("{field} must be a string"))),
        }
    };
    let key = provider_config_key(text("provider_config_key")?.as_deref()).map_err(in_body)?;
    let provider = text("provider")?.ok_or(ApiError::MissingField {
        code: "missing_provider_template",
        message: "missing provider",
    })?;
    identifier(&provider, "provider").map_err(in_body)?;
    let oauth_client_id = text("oauth_client_id")?.ok_or(ApiError::MissingField {
        code: "missing_client_id",
        message: "missing oauth_client_id",
    })?;
    let client_secret = text("oauth_client_secret")?.ok_or(ApiError::MissingField {
        code: "missing_client_secret",
        message: "missing oauth_client_secret",
    })?;
    let oauth_scopes = scopes(fields)?;
    Ok((
        key,
        IntegrationConfig {
            provider,
            oauth_client_id,
            client_secret: ClientSecret::new(client_secret),
            oauth_scopes,
        },
    ))
}

/// Scopes as a list or a string separated by commas or spaces.
fn scopes(fields: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let split = |s: &str| -> Vec<String> {
        s.split([',', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match fields.get("oauth_scopes") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(split(s)),
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
    request_body = super::openapi::ConfigInput,
    responses(
        (status = 200, description = "Created", body = super::openapi::ConfigCreated),
        (status = 400, description = "A field is missing (`missing_*`) or invalid, or the provider has no template (`unknown_provider_template`)", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 409, description = "The key exists already (`duplicate_provider_config`)", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn create_config(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let (key, config) = parse_config(&body)?;
    let id = integrations::create(&state, &key, config).await?;
    Ok(Json(json!({ "config_id": id, "provider_config_key": key })))
}

/// `PUT /config`: replaces a config; 400 `unknown_provider_config` if there is none.
#[utoipa::path(
    put,
    path = "/config",
    tag = "integrations",
    request_body = super::openapi::ConfigInput,
    responses(
        (status = 200, description = "Replaced", body = super::openapi::Success),
        (status = 400, description = "A field is missing or invalid, the provider has no template (`unknown_provider_template`), or there is no such config (`unknown_provider_config`)", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn update_config(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let (key, config) = parse_config(&body)?;
    integrations::update(&state, &key, config).await?;
    Ok(Json(json!({ "success": true })))
}

/// `DELETE /config/:key`: deletes the config and all its connections.
#[utoipa::path(
    delete,
    path = "/config/{provider_config_key}",
    tag = "integrations",
    params(("provider_config_key" = String, Path, description = "The integration's unique key")),
    responses(
        (status = 200, description = "Deleted, with its connections", body = super::openapi::Success),
        (status = 400, description = "Invalid key", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong secret key", body = super::error::ErrorBody),
        (status = 404, description = "No such provider config (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
    security(("secret_key" = []), ("secret_key_basic" = [])),
)]
pub async fn delete_config(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    identifier(&key, "provider_config_key")?;
    integrations::delete(&state, &key).await?;
    Ok(Json(json!({ "success": true })))
}
