//! Connect sessions over HTTP (Nango's routes): `POST /connect/sessions` and
//! `POST /connect/sessions/reconnect` take the secret key; `GET /connect/session` and
//! `DELETE /connect/session` take the session's own token as `Authorization: Bearer`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::connect_session::ConnectSession;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::ApiError;
use super::auth::presented;
use super::connection::timestamp;
use super::extract::{ApiJson, object_body};
use crate::connect_sessions::{self, SessionBody};
use crate::state::AppState;

/// A new session's token.
#[derive(Serialize, ToSchema)]
pub struct SessionToken {
    /// `nango_connect_session_` and 64 hex digits; accepted for 30 minutes.
    token: String,
    /// The hosted Connect UI for this session.
    connect_link: String,
    #[schema(format = DateTime)]
    expires_at: String,
}

/// `{"data": …}`.
#[derive(Serialize, ToSchema)]
pub struct SessionCreated {
    data: SessionToken,
}

async fn create(
    state: &AppState,
    peer: SocketAddr,
    body: Value,
    reconnect: bool,
) -> Result<Response, ApiError> {
    let body: SessionBody = object_body(body)?;
    let created = connect_sessions::create(
        state,
        body,
        reconnect,
        Some(peer.ip().to_string()),
        Utc::now(),
    )
    .await?;
    let token = created.token.expose().to_owned();
    let answer = SessionCreated {
        data: SessionToken {
            connect_link: format!("{}/connect/?session_token={token}", state.config.server_url),
            token,
            expires_at: timestamp(created.session.expires_at),
        },
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `POST /connect/sessions`: a session for an end user (or tags), limited to
/// `allowed_integrations` when given.
#[utoipa::path(
    post,
    path = "/connect/sessions",
    tag = "connect",
    request_body(content = Value, description = "`end_user` {id, email, display_name, tags}, \
        `organization`, `allowed_integrations`, `integrations_config_defaults`, `overrides`, \
        `webhook_url_override`, `tags`; `end_user` or `tags` is required"),
    responses(
        (status = 201, description = "The session's token", body = SessionCreated),
        (status = 400, description = "`invalid_body`", body = super::error::ErrorBody),
    ),
)]
pub async fn create_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    create(&state, peer, body, false).await
}

/// `POST /connect/sessions/reconnect`: a session that re-authorizes the connection
/// `connection_id` of `integration_id`, and nothing else.
#[utoipa::path(
    post,
    path = "/connect/sessions/reconnect",
    tag = "connect",
    request_body(content = Value, description = "`connection_id`, `integration_id`, and the \
        fields of `POST /connect/sessions` but `allowed_integrations`"),
    responses(
        (status = 201, description = "The session's token", body = SessionCreated),
        (status = 400, description = "`invalid_body`", body = super::error::ErrorBody),
    ),
)]
pub async fn reconnect_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    create(&state, peer, body, true).await
}

/// The session token of a request's `Authorization: Bearer` header.
fn session_token(headers: &HeaderMap) -> Result<String, ApiError> {
    Ok(presented(headers)?.into_owned())
}

/// What `GET /connect/session` shows of a session (never its tags or webhook override).
fn session_view(session: &ConnectSession) -> Value {
    let end_user = session.end_user.as_ref().map(|user| {
        json!({
            "id": user.id,
            "display_name": user.display_name,
            "email": user.email,
            "tags": null,
            "organization": user.organization.as_ref().map(|org| json!({
                "id": org.id,
                "display_name": org.display_name,
            })),
        })
    });
    let mut data = json!({
        "endUser": end_user,
        "connectUISettings": {
            "theme": {"light": {"primary": "#1f6feb"}, "dark": {"primary": "#58a6ff"}},
            "defaultTheme": "system",
            "showWatermark": false,
        },
        "websocketsPath": "/",
    });
    if let Some(allowed) = &session.allowed_integrations {
        data["allowed_integrations"] = json!(allowed);
    }
    if !session.integrations_config_defaults.is_empty() {
        let defaults: BTreeMap<&String, Value> = session
            .integrations_config_defaults
            .iter()
            .map(|(key, d)| {
                (
                    key,
                    json!({
                        "connection_config": d.connection_config,
                        "authorization_params": d.authorization_params,
                    }),
                )
            })
            .collect();
        data["integrations_config_defaults"] = json!(defaults);
    }
    if session.reconnect.is_some() {
        data["isReconnecting"] = json!(true);
    }
    json!({ "data": data })
}

/// `GET /connect/session`: the session of the bearer token.
#[utoipa::path(
    get,
    path = "/connect/session",
    tag = "connect",
    responses(
        (status = 200, description = "The session: `endUser`, `allowed_integrations`, \
            `integrations_config_defaults`, `isReconnecting`", body = Value),
        (status = 401, description = "`unknown_connect_session_token`",
            body = super::error::ErrorBody),
    ),
    security(("connect_session_token" = [])),
)]
pub async fn get_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let token = session_token(&headers)?;
    let mut session = connect_sessions::find(&state, &token, Utc::now()).await?;
    // A reconnect session that names no end user shows the connection's, which it keeps.
    if session.end_user.is_none()
        && let Some(reconnect) = &session.reconnect
    {
        session.end_user = connect_sessions::current_end_user(&state, reconnect).await?;
    }
    Ok(Json(session_view(&session)))
}

/// `DELETE /connect/session`: ends the session of the bearer token now.
#[utoipa::path(
    delete,
    path = "/connect/session",
    tag = "connect",
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "`unknown_connect_session_token`",
            body = super::error::ErrorBody),
    ),
    security(("connect_session_token" = [])),
)]
pub async fn delete_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let token = session_token(&headers)?;
    connect_sessions::delete(&state, &token, Utc::now()).await?;
    Ok(StatusCode::NO_CONTENT)
}
