//! Extractors whose rejections are [`ApiError`]s, so malformed input gets our JSON errors, and
//! the checks every request's identifiers and JSON bodies go through.

use axum::extract::{FromRequest, FromRequestParts, Query};
use axum::http::request::Parts;
use domain::connection::ConnectionKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::ApiError;

/// A JSON body.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Query parameters; unknown ones are ignored.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // The same deserializer as axum's `Query`, without the path tracking its refusal
        // message needs (2.5k of a cached read's 35.7k instructions); a query that does not
        // deserialize goes through `Query` for that message.
        match serde_urlencoded::from_str(parts.uri.query().unwrap_or_default()) {
            Ok(value) => Ok(Self(value)),
            Err(_) => Ok(Self(Query::<T>::try_from_uri(&parts.uri)?.0)),
        }
    }
}

/// Path parameters.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// A boolean query flag: `true`/`false` (also `1`/`0`); anything else is refused.
pub fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    let text = Option::<String>::deserialize(deserializer)?;
    match text.as_deref() {
        None | Some("") => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(other) => Err(serde::de::Error::custom(format!(
            "{other:?} is not true or false"
        ))),
    }
}

/// Checks an identifier from the path, the query or a body: 1 to 255 characters, no control
/// characters.
pub fn identifier(value: &str, what: &str) -> Result<(), ApiError> {
    if value.chars().count() > 255 {
        return Err(ApiError::InvalidPath(format!(
            "{what} is longer than 255 characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidPath(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

/// Refuses a body's id with white space at either end: ids are kept as sent (a path names
/// them so), and trimming would make `"acct-42 "` write over `"acct-42"`.
pub fn unpadded(value: &str, what: &str) -> Result<(), ApiError> {
    if value.trim() == value {
        Ok(())
    } else {
        Err(ApiError::InvalidBody(format!(
            "{what} begins or ends with white space"
        )))
    }
}

/// A required `provider_config_key`: present, not blank, well-formed.
pub fn provider_config_key(value: Option<&str>) -> Result<String, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Err(ApiError::MissingProviderConfig),
        Some(key) => {
            identifier(key, "provider_config_key")?;
            Ok(key.to_owned())
        }
    }
}

/// The connection a request names: `connection_id` from the path, `provider_config_key` from
/// the query string, both checked.
pub fn connection_key(
    connection_id: String,
    provider_config_key_in_query: Option<&str>,
) -> Result<ConnectionKey, ApiError> {
    identifier(&connection_id, "connection_id")?;
    let key = provider_config_key(provider_config_key_in_query).map_err(in_query)?;
    Ok(ConnectionKey::new(key, connection_id))
}

/// Re-labels an [`identifier`] error for a value that came from the query string.
pub fn in_query(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidPath(message) => ApiError::InvalidQuery(message),
        other => other,
    }
}

/// Re-labels an [`identifier`] error for a value that came from the body.
pub fn in_body(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidPath(message) => ApiError::InvalidBody(message),
        other => other,
    }
}

/// Refuses a body holding U+0000 in any string or key: PostgreSQL's `jsonb` cannot store it
/// (the request would fail as a 5xx on one backend and succeed on the other), and no id, token,
/// scope or metadata needs it.
pub fn without_nul(value: &Value) -> Result<(), ApiError> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    if has_nul(value) {
        return Err(ApiError::InvalidBody(
            "the body must not contain NUL (\\u0000) characters".into(),
        ));
    }
    Ok(())
}

/// A JSON object body as the request type `T`, whose fields take any JSON and are checked one by
/// one afterwards (for Nango's codes). Refused (`invalid_body`) when it holds NUL or is not an
/// object.
pub fn object_body<T: DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    without_nul(&body)?;
    if !body.is_object() {
        return Err(ApiError::InvalidBody(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_value(body).map_err(|e| ApiError::InvalidBody(e.to_string()))
}

/// A body field that must be a string when it is there (`null` is not there).
pub fn optional_str<'a>(
    value: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::InvalidBody(format!("{field} must be a string"))),
    }
}

/// A body field that must be a JSON object when it is there (`null` is not there).
pub fn optional_object(
    value: Option<&Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o.clone())),
        Some(_) => Err(ApiError::InvalidBody(format!(
            "{field} must be a JSON object"
        ))),
    }
}
