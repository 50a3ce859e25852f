//! A template's `proxy` section: where the provider's API lives and how a credential goes into
//! a request to it (headers and query parameters with placeholders), and the request that
//! checks a credential before it is stored (`verification`).
//!
//! Placeholders in header and query values: `${apiKey}`, `${username}`, `${password}`,
//! `${accessToken}` (the connection's credential) and `${connectionConfig.x}` (its
//! configuration); anything else is refused when the catalog loads.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::interpolation::fill_with;
use super::{RawParams, optional_url, params};

/// What a request to the provider's API carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Proxy {
    /// The API's base URL (may hold `${connectionConfig.x}`).
    pub base_url: Option<String>,
    /// Headers to send, e.g. `authorization: Bearer ${apiKey}`.
    pub headers: BTreeMap<String, String>,
    /// Query parameters to send, e.g. `api_key: ${apiKey}`.
    pub query: BTreeMap<String, String>,
    /// The request that checks a credential before it is stored.
    pub verification: Option<Verification>,
    /// Rate-limit headers of the provider's answers (lower-cased names): when a refused call
    /// may be sent again, as a time (`retry.at`: Unix seconds or milliseconds, or an HTTP date)
    /// or a wait in seconds (`retry.after`).
    pub retry_at: Vec<String>,
    pub retry_after: Vec<String>,
}

/// A request that succeeds (2xx) only with a working credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// `GET` unless the template says otherwise.
    pub method: String,
    /// The path (on the base URL) to call; the first of the template's list.
    pub endpoint: String,
    /// A base URL for this request only.
    pub base_url_override: Option<String>,
    /// Headers for this request, over the proxy's.
    pub headers: BTreeMap<String, String>,
}

/// The credential values placeholders may name.
pub const CREDENTIAL_PLACEHOLDERS: [&str; 4] = ["apiKey", "username", "password", "accessToken"];

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawProxy {
    base_url: Option<String>,
    headers: Option<RawParams>,
    query: Option<RawParams>,
    verification: Option<RawVerification>,
    retry: Option<RawRetry>,
}

/// `retry: {at: name | [names], after: name | [names]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawRetry {
    at: Option<OneOrMany>,
    after: Option<OneOrMany>,
}

/// Header names; anything else (other files put statuses here) is read as none.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
    Other(serde::de::IgnoredAny),
}

impl OneOrMany {
    fn names(self) -> Vec<String> {
        match self {
            Self::One(name) => vec![name.to_ascii_lowercase()],
            Self::Many(names) => names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            Self::Other(_) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawVerification {
    method: Option<String>,
    endpoints: Option<Vec<String>>,
    endpoint: Option<String>,
    base_url_override: Option<String>,
    headers: Option<RawParams>,
}

impl RawProxy {
    /// The section, checked: URLs as other template URLs, placeholders known.
    pub(super) fn build(self) -> Result<Proxy, String> {
        let base_url = optional_url("proxy.base_url", self.base_url)?;
        let headers = checked("proxy.headers", params("proxy.headers", self.headers)?)?;
        let query = checked("proxy.query", params("proxy.query", self.query)?)?;
        let verification = match self.verification {
            None => None,
            Some(raw) => {
                let endpoint = raw
                    .endpoint
                    .or_else(|| raw.endpoints.and_then(|e| e.into_iter().next()))
                    .ok_or("proxy.verification has no endpoint")?;
                if !endpoint.starts_with('/') || endpoint.chars().any(char::is_control) {
                    return Err(format!(
                        "proxy.verification endpoint `{endpoint}` must be a path starting with /"
                    ));
                }
                let method = raw.method.unwrap_or_else(|| "GET".to_owned());
                if !matches!(
                    method.to_ascii_uppercase().as_str(),
                    "GET" | "POST" | "HEAD"
                ) {
                    return Err(format!(
                        "proxy.verification method `{method}` is not GET, POST or HEAD"
                    ));
                }
                let base_url_override = optional_url(
                    "proxy.verification.base_url_override",
                    raw.base_url_override,
                )?;
                if base_url.is_none() && base_url_override.is_none() {
                    return Err("proxy.verification needs proxy.base_url".to_owned());
                }
                Some(Verification {
                    method: method.to_ascii_uppercase(),
                    endpoint,
                    base_url_override,
                    headers: checked(
                        "proxy.verification.headers",
                        params("proxy.verification.headers", raw.headers)?,
                    )?,
                })
            }
        };
        let retry = self.retry.unwrap_or_default();
        Ok(Proxy {
            base_url,
            headers,
            query,
            verification,
            retry_at: retry.at.map(OneOrMany::names).unwrap_or_default(),
            retry_after: retry.after.map(OneOrMany::names).unwrap_or_default(),
        })
    }
}

/// `values` with every placeholder known (filled with blanks to check).
fn checked(
    field: &str,
    values: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    for (name, value) in &values {
        fill_with(value, |_| Some("")).map_err(|e| {
            format!(
                "{field}.{name} has an unsupported placeholder: {}",
                e.placeholder
            )
        })?;
    }
    Ok(values)
}
