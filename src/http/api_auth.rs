//! `POST /api-auth/api-key/:key`, `POST /api-auth/basic/:key` and `POST /oauth2/auth/:key`: a
//! connection from credentials the user entered (what `@nangohq/frontend`'s `auth()` sends for
//! API-key, Basic and client-credentials providers). The caller is authorized as a flow's is, by `connect_session_token` (or the
//! public key and `hmac`) in the query; the answer is JSON either way.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, RawQuery, State};
use chrono::Utc;
use domain::credentials::Credentials;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ApiError;
use super::error::form_refusal;
use super::extract::{ApiJson, ApiPath, object_body};
use super::oauth::connect_request;
use workers::client_credentials;

use crate::oauth::{self, Entered};
use crate::state::AppState;

/// The longest key, username or password taken (Nango's limit).
const MAX_CREDENTIAL: usize = 1024;

/// `POST /api-auth/api-key/:key`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyBody {
    /// The key, 1 to 1,024 characters.
    #[serde(rename = "apiKey")]
    api_key: String,
}

/// `POST /api-auth/basic/:key`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicBody {
    /// Up to 1,024 characters (may be empty).
    #[serde(default)]
    username: String,
    /// Up to 1,024 characters (may be empty).
    #[serde(default)]
    password: String,
}

/// The connection the credentials made.
#[derive(Serialize, ToSchema)]
pub struct Authorized {
    #[serde(rename = "connectionId")]
    connection_id: String,
    #[serde(rename = "providerConfigKey")]
    provider_config_key: String,
}

/// `POST /api-auth/api-key/:provider_config_key`: a connection with an API key.
#[utoipa::path(
    post,
    path = "/api-auth/api-key/{provider_config_key}",
    tag = "oauth",
    params(
        ("provider_config_key" = String, Path, description = "The integration (an API_KEY provider)"),
        ("connect_session_token" = Option<String>, Query, description = "A connect session's token"),
        ("public_key" = Option<String>, Query, description = "The public key (without a session)"),
        ("connection_id" = Option<String>, Query, description = "The id (public key only)"),
        ("hmac" = Option<String>, Query, description = "HMAC of `provider_config_key:connection_id`"),
    ),
    request_body = ApiKeyBody,
    responses(
        (status = 200, description = "The connection", body = Authorized),
        (status = 400, description = "`invalid_body`, `invalid_auth_mode`, `connection_test_failed`, `integration_not_allowed`, …", body = super::error::ErrorBody),
        (status = 401, description = "No valid session token (`unknown_connect_session_token`, `missing_connect_session_token`)", body = super::error::ErrorBody),
        (status = 404, description = "No such integration (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
    security(()),
)]
pub async fn api_key(
    state: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    ApiPath(key): ApiPath<String>,
    query: RawQuery,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Authorized>, ApiError> {
    let body: ApiKeyBody = object_body(body)?;
    check(&body.api_key, "apiKey", 1)?;
    let credentials = Credentials::ApiKey {
        api_key: body.api_key,
    };
    authorize(state, peer, key, query, Entered::Credentials(credentials)).await
}

/// `POST /api-auth/basic/:provider_config_key`: a connection with a username and password.
#[utoipa::path(
    post,
    path = "/api-auth/basic/{provider_config_key}",
    tag = "oauth",
    params(
        ("provider_config_key" = String, Path, description = "The integration (a BASIC provider)"),
        ("connect_session_token" = Option<String>, Query, description = "A connect session's token"),
        ("public_key" = Option<String>, Query, description = "The public key (without a session)"),
        ("connection_id" = Option<String>, Query, description = "The id (public key only)"),
        ("hmac" = Option<String>, Query, description = "HMAC of `provider_config_key:connection_id`"),
    ),
    request_body = BasicBody,
    responses(
        (status = 200, description = "The connection", body = Authorized),
        (status = 400, description = "`invalid_body`, `invalid_auth_mode`, `connection_test_failed`, `integration_not_allowed`, …", body = super::error::ErrorBody),
        (status = 401, description = "No valid session token (`unknown_connect_session_token`, `missing_connect_session_token`)", body = super::error::ErrorBody),
        (status = 404, description = "No such integration (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
    security(()),
)]
pub async fn basic(
    state: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    ApiPath(key): ApiPath<String>,
    query: RawQuery,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Authorized>, ApiError> {
    let body: BasicBody = object_body(body)?;
    check(&body.username, "username", 0)?;
    check(&body.password, "password", 0)?;
    let credentials = Credentials::Basic {
        username: body.username,
        password: body.password,
    };
    authorize(state, peer, key, query, Entered::Credentials(credentials)).await
}

/// `POST /oauth2/auth/:key`: a client-credentials grant's client. `client_secret` may be left
/// out when `client_private_key` is given: the client then authenticates with a JWT signed by
/// that key (`private_key_jwt`), as it also does when the template asks for it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentialsBody {
    client_id: Option<String>,
    client_secret: Option<String>,
    client_certificate: Option<String>,
    client_private_key: Option<String>,
}

/// The longest certificate or private key taken (PEM text).
const MAX_PEM: usize = 10_000;

/// `POST /oauth2/auth/:provider_config_key`: a connection from an OAuth 2.0 client-credentials
/// grant; the token is fetched now and renewed before it expires.
#[utoipa::path(
    post,
    path = "/oauth2/auth/{provider_config_key}",
    tag = "oauth",
    params(
        ("provider_config_key" = String, Path, description = "The integration (an OAUTH2_CC provider)"),
        ("connect_session_token" = Option<String>, Query, description = "A connect session's token"),
        ("public_key" = Option<String>, Query, description = "The public key (without a session)"),
        ("connection_id" = Option<String>, Query, description = "The id (public key only)"),
        ("hmac" = Option<String>, Query, description = "HMAC of `provider_config_key:connection_id`"),
    ),
    request_body = ClientCredentialsBody,
    responses(
        (status = 200, description = "The connection", body = Authorized),
        (status = 400, description = "`missing_client_id`, `missing_client_secret`, `invalid_body`, `invalid_auth_mode`, `client_credentials_fetch_error`, `integration_not_allowed`, …", body = super::error::ErrorBody),
        (status = 401, description = "No valid session token (`unknown_connect_session_token`, `missing_connect_session_token`)", body = super::error::ErrorBody),
        (status = 404, description = "No such integration (`unknown_provider_config`)", body = super::error::ErrorBody),
    ),
    security(()),
)]
pub async fn client_credentials(
    state: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    ApiPath(key): ApiPath<String>,
    query: RawQuery,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Authorized>, ApiError> {
    let body: ClientCredentialsBody = object_body(body)?;
    let client_id = body
        .client_id
        .filter(|id| !id.is_empty())
        .ok_or(ApiError::MissingField {
            code: "missing_client_id",
            message: "missing client_id",
        })?;
    check_limit(&client_id, "client_id", 255)?;
    // A private key authenticates the client instead of a secret (a signed assertion).
    let client_secret = body.client_secret.filter(|secret| !secret.is_empty());
    if client_secret.is_none() && body.client_private_key.is_none() {
        return Err(ApiError::MissingField {
            code: "missing_client_secret",
            message: "missing client_secret (or client_private_key)",
        });
    }
    if let Some(secret) = &client_secret {
        check_limit(secret, "client_secret", 2048)?;
    }
    for (value, field) in [
        (&body.client_certificate, "client_certificate"),
        (&body.client_private_key, "client_private_key"),
    ] {
        if let Some(value) = value {
            pem(value, field)?;
        }
    }
    // Unusable PEM is refused here, before any provider is asked.
    if let Some(key) = &body.client_private_key {
        client_credentials::check_private_key(key)
            .map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    }
    if let Some(certificate) = &body.client_certificate {
        client_credentials::check_certificate(certificate)
            .map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    }
    let entered = Entered::ClientCredentials {
        client_id,
        client_secret: client_secret.unwrap_or_default(),
        client_certificate: body.client_certificate,
        client_private_key: body.client_private_key,
    };
    authorize(state, peer, key, query, entered).await
}

/// A single-line value of at most `max` characters.
fn check_limit(value: &str, field: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ApiError::InvalidBody(format!(
            "{field} must be at most {max} characters, without control characters"
        )));
    }
    Ok(())
}

/// PEM text: at most [`MAX_PEM`] characters, no control characters but line breaks.
fn pem(value: &str, field: &str) -> Result<(), ApiError> {
    if value.chars().count() > MAX_PEM
        || value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\r')
    {
        return Err(ApiError::InvalidBody(format!(
            "{field} must be PEM text of at most {MAX_PEM} characters"
        )));
    }
    Ok(())
}

/// A credential field: `min` to [`MAX_CREDENTIAL`] characters, none of them control characters
/// (they go into HTTP headers).
fn check(value: &str, field: &str, min: usize) -> Result<(), ApiError> {
    let length = value.chars().count();
    if length < min || length > MAX_CREDENTIAL {
        return Err(ApiError::InvalidBody(format!(
            "{field} must be {min} to {MAX_CREDENTIAL} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidBody(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

async fn authorize(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    key: String,
    RawQuery(query): RawQuery,
    entered: Entered,
) -> Result<Json<Authorized>, ApiError> {
    let mut request = connect_request(key, query.as_deref().unwrap_or(""));
    request.client = Some(peer.ip());
    let connection = oauth::authorize_with(&state, request, entered, Utc::now())
        .await
        .map_err(|failure| form_refusal(failure.error))?;
    Ok(Json(Authorized {
        connection_id: connection.connection_id().to_owned(),
        provider_config_key: connection.provider_config_key().to_owned(),
    }))
}
