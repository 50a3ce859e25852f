//! API authentication (DESIGN §5): open without a secret key, else `Bearer <key>` or
//! `Basic base64(<key>:)`, compared in constant time.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Request};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq;
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use super::ApiError;
use crate::config::Secret;

/// The layer that lets through only requests presenting `secret`. Without a secret key the
/// router has no such layer: the API is open and any header is ignored (old clients always
/// send one), and the server listens on loopback only.
pub fn require(secret: &Secret) -> ValidateRequestHeaderLayer<SecretKey> {
    ValidateRequestHeaderLayer::custom(SecretKey(Arc::from(secret.expose().as_bytes())))
}

/// The configured secret key, checked against each request's `Authorization` header.
#[derive(Clone)]
pub struct SecretKey(Arc<[u8]>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl<B> ValidateRequest<B> for SecretKey {
    type ResponseBody = Body;

    fn validate(&mut self, request: &mut Request<B>) -> Result<(), Response> {
        self.check(request).map_err(IntoResponse::into_response)
    }
}

impl SecretKey {
    fn check<B>(&self, request: &Request<B>) -> Result<(), ApiError> {
        let presented = presented(request.headers())?;
        if is_secret(&presented, &self.0) {
            Ok(())
        } else {
            Err(ApiError::InvalidSecretKey)
        }
    }
}

/// The key (the secret key or a connect session's token) in a request's `Authorization`
/// header.
pub(super) fn presented(headers: &HeaderMap) -> Result<Cow<'_, str>, ApiError> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let header = all.next().ok_or(ApiError::MissingAuthHeader)?;
    // Two keys are ambiguous: a proxy in front may have checked the other one.
    if all.next().is_some() {
        return Err(ApiError::MalformedAuthHeader);
    }
    let value = header.to_str().map_err(|_| ApiError::MalformedAuthHeader)?;
    presented_key(value)
}

/// Whether `presented` is the secret key, compared in constant time.
pub(super) fn is_secret(presented: &str, secret: &[u8]) -> bool {
    bool::from(presented.as_bytes().ct_eq(secret))
}

/// The key in a `Bearer` or `Basic` header.
fn presented_key(value: &str) -> Result<Cow<'_, str>, ApiError> {
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(ApiError::MalformedAuthHeader)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Cow::Borrowed(rest));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64
            .decode(rest)
            .map_err(|_| ApiError::MalformedAuthHeader)?;
        let text = String::from_utf8(decoded).map_err(|_| ApiError::MalformedAuthHeader)?;
        // The key is the user name; the password is empty (or ignored). Split at the last
        // colon: a key may hold one, a password Nango's clients send is empty.
        let user = text
            .rsplit_once(':')
            .map_or(text.as_str(), |(user, _)| user);
        if !user.is_empty() {
            return Ok(Cow::Owned(user.to_owned()));
        }
    }
    Err(ApiError::MalformedAuthHeader)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn bearer_and_basic_headers_yield_the_key() {
        assert_eq!(presented_key("Bearer abc").ok().as_deref(), Some("abc"));
        let basic = format!("Basic {}", BASE64.encode("abc:"));
        assert_eq!(presented_key(&basic).ok().as_deref(), Some("abc"));
        let basic = format!("Basic {}", BASE64.encode("k3y:abc:"));
        assert_eq!(presented_key(&basic).ok().as_deref(), Some("k3y:abc"));
        let basic = format!("Basic {}", BASE64.encode("abc:ignored"));
        assert_eq!(presented_key(&basic).ok().as_deref(), Some("abc"));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in ["abc", "Bearer ", "Basic !!!", "Digest abc", "Basic "] {
            assert!(matches!(
                presented_key(header),
                Err(ApiError::MalformedAuthHeader)
            ));
        }
    }

    #[test]
    fn two_authorization_headers_are_refused_in_either_order() {
        for (first, second) in [
            ("Bearer right", "Bearer wrong"),
            ("Bearer wrong", "Bearer right"),
        ] {
            let mut headers = HeaderMap::new();
            headers.append(AUTHORIZATION, HeaderValue::from_static(first));
            headers.append(AUTHORIZATION, HeaderValue::from_static(second));
            assert!(matches!(
                presented(&headers),
                Err(ApiError::MalformedAuthHeader)
            ));
        }
        let mut one = HeaderMap::new();
        one.append(AUTHORIZATION, HeaderValue::from_static("Bearer right"));
        assert_eq!(presented(&one).ok().as_deref(), Some("right"));
    }
}
