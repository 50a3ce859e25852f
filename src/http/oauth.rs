//! `GET /oauth/connect/:provider_config_key` and `GET /oauth/callback`: the browser's side of an
//! OAuth flow. Neither takes the secret key (the browser has none); `/oauth/connect` checks the
//! public key when one is configured.
//!
//! The outcome goes to an allow-listed `api_redirect_url` as a 302, or else to a small HTML page
//! that posts it to `window.opener` (Nango's frontend ≤ 0.8 protocol) and closes. Every text on
//! the page is HTML-escaped, the JSON in its script has `<`, `>` and `&` escaped, and a
//! Content-Security-Policy allows that one script only. When the flow names a `ws_client_id`,
//! the outcome is also sent over that WebSocket (`GET /` with an upgrade).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ApiError;
use super::error::flow_status;
use super::extract::ApiPath;
use crate::oauth::{self, ConnectRequest, FlowError, Report};
use crate::state::AppState;

/// `GET /oauth/connect/:provider_config_key`: starts a flow and redirects to the provider.
///
/// A failure goes to `api_redirect_url` (302 with `message_type=error`, `error_type`,
/// `error_desc`) when one is given and allowed, else to an HTML page posting it to the opener.
#[utoipa::path(
    get,
    path = "/oauth/connect/{provider_config_key}",
    tag = "oauth",
    params(
        ("provider_config_key" = String, Path, description = "The integration to connect"),
        ("connection_id" = Option<String>, Query,
            description = "The id the new connection gets (not with a session token)"),
        ("connect_session_token" = Option<String>, Query,
            description = "A connect session's token: the server chooses the connection id, \
                and the session's integrations, defaults, tags and end user apply"),
        ("public_key" = Option<String>, Query,
            description = "The public key; required when the server has one"),
        ("hmac" = Option<String>, Query,
            description = "HMAC-SHA256 of `provider_config_key:connection_id` (hex); required when \
                the server has an HMAC key"),
        ("params" = Option<HashMap<String, String>>, Query, style = DeepObject, explode,
            description = "`params[name]=value`: connection configuration, interpolated into the \
                provider template (`${connectionConfig.name}`)"),
        ("authorization_params" = Option<HashMap<String, String>>, Query, style = DeepObject,
            explode, description = "`authorization_params[name]=value`: extra parameters of the \
                authorization URL; the value `undefined` removes one"),
        ("scopes" = Option<String>, Query,
            description = "Scopes separated by commas or spaces; replace the integration's"),
        ("api_redirect_url" = Option<String>, Query,
            description = "Where the outcome is sent as a 302 (must be allowed by the server)"),
        ("ws_client_id" = Option<String>, Query,
            description = "The WebSocket client (`GET /`) that receives the outcome"),
    ),
    responses(
        (status = 302, description = "To the provider's authorization URL, or to \
            `api_redirect_url` with the error", headers(("Location" = String))),
        (status = "4XX", description = "The flow cannot start: an HTML page posting \
            `AUTHORIZATION_FAILED` to the opener", content_type = "text/html", body = String),
    ),
    security(()),
)]
pub async fn connect(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(provider_config_key): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut request = connect_request(provider_config_key, query.as_deref().unwrap_or(""));
    request.client = Some(peer.ip());
    match oauth::connect(&state, request, Utc::now()).await {
        Ok(started) => {
            let mut response = found(&started.url);
            let secure = state.config.server_url.starts_with("https://");
            let cookie = format!(
                "{}={}; Path=/oauth/callback; Max-Age={}; HttpOnly; SameSite=Lax{}",
                started.cookie.name,
                started.cookie.value,
                started.cookie.max_age,
                if secure { "; Secure" } else { "" },
            );
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
            response
        }
        Err(failure) => {
            // What a session token refuses is answered as JSON, as Nango's clients expect.
            if let Some(refusal) = session_refusal(&failure.error) {
                return refusal.into_response();
            }
            oauth::report_failure(&state, &failure).await;
            failed(&failure.error, &failure.report)
        }
    }
}

/// `GET /oauth/callback`: the provider sends the browser back here with `code` and `state`.
///
/// The connection is stored before success is reported.
#[utoipa::path(
    get,
    path = "/oauth/callback",
    tag = "oauth",
    params(
        ("state" = String, Query, description = "The flow's state, from `/oauth/connect`"),
        ("code" = Option<String>, Query, description = "OAuth 2.0: the authorization code"),
        ("error" = Option<String>, Query, description = "The provider's refusal, if any"),
        ("error_description" = Option<String>, Query, description = "The refusal's text"),
        ("oauth_token" = Option<String>, Query, description = "OAuth 1.0a: the request token"),
        ("oauth_verifier" = Option<String>, Query, description = "OAuth 1.0a: the verifier"),
        ("denied" = Option<String>, Query, description = "OAuth 1.0a: the user refused"),
    ),
    responses(
        (status = 200, description = "Success: an HTML page posting `AUTHORIZATION_SUCEEDED` to \
            the opener", content_type = "text/html", body = String),
        (status = 302, description = "To `api_redirect_url`: `connection_id` and \
            `provider_config_key` appended on success; `message_type=error`, `error_type`, \
            `error_desc` on failure", headers(("Location" = String))),
        (status = "4XX", description = "Failure: an HTML page posting `AUTHORIZATION_FAILED` to \
            the opener", content_type = "text/html", body = String),
        (status = "5XX", description = "The provider or the database failed: the same page",
            content_type = "text/html", body = String),
    ),
    security(()),
)]
pub async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let cookie = |name: &str| cookie_value(&headers, name);
    let outcome = oauth::callback(&state, &pairs, cookie, Utc::now()).await;
    match &outcome {
        Ok(done) => oauth::report_success(&state, done).await,
        Err(failure) => oauth::report_failure(&state, failure).await,
    }
    match outcome {
        Ok(done) => match &done.report.api_redirect_url {
            Some(url) => found(&oauth::success_redirect(
                &state.config,
                url,
                &done.connection,
                Utc::now(),
            )),
            None => page(
                StatusCode::OK,
                "Authorization succeeded",
                "The connection is set up. You can close this window.",
                &PageMessage::Succeeded {
                    data: Connected {
                        connection_id: done.connection.connection_id(),
                        provider_config_key: done.connection.provider_config_key(),
                    },
                },
            ),
        },
        Err(failure) => failed(&failure.error, &failure.report),
    }
}

/// The connect request in `query`: plain parameters, `params[x]` and
/// `authorization_params[x]`. Unknown parameters are ignored; a repeated one keeps its last value.
pub(super) fn connect_request(provider_config_key: String, query: &str) -> ConnectRequest {
    let mut request = ConnectRequest {
        provider_config_key,
        ..ConnectRequest::default()
    };
    let mut params = BTreeMap::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()).into_owned() {
        if let Some(inner) = bracketed(&name, "params") {
            params.insert(inner.to_owned(), value);
        } else if let Some(inner) = bracketed(&name, "authorization_params") {
            request.authorization_params.push((inner.to_owned(), value));
        } else {
            let slot = match name.as_str() {
                "connection_id" => &mut request.connection_id,
                "public_key" => &mut request.public_key,
                "connect_session_token" => &mut request.connect_session_token,
                "hmac" => &mut request.hmac,
                "scopes" => &mut request.scopes,
                "api_redirect_url" => &mut request.api_redirect_url,
                "ws_client_id" => &mut request.ws_client_id,
                _ => continue,
            };
            *slot = Some(value);
        }
    }
    request.params = params;
    request
}

/// The value of the request's cookie `name`, if it has one.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// The JSON error of a flow a connect session refused.
fn session_refusal(error: &FlowError) -> Option<ApiError> {
    match error {
        FlowError::UnknownSessionToken => Some(ApiError::UnknownConnectSessionToken),
        FlowError::SessionRequired => Some(ApiError::ConnectSessionRequired),
        FlowError::IntegrationNotAllowed(key) => Some(ApiError::IntegrationNotAllowed(key.clone())),
        FlowError::ConnectionIdWithSessionToken => Some(ApiError::InvalidQuery(error.to_string())),
        _ => None,
    }
}

/// `x` of `prefix[x]`.
fn bracketed<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
        .filter(|inner| !inner.is_empty())
}

/// A failure: to the allow-listed `api_redirect_url` if there is one, else on the page.
fn failed(error: &FlowError, report: &Report) -> Response {
    if let Some(url) = &report.api_redirect_url {
        return found(&oauth::error_redirect(url, error));
    }
    page(
        flow_status(error),
        "Authorization failed",
        &format!("{} ({})", error, error.error_type()),
        &PageMessage::Failed {
            data: Refused {
                error: Refusal {
                    error_type: error.error_type(),
                    message: error.to_string(),
                },
            },
        },
    )
}

/// What the page posts to `window.opener` (Nango's frontend ≤ 0.8 protocol; today's is
/// [`PageMessage::current`]).
#[derive(Serialize)]
#[serde(tag = "eventType")]
enum PageMessage<'a> {
    #[serde(rename = "AUTHORIZATION_SUCEEDED")]
    Succeeded { data: Connected<'a> },
    #[serde(rename = "AUTHORIZATION_FAILED")]
    Failed { data: Refused },
}

impl PageMessage<'_> {
    /// The message today's Nango posts, to the opener and on the `nango-oauth-callback`
    /// broadcast channel, for a Connect UI that listens for it: no ids, only the outcome.
    fn current(&self) -> Value {
        match self {
            Self::Succeeded { .. } => json!({"type": "nango_oauth_callback_success"}),
            Self::Failed { data } => json!({
                "type": "nango_oauth_callback_error",
                "payload": {"message": data.error.message, "errorType": data.error.error_type},
            }),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Connected<'a> {
    connection_id: &'a str,
    provider_config_key: &'a str,
}

#[derive(Serialize)]
struct Refused {
    error: Refusal,
}

#[derive(Serialize)]
struct Refusal {
    #[serde(rename = "type")]
    error_type: &'static str,
    message: String,
}

/// A 302 to `location`.
fn found(location: &str) -> Response {
    let mut headers = HeaderMap::new();
    match HeaderValue::from_str(location) {
        Ok(value) => {
            headers.insert(header::LOCATION, value);
        }
        // A URL built by the url crate is always a valid header value.
        Err(_) => {
            return ApiError::Internal("redirect URL is not a header value".into()).into_response();
        }
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    (StatusCode::FOUND, headers).into_response()
}

/// The page that reports an outcome: `text` for the user, `message` posted to the opener.
fn page(status: StatusCode, title: &str, text: &str, message: &PageMessage<'_>) -> Response {
    // Strings only: this cannot fail.
    let current = message.current();
    let message = serde_json::to_value(message).unwrap_or_default();
    let script = format!(
        "(function () {{\n  var message = {};\n  var current = {};\n  try {{ var channel = new \
         BroadcastChannel('nango-oauth-callback'); channel.postMessage(current); channel.close(); \
         }} catch (e) {{}}\n  if (window.opener) {{\n    try {{ \
         window.opener.postMessage(message, '*'); window.opener.postMessage(current, '*'); }} \
         catch (e) {{}}\n    setTimeout(function () {{ window.close(); }}, 300);\n  }}\n}})();",
        script_json(&message),
        script_json(&current)
    );
    let hash = BASE64.encode(Sha256::digest(script.as_bytes()));
    let body = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{}</title></head>\n\
         <body>\n<h1>{}</h1>\n<p>{}</p>\n<script>{}</script>\n</body>\n</html>\n",
        escape_html(title),
        escape_html(title),
        escape_html(text),
        script
    );
    let csp = format!("default-src 'none'; script-src 'sha256-{hash}'; frame-ancestors 'none'");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Ok(value) = HeaderValue::from_str(&csp) {
        headers.insert("content-security-policy", value);
    }
    (status, headers, body).into_response()
}

/// JSON that is safe inside a `<script>` element: nothing in it can close the element or start
/// markup, and the JavaScript line terminators U+2028/U+2029 are escaped.
fn script_json(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            other => out.push(other),
        }
    }
    out
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bracketed_parameters_are_collected_and_others_ignored() {
        let request = connect_request(
            "k".into(),
            "connection_id=c&params%5Bsubdomain%5D=acme&params[x]=1&authorization_params[prompt]=consent\
             &scopes=a+b&unknown=1&params[]=no&connection_id=d",
        );
        assert_eq!(request.connection_id.as_deref(), Some("d"));
        assert_eq!(
            request.params,
            BTreeMap::from([
                ("subdomain".into(), "acme".into()),
                ("x".into(), "1".into())
            ])
        );
        assert_eq!(
            request.authorization_params,
            vec![("prompt".to_owned(), "consent".to_owned())]
        );
        assert_eq!(request.scopes.as_deref(), Some("a b"));
    }

    #[test]
    fn json_in_a_script_cannot_close_it() {
        let value = json!({ "message": "</script><script>alert(1)</script> & \u{2028}" });
        let text = script_json(&value);
        assert!(!text.contains('<') && !text.contains('>') && !text.contains('&'));
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }

    #[test]
    fn html_text_is_escaped() {
        assert_eq!(
            escape_html(r#"<b a="x">'&"#),
            "&lt;b a=&quot;x&quot;&gt;&#39;&amp;"
        );
    }
}
