//! `ANY /proxy/*`: Nango's proxy contract (reference §6.1) — the caller names the connection in
//! headers, and the rest of the request goes to the provider with the credential put in.

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderName, Method, Uri};
use axum::response::Response;
use domain::connection::ConnectionKey;
use domain::log_scope;

use super::ApiError;
use super::extract::identifier;
use crate::proxy::{self, ProxyCall, ProxyError};
use crate::state::AppState;

/// The most retries a call may ask for.
const MAX_RETRIES: u32 = 10;
/// The prefix of the caller's headers meant for the provider.
const FORWARD_PREFIX: &str = "nango-proxy-";

// Nango's proxy headers, as names made once: a lookup by `&str` parses the name every time.
const PROVIDER_CONFIG_KEY: HeaderName = HeaderName::from_static("provider-config-key");
const CONNECTION_ID: HeaderName = HeaderName::from_static("connection-id");
const RETRIES: HeaderName = HeaderName::from_static("retries");
const RETRY_ON: HeaderName = HeaderName::from_static("retry-on");
const DECOMPRESS: HeaderName = HeaderName::from_static("decompress");
const FORWARD_HEADERS_ON_REDIRECT: HeaderName =
    HeaderName::from_static("forward-headers-on-redirect");
const BASE_URL_OVERRIDE: HeaderName = HeaderName::from_static("base-url-override");

/// `ANY /proxy/{path}`: the provider's answer to the same request, with the connection's
/// credential.
#[utoipa::path(
    method(get, delete),
    path = "/proxy/{path}",
    tag = "proxy",
    params(
        ("path" = String, Path, description = "The provider's path (and query)"),
        ("Connection-Id" = String, Header, description = "The connection"),
        ("Provider-Config-Key" = String, Header, description = "Its integration"),
        ("Retries" = Option<u32>, Header, description = "Attempts after the first (at most 10)"),
        ("Retry-On" = Option<String>, Header, description = "More statuses to retry, e.g. `409,423`"),
        ("Base-Url-Override" = Option<String>, Header, description = "Another base URL (GRANTLINE_PROXY_ALLOWED_HOSTS)"),
        ("Decompress" = Option<bool>, Header, description = "`true`: a gzip or deflate answer comes back decoded"),
        ("Forward-Headers-On-Redirect" = Option<bool>, Header, description = "`true`: the credential is sent again on a redirect to the same host"),
    ),
    responses(
        (status = 200, description = "The provider's answer, passed through (any status)"),
        (status = 400, description = "`invalid_headers`, `unsupported_provider`, `base_url_override_not_allowed`, `blocked_destination`, …", body = super::error::ErrorBody),
        (status = 404, description = "No such integration or connection", body = super::error::ErrorBody),
        (status = 422, description = "`invalid_credentials`: the connection's credential cannot be sent in a header", body = super::error::ErrorBody),
        (status = 502, description = "`upstream_unreachable`", body = super::error::ErrorBody),
        (status = 504, description = "`upstream_timeout`", body = super::error::ErrorBody),
    ),
)]
pub async fn proxy(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let endpoint = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_default()
        .strip_prefix("/proxy")
        .unwrap_or_default();
    let endpoint = if endpoint.starts_with('/') {
        endpoint.to_owned()
    } else {
        format!("/{endpoint}")
    };
    // `..` (or `%2e%2e`) would climb out of the template's base path once the URL is parsed.
    let path = endpoint.split(['?', '#']).next().unwrap_or_default();
    if path.split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    }) {
        return Err(ProxyError::InvalidUrl(
            "the path has a `.` or `..` segment, which would leave the base URL's path".into(),
        )
        .into());
    }
    let required = |name: HeaderName| -> Result<String, ApiError> {
        let value = text(&headers, &name)?.ok_or_else(|| invalid(format!("{name} is required")))?;
        identifier(&value, name.as_str()).map_err(|e| invalid(e.to_string()))?;
        Ok(value)
    };
    let key = ConnectionKey::new(required(PROVIDER_CONFIG_KEY)?, required(CONNECTION_ID)?);
    let retries = match text(&headers, &RETRIES)? {
        None => 0,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_RETRIES)
            .ok_or_else(|| invalid(format!("Retries must be 0 to {MAX_RETRIES}")))?,
    };
    let retry_on = match text(&headers, &RETRY_ON)? {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (100..600).contains(n))
            })
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| invalid("Retry-On must be a comma-separated list of statuses".into()))?,
    };
    let flag = |name: HeaderName| -> Result<bool, ApiError> {
        match text(&headers, &name)?.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(invalid(format!("{name} must be true or false"))),
        }
    };
    let decompress = flag(DECOMPRESS)?;
    let forward_headers_on_redirect = flag(FORWARD_HEADERS_ON_REDIRECT)?;
    let mut forwarded = HeaderMap::new();
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        forwarded.insert(CONTENT_TYPE, content_type.clone());
    }
    for (name, value) in &headers {
        if let Some(upstream) = name.as_str().strip_prefix(FORWARD_PREFIX)
            && let Ok(upstream) = HeaderName::from_bytes(upstream.as_bytes())
        {
            forwarded.insert(upstream, value.clone());
        }
    }
    // No length and no chunked body: there is no body (and so the call can be sent again).
    let body_length = match headers.get(CONTENT_LENGTH) {
        Some(length) => length.to_str().ok().and_then(|v| v.parse::<u64>().ok()),
        None if headers.contains_key(TRANSFER_ENCODING) => None,
        None => Some(0),
    };
    let call = ProxyCall {
        key,
        method,
        endpoint,
        headers: forwarded,
        body,
        body_length,
        retries,
        retry_on,
        base_url_override: text(&headers, &BASE_URL_OVERRIDE)?,
        decompress,
        forward_headers_on_redirect,
        // Passed on upstream, so the provider's logs can be matched with ours.
        request_id: log_scope::current()
            .map(|request| request.request_id.to_string())
            .unwrap_or_default(),
    };
    Ok(proxy::call(&state, call).await?)
}

/// `POST`/`PUT`/`PATCH /proxy/{path}`: as [`proxy`], with the request's body sent on.
#[utoipa::path(
    method(post, put, patch),
    request_body(content = Vec<u8>, description = "Sent to the provider as it comes (streamed)", content_type = "*/*"),
    path = "/proxy/{path}",
    tag = "proxy",
    params(
        ("path" = String, Path, description = "The provider's path (and query)"),
        ("Connection-Id" = String, Header, description = "The connection"),
        ("Provider-Config-Key" = String, Header, description = "Its integration"),
        ("Retries" = Option<u32>, Header, description = "Attempts after the first (at most 10)"),
        ("Retry-On" = Option<String>, Header, description = "More statuses to retry, e.g. `409,423`"),
        ("Base-Url-Override" = Option<String>, Header, description = "Another base URL (GRANTLINE_PROXY_ALLOWED_HOSTS)"),
        ("Decompress" = Option<bool>, Header, description = "`true`: a gzip or deflate answer comes back decoded"),
        ("Forward-Headers-On-Redirect" = Option<bool>, Header, description = "`true`: the credential is sent again on a redirect to the same host"),
    ),
    responses(
        (status = 200, description = "The provider's answer, passed through (any status)"),
        (status = 400, description = "`invalid_headers`, `unsupported_provider`, `base_url_override_not_allowed`, `blocked_destination`, …", body = super::error::ErrorBody),
        (status = 404, description = "No such integration or connection", body = super::error::ErrorBody),
        (status = 422, description = "`invalid_credentials`: the connection's credential cannot be sent in a header", body = super::error::ErrorBody),
        (status = 502, description = "`upstream_unreachable`", body = super::error::ErrorBody),
        (status = 504, description = "`upstream_timeout`", body = super::error::ErrorBody),
    ),
)]
pub async fn proxy_with_body(
    state: State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    proxy(state, method, uri, headers, body).await
}

/// A header's text, trimmed; blank is absent. Ids may hold any character the API takes, so
/// the bytes are read as UTF-8, else as Latin-1 (what Node's HTTP client sends for characters
/// up to U+00FF). Sent twice, it is refused rather than read one way or the other.
fn text(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return match headers.contains_key(name) {
            true => Err(invalid(format!("{name} is sent more than once"))),
            false => Ok(None),
        };
    };
    let text: std::borrow::Cow<'_, str> = match std::str::from_utf8(value.as_bytes()) {
        Ok(text) => text.into(),
        Err(_) => value.as_bytes().iter().map(|&b| char::from(b)).collect(),
    };
    let text = text.trim();
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

fn invalid(message: String) -> ApiError {
    ApiError::Refused {
        status: axum::http::StatusCode::BAD_REQUEST,
        code: "invalid_headers",
        message,
    }
}
