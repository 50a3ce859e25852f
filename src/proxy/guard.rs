//! Where a proxied call may connect: a host that the caller chose (a `Base-Url-Override`, a
//! filled `${connectionConfig.x}` placeholder, a redirect to another host) must not be inside
//! this network — loopback, private, link-local (cloud metadata), shared or unspecified.
//!
//! The check is made by the resolver that the connection itself uses ([`GuardedResolver`]): the
//! addresses checked are the addresses connected to, so a DNS server that answers a public
//! address to a first lookup and `127.0.0.1` to the next (DNS rebinding) gains nothing. An IP
//! literal is never resolved, so it is checked on its own ([`check_literal`]). A template's own
//! literal base URL is trusted and goes through the plain resolver (the tests' fake provider is
//! on loopback).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::ProxyError;

/// A name that resolved to an address inside this network (the name only: no address, so the
/// caller learns nothing of the inside).
#[derive(Debug, thiserror::Error)]
#[error("{0:?} resolves to a loopback, private or link-local address")]
pub struct Blocked(pub String);

/// Resolves names with the system resolver and refuses a name any of whose addresses is inside
/// this network.
#[derive(Clone)]
pub struct GuardedResolver {
    inner: Arc<dyn Resolve>,
}

impl GuardedResolver {
    /// The guard over the system resolver.
    pub fn system() -> Self {
        Self::over(Arc::new(SystemResolver))
    }

    /// The guard over another resolver (tests use one that answers as a rebinding DNS server).
    pub fn over(inner: Arc<dyn Resolve>) -> Self {
        Self { inner }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let resolving = self.inner.resolve(name);
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = resolving.await?.collect();
            if addresses.iter().any(|a| internal(a.ip())) {
                return Err(Box::new(Blocked(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// The system's resolver (`getaddrinfo`, on tokio's blocking threads), as reqwest's default.
struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// Whether the environment names an egress proxy (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`,
/// either case), per scheme, as reqwest reads it. Through such a proxy the connection is made
/// by the proxy, and [`GuardedResolver`] never sees the destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct Egress {
    pub http: bool,
    pub https: bool,
}

impl Egress {
    /// The proxies this process's environment names.
    pub fn from_env() -> Self {
        let set = |names: [&str; 2]| {
            names
                .iter()
                .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
        };
        let all = set(["ALL_PROXY", "all_proxy"]);
        Self {
            http: all || set(["HTTP_PROXY", "http_proxy"]),
            https: all || set(["HTTPS_PROXY", "https_proxy"]),
        }
    }

    /// Whether a request to `url` may go through the egress proxy (`NO_PROXY` aside: a host it
    /// exempts is connected to directly and checked by the resolver as well).
    pub fn covers(&self, url: &Url) -> bool {
        match url.scheme() {
            "http" => self.http,
            "https" => self.https,
            _ => false,
        }
    }
}

/// Resolves `url`'s host here and refuses it when any of its addresses is inside this network:
/// the check for a call that an egress proxy will connect. The proxy resolves the name again,
/// so a DNS server that rebinds between the two lookups is the egress proxy's to stop; a name
/// that cannot be resolved here is not called (as without a proxy).
pub async fn check_resolved(url: &Url) -> Result<(), ProxyError> {
    let host = match url.host() {
        Some(Host::Domain(host)) => host,
        _ => return check_literal(url),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let addresses = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| ProxyError::Unreachable)?;
    for address in addresses {
        if internal(address.ip()) {
            return Err(ProxyError::BlockedDestination(host.to_owned()));
        }
    }
    Ok(())
}

/// Refuses a URL whose host is an IP address inside this network (names are checked when they
/// are resolved, by [`GuardedResolver`]).
pub fn check_literal(url: &Url) -> Result<(), ProxyError> {
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(ProxyError::InvalidUrl("the URL has no host".into())),
    };
    if internal(ip) {
        return Err(ProxyError::BlockedDestination(
            url.host_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(())
}

/// The [`Blocked`] refusal somewhere in a failed request's causes, as the proxy's error.
pub fn blocked(error: &reqwest::Error) -> Option<ProxyError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(Blocked(host)) = e.downcast_ref::<Blocked>() {
            return Some(ProxyError::BlockedDestination(host.clone()));
        }
        cause = e.source();
    }
    None
}

/// Loopback, private, link-local (cloud metadata), shared, unspecified or multicast.
pub fn internal(ip: IpAddr) -> bool {
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
    fn ip_literals_inside_the_network_are_refused_without_a_lookup() {
        for url in [
            "http://127.0.0.1:8080/x",
            "http://127.1/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest",
        ] {
            let url = Url::parse(url).expect("url");
            assert!(
                matches!(check_literal(&url), Err(ProxyError::BlockedDestination(_))),
                "{url}"
            );
        }
        for url in ["https://93.184.216.34/x", "https://api.example.com/x"] {
            assert!(
                check_literal(&Url::parse(url).expect("url")).is_ok(),
                "{url}"
            );
        }
    }

    /// A DNS server that rebinds: a public address to the first lookup, loopback after.
    struct Rebinding {
        lookups: AtomicUsize,
        port: u16,
    }

    impl Resolve for Rebinding {
        fn resolve(&self, _: Name) -> Resolving {
            let first = self.lookups.fetch_add(1, Ordering::SeqCst) == 0;
            let ip: IpAddr = if first {
                [93, 184, 216, 34].into()
            } else {
                [127, 0, 0, 1].into()
            };
            let address = SocketAddr::new(ip, self.port);
            Box::pin(async move { Ok(Box::new(std::iter::once(address)) as Addrs) })
        }
    }

    #[tokio::test]
    async fn every_resolution_is_checked_so_a_rebinding_name_is_refused() {
        let resolver = GuardedResolver::over(Arc::new(Rebinding {
            lookups: AtomicUsize::new(0),
            port: 80,
        }));
        let first = resolver
            .resolve(Name::from_str("rebind.example").expect("name"))
            .await;
        assert!(first.is_ok(), "the public answer passes");
        let Err(second) = resolver
            .resolve(Name::from_str("rebind.example").expect("name"))
            .await
        else {
            panic!("the loopback answer must be refused");
        };
        assert!(second.downcast_ref::<Blocked>().is_some(), "{second}");
    }

    #[tokio::test]
    async fn a_guarded_client_never_connects_to_a_name_that_rebinds_to_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        // The first lookup (a check made before the call, as the proxy once did) is public; the
        // lookup made to connect answers loopback.
        let rebinding = Arc::new(Rebinding {
            lookups: AtomicUsize::new(0),
            port,
        });
        let checked = rebinding
            .resolve(Name::from_str("rebind.example").expect("name"))
            .await;
        assert!(checked.is_ok_and(|mut a| a.all(|a| !internal(a.ip()))));
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::over(rebinding)))
            .build()
            .expect("client");
        let error = client
            .get(format!("http://rebind.example:{port}/"))
            .send()
            .await
            .expect_err("refused");
        assert!(
            matches!(blocked(&error), Some(ProxyError::BlockedDestination(host)) if host == "rebind.example"),
            "{error:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "no connection was made");
        server.abort();
    }
}
