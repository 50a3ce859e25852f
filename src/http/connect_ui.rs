//! The hosted Connect UI: the page at a connect session's `connect_link`
//! (`/connect/?session_token=…`) from which an end user connects an account, and its two assets.
//! `@nangohq/frontend`'s `openConnectUI({baseURL: "<server>/connect", apiURL: "<server>"})`
//! frames the same page and hands it the token by `postMessage`.
//!
//! The page is static and embedded in the binary (no build step, nothing from another site); its
//! script reads the token and calls the API with it (`GET /connect/session`, `GET /integrations`,
//! `GET /providers/:provider`, then a flow or a credential form). The server never writes the
//! token into the page. What the server adds is the headers:
//! - `Content-Security-Policy`: scripts and styles from this server only, no inline code, API
//!   calls and the WebSocket to this server and to the origin of a valid `apiURL` only, forms
//!   that cannot submit anywhere (the script posts them), no `frame-ancestors`, so that the app
//!   that opened the UI may frame it;
//! - `Referrer-Policy: no-referrer` (the token is in the address until the script removes it);
//! - `X-Content-Type-Options: nosniff`; and `Cache-Control: no-store` on every answer (the router's
//!   limits layer sets it).

use axum::extract::{RawQuery, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use url::Url;

use super::ApiError;
use crate::state::AppState;

/// The page; it refers to the assets relatively (`assets/…`), so it must be served under a path
/// that ends with `/`.
const INDEX_HTML: &str = include_str!("connect_ui/index.html");
const CONNECT_JS: &str = include_str!("connect_ui/connect.js");
const CONNECT_CSS: &str = include_str!("connect_ui/connect.css");

/// `GET /connect/`: the Connect UI page.
#[utoipa::path(
    get,
    path = "/connect/",
    tag = "connect",
    params(
        ("session_token" = Option<String>, Query,
            description = "The connect session's token (the session's `connect_link`); the page \
                removes it from the address bar. Without it, the page waits for the token from \
                the frame's parent (`openConnectUI`)"),
        ("apiURL" = Option<String>, Query,
            description = "The API the page calls (default: this server)"),
        ("detectClosedAuthWindow" = Option<bool>, Query,
            description = "Report a sign-in window closed before the flow ended"),
    ),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
    ),
    security(()),
)]
pub async fn page(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let api = query.as_deref().and_then(api_url_origin);
    let mut headers = common_headers("text/html; charset=utf-8");
    let csp = content_security_policy(&state.config.server_url, api.as_deref());
    if let Ok(value) = HeaderValue::from_str(&csp) {
        headers.insert("content-security-policy", value);
    }
    (StatusCode::OK, headers, INDEX_HTML).into_response()
}

/// `GET /connect`: to the page, which only resolves its assets under `/connect/`.
#[utoipa::path(
    get,
    path = "/connect",
    tag = "connect",
    responses(
        (status = 308, description = "To `/connect/` with the same query",
            headers(("Location" = String))),
    ),
    security(()),
)]
pub async fn redirect(RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    // Relative to `/connect`, `connect/` is `/connect/`, and stays right behind a reverse proxy
    // that serves the API under a path prefix.
    let location = match query.as_deref() {
        Some(query) if !query.is_empty() => format!("connect/?{query}"),
        _ => "connect/".to_owned(),
    };
    // A request's query is always a valid header value; refuse rather than drop it otherwise.
    let location = HeaderValue::from_str(&location)
        .map_err(|_| ApiError::InvalidQuery("the query is not a valid URL query".into()))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, location);
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    Ok((StatusCode::PERMANENT_REDIRECT, headers).into_response())
}

/// `GET /connect/assets/connect.js`: the page's script.
#[utoipa::path(
    get,
    path = "/connect/assets/connect.js",
    tag = "connect",
    responses(
        (status = 200, description = "The Connect UI's script", content_type = "text/javascript",
            body = String),
    ),
    security(()),
)]
pub async fn script() -> Response {
    let headers = common_headers("text/javascript; charset=utf-8");
    (StatusCode::OK, headers, CONNECT_JS).into_response()
}

/// `GET /connect/assets/connect.css`: the page's style sheet.
#[utoipa::path(
    get,
    path = "/connect/assets/connect.css",
    tag = "connect",
    responses(
        (status = 200, description = "The Connect UI's style sheet", content_type = "text/css",
            body = String),
    ),
    security(()),
)]
pub async fn style() -> Response {
    let headers = common_headers("text/css; charset=utf-8");
    (StatusCode::OK, headers, CONNECT_CSS).into_response()
}

/// The headers of every Connect UI answer.
fn common_headers(content_type: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers
}

/// The origin of the query's `apiURL`, when it is an `http(s)` URL.
fn api_url_origin(query: &str) -> Option<String> {
    let (_, value) = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "apiURL")?;
    http_origin(&value)
}

/// The serialized origin of an `http(s)` URL whose host is a DNS name or an IP address: only
/// letters, digits, `.`, `-`, `:` and brackets, nothing that could end a CSP source or directive
/// (a URL host may hold a `;`).
fn http_origin(url: &str) -> Option<String> {
    let url = Url::parse(url).ok()?;
    let plain = match url.host()? {
        url::Host::Domain(name) => name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
        url::Host::Ipv4(_) | url::Host::Ipv6(_) => true,
    };
    (plain && matches!(url.scheme(), "http" | "https")).then(|| url.origin().ascii_serialization())
}

/// `ws://…` for `http://…`, `wss://…` for `https://…`.
fn socket_origin(http_origin: &str) -> Option<String> {
    if let Some(rest) = http_origin.strip_prefix("https://") {
        Some(format!("wss://{rest}"))
    } else {
        http_origin
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
    }
}

/// The page's policy: its own script and style sheet, images from itself, `data:` and `https:`
/// (integration logos), and calls to this server (`server_url`, `'self'`) and to `api`, over HTTP
/// and WebSocket.
fn content_security_policy(server_url: &str, api: Option<&str>) -> String {
    let mut connect = vec!["'self'".to_owned()];
    for origin in [http_origin(server_url), api.map(str::to_owned)]
        .into_iter()
        .flatten()
    {
        let socket = socket_origin(&origin);
        for source in [Some(origin), socket].into_iter().flatten() {
            if !connect.contains(&source) {
                connect.push(source);
            }
        }
    }
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; \
         connect-src {}; base-uri 'none'; form-action 'none'",
        connect.join(" ")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_this_server_and_the_api_origin_over_http_and_websocket() {
        let csp = content_security_policy(
            "http://127.0.0.1:3003",
            api_url_origin("apiURL=https%3A%2F%2Fapi.example%3A8443%2Fbase%2F&x=1").as_deref(),
        );
        assert!(
            csp.contains(
                "connect-src 'self' http://127.0.0.1:3003 ws://127.0.0.1:3003 \
                 https://api.example:8443 wss://api.example:8443;"
            ),
            "{csp}"
        );
        assert!(csp.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"));
        assert!(!csp.contains("frame-ancestors"), "{csp}");
    }

    #[test]
    fn an_api_url_that_is_not_http_adds_nothing_to_the_policy() {
        for query in [
            "apiURL=javascript:alert(1)",
            "apiURL=https://a.example;%20script-src%20*",
            "apiURL=not%20a%20url",
            "apiURL=",
            "other=1",
        ] {
            let api = api_url_origin(query);
            let csp = content_security_policy("http://127.0.0.1:3003", api.as_deref());
            assert!(
                csp.contains("connect-src 'self' http://127.0.0.1:3003 ws://127.0.0.1:3003"),
                "{query}: {csp}"
            );
            assert!(!csp.contains("script-src *"), "{query}: {csp}");
        }
        // Of a URL with a `;` in its path, the origin is all that is kept; a host with one is
        // refused.
        assert_eq!(
            api_url_origin("apiURL=https://a.example/;script-src").as_deref(),
            Some("https://a.example")
        );
        assert_eq!(
            api_url_origin("apiURL=https://a.example;report-uri").as_deref(),
            None
        );
        assert_eq!(
            api_url_origin("apiURL=http://[::1]:4000").as_deref(),
            Some("http://[::1]:4000")
        );
    }

    #[test]
    fn the_page_refers_only_to_its_own_assets() {
        assert!(INDEX_HTML.contains("src=\"assets/connect.js\""));
        assert!(INDEX_HTML.contains("href=\"assets/connect.css\""));
        for text in [INDEX_HTML, CONNECT_JS, CONNECT_CSS] {
            assert!(!text.contains("//cdn"), "no CDN");
            assert!(!text.contains("@import"), "no imported style sheets");
        }
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
        assert!(!INDEX_HTML.contains("style=\""), "no inline style");
    }
}
