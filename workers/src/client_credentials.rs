//! OAuth 2.0 client-credentials grants (`OAUTH2_CC`): the token request a connection's own
//! client credentials make, when it is authorized and on every renewal (there is no refresh
//! token; the renewal asks again, through the same fenced refresh as OAuth 2.0).

use chrono::{DateTime, Duration, Utc};
use domain::catalog::Template;
use domain::credentials::{ClientSecret, Credentials};
use serde_json::{Map, Value};

use crate::provider::{ProviderClient, TokenError, TokenRequest, split_scopes};

/// How long a token whose answer names no expiry is taken to live (Nango's assumption too).
const ASSUMED_LIFETIME: Duration = Duration::minutes(55);

/// A connection's client credentials.
#[derive(Clone, Copy)]
pub struct ClientCredentials<'a> {
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub client_certificate: Option<&'a str>,
    pub client_private_key: Option<&'a str>,
}

/// The scopes a grant asks for: the connection's `oauth_scopes` (comma or space separated)
/// when it has them, else the integration's.
pub fn scopes(
    connection_config: &Map<String, Value>,
    integration_scopes: &[String],
) -> Vec<String> {
    match connection_config
        .get("oauth_scopes")
        .and_then(Value::as_str)
    {
        Some(text) if !text.trim().is_empty() => split_scopes(text),
        _ => integration_scopes.to_vec(),
    }
}

/// Asks `token_url` (the template's, filled) for a token with `client` and returns the
/// credentials to store.
pub async fn fetch(
    provider: &ProviderClient,
    template: &Template,
    token_url: &str,
    scopes: &[String],
    client: ClientCredentials<'_>,
    now: DateTime<Utc>,
) -> Result<Credentials, TokenError> {
    let mut params: Vec<(String, String)> = template
        .token_params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.push(("grant_type".into(), "client_credentials".into()));
    if !scopes.is_empty() {
        params.push(("scope".into(), scopes.join(&template.scope_separator)));
    }
    let secret = ClientSecret::new(client.client_secret);
    let token = provider
        .request_token(
            &TokenRequest {
                token_url,
                client_id: client.client_id,
                client_secret: &secret,
                authorization_method: template.authorization_method,
                body_format: template.body_format,
                params,
            },
            now,
        )
        .await?;
    Ok(Credentials::OAuth2Cc {
        token: token.access_token,
        client_id: client.client_id.to_owned(),
        client_secret: client.client_secret.to_owned(),
        client_certificate: client.client_certificate.map(str::to_owned),
        client_private_key: client.client_private_key.map(str::to_owned),
        expires_at: Some(token.expires_at.unwrap_or(now + ASSUMED_LIFETIME)),
        raw: Value::Object(token.raw),
    })
}
