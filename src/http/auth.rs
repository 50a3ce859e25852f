//! API authentication (DESIGN §5): open without a secret key, else `Bearer <key>` or
//! `Basic base64(<key>:)`, compared in constant time.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::state::AppState;

pub async fn require_secret_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // Without a secret key the API is open and any header is ignored (old clients always send
    // one); the server then listens on loopback only.
    let Some(secret) = &state.config.secret_key else {
        return Ok(next.run(request).await);
    };
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .ok_or(ApiError::MissingAuthHeader)?;
    let value = header.to_str().map_err(|_| ApiError::MalformedAuthHeader)?;
    let presented = presented_key(value)?;
    if bool::from(presented.as_bytes().ct_eq(secret.expose().as_bytes())) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::InvalidSecretKey)
    }
}

/// The key in a `Bearer` or `Basic` header.
fn presented_key(value: &str) -> Result<String, ApiError> {
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(ApiError::MalformedAuthHeader)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64
            .decode(rest)
            .map_err(|_| ApiError::MalformedAuthHeader)?;
        let text = String::from_utf8(decoded).map_err(|_| ApiError::MalformedAuthHeader)?;
        // The key is the user name; the password is empty (or ignored).
        let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
        if !user.is_empty() {
            return Ok(user.to_owned());
        }
    }
    Err(ApiError::MalformedAuthHeader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_headers_yield_the_key() {
        assert_eq!(presented_key("Bearer abc").ok().as_deref(), Some("abc"));
        let basic = format!("Basic {}", BASE64.encode("abc:"));
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
}
