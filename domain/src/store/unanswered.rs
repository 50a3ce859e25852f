//! Giving up a database call that is never answered.
//!
//! A peer that accepted a query and then stopped answering on the open connection (a hung
//! pooler, a frozen primary) leaves the call waiting for good; a loop that awaits it stops with
//! it. Every background loop bounds its calls with [`answered_within`], so the next pass tries
//! again on a fresh connection once the database is back.

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// Runs `call`, or gives it up after `limit` with a [`StoreError::Database`] that says so
/// (converted into the call's own error type). A call given up inside a transaction is rolled
/// back with the dropped connection.
pub async fn answered_within<T, E: From<StoreError>>(
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(unanswered(limit).into()))
}

/// The error of a call given up after `limit`.
fn unanswered(limit: Duration) -> StoreError {
    StoreError::Database(format!("the database did not answer within {limit:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_limit_is_given_up_and_an_answered_one_passes_through() {
        let limit = Duration::from_millis(20);
        let never = answered_within(limit, std::future::pending::<Result<(), StoreError>>());
        let given_up = never.await.map_err(|e| e.to_string());
        assert_eq!(
            given_up,
            Err("database error: the database did not answer within 20ms".to_owned())
        );
        let answered = answered_within(limit, async { Ok::<_, StoreError>(7) }).await;
        assert!(matches!(answered, Ok(7)));
    }
}
