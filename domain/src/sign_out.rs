//! Dashboard sign-outs, kept in the database so that every instance honours them.
//!
//! A dashboard session is a signed cookie that any instance with the same secret key accepts
//! until it expires; signing out must end it everywhere, not only on the instance that served
//! the sign-out. So a sign-out is a row (`dashboard_sign_outs`, both backends) holding the
//! session's random id and the session's own expiry; past that, the cookie is refused anyway and
//! the sessions sweeper removes the row. The id is not a secret: a cookie is only accepted with
//! its signature.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::store::StoreError;

/// Where sign-outs are kept.
#[async_trait]
pub trait SignOutRepository: Send + Sync {
    /// Records that session `id`, valid until `expires_at`, was signed out (again: a no-op).
    async fn sign_out(&self, id: &str, expires_at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Whether session `id` was signed out.
    async fn signed_out(&self, id: &str) -> Result<bool, StoreError>;

    /// Forgets the sign-outs of sessions expired at `now`; returns how many.
    async fn sweep_sign_outs(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}
