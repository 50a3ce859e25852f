//! What the router applies to every request before its handler:
//! - in open mode (no secret key) only a loopback `Host` is served: a web page on another site
//!   that rebinds its own name to 127.0.0.1 (DNS rebinding) gets `421`, not the open API;
//! - a request that announces a body larger than the server takes is refused at once with
//!   `413`, before a byte of it is read; one that does not announce its length is cut at the
//!   limit (`413` from the handler that reads it);
//! - a request that takes longer than `GRANTLINE_REQUEST_TIMEOUT` (a body trickled in, a handler
//!   stuck) is answered `408`;
//! - a request with more than one `Content-Type` gets `400 invalid_content_type`;
//! - every answer says `Cache-Control: no-store`: many carry a token or a secret, and none is
//!   worth keeping in a cache.
//!
//! The refusals are counted for `/metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use axum::response::{IntoResponse, Response};
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::{ApiError, BODY_LIMIT};
use crate::server::Limit;
use crate::state::AppState;

/// Applies the request limits to every route. A hand-written layer rather than a
/// `middleware::from_fn`: the hot path pays for no boxed future.
#[derive(Clone)]
pub struct LimitLayer {
    state: AppState,
}

impl LimitLayer {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            state: self.state.clone(),
        }
    }
}

/// One route under the limits.
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Limited<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = LimitedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match admit(&self.state, request) {
            Err(refused) => LimitedFuture::Refused {
                response: Some(refused.into_response()),
            },
            Ok(request) => LimitedFuture::Running {
                inner: self.inner.call(request),
                timer: None,
                state: self.state.clone(),
            },
        }
    }
}

/// The request, with a body that stops at the route's limit, or why it is refused before its
/// handler runs (counted).
fn admit(state: &AppState, request: Request) -> Result<Request, ApiError> {
    let refused = &state.server_stats.refused;
    if state.config.secret_key.is_none() && !loopback_host(&request) {
        refused.add(Limit::Host);
        return Err(ApiError::NotLoopbackHost);
    }
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // The proxy streams bodies to the provider and takes larger ones (counted as they pass).
    let proxied = request.uri().path().starts_with("/proxy/");
    let limit = if proxied {
        crate::proxy::MAX_BODY
    } else {
        BODY_LIMIT as u64
    };
    // Queries are decoded with U+FFFD in place of bytes that are not UTF-8, so `%ff` and `%fe`
    // would name the same key. A query the proxy passes on is the provider's business, and the
    // OAuth flow's pages answer the browser with their own error page (an unknown `state`).
    let flow = request.uri().path().starts_with("/oauth/");
    if !proxied && !flow && request.uri().query().is_some_and(not_utf8) {
        return Err(ApiError::InvalidQuery(
            "the query string is not UTF-8 once percent-decoded".into(),
        ));
    }
    // A single-valued field given twice: the handler (and a provider behind the proxy) could
    // each read the body as a different type.
    if request
        .headers()
        .get_all(CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::DuplicateContentType);
    }
    if announced.is_some_and(|length| length > limit) {
        refused.add(Limit::BodyTooLarge);
        return Err(ApiError::PayloadTooLarge);
    }
    if proxied || request.body().is_end_stream() {
        return Ok(request);
    }
    // A body sent without its length (chunked) stops at the limit too: the extractors that
    // read it whole then answer 413, as for axum's own `DefaultBodyLimit`, which this replaces
    // because its request extension cost every request, bodiless ones too, a map insert.
    Ok(request.map(|body| Body::new(http_body_util::Limited::new(body, BODY_LIMIT))))
}

/// Whether `query`, percent-decoded, is not UTF-8.
fn not_utf8(query: &str) -> bool {
    query.contains('%')
        && percent_encoding::percent_decode_str(query)
            .decode_utf8()
            .is_err()
}

pin_project_lite::pin_project! {
    /// The answer of a [`Limited`] route.
    #[project = Projected]
    pub enum LimitedFuture<F> {
        Refused { response: Option<Response> },
        Running {
            #[pin]
            inner: F,
            // Most answers (a cached token) are ready at the first poll: the timer, which costs
            // a registration in the runtime's timer wheel, is only armed for those that are not.
            timer: Option<Pin<Box<Sleep>>>,
            state: AppState,
        },
    }
}

impl<F> Future for LimitedFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = match self.project() {
            Projected::Refused { response } => response
                .take()
                .unwrap_or_else(|| ApiError::RequestTimeout.into_response()),
            Projected::Running {
                inner,
                timer,
                state,
            } => match inner.poll(cx) {
                Poll::Ready(Ok(response)) => response,
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => {
                    let limit: Duration = state.config.limits.request_timeout;
                    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    state.server_stats.refused.add(Limit::RequestTimeout);
                    ApiError::RequestTimeout.into_response()
                }
            },
        };
        // Every answer says `Cache-Control: no-store`.
        response
            .headers_mut()
            .entry(CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        Poll::Ready(Ok(response))
    }
}

/// Whether the request names a loopback host: `localhost` (or a name under it), or a loopback
/// address, with any port.
fn loopback_host(request: &Request) -> bool {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().host());
    let Some(host) = host else {
        return false;
    };
    // `[::1]:3003`, `127.0.0.1:3003`, `localhost:3003`, or any of them without a port.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').as_bytes();
    let under_localhost = name
        .len()
        .checked_sub(".localhost".len())
        .is_some_and(|start| name[start..].eq_ignore_ascii_case(b".localhost"));
    // The usual loopback names first: parsing an address costs more than the rest together.
    name == b"127.0.0.1"
        || name.eq_ignore_ascii_case(b"localhost")
        || under_localhost
        || std::str::from_utf8(name)
            .ok()
            .and_then(|name| name.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_utf8_when_its_escapes_decode_to_utf8() {
        for query in ["", "a=b", "search=%E2%82%AC", "a=%41+b", "a=100%"] {
            assert!(!not_utf8(query), "{query}");
        }
        for query in ["search=%ff", "a=%C3", "a=%e2%82"] {
            assert!(not_utf8(query), "{query}");
        }
    }

    #[test]
    fn only_loopback_names_and_addresses_are_loopback_hosts() {
        let with_host = |host: &str| {
            Request::builder()
                .uri("/health")
                .header(HOST, host)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        for host in [
            "localhost",
            "LOCALHOST:3003",
            "app.localhost",
            "127.0.0.1",
            "127.0.0.1:3003",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:3003",
            "localhost.",
        ] {
            assert!(loopback_host(&with_host(host)), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:3003",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]:3003",
            "0.0.0.0",
            "",
        ] {
            assert!(!loopback_host(&with_host(host)), "{host}");
        }
        let without = Request::builder()
            .uri("/health")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(!loopback_host(&without));
    }
}
