//! What the router applies to every request before its handler:
//! - in open mode (no secret key) only a loopback `Host` is served: a web page on another site
//!   that rebinds its own name to 127.0.0.1 (DNS rebinding) gets `421`, not the open API;
//! - a request that announces a body larger than the server takes is refused at once with
//!   `413`, before a byte of it is read;
//! - a request that takes longer than `GRANTLINE_REQUEST_TIMEOUT` (a body trickled in, a handler
//!   stuck) is answered `408`;
//! - every answer says `Cache-Control: no-store`: many carry a token or a secret, and none is
//!   worth keeping in a cache.
//!
//! The refusals are counted for `/metrics`.

use std::future::Future;
use std::task::Poll;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, HOST};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, BODY_LIMIT};
use crate::server::Limit;
use crate::state::AppState;

/// Applies the request limits around `next`.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let mut response = limited(&state, request, next).await;
    response
        .headers_mut()
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn limited(state: &AppState, request: Request, next: Next) -> Response {
    let refused = &state.server_stats.refused;
    if state.config.secret_key.is_none() && !loopback_host(&request) {
        refused.add(Limit::Host);
        return ApiError::NotLoopbackHost.into_response();
    }
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // The proxy streams bodies to the provider and takes larger ones.
    let limit = if request.uri().path().starts_with("/proxy/") {
        crate::proxy::MAX_BODY
    } else {
        BODY_LIMIT as u64
    };
    if announced.is_some_and(|length| length > limit) {
        refused.add(Limit::BodyTooLarge);
        return ApiError::PayloadTooLarge.into_response();
    }
    // Most answers (a cached token) are ready at the first poll: the timer, which costs a
    // registration in the runtime's timer wheel, is only armed for those that are not.
    let mut running = std::pin::pin!(next.run(request));
    if let Poll::Ready(response) =
        std::future::poll_fn(|cx| Poll::Ready(running.as_mut().poll(cx))).await
    {
        return response;
    }
    match tokio::time::timeout(state.config.limits.request_timeout, running).await {
        Ok(response) => response,
        Err(_) => {
            refused.add(Limit::RequestTimeout);
            ApiError::RequestTimeout.into_response()
        }
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
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
