//! Why a flow failed: [`FlowError`], with Nango's `error_type` (reference §3.4) and a message
//! that the user sees on the page and the app as `error_desc`. Failures of our own (storage, a
//! bug) show a fixed message; their cause is logged, never shown.

use domain::commands::CommandError;
use domain::connection::ConnectionRejected;
use domain::keys::KeyError;
use domain::store::StoreError;
use projections::ProjectionError;
use workers::provider::{TokenError, plausible_error_code};

use super::Report;
use crate::connections::ConnectionsError;

/// Why a flow failed. The message is what the user (and the app, as `error_desc`) sees.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// `api_redirect_url` is not a URL whose origin is on the allow-list.
    #[error(
        "api_redirect_url is not allowed: its origin must be one of GRANTLINE_REDIRECT_ALLOWLIST"
    )]
    RedirectNotAllowed,
    /// A public key is configured and the request has none.
    #[error("Missing public_key.")]
    MissingPublicKey,
    /// The request's public key is not the configured one.
    #[error("Invalid public_key.")]
    InvalidPublicKey,
    /// No `connection_id`.
    #[error("Missing connection_id.")]
    MissingConnectionId,
    /// The `connect_session_token` names no live session.
    #[error("Unknown or expired connect session token.")]
    UnknownSessionToken,
    /// The connect session does not allow this integration.
    #[error("The connect session does not allow integration {0:?}.")]
    IntegrationNotAllowed(String),
    /// A secret key is set, and the flow has neither a session token nor a valid `hmac` (nor
    /// the public key, when the server has one).
    #[error("Starting a flow needs a connect session token (or an hmac).")]
    SessionRequired,
    /// A flow started with only the public key names a connection that exists: it may create
    /// connections, not replace them.
    #[error("The connection exists already; re-authorizing it needs a connect session or an hmac.")]
    ConnectionExists,
    /// The connection a reconnect session names was deleted since the session was made.
    #[error("The connection this session reconnects does not exist any more.")]
    ReconnectTargetGone,
    /// A `connection_id` came with a session token (the server chooses the id then).
    #[error("connection_id is forbidden when using session token")]
    ConnectionIdWithSessionToken,
    /// A parameter is malformed (too long, control characters).
    #[error("Invalid parameter: {0}")]
    InvalidParam(String),
    /// HMAC is configured and the request has no `hmac`.
    #[error("Missing hmac.")]
    MissingHmac,
    /// The `hmac` does not match.
    #[error("Invalid hmac.")]
    InvalidHmac,
    /// No integration with this key.
    #[error("There is no provider config with key {0:?}.")]
    UnknownProviderConfig(String),
    /// The integration's provider is not a template of the catalog.
    #[error("The provider template {0:?} is not in the catalog.")]
    UnknownTemplate(String),
    /// The template's OAuth 1.0a signature method is not supported.
    #[error("Cannot sign for this provider: {0}")]
    SignatureMethod(String),
    /// The integration's provider takes another kind of authorization than the route's (an
    /// OAuth flow for an API-key provider, a key for an OAuth provider).
    #[error("The integration's provider uses {0} authorization, which this route does not take.")]
    InvalidAuthMode(&'static str),
    /// The entered credentials did not pass the provider's verification request. The provider's
    /// answer is logged, not shown.
    #[error("The provider did not accept the credentials ({0}).")]
    ConnectionTestFailed(String),
    /// The template asks for a grant other than the authorization code.
    #[error("The grant type {0:?} is not supported; only authorization_code is.")]
    GrantType(String),
    /// A URL of the template cannot be filled from the connection config.
    #[error("Cannot build the provider's URL: {0}")]
    UrlParam(String),
    /// The callback has no `state`.
    #[error("The callback has no state parameter.")]
    MissingState,
    /// No session with this state: never issued, already used, or swept.
    #[error("Invalid state: unknown, or already used.")]
    UnknownState,
    /// The callback came without the cookie of the browser that started the flow.
    #[error("This authorization was started in another browser; start it again here.")]
    ForeignBrowser,
    /// The session expired before the callback.
    #[error("Invalid state: the authorization took too long and expired; start again.")]
    ExpiredState,
    /// The provider refused the authorization (its `error` and `error_description`). The page
    /// shows the error code only: the description is the provider's (or whoever forged the
    /// callback's) text, and is logged instead.
    #[error("The provider refused the authorization ({}).", plausible_error_code(.error))]
    ProviderDenied {
        error: String,
        description: Option<String>,
    },
    /// The callback has no `code`.
    #[error("Did not get authorization code in the callback.")]
    MissingCode,
    /// An OAuth 1.0a callback without `oauth_token` and `oauth_verifier`.
    #[error("Did not get oauth_token and oauth_verifier in the callback.")]
    MissingVerifier,
    /// An OAuth 1.0a callback whose `oauth_token` is not this flow's request token.
    #[error("The oauth_token of the callback is not the one of this flow.")]
    TokenMismatch,
    /// The code could not be exchanged for tokens. The page shows the class of failure; the
    /// provider's text and network details are logged, never shown.
    #[error("Token exchange failed: {}.", public_token_error(.0))]
    Token(#[from] TokenError),
    /// This client started more flows in the last minute than the server allows.
    #[error("Too many authorizations were started from this address; wait a minute.")]
    TooManyFlows,
    /// As many flows are open as the server allows.
    #[error("Too many authorizations are in progress; try again in a few minutes.")]
    TooManyOpenFlows,
    /// The database cannot be reached (the cause is logged, not shown).
    #[error("The service is temporarily unavailable; try again.")]
    Unavailable(String),
    /// A bug or broken data (the cause is logged, not shown).
    #[error("Unknown error during the OAuth flow.")]
    Internal(String),
}

/// What the browser may learn of a failed token exchange: its class, the HTTP status and the
/// OAuth error code.
fn public_token_error(e: &TokenError) -> String {
    match e {
        TokenError::InvalidUrl(_) => "the provider's token URL is not valid".into(),
        TokenError::Timeout(_) => "the provider did not answer in time".into(),
        TokenError::Network(_) => "the provider could not be reached".into(),
        TokenError::Refused { status, error, .. } => match error {
            Some(code) => format!(
                "the provider refused it (HTTP {status}, {})",
                plausible_error_code(code)
            ),
            None => format!("the provider refused it (HTTP {status})"),
        },
        TokenError::Malformed(_) => "the provider's answer is not a token response".into(),
        TokenError::ClientAuth(why) => format!("the client cannot authenticate: {why}"),
    }
}

impl FlowError {
    /// Nango's `error_type` (reference §3.4).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::RedirectNotAllowed => "invalid_api_redirect_url",
            Self::MissingPublicKey => "missing_public_key",
            Self::InvalidPublicKey => "invalid_public_key",
            Self::MissingConnectionId => "missing_connection_id",
            Self::UnknownSessionToken => "unknown_connect_session_token",
            Self::IntegrationNotAllowed(_) => "integration_not_allowed",
            Self::ConnectionIdWithSessionToken => "invalid_query_params",
            Self::SessionRequired => "missing_connect_session_token",
            Self::ConnectionExists | Self::ReconnectTargetGone => "invalid_connection",
            Self::InvalidParam(_) => "invalid_param",
            Self::MissingHmac => "missing_hmac",
            Self::InvalidHmac => "invalid_hmac",
            Self::UnknownProviderConfig(_) => "provider_config_err",
            Self::UnknownTemplate(_) => "unknown_config_key",
            Self::SignatureMethod(_) => "auth_mode_err",
            Self::GrantType(_) => "grant_type_err",
            Self::InvalidAuthMode(_) => "invalid_auth_mode",
            Self::ConnectionTestFailed(_) => "connection_test_failed",
            Self::UrlParam(_) => "url_param_err",
            Self::MissingState | Self::UnknownState | Self::ExpiredState => "state_err",
            Self::ForeignBrowser => "state_cookie_err",
            Self::ProviderDenied { .. }
            | Self::MissingCode
            | Self::MissingVerifier
            | Self::TokenMismatch => "callback_err",
            Self::Token(_) => "token_err",
            Self::TooManyFlows | Self::TooManyOpenFlows => "rate_limit_err",
            Self::Unavailable(_) | Self::Internal(_) => "unknown_err",
        }
    }

    /// What only the log learns: the provider's description, the exchange's full error.
    fn cause(&self) -> Option<String> {
        match self {
            Self::ProviderDenied { description, .. } => description.clone(),
            Self::Token(e) => Some(e.to_string()),
            _ => None,
        }
    }

    /// Logs the failure once: our own at ERROR with its cause, the rest at INFO.
    pub(super) fn log(&self, report: &Report) {
        let key = report.provider_config_key.as_deref().unwrap_or("");
        let id = report.connection_id.as_deref().unwrap_or("");
        match self {
            Self::Unavailable(cause) | Self::Internal(cause) => tracing::error!(
                provider_config_key = key,
                connection_id = id,
                error.message = %cause,
                "oauth flow failed"
            ),
            other => tracing::info!(
                provider_config_key = key,
                connection_id = id,
                error_type = other.error_type(),
                error.message = %other,
                error.cause = other.cause().as_deref(),
                "oauth flow failed"
            ),
        }
    }
}

impl From<StoreError> for FlowError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Database(cause) => Self::Unavailable(cause),
            other => Self::Internal(other.to_string()),
        }
    }
}

from_store_wrapping_errors!(FlowError: ProjectionError, KeyError);

impl From<CommandError> for FlowError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Connection(ConnectionRejected::AlreadyExists) => Self::ConnectionExists,
            // Only a reconnect refuses a connection that is not there.
            CommandError::Connection(
                ConnectionRejected::NotFound | ConnectionRejected::Deleted,
            ) => Self::ReconnectTargetGone,
            CommandError::Store(e) => e.into(),
            CommandError::Keys(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::connect_sessions::SessionsError> for FlowError {
    fn from(e: crate::connect_sessions::SessionsError) -> Self {
        use crate::connect_sessions::SessionsError;
        match e {
            SessionsError::UnknownToken => Self::UnknownSessionToken,
            SessionsError::Store(e) => e.into(),
            SessionsError::ReadModel(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<ConnectionsError> for FlowError {
    fn from(e: ConnectionsError) -> Self {
        match e {
            ConnectionsError::ReadModel(e) => e.into(),
            ConnectionsError::Command { source, .. } => (*source).into(),
            ConnectionsError::UnknownProviderConfig(key) => Self::UnknownProviderConfig(key),
            other => Self::Internal(other.to_string()),
        }
    }
}
