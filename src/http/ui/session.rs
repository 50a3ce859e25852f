//! Signing in to the dashboard, and what every page and action checks.
//!
//! - With a secret key, an operator signs in by entering it; the server answers a session cookie
//!   (`HttpOnly`, `SameSite=Strict`, `Secure` when the server's URL is `https`, path `/ui`) that
//!   carries an expiry and a random id, signed with a key derived from the secret key. Every
//!   instance with the same secret key accepts it; changing the secret key signs everyone out.
//!   Signing out records the id in the database ([`domain::sign_out`]), so that every instance
//!   refuses the cookie from then on, and clears the cookie.
//! - Without a secret key the server listens on loopback only and the dashboard is open, as the
//!   API is; actions are still protected against cross-site requests.
//! - Every action (a `POST`) carries a CSRF token derived from the session's id (a hidden form
//!   field), and is refused when its `Origin` header names another origin.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::{COOKIE, HOST, ORIGIN};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::Refusal;
use crate::http::HttpState;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "grantline_ui";

/// How long a sign-in lasts.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The key of the dashboard's sessions.
pub struct Sessions {
    /// Signs cookies and CSRF tokens: derived from the secret key, or random per process in
    /// open mode.
    key: [u8; 32],
    /// Whether signing in is required (a secret key is set).
    required: bool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Who is looking at a page: the session's id and its CSRF token.
#[derive(Clone, Debug)]
pub struct Viewer {
    /// The CSRF token every form of the page carries.
    pub csrf: String,
    /// Whether there is a session to sign out of (secret-key mode).
    pub signed_in: bool,
    id: String,
    /// When the session expires (seconds since the epoch).
    expires: i64,
}

type HmacSha256 = Hmac<Sha256>;

impl Sessions {
    /// The dashboard's sessions for a server with `secret_key` (open without one).
    pub fn new(secret_key: Option<&[u8]>) -> Self {
        let key = match secret_key {
            Some(secret) => mac(secret, b"grantline dashboard sessions v1"),
            None => {
                let mut key = [0; 32];
                for chunk in key.chunks_mut(8) {
                    chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes());
                }
                // Mixed with the process's randomness once more, so that a weak seed of the
                // generator alone does not give the key away.
                mac(&key, uuid::Uuid::new_v4().as_bytes())
            }
        };
        Self {
            key,
            required: secret_key.is_some(),
        }
    }

    /// Whether signing in is required.
    pub fn required(&self) -> bool {
        self.required
    }

    /// A new session: its cookie value.
    pub fn open(&self) -> String {
        let expires = Utc::now().timestamp() + LIFETIME.as_secs() as i64;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let signature = hex::encode(mac(&self.key, format!("session|{expires}|{id}").as_bytes()));
        format!("{expires}.{id}.{signature}")
    }

    /// The viewer a cookie value names, if it is ours and unexpired (whether it was signed out
    /// is the database's to say).
    fn viewer_of(&self, value: &str) -> Option<Viewer> {
        let mut parts = value.splitn(3, '.');
        let (expires, id, signature) = (parts.next()?, parts.next()?, parts.next()?);
        let expected = hex::encode(mac(&self.key, format!("session|{expires}|{id}").as_bytes()));
        if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        if expires <= Utc::now().timestamp() {
            return None;
        }
        Some(self.viewer(id, true, expires))
    }

    fn viewer(&self, id: &str, signed_in: bool, expires: i64) -> Viewer {
        let csrf = hex::encode(&mac(&self.key, format!("csrf|{id}").as_bytes())[..16]);
        Viewer {
            csrf,
            signed_in,
            id: id.to_owned(),
            expires,
        }
    }

    /// The viewer of a request: from its session cookie, or the open viewer without a secret
    /// key.
    fn viewer_of_request(&self, headers: &HeaderMap) -> Option<Viewer> {
        if !self.required {
            return Some(self.viewer("open", false, i64::MAX));
        }
        cookie(headers, COOKIE_NAME).and_then(|value| self.viewer_of(value))
    }
}

impl Viewer {
    /// Ends this viewer's session on every instance.
    pub async fn sign_out(&self, state: &HttpState) -> Result<(), Refusal> {
        if !self.signed_in {
            return Ok(());
        }
        let expires = DateTime::from_timestamp(self.expires, 0).unwrap_or_else(Utc::now);
        state
            .app
            .backend
            .sign_outs()
            .sign_out(&self.id, expires)
            .await
            .map_err(Refusal::api)
    }

    /// Refuses an action whose form does not carry this viewer's CSRF token.
    pub fn check(&self, csrf: &str) -> Result<(), Refusal> {
        if bool::from(self.csrf.as_bytes().ct_eq(csrf.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "This form has expired",
                "The form was not sent from this dashboard page, or the page is too old. Go \
                 back, reload the page and try again.",
            ))
        }
    }
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The value of the cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Whether a request's `Origin`, when it has one, is this server's own (its `Host`).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(host)) = (
        origin.to_str(),
        headers.get(HOST).and_then(|h| h.to_str().ok()),
    ) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

/// A page or action for a signed-in viewer: anyone else is sent to sign in (pages) or refused
/// (actions).
impl FromRequestParts<HttpState> for Viewer {
    type Rejection = Refusal;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let action = parts.method != axum::http::Method::GET;
        if action && !same_origin(&parts.headers) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "Refused",
                "This action was sent from another site.",
            ));
        }
        let viewer = match state.ui.sessions.viewer_of_request(&parts.headers) {
            Some(viewer) if viewer.signed_in => {
                let signed_out = state.app.backend.sign_outs().signed_out(&viewer.id).await;
                match signed_out {
                    Ok(false) => Some(viewer),
                    Ok(true) => None,
                    Err(e) => return Err(Refusal::api(e)),
                }
            }
            other => other,
        };
        match viewer {
            Some(viewer) => Ok(viewer),
            None if action => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "Your session has ended. Sign in again, then repeat the action.",
            )
            .with_sign_in()),
            None => Err(Refusal::sign_in(
                parts.uri.path_and_query().map(|p| p.as_str()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_accepted_until_it_is_forged_or_expired() {
        let sessions = Sessions::new(Some(b"secret"));
        let cookie = sessions.open();
        let viewer = sessions.viewer_of(&cookie).expect("a fresh session");
        assert_eq!(viewer.csrf.len(), 32);
        assert!(viewer.check(&viewer.csrf).is_ok());
        assert!(viewer.check("0").is_err());

        let other = Sessions::new(Some(b"another secret"));
        assert!(other.viewer_of(&cookie).is_none(), "signed by another key");
        let (expires, rest) = cookie.split_once('.').expect("expiry first");
        let later = format!("{}.{rest}", expires.parse::<i64>().expect("a number") + 1);
        assert!(sessions.viewer_of(&later).is_none(), "expiry changed");
        assert!(sessions.viewer_of("garbage").is_none());
        assert!(sessions.viewer_of("1.2.3").is_none());
    }

    #[test]
    fn only_the_servers_own_origin_may_send_actions() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "127.0.0.1:3003".parse().expect("a header value"));
        assert!(same_origin(&headers));
        headers.insert(
            ORIGIN,
            "http://127.0.0.1:3003".parse().expect("a header value"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            ORIGIN,
            "https://evil.example".parse().expect("a header value"),
        );
        assert!(!same_origin(&headers));
        headers.insert(ORIGIN, "null".parse().expect("a header value"));
        assert!(!same_origin(&headers));
    }
}
