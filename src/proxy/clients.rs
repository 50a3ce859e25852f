//! The proxy's HTTP clients, and how one hop's request goes out on them.
//!
//! - **direct**: a template's own hosts when no egress proxy covers the scheme. hyper's pooled
//!   client over rustls, without reqwest's layers on top: those cost a proxied call about a
//!   fifth of its CPU (`cargo bench --bench proxy`, the bare reqwest and hyper-util proxies
//!   side by side), most of it parsing the URL three more times per call.
//! - **trusted**: a template's own hosts through the egress proxy the environment names
//!   (reqwest reads `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY`).
//! - **guarded**: hosts the caller chose (an override, a filled placeholder), whose resolver
//!   refuses addresses inside this network ([`guard`]).
//!
//! All three trust the same certificates: one rustls configuration with the platform's
//! verifier (the system's roots; `SSL_CERT_FILE` and `SSL_CERT_DIR` on Linux). None follows
//! redirects (the proxy does, [`super::redirect`]); bodies stream; a dead host fails fast.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{ACCEPT, USER_AGENT};
use axum::http::{HeaderMap, HeaderValue, Request, Response, Uri};
use futures_util::StreamExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::redirect::Hop;
use super::upstream::RequestBody;
use super::{MAX_BODY, ProxyError, guard};

const AGENT: &str = concat!("grantline/", env!("CARGO_PKG_VERSION"));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive on provider connections, as reqwest sets it.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// The proxy's HTTP clients. Cheap to clone (shared pools).
#[derive(Clone)]
pub struct Clients {
    direct: Client<HttpsConnector<HttpConnector>, Body>,
    trusted: reqwest::Client,
    guarded: reqwest::Client,
    /// The egress proxy the environment names: a guarded host that goes through it is resolved
    /// and checked before the call ([`guard::check_resolved`]).
    egress: guard::Egress,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish_non_exhaustive()
    }
}

/// Why the clients could not be built (the platform's certificates, say).
#[derive(Debug, thiserror::Error)]
#[error("the proxy's HTTP clients: {0}")]
pub struct ClientsError(String);

impl Clients {
    /// Builds the clients, with the egress proxy the environment names, if any.
    pub fn new() -> Result<Self, ClientsError> {
        Self::build(guard::Egress::from_env(), None)
    }

    /// The clients; `through` sets the reqwest clients' egress proxy explicitly (tests), else
    /// reqwest reads the environment as `egress` does.
    pub(super) fn build(
        egress: guard::Egress,
        through: Option<reqwest::Proxy>,
    ) -> Result<Self, ClientsError> {
        let tls = tls_config().map_err(|e| ClientsError(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let direct = Client::builder(TokioExecutor::new()).build(https);
        let builder = || {
            let builder = reqwest::Client::builder()
                .tls_backend_preconfigured(tls.clone())
                .connect_timeout(CONNECT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                // The proxy retries as the caller asks; reqwest's own layer would only copy
                // every request in case.
                .retry(reqwest::retry::never())
                .user_agent(AGENT);
            match through.clone() {
                Some(proxy) => builder.proxy(proxy),
                None => builder,
            }
        };
        let built = |builder: reqwest::ClientBuilder| {
            builder.build().map_err(|e| ClientsError(e.to_string()))
        };
        Ok(Self {
            direct,
            trusted: built(builder())?,
            guarded: built(builder().dns_resolver(Arc::new(guard::GuardedResolver::system())))?,
            egress,
        })
    }

    /// Sends one hop's request with `headers` and `body` on the client the hop needs, and
    /// returns the answer's head with its body streaming.
    pub(super) async fn send(
        &self,
        hop: &Hop,
        headers: HeaderMap,
        body: Option<RequestBody>,
    ) -> Result<Response<Body>, ProxyError> {
        if !hop.guarded && !self.egress.covers(&hop.url) {
            return self.send_direct(hop, headers, body).await;
        }
        self.check(hop).await?;
        let client = match hop.guarded {
            true => &self.guarded,
            false => &self.trusted,
        };
        let mut request = client
            .request(hop.method.clone(), hop.url.clone())
            .headers(headers);
        if let Some(body) = body {
            request = request.body(match body {
                RequestBody::Kept(bytes) => reqwest::Body::from(bytes),
                RequestBody::Streamed(body) => reqwest::Body::wrap_stream(limited(body)),
            });
        }
        let response = request.send().await.map_err(|e| {
            guard::blocked(&e).unwrap_or(if e.is_timeout() {
                ProxyError::Timeout
            } else {
                ProxyError::Unreachable
            })
        })?;
        Ok(Response::from(response).map(Body::new))
    }

    /// A hop to a template's own host, straight on hyper's client. The headers reqwest would
    /// add are added when the caller did not set them.
    async fn send_direct(
        &self,
        hop: &Hop,
        mut headers: HeaderMap,
        body: Option<RequestBody>,
    ) -> Result<Response<Body>, ProxyError> {
        let uri: Uri = hop
            .url
            .as_str()
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| ProxyError::InvalidUrl(e.to_string()))?;
        headers
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(AGENT));
        headers
            .entry(ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        let mut request = Request::new(match body {
            None => Body::empty(),
            Some(RequestBody::Kept(bytes)) => Body::from(bytes),
            Some(RequestBody::Streamed(body)) => Body::from_stream(limited(body)),
        });
        *request.method_mut() = hop.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = self
            .direct
            .request(request)
            .await
            .map_err(|_| ProxyError::Unreachable)?;
        Ok(response.map(Body::new))
    }

    /// Checks a guarded hop's host before the call when an egress proxy will connect it (the
    /// guarded client's resolver checks every other connection as it is made).
    async fn check(&self, hop: &Hop) -> Result<(), ProxyError> {
        if hop.guarded && self.egress.covers(&hop.url) {
            guard::check_resolved(&hop.url).await?;
        }
        Ok(())
    }
}

/// A streamed request body that fails once it passes [`MAX_BODY`].
fn limited(
    body: Body,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let mut sent = 0u64;
    body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        sent += chunk.len() as u64;
        if sent > MAX_BODY {
            return Err(std::io::Error::other("the request body is too large"));
        }
        Ok(chunk)
    })
}

/// The one TLS configuration of the proxy's clients: aws-lc-rs (the provider reqwest brings)
/// and the platform's verifier. No ALPN protocols: hyper-rustls names HTTP/1.1 in its copy,
/// and the reqwest clients speak only HTTP/1.1, which a server assumes without ALPN.
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::Method;
    use url::Url;

    use super::*;

    /// An egress proxy that counts the connections made to it and answers each request 200.
    async fn egress_proxy() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buffer = [0u8; 4096];
                    let _ = socket.read(&mut buffer).await;
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        (format!("http://{address}"), accepted)
    }

    fn hop(url: &str, guarded: bool) -> Hop {
        Hop {
            url: Url::parse(url).expect("url"),
            method: Method::GET,
            guarded,
            credentials: true,
            with_body: false,
        }
    }

    #[tokio::test]
    async fn a_guarded_host_is_checked_before_an_egress_proxy_connects_it() {
        let (proxy, accepted) = egress_proxy().await;
        let everything = guard::Egress {
            http: true,
            https: true,
        };
        let through = || Some(reqwest::Proxy::all(&proxy).expect("proxy"));
        let clients = Clients::build(everything, through()).expect("clients");
        // Through the proxy the resolver is never asked: the guarded client alone would call a
        // name that resolves to loopback.
        let inside = hop("http://localhost:9/latest/meta-data", true);
        let bypass = clients
            .guarded
            .get(inside.url.clone())
            .send()
            .await
            .expect("the proxy answers");
        assert!(bypass.status().is_success());
        assert_eq!(accepted.swap(0, Ordering::SeqCst), 1);
        // So the hop's host is resolved here first, and refused.
        assert!(matches!(
            clients.check(&inside).await,
            Err(ProxyError::BlockedDestination(host)) if host == "localhost"
        ));
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        // A template's own host is trusted, and a proxy that covers only https leaves http
        // calls to the resolver.
        assert!(
            clients
                .check(&hop("http://localhost:9/", false))
                .await
                .is_ok()
        );
        let https_only = guard::Egress {
            http: false,
            https: true,
        };
        let clients = Clients::build(https_only, through()).expect("clients");
        assert!(clients.check(&inside).await.is_ok());
        assert!(matches!(
            clients.check(&hop("https://localhost/", true)).await,
            Err(ProxyError::BlockedDestination(_))
        ));
    }

    #[tokio::test]
    async fn a_templates_own_host_goes_through_the_egress_proxy_that_covers_its_scheme() {
        let (proxy, accepted) = egress_proxy().await;
        let http_only = guard::Egress {
            http: true,
            https: false,
        };
        let through = Some(reqwest::Proxy::http(&proxy).expect("proxy"));
        let clients = Clients::build(http_only, through).expect("clients");
        // Nothing listens on port 9: only the egress proxy can have answered.
        let answer = clients
            .send(&hop("http://127.0.0.1:9/", false), HeaderMap::new(), None)
            .await
            .expect("the egress proxy answers");
        assert!(answer.status().is_success());
        assert_eq!(accepted.swap(0, Ordering::SeqCst), 1);
        // Without an egress proxy for the scheme the host is called directly.
        let clients = Clients::build(guard::Egress::default(), None).expect("clients");
        assert!(matches!(
            clients
                .send(&hop("http://127.0.0.1:9/", false), HeaderMap::new(), None)
                .await,
            Err(ProxyError::Unreachable)
        ));
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
    }
}
