//! One attempt at the provider: where it goes (base URL, endpoint, template query), what it
//! carries (the credential — an OAuth 1.0a signature over the method, URL, query and form body
//! for OAuth 1 connections — the template's headers, the caller's `Nango-Proxy-*` headers, a
//! request id), the redirects it follows and what of the answer goes back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use domain::catalog::{self, Template};
use domain::credentials::Credentials;
use serde_json::{Map, Value};
use url::Url;

use super::clients::Clients;
use super::decompress::{self, Coding};
use super::redirect::{self, Hop};
use super::stats::ProxyStats;
use super::{ProxyError, guard};
use crate::config::ProxyConfig;
use crate::ended::OnEnd;

/// Headers that belong to one hop, never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The answer headers passed back to the caller (the rest are the provider's business).
const PASSED_BACK: [&str; 14] = [
    "content-type",
    "content-length",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "etag",
    "last-modified",
    "link",
    "location",
    "retry-after",
    "x-request-id",
    "x-correlation-id",
    "mcp-session-id",
];

/// Whether a `Connection` header lists `name` (a header of that hop only, RFC 9110 §7.6.1),
/// also in a value with bytes that are not text.
fn named_in(connection: &header::GetAll<'_, HeaderValue>, name: &str) -> bool {
    connection.iter().any(|value| {
        value
            .as_bytes()
            .split(|byte| *byte == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// An `x-` header a web server in front of Grantline acts on (nginx's internal redirects and
/// cache control, the send-file headers of Apache, lighttpd and LiteSpeed): never a provider's
/// to set.
fn for_the_front_server(name: &str) -> bool {
    name.starts_with("x-accel-")
        || name.starts_with("x-litespeed-")
        || matches!(
            name,
            "x-sendfile" | "x-lighttpd-send-file" | "x-sendfile-type"
        )
}

/// A provider's rate-limit header (`x-ratelimit-remaining`, `ratelimit-reset`,
/// `x-rate-limit-limit`, …): the caller paces itself by it, on every answer.
fn rate_limit(name: &str) -> bool {
    ["x-ratelimit-", "ratelimit", "x-rate-limit-"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// The caller's headers that are credentials of their own: sent where the proxy's credential
/// goes, and nowhere else.
const CALLER_CREDENTIALS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// The first wait of the exponential backoff, and the longest.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(8);

/// A request body: kept (and so sendable again) or streamed once.
pub enum RequestBody {
    Kept(Bytes),
    Streamed(Body),
}

/// Where a proxied call goes.
#[derive(Debug)]
pub struct Target {
    url: Url,
    /// Whether the host was chosen by the caller (an override or a filled placeholder): its
    /// addresses are checked when the connection is made.
    guarded: bool,
}

impl Target {
    /// The upstream URL: `Base-Url-Override` (allowed hosts only) or the template's
    /// `proxy.base_url` filled from the connection config, then the endpoint. A host other than
    /// the template's own must not be inside this network: an IP literal is checked here, a
    /// name when it is resolved to connect ([`super::guard`]).
    pub fn new(
        config: &ProxyConfig,
        template: &Template,
        connection_config: &Map<String, Value>,
        base_url_override: Option<&str>,
        endpoint: &str,
    ) -> Result<Self, ProxyError> {
        let values = catalog::config_values(connection_config);
        let (base, guarded) = match base_url_override {
            Some(base) => {
                let url = Url::parse(base).map_err(|e| ProxyError::InvalidUrl(e.to_string()))?;
                let host = url.host_str().unwrap_or_default().to_owned();
                if !matches!(url.scheme(), "http" | "https") || !config.allows(&host) {
                    return Err(ProxyError::OverrideNotAllowed(host));
                }
                (base.to_owned(), true)
            }
            None => {
                let base = template
                    .proxy
                    .base_url
                    .as_deref()
                    .ok_or_else(|| ProxyError::NoBaseUrl(template.name.clone()))?;
                let filled = catalog::interpolate_url(base, &values)
                    .map_err(|e| ProxyError::InvalidUrl(e.to_string()))?;
                // A filled placeholder may name any host.
                (filled, base.contains("${"))
            }
        };
        let base = base.trim_end_matches('/');
        let joined = if endpoint.starts_with(base) {
            endpoint.to_owned()
        } else {
            format!("{base}{endpoint}")
        };
        let url = Url::parse(&joined).map_err(|e| ProxyError::InvalidUrl(e.to_string()))?;
        if guarded {
            guard::check_literal(&url)?;
        }
        Ok(Self { url, guarded })
    }
}

/// How OAuth 1.0a calls are signed: the integration's client (consumer) and the template's
/// signature method.
pub struct Oauth1Signer {
    pub consumer_key: String,
    pub consumer_secret: domain::credentials::ClientSecret,
    pub method: domain::catalog::SignatureMethod,
}

/// One attempt's request.
pub struct Attempt<'a> {
    pub oauth1: Option<&'a Oauth1Signer>,
    pub clients: &'a Clients,
    pub config: &'a ProxyConfig,
    pub target: &'a Target,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    /// The parameters of a form body, which an OAuth 1.0a signature covers.
    pub form: &'a [(String, String)],
    pub credentials: &'a Credentials,
    pub template: &'a Template,
    pub connection_config: &'a Map<String, Value>,
    pub request_id: &'a str,
    /// `Forward-Headers-On-Redirect`.
    pub forward_on_redirect: bool,
    /// `Decompress`: ask for a compressed answer, which [`passthrough`] decodes.
    pub decompress: bool,
}

/// The provider's answer to an attempt.
pub struct Answer {
    pub response: Response<Body>,
    /// Whether the request answered carried the credential (a 401 to one that did not says
    /// nothing of the token).
    pub credentialed: bool,
}

impl Attempt<'_> {
    /// Sends the request with `body`, following redirects as [`super::redirect`] allows, and
    /// waits for the last answer's head until `deadline`.
    pub async fn send(
        &self,
        body: RequestBody,
        deadline: tokio::time::Instant,
    ) -> Result<Answer, ProxyError> {
        let kept = match &body {
            RequestBody::Kept(bytes) => Some(bytes.clone()),
            RequestBody::Streamed(_) => None,
        };
        let mut body = Some(body);
        // What the template's `${…}` placeholders stand for, built once for every hop.
        let values = catalog::placeholder_values(self.credentials, self.connection_config);
        let origin = Hop {
            url: self.first_url(&values),
            method: self.method.clone(),
            guarded: self.target.guarded,
            credentials: true,
            with_body: true,
        };
        let policy = redirect::Policy {
            forward_credentials: self.forward_on_redirect,
            origin: &origin,
            body_kept: kept.is_some(),
            config: self.config,
        };
        let mut hop = origin.clone();
        let mut redirects = 0;
        loop {
            let sending = match hop.with_body {
                true => body.take().or_else(|| kept.clone().map(RequestBody::Kept)),
                false => None,
            };
            let response = self.send_hop(&hop, &values, sending, deadline).await?;
            let next = (redirects < redirect::MAX_REDIRECTS)
                .then(|| {
                    let location = response.headers().get(header::LOCATION);
                    redirect::follow(response.status(), location, &hop, &policy)
                })
                .flatten();
            match next {
                Some(next) => {
                    redirects += 1;
                    hop = next;
                }
                None => {
                    return Ok(Answer {
                        response,
                        credentialed: hop.credentials,
                    });
                }
            }
        }
    }

    /// The call's URL with the template's query (an entry whose placeholder has no value is
    /// left out).
    fn first_url(&self, values: &BTreeMap<String, String>) -> Url {
        let mut url = self.target.url.clone();
        let query: Vec<(String, String)> = self
            .template
            .proxy
            .query
            .iter()
            .filter_map(|(name, text)| {
                catalog::fill_with(text, |p| values.get(p).map(String::as_str))
                    .ok()
                    .map(|v| (name.clone(), v))
            })
            .collect();
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// One request: the credential (when the hop carries it), the template's headers, the
    /// caller's, the request id.
    async fn send_hop(
        &self,
        hop: &Hop,
        values: &BTreeMap<String, String>,
        body: Option<RequestBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let mut headers = match hop.credentials {
            true => self.credential_headers(hop)?,
            false => HeaderMap::new(),
        };
        for (name, text) in &self.template.proxy.headers {
            // A header with a placeholder may carry a secret: it goes where the credential goes.
            if !hop.credentials && text.contains("${") {
                continue;
            }
            if let (Ok(value), Ok(name)) = (
                catalog::fill_with(text, |p| values.get(p).map(String::as_str)),
                HeaderName::from_bytes(name.as_bytes()),
            ) {
                // A credential that cannot be a header value refuses the call: sent without
                // it, the call would go out unauthenticated.
                let mut value = HeaderValue::from_str(&value)
                    .map_err(|_| ProxyError::UnusableCredential("a template header"))?;
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }
        for (name, value) in self.headers {
            let skipped = HOP_BY_HOP.contains(&name.as_str())
                || name == header::CONTENT_LENGTH
                || (body.is_none() && name == header::CONTENT_TYPE)
                || (!hop.credentials && CALLER_CREDENTIALS.contains(&name.as_str()));
            if !skipped {
                headers.insert(name.clone(), value.clone());
            }
        }
        if let Ok(id) = HeaderValue::from_str(self.request_id) {
            headers.entry("x-request-id").or_insert(id);
        }
        if self.decompress {
            headers
                .entry(header::ACCEPT_ENCODING)
                .or_insert(HeaderValue::from_static(decompress::ACCEPT_ENCODING));
        }
        let sent = self.clients.send(hop, headers, body);
        tokio::time::timeout_at(deadline, sent)
            .await
            .unwrap_or(Err(ProxyError::Timeout))
    }

    /// The credential as its type goes into a request: a bearer token for OAuth 2.0 and client
    /// credentials, HTTP Basic for a login, an OAuth 1.0a signature of the hop's method, URL
    /// and (when the hop sends it) form body; an API key goes where the template's headers or
    /// query put it.
    fn credential_headers(&self, hop: &Hop) -> Result<HeaderMap, ProxyError> {
        let mut headers = HeaderMap::new();
        let authorization = match self.credentials {
            Credentials::OAuth2 { access_token, .. } => Some(format!("Bearer {access_token}")),
            Credentials::OAuth2Cc { token, .. } => Some(format!("Bearer {token}")),
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                STANDARD.encode(format!("{username}:{password}"))
            )),
            Credentials::ApiKey { .. } => None,
            Credentials::OAuth1 {
                oauth_token,
                oauth_token_secret,
                ..
            } => {
                let signer = self
                    .oauth1
                    .ok_or(ProxyError::UnsupportedAuthMode("OAUTH1"))?;
                let request = workers::oauth1::Oauth1Request {
                    url: hop.url.as_str(),
                    consumer_key: &signer.consumer_key,
                    consumer_secret: &signer.consumer_secret,
                    token: Some((oauth_token, oauth_token_secret)),
                    signature_method: signer.method,
                    oauth_params: Vec::new(),
                    body_params: match hop.with_body {
                        true => self.form.to_vec(),
                        false => Vec::new(),
                    },
                };
                Some(
                    workers::oauth1::resource_authorization(hop.method.as_str(), &request)
                        .map_err(|e| ProxyError::InvalidUrl(e.to_string()))?,
                )
            }
        };
        if let Some(value) = authorization {
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| ProxyError::UnusableCredential("Authorization"))?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(headers)
    }
}

/// The provider's answer as the caller gets it: its status, the useful headers, the body
/// streamed — decoded when the caller asked (`Decompress: true`) and the coding is one
/// [`decompress`] knows, else as it came.
pub fn passthrough(
    response: Response<Body>,
    decompress: bool,
    watch: BreakWatch,
) -> Response<Body> {
    let status = response.status();
    let coding = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(Coding::of)
        .filter(|_| decompress);
    let mut headers = HeaderMap::new();
    // A refusal comes with what says why (`www-authenticate`, a scope header, the provider's
    // own error id): those pass too, but never what would speak for Grantline's origin
    // (CORS, cookies, security policies: only `x-` headers and `www-authenticate`), nor a
    // header the provider's `Connection` names as its own hop's.
    let refused = !status.is_success();
    let hop_only = response.headers().get_all(header::CONNECTION);
    for (name, value) in response.headers() {
        let decoded = coding.is_some()
            && (name == header::CONTENT_ENCODING || name == header::CONTENT_LENGTH);
        let name_text = name.as_str();
        let passed = PASSED_BACK.contains(&name_text)
            || rate_limit(name_text)
            || (refused
                && ((name_text.starts_with("x-") && !for_the_front_server(name_text))
                    || name == header::WWW_AUTHENTICATE));
        if passed && !decoded && !named_in(&hop_only, name_text) {
            headers.append(name.clone(), value.clone());
        }
    }
    let body = response.into_body();
    let body = match coding {
        Some(coding) => Body::from_stream(decompress::decode(coding, body.into_data_stream())),
        // As it came rather than as a stream of chunks: its length goes with it, so the answer
        // is sent with the provider's `content-length` and ends with its last byte.
        None => body,
    };
    let mut answer = Response::new(Body::new(OnEnd::new(body, move |error| {
        if let Some(error) = error {
            watch.broke_off(error);
        }
    })));
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    answer
}

/// Whom to tell when a provider's answer breaks off mid-body: the integration's counters.
pub struct BreakWatch {
    pub stats: Arc<ProxyStats>,
    pub provider_config_key: String,
}

impl BreakWatch {
    /// The provider broke its answer off mid-body (the caller's answer breaks off too: the
    /// connection closes before the announced end).
    fn broke_off(self, error: &axum::Error) {
        self.stats.broke_off(&self.provider_config_key);
        tracing::warn!(
            provider_config_key = %self.provider_config_key,
            error.message = %error,
            "proxy: the provider's answer broke off mid-body"
        );
    }
}

/// How long the provider asks to wait: `Retry-After` (seconds or an HTTP date) and the
/// template's rate-limit headers (`retry.after`: seconds; `retry.at`: a Unix time in seconds or
/// milliseconds, or a date); the longest wins.
pub fn retry_after(headers: &HeaderMap, template: &Template) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let until = |at: chrono::DateTime<chrono::Utc>| (at - chrono::Utc::now()).to_std().ok();
    // A provider's number can be anything a float parses: infinity and values past what a
    // `Duration` holds wait forever (i.e. past any deadline), NaN and negatives not at all.
    let seconds = |value: &str| {
        value
            .parse::<f64>()
            .ok()
            .filter(|s| *s >= 0.0)
            .map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
    };
    let date = |value: &str| {
        chrono::DateTime::parse_from_rfc2822(value)
            .ok()
            .and_then(|at| until(at.with_timezone(&chrono::Utc)))
    };
    let epoch = |value: &str| {
        let number = value.parse::<f64>().ok()?;
        // Milliseconds when it could not be seconds (past the year 33658).
        let seconds = if number > 1e12 {
            number / 1000.0
        } else {
            number
        };
        until(chrono::DateTime::from_timestamp_millis(
            (seconds * 1000.0) as i64,
        )?)
    };
    let standard = text("retry-after").and_then(|v| seconds(v).or_else(|| date(v)));
    let after = template
        .proxy
        .retry_after
        .iter()
        .filter_map(|name| text(name).and_then(seconds));
    let at = template
        .proxy
        .retry_at
        .iter()
        .filter_map(|name| text(name).and_then(|v| epoch(v).or_else(|| date(v))));
    standard.into_iter().chain(after).chain(at).max()
}

/// Waits before attempt `attempt` (from 1): `asked` (the provider's `Retry-After`) or the
/// exponential backoff with jitter. A wait that would pass `deadline` gives up at once.
pub async fn wait(
    asked: Option<Duration>,
    attempt: u32,
    deadline: tokio::time::Instant,
) -> Result<(), ProxyError> {
    let wait = asked.unwrap_or_else(|| {
        let base = BACKOFF_BASE
            .saturating_mul(1 << attempt.saturating_sub(1).min(10))
            .min(BACKOFF_CAP);
        // Full jitter over the upper half, so that callers that failed together spread out.
        base / 2 + base.mul_f64(fastrand::f64() / 2.0)
    });
    let until = match tokio::time::Instant::now().checked_add(wait) {
        Some(until) if until < deadline => until,
        _ => return Err(ProxyError::Timeout),
    };
    tokio::time::sleep_until(until).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let template = Template {
            proxy: domain::catalog::Proxy {
                retry_after: vec!["x-wait".into()],
                retry_at: vec!["x-reset".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(
            retry_after(&headers, &template),
            Some(Duration::from_secs(3))
        );
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers, &template), None, "a date in the past");
        headers.insert("x-wait", HeaderValue::from_static("7"));
        assert_eq!(
            retry_after(&headers, &template),
            Some(Duration::from_secs(7))
        );
        let in_a_minute = (chrono::Utc::now().timestamp() + 60).to_string();
        headers.insert(
            "x-reset",
            HeaderValue::from_str(&in_a_minute).expect("text"),
        );
        let wait = retry_after(&headers, &template).expect("a wait");
        assert!(wait > Duration::from_secs(50), "the longest wins: {wait:?}");
        for endless in ["inf", "1e30", "18446744073709551616"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(endless));
            assert_eq!(
                retry_after(&headers, &template),
                Some(Duration::MAX),
                "{endless}"
            );
        }
        for nothing in ["NaN", "-1", "-inf"] {
            let mut headers = HeaderMap::new();
            headers.insert("x-wait", HeaderValue::from_static(nothing));
            assert_eq!(retry_after(&headers, &template), None, "{nothing}");
        }
        let millis = ((chrono::Utc::now().timestamp() + 20) * 1000).to_string();
        headers.insert("x-reset", HeaderValue::from_str(&millis).expect("text"));
        let wait = retry_after(&headers, &template).expect("a wait");
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn a_wait_too_long_to_add_gives_up_instead_of_panicking() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for asked in [
            Duration::MAX,
            Duration::from_secs(10_000_000_000_000_000_000),
        ] {
            assert!(matches!(
                wait(Some(asked), 1, deadline).await,
                Err(ProxyError::Timeout)
            ));
        }
    }
}
