//! Redirects, followed by the proxy itself (the HTTP clients follow none), so that each hop's
//! destination and headers are decided here:
//!
//! - At most [`MAX_REDIRECTS`] hops; the answer after that is passed back as it is.
//! - A hop on the call's own host is followed; a hop to another host only when that host is in
//!   `GRANTLINE_PROXY_ALLOWED_HOSTS`, and then as a host the caller chose (it must not resolve
//!   inside this network). Any other redirect is passed back to the caller (the 3xx and its
//!   `Location`).
//! - The credential (the `Authorization` the proxy puts in, the template's headers that carry a
//!   placeholder, the caller's own `Authorization` and `Cookie`) is sent again on a hop only
//!   when the caller asked (`Forward-Headers-On-Redirect: true`), only to the call's own host,
//!   and never from `https` down to `http`.
//! - 303, and 301/302 after a POST, become a GET without the body (as browsers do); 307 and 308
//!   send the same method and body again, which needs a body that was kept (else the 3xx is
//!   passed back).

use axum::http::{HeaderValue, Method, StatusCode};
use url::Url;

use crate::config::ProxyConfig;

/// The most redirects one attempt follows.
pub const MAX_REDIRECTS: usize = 5;

/// One request of an attempt: the first, or a redirect's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub url: Url,
    pub method: Method,
    /// Whether the host was chosen by the caller (an override, a placeholder, a redirect to
    /// another host): it is resolved through the guard.
    pub guarded: bool,
    /// Whether the credential goes with this request.
    pub credentials: bool,
    /// Whether the call's body goes with this request.
    pub with_body: bool,
}

/// What the caller asked of redirects, and what the call allows.
pub struct Policy<'a> {
    /// `Forward-Headers-On-Redirect`.
    pub forward_credentials: bool,
    /// Where the call first went (its host is the one credentials may follow to).
    pub origin: &'a Hop,
    /// Whether the body was kept, so that it can be sent again.
    pub body_kept: bool,
    pub config: &'a ProxyConfig,
}

/// The next hop after an answer `status` with `location` to `hop`, or `None` when the answer
/// goes back to the caller.
pub fn follow(
    status: StatusCode,
    location: Option<&HeaderValue>,
    hop: &Hop,
    policy: &Policy<'_>,
) -> Option<Hop> {
    let keeps_method = match status {
        StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => true,
        StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND => hop.method != Method::POST,
        StatusCode::SEE_OTHER => hop.method == Method::HEAD,
        _ => return None,
    };
    let mut url = hop.url.join(location?.to_str().ok()?).ok()?;
    url.set_fragment(None);
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let origin = &policy.origin.url;
    let same_host = url.host_str()? == origin.host_str()?;
    if !same_host && !policy.config.allows(url.host_str()?) {
        return None;
    }
    let with_body = keeps_method && hop.with_body;
    if with_body && !policy.body_kept {
        return None;
    }
    let downgraded = origin.scheme() == "https" && url.scheme() == "http";
    // Another port of the host is another service: the credential stays with the origin's (a
    // port is `None` when it is its scheme's default, so http → https on the host keeps it).
    let same_port = url.port() == origin.port();
    Some(Hop {
        method: if keeps_method {
            hop.method.clone()
        } else {
            Method::GET
        },
        guarded: !same_host || policy.origin.guarded,
        credentials: policy.forward_credentials && same_host && same_port && !downgraded,
        with_body,
        url,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn hop(url: &str, method: Method) -> Hop {
        Hop {
            url: Url::parse(url).expect("url"),
            method,
            guarded: false,
            credentials: true,
            with_body: true,
        }
    }

    fn config(allowed: &[&str]) -> ProxyConfig {
        ProxyConfig {
            allowed_hosts: allowed.iter().map(|h| (*h).to_owned()).collect(),
            timeout: Duration::from_secs(30),
        }
    }

    fn location(text: &'static str) -> HeaderValue {
        HeaderValue::from_static(text)
    }

    #[test]
    fn a_same_host_redirect_is_followed_without_the_credential_unless_asked() {
        let origin = hop("https://api.example.com/v1/a?x=1", Method::GET);
        let config = config(&[]);
        let mut policy = Policy {
            forward_credentials: false,
            origin: &origin,
            body_kept: true,
            config: &config,
        };
        let next = follow(
            StatusCode::FOUND,
            Some(&location("/v1/b#frag")),
            &origin,
            &policy,
        )
        .expect("followed");
        assert_eq!(next.url.as_str(), "https://api.example.com/v1/b");
        assert!(!next.credentials && !next.guarded);
        policy.forward_credentials = true;
        let next =
            follow(StatusCode::FOUND, Some(&location("b")), &origin, &policy).expect("followed");
        assert_eq!(next.url.as_str(), "https://api.example.com/v1/b");
        assert!(next.credentials);
        let down = follow(
            StatusCode::FOUND,
            Some(&location("http://api.example.com/v1/b")),
            &origin,
            &policy,
        )
        .expect("followed");
        assert!(!down.credentials, "never from https down to http");
        for (elsewhere, carries) in [
            ("https://api.example.com:8443/v1/b", false),
            ("https://api.example.com:443/v1/b", true),
        ] {
            let next = follow(
                StatusCode::FOUND,
                Some(&location(elsewhere)),
                &origin,
                &policy,
            )
            .expect("followed");
            assert_eq!(next.credentials, carries, "{elsewhere}");
        }
        let plain = hop("http://api.example.com/a", Method::GET);
        let policy = Policy {
            origin: &plain,
            ..policy
        };
        let up = follow(
            StatusCode::FOUND,
            Some(&location("https://api.example.com/a")),
            &plain,
            &policy,
        )
        .expect("followed");
        assert!(up.credentials, "http up to https on the same host keeps it");
    }

    #[test]
    fn another_host_is_followed_only_when_allowed_and_then_guarded_without_credentials() {
        let origin = hop("https://api.example.com/a", Method::GET);
        let closed = config(&[]);
        let open = config(&["files.example.net"]);
        let policy = |config| Policy {
            forward_credentials: true,
            origin: &origin,
            body_kept: true,
            config,
        };
        let target = location("https://files.example.net/blob/1");
        assert_eq!(
            follow(StatusCode::FOUND, Some(&target), &origin, &policy(&closed)),
            None
        );
        let next =
            follow(StatusCode::FOUND, Some(&target), &origin, &policy(&open)).expect("allowed");
        assert!(next.guarded && !next.credentials);
        for refused in [
            "ftp://api.example.com/x",
            "http://[::1",
            "https://evil.example/x",
        ] {
            assert_eq!(
                follow(
                    StatusCode::FOUND,
                    Some(&HeaderValue::from_str(refused).expect("value")),
                    &origin,
                    &policy(&open)
                ),
                None,
                "{refused}"
            );
        }
        assert_eq!(
            follow(StatusCode::FOUND, None, &origin, &policy(&open)),
            None
        );
        assert_eq!(
            follow(
                StatusCode::NOT_MODIFIED,
                Some(&location("/b")),
                &origin,
                &policy(&open)
            ),
            None
        );
    }

    #[test]
    fn the_method_and_body_follow_the_status() {
        let post = hop("https://api.example.com/a", Method::POST);
        let config = config(&[]);
        let mut policy = Policy {
            forward_credentials: false,
            origin: &post,
            body_kept: true,
            config: &config,
        };
        let to = location("/b");
        for (status, method, with_body) in [
            (StatusCode::MOVED_PERMANENTLY, Method::GET, false),
            (StatusCode::FOUND, Method::GET, false),
            (StatusCode::SEE_OTHER, Method::GET, false),
            (StatusCode::TEMPORARY_REDIRECT, Method::POST, true),
            (StatusCode::PERMANENT_REDIRECT, Method::POST, true),
        ] {
            let next = follow(status, Some(&to), &post, &policy).expect("followed");
            assert_eq!(
                (next.method, next.with_body),
                (method, with_body),
                "{status}"
            );
        }
        let put = hop("https://api.example.com/a", Method::PUT);
        let next = follow(StatusCode::FOUND, Some(&to), &put, &policy).expect("followed");
        assert_eq!(next.method, Method::PUT, "only a POST becomes a GET on 302");
        policy.body_kept = false;
        assert_eq!(
            follow(StatusCode::TEMPORARY_REDIRECT, Some(&to), &post, &policy),
            None,
            "a body streamed once cannot be sent again"
        );
        assert!(follow(StatusCode::SEE_OTHER, Some(&to), &post, &policy).is_some());
    }
}
