//! The webhook tables on PostgreSQL. Each method takes a pooled connection for one or two
//! statements, outside any transaction; lease times are the server's `now()`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;
use domain::store::{Position, PostgresStore, StoreError};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{
    DELIVERY_COLUMNS, DeliveryState, Failed, Outgoing, StoreFuture, Target, TargetRow,
    WebhookStore, limit_of,
};
use crate::webhooks::DeliveryStatus;

/// The webhook tables on a PostgreSQL store's pool.
pub(super) struct PostgresWebhooks {
    store: PostgresStore,
}

impl PostgresWebhooks {
    pub(super) fn new(store: PostgresStore) -> Self {
        Self { store }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.store
            .pool()
            .get()
            .await
            .map_err(|e| StoreError::Database(e.to_string()))
    }

    /// Runs one statement; the number of rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.client()
            .await?
            .execute(sql, params)
            .await
            .map_err(db_error)
    }

    /// Runs one statement that returns at most one row.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.client()
            .await?
            .query_opt(sql, params)
            .await
            .map_err(db_error)
    }
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(domain::store::postgres_error_text(&e))
}

/// The lease's length as `make_interval` takes it.
fn lease_secs(target: &Target) -> f64 {
    target.lease.as_secs_f64()
}

impl WebhookStore for PostgresWebhooks {
    fn register<'a>(
        &'a self,
        target: &'a Target,
        url: &'a str,
        start: Position,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "INSERT INTO webhook_targets (target, url, commit_position, global_position) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (target) DO NOTHING",
                &[&target.key, &url, &start.commit_column(), &start.global],
            )
            .await
            .map(|_| ())
        })
    }

    fn slowest_followed(&self, within: Duration) -> StoreFuture<'_, Option<(Position, String)>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "SELECT commit_position, global_position, url FROM webhook_targets \
                     WHERE followed_at > now() - make_interval(secs => $1) \
                     ORDER BY commit_position, global_position LIMIT 1",
                    &[&within.as_secs_f64()],
                )
                .await?;
            Ok(row.map(|r| (Position::from_columns(r.get(0), r.get(1)), r.get(2))))
        })
    }

    fn claim<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, Option<Position>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "UPDATE webhook_targets SET lease_holder = $2, \
                     lease_expires_at = now() + make_interval(secs => $3), followed_at = now() \
                     WHERE target = $1 AND (lease_holder IS NULL OR lease_holder = $2 \
                     OR lease_expires_at < now()) \
                     RETURNING commit_position, global_position",
                    &[&target.key, &target.holder, &lease_secs(target)],
                )
                .await?;
            Ok(row.map(|r| Position::from_columns(r.get(0), r.get(1))))
        })
    }

    fn advance<'a>(&'a self, target: &'a Target, position: Position) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let updated = self
                .execute(
                    "UPDATE webhook_targets SET commit_position = $3, global_position = $4, \
                     updated_at = now(), last_error = NULL, \
                     lease_expires_at = now() + make_interval(secs => $5) \
                     WHERE target = $1 AND lease_holder = $2",
                    &[
                        &target.key,
                        &target.holder,
                        &position.commit_column(),
                        &position.global,
                        &lease_secs(target),
                    ],
                )
                .await?;
            Ok(updated == 1)
        })
    }

    fn release<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "UPDATE webhook_targets SET lease_holder = NULL, lease_expires_at = NULL \
                 WHERE target = $1 AND lease_holder = $2",
                &[&target.key, &target.holder],
            )
            .await
            .map(|_| ())
        })
    }

    fn record_error<'a>(&'a self, target: &'a Target, message: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "UPDATE webhook_targets SET last_error = $2 WHERE target = $1",
                &[&target.key, &message],
            )
            .await
            .map(|_| ())
        })
    }

    fn delivery_state<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
    ) -> StoreFuture<'a, Option<DeliveryState>> {
        Box::pin(async move {
            let row = self
                .query_opt(
                    "SELECT status, next_attempt_at FROM webhook_deliveries \
                     WHERE target = $1 AND event_id = $2",
                    &[&target.key, &event_id],
                )
                .await?;
            Ok(row.map(|r| DeliveryState::from_row(r.get(0), r.get(1))))
        })
    }

    fn start_attempt<'a>(
        &'a self,
        target: &'a Target,
        event: Outgoing<'a>,
    ) -> StoreFuture<'a, Option<u32>> {
        Box::pin(async move {
            let client = self.client().await?;
            let renewed = client
                .execute(
                    "UPDATE webhook_targets SET \
                     lease_expires_at = now() + make_interval(secs => $3) \
                     WHERE target = $1 AND lease_holder = $2",
                    &[&target.key, &target.holder, &lease_secs(target)],
                )
                .await
                .map_err(db_error)?;
            if renewed != 1 {
                return Ok(None);
            }
            let row = client
                .query_one(
                    "INSERT INTO webhook_deliveries AS d (target, event_id, event, \
                     global_position, attempts, status, first_attempt_at, last_attempt_at) \
                     VALUES ($1, $2, $3, $4, 1, 'pending', now(), now()) \
                     ON CONFLICT (target, event_id) DO UPDATE SET attempts = d.attempts + 1, \
                     status = 'pending', next_attempt_at = NULL, last_attempt_at = now() \
                     RETURNING attempts",
                    &[&target.key, &event.id, &event.name, &event.global_position],
                )
                .await
                .map_err(db_error)?;
            Ok(Some(row.get::<_, i32>(0).unsigned_abs()))
        })
    }

    fn delivered<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        status: u16,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', last_status = $3, \
                 delivered_at = now(), next_attempt_at = NULL \
                 WHERE target = $1 AND event_id = $2",
                &[&target.key, &event_id, &i32::from(status)],
            )
            .await
            .map(|_| ())
        })
    }

    fn failed<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        failure: &'a Failed,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "UPDATE webhook_deliveries SET status = 'retrying', last_status = $3, \
                 last_error = $4, next_attempt_at = $5 \
                 WHERE target = $1 AND event_id = $2",
                &[
                    &target.key,
                    &event_id,
                    &failure.status.map(i32::from),
                    &failure.error,
                    &failure.next,
                ],
            )
            .await
            .map(|_| ())
        })
    }

    fn prune<'a>(&'a self, target: &'a Target, before: DateTime<Utc>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.execute(
                "DELETE FROM webhook_deliveries WHERE target = $1 \
                 AND status = 'delivered' AND delivered_at < $2",
                &[&target.key, &before],
            )
            .await
            .map(|_| ())
        })
    }

    fn status<'a>(
        &'a self,
        target: &'a Target,
        recent: usize,
    ) -> StoreFuture<'a, (TargetRow, Vec<DeliveryStatus>)> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT commit_position, global_position, lease_holder, \
                     lease_expires_at, updated_at, last_error \
                     FROM webhook_targets WHERE target = $1",
                    &[&target.key],
                )
                .await
                .map_err(db_error)?;
            let row = TargetRow {
                position: Position::from_columns(row.get(0), row.get(1)),
                lease_holder: row.get(2),
                lease_expires_at: row.get(3),
                updated_at: row.get(4),
                last_error: row.get(5),
            };
            let deliveries = client
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE target = $1 \
                         ORDER BY last_attempt_at DESC, global_position DESC LIMIT $2"
                    ),
                    &[&target.key, &limit_of(recent)],
                )
                .await
                .map_err(db_error)?
                .iter()
                .map(delivery)
                .collect();
            Ok((row, deliveries))
        })
    }

    fn retry_now<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.execute(
                "UPDATE webhook_deliveries SET next_attempt_at = now() \
                 WHERE target = $1 AND status = 'retrying'",
                &[&target.key],
            )
            .await
        })
    }

    fn deliveries_of<'a>(
        &'a self,
        target: &'a Target,
        event_ids: &'a [Uuid],
    ) -> StoreFuture<'a, Vec<DeliveryStatus>> {
        Box::pin(async move {
            Ok(self
                .client()
                .await?
                .query(
                    &format!(
                        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
                         WHERE target = $1 AND event_id = ANY($2) \
                         ORDER BY last_attempt_at DESC, global_position DESC"
                    ),
                    &[&target.key, &event_ids],
                )
                .await
                .map_err(db_error)?
                .iter()
                .map(delivery)
                .collect())
        })
    }
}

/// A delivery from a row of [`DELIVERY_COLUMNS`].
fn delivery(r: &Row) -> DeliveryStatus {
    DeliveryStatus {
        event_id: r.get(0),
        event: r.get(1),
        global_position: r.get(2),
        status: r.get(3),
        attempts: i64::from(r.get::<_, i32>(4)),
        last_status: r.get::<_, Option<i32>>(5).map(i64::from),
        last_error: r.get(6),
        first_attempt_at: r.get(7),
        last_attempt_at: r.get(8),
        next_attempt_at: r.get(9),
        delivered_at: r.get(10),
    }
}
