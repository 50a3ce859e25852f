//! Finishing a flow (`/oauth/callback`): the session is taken by its `state` (once, and only
//! before it expires), the provider's refusal is reported as such, the code (OAuth 2.0) or the
//! verifier (OAuth 1.0a) is exchanged for tokens with the very parameters the flow started with,
//! and the connection is recorded in the log and the read model before any success is reported.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::catalog::{AuthMode, Template};
use domain::commands::AuthorizeConnection;
use domain::connection::{ConnectionKey, Flow};
use domain::credentials::{ClientSecret, Credentials};
use domain::integration::ActiveIntegration;
use domain::oauth_session::{FlowSecrets, FlowSession, binding_cookie_name};
use projections::queries;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use workers::oauth1::Oauth1Request;
use workers::provider::TokenRequest;

use super::connect::plausible_state;
use super::redirect::allowed_redirect;
use super::{Completed, Failure, FlowError, Report, fill_url, flow_template, pairs, text_field};
use crate::connections;
use crate::state::AppState;

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
    binding: impl Fn(&str) -> Option<String> + Sync,
    now: DateTime<Utc>,
) -> Result<Completed, Failure> {
    let mut report = Report::default();
    let result = finish(state, query, &binding, now, &mut report).await;
    match result {
        Ok(connection) => Ok(Completed { connection, report }),
        Err(error) => {
            error.log(&report);
            Err(Failure { error, report })
        }
    }
}

/// Sends the outcome to where the flow asked: its page's WebSocket and the app's
/// `api_redirect_url`, if the allow-list (which may have changed since the flow started) still
/// has it.
fn tell_the_flows_page(state: &AppState, session: &FlowSession, report: &mut Report) {
    report.ws_client_id = session.ws_client_id.clone();
    report.api_redirect_url = session
        .api_redirect_url
        .as_deref()
        .and_then(|url| allowed_redirect(&state.config, url).ok());
}

/// `binding(name)`: the value of the request's cookie `name`.
async fn finish(
    state: &AppState,
    query: &[(String, String)],
    binding: &(dyn Fn(&str) -> Option<String> + Sync),
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<ConnectionKey, FlowError> {
    let param = |name: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let flow_state = param("state").ok_or(FlowError::MissingState)?;
    if !plausible_state(flow_state) {
        return Err(FlowError::UnknownState);
    }
    // Read first and taken only once the browser is known: a callback URL replayed elsewhere
    // (its state is in the address) must not use up the flow of the browser that started it.
    let sessions = state.backend.sessions();
    let session = sessions
        .find_session(flow_state)
        .await?
        .ok_or(FlowError::UnknownState)?;
    let span = tracing::Span::current();
    span.record("provider_config_key", session.provider_config_key.as_str());
    span.record("connection_id", session.connection_id.as_str());
    report.provider_config_key = Some(session.provider_config_key.clone());
    report.connection_id = Some(session.connection_id.clone());
    // An expired flow is over whoever calls (its binding cookie expired with it).
    if session.is_expired(now) {
        tell_the_flows_page(state, &session, report);
        return Err(FlowError::ExpiredState);
    }
    let secrets: FlowSecrets = match &session.secrets {
        Some(sealed) => state.commands.vault().unseal_json(sealed).await?,
        None => FlowSecrets::default(),
    };
    // Another browser's refusal is its own: the flow's page and the app hear only what
    // happens in the browser that started it.
    if let Some(expected) = &secrets.browser_binding {
        let presented = binding(&binding_cookie_name(flow_state)).unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(FlowError::ForeignBrowser);
        }
    }
    tell_the_flows_page(state, &session, report);
    // The first callback that takes it finishes the flow; a concurrent one finds it gone.
    if sessions.take_session(flow_state).await?.is_none() {
        return Err(FlowError::UnknownState);
    }
    if let Some(error) = param("error") {
        return Err(FlowError::ProviderDenied {
            error: shorten(error),
            description: param("error_description").map(shorten),
        });
    }

    // A flow that may only create the connection (the public key alone) and finds it created
    // since, or only re-authorize it (a reconnect) and finds it deleted since, is refused before
    // the provider is asked: its code stays unredeemed. (The command refuses it again, should
    // the connection change between this read and the append.)
    if session.only_new || session.only_existing {
        let connection = ConnectionKey::new(&session.provider_config_key, &session.connection_id);
        let exists = queries::find_connection(&state.read_models, &connection)
            .await?
            .is_some();
        if session.only_new && exists {
            return Err(FlowError::ConnectionExists);
        }
        if session.only_existing && !exists {
            return Err(FlowError::ReconnectTargetGone);
        }
    }
    let key = &session.provider_config_key;
    let integration = queries::find_integration(&state.read_models, key)
        .await?
        .ok_or_else(|| FlowError::UnknownProviderConfig(key.clone()))?
        .integration;
    let template = flow_template(state, &integration.settings.provider)?;
    let client_secret = state
        .commands
        .reveal_client_secret(&integration)
        .await
        .map_err(|e| FlowError::Internal(e.to_string()))?;
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
        // Only OAuth flows are ever started; a template changed since is refused.
        mode @ (AuthMode::ApiKey | AuthMode::Basic | AuthMode::OAuth2Cc) => {
            return Err(FlowError::InvalidAuthMode(mode.as_str()));
        }
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
            only_new: session.only_new,
            only_existing: session.only_existing,
            ownership: session.ownership.clone().unwrap_or_default(),
            key: connection.clone(),
            provider: integration.settings.provider.clone(),
            flow,
            credentials,
            scopes: granted.unwrap_or_else(|| session.scopes.clone()),
            connection_config,
            now: Utc::now(),
            metadata: None,
        })
        .await?;
    connections::publish_authorized(state, &loaded, &integration).await?;
    tracing::info!(stream_version = loaded.version, "oauth flow completed");
    Ok(connection)
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
                client_id: &exchange.integration.settings.oauth_client_id,
                client_secret: exchange.client_secret,
                authorization_method: exchange.template.authorization_method,
                client_assertion: None,
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
                consumer_key: &exchange.integration.settings.oauth_client_id,
                consumer_secret: exchange.client_secret,
                token: Some((request_token, request_secret)),
                signature_method: method,
                oauth_params: vec![("oauth_verifier".into(), verifier.to_owned())],
                body_params: pairs(&exchange.template.token_params),
            },
            Utc::now(),
        )
        .await?;
    let credentials = Credentials::OAuth1 {
        oauth_token: text_field(&raw, "oauth_token"),
        oauth_token_secret: text_field(&raw, "oauth_token_secret"),
        raw: Value::Object(raw.clone()),
    };
    Ok((credentials, raw, Flow::Oauth1, None))
}

/// A provider's text, cut to a length a page or a URL can carry.
fn shorten(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}
