//! Cross-origin requests from browser pages (`@nangohq/frontend` on the app's own site, a
//! Connect UI served elsewhere): tower-http's CORS answers the preflights and marks the answers
//! a page of an allowed origin may read (`GRANTLINE_BROWSER_ORIGINS`).
//!
//! Only requests that carry `Origin` go through it: servers calling the API send none, and
//! the CORS headers (and their `Vary`) would cost every cached read an allocation. No origin
//! is ever allowed credentials (cookies): the dashboard's session cookie stays its own.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::header::{ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
use axum::http::{HeaderValue, Method};
use axum::response::Response;
use futures_util::future::Either;
use tower::{Layer, Service};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, Cors};

use crate::config::BrowserOrigins;

/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Adds CORS to a route, for the requests of browser pages.
#[derive(Clone)]
pub struct CorsLayer(Arc<tower_http::cors::CorsLayer>);

impl CorsLayer {
    pub fn new(origins: &BrowserOrigins) -> Self {
        let allow_origin = match origins {
            BrowserOrigins::Any => AllowOrigin::any(),
            BrowserOrigins::Listed(origins) => AllowOrigin::list(
                origins
                    .iter()
                    .filter_map(|origin| HeaderValue::from_str(origin).ok()),
            ),
            BrowserOrigins::Loopback => {
                let origins = origins.clone();
                AllowOrigin::predicate(move |origin, _| {
                    origin.to_str().is_ok_and(|origin| origins.allow(origin))
                })
            }
        };
        Self(Arc::new(
            tower_http::cors::CorsLayer::new()
                .allow_origin(allow_origin)
                // What the page asks for: the routes themselves decide what they take.
                .allow_methods(AllowMethods::mirror_request())
                .allow_headers(AllowHeaders::mirror_request())
                .max_age(PREFLIGHT_MAX_AGE),
        ))
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = WithCors<S>;

    fn layer(&self, inner: S) -> WithCors<S> {
        WithCors {
            cors: self.0.clone(),
            inner,
        }
    }
}

/// A route with CORS for requests that carry `Origin`. The route is cloned for each request
/// (axum's boxed routes are), so the CORS rules are shared, and tower-http's service, whose
/// rules it would copy, is only made for a page's request.
#[derive(Clone)]
pub struct WithCors<S> {
    cors: Arc<tower_http::cors::CorsLayer>,
    inner: S,
}

impl<S> Service<Request> for WithCors<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<<Cors<S> as Service<Request>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let headers = request.headers();
        // A preflight is an OPTIONS request with the method it asks about; any other OPTIONS
        // request is the route's (the proxy passes them on).
        let from_a_page = headers.contains_key(ORIGIN)
            && (request.method() != Method::OPTIONS
                || headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD));
        if from_a_page {
            // The service made ready above goes into tower-http's, a clone stays here.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            Either::Left(self.cors.layer(ready).call(request))
        } else {
            Either::Right(self.inner.call(request))
        }
    }
}
