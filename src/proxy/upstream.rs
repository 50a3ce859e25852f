//! One request to the provider: where it goes (base URL, endpoint, template query), what it
//! carries (the credential — an OAuth 1.0a signature over the method, URL and query for OAuth 1
//! connections — the template's headers, the caller's `Nango-Proxy-*` headers, a request id)
//! and what of the answer goes back.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use domain::catalog::{self, Template};
use domain::credentials::Credentials;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use url::Url;

use super::{MAX_BODY, ProxyError};
use crate::config::ProxyConfig;

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
}

impl Target {
    /// The upstream URL: `Base-Url-Override` (allowed hosts only) or the template's
    /// `proxy.base_url` filled from the connection config, then the endpoint. A host other than
    /// the template's own must not resolve to a loopback, private or link-local address.
    pub async fn new(
        config: &ProxyConfig,
        template: &Template,
        connection_config: &Map<String, Value>,
        base_url_override: Option<&str>,
        endpoint: &str,
    ) -> Result<Self, ProxyError> {
        let values = catalog::config_values(connection_config);
        let (base, checked) = match base_url_override {
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
                // A filled placeholder may name any host: check where it resolves.
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
        if checked {
            check_destination(&url).await?;
        }
        Ok(Self { url })
    }
}

/// Refuses a URL whose host resolves to an address inside this network.
async fn check_destination(url: &Url) -> Result<(), ProxyError> {
    let host = url.host_str().unwrap_or_default().to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|_| ProxyError::Unreachable)?
            .map(|a| a.ip())
            .collect(),
    };
    if addresses.iter().any(|ip| internal(*ip)) {
        return Err(ProxyError::BlockedDestination(host));
    }
    Ok(())
}

/// Loopback, private, link-local (cloud metadata), shared, unspecified or multicast.
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
            }
        },
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
    pub client: &'a reqwest::Client,
    pub target: &'a Target,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub credentials: &'a Credentials,
    pub template: &'a Template,
    pub connection_config: &'a Map<String, Value>,
    pub request_id: &'a str,
}

impl Attempt<'_> {
    /// Sends the request with `body`, and waits for the answer's head until `deadline`.
    pub async fn send(
        &self,
        body: RequestBody,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::Response, ProxyError> {
        let values = catalog::placeholder_values(self.credentials, self.connection_config);
        let mut url = self.target.url.clone();
        let query: Vec<(String, String)> = self
            .template
            .proxy
            .query
            .iter()
            // An entry whose placeholder has no value is left out.
            .filter_map(|(name, text)| {
                catalog::fill_with(text, |p| values.get(p).map(String::as_str))
                    .ok()
                    .map(|v| (name.clone(), v))
            })
            .collect();
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut headers = self.credential_headers(&url)?;
        for (name, text) in &self.template.proxy.headers {
            if let (Ok(value), Ok(name)) = (
                catalog::fill_with(text, |p| values.get(p).map(String::as_str)),
                HeaderName::from_bytes(name.as_bytes()),
            ) && let Ok(value) = HeaderValue::from_str(&value)
            {
                headers.insert(name, value);
            }
        }
        for (name, value) in self.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && name != header::CONTENT_LENGTH {
                headers.insert(name.clone(), value.clone());
            }
        }
        if let Ok(id) = HeaderValue::from_str(self.request_id) {
            headers.entry("x-request-id").or_insert(id);
        }
        let body = match body {
            RequestBody::Kept(bytes) => reqwest::Body::from(bytes),
            RequestBody::Streamed(body) => {
                let mut sent = 0u64;
                reqwest::Body::wrap_stream(body.into_data_stream().map(move |chunk| {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    sent += chunk.len() as u64;
                    if sent > MAX_BODY {
                        return Err(std::io::Error::other("the request body is too large"));
                    }
                    Ok(chunk)
                }))
            }
        };
        let request = self
            .client
            .request(self.method.clone(), url)
            .headers(headers)
            .body(body);
        match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => Err(ProxyError::Timeout),
            Ok(Err(e)) if e.is_timeout() => Err(ProxyError::Timeout),
            Ok(Err(_)) => Err(ProxyError::Unreachable),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The credential as its type goes into a request: a bearer token for OAuth 2.0 and client
    /// credentials, HTTP Basic for a login; an API key goes where the template's headers or
    /// query put it.
    fn credential_headers(&self, url: &Url) -> Result<HeaderMap, ProxyError> {
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
                    url: url.as_str(),
                    consumer_key: &signer.consumer_key,
                    consumer_secret: &signer.consumer_secret,
                    token: Some((oauth_token, oauth_token_secret)),
                    signature_method: signer.method,
                    oauth_params: Vec::new(),
                    body_params: Vec::new(),
                };
                Some(
                    workers::oauth1::resource_authorization(self.method.as_str(), &request)
                        .map_err(|e| ProxyError::InvalidUrl(e.to_string()))?,
                )
            }
        };
        if let Some(value) = authorization {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ProxyError::InvalidUrl("the credential is not a header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(headers)
    }
}

/// The provider's answer as the caller gets it: its status, the useful headers, the body
/// streamed.
pub fn passthrough(response: reqwest::Response) -> Response<Body> {
    let status = response.status();
    let mut headers = HeaderMap::new();
    for (name, value) in response.headers() {
        if PASSED_BACK.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut answer = Response::new(Body::from_stream(response.bytes_stream()));
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    answer
}

/// How long the provider asks to wait: `Retry-After` (seconds or an HTTP date) and the
/// template's rate-limit headers (`retry.after`: seconds; `retry.at`: a Unix time in seconds or
/// milliseconds, or a date); the longest wins.
pub fn retry_after(headers: &reqwest::header::HeaderMap, template: &Template) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let until = |at: chrono::DateTime<chrono::Utc>| (at - chrono::Utc::now()).to_std().ok();
    let seconds = |value: &str| {
        value
            .parse::<f64>()
            .ok()
            .filter(|s| *s >= 0.0)
            .map(Duration::from_secs_f64)
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
    let until = tokio::time::Instant::now() + wait;
    if until >= deadline {
        return Err(ProxyError::Timeout);
    }
    tokio::time::sleep_until(until).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognized() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(!internal(ip.parse().expect("ip")), "{ip}");
        }
    }

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
        let mut headers = reqwest::header::HeaderMap::new();
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
        let millis = ((chrono::Utc::now().timestamp() + 20) * 1000).to_string();
        headers.insert("x-reset", HeaderValue::from_str(&millis).expect("text"));
        let wait = retry_after(&headers, &template).expect("a wait");
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }
}
