//! Starting a flow (`/oauth/connect`): the request is checked (allow-listed redirect, public
//! key, `hmac`, well-formed parameters) before anything is stored; then the session is stored
//! with its sealed secrets and the browser is sent to the provider's authorization URL.
//!
//! The authorization URL keeps the template's own query, then the template's
//! `authorization_params`, then the request's `authorization_params[...]` (`undefined` removes
//! one); the parameters that carry the flow's security (`client_id`, `redirect_uri`, `state`,
//! PKCE, `oauth_token`) are always the flow's own.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use domain::bounds::JsonBounds;
use domain::catalog::{AuthMode, Template};
use domain::connect_session::{ConfigDefaults, ConnectSession};
use domain::connection::ConnectionKey;
use domain::integration::ActiveIntegration;
use domain::oauth_session::{FlowSecrets, FlowSession, binding_cookie_name};
use oauth2::{CsrfToken, PkceCodeChallenge};
use projections::queries;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use url::Url;
use uuid::Uuid;
use workers::oauth1::{self, Oauth1Request};
use workers::provider::split_scopes;

use super::redirect::allowed_redirect;
use super::signature::verify_connect_hmac;
use super::{Failure, FlowError, Report, fill_url, flow_template, pairs, text_field};
use crate::config::Config;
use crate::connect_sessions;
use crate::server::Limit;
use crate::state::AppState;

/// Random bytes in a `state` (base64url: 43 characters).
const STATE_BYTES: u32 = 32;

/// Authorization URL parameters the flow's safety rests on: a caller's `authorization_params`
/// may not set or remove them.
const PROTECTED_PARAMS: [&str; 6] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
];

/// Whether `state` could be one this server made: base64url, as long as [`STATE_BYTES`] gives.
/// Anything else is not looked up at all.
pub fn plausible_state(state: &str) -> bool {
    state.len() == (STATE_BYTES as usize * 4).div_ceil(3)
        && state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

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

/// What `/oauth/connect` was asked.
#[derive(Debug, Default)]
pub struct ConnectRequest {
    /// The address the request came from (flows are rate-limited per address).
    pub client: Option<IpAddr>,
    pub provider_config_key: String,
    pub connection_id: Option<String>,
    pub public_key: Option<String>,
    pub hmac: Option<String>,
    /// A connect session's token: it replaces the public key and `hmac`, and the server
    /// chooses the connection id.
    pub connect_session_token: Option<String>,
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
) -> Result<Started, Failure> {
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
) -> Result<Started, FlowError> {
    let config = &state.config;
    if let Some(url) = non_blank(request.api_redirect_url.as_deref()) {
        report.api_redirect_url = Some(allowed_redirect(config, url)?);
    }
    if let Some(ws) = non_blank(request.ws_client_id.as_deref()) {
        check_param(ws, "ws_client_id")?;
        report.ws_client_id = Some(ws.to_owned());
    }
    let Caller {
        connection,
        only_new,
        only_existing,
        session,
        integration,
        connection_config,
        request,
    } = caller(state, request, now, report).await?;
    let key = connection.provider_config_key();
    let template = flow_template(state, &integration.settings.provider)?;
    let scopes = match non_blank(request.scopes.as_deref()) {
        Some(scopes) => split_scopes(scopes),
        None => integration.settings.oauth_scopes.clone(),
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
        mode @ (AuthMode::ApiKey | AuthMode::Basic | AuthMode::OAuth2Cc) => {
            return Err(FlowError::InvalidAuthMode(mode.as_str()));
        }
    };
    // The browser that starts the flow gets a cookie the callback must bring back, so a
    // callback URL carried to another browser (a victim's) cannot finish the flow there.
    let binding = CsrfToken::new_random_len(STATE_BYTES).secret().clone();
    let mut secrets = secrets.unwrap_or_default();
    secrets.browser_binding = Some(binding.clone());
    let key_id = state.oauth.session_key(state).await?;
    let secrets = Some(state.commands.vault().seal_json(key_id, &secrets).await?);
    let cookie = BindingCookie {
        name: binding_cookie_name(&flow.state),
        value: binding,
        max_age: config.oauth_session_lifetime.as_secs(),
    };
    let Start {
        callback_url,
        state: flow_state,
        ..
    } = flow;
    let lifetime = chrono::Duration::from_std(config.oauth_session_lifetime)
        .map_err(|e| FlowError::Internal(e.to_string()))?;
    let session = FlowSession {
        only_new,
        only_existing,
        ownership: session.as_ref().map(ConnectSession::ownership),
        state: flow_state,
        provider_config_key: key.to_owned(),
        provider: integration.settings.provider.clone(),
        connection_id: connection.connection_id().to_owned(),
        callback_url,
        connection_config,
        scopes,
        api_redirect_url: report.api_redirect_url.as_ref().map(Url::to_string),
        ws_client_id: report.ws_client_id.clone(),
        secrets,
        created_at: now,
        expires_at: now + lifetime,
    };
    // A cap on open flows, so anonymous starts cannot fill the table (approximate under
    // concurrency: each start counts, then inserts).
    if state.backend.sessions().open_sessions(now).await?
        >= state.config.limits.max_open_flows as u64
    {
        state.server_stats.refused.add(Limit::OpenFlows);
        return Err(FlowError::TooManyOpenFlows);
    }
    state.backend.sessions().create_session(&session).await?;
    tracing::info!(
        provider_config_key = %key,
        connection_id = %connection.connection_id(),
        "oauth flow started"
    );
    Ok(Started {
        url: url.into(),
        cookie,
    })
}

/// Who starts a flow, for which connection, with which configuration: the checks every way of
/// authorizing a connection makes (an OAuth flow, or credentials entered in a form).
pub(super) struct Caller {
    pub connection: ConnectionKey,
    /// Whether the flow may only create the connection (public key alone).
    pub only_new: bool,
    /// Whether the flow may only re-authorize the connection (a reconnect session).
    pub only_existing: bool,
    pub session: Option<ConnectSession>,
    pub integration: ActiveIntegration,
    /// `params[x]`, with the session's defaults, as the connection's configuration.
    pub connection_config: Map<String, Value>,
    /// The request with the session's defaults applied.
    pub request: ConnectRequest,
}

/// Checks who asks (rate limit, session token, public key, `hmac`), which connection they may
/// authorize, and the request's parameters; finds the integration.
pub(super) async fn caller(
    state: &AppState,
    mut request: ConnectRequest,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<Caller, FlowError> {
    let config = &state.config;
    if let Some(client) = request.client
        && !state.oauth.may_start(client)
    {
        state.server_stats.refused.add(Limit::FlowsPerClient);
        return Err(FlowError::TooManyFlows);
    }
    let key = request.provider_config_key.clone();
    check_param(&key, "provider_config_key")?;
    let session = match non_blank(request.connect_session_token.as_deref()) {
        Some(token) => Some(connect_sessions::find(state, token, now).await?),
        None => None,
    };
    let (connection, only_new) = match &session {
        Some(session) => (session_connection(session, &key, &request)?, false),
        None => public_connection(config, key, &request)?,
    };
    let only_existing = session.as_ref().is_some_and(|s| s.reconnect.is_some());
    if only_new || only_existing {
        let exists = queries::find_connection(&state.read_models, &connection)
            .await?
            .is_some();
        if only_new && exists {
            return Err(FlowError::ConnectionExists);
        }
        // A reconnect re-authorizes the connection it names; one deleted since is not
        // created anew through it.
        if only_existing && !exists {
            return Err(FlowError::ReconnectTargetGone);
        }
    }
    report.connection_id = Some(connection.connection_id().to_owned());
    if let Some(defaults) = session.as_ref().and_then(|s| {
        s.integrations_config_defaults
            .get(connection.provider_config_key())
    }) {
        apply_defaults(&mut request, defaults);
    }
    for (name, value) in &request.params {
        check_param(name, "a params[...] name")?;
        if value.chars().any(char::is_control) || value.len() > 1024 {
            return Err(FlowError::InvalidParam(format!("params[{name}]")));
        }
    }
    if let Some((name, _)) = request
        .authorization_params
        .iter()
        .find(|(name, _)| PROTECTED_PARAMS.contains(&name.as_str()))
    {
        return Err(FlowError::InvalidParam(format!(
            "authorization_params[{name}] is set by the server and cannot be overridden"
        )));
    }
    let connection_config: Map<String, Value> = request
        .params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    // Checked now, not when the flow ends: the connection must be recordable.
    if let Err(reason) = JsonBounds::CLIENT.check_object(&connection_config) {
        return Err(FlowError::InvalidParam(format!("params: {reason}")));
    }

    let key = connection.provider_config_key();
    let integration = queries::find_integration(&state.read_models, key)
        .await?
        .ok_or_else(|| FlowError::UnknownProviderConfig(key.to_owned()))?
        .integration;
    Ok(Caller {
        connection,
        only_new,
        only_existing,
        session,
        integration,
        connection_config,
        request,
    })
}

/// A started flow: where to send the browser, and the cookie to set on it.
#[derive(Debug)]
pub struct Started {
    pub url: String,
    pub cookie: BindingCookie,
}

/// The cookie that binds a flow to the browser that started it (its value is a secret).
pub struct BindingCookie {
    pub name: String,
    pub value: String,
    /// Seconds, as long as the flow's state is accepted.
    pub max_age: u64,
}

impl std::fmt::Debug for BindingCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingCookie")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The connection a flow with a connect session authorizes: the one a reconnect session names,
/// else a new UUID. The session must allow the integration, and the caller may not choose.
fn session_connection(
    session: &ConnectSession,
    key: &str,
    request: &ConnectRequest,
) -> Result<ConnectionKey, FlowError> {
    if non_blank(request.connection_id.as_deref()).is_some() {
        return Err(FlowError::ConnectionIdWithSessionToken);
    }
    if !session.allows(key) {
        return Err(FlowError::IntegrationNotAllowed(key.to_owned()));
    }
    Ok(match &session.reconnect {
        Some(target) if target.provider_config_key == key => {
            ConnectionKey::new(key, &target.connection_id)
        }
        Some(_) => return Err(FlowError::IntegrationNotAllowed(key.to_owned())),
        None => ConnectionKey::new(key, Uuid::new_v4().to_string()),
    })
}

/// The connection a flow without a session authorizes: the caller's `connection_id`, with
/// the public key and `hmac` when the server has them; and whether the flow may only create it.
///
/// With a secret key, a flow needs a session token or a valid `hmac`; the public key alone
/// (when the server has one) may only create a new connection, never replace one. Without a
/// secret key (open mode, loopback only) the public key and `hmac` are checked when set.
fn public_connection(
    config: &Config,
    key: String,
    request: &ConnectRequest,
) -> Result<(ConnectionKey, bool), FlowError> {
    let public_key = match &config.public_key {
        Some(expected) => {
            let given =
                non_blank(request.public_key.as_deref()).ok_or(FlowError::MissingPublicKey)?;
            if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
                return Err(FlowError::InvalidPublicKey);
            }
            true
        }
        None => false,
    };
    let connection_id = non_blank(request.connection_id.as_deref())
        .ok_or(FlowError::MissingConnectionId)?
        .to_owned();
    check_param(&connection_id, "connection_id")?;
    let connection = ConnectionKey::new(key, connection_id);
    let signed = match &config.hmac_key {
        Some(hmac_key) => {
            let given = non_blank(request.hmac.as_deref()).ok_or(FlowError::MissingHmac)?;
            if !verify_connect_hmac(hmac_key.expose(), &connection, given) {
                return Err(FlowError::InvalidHmac);
            }
            true
        }
        None => false,
    };
    if config.secret_key.is_none() || signed {
        return Ok((connection, false));
    }
    if public_key {
        return Ok((connection, true));
    }
    Err(FlowError::SessionRequired)
}

/// A session's defaults for the integration win over what the browser sent: its connection
/// config is merged over `params`, its authorization parameters replace the browser's, and
/// its scopes (`connection_config.oauth_scopes_override`, else `user_scopes`) replace the
/// requested ones.
fn apply_defaults(request: &mut ConnectRequest, defaults: &ConfigDefaults) {
    if let Some(config) = &defaults.connection_config {
        for (name, value) in config {
            if name == "oauth_scopes_override" {
                continue;
            }
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            request.params.insert(name.clone(), text);
        }
        if let Some(Value::String(scopes)) = config.get("oauth_scopes_override") {
            request.scopes = Some(scopes.clone());
        }
    }
    if let Some(params) = &defaults.authorization_params {
        request.authorization_params = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    if request.scopes.is_none()
        && let Some(scopes) = &defaults.user_scopes
    {
        request.scopes = Some(scopes.clone());
    }
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
    let mut url = authorization_url(template, &request.params)?;
    let pkce = (!template.disable_pkce).then(PkceCodeChallenge::new_random_sha256);

    let mut params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    set_param(&mut params, "response_type", "code");
    set_param(
        &mut params,
        "client_id",
        &flow.integration.settings.oauth_client_id,
    );
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
    let mut url = authorization_url(template, &request.params)?;
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
                consumer_key: &flow.integration.settings.oauth_client_id,
                consumer_secret: &client_secret,
                token: None,
                signature_method: method,
                oauth_params: vec![("oauth_callback".into(), callback.into())],
                body_params: pairs(&template.request_params),
            },
            Utc::now(),
        )
        .await?;
    let (token, token_secret) = (
        text_field(&answer, "oauth_token"),
        text_field(&answer, "oauth_token_secret"),
    );

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

/// The template's authorization URL filled from the connection config. The token URL is filled
/// too, so that a flow that cannot finish does not send the user to the provider.
fn authorization_url(
    template: &Template,
    params: &BTreeMap<String, String>,
) -> Result<Url, FlowError> {
    let authorization_url = fill_url(&template.authorization_url, params)?;
    fill_url(&template.token_url, params)?;
    Url::parse(&authorization_url)
        .map_err(|e| FlowError::UrlParam(format!("the authorization URL is invalid: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

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
