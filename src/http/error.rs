//! The one error type of the HTTP API: `{"error": {"code", "message", "payload"}}`, with the
//! codes and statuses Nango's clients know (reference §1.7). 5xx bodies carry no internals; the
//! cause is logged once.
//!
//! This is the one place where the services' errors ([`ConnectionsError`], [`IntegrationsError`],
//! [`HistoryError`], [`FlowError`], and those of the stores and workers) become what a client
//! sees: a status, a code, a message and a payload.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use domain::commands::CommandError;
use domain::connection::RecordedFailure;
use domain::connection::{ConnectionKey, ConnectionRejected};
use domain::integration::IntegrationRejected;
use domain::keys::KeyError;
use domain::store::StoreError;
use projections::ProjectionError;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use workers::refresh::RefreshError;
use workers::webhooks::WebhookError;

use crate::connect_sessions::SessionsError;
use crate::connections::ConnectionsError;
use crate::history::HistoryError;
use crate::integrations::IntegrationsError;
use crate::oauth::FlowError;
use crate::proxy::ProxyError;

/// A failed request. Each variant's doc names its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: a secret key is configured and the request has no `Authorization` header.
    #[error("authentication required: send Authorization: Bearer <secret key>")]
    MissingAuthHeader,
    /// 401: the `Authorization` header is neither `Bearer <key>` nor `Basic <base64(key:)>`.
    #[error("the Authorization header must be Bearer <secret key> or Basic base64(<secret key>:)")]
    MalformedAuthHeader,
    /// 401: the key does not match the configured secret key.
    #[error("invalid secret key")]
    InvalidSecretKey,
    /// 400: `provider_config_key` is missing or empty.
    #[error("missing param 'provider_config_key'")]
    MissingProviderConfig,
    /// 400: the `provider_config_key` a request refers to does not exist.
    #[error("unknown provider config key {0:?}")]
    UnknownProviderConfig(String),
    /// 404: the integration named in the path does not exist.
    #[error("no provider config with key {0:?}")]
    ProviderConfigNotFound(String),
    /// 400: the `provider` of a config is not a template of the catalog (built-in or
    /// `GRANTLINE_PROVIDERS_FILE`).
    #[error("unknown provider template {0:?}")]
    UnknownProviderTemplate(String),
    /// 409: an integration with this key exists already.
    #[error("a provider config with key {0:?} exists already")]
    DuplicateProviderConfig(String),
    /// 400: `connection_id` is missing or empty.
    #[error("missing param 'connection_id'")]
    MissingConnection,
    /// 404: no such connection for this provider config key.
    #[error(
        "no connection {:?} for provider config key {:?}",
        .0.connection_id(),
        .0.provider_config_key()
    )]
    UnknownConnection(ConnectionKey),
    /// 400: a delete named no connection (Nango answers `unknown_connection` with 400 there,
    /// and 404 everywhere else).
    #[error(
        "no connection {:?} for provider config key {:?} to delete",
        .0.connection_id(),
        .0.provider_config_key()
    )]
    NothingToDelete(ConnectionKey),
    /// 400: a required field of the body is missing (`code` names it, e.g. `missing_access_token`).
    #[error("{message}")]
    MissingField {
        code: &'static str,
        message: &'static str,
    },
    /// 400: the body is valid JSON but not what this endpoint takes.
    #[error("invalid body: {0}")]
    InvalidBody(String),
    /// 400: the body is not valid JSON.
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    /// 415: the body is not sent as `application/json`.
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    /// 400: more than one `Content-Type`, so what the body is in is ambiguous (a server behind
    /// might read it as the other).
    #[error("send one Content-Type: this request has several")]
    DuplicateContentType,
    /// 413: the body is larger than the server accepts.
    #[error("the body is too large")]
    PayloadTooLarge,
    /// 400: a query parameter has a value this endpoint does not accept.
    #[error("invalid query parameters: {0}")]
    InvalidQuery(String),
    /// 400: a path segment is not valid (bad encoding, too long, control characters).
    #[error("invalid path parameter: {0}")]
    InvalidPath(String),
    /// 408: the request took longer than the server waits (`GRANTLINE_REQUEST_TIMEOUT`).
    #[error("the request took too long")]
    RequestTimeout,
    /// 403: a browser on an origin the server does not know opened a WebSocket.
    #[error("this origin may not open a WebSocket here")]
    ForbiddenOrigin,
    /// 421: in open mode (no secret key) the request names a host that is not loopback.
    #[error(
        "without GRANTLINE_SECRET_KEY this server answers only requests to localhost or a \
         loopback address"
    )]
    NotLoopbackHost,
    /// 503: the server (or this client) holds as many WebSockets as it may.
    #[error("too many WebSockets are open; try again later")]
    TooManySockets,
    /// 409: other requests kept changing the same connection; try again.
    #[error("the resource was changed concurrently; try again")]
    Conflict,
    /// 404: no route matches the path.
    #[error("no route matches this path")]
    UnknownRoute,
    /// 405: the route exists but not for this method.
    #[error("this route does not accept this method")]
    MethodNotAllowed,
    /// 424: the token is due and its last refresh failed permanently (`invalid_grant`, another
    /// 4xx): the provider is not asked again until `force_refresh=true` or a re-authorization.
    #[error(
        "refreshing the token failed permanently; re-authorize the connection or force a refresh"
    )]
    RefreshFailed(RecordedFailure),
    /// 503: the token has expired and refreshing it failed transiently; retried with backoff.
    #[error("refreshing the token failed temporarily; try again later")]
    RefreshRetrying {
        failure: RecordedFailure,
        retry_at: DateTime<Utc>,
    },
    /// A refresh failure as today's Nango reports it on `/connections/:id`: code
    /// `invalid_credentials`, the cause's status and message, and the connection (without
    /// credentials) in the payload beside the failure.
    #[error("{cause}")]
    InvalidCredentials {
        cause: Box<ApiError>,
        connection: Value,
    },
    /// 401: no live connect session has this token (never made, expired or deleted).
    #[error("unknown or expired connect session token")]
    UnknownConnectSessionToken,
    /// 401: a secret key is set and a flow came without a session token or `hmac`.
    #[error("starting a flow needs a connect session token (or an hmac)")]
    ConnectSessionRequired,
    /// 404: no provider template has this name.
    #[error("Unknown provider {0}")]
    UnknownProvider(String),
    /// 400: the connect session does not allow this integration.
    #[error("the connect session does not allow integration {0:?}")]
    IntegrationNotAllowed(String),
    /// 4xx: credentials entered in a form were refused; `code` says why, as Nango's
    /// `/api-auth` routes do (`invalid_auth_mode`, `connection_test_failed`, …).
    #[error("{message}")]
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// 503: the database cannot be reached.
    #[error("the service is temporarily unavailable")]
    Unavailable(String),
    /// 500: a bug or broken data; the cause is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status it answers.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    /// The code its body carries.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Self::MissingAuthHeader => (S::UNAUTHORIZED, "missing_auth_header"),
            Self::MalformedAuthHeader => (S::UNAUTHORIZED, "malformed_auth_header"),
            Self::InvalidSecretKey => (S::UNAUTHORIZED, "invalid_secret_key"),
            Self::MissingProviderConfig => (S::BAD_REQUEST, "missing_provider_config"),
            Self::UnknownProviderConfig(_) => (S::BAD_REQUEST, "unknown_provider_config"),
            Self::ProviderConfigNotFound(_) => (S::NOT_FOUND, "unknown_provider_config"),
            Self::DuplicateProviderConfig(_) => (S::CONFLICT, "duplicate_provider_config"),
            Self::MissingConnection => (S::BAD_REQUEST, "missing_connection"),
            Self::UnknownConnection(_) => (S::NOT_FOUND, "unknown_connection"),
            Self::NothingToDelete(_) => (S::BAD_REQUEST, "unknown_connection"),
            Self::UnknownProviderTemplate(_) => (S::BAD_REQUEST, "unknown_provider_template"),
            Self::MissingField { code, .. } => (S::BAD_REQUEST, code),
            Self::InvalidBody(_) => (S::BAD_REQUEST, "invalid_body"),
            Self::InvalidJson(_) => (S::BAD_REQUEST, "invalid_json"),
            Self::UnsupportedMediaType => (S::UNSUPPORTED_MEDIA_TYPE, "invalid_content_type"),
            Self::DuplicateContentType => (S::BAD_REQUEST, "invalid_content_type"),
            Self::PayloadTooLarge => (S::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::InvalidQuery(_) => (S::BAD_REQUEST, "invalid_query_params"),
            Self::InvalidPath(_) => (S::BAD_REQUEST, "invalid_uri_params"),
            Self::RequestTimeout => (S::REQUEST_TIMEOUT, "request_timeout"),
            Self::ForbiddenOrigin => (S::FORBIDDEN, "forbidden_origin"),
            Self::NotLoopbackHost => (S::MISDIRECTED_REQUEST, "non_loopback_host"),
            Self::TooManySockets => (S::SERVICE_UNAVAILABLE, "too_many_websockets"),
            Self::Conflict => (S::CONFLICT, "conflict"),
            Self::UnknownRoute => (S::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::RefreshFailed(_) => (S::FAILED_DEPENDENCY, "connection_refresh_failed"),
            Self::RefreshRetrying { .. } => (S::SERVICE_UNAVAILABLE, "connection_refresh_retrying"),
            Self::InvalidCredentials { cause, .. } => {
                (cause.status_and_code().0, "invalid_credentials")
            }
            Self::UnknownConnectSessionToken => (S::UNAUTHORIZED, "unknown_connect_session_token"),
            Self::IntegrationNotAllowed(_) => (S::BAD_REQUEST, "integration_not_allowed"),
            Self::UnknownProvider(_) => (S::NOT_FOUND, "not_found"),
            Self::ConnectSessionRequired => (S::UNAUTHORIZED, "missing_connect_session_token"),
            Self::Refused { status, code, .. } => (*status, code),
            Self::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "service_unavailable"),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    fn payload(&self) -> Value {
        match self {
            Self::UnknownConnection(key) | Self::NothingToDelete(key) => json!({
                "connection_id": key.connection_id(),
                "provider_config_key": key.provider_config_key(),
            }),
            Self::UnknownProviderConfig(key)
            | Self::ProviderConfigNotFound(key)
            | Self::DuplicateProviderConfig(key) => json!({ "provider_config_key": key }),
            Self::UnknownProviderTemplate(provider) => json!({ "provider": provider }),
            Self::RefreshFailed(failure) => failure_payload(failure, None),
            Self::RefreshRetrying { failure, retry_at } => {
                failure_payload(failure, Some(*retry_at))
            }
            Self::InvalidCredentials { cause, connection } => {
                let mut payload = cause.payload();
                payload["connection"] = connection.clone();
                payload
            }
            _ => json!({}),
        }
    }
}

/// What a client may see of a refresh failure: class, provider status and error code, time, and
/// the provider's description (a [`TokenError`](workers::provider::TokenError) text, which never
/// holds a secret).
fn failure_payload(failure: &RecordedFailure, retry_at: Option<DateTime<Utc>>) -> Value {
    let mut payload = json!({
        "failure_class": failure.failure.class,
        "provider_status": failure.failure.provider_status,
        "provider_error": failure.failure.code,
        "description": failure.failure.description,
        "failed_at": crate::http::connection::timestamp(failure.failed_at),
    });
    if let Some(retry_at) = retry_at {
        payload["retry_at"] = json!(crate::http::connection::timestamp(retry_at));
    }
    payload
}

impl From<RefreshError> for ApiError {
    fn from(e: RefreshError) -> Self {
        match e {
            RefreshError::Permanent(failure) => Self::RefreshFailed(failure),
            RefreshError::Transient { failure, retry_at } => {
                Self::RefreshRetrying { failure, retry_at }
            }
            RefreshError::Unavailable(cause) => Self::Unavailable(cause),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for programs: e.g. `missing_provider_config`, `unknown_provider_config`,
    /// `unknown_connection`, `missing_access_token`, `invalid_body`, `invalid_json`,
    /// `invalid_query_params`, `invalid_uri_params`, `missing_auth_header`,
    /// `invalid_secret_key`, `connection_refresh_failed`, `connection_refresh_retrying`,
    /// `not_found`, `method_not_allowed`, `service_unavailable`, `internal_error`; for a request
    /// the HTTP parser cannot read, `invalid_request`, `uri_too_long`, `headers_too_large`.
    code: &'static str,
    /// What went wrong, for people; never holds a secret.
    message: String,
    /// Details for the code (`connection_id` and `provider_config_key` for
    /// `unknown_connection`; the failure for `connection_refresh_*`); `{}` otherwise.
    #[schema(value_type = Object)]
    payload: Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        self.log();
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                payload: self.payload(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl ApiError {
    /// Logs the cause of a failure that is the server's, not the caller's (never a secret:
    /// causes are database and internal errors).
    pub fn log(&self) {
        match self {
            Self::Internal(cause) => tracing::error!(error.message = %cause, "request failed"),
            Self::Unavailable(cause) => {
                tracing::warn!(error.message = %cause, "database unavailable")
            }
            _ => {}
        }
    }

    /// When a client may try again, in seconds, for the answers that are worth retrying.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Unavailable(_) | Self::TooManySockets => Some(1),
            Self::InvalidCredentials { cause, .. } => cause.retry_after(),
            Self::RefreshRetrying { retry_at, .. } => Some(
                u64::try_from((*retry_at - chrono::Utc::now()).num_seconds())
                    .unwrap_or(0)
                    .max(1),
            ),
            _ => None,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(e) => Self::InvalidJson(e.body_text()),
            JsonRejection::JsonDataError(e) => Self::InvalidBody(e.body_text()),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::InvalidBody(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::InvalidQuery(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::InvalidPath(rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Database(cause) => Self::Unavailable(cause),
            StoreError::Conflict { .. } => Self::Conflict,
            other => Self::Internal(other.to_string()),
        }
    }
}

from_store_wrapping_errors!(ApiError: ProjectionError, KeyError, WebhookError);

impl From<ConnectionsError> for ApiError {
    fn from(e: ConnectionsError) -> Self {
        match e {
            ConnectionsError::UnknownProviderConfig(key) => Self::UnknownProviderConfig(key),
            ConnectionsError::UnknownConnection(key) => Self::UnknownConnection(key),
            ConnectionsError::Refresh(e) => e.into(),
            ConnectionsError::Command { key, source } => command_error(*source, &key),
            ConnectionsError::ReadModel(e) => e.into(),
            ConnectionsError::InvalidOwnership(message) => Self::InvalidBody(message),
            error @ ConnectionsError::UnfitCredentials { .. } => {
                Self::InvalidBody(error.to_string())
            }
            other @ (ConnectionsError::NotLive(_) | ConnectionsError::Render(_)) => {
                Self::Internal(other.to_string())
            }
        }
    }
}

impl From<SessionsError> for ApiError {
    fn from(e: SessionsError) -> Self {
        match e {
            SessionsError::Invalid(message) => Self::InvalidBody(message),
            SessionsError::UnknownConnection => Self::InvalidBody(e.to_string()),
            SessionsError::UnknownToken => Self::UnknownConnectSessionToken,
            SessionsError::Store(e) => e.into(),
            SessionsError::ReadModel(e) => e.into(),
        }
    }
}

impl From<IntegrationsError> for ApiError {
    fn from(e: IntegrationsError) -> Self {
        match e {
            IntegrationsError::NotFound(key) => Self::ProviderConfigNotFound(key),
            IntegrationsError::UnknownProviderConfig(key) => Self::UnknownProviderConfig(key),
            IntegrationsError::UnknownTemplate(provider) => Self::UnknownProviderTemplate(provider),
            IntegrationsError::InvalidKey(_) => Self::InvalidBody(e.to_string()),
            IntegrationsError::MissingClientId => Self::MissingField {
                code: "missing_client_id",
                message: "missing oauth_client_id",
            },
            IntegrationsError::MissingClientSecret => Self::MissingField {
                code: "missing_client_secret",
                message: "missing oauth_client_secret",
            },
            IntegrationsError::Command { key, source } => integration_command_error(source, &key),
            IntegrationsError::Connection(e) => (*e).into(),
            IntegrationsError::ReadModel(e) => e.into(),
        }
    }
}

impl From<HistoryError> for ApiError {
    fn from(e: HistoryError) -> Self {
        match e {
            HistoryError::UnknownConnection(key) => Self::UnknownConnection(key),
            HistoryError::Store(e) => e.into(),
            HistoryError::Unreadable(e) => Self::Internal(e.to_string()),
        }
    }
}

/// The status of the page that reports a failed OAuth flow: 4xx for anything about the request
/// or the provider (never a 5xx for provider trouble), 503/500 for our own.
pub fn flow_status(error: &FlowError) -> StatusCode {
    match error {
        FlowError::Unavailable(_) | FlowError::TooManyOpenFlows => StatusCode::SERVICE_UNAVAILABLE,
        FlowError::TooManyFlows => StatusCode::TOO_MANY_REQUESTS,
        FlowError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// The JSON answer of a refused credential form (or a refused flow start that is answered as
/// JSON): Nango's codes for the `/api-auth` routes.
pub fn form_refusal(error: FlowError) -> ApiError {
    use StatusCode as S;
    let refused = |status, code, error: &FlowError| ApiError::Refused {
        status,
        code,
        message: error.to_string(),
    };
    match error {
        FlowError::UnknownSessionToken => ApiError::UnknownConnectSessionToken,
        FlowError::SessionRequired => ApiError::ConnectSessionRequired,
        FlowError::IntegrationNotAllowed(key) => ApiError::IntegrationNotAllowed(key),
        FlowError::UnknownProviderConfig(key) => ApiError::ProviderConfigNotFound(key),
        FlowError::ConnectionIdWithSessionToken
        | FlowError::InvalidParam(_)
        | FlowError::UrlParam(_) => ApiError::InvalidQuery(error.to_string()),
        FlowError::UnknownTemplate(_) => refused(S::NOT_FOUND, "unknown_provider_template", &error),
        FlowError::InvalidAuthMode(_) => refused(S::BAD_REQUEST, "invalid_auth_mode", &error),
        FlowError::ConnectionTestFailed(_) => {
            refused(S::BAD_REQUEST, "connection_test_failed", &error)
        }
        FlowError::ConnectionExists | FlowError::ReconnectTargetGone => {
            refused(S::BAD_REQUEST, "invalid_connection", &error)
        }
        FlowError::MissingConnectionId => refused(S::BAD_REQUEST, "missing_connection_id", &error),
        FlowError::MissingHmac => refused(S::BAD_REQUEST, "missing_hmac", &error),
        FlowError::InvalidHmac => refused(S::BAD_REQUEST, "invalid_hmac", &error),
        FlowError::MissingPublicKey => refused(S::UNAUTHORIZED, "missing_public_key", &error),
        FlowError::InvalidPublicKey => refused(S::UNAUTHORIZED, "invalid_public_key", &error),
        FlowError::TooManyFlows => refused(S::TOO_MANY_REQUESTS, "too_many_requests", &error),
        FlowError::Token(_) => refused(S::BAD_REQUEST, "client_credentials_fetch_error", &error),
        FlowError::TooManyOpenFlows => ApiError::Unavailable(error.to_string()),
        FlowError::Unavailable(cause) => ApiError::Unavailable(cause),
        other => ApiError::Internal(other.to_string()),
    }
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            ProxyError::UnknownProviderConfig(key) => {
                return Self::ProviderConfigNotFound(key.clone());
            }
            ProxyError::BodyTooLarge => return Self::PayloadTooLarge,
            ProxyError::NoBaseUrl(_) => (S::BAD_REQUEST, "unsupported_provider"),
            ProxyError::OverrideNotAllowed(_) => (S::BAD_REQUEST, "base_url_override_not_allowed"),
            ProxyError::BlockedDestination(_) => (S::BAD_REQUEST, "blocked_destination"),
            ProxyError::UnsupportedAuthMode(_) => (S::BAD_REQUEST, "unsupported_auth_mode"),
            ProxyError::InvalidUrl(_) => (S::BAD_REQUEST, "invalid_proxy_url"),
            ProxyError::UnusableCredential(_) => (S::UNPROCESSABLE_ENTITY, "invalid_credentials"),
            ProxyError::Unreachable => (S::BAD_GATEWAY, "upstream_unreachable"),
            ProxyError::Timeout => (S::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::Connection(_) => {
                let ProxyError::Connection(e) = e else {
                    return Self::Internal("unreachable".into());
                };
                return e.into();
            }
        };
        Self::Refused {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// Maps a connection command's failure; `key` names the connection for 404s.
fn command_error(e: CommandError, key: &ConnectionKey) -> ApiError {
    match e {
        CommandError::Connection(ConnectionRejected::NotFound | ConnectionRejected::Deleted) => {
            ApiError::UnknownConnection(key.clone())
        }
        other => integration_command_error(other, key.provider_config_key()),
    }
}

/// Maps an integration command's failure; `key` names the integration for 404s and 409s.
fn integration_command_error(e: CommandError, key: &str) -> ApiError {
    match e {
        CommandError::Connection(ConnectionRejected::NotFound | ConnectionRejected::Deleted) => {
            ApiError::UnknownConnection(ConnectionKey::new(key, ""))
        }
        CommandError::Connection(ConnectionRejected::MetadataNotObject) => {
            ApiError::InvalidBody("metadata must be a JSON object".into())
        }
        CommandError::Connection(other) => ApiError::InvalidBody(other.to_string()),
        CommandError::Integration(IntegrationRejected::AlreadyExists) => {
            ApiError::DuplicateProviderConfig(key.to_owned())
        }
        CommandError::Integration(_) => ApiError::ProviderConfigNotFound(key.to_owned()),
        CommandError::Store(e) => e.into(),
        CommandError::Keys(e) => e.into(),
        CommandError::Unreadable(e) => ApiError::Internal(e.to_string()),
        CommandError::Conflict => ApiError::Conflict,
    }
}
