//! Step 4 of the protocol: the token request that refreshes a leased connection (its
//! integration's client, the template's URL and parameters) and how a provider's refusal is
//! classified — permanent (`invalid_grant` and other 4xx but 429, an unusable URL) or transient.

use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::Utc;
use domain::bounds::JsonBounds;
use domain::catalog;
use domain::connection::{FailureClass, RefreshFailure, RefreshTrigger};
use domain::credentials::Credentials;
use serde_json::{Map, Value};

use super::{Inner, Leased, ProviderAnswer, RefreshError, trigger_slot};
use crate::client_credentials::{self, ClientCredentials};
use crate::provider::{TokenError, TokenRequest};

impl Inner {
    /// The provider's answer to a refresh of `leased`'s current credentials.
    pub(super) async fn call_provider(
        &self,
        leased: &Leased,
        trigger: RefreshTrigger,
    ) -> Result<ProviderAnswer, RefreshError> {
        let Some(active) = leased.loaded.state.active() else {
            return Err(RefreshError::Deleted);
        };
        let permanent = |code: &str, description: String| RefreshFailure {
            class: FailureClass::Permanent,
            code: Some(code.to_owned()),
            provider_status: None,
            description: Some(description),
        };
        let credentials = self.commands.reveal_credentials(active).await?;
        let Some(integration) =
            projections::queries::find_integration(&self.read_models, &active.provider_config_key)
                .await?
        else {
            return Ok(Err(permanent(
                "unknown_provider_config",
                format!("no integration {:?}", active.provider_config_key),
            )));
        };
        let integration = integration.integration;
        let Some(template) = self.catalog.get(&integration.settings.provider) else {
            return Ok(Err(permanent(
                "unknown_provider_template",
                format!("no provider template {:?}", integration.settings.provider),
            )));
        };
        let client_secret = self.commands.reveal_client_secret(&integration).await?;
        let config_params = catalog::config_values(&active.connection_config);
        let url = template
            .refresh_url
            .as_deref()
            .unwrap_or(&template.token_url);
        let url = match catalog::interpolate_url(url, &config_params) {
            Ok(url) => url,
            Err(e) => return Ok(Err(permanent("invalid_token_url", e.to_string()))),
        };
        let (refresh_token, old_raw) = match &credentials {
            Credentials::OAuth2 {
                refresh_token: Some(refresh_token),
                raw,
                ..
            } => (refresh_token, raw),
            Credentials::OAuth2Cc {
                client_id,
                client_secret,
                client_certificate,
                client_private_key,
                ..
            } => {
                // No refresh token: the connection's client credentials ask again.
                let scopes = client_credentials::scopes(
                    &active.connection_config,
                    &integration.settings.oauth_scopes,
                );
                let client = ClientCredentials {
                    client_id,
                    client_secret,
                    client_certificate: client_certificate.as_deref(),
                    client_private_key: client_private_key.as_deref(),
                };
                let fetch = client_credentials::fetch(
                    &self.client,
                    template,
                    &url,
                    &scopes,
                    client,
                    Utc::now(),
                );
                return Ok(self
                    .timed(trigger, fetch)
                    .await
                    .map(|credentials| (credentials, false))
                    .map_err(|e| classify(&e)));
            }
            _ => {
                return Err(RefreshError::Internal(
                    "the leased connection has no OAuth 2.0 refresh token".into(),
                ));
            }
        };
        let extra = if template.refresh_params.is_empty() {
            &template.token_params
        } else {
            &template.refresh_params
        };
        let mut params: Vec<(String, String)> =
            extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        params.push(("grant_type".into(), "refresh_token".into()));
        params.push(("refresh_token".into(), refresh_token.clone()));
        let request = TokenRequest {
            token_url: &url,
            client_id: &integration.settings.oauth_client_id,
            client_secret: &client_secret,
            authorization_method: template.authorization_method,
            client_assertion: None,
            body_format: template.body_format,
            params,
        };
        let answer = self
            .timed(trigger, self.client.request_token(&request, Utc::now()))
            .await;
        Ok(match answer {
            Ok(token) => {
                let rotated = token
                    .refresh_token
                    .as_ref()
                    .is_some_and(|new| new != refresh_token);
                let refresh_token = token.refresh_token.unwrap_or_else(|| refresh_token.clone());
                let raw = refreshed_raw(old_raw, token.raw, &refresh_token);
                let credentials = Credentials::OAuth2 {
                    access_token: token.access_token,
                    refresh_token: Some(refresh_token),
                    expires_at: token.expires_at,
                    raw: Value::Object(raw),
                };
                // What the provider sent must be recordable, or the refresh fails here (and is
                // recorded as failed, closing the lease) rather than when it is appended.
                match credentials.check_bounds() {
                    Ok(()) => Ok((credentials, rotated)),
                    Err(e) => Err(classify(&TokenError::Malformed(e.to_string()))),
                }
            }
            Err(e) => Err(classify(&e)),
        })
    }

    /// Runs a provider call, counted for `trigger` and timed, within the provider timeout (the
    /// client's own timeout bounds it too; this is a second guard).
    async fn timed<T>(
        &self,
        trigger: RefreshTrigger,
        call: impl std::future::Future<Output = Result<T, TokenError>>,
    ) -> Result<T, TokenError> {
        self.counters.provider_calls[trigger_slot(trigger)].fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let answer = match tokio::time::timeout(self.settings.provider_timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(TokenError::Timeout(self.settings.provider_timeout)),
        };
        self.counters.provider_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        answer
    }
}

/// The `raw` of refreshed credentials: the new answer's fields over the old ones, since a
/// refresh answer often lacks fields the authorization had (`id_token`, `scope`…). The old
/// answer's token fields never outlive it (its `access_token` and lifetime are the old
/// token's), `refresh_token` is the one the credentials keep, and when the union would pass
/// the log's bounds the new answer stands alone (it is within them already).
fn refreshed_raw(old: &Value, new: Map<String, Value>, refresh_token: &str) -> Map<String, Value> {
    let mut raw = old.as_object().cloned().unwrap_or_default();
    for stale in ["access_token", "expires_in", "expires_at", "refresh_token"] {
        raw.remove(stale);
    }
    raw.extend(new.clone());
    if raw.contains_key("refresh_token") || old.get("refresh_token").is_some() {
        raw.insert(
            "refresh_token".into(),
            Value::String(refresh_token.to_owned()),
        );
    }
    if JsonBounds::CLIENT.check_object(&raw).is_ok() {
        raw
    } else {
        new
    }
}

/// The failure a provider error is recorded as. No secret: [`TokenError`] messages carry none.
fn classify(error: &TokenError) -> RefreshFailure {
    let class = match error {
        // A 2xx that is not a token answer is usually a maintenance page: try again later.
        TokenError::Malformed(_) => FailureClass::Transient,
        other if other.is_retryable() => FailureClass::Transient,
        _ => FailureClass::Permanent,
    };
    let (code, provider_status) = match error {
        TokenError::Refused { status, error, .. } => (error.clone(), Some(*status)),
        TokenError::Timeout(_) => (Some("timeout".to_owned()), None),
        TokenError::Network(_) => (Some("network_error".to_owned()), None),
        TokenError::InvalidUrl(_) => (Some("invalid_token_url".to_owned()), None),
        TokenError::Malformed(_) => (Some("malformed_response".to_owned()), None),
        TokenError::ClientAuth(_) => (Some("client_auth".to_owned()), None),
    };
    RefreshFailure {
        class,
        code,
        provider_status,
        description: Some(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn invalid_grant_is_permanent_and_server_errors_timeouts_are_transient() {
        let refused = |status| TokenError::Refused {
            status,
            error: Some("invalid_grant".into()),
            description: None,
        };
        assert_eq!(classify(&refused(400)).class, FailureClass::Permanent);
        assert_eq!(classify(&refused(401)).class, FailureClass::Permanent);
        assert_eq!(classify(&refused(503)).class, FailureClass::Transient);
        assert_eq!(classify(&refused(429)).class, FailureClass::Transient);
        let timeout = classify(&TokenError::Timeout(Duration::from_secs(1)));
        assert_eq!(timeout.class, FailureClass::Transient);
        assert_eq!(timeout.code.as_deref(), Some("timeout"));
        let failure = classify(&refused(400));
        assert_eq!(failure.code.as_deref(), Some("invalid_grant"));
        assert_eq!(failure.provider_status, Some(400));
    }
}
