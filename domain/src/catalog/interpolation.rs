//! `${connectionConfig.x}` placeholders in template text and URLs: filled from a connection's
//! configuration, with URLs held to the host the template names.

use std::collections::BTreeMap;

/// Fills `${connectionConfig.x}` (and the old `${connectionConfig.params.x}`) from `params[x]`.
///
/// Values are inserted as they are and not scanned again. A placeholder without a non-empty
/// value, any other `${…}` expression and an unterminated `${` are errors naming the
/// placeholder. For URLs use [`interpolate_url`], which also stops values that would change
/// where the URL points.
pub fn interpolate(
    text: &str,
    params: &BTreeMap<String, String>,
) -> Result<String, InterpolationError> {
    fill(text, |placeholder, key| {
        params
            .get(key)
            .filter(|value| !value.is_empty())
            .map(String::as_str)
            .ok_or_else(|| InterpolationError {
                placeholder: placeholder.to_owned(),
            })
    })
}

/// [`interpolate`] for a template URL, which is then sent a client secret: a value may only
/// hold URL-unreserved characters (letters, digits, `-`, `.`, `_`, `~`), so that
/// `params[subdomain]=evil.example/x?` cannot move the request to another host. A placeholder
/// that starts the URL must be filled with an `https://` or `http://` base URL (host, optional
/// port and path, no query, fragment or user info). The result starts with `https://` or
/// `http://`.
pub fn interpolate_url(
    url: &str,
    params: &BTreeMap<String, String>,
) -> Result<String, UrlInterpolationError> {
    let mut rejected = None;
    let filled = fill(url, |placeholder, key| {
        let value = params
            .get(key)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| InterpolationError {
                placeholder: placeholder.to_owned(),
            })?;
        let leading = url.starts_with(placeholder);
        let safe = if leading {
            is_base_url(value)
        } else {
            value.chars().all(is_unreserved)
        };
        if !safe && rejected.is_none() {
            rejected = Some(placeholder.to_owned());
        }
        Ok(value.as_str())
    })?;
    if let Some(placeholder) = rejected {
        return Err(UrlInterpolationError::UnsafeValue { placeholder });
    }
    if !has_http_scheme(&filled) {
        return Err(UrlInterpolationError::NotHttp { url: filled });
    }
    Ok(filled)
}

/// A placeholder that has no value to fill it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no connection config value fills the placeholder {placeholder}")]
pub struct InterpolationError {
    /// The placeholder as written, e.g. `${connectionConfig.subdomain}`.
    pub placeholder: String,
}

impl InterpolationError {
    /// The connection-config key the placeholder asks for (`subdomain`), when it is one.
    pub fn key(&self) -> Option<&str> {
        self.placeholder
            .strip_prefix("${")
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(config_key)
    }
}

/// A template URL that cannot be filled safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlInterpolationError {
    /// A placeholder has no value.
    #[error(transparent)]
    Missing(#[from] InterpolationError),
    /// A value would change the URL's structure (host, path, query) rather than fill a part.
    #[error("the connection config value for {placeholder} is not allowed in a URL")]
    UnsafeValue {
        /// The placeholder as written.
        placeholder: String,
    },
    /// The filled URL is not an `https://` or `http://` URL.
    #[error("the filled URL `{url}` does not start with https:// or http://")]
    NotHttp {
        /// The URL after filling.
        url: String,
    },
}

/// Replaces each `${connectionConfig.key}` / `${connectionConfig.params.key}` in `text` with
/// `value(placeholder, key)`. Anything else in `${…}` is an error naming it.
pub(super) fn fill<'v, F>(text: &str, mut value: F) -> Result<String, InterpolationError>
where
    F: FnMut(&str, &str) -> Result<&'v str, InterpolationError>,
{
    let mut filled = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        filled.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(InterpolationError {
                placeholder: rest[start..].to_owned(),
            });
        };
        let placeholder = &rest[start..start + 2 + end + 1];
        let key = config_key(&after[..end]).ok_or_else(|| InterpolationError {
            placeholder: placeholder.to_owned(),
        })?;
        filled.push_str(value(placeholder, key)?);
        rest = &after[end + 1..];
    }
    filled.push_str(rest);
    Ok(filled)
}

/// `subdomain` from `connectionConfig.subdomain` or `connectionConfig.params.subdomain`.
fn config_key(expression: &str) -> Option<&str> {
    let expression = expression.trim();
    let key = expression
        .strip_prefix("connectionConfig.params.")
        .or_else(|| expression.strip_prefix("connectionConfig."))?;
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    valid.then_some(key)
}

pub(super) fn has_http_scheme(url: &str) -> bool {
    url.starts_with("https://") || url.starts_with("http://")
}

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// `https://host[:port][/path]` with nothing that could smuggle in another host.
fn is_base_url(value: &str) -> bool {
    let Some(rest) = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
    else {
        return false;
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority.split_once(':').unwrap_or((authority, ""));
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && port.chars().all(|c| c.is_ascii_digit())
        && path.chars().all(|c| is_unreserved(c) || c == '/')
}

/// Fills the placeholders of a header or query value of a template's `proxy` section:
/// `${apiKey}`, `${username}`, `${password}`, `${accessToken}` with `value(name)`, and
/// `${connectionConfig.x}` with `value("connectionConfig.x")`. Any other expression, and a
/// placeholder `value` has nothing for, is an error naming it.
pub fn fill_with<'v>(
    text: &str,
    mut value: impl FnMut(&str) -> Option<&'v str>,
) -> Result<String, InterpolationError> {
    let mut filled = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        filled.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let missing = |end: usize| InterpolationError {
            placeholder: rest[start..(start + 2 + end + 1).min(rest.len())].to_owned(),
        };
        let Some(end) = after.find('}') else {
            return Err(missing(after.len()));
        };
        let expression = after[..end].trim();
        let name = if super::proxy::CREDENTIAL_PLACEHOLDERS.contains(&expression) {
            expression.to_owned()
        } else {
            match config_key(expression) {
                Some(key) => format!("connectionConfig.{key}"),
                None => return Err(missing(end)),
            }
        };
        filled.push_str(value(&name).ok_or_else(|| missing(end))?);
        rest = &after[end + 1..];
    }
    filled.push_str(rest);
    Ok(filled)
}

/// The text values of a connection's configuration: what `${connectionConfig.x}` is filled from.
pub fn config_values(
    connection_config: &serde_json::Map<String, serde_json::Value>,
) -> BTreeMap<String, String> {
    connection_config
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
        .collect()
}

/// Every value a placeholder of a template's `proxy` section may name, for [`fill_with`]: the
/// credential's (`apiKey`, `username`, `password`, `accessToken`) and `connectionConfig.x`.
pub fn placeholder_values(
    credentials: &crate::credentials::Credentials,
    connection_config: &serde_json::Map<String, serde_json::Value>,
) -> BTreeMap<String, String> {
    use crate::credentials::Credentials;
    let mut values: BTreeMap<String, String> = config_values(connection_config)
        .into_iter()
        .map(|(k, v)| (format!("connectionConfig.{k}"), v))
        .collect();
    let mut put = |name: &str, value: &str| {
        values.insert(name.to_owned(), value.to_owned());
    };
    match credentials {
        Credentials::OAuth2 { access_token, .. } => put("accessToken", access_token),
        Credentials::OAuth2Cc { token, .. } => put("accessToken", token),
        Credentials::ApiKey { api_key } => put("apiKey", api_key),
        Credentials::Basic { username, password } => {
            put("username", username);
            put("password", password);
        }
        Credentials::OAuth1 { .. } => {}
    }
    values
}
