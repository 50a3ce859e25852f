//! Credentials the user enters instead of an OAuth flow (`POST /api-auth/api-key/:key`,
//! `POST /api-auth/basic/:key`, `POST /oauth2/auth/:key`): the caller is checked as a flow's is
//! (session token, public key, `hmac`); an API key or Basic login must pass the provider's
//! verification request (when its template has one), client credentials must get a token from
//! the provider; only then is the connection authorized. A refused request changes no
//! connection.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::catalog::{self, AuthMode, Template};
use domain::commands::AuthorizeConnection;
use domain::connect_session::ConnectSession;
use domain::connection::{ConnectionKey, Flow};
use domain::credentials::Credentials;
use serde_json::{Map, Value};
use workers::client_credentials::{self, ClientCredentials};
use workers::provider::{CredentialCheck, TokenError};

use super::connect::{Caller, ConnectRequest, caller};
use super::{Failure, FlowError, Report, fill_url, flow_template};
use crate::connections;
use crate::state::AppState;

/// What the user entered.
pub enum Entered {
    /// An API key, or a username and password.
    Credentials(Credentials),
    /// The client credentials of an OAuth 2.0 client-credentials grant, which get the token.
    ClientCredentials {
        client_id: String,
        client_secret: String,
        client_certificate: Option<String>,
        client_private_key: Option<String>,
    },
}

/// Authorizes the connection `request` names with what the user entered, and returns it.
#[tracing::instrument(
    name = "oauth.form",
    skip_all,
    fields(provider_config_key = %request.provider_config_key)
)]
pub async fn authorize_with(
    state: &AppState,
    request: ConnectRequest,
    entered: Entered,
    now: DateTime<Utc>,
) -> Result<ConnectionKey, Failure> {
    let mut report = Report {
        provider_config_key: Some(request.provider_config_key.clone()),
        ..Report::default()
    };
    let result = authorize(state, request, entered, now, &mut report).await;
    result.map_err(|error| {
        error.log(&report);
        Failure { error, report }
    })
}

async fn authorize(
    state: &AppState,
    request: ConnectRequest,
    entered: Entered,
    now: DateTime<Utc>,
    report: &mut Report,
) -> Result<ConnectionKey, FlowError> {
    let Caller {
        connection,
        only_new,
        only_existing,
        session,
        integration,
        connection_config,
        ..
    } = caller(state, request, now, report).await?;
    let template = flow_template(state, &integration.settings.provider)?;
    let expected = match &entered {
        Entered::Credentials(Credentials::ApiKey { .. }) => AuthMode::ApiKey,
        Entered::Credentials(Credentials::Basic { .. }) => AuthMode::Basic,
        Entered::ClientCredentials { .. } => AuthMode::OAuth2Cc,
        Entered::Credentials(_) => {
            return Err(FlowError::Internal("a form takes no tokens".into()));
        }
    };
    if template.auth_mode != expected {
        return Err(FlowError::InvalidAuthMode(template.auth_mode.as_str()));
    }
    let credentials = match entered {
        Entered::Credentials(credentials) => {
            verify(state, template, &credentials, &connection_config).await?;
            credentials
        }
        Entered::ClientCredentials {
            client_id,
            client_secret,
            client_certificate,
            client_private_key,
        } => {
            let config = catalog::config_values(&connection_config);
            let token_url = fill_url(&template.token_url, &config)?;
            let scopes =
                client_credentials::scopes(&connection_config, &integration.settings.oauth_scopes);
            let client = ClientCredentials {
                client_id: &client_id,
                client_secret: &client_secret,
                client_certificate: client_certificate.as_deref(),
                client_private_key: client_private_key.as_deref(),
            };
            client_credentials::fetch(
                &state.oauth.provider,
                template,
                &token_url,
                &scopes,
                client,
                Utc::now(),
            )
            .await?
        }
    };
    let loaded = state
        .commands
        .authorize_connection(AuthorizeConnection {
            only_new,
            only_existing,
            ownership: session
                .as_ref()
                .map(ConnectSession::ownership)
                .unwrap_or_default(),
            key: connection.clone(),
            provider: integration.settings.provider.clone(),
            flow: Flow::Form,
            credentials,
            scopes: Vec::new(),
            connection_config,
            now: Utc::now(),
            metadata: None,
        })
        .await?;
    connections::publish_authorized(state, &loaded, &integration).await?;
    tracing::info!(stream_version = loaded.version, "credentials authorized");
    Ok(connection)
}

/// Sends the template's verification request with `credentials`; anything but a 2xx answer
/// refuses them. Nothing to do when the template has no verification.
async fn verify(
    state: &AppState,
    template: &Template,
    credentials: &Credentials,
    connection_config: &Map<String, Value>,
) -> Result<(), FlowError> {
    let Some(verification) = &template.proxy.verification else {
        return Ok(());
    };
    let config = catalog::config_values(connection_config);
    let base = verification
        .base_url_override
        .as_ref()
        .or(template.proxy.base_url.as_ref())
        .ok_or_else(|| FlowError::Internal("a verification without a base URL".into()))?;
    let base =
        catalog::interpolate_url(base, &config).map_err(|e| FlowError::UrlParam(e.to_string()))?;
    let url = format!("{}{}", base.trim_end_matches('/'), verification.endpoint);
    let values = catalog::placeholder_values(credentials, connection_config);
    let fill = |fields: &BTreeMap<String, String>| -> Result<Vec<(String, String)>, FlowError> {
        fields
            .iter()
            .map(|(name, text)| {
                let filled = catalog::fill_with(text, |placeholder| {
                    values.get(placeholder).map(String::as_str)
                })
                .map_err(|e| FlowError::UrlParam(e.to_string()))?;
                Ok((name.clone(), filled))
            })
            .collect()
    };
    let mut headers = template.proxy.headers.clone();
    headers.extend(verification.headers.clone());
    let headers = fill(&headers)?;
    let query = fill(&template.proxy.query)?;
    let has_authorization = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("authorization"));
    let basic = match credentials {
        Credentials::Basic { username, password } if !has_authorization => {
            Some((username.as_str(), password.as_str()))
        }
        _ => None,
    };
    let status = state
        .oauth
        .provider
        .verify(&CredentialCheck {
            method: &verification.method,
            url: &url,
            query: &query,
            headers: &headers,
            basic,
        })
        .await
        .map_err(|e| {
            FlowError::ConnectionTestFailed(
                match e {
                    TokenError::Timeout(_) => "the provider did not answer in time",
                    TokenError::Network(_) => "the provider could not be reached",
                    _ => "the verification request could not be sent",
                }
                .to_owned(),
            )
        })?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(FlowError::ConnectionTestFailed(format!(
            "the verification request answered HTTP {status}"
        )))
    }
}
