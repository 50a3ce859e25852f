//! Where the browser goes when a flow ends: the app's `api_redirect_url`, but only when its
//! origin is on `GRANTLINE_REDIRECT_ALLOWLIST` (no open redirector).
//!
//! A success adds `connection_id` and `provider_config_key` (and, with a secret key, a
//! `timestamp` and its [`success_signature`]); a failure adds `message_type=error`, `error_type`
//! and `error_desc`. The app's own query is kept, minus parameters of ours it may already carry,
//! so a forged `connection_id` in the URL never survives.

use chrono::{DateTime, Utc};
use domain::connection::ConnectionKey;
use url::Url;

use super::FlowError;
use super::signature::success_signature;
use crate::config::Config;

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
    connection: &ConnectionKey,
    now: DateTime<Utc>,
) -> String {
    let mut added = vec![
        ("connection_id", connection.connection_id().to_owned()),
        (
            "provider_config_key",
            connection.provider_config_key().to_owned(),
        ),
    ];
    if let Some(secret) = &config.secret_key {
        let timestamp = now.timestamp().to_string();
        let signature = success_signature(secret.expose(), connection, &timestamp);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
