//! The provider HTTP client: token requests to a provider's token endpoint and the parsing of
//! their answers. The authorization-code exchange uses it now; the refresh service will too.
//!
//! Why not the `oauth2` crate's `exchange_code`: templates need what it does not do — a JSON
//! request body (`body_format: json`), token endpoints that answer form-encoded (or answer 200
//! with an `error`), the whole raw answer kept for the Connection object, and extra keys
//! (`token_params`, `token_response_metadata`). So requests are built here on `reqwest`.
//!
//! Guarantees:
//! - Every request ends within the configured timeout (connecting, sending and reading the
//!   answer), and an answer larger than [`MAX_RESPONSE_BYTES`] is refused.
//! - A [`TokenError`]'s message never contains a secret: neither the client secret, the code,
//!   the verifier nor a token. It quotes the HTTP status, the provider's `error` code when it
//!   looks like one ([`plausible_error_code`], else `unrecognized`), and what was wrong with
//!   the answer's shape; never the provider's free text (`error_description`), which may echo
//!   what it was sent, and which failures recorded in the log would keep forever.
//! - Redirects are not followed: a token endpoint that redirects is misconfigured.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::bounds::{JsonBounds, TimeRange};
use domain::catalog::{AuthorizationMethod, BodyFormat};
use domain::credentials::ClientSecret;
use serde_json::{Map, Value};

use crate::transport;

/// The largest token answer read.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// How much of a provider's own error text is quoted.
const MAX_QUOTED_CHARS: usize = 300;

/// An HTTP client for providers' token endpoints. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ProviderClient {
    pub(crate) http: reqwest::Client,
    timeout: Duration,
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the provider HTTP client: {0}")]
pub struct ClientBuildError(String);

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A token request: where, as whom, and the grant's parameters.
pub struct TokenRequest<'a> {
    /// The token endpoint, already interpolated.
    pub token_url: &'a str,
    /// The OAuth client id.
    pub client_id: &'a str,
    /// The OAuth client secret.
    pub client_secret: &'a ClientSecret,
    /// Client credentials in the body, as HTTP Basic, or as a signed client assertion.
    pub authorization_method: AuthorizationMethod,
    /// The signed JWT that authenticates the client when the method is
    /// [`AuthorizationMethod::PrivateKeyJwt`] (see [`crate::client_credentials`]).
    pub client_assertion: Option<&'a str>,
    /// Form-encoded or JSON body.
    pub body_format: BodyFormat,
    /// The grant's parameters (`grant_type`, `code`, …), in order; later keys win.
    pub params: Vec<(String, String)>,
}

impl fmt::Debug for TokenRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parameter values (a code, a verifier, a refresh token) are secrets: names only.
        let names: Vec<&str> = self.params.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TokenRequest")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("authorization_method", &self.authorization_method)
            .field("body_format", &self.body_format)
            .field("params", &names)
            .finish_non_exhaustive()
    }
}

/// A provider's successful token answer.
#[derive(Clone, PartialEq)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when the provider sent a non-empty one.
    pub refresh_token: Option<String>,
    /// When the access token expires, from `expires_in` or `expires_at`, if given.
    pub expires_at: Option<DateTime<Utc>>,
    /// The scopes granted, when the answer names them (`scope`, space or comma separated).
    pub scopes: Option<Vec<String>>,
    /// The whole answer, as a JSON object (form answers become string values).
    pub raw: Map<String, Value>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// A request that only succeeds with working credentials (a template's `verification`).
#[derive(Clone, Copy)]
pub struct CredentialCheck<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub query: &'a [(String, String)],
    /// Header values hold the credential: never logged.
    pub headers: &'a [(String, String)],
    /// HTTP Basic credentials.
    pub basic: Option<(&'a str, &'a str)>,
}

/// Why a token request failed. Messages carry no secret (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token URL cannot be used.
    #[error("the token URL is not a valid http(s) URL: {0}")]
    InvalidUrl(String),
    /// No complete answer within the timeout.
    #[error("the token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    /// The endpoint could not be reached, or the connection broke.
    #[error("the token endpoint could not be reached: {0}")]
    Network(String),
    /// The endpoint answered with an error: a non-2xx status, or a 2xx carrying `error`.
    #[error("the token endpoint answered {}", describe_refusal(.status, .error))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The provider's `error` code, if it sent one.
        error: Option<String>,
        /// The provider's `error_description`, if it sent one.
        description: Option<String>,
    },
    /// A 2xx answer that is not a token response (not JSON or form, too large, no
    /// `access_token`).
    #[error("the token endpoint's answer is not a token response: {0}")]
    Malformed(String),
    /// The client cannot authenticate itself: its private key is unusable or missing. Nothing
    /// was sent.
    #[error("the client cannot authenticate: {0}")]
    ClientAuth(String),
}

impl TokenError {
    /// Whether trying again later may succeed: network trouble, timeouts, 5xx and 429. Other
    /// refusals (`invalid_grant`, 4xx) are permanent until something changes.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Network(_) => true,
            Self::Refused { status, .. } => *status >= 500 || *status == 429,
            Self::InvalidUrl(_) | Self::Malformed(_) | Self::ClientAuth(_) => false,
        }
    }
}

/// `url` as logs may show it: without credentials, query or fragment, which can carry secrets.
pub(crate) fn loggable_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.into()
        }
        Err(_) => "<not a URL>".into(),
    }
}

fn describe_refusal(status: &u16, error: &Option<String>) -> String {
    let mut text = format!("HTTP {status}");
    if let Some(error) = error {
        text.push_str(&format!(" with error {error:?}"));
    }
    text
}

impl ProviderClient {
    /// A client whose every request ends within `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, ClientBuildError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("grantline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientBuildError(e.to_string()))?;
        Ok(Self { http, timeout })
    }

    /// The timeout of every request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a credential check (a template's verification request) and returns the answer's
    /// status. Only the status is read: the body is the provider's and may echo the credential.
    #[tracing::instrument(name = "provider.verify", skip_all, fields(url = %loggable_url(check.url)))]
    pub async fn verify(&self, check: &CredentialCheck<'_>) -> Result<u16, TokenError> {
        let mut url =
            reqwest::Url::parse(check.url).map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TokenError::InvalidUrl(loggable_url(check.url)));
        }
        if !check.query.is_empty() {
            url.query_pairs_mut().extend_pairs(check.query);
        }
        let method = reqwest::Method::from_bytes(check.method.as_bytes())
            .map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
        let mut request = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in check.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some((username, password)) = check.basic {
            request = request.basic_auth(username, Some(password));
        }
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        Ok(response.status().as_u16())
    }

    /// Sends a token request and parses the answer. `now` dates `expires_in`.
    #[tracing::instrument(
        name = "provider.token_request",
        skip_all,
        fields(token_url = %loggable_url(request.token_url))
    )]
    pub async fn request_token(
        &self,
        request: &TokenRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<TokenResponse, TokenError> {
        let url = reqwest::Url::parse(request.token_url)
            .map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TokenError::InvalidUrl(format!(
                "the scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        let mut params = request.params.clone();
        let mut builder = self
            .http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json");
        match request.authorization_method {
            AuthorizationMethod::Body => {
                params.push(("client_id".into(), request.client_id.to_owned()));
                params.push((
                    "client_secret".into(),
                    request.client_secret.expose().to_owned(),
                ));
            }
            AuthorizationMethod::Header => {
                builder =
                    builder.basic_auth(request.client_id, Some(request.client_secret.expose()));
            }
            AuthorizationMethod::PrivateKeyJwt => {
                let Some(assertion) = request.client_assertion else {
                    return Err(TokenError::ClientAuth(
                        "private_key_jwt needs the connection's private key".to_owned(),
                    ));
                };
                params.push(("client_id".into(), request.client_id.to_owned()));
                params.push(("client_assertion_type".into(), JWT_BEARER.to_owned()));
                params.push(("client_assertion".into(), assertion.to_owned()));
            }
        }
        let params = last_wins(params);
        builder = match request.body_format {
            BodyFormat::Form => {
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .finish();
                builder
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
            }
            BodyFormat::Json => {
                let body: Map<String, Value> = params
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                builder.json(&body)
            }
        };
        let answer = self.exchange(builder).await?;
        let Some(body) = answer.body else {
            return Err(TokenError::Malformed(format!(
                "it is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        };
        parse_token_response(answer.status, answer.content_type.as_deref(), &body, now)
    }

    /// Sends `request` and reads its answer; failing to send it or to read the answer, or the
    /// timeout, is a [`TokenError`].
    pub(crate) async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, TokenError> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_limited(response)
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok(Answer {
            status,
            content_type,
            body,
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> TokenError {
        if e.is_timeout() {
            TokenError::Timeout(self.timeout)
        } else {
            // The URL is in the span already; the causes say what failed.
            TokenError::Network(transport::describe(e))
        }
    }
}

/// A provider's answer.
pub(crate) struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    /// The body, or `None` if it is larger than [`MAX_RESPONSE_BYTES`].
    pub body: Option<Vec<u8>>,
}

/// Reads the body up to [`MAX_RESPONSE_BYTES`]; `None` if it is larger.
async fn read_limited(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `params` with each key once, at its first place, holding its last value.
fn last_wins(params: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(params.len());
    for (key, value) in params {
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(existing) => existing.1 = value,
            None => out.push((key, value)),
        }
    }
    out
}

/// Parses a token endpoint's answer: JSON, or form-encoded (some providers answer that way, or
/// as `text/plain`). A non-2xx status, or an `error` key, is a [`TokenError::Refused`].
pub fn parse_token_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<TokenResponse, TokenError> {
    let fields = decode_body(content_type, body);
    if !(200..300).contains(&status) {
        let (error, description) = fields.as_ref().map(error_fields).unwrap_or((None, None));
        return Err(TokenError::Refused {
            status,
            error,
            description,
        });
    }
    let Some(raw) = fields else {
        return Err(TokenError::Malformed(format!(
            "it is neither a JSON object nor form-encoded (content type {})",
            content_type.unwrap_or("none")
        )));
    };
    if raw.contains_key("error") {
        let (error, description) = error_fields(&raw);
        return Err(TokenError::Refused {
            status,
            error,
            description,
        });
    }
    let access_token = match raw.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => token.clone(),
        Some(_) => {
            return Err(TokenError::Malformed(
                "access_token is not a non-empty string".into(),
            ));
        }
        None => return Err(TokenError::Malformed("it has no access_token".into())),
    };
    let refresh_token = match raw.get("refresh_token") {
        Some(Value::String(token)) if !token.is_empty() => Some(token.clone()),
        _ => None,
    };
    // The rule for imported tokens: no header (nor the log's JSON, for NUL) could carry them.
    for (name, token) in [
        ("access_token", Some(&access_token)),
        ("refresh_token", refresh_token.as_ref()),
    ] {
        if token.is_some_and(|t| t.chars().any(char::is_control)) {
            return Err(TokenError::Malformed(format!(
                "{name} contains control characters"
            )));
        }
    }
    let expires_at = raw
        .get("expires_in")
        .and_then(seconds)
        .and_then(|s| TimeRange::after(now, s))
        .or_else(|| raw.get("expires_at").and_then(parse_expires_at));
    let scopes = match raw.get("scope") {
        Some(Value::String(scope)) => Some(split_scopes(scope)),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    };
    Ok(TokenResponse {
        access_token,
        refresh_token,
        expires_at,
        scopes,
        raw: within_bounds(raw),
    })
}

/// The fields OAuth names, kept from an answer too large or deep for the log.
const STANDARD_FIELDS: [&str; 7] = [
    "access_token",
    "token_type",
    "expires_in",
    "expires_at",
    "refresh_token",
    "scope",
    "id_token",
];

/// `raw` as the log can hold it: whole when it is within [`JsonBounds::CLIENT`], else only its
/// [`STANDARD_FIELDS`], else nothing (a provider's answer must never make the credentials
/// unrecordable).
fn within_bounds(raw: Map<String, Value>) -> Map<String, Value> {
    match JsonBounds::CLIENT.check_object(&raw) {
        Ok(()) => raw,
        Err(reason) => {
            tracing::warn!(%reason, "the token answer is out of bounds; keeping only its standard fields");
            let standard: Map<String, Value> = raw
                .into_iter()
                .filter(|(key, _)| STANDARD_FIELDS.contains(&key.as_str()))
                .collect();
            // The tokens themselves are kept apart from `raw` in the credentials.
            match JsonBounds::CLIENT.check_object(&standard) {
                Ok(()) => standard,
                Err(_) => Map::new(),
            }
        }
    }
}

/// The body as a map: a JSON object, or form fields. `None` if it is neither.
pub(crate) fn decode_body(content_type: Option<&str>, body: &[u8]) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        return Some(map);
    }
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let form_like = matches!(
        media.as_deref(),
        None | Some("application/x-www-form-urlencoded" | "text/plain")
    );
    let text = std::str::from_utf8(body).ok()?.trim();
    if !form_like || text.is_empty() || !text.contains('=') || text.contains(['<', '\n', ' ']) {
        return None;
    }
    let map: Map<String, Value> = url::form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    Some(map)
}

/// The provider's `error` (as [`plausible_error_code`] lets it through) and its
/// `error_description`, shortened.
pub(crate) fn error_fields(fields: &Map<String, Value>) -> (Option<String>, Option<String>) {
    let text = |key: &str| match fields.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(shorten(s)),
        // Some providers nest the error: {"error": {"message": …}}.
        Some(Value::Object(inner)) => inner.get("message").and_then(Value::as_str).map(shorten),
        _ => None,
    };
    let code = text("error").map(|code| plausible_error_code(&code).to_owned());
    (code, text("error_description"))
}

/// `code` if it looks like an OAuth error code (1–64 ASCII letters, digits, `_`, `.`, `-`),
/// else `unrecognized`: it is recorded in the log, shown in history and webhooks and logged,
/// so a provider's text (which may echo what it was sent) does not pass for one.
pub fn plausible_error_code(code: &str) -> &str {
    let plausible = (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if plausible { code } else { "unrecognized" }
}

fn shorten(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_QUOTED_CHARS)
        .collect();
    if text.chars().count() > MAX_QUOTED_CHARS {
        format!("{clean}…")
    } else {
        clean
    }
}

/// A number of seconds, given as a JSON number or a numeric string; a negative lifetime is an
/// expired token (0), not an unknown one.
fn seconds(value: &Value) -> Option<i64> {
    let seconds = match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    seconds.map(|s| s.max(0))
}

/// `expires_at` as a provider (or an import) gives it: UNIX seconds (number or numeric string)
/// or an RFC 3339 string.
pub fn parse_expires_at(value: &Value) -> Option<DateTime<Utc>> {
    let time = match value {
        Value::Number(n) => n.as_i64().and_then(|s| DateTime::from_timestamp(s, 0)),
        Value::String(s) => match s.trim().parse::<i64>() {
            Ok(seconds) => DateTime::from_timestamp(seconds, 0),
            Err(_) => DateTime::parse_from_rfc3339(s.trim())
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        },
        _ => None,
    };
    time.filter(|t| TimeRange::contains(*t))
}

/// Scopes from a space- or comma-separated list.
pub fn split_scopes(text: &str) -> Vec<String> {
    text.split([' ', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn parse(status: u16, content_type: &str, body: &str) -> Result<TokenResponse, TokenError> {
        parse_token_response(status, Some(content_type), body.as_bytes(), now())
    }

    #[test]
    fn a_logged_url_has_no_credentials_query_or_fragment() {
        assert_eq!(
            loggable_url("https://user:pw@login.example.com/t/token?client_secret=s#x"),
            "https://login.example.com/t/token"
        );
        assert_eq!(loggable_url("not a url ?secret"), "<not a URL>");
    }

    #[test]
    fn a_json_answer_yields_tokens_expiry_scopes_and_the_raw_object() {
        let body = json!({
            "access_token": "at", "refresh_token": "rt", "expires_in": 3600,
            "scope": "read write", "token_type": "bearer", "instance_url": "https://x"
        });
        let token = parse(200, "application/json", &body.to_string()).unwrap();
        assert_eq!(token.access_token, "at");
        assert_eq!(token.refresh_token.as_deref(), Some("rt"));
        assert_eq!(token.expires_at, DateTime::from_timestamp(1_700_003_600, 0));
        assert_eq!(token.scopes, Some(vec!["read".into(), "write".into()]));
        assert_eq!(Value::Object(token.raw), body);
    }

    #[test]
    fn a_form_encoded_answer_is_read_too() {
        let token = parse(
            200,
            "application/x-www-form-urlencoded",
            "access_token=a%2Fb&scope=repo%2Cuser&token_type=bearer",
        )
        .unwrap();
        assert_eq!(token.access_token, "a/b");
        assert_eq!(token.scopes, Some(vec!["repo".into(), "user".into()]));
        assert_eq!(token.refresh_token, None);
        assert_eq!(token.expires_at, None);
        let token = parse(200, "text/plain; charset=utf-8", "access_token=x").unwrap();
        assert_eq!(token.access_token, "x");
    }

    #[test]
    fn expires_at_is_read_as_unix_seconds_or_rfc_3339_and_expires_in_as_a_string() {
        for (body, expected) in [
            (
                json!({"access_token": "a", "expires_at": 1_800_000_000}),
                1_800_000_000,
            ),
            (
                json!({"access_token": "a", "expires_at": "1800000000"}),
                1_800_000_000,
            ),
            (
                json!({"access_token": "a", "expires_at": "2027-01-15T08:00:00Z"}),
                1_800_000_000,
            ),
            (
                json!({"access_token": "a", "expires_in": "60"}),
                1_700_000_060,
            ),
            // A negative lifetime: expired, not unknown.
            (
                json!({"access_token": "a", "expires_in": -60}),
                1_700_000_000,
            ),
            (
                json!({"access_token": "a", "expires_in": "-60"}),
                1_700_000_000,
            ),
        ] {
            let token = parse(200, "application/json", &body.to_string()).unwrap();
            assert_eq!(
                token.expires_at.map(|t| t.timestamp()),
                Some(expected),
                "{body}"
            );
        }
    }

    #[test]
    fn refusals_quote_the_providers_error_and_status_only() {
        let error = parse(
            400,
            "application/json",
            r#"{"error":"invalid_grant","error_description":"Bad code"}"#,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the token endpoint answered HTTP 400 with error \"invalid_grant\""
        );
        assert!(!error.is_retryable());
        // A code that is not one (here it echoes the refresh token) is not quoted either.
        let error = parse(
            400,
            "application/json",
            r#"{"error":"invalid_grant:rt-SECRET"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&error, TokenError::Refused { error: Some(code), .. } if code == "unrecognized"),
            "{error:?}"
        );
        assert!(!error.to_string().contains("SECRET"));
        let error = parse(503, "text/html", "<html>down</html>").unwrap_err();
        assert_eq!(error.to_string(), "the token endpoint answered HTTP 503");
        assert!(error.is_retryable());
        // GitHub answers 200 with an error.
        let error = parse(
            200,
            "application/x-www-form-urlencoded",
            "error=bad_verification_code",
        )
        .unwrap_err();
        assert!(matches!(error, TokenError::Refused { status: 200, .. }));
    }

    #[test]
    fn answers_that_are_not_token_responses_are_malformed() {
        for (content_type, body) in [
            ("text/html", "<html><body>Welcome</body></html>"),
            ("application/json", "[1,2]"),
            ("application/json", r#"{"token_type":"bearer"}"#),
            ("application/json", r#"{"access_token":""}"#),
            ("application/json", r#"{"access_token":42}"#),
            (
                "application/json",
                r#"{"access_token":"a\r\nX-Injected: 1"}"#,
            ),
            ("application/json", r#"{"access_token":"a\u0000"}"#),
            (
                "application/json",
                r#"{"access_token":"a","refresh_token":"r\u0000"}"#,
            ),
            ("text/plain", "hello world"),
        ] {
            let error = parse(200, content_type, body).unwrap_err();
            assert!(matches!(error, TokenError::Malformed(_)), "{body}: {error}");
        }
    }

    #[test]
    fn later_parameters_replace_earlier_ones_in_place() {
        let params = last_wins(vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ]);
        assert_eq!(
            params,
            vec![("a".into(), "3".into()), ("b".into(), "2".into())]
        );
    }

    #[test]
    fn a_token_request_debugs_without_parameter_values() {
        let secret = ClientSecret::new("client-SECRET");
        let request = TokenRequest {
            token_url: "https://example.com/token",
            client_id: "id",
            client_secret: &secret,
            authorization_method: AuthorizationMethod::Body,
            client_assertion: None,
            body_format: BodyFormat::Form,
            params: vec![("code".into(), "code-SECRET".into())],
        };
        let debug = format!("{request:?}");
        assert!(
            debug.contains("code") && !debug.contains("SECRET"),
            "{debug}"
        );
    }
}
