//! `/connection…` and `/connections…`: the Nango Connections API.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{FromRequestParts, MatchedPath, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use domain::connect_session::EndUser;
use domain::connection::{ConnectionKey, MetadataMode};
use domain::credentials::Credentials;
use projections::queries::ConnectionRecord;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::connection_list::{EndUserItem, auth_errors};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, connection_key, flag, identifier, in_body, in_query, object_body,
    optional_str, provider_config_key, unpadded, without_nul,
};
use super::{ApiError, Success};
use crate::connections::{self, ConnectionView, ConnectionsError, Shape};
use crate::state::AppState;

/// Timestamps as the seed shows them: `2023-03-08T09:43:03.725Z`.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// The integration the connection belongs to.
    #[param(required = true, value_type = String)]
    provider_config_key: Option<String>,
    /// `true` (or `1`) refreshes the token first even if it is not due.
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = bool, default = false)]
    force_refresh: Option<bool>,
    /// Whether the answer shows the refresh token (also in `credentials.raw`): on
    /// `/connections/:id` only with `true` (or `1`), as today's Nango; on `/connection/:id`
    /// unless `false` (or `0`), as the seed's.
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = bool)]
    refresh_token: Option<bool>,
}

impl<S: Send + Sync> FromRequestParts<S> for GetQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // The query of nearly every read, `provider_config_key=K` with nothing in it encoded
        // (no `%` or `+`) and nothing after it, is its own decoding and is taken as it is: the
        // form decoder cost about 1.5k of a cached read's 25k instructions. Any other query is
        // decoded as usual.
        if let Some(key) = parts
            .uri
            .query()
            .and_then(|query| query.strip_prefix("provider_config_key="))
            && !key.contains(['%', '+', '&'])
        {
            return Ok(Self {
                provider_config_key: Some(key.to_owned()),
                force_refresh: None,
                refresh_token: None,
            });
        }
        let ApiQuery(query) = ApiQuery::<Self>::from_request_parts(parts, state).await?;
        Ok(query)
    }
}

/// `GET /connection/:id?provider_config_key=K`: the connection with its credentials.
///
/// The access token is refreshed first when it is due (or with `force_refresh=true`).
#[utoipa::path(
    get,
    path = "/connection/{connection_id}",
    tag = "connections",
    params(("connection_id" = String, Path, description = "The connection's id"), GetQuery),
    responses(
        (status = 200, description = "The connection with its credentials", body = ConnectionBody),
        (status = 400, description = "Missing or invalid `provider_config_key`, flag or id", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
        (status = 424, description = "The last refresh failed permanently (`connection_refresh_failed`; on `/connections/:id` `invalid_credentials`, as today's Nango, with the connection in `payload.connection`)", body = super::error::ErrorBody),
        (status = 503, description = "Refresh failed transiently, or the database is unreachable", body = super::error::ErrorBody),
    ),
)]
pub async fn get_connection(
    State(state): State<AppState>,
    path: MatchedPath,
    ApiPath(connection_id): ApiPath<String>,
    query: GetQuery,
) -> Result<Response, ApiError> {
    let key = connection_key(connection_id, query.provider_config_key.as_deref())?;
    let force = query.force_refresh == Some(true);
    // The seed's route answers the seed's object; `/connections/:id` today's Nango object,
    // which leaves the refresh token out unless asked for.
    let (shape, with_refresh_token) = if path.as_str().starts_with("/connections/") {
        (
            (Shape::Current, render_current as connections::Render),
            query.refresh_token == Some(true),
        )
    } else {
        (
            (Shape::Seed, render as connections::Render),
            query.refresh_token != Some(false),
        )
    };
    let answer = match connections::answer(&state, &key, force, with_refresh_token, shape).await {
        Ok(answer) => answer,
        Err(ConnectionsError::Refresh(failure)) if shape.0 == Shape::Current => {
            return Err(invalid_credentials(&state, &key, failure.into()).await);
        }
        Err(error) => return Err(error.into()),
    };
    Ok(([(CONTENT_TYPE, APPLICATION_JSON)], answer).into_response())
}

/// A refresh failure as today's Nango answers it: `invalid_credentials`, with the connection
/// (no credentials) in the payload.
async fn invalid_credentials(state: &AppState, key: &ConnectionKey, cause: ApiError) -> ApiError {
    if !matches!(
        cause,
        ApiError::RefreshFailed(_) | ApiError::RefreshRetrying { .. }
    ) {
        return cause;
    }
    let connection = match connections::record(state, key).await {
        Ok(record) => serde_json::to_value(current_body(&record, None)).unwrap_or_default(),
        Err(_) => Value::Null,
    };
    ApiError::InvalidCredentials {
        cause: Box::new(cause),
        connection,
    }
}

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The seed's Connection object for `view` as JSON bytes.
fn render(
    view: &ConnectionView,
    with_refresh_token: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), serde_json::Error> {
    serde_json::to_writer(out, &connection_json(view, with_refresh_token))
}

/// Today's Nango connection object for `view` as JSON bytes.
pub(super) fn render_current(
    view: &ConnectionView,
    with_refresh_token: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), serde_json::Error> {
    let credentials = credentials_body(&view.credentials, with_refresh_token);
    serde_json::to_writer(out, &current_body(&view.connection, Some(credentials)))
}

/// Today's Nango connection object of `record`, with `credentials` when given.
fn current_body<'a>(
    record: &'a ConnectionRecord,
    credentials: Option<CredentialsBody<'a>>,
) -> CurrentBody<'a> {
    let c = &record.connection;
    CurrentBody {
        id: record.id,
        connection_id: &c.connection_id,
        provider_config_key: &c.provider_config_key,
        provider: &c.provider,
        errors: auth_errors(
            c.blocking_failure.is_some() || c.consecutive_transient_failures > 0,
            record.version,
        ),
        end_user: c.ownership.end_user.clone().map(EndUserItem::from),
        tags: &c.ownership.tags,
        metadata: (!c.metadata.is_empty()).then_some(&c.metadata),
        connection_config: &c.connection_config,
        webhook_url_override: None,
        created_at: timestamp(c.created_at),
        updated_at: timestamp(c.updated_at),
        last_fetched_at: None,
        credentials,
    }
}

/// Today's Nango connection object (`GET /connections/:id`): every field present, `null` when
/// unknown. `last_fetched_at` is not tracked per answer (always `null`); webhook URLs are
/// server-wide (`webhook_url_override` is `null`).
#[derive(Serialize, ToSchema)]
#[schema(
    as = CurrentConnection,
    description = "A connection with its credentials, as today's Nango answers `GET /connections/:id`"
)]
pub struct CurrentBody<'a> {
    id: i64,
    connection_id: &'a str,
    provider_config_key: &'a str,
    provider: &'a str,
    /// `{"type": "auth", "log_id"}` while the connection's refresh fails.
    #[schema(value_type = Vec<Object>)]
    errors: Vec<Value>,
    /// `{id, display_name, email, tags, organization}`, or `null`.
    #[schema(value_type = Option<Object>)]
    end_user: Option<EndUserItem>,
    #[schema(value_type = Object)]
    tags: &'a BTreeMap<String, String>,
    /// `null` when empty.
    #[schema(value_type = Option<Object>)]
    metadata: Option<&'a Map<String, Value>>,
    #[schema(value_type = Object)]
    connection_config: &'a Map<String, Value>,
    /// Always `null`: webhook URLs are server-wide.
    #[schema(value_type = Option<String>)]
    webhook_url_override: Option<&'a str>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    /// Not tracked per answer: always `null`.
    #[schema(value_type = Option<String>)]
    last_fetched_at: Option<String>,
    /// Left out of a refresh failure's `payload.connection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials: Option<CredentialsBody<'a>>,
}

/// The seed's Connection object, serialized straight from the state (no intermediate tree: this
/// is the hot path).
#[derive(Serialize, ToSchema)]
#[schema(
    as = Connection,
    description = "A connection with its credentials (the seed's Connection object)"
)]
pub struct ConnectionBody<'a> {
    id: i64,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    provider_config_key: &'a str,
    connection_id: &'a str,
    provider: &'a str,
    credentials: CredentialsBody<'a>,
    #[schema(value_type = Object)]
    connection_config: &'a Map<String, Value>,
    account_id: u8,
    #[schema(value_type = Object)]
    metadata: &'a Map<String, Value>,
    /// Tags (from a connect session); left out when there are none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    tags: &'a BTreeMap<String, String>,
    /// The end user (from a connect session); left out when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    end_user: Option<&'a EndUser>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Credentials)]
#[serde(tag = "type")]
enum CredentialsBody<'a> {
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        access_token: &'a str,
        /// Left out when there is none, or with `refresh_token=false`.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false)]
        refresh_token: Option<&'a str>,
        /// Left out when the expiry is unknown.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(format = DateTime, nullable = false)]
        expires_at: Option<String>,
        #[schema(value_type = Object)]
        raw: Cow<'a, Value>,
    },
    #[serde(rename = "OAUTH1")]
    OAuth1 {
        oauth_token: &'a str,
        oauth_token_secret: &'a str,
        #[schema(value_type = Object)]
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
    #[serde(rename = "OAUTH2_CC")]
    OAuth2Cc {
        token: &'a str,
        client_id: &'a str,
        client_secret: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_certificate: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_private_key: Option<&'a str>,
        /// Left out when the expiry is unknown.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(format = DateTime, nullable = false)]
        expires_at: Option<String>,
        #[schema(value_type = Object)]
        raw: &'a Value,
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
        tags: &c.ownership.tags,
        end_user: c.ownership.end_user.as_ref(),
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
        Credentials::OAuth2Cc {
            token,
            client_id,
            client_secret,
            client_certificate,
            client_private_key,
            expires_at,
            raw,
        } => CredentialsBody::OAuth2Cc {
            token,
            client_id,
            client_secret,
            client_certificate: client_certificate.as_deref(),
            client_private_key: client_private_key.as_deref(),
            expires_at: expires_at.map(timestamp),
            raw,
        },
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// The integration the connection belongs to.
    #[param(required = true, value_type = String)]
    provider_config_key: Option<String>,
}

/// `DELETE /connection/:id?provider_config_key=K`.
#[utoipa::path(
    delete,
    path = "/connection/{connection_id}",
    tag = "connections",
    params(("connection_id" = String, Path, description = "The connection's id"), KeyQuery),
    responses(
        (status = 200, description = "Deleted", body = Success),
        (status = 400, description = "Missing or invalid `provider_config_key` or id, no such integration (`unknown_provider_config`), or no such connection (`unknown_connection`, 400 on a delete as in Nango)", body = super::error::ErrorBody),
    ),
)]
pub async fn delete_connection(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<KeyQuery>,
) -> Result<Json<Success>, ApiError> {
    let key = connection_key(connection_id, query.provider_config_key.as_deref())?;
    connections::delete(&state, &key)
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::UnknownConnection(key) => ApiError::NothingToDelete(key),
            other => other,
        })?;
    Ok(Json(Success::YES))
}

/// `GET /connection/metadata?provider_config_key=K`: the connection whose id is `metadata`.
///
/// The static `/connection/metadata` route shadows `/connection/{connection_id}` for this id;
/// it answers as that route would.
#[utoipa::path(
    get,
    path = "/connection/metadata",
    tag = "connections",
    params(GetQuery),
    responses(
        (status = 200, description = "The connection `metadata` with its credentials", body = ConnectionBody),
        (status = 400, description = "Missing or invalid `provider_config_key` or flag", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
        (status = 424, description = "The last refresh failed permanently (`connection_refresh_failed`; on `/connections/:id` `invalid_credentials`, as today's Nango, with the connection in `payload.connection`)", body = super::error::ErrorBody),
        (status = 503, description = "Refresh failed transiently, or the database is unreachable", body = super::error::ErrorBody),
    ),
)]
pub async fn get_connection_named_metadata(
    state: State<AppState>,
    path: MatchedPath,
    query: GetQuery,
) -> Result<Response, ApiError> {
    get_connection(state, path, ApiPath("metadata".to_owned()), query).await
}

/// `DELETE /connection/metadata?provider_config_key=K`: the connection whose id is `metadata`.
#[utoipa::path(
    delete,
    path = "/connection/metadata",
    tag = "connections",
    params(KeyQuery),
    responses(
        (status = 200, description = "Deleted", body = Success),
        (status = 400, description = "Missing or invalid `provider_config_key`, no such integration (`unknown_provider_config`), or no such connection (`unknown_connection`)", body = super::error::ErrorBody),
    ),
)]
pub async fn delete_connection_named_metadata(
    state: State<AppState>,
    query: ApiQuery<KeyQuery>,
) -> Result<Json<Success>, ApiError> {
    delete_connection(state, ApiPath("metadata".to_owned()), query).await
}

/// `POST`/`PATCH /connection/metadata`: metadata for one or several connections.
#[derive(Deserialize, ToSchema)]
pub struct MetadataUpdate {
    /// One connection id or a non-empty list of them.
    #[schema(value_type = Value)]
    connection_id: Option<Value>,
    #[schema(value_type = String)]
    provider_config_key: Option<Value>,
    /// Replaces (POST) or is merged into (PATCH) the stored metadata.
    #[schema(value_type = Object)]
    metadata: Option<Value>,
}

/// The answer to a metadata update: what was written.
#[derive(Serialize, ToSchema)]
pub struct MetadataAnswer {
    /// As sent: one id or a list.
    #[schema(value_type = Value)]
    connection_id: Value,
    provider_config_key: String,
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// `PATCH /connection/:id?provider_config_key=K` with `{end_user?, tags?}`: with either, the
/// connection's tags become those derived from `end_user` overlaid with `tags` (tags not sent
/// again are dropped), and its end user the one given.
#[utoipa::path(
    patch,
    path = "/connection/{connection_id}",
    tag = "connections",
    params(("connection_id" = String, Path, description = "The connection's id"), KeyQuery),
    request_body(content = Object, description = "`end_user` {id, email, display_name, tags}, \
        `organization`, `tags`"),
    responses(
        (status = 200, description = "Changed", body = Success),
        (status = 400, description = "Invalid tags or end user (`invalid_body`)", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
    ),
)]
pub async fn patch_connection(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<KeyQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Success>, ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(query.provider_config_key.as_deref()).map_err(in_query)?;
    let body: crate::connect_sessions::PatchBody = object_body(body)?;
    connections::set_ownership(&state, &ConnectionKey::new(&key, &connection_id), body).await?;
    Ok(Json(Success::YES))
}

/// `POST`/`PATCH /connection/:id/metadata?provider_config_key=K` with the metadata as body.
///
/// POST replaces the metadata (201), PATCH merges into it (200).
#[utoipa::path(
    method(post, patch),
    path = "/connection/{connection_id}/metadata",
    tag = "connections",
    params(("connection_id" = String, Path, description = "The connection's id"), KeyQuery),
    request_body(content = Object, description = "The metadata: a JSON object"),
    responses(
        (status = 201, description = "POST: the metadata was replaced", body = MetadataAnswer),
        (status = 200, description = "PATCH: the metadata was merged", body = MetadataAnswer),
        (status = 400, description = "Missing `provider_config_key`, or the body is not an object", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
)]
pub async fn set_metadata_of(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<KeyQuery>,
    ApiJson(metadata): ApiJson<Value>,
) -> Result<(StatusCode, Json<MetadataAnswer>), ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(query.provider_config_key.as_deref()).map_err(in_query)?;
    without_nul(&metadata)?;
    let Value::Object(metadata) = metadata else {
        return Err(ApiError::InvalidBody(
            "metadata must be a JSON object".into(),
        ));
    };
    let mode = mode_of(&method);
    let keys = [ConnectionKey::new(&key, &connection_id)];
    connections::set_metadata(&state, &keys, metadata.clone(), mode).await?;
    Ok(metadata_answer(
        mode,
        Value::String(connection_id),
        key,
        metadata,
    ))
}

/// The most connections one metadata update names (all of them are written in one append).
const MAX_METADATA_IDS: usize = 1000;

/// `POST`/`PATCH /connections/metadata` with `{connection_id: id | [ids], provider_config_key,
/// metadata}`.
///
/// POST replaces the metadata (201), PATCH merges into it (200); all connections or none.
#[utoipa::path(
    method(post, patch),
    path = "/connection/metadata",
    tag = "connections",
    request_body = MetadataUpdate,
    responses(
        (status = 201, description = "POST: the metadata was replaced", body = MetadataAnswer),
        (status = 200, description = "PATCH: the metadata was merged", body = MetadataAnswer),
        (status = 400, description = "A field is missing or invalid", body = super::error::ErrorBody),
        (status = 404, description = "A connection does not exist (`unknown_connection`)", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
)]
pub async fn set_metadata(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<MetadataAnswer>), ApiError> {
    let update = object_body::<MetadataUpdate>(body)?;
    let key = optional_str(update.provider_config_key.as_ref(), "provider_config_key")?;
    let key = provider_config_key(key).map_err(in_body)?;
    let ids: Vec<String> = match &update.connection_id {
        Some(Value::String(id)) if !id.trim().is_empty() => vec![id.clone()],
        Some(Value::Array(items)) if items.len() > MAX_METADATA_IDS => {
            return Err(ApiError::InvalidBody(format!(
                "connection_id lists at most {MAX_METADATA_IDS} connections"
            )));
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(
                |item| match item.as_str().filter(|id| !id.trim().is_empty()) {
                    Some(id) if !id.is_empty() => Ok(id.to_owned()),
                    _ => Err(ApiError::InvalidBody(
                        "connection_id must hold non-empty strings".into(),
                    )),
                },
            )
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => return Err(ApiError::MissingConnection),
        Some(_) => {
            return Err(ApiError::InvalidBody(
                "connection_id must be a string or a list of strings".into(),
            ));
        }
    };
    for id in &ids {
        unpadded(id, "connection_id")?;
        identifier(id, "connection_id").map_err(in_body)?;
    }
    let Some(Value::Object(metadata)) = update.metadata else {
        return Err(ApiError::InvalidBody(
            "metadata must be a JSON object".into(),
        ));
    };
    let mode = mode_of(&method);
    let keys: Vec<ConnectionKey> = ids.iter().map(|id| ConnectionKey::new(&key, id)).collect();
    connections::set_metadata(&state, &keys, metadata.clone(), mode).await?;
    let sent = update.connection_id.unwrap_or(Value::Null);
    Ok(metadata_answer(mode, sent, key, metadata))
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
    provider_config_key: String,
    metadata: Map<String, Value>,
) -> (StatusCode, Json<MetadataAnswer>) {
    let status = match mode {
        MetadataMode::Replace => StatusCode::CREATED,
        MetadataMode::Merge => StatusCode::OK,
    };
    let answer = MetadataAnswer {
        connection_id,
        provider_config_key,
        metadata,
    };
    (status, Json(answer))
}
