//! Sending one webhook: its body signed with HMAC-SHA256 under the configured secret, POSTed
//! once with a timeout and without following redirects; the wait before the next attempt when
//! it fails; and what went wrong, told without the URL (which may carry credentials).
//!
//! Headers: `X-Grantline-Signature: t=<unix seconds>,sha256=<hex>`, the HMAC of
//! `"<t>.<body>"`, so a receiver can refuse a replayed delivery by its age; the same seconds as
//! `X-Grantline-Timestamp`; Nango's `X-Nango-Hmac-Sha256` (the HMAC of the body alone, for
//! Nango handlers, which cannot tell a replay); `Idempotency-Key` (the event's id, also the
//! body's `id`, for the receiver to deduplicate), and `X-Grantline-Delivery-Attempt` (1, 2, …).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use url::Url;
use uuid::Uuid;

use super::{WebhookError, WebhookSettings};
use crate::transport;

/// The longest wait between two attempts of one delivery.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Hex of HMAC-SHA256 of `body` under `secret` (Nango's signature header).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// `X-Grantline-Signature` of `body` sent at `timestamp` (UNIX seconds): `t=<timestamp>,
/// sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`. Each attempt is signed when it is sent.
pub fn timestamped_signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    format!("t={timestamp},sha256={}", sign(secret, &signed))
}

/// The wait before attempt `attempts + 1`: `base` doubled per earlier failure, capped at
/// [`BACKOFF_CAP`], less up to a quarter at random so that targets do not retry in step.
pub fn retry_delay(base: Duration, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    let delay = base.saturating_mul(1 << doublings).min(BACKOFF_CAP);
    let jitter = (Uuid::new_v4().as_u128() % 1024) as f64 / 1024.0;
    delay.mul_f64(1.0 - 0.25 * jitter)
}

/// A failed attempt: what went wrong and when to try again.
#[derive(Clone, Debug)]
pub(super) struct Failed {
    /// The HTTP status of the answer, if there was one.
    pub status: Option<u16>,
    /// What went wrong, for operators (never a URL or a secret).
    pub error: String,
    /// When the next attempt is due.
    pub next: DateTime<Utc>,
}

/// Posts signed webhooks: one HTTP client, key and retry policy for every target. Cheap to
/// clone.
#[derive(Clone)]
pub(super) struct Poster {
    http: reqwest::Client,
    secret: Arc<[u8]>,
    timeout: Duration,
    backoff: Duration,
}

impl Poster {
    pub(super) fn new(settings: &WebhookSettings) -> Result<Self, WebhookError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("grantline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            secret: Arc::from(settings.secret.as_bytes()),
            timeout: settings.timeout,
            backoff: settings.backoff,
        })
    }

    /// POSTs `body` as attempt number `attempt` at delivering event `event_id` to `url`: the
    /// status of a 2xx answer, or why the attempt failed and when the next one is due.
    pub(super) async fn post(
        &self,
        url: &Url,
        event_id: Uuid,
        attempt: u32,
        body: &Value,
    ) -> Result<u16, Failed> {
        let body = body.to_string().into_bytes();
        let signature = sign(&self.secret, &body);
        let timestamp = Utc::now().timestamp();
        let sent = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "X-Grantline-Signature",
                timestamped_signature(&self.secret, timestamp, &body),
            )
            .header("X-Grantline-Timestamp", timestamp.to_string())
            .header("X-Nango-Hmac-Sha256", &signature)
            .header("Idempotency-Key", event_id.to_string())
            .header("X-Grantline-Delivery-Attempt", attempt.to_string())
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(response) if response.status().is_success() => {
                return Ok(response.status().as_u16());
            }
            Ok(response) => {
                let status = response.status().as_u16();
                (Some(status), format!("the receiver answered HTTP {status}"))
            }
            Err(e) if e.is_timeout() => {
                (None, format!("no answer within {}", humanize(self.timeout)))
            }
            Err(e) => (None, transport::describe(e)),
        };
        let next = Utc::now()
            + chrono::Duration::from_std(retry_delay(self.backoff, attempt))
                .unwrap_or(chrono::Duration::MAX);
        Err(Failed {
            status,
            error,
            next,
        })
    }
}

fn humanize(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            timestamped_signature(b"k", 1_700_000_000, b"{}"),
            format!("t=1700000000,sha256={}", sign(b"k", b"1700000000.{}"))
        );
    }

    #[test]
    fn the_retry_delay_doubles_with_jitter_up_to_the_cap() {
        let base = Duration::from_secs(1);
        for (attempts, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (500, 300)] {
            let delay = retry_delay(base, attempts);
            let full = Duration::from_secs(full);
            assert!(
                delay <= full && delay >= full.mul_f64(0.75),
                "{attempts}: {delay:?}"
            );
        }
    }
}
