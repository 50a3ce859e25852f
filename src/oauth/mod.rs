//! OAuth flows (DESIGN §5, §6): `/oauth/connect` sends the user to the provider, and
//! `/oauth/callback` exchanges the code for tokens and records the connection.
//!
//! Guarantees:
//! - The `state` is 256 random bits, URL-safe, stored with the flow in `oauth_sessions`, accepted
//!   once ([`domain::oauth_session::SessionRepository::take_session`]) and only until it
//!   expires; expired sessions are also swept ([`workers::sessions`]).
//! - The flow's WebSocket client, if it has one, hears of the outcome on whichever instance
//!   holds its socket ([`workers::sockets`]).
//! - PKCE S256 is used unless the template disables it; the verifier (and, for OAuth 1.0a, the
//!   request token's secret) is stored sealed under a data key owned by [`SESSION_KEY_OWNER`].
//! - OAuth 1.0a (HMAC-SHA1 or PLAINTEXT) gets its request token at connect, carries the state
//!   in its callback URL, and checks that the callback's `oauth_token` is the flow's.
//! - The `redirect_uri` is always `GRANTLINE_SERVER_URL/oauth/callback`, and the token request
//!   repeats the one the session was started with.
//! - `api_redirect_url` is used only when its origin is on `GRANTLINE_REDIRECT_ALLOWLIST`; any
//!   other value fails the flow at connect, before anything is stored, and is never redirected
//!   to.
//! - A success is reported only after the authorization is in the log and in the read model, so
//!   the very next `GET /connection` sees the provider's tokens.
//! - No secret (client secret, code, verifier, token) appears in a [`FlowError`]'s message.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::catalog::{self, AuthMode, Template};
use domain::commands::{AuthorizeConnection, CommandError};
use domain::connection::{ConnectionKey, Flow};
use domain::credentials::{ClientSecret, Credentials};
use domain::integration::ActiveIntegration;
use domain::keys::KeyError;
use domain::oauth_session::{FlowSecrets, FlowSession, SESSION_KEY_OWNER};
use domain::store::{StoreError, StreamId};
use hmac::{Hmac, KeyInit, Mac};
use oauth2::{CsrfToken, PkceCodeChallenge};
use projections::{ProjectionError, queries};
use serde_json::{Map, Value};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use url::Url;
use uuid::Uuid;
use workers::oauth1::{self, Oauth1Request};
use workers::provider::{ProviderClient, TokenError, TokenRequest, split_scopes};

use crate::config::Config;
use crate::connections::{self, ConnectionsError};
use crate::state::AppState;

/// Random bytes in a `state` (base64url: 43 characters).
const STATE_BYTES: u32 = 32;

/// Authorize-URL parameters a connect request's `authorization_params[...]` cannot set: they
/// carry the flow's own security.
const RESERVED_AUTHORIZATION_PARAMS: [&str; 6] = [
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "oauth_token",
];

/// The flow machinery the handlers share: the provider client and the sealing key of sessions.
#[derive(Debug)]
pub struct Flows {
    provider: ProviderClient,
    session_key: tokio::sync::OnceCell<Uuid>,
}

impl Flows {
    /// Flows whose token requests end within `provider_timeout`.
    pub fn new(provider_timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            provider: ProviderClient::new(provider_timeout)?,
            session_key: tokio::sync::OnceCell::new(),
        })
    }

    /// The data key that seals flow secrets: made once per process, on the first flow.
    async fn session_key(&self, state: &AppState) -> Result<Uuid, KeyError> {
        self.session_key
            .get_or_try_init(|| async {
                state
                    .commands
                    .vault()
                    .create_data_key(&StreamId::from_raw(SESSION_KEY_OWNER))
                    .await
            })
            .await
            .copied()
    }
}

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
    /// The session expired before the callback.
    #[error("Invalid state: the authorization took too long and expired; start again.")]
    ExpiredState,
    /// The provider refused the authorization (its `error` and `error_description`).
    #[error("{}", provider_refusal(.error, .description))]
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
    /// The code could not be exchanged for tokens.
    #[error("Token exchange failed: {0}")]
    Token(#[from] TokenError),
    /// The database cannot be reached (the cause is logged, not shown).
    #[error("The service is temporarily unavailable; try again.")]
    Unavailable(String),
    /// A bug or broken data (the cause is logged, not shown).
    #[error("Unknown error during the OAuth flow.")]
    Internal(String),
}

fn provider_refusal(error: &str, description: &Option<String>) -> String {
    match description {
        Some(description) => {
            format!("The provider refused the authorization ({error}): {description}")
        }
        None => format!("The provider refused the authorization ({error})."),
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
            Self::InvalidParam(_) => "invalid_param",
            Self::MissingHmac => "missing_hmac",
            Self::InvalidHmac => "invalid_hmac",
            Self::UnknownProviderConfig(_) => "provider_config_err",
            Self::UnknownTemplate(_) => "unknown_config_key",
            Self::SignatureMethod(_) => "auth_mode_err",
            Self::GrantType(_) => "grant_type_err",
            Self::UrlParam(_) => "url_param_err",
            Self::MissingState | Self::UnknownState | Self::ExpiredState => "state_err",
            Self::ProviderDenied { .. }
            | Self::MissingCode
            | Self::MissingVerifier
            | Self::TokenMismatch => "callback_err",
            Self::Token(_) => "token_err",
            Self::Unavailable(_) | Self::Internal(_) => "unknown_err",
        }
    }

    fn log(&self, report: &Report) {
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

impl From<ProjectionError> for FlowError {
    fn from(e: ProjectionError) -> Self {
        match e {
            ProjectionError::Store(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<KeyError> for FlowError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Store(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<CommandError> for FlowError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Store(e) => e.into(),
            CommandError::Keys(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<ConnectionsError> for FlowError {
    fn from(e: ConnectionsError) -> Self {
        match e {
            ConnectionsError::ReadModel(e) => e.into(),
            ConnectionsError::Command { source, .. } => source.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Where a flow's outcome goes: what is known of the flow when it ends.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub provider_config_key: Option<String>,
    pub connection_id: Option<String>,
    /// An allow-listed `api_redirect_url`.
    pub api_redirect_url: Option<Url>,
    pub ws_client_id: Option<String>,
}

/// A failed flow and where to report it.
#[derive(Debug)]
pub struct Failure {
    pub error: FlowError,
    pub report: Report,
}

/// A flow that recorded its connection.
#[derive(Debug)]
pub struct Completed {
    pub provider_config_key: String,
    pub connection_id: String,
    pub report: Report,
}

/// What `/oauth/connect` was asked.
#[derive(Debug, Default)]
pub struct ConnectRequest {
    pub provider_config_key: String,
    pub connection_id: Option<String>,
    pub public_key: Option<String>,
    pub hmac: Option<String>,
    /// `params[x]`: connection configuration.
    pub params: BTreeMap<String, String>,
    /// Comma- or space-separated scopes that replace the integration's.
    pub scopes: Option<String>,
    /// `authorization_params[k]`, in order; the value `undefined` removes `k`.
    pub authorization_params: Vec<(String, String)>,
    pub api_redirect_url: Option<String>,
    pub ws_client_id: Option<String>,
}

/// Starts a flow: checks the request, stores the session, and returns the provider's
/// authorization URL to redirect to.
#[tracing::instrument(
    name = "oauth.connect",
    skip_all,
    fields(provider_config_key = %request.provider_config_key)
)]
pub async fn connect(
    state: &AppState,
    request: ConnectRequest,
    now: DateTime<Utc>,
) -> Result<String, Failure> {
    let mut report = Report {
        provider_config_key: Some(request.provider_config_key.clone()),
        ..Report::default()
    };
    let result = start(state, request, now, &mut report).await;
    result.map_err(|error| {
        error.log(&report);
        Failure { error, report }
    })
}

async fn start(
    state: &AppState,
    request: ConnectRequest,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<String, FlowError> {
    let config = &state.config;
    if let Some(url) = non_blank(request.api_redirect_url.as_deref()) {
        report.api_redirect_url = Some(allowed_redirect(config, url)?);
    }
    if let Some(ws) = non_blank(request.ws_client_id.as_deref()) {
        check_param(ws, "ws_client_id")?;
        report.ws_client_id = Some(ws.to_owned());
    }
    let key = request.provider_config_key.clone();
    check_param(&key, "provider_config_key")?;
    if let Some(expected) = &config.public_key {
        let given = non_blank(request.public_key.as_deref()).ok_or(FlowError::MissingPublicKey)?;
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(FlowError::InvalidPublicKey);
        }
    }
    let connection_id = non_blank(request.connection_id.as_deref())
        .ok_or(FlowError::MissingConnectionId)?
        .to_owned();
    check_param(&connection_id, "connection_id")?;
    report.connection_id = Some(connection_id.clone());
    if let Some(hmac_key) = &config.hmac_key {
        let given = non_blank(request.hmac.as_deref()).ok_or(FlowError::MissingHmac)?;
        if !verify_connect_hmac(hmac_key.expose(), &key, &connection_id, given) {
            return Err(FlowError::InvalidHmac);
        }
    }
    for (name, value) in &request.params {
        check_param(name, "a params[...] name")?;
        if value.chars().any(char::is_control) || value.len() > 1024 {
            return Err(FlowError::InvalidParam(format!("params[{name}]")));
        }
    }

    let integration = queries::find_integration(&state.backend, &key)
        .await?
        .ok_or_else(|| FlowError::UnknownProviderConfig(key.clone()))?
        .integration;
    let template = flow_template(state, &integration.provider)?;
    let scopes = match non_blank(request.scopes.as_deref()) {
        Some(scopes) => split_scopes(scopes),
        None => integration.oauth_scopes.clone(),
    };
    if scopes
        .iter()
        .any(|scope| scope.chars().any(char::is_control))
    {
        return Err(FlowError::InvalidParam("scopes".into()));
    }
    let flow = Start {
        integration: &integration,
        template,
        request: &request,
        scopes: &scopes,
        callback_url: format!("{}/oauth/callback", config.server_url),
        state: CsrfToken::new_random_len(STATE_BYTES).secret().clone(),
    };
    let (url, secrets) = match template.auth_mode {
        AuthMode::OAuth2 => start_oauth2(&flow)?,
        AuthMode::OAuth1 => start_oauth1(state, &flow).await?,
    };
    let secrets = match secrets {
        Some(secrets) => {
            let key_id = state.oauth.session_key(state).await?;
            Some(state.commands.vault().seal_json(key_id, &secrets).await?)
        }
        None => None,
    };
    let Start {
        callback_url,
        state: flow_state,
        ..
    } = flow;
    let lifetime = chrono::Duration::from_std(config.oauth_session_lifetime)
        .map_err(|e| FlowError::Internal(e.to_string()))?;
    let session = FlowSession {
        state: flow_state,
        provider_config_key: key.clone(),
        provider: integration.provider.clone(),
        connection_id: connection_id.clone(),
        callback_url,
        connection_config: request
            .params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
        scopes,
        api_redirect_url: report.api_redirect_url.as_ref().map(Url::to_string),
        ws_client_id: report.ws_client_id.clone(),
        secrets,
        created_at: now,
        expires_at: now + lifetime,
    };
    state.backend.sessions().create_session(&session).await?;
    tracing::info!(
        provider_config_key = %key,
        connection_id = %connection_id,
        "oauth flow started"
    );
    Ok(url.into())
}

/// What both kinds of flow start from.
struct Start<'a> {
    integration: &'a ActiveIntegration,
    template: &'a Template,
    request: &'a ConnectRequest,
    scopes: &'a [String],
    callback_url: String,
    state: String,
}

/// The OAuth 2.0 authorization URL, and the PKCE verifier to keep.
fn start_oauth2(flow: &Start<'_>) -> Result<(Url, Option<FlowSecrets>), FlowError> {
    let (template, request) = (flow.template, flow.request);
    if let Some(grant) = template.token_params.get("grant_type")
        && grant != "authorization_code"
    {
        return Err(FlowError::GrantType(grant.clone()));
    }
    let authorization_url = fill_url(&template.authorization_url, &request.params)?;
    // Checked now so a flow that cannot finish does not send the user to the provider.
    fill_url(&template.token_url, &request.params)?;
    let mut url = Url::parse(&authorization_url)
        .map_err(|e| FlowError::UrlParam(format!("the authorization URL is invalid: {e}")))?;
    let pkce = (!template.disable_pkce).then(PkceCodeChallenge::new_random_sha256);

    let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    set_param(&mut params, "response_type", "code");
    set_param(&mut params, "client_id", &flow.integration.oauth_client_id);
    for (name, value) in &template.authorization_params {
        set_param(&mut params, name, value);
    }
    if let Some((challenge, _)) = &pkce {
        set_param(&mut params, "code_challenge", challenge.as_str());
        set_param(&mut params, "code_challenge_method", "S256");
    }
    apply_request_params(&mut params, &request.authorization_params);
    set_param(&mut params, "redirect_uri", &flow.callback_url);
    if flow.scopes.is_empty() {
        params.retain(|(k, _)| k != "scope");
    } else {
        set_param(
            &mut params,
            "scope",
            &flow.scopes.join(&template.scope_separator),
        );
    }
    set_param(&mut params, "state", &flow.state);
    url.query_pairs_mut().clear().extend_pairs(&params);
    let secrets = pkce.map(|(_, verifier)| FlowSecrets {
        code_verifier: Some(verifier.secret().clone()),
        ..FlowSecrets::default()
    });
    Ok((url, secrets))
}

/// Gets OAuth 1.0a temporary credentials; returns the authorization URL and the request
/// token's secret to keep. The callback URL carries the state, since OAuth 1.0a has none.
async fn start_oauth1(
    state: &AppState,
    flow: &Start<'_>,
) -> Result<(Url, Option<FlowSecrets>), FlowError> {
    let (template, request) = (flow.template, flow.request);
    let method = template
        .signature_method
        .unwrap_or(domain::catalog::SignatureMethod::HmacSha1);
    oauth1::check_signature_method(method)
        .map_err(|e| FlowError::SignatureMethod(e.to_string()))?;
    let request_url = template
        .request_url
        .as_deref()
        .ok_or_else(|| FlowError::UrlParam("the template has no request_url".into()))?;
    let request_url = fill_url(request_url, &request.params)?;
    let authorization_url = fill_url(&template.authorization_url, &request.params)?;
    fill_url(&template.token_url, &request.params)?;
    let mut url = Url::parse(&authorization_url)
        .map_err(|e| FlowError::UrlParam(format!("the authorization URL is invalid: {e}")))?;
    let client_secret = state
        .commands
        .reveal_client_secret(flow.integration)
        .await
        .map_err(|e| FlowError::Internal(e.to_string()))?;
    let mut callback = Url::parse(&flow.callback_url)
        .map_err(|e| FlowError::Internal(format!("the callback URL is invalid: {e}")))?;
    callback.query_pairs_mut().append_pair("state", &flow.state);
    let answer = state
        .oauth
        .provider
        .oauth1_request(
            &Oauth1Request {
                url: &request_url,
                consumer_key: &flow.integration.oauth_client_id,
                consumer_secret: &client_secret,
                token: None,
                signature_method: method,
                oauth_params: vec![("oauth_callback".into(), callback.into())],
                body_params: pairs(&template.request_params),
            },
            Utc::now(),
        )
        .await?;
    let field = |name: &str| {
        answer
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (token, token_secret) = (field("oauth_token"), field("oauth_token_secret"));

    let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    for (name, value) in &template.authorization_params {
        set_param(&mut params, name, value);
    }
    if !flow.scopes.is_empty() {
        set_param(
            &mut params,
            "scope",
            &flow.scopes.join(&template.scope_separator),
        );
    }
    apply_request_params(&mut params, &request.authorization_params);
    set_param(&mut params, "oauth_token", &token);
    url.query_pairs_mut().clear().extend_pairs(&params);
    let secrets = FlowSecrets {
        request_token: Some(token),
        request_token_secret: Some(token_secret),
        ..FlowSecrets::default()
    };
    Ok((url, Some(secrets)))
}

/// Applies a connect request's `authorization_params[...]`: `undefined` removes a parameter;
/// the reserved ones are left to the flow.
fn apply_request_params(params: &mut Vec<(String, String)>, requested: &[(String, String)]) {
    for (name, value) in requested {
        if RESERVED_AUTHORIZATION_PARAMS.contains(&name.as_str()) {
            continue;
        }
        if value == "undefined" {
            params.retain(|(k, _)| k != name);
        } else {
            set_param(params, name, value);
        }
    }
}

fn pairs(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Finishes a flow from the callback's query: takes the session, exchanges the code, records
/// the connection and publishes it to the read model.
#[tracing::instrument(
    name = "oauth.callback",
    skip_all,
    fields(provider_config_key, connection_id)
)]
pub async fn callback(
    state: &AppState,
    query: &[(String, String)],
    now: DateTime<Utc>,
) -> Result<Completed, Failure> {
    let mut report = Report::default();
    let result = finish(state, query, now, &mut report).await;
    match result {
        Ok(()) => Ok(Completed {
            provider_config_key: report.provider_config_key.clone().unwrap_or_default(),
            connection_id: report.connection_id.clone().unwrap_or_default(),
            report,
        }),
        Err(error) => {
            error.log(&report);
            Err(Failure { error, report })
        }
    }
}

async fn finish(
    state: &AppState,
    query: &[(String, String)],
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<(), FlowError> {
    let param = |name: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let flow_state = param("state").ok_or(FlowError::MissingState)?;
    let session = state
        .backend
        .sessions()
        .take_session(flow_state)
        .await?
        .ok_or(FlowError::UnknownState)?;
    let span = tracing::Span::current();
    span.record("provider_config_key", session.provider_config_key.as_str());
    span.record("connection_id", session.connection_id.as_str());
    report.provider_config_key = Some(session.provider_config_key.clone());
    report.connection_id = Some(session.connection_id.clone());
    report.ws_client_id = session.ws_client_id.clone();
    // Checked again: the allow-list may have changed since the flow started.
    report.api_redirect_url = session
        .api_redirect_url
        .as_deref()
        .and_then(|url| allowed_redirect(&state.config, url).ok());
    if session.is_expired(now) {
        return Err(FlowError::ExpiredState);
    }
    if let Some(error) = param("error") {
        return Err(FlowError::ProviderDenied {
            error: shorten(error),
            description: param("error_description").map(shorten),
        });
    }

    let key = &session.provider_config_key;
    let integration = queries::find_integration(&state.backend, key)
        .await?
        .ok_or_else(|| FlowError::UnknownProviderConfig(key.clone()))?
        .integration;
    let template = flow_template(state, &integration.provider)?;
    let client_secret = state
        .commands
        .reveal_client_secret(&integration)
        .await
        .map_err(|e| FlowError::Internal(e.to_string()))?;
    let secrets: FlowSecrets = match &session.secrets {
        Some(sealed) => state.commands.vault().unseal_json(sealed).await?,
        None => FlowSecrets::default(),
    };
    let config_params: BTreeMap<String, String> = session
        .connection_config
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
        .collect();
    let token_url = fill_url(&template.token_url, &config_params)?;
    let exchange = Exchange {
        integration: &integration,
        template,
        client_secret: &client_secret,
        token_url: &token_url,
        secrets: &secrets,
        session: &session,
    };
    let (credentials, raw, flow, granted) = match template.auth_mode {
        AuthMode::OAuth2 => {
            let code = param("code").ok_or(FlowError::MissingCode)?;
            exchange_oauth2(state, &exchange, code).await?
        }
        AuthMode::OAuth1 => {
            if let Some(denied) = param("denied") {
                return Err(FlowError::ProviderDenied {
                    error: "denied".to_owned(),
                    description: Some(format!("the user denied request token {}", shorten(denied))),
                });
            }
            let (Some(token), Some(verifier)) = (param("oauth_token"), param("oauth_verifier"))
            else {
                return Err(FlowError::MissingVerifier);
            };
            exchange_oauth1(state, &exchange, token, verifier).await?
        }
    };

    // Connection config is stored in plain JSON, where NUL cannot go (PostgreSQL refuses it).
    let storable = |value: &Value| !value.to_string().contains("\\u0000");
    let mut connection_config = session.connection_config.clone();
    for name in &template.token_response_metadata {
        if let Some(value) = raw.get(name).filter(|v| storable(v)) {
            connection_config.insert(name.clone(), value.clone());
        }
    }
    for name in &template.redirect_uri_metadata {
        if let Some(value) = param(name).filter(|v| !v.contains('\0')) {
            connection_config.insert(name.clone(), Value::String(value.to_owned()));
        }
    }
    let connection = ConnectionKey::new(key, &session.connection_id);
    let loaded = state
        .commands
        .authorize_connection(AuthorizeConnection {
            key: connection.clone(),
            provider: integration.provider.clone(),
            flow,
            credentials,
            scopes: granted.unwrap_or_else(|| session.scopes.clone()),
            connection_config,
            now: Utc::now(),
            metadata: None,
        })
        .await?;
    connections::publish(state, &loaded).await?;
    tracing::info!(stream_version = loaded.version, "oauth flow completed");
    Ok(())
}

/// What a callback's token request needs.
struct Exchange<'a> {
    integration: &'a ActiveIntegration,
    template: &'a Template,
    client_secret: &'a ClientSecret,
    token_url: &'a str,
    secrets: &'a FlowSecrets,
    session: &'a FlowSession,
}

/// The credentials, the raw answer, the flow and the granted scopes (if the answer names them).
type Exchanged = (Credentials, Map<String, Value>, Flow, Option<Vec<String>>);

/// Exchanges an OAuth 2.0 authorization code.
async fn exchange_oauth2(
    state: &AppState,
    exchange: &Exchange<'_>,
    code: &str,
) -> Result<Exchanged, FlowError> {
    let mut params = pairs(&exchange.template.token_params);
    params.push(("grant_type".into(), "authorization_code".into()));
    params.push(("code".into(), code.to_owned()));
    params.push(("redirect_uri".into(), exchange.session.callback_url.clone()));
    if let Some(verifier) = &exchange.secrets.code_verifier {
        params.push(("code_verifier".into(), verifier.clone()));
    }
    let token = state
        .oauth
        .provider
        .request_token(
            &TokenRequest {
                token_url: exchange.token_url,
                client_id: &exchange.integration.oauth_client_id,
                client_secret: exchange.client_secret,
                authorization_method: exchange.template.authorization_method,
                body_format: exchange.template.body_format,
                params,
            },
            Utc::now(),
        )
        .await?;
    let credentials = Credentials::OAuth2 {
        access_token: token.access_token,
        refresh_token: token.refresh_token,
        expires_at: token.expires_at,
        raw: Value::Object(token.raw.clone()),
    };
    Ok((credentials, token.raw, Flow::Oauth2, token.scopes))
}

/// Exchanges OAuth 1.0a temporary credentials and the verifier for token credentials.
async fn exchange_oauth1(
    state: &AppState,
    exchange: &Exchange<'_>,
    token: &str,
    verifier: &str,
) -> Result<Exchanged, FlowError> {
    let (Some(request_token), Some(request_secret)) = (
        exchange.secrets.request_token.as_deref(),
        exchange.secrets.request_token_secret.as_deref(),
    ) else {
        return Err(FlowError::Internal(
            "the OAuth 1.0a session has no request token".into(),
        ));
    };
    if !bool::from(token.as_bytes().ct_eq(request_token.as_bytes())) {
        return Err(FlowError::TokenMismatch);
    }
    let method = exchange
        .template
        .signature_method
        .unwrap_or(domain::catalog::SignatureMethod::HmacSha1);
    let raw = state
        .oauth
        .provider
        .oauth1_request(
            &Oauth1Request {
                url: exchange.token_url,
                consumer_key: &exchange.integration.oauth_client_id,
                consumer_secret: exchange.client_secret,
                token: Some((request_token, request_secret)),
                signature_method: method,
                oauth_params: vec![("oauth_verifier".into(), verifier.to_owned())],
                body_params: pairs(&exchange.template.token_params),
            },
            Utc::now(),
        )
        .await?;
    let field = |name: &str| {
        raw.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let credentials = Credentials::OAuth1 {
        oauth_token: field("oauth_token"),
        oauth_token_secret: field("oauth_token_secret"),
        raw: Value::Object(raw.clone()),
    };
    Ok((credentials, raw, Flow::Oauth1, None))
}

/// The template named `provider`.
fn flow_template<'a>(state: &'a AppState, provider: &str) -> Result<&'a Template, FlowError> {
    state
        .catalog
        .get(provider)
        .ok_or_else(|| FlowError::UnknownTemplate(provider.to_owned()))
}

/// A template URL filled from the connection config.
fn fill_url(url: &str, params: &BTreeMap<String, String>) -> Result<String, FlowError> {
    catalog::interpolate_url(url, params).map_err(|e| FlowError::UrlParam(e.to_string()))
}

/// `url`, if it parses and its origin is on the allow-list.
pub fn allowed_redirect(config: &Config, url: &str) -> Result<Url, FlowError> {
    let parsed = Url::parse(url).map_err(|_| FlowError::RedirectNotAllowed)?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FlowError::RedirectNotAllowed);
    }
    let origin = parsed.origin().ascii_serialization();
    let allowed = config.redirect_allowlist.iter().any(|entry| {
        Url::parse(entry).is_ok_and(|allowed| allowed.origin().ascii_serialization() == origin)
    });
    if allowed {
        Ok(parsed)
    } else {
        Err(FlowError::RedirectNotAllowed)
    }
}

/// Where to send the browser after a success: `url` with its own query kept (minus parameters
/// of ours it may already carry), plus `connection_id` and `provider_config_key`, and, when a
/// secret key is configured, `timestamp` and `signature` ([`success_signature`]).
pub fn success_redirect(
    config: &Config,
    url: &Url,
    connection_id: &str,
    provider_config_key: &str,
    now: DateTime<Utc>,
) -> String {
    let mut added = vec![
        ("connection_id", connection_id.to_owned()),
        ("provider_config_key", provider_config_key.to_owned()),
    ];
    if let Some(secret) = &config.secret_key {
        let timestamp = now.timestamp().to_string();
        let signature = success_signature(
            secret.expose(),
            connection_id,
            provider_config_key,
            &timestamp,
        );
        added.push(("timestamp", timestamp));
        added.push(("signature", signature));
    }
    with_params(url, &added)
}

/// Where to send the browser after a failure: `url` plus `message_type=error`, `error_type` and
/// `error_desc`.
pub fn error_redirect(url: &Url, error: &FlowError) -> String {
    with_params(
        url,
        &[
            ("message_type", "error".to_owned()),
            ("error_type", error.error_type().to_owned()),
            ("error_desc", error.to_string()),
        ],
    )
}

/// The signature of a success redirect: hex HMAC-SHA256, keyed with the secret key, of
/// `"<connection_id>\n<provider_config_key>\n<timestamp>"`.
pub fn success_signature(
    secret_key: &str,
    connection_id: &str,
    provider_config_key: &str,
    timestamp: &str,
) -> String {
    hex(&hmac_sha256(
        secret_key.as_bytes(),
        format!("{connection_id}\n{provider_config_key}\n{timestamp}").as_bytes(),
    ))
}

/// Whether `given` is the hex HMAC-SHA256 of `"<provider_config_key>:<connection_id>"` under
/// `key`, compared in constant time.
pub fn verify_connect_hmac(
    key: &str,
    provider_config_key: &str,
    connection_id: &str,
    given: &str,
) -> bool {
    let Some(given) = unhex(given.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        return false;
    };
    mac.update(format!("{provider_config_key}:{connection_id}").as_bytes());
    mac.verify_slice(&given).is_ok()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn with_params(url: &Url, added: &[(&str, String)]) -> String {
    let mut url = url.clone();
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .into_owned()
        .filter(|(k, _)| !added.iter().any(|(name, _)| name == k))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(&kept)
        .extend_pairs(added.iter().map(|(k, v)| (*k, v.as_str())));
    url.into()
}

/// Replaces `name`'s value where it is, or appends it.
fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some(existing) => value.clone_into(&mut existing.1),
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

fn non_blank(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// 1 to 255 characters, no control characters.
fn check_param(value: &str, what: &str) -> Result<(), FlowError> {
    if value.is_empty() || value.chars().count() > 255 || value.chars().any(char::is_control) {
        return Err(FlowError::InvalidParam(format!(
            "{what} must be 1 to 255 characters without control characters"
        )));
    }
    Ok(())
}

/// A provider's text, cut to a length a page or a URL can carry.
fn shorten(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// The message telling the flow's WebSocket client, if it has one, that the flow succeeded.
fn success_message(done: &Completed) -> Option<(&str, String)> {
    let id = done.report.ws_client_id.as_deref()?;
    let message = serde_json::json!({
        "message_type": "success",
        "provider_config_key": done.provider_config_key,
        "connection_id": done.connection_id,
    });
    Some((id, message.to_string()))
}

/// The message telling the flow's WebSocket client, if it has one, that the flow failed.
fn failure_message(failure: &Failure) -> Option<(&str, String)> {
    let id = failure.report.ws_client_id.as_deref()?;
    let message = serde_json::json!({
        "message_type": "error",
        "provider_config_key": failure.report.provider_config_key,
        "connection_id": failure.report.connection_id,
        "error_type": failure.error.error_type(),
        "error_desc": failure.error.to_string(),
    });
    Some((id, message.to_string()))
}

/// Tells the flow's WebSocket client, if it has one, that the flow succeeded.
pub async fn report_success(state: &AppState, done: &Completed) {
    if let Some((id, message)) = success_message(done) {
        state.sockets.deliver(&state.backend, id, message).await;
    }
}

/// Tells the flow's WebSocket client, if it has one, that the flow failed.
pub async fn report_failure(state: &AppState, failure: &Failure) {
    if let Some((id, message)) = failure_message(failure) {
        state.sockets.deliver(&state.backend, id, message).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_hmac_is_hex_hmac_sha256_of_key_colon_id() {
        let mac = hex(&hmac_sha256(b"k", b"github:user-1"));
        assert!(verify_connect_hmac("k", "github", "user-1", &mac));
        assert!(verify_connect_hmac(
            "k",
            "github",
            "user-1",
            &mac.to_uppercase()
        ));
        assert!(!verify_connect_hmac("k", "github", "user-2", &mac));
        assert!(!verify_connect_hmac("other", "github", "user-1", &mac));
        assert!(!verify_connect_hmac("k", "github", "user-1", "zz"));
        assert!(!verify_connect_hmac("k", "github", "user-1", ""));
    }

    #[test]
    fn the_signature_matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            success_signature("Jefe", "what do ya want ", "for", "nothing?"),
            hex(&hmac_sha256(b"Jefe", b"what do ya want \nfor\nnothing?"))
        );
    }

    #[test]
    fn redirects_keep_the_apps_query_and_replace_our_own_parameters() {
        let url = Url::parse("https://app.example.com/done?x=1&connection_id=forged#top").unwrap();
        let target = with_params(&url, &[("connection_id", "real one".to_owned())]);
        assert_eq!(
            target,
            "https://app.example.com/done?x=1&connection_id=real+one#top"
        );
        let target = error_redirect(&url, &FlowError::MissingCode);
        assert!(
            target.starts_with(
                "https://app.example.com/done?x=1&connection_id=forged&message_type=error\
                 &error_type=callback_err&error_desc=Did+not+get"
            ),
            "{target}"
        );
    }

    #[test]
    fn set_param_replaces_in_place() {
        let mut params = vec![("a".to_owned(), "1".to_owned())];
        set_param(&mut params, "b", "2");
        set_param(&mut params, "a", "3");
        assert_eq!(
            params,
            vec![("a".into(), "3".into()), ("b".into(), "2".into())]
        );
    }
}
