//! `/connection…` and `/connections…`: the Nango Connections API.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use domain::connection::MetadataMode;
use domain::credentials::Credentials;
use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::ApiError;
use super::extract::{
    ApiJson, ApiPath, ApiQuery, flag, identifier, in_body, in_query, provider_config_key,
    without_nul,
};
use workers::provider::parse_expires_at;

use crate::connections::{self, ConnectionView, Import};
use crate::startup::AppState;

/// Timestamps as the seed shows them: `2023-03-08T09:43:03.725Z`.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Deserialize)]
pub struct GetQuery {
    provider_config_key: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    force_refresh: Option<bool>,
    #[serde(default, deserialize_with = "flag")]
    refresh_token: Option<bool>,
}

/// `GET /connection/:id?provider_config_key=K`: the connection with its credentials.
pub async fn get_connection(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GetQuery>,
) -> Result<Response, ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(query.provider_config_key.as_deref()).map_err(in_query)?;
    let force = query.force_refresh == Some(true);
    let view = connections::get(&state, &key, &connection_id, force).await?;
    Ok(Json(connection_json(&view, query.refresh_token != Some(false))).into_response())
}

/// The seed's Connection object, serialized straight from the state (no intermediate tree: this
/// is the hot path).
#[derive(Serialize)]
pub struct ConnectionBody<'a> {
    id: i64,
    created_at: String,
    updated_at: String,
    provider_config_key: &'a str,
    connection_id: &'a str,
    provider: &'a str,
    credentials: CredentialsBody<'a>,
    connection_config: &'a Map<String, Value>,
    account_id: u8,
    metadata: &'a Map<String, Value>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum CredentialsBody<'a> {
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        access_token: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        refresh_token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
        raw: Cow<'a, Value>,
    },
    #[serde(rename = "OAUTH1")]
    OAuth1 {
        oauth_token: &'a str,
        oauth_token_secret: &'a str,
        raw: &'a Value,
    },
    #[serde(rename = "API_KEY")]
    ApiKey {
        #[serde(rename = "apiKey")]
        api_key: &'a str,
    },
    #[serde(rename = "BASIC")]
    Basic {
        username: &'a str,
        password: &'a str,
    },
}

/// The seed's Connection object for `view`; without the refresh token unless asked for.
pub fn connection_json(view: &ConnectionView, with_refresh_token: bool) -> ConnectionBody<'_> {
    let c = &view.connection.connection;
    ConnectionBody {
        id: view.connection.id,
        created_at: timestamp(c.created_at),
        updated_at: timestamp(c.updated_at),
        provider_config_key: &c.provider_config_key,
        connection_id: &c.connection_id,
        provider: &c.provider,
        credentials: credentials_body(&view.credentials, with_refresh_token),
        connection_config: &c.connection_config,
        account_id: 0,
        metadata: &c.metadata,
    }
}

fn credentials_body(credentials: &Credentials, with_refresh_token: bool) -> CredentialsBody<'_> {
    match credentials {
        Credentials::OAuth2 {
            access_token,
            refresh_token,
            expires_at,
            raw,
        } => {
            let raw = match raw {
                Value::Object(fields)
                    if !with_refresh_token && fields.contains_key("refresh_token") =>
                {
                    let mut stripped = fields.clone();
                    stripped.remove("refresh_token");
                    Cow::Owned(Value::Object(stripped))
                }
                other => Cow::Borrowed(other),
            };
            CredentialsBody::OAuth2 {
                access_token,
                refresh_token: refresh_token.as_deref().filter(|_| with_refresh_token),
                expires_at: expires_at.map(timestamp),
                raw,
            }
        }
        Credentials::OAuth1 {
            oauth_token,
            oauth_token_secret,
            raw,
        } => CredentialsBody::OAuth1 {
            oauth_token,
            oauth_token_secret,
            raw,
        },
        Credentials::ApiKey { api_key } => CredentialsBody::ApiKey { api_key },
        Credentials::Basic { username, password } => CredentialsBody::Basic { username, password },
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(rename = "connectionId")]
    connection_id: Option<String>,
}

/// `GET /connection[?connectionId=X]`: the list, without credentials.
pub async fn list_connections(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = query.connection_id.as_deref().filter(|s| !s.is_empty());
    if let Some(id) = filter {
        identifier(id, "connectionId").map_err(in_query)?;
    }
    let connections: Vec<Value> = connections::list(&state, filter)
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id,
                "connection_id": c.connection_id,
                // Nango puts the config key under `provider`; the explicit field says the same.
                "provider": c.provider_config_key,
                "provider_config_key": c.provider_config_key,
                "created": timestamp(c.created_at),
            })
        })
        .collect();
    Ok(Json(json!({ "connections": connections })))
}

#[derive(Debug, Deserialize)]
pub struct KeyQuery {
    provider_config_key: Option<String>,
}

/// `DELETE /connection/:id?provider_config_key=K`.
pub async fn delete_connection(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(query.provider_config_key.as_deref()).map_err(in_query)?;
    connections::delete(&state, &key, &connection_id).await?;
    Ok(Json(json!({ "success": true })))
}

/// `GET /connection/metadata?provider_config_key=K`: the connection whose id is `metadata`.
pub async fn get_connection_named_metadata(
    state: State<AppState>,
    query: ApiQuery<GetQuery>,
) -> Result<Response, ApiError> {
    get_connection(state, ApiPath("metadata".to_owned()), query).await
}

/// `DELETE /connection/metadata?provider_config_key=K`: the connection whose id is `metadata`.
pub async fn delete_connection_named_metadata(
    state: State<AppState>,
    query: ApiQuery<KeyQuery>,
) -> Result<Json<Value>, ApiError> {
    delete_connection(state, ApiPath("metadata".to_owned()), query).await
}

/// `POST /connection`: import existing credentials, in the flat shape of Nango ≤ 0.6x or the
/// `credentials: {type, …}` shape of current Nango.
pub async fn import_connection(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let import = parse_import(&body)?;
    let view = connections::import(&state, import).await?;
    Ok((StatusCode::CREATED, Json(connection_json(&view, true))).into_response())
}

fn parse_import(body: &Value) -> Result<Import, ApiError> {
    without_nul(body)?;
    let body = body
        .as_object()
        .ok_or_else(|| ApiError::InvalidBody("the body must be a JSON object".into()))?;
    let provider_config_key =
        provider_config_key(optional_str(body, "provider_config_key")?).map_err(in_body)?;
    let connection_id = match optional_str(body, "connection_id")?.map(str::trim) {
        None | Some("") => return Err(ApiError::MissingConnection),
        Some(id) => {
            identifier(id, "connection_id").map_err(in_body)?;
            id.to_owned()
        }
    };
    let credentials = match body.get("credentials") {
        Some(Value::Object(fields)) => nested_credentials(fields)?,
        Some(_) => {
            return Err(ApiError::InvalidBody(
                "credentials must be an object".into(),
            ));
        }
        None => flat_credentials(body)?,
    };
    Ok(Import {
        provider_config_key,
        connection_id,
        credentials,
        connection_config: optional_object(body, "connection_config")?.unwrap_or_default(),
        metadata: optional_object(body, "metadata")?,
    })
}

fn optional_str<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::InvalidBody(format!("{field} must be a string"))),
    }
}

fn required_str(
    body: &Map<String, Value>,
    field: &str,
    code: &'static str,
    message: &'static str,
) -> Result<String, ApiError> {
    match optional_str(body, field)? {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ApiError::MissingField { code, message }),
    }
}

fn optional_object(
    body: &Map<String, Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o.clone())),
        Some(_) => Err(ApiError::InvalidBody(format!(
            "{field} must be a JSON object"
        ))),
    }
}

fn expires_at(body: &Map<String, Value>) -> Result<Option<DateTime<Utc>>, ApiError> {
    match body.get("expires_at") {
        None | Some(Value::Null) => {}
        Some(value) => {
            return parse_expires_at(value).map(Some).ok_or_else(|| {
                ApiError::InvalidBody("expires_at must be an RFC 3339 time or UNIX seconds".into())
            });
        }
    }
    match body.get("expires_in") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|s| s >= 0) => {
            let seconds = n.as_i64().unwrap_or_default();
            Ok(Some(Utc::now() + chrono::Duration::seconds(seconds)))
        }
        Some(_) => Err(ApiError::InvalidBody(
            "expires_in must be a whole number of seconds".into(),
        )),
    }
}

fn oauth2(body: &Map<String, Value>) -> Result<Credentials, ApiError> {
    Ok(Credentials::OAuth2 {
        access_token: required_str(
            body,
            "access_token",
            "missing_access_token",
            "missing access_token",
        )?,
        refresh_token: optional_str(body, "refresh_token")?
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        expires_at: expires_at(body)?,
        raw: optional_object(body, "raw")?.map_or_else(|| Value::Object(Map::new()), Value::Object),
    })
}

fn oauth1(body: &Map<String, Value>) -> Result<Credentials, ApiError> {
    Ok(Credentials::OAuth1 {
        oauth_token: required_str(
            body,
            "oauth_token",
            "missing_oauth_token",
            "missing oauth_token",
        )?,
        oauth_token_secret: required_str(
            body,
            "oauth_token_secret",
            "missing_oauth_token_secret",
            "missing oauth_token_secret",
        )?,
        raw: optional_object(body, "raw")?.map_or_else(|| Value::Object(Map::new()), Value::Object),
    })
}

fn api_key(body: &Map<String, Value>) -> Result<Credentials, ApiError> {
    let key = optional_str(body, "apiKey")?.or(optional_str(body, "api_key")?);
    match key {
        Some(k) if !k.is_empty() => Ok(Credentials::ApiKey {
            api_key: k.to_owned(),
        }),
        _ => Err(ApiError::MissingField {
            code: "missing_api_key",
            message: "missing apiKey",
        }),
    }
}

fn basic(body: &Map<String, Value>) -> Result<Credentials, ApiError> {
    Ok(Credentials::Basic {
        username: required_str(body, "username", "missing_username", "missing username")?,
        password: optional_str(body, "password")?
            .unwrap_or_default()
            .to_owned(),
    })
}

fn nested_credentials(fields: &Map<String, Value>) -> Result<Credentials, ApiError> {
    match optional_str(fields, "type")? {
        Some("OAUTH2") => oauth2(fields),
        Some("OAUTH1") => oauth1(fields),
        Some("API_KEY") => api_key(fields),
        Some("BASIC") => basic(fields),
        Some(other) => Err(ApiError::InvalidBody(format!(
            "credentials type {other:?} is not one of OAUTH2, OAUTH1, API_KEY, BASIC"
        ))),
        None => Err(ApiError::InvalidBody("credentials need a type".into())),
    }
}

fn flat_credentials(body: &Map<String, Value>) -> Result<Credentials, ApiError> {
    if body.contains_key("oauth_token") || body.contains_key("oauth_token_secret") {
        oauth1(body)
    } else if body.contains_key("api_key") || body.contains_key("apiKey") {
        api_key(body)
    } else if body.contains_key("username") {
        basic(body)
    } else {
        oauth2(body)
    }
}

/// `POST`/`PATCH /connection/:id/metadata?provider_config_key=K` with the metadata as body.
pub async fn set_metadata_of(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<KeyQuery>,
    ApiJson(metadata): ApiJson<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(query.provider_config_key.as_deref()).map_err(in_query)?;
    without_nul(&metadata)?;
    let Value::Object(metadata) = metadata else {
        return Err(ApiError::InvalidBody(
            "metadata must be a JSON object".into(),
        ));
    };
    let mode = mode_of(&method);
    connections::set_metadata(
        &state,
        &key,
        std::slice::from_ref(&connection_id),
        metadata.clone(),
        mode,
    )
    .await?;
    Ok(metadata_answer(mode, json!(connection_id), &key, metadata))
}

/// `POST`/`PATCH /connections/metadata` with `{connection_id: id | [ids], provider_config_key,
/// metadata}`.
pub async fn set_metadata(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    without_nul(&body)?;
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::InvalidBody("the body must be a JSON object".into()))?;
    let key = provider_config_key(optional_str(fields, "provider_config_key")?).map_err(in_body)?;
    let ids: Vec<String> = match fields.get("connection_id") {
        Some(Value::String(id)) if !id.trim().is_empty() => vec![id.trim().to_owned()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item.as_str().map(str::trim) {
                Some(id) if !id.is_empty() => Ok(id.to_owned()),
                _ => Err(ApiError::InvalidBody(
                    "connection_id must hold non-empty strings".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => return Err(ApiError::MissingConnection),
        Some(_) => {
            return Err(ApiError::InvalidBody(
                "connection_id must be a string or a list of strings".into(),
            ));
        }
    };
    for id in &ids {
        identifier(id, "connection_id").map_err(in_body)?;
    }
    let metadata = match fields.get("metadata") {
        Some(Value::Object(m)) => m.clone(),
        _ => {
            return Err(ApiError::InvalidBody(
                "metadata must be a JSON object".into(),
            ));
        }
    };
    let mode = mode_of(&method);
    connections::set_metadata(&state, &key, &ids, metadata.clone(), mode).await?;
    let id_value = fields.get("connection_id").cloned().unwrap_or(Value::Null);
    Ok(metadata_answer(mode, id_value, &key, metadata))
}

fn mode_of(method: &axum::http::Method) -> MetadataMode {
    if method == axum::http::Method::PATCH {
        MetadataMode::Merge
    } else {
        MetadataMode::Replace
    }
}

fn metadata_answer(
    mode: MetadataMode,
    connection_id: Value,
    key: &str,
    metadata: Map<String, Value>,
) -> (StatusCode, Json<Value>) {
    let status = match mode {
        MetadataMode::Replace => StatusCode::CREATED,
        MetadataMode::Merge => StatusCode::OK,
    };
    let body =
        json!({ "connection_id": connection_id, "provider_config_key": key, "metadata": metadata });
    (status, Json(body))
}
