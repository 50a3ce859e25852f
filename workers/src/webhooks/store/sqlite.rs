//! The webhook tables on SQLite. Writes run on the store's single writer connection, reads on a
//! reader; times are microseconds since the Unix epoch, taken from this instance's clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{Position, SqliteStore, StoreError};
use futures_util::TryFutureExt;
use rusqlite::{Connection, OptionalExtension, Params, params};
use uuid::Uuid;

use super::{
    DELIVERY_COLUMNS, DeliveryState, Failed, Outgoing, StoreFuture, Target, TargetRow,
    WebhookStore, limit_of,
};
use crate::webhooks::DeliveryStatus;

/// The webhook tables in a SQLite store's file.
pub(super) struct SqliteWebhooks {
    store: SqliteStore,
}

impl SqliteWebhooks {
    pub(super) fn new(store: SqliteStore) -> Self {
        Self { store }
    }

    /// Runs `f` on the writer connection.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.store
            .write(move |conn| f(conn).map_err(db_error))
            .await
    }

    /// Runs one statement on the writer connection; the number of rows it changed.
    async fn execute<P>(&self, sql: &'static str, params: P) -> Result<usize, StoreError>
    where
        P: Params + Send + 'static,
    {
        self.write(move |conn| conn.execute(sql, params)).await
    }

    /// Runs `f` on a reader connection.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.store.read(move |conn| f(conn).map_err(db_error)).await
    }
}

fn db_error(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn now_micros() -> i64 {
    micros(Utc::now())
}

fn span_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// What the lease statements bind: the target's key, the holder and the lease's length. They
/// take `now` on the writer connection, after any wait for it, so a lease is never shortened
/// by that wait.
fn lease_params(target: &Target) -> (String, String, i64) {
    (
        target.key.clone(),
        target.holder.clone(),
        span_micros(target.lease),
    )
}

impl WebhookStore for SqliteWebhooks {
    fn register<'a>(
        &'a self,
        target: &'a Target,
        url: &'a str,
        start: Position,
    ) -> StoreFuture<'a, ()> {
        let params = (
            target.key.clone(),
            url.to_owned(),
            start.commit_column(),
            start.global,
            now_micros(),
        );
        Box::pin(
            self.execute(
                "INSERT INTO webhook_targets (target, url, commit_position, global_position, \
                 created_at, updated_at, followed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5) \
                 ON CONFLICT (target) DO NOTHING",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn slowest_followed(&self, within: Duration) -> StoreFuture<'_, Option<(Position, String)>> {
        let since =
            now_micros().saturating_sub(i64::try_from(within.as_micros()).unwrap_or(i64::MAX));
        Box::pin(self.read(move |conn| {
            conn.query_row(
                "SELECT commit_position, global_position, url FROM webhook_targets \
                 WHERE followed_at > ?1 ORDER BY commit_position, global_position LIMIT 1",
                params![since],
                |r| Ok((Position::from_columns(r.get(0)?, r.get(1)?), r.get(2)?)),
            )
            .optional()
        }))
    }

    fn claim<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, Option<Position>> {
        let (key, holder, lease) = lease_params(target);
        Box::pin(self.write(move |conn| {
            conn.query_row(
                "UPDATE webhook_targets SET lease_holder = ?2, lease_expires_at = ?3 + ?4, \
                 followed_at = ?3 WHERE target = ?1 AND (lease_holder IS NULL \
                 OR lease_holder = ?2 OR lease_expires_at < ?3) \
                 RETURNING commit_position, global_position",
                params![key, holder, now_micros(), lease],
                |r| Ok(Position::from_columns(r.get(0)?, r.get(1)?)),
            )
            .optional()
        }))
    }

    fn advance<'a>(&'a self, target: &'a Target, position: Position) -> StoreFuture<'a, bool> {
        let (key, holder, lease) = lease_params(target);
        let changed = self.write(move |conn| {
            conn.execute(
                "UPDATE webhook_targets SET commit_position = ?3, global_position = ?4, \
                 updated_at = ?5, last_error = NULL, lease_expires_at = ?5 + ?6 \
                 WHERE target = ?1 AND lease_holder = ?2",
                params![
                    key,
                    holder,
                    position.commit_column(),
                    position.global,
                    now_micros(),
                    lease
                ],
            )
        });
        Box::pin(changed.map_ok(|updated| updated == 1))
    }

    fn release<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, ()> {
        let params = (target.key.clone(), target.holder.clone());
        Box::pin(
            self.execute(
                "UPDATE webhook_targets SET lease_holder = NULL, lease_expires_at = NULL \
                 WHERE target = ?1 AND lease_holder = ?2",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn record_error<'a>(&'a self, target: &'a Target, message: &'a str) -> StoreFuture<'a, ()> {
        let params = (target.key.clone(), message.to_owned());
        Box::pin(
            self.execute(
                "UPDATE webhook_targets SET last_error = ?2 WHERE target = ?1",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn delivery_state<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
    ) -> StoreFuture<'a, Option<DeliveryState>> {
        let key = target.key.clone();
        Box::pin(self.read(move |conn| {
            conn.query_row(
                "SELECT status, next_attempt_at FROM webhook_deliveries \
                 WHERE target = ?1 AND event_id = ?2",
                params![key, event_id.to_string()],
                |r| {
                    let status: String = r.get(0)?;
                    let next = r.get::<_, Option<i64>>(1)?.map(from_micros);
                    Ok(DeliveryState::from_row(&status, next))
                },
            )
            .optional()
        }))
    }

    fn start_attempt<'a>(
        &'a self,
        target: &'a Target,
        event: Outgoing<'a>,
    ) -> StoreFuture<'a, Option<u32>> {
        let (key, holder, lease) = lease_params(target);
        let (event_id, name, global_position) =
            (event.id, event.name.to_owned(), event.global_position);
        Box::pin(self.write(move |conn| {
            let now = now_micros();
            let renewed = conn.execute(
                "UPDATE webhook_targets SET lease_expires_at = ?3 + ?4 \
                 WHERE target = ?1 AND lease_holder = ?2",
                params![key, holder, now, lease],
            )?;
            if renewed != 1 {
                return Ok(None);
            }
            let attempts: i64 = conn.query_row(
                "INSERT INTO webhook_deliveries AS d (target, event_id, event, \
                 global_position, attempts, status, first_attempt_at, last_attempt_at) \
                 VALUES (?1, ?2, ?3, ?4, 1, 'pending', ?5, ?5) \
                 ON CONFLICT (target, event_id) DO UPDATE SET attempts = d.attempts + 1, \
                 status = 'pending', next_attempt_at = NULL, last_attempt_at = ?5 \
                 RETURNING attempts",
                params![key, event_id.to_string(), name, global_position, now],
                |r| r.get(0),
            )?;
            Ok(Some(u32::try_from(attempts).unwrap_or(u32::MAX)))
        }))
    }

    fn delivered<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        status: u16,
    ) -> StoreFuture<'a, ()> {
        let params = (
            target.key.clone(),
            event_id.to_string(),
            status,
            now_micros(),
        );
        Box::pin(
            self.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', last_status = ?3, \
                 delivered_at = ?4, next_attempt_at = NULL WHERE target = ?1 AND event_id = ?2",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn failed<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        failure: &'a Failed,
    ) -> StoreFuture<'a, ()> {
        let params = (
            target.key.clone(),
            event_id.to_string(),
            failure.status,
            failure.error.clone(),
            micros(failure.next),
        );
        Box::pin(
            self.execute(
                "UPDATE webhook_deliveries SET status = 'retrying', last_status = ?3, \
                 last_error = ?4, next_attempt_at = ?5 WHERE target = ?1 AND event_id = ?2",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn prune<'a>(&'a self, target: &'a Target, before: DateTime<Utc>) -> StoreFuture<'a, ()> {
        let params = (target.key.clone(), micros(before));
        Box::pin(
            self.execute(
                "DELETE FROM webhook_deliveries WHERE target = ?1 \
                 AND status = 'delivered' AND delivered_at < ?2",
                params,
            )
            .map_ok(|_| ()),
        )
    }

    fn status<'a>(
        &'a self,
        target: &'a Target,
        recent: usize,
    ) -> StoreFuture<'a, (TargetRow, Vec<DeliveryStatus>)> {
        let (key, limit) = (target.key.clone(), limit_of(recent));
        Box::pin(self.read(move |conn| {
            let row = conn.query_row(
                "SELECT commit_position, global_position, lease_holder, \
                 lease_expires_at, updated_at, last_error \
                 FROM webhook_targets WHERE target = ?1",
                [&key],
                |r| {
                    Ok(TargetRow {
                        position: Position::from_columns(r.get(0)?, r.get(1)?),
                        lease_holder: r.get(2)?,
                        lease_expires_at: r.get::<_, Option<i64>>(3)?.map(from_micros),
                        updated_at: from_micros(r.get(4)?),
                        last_error: r.get(5)?,
                    })
                },
            )?;
            let mut statement = conn.prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE target = ?1 \
                 ORDER BY last_attempt_at DESC, global_position DESC LIMIT ?2"
            ))?;
            let deliveries = statement
                .query_map(params![key, limit], delivery)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((row, deliveries))
        }))
    }

    fn retry_now<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, u64> {
        let params = (target.key.clone(), micros(Utc::now()));
        Box::pin(
            self.execute(
                "UPDATE webhook_deliveries SET next_attempt_at = ?2 \
                 WHERE target = ?1 AND status = 'retrying'",
                params,
            )
            .map_ok(|changed| changed as u64),
        )
    }

    fn deliveries_of<'a>(
        &'a self,
        target: &'a Target,
        event_ids: &'a [Uuid],
    ) -> StoreFuture<'a, Vec<DeliveryStatus>> {
        let ids: Vec<String> = event_ids.iter().map(Uuid::to_string).collect();
        let (key, ids) = (
            target.key.clone(),
            serde_json::to_string(&ids).unwrap_or_default(),
        );
        Box::pin(self.read(move |conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
                 WHERE target = ?1 AND event_id IN (SELECT value FROM json_each(?2)) \
                 ORDER BY last_attempt_at DESC, global_position DESC"
            ))?;
            statement
                .query_map(params![key, ids], delivery)?
                .collect::<rusqlite::Result<Vec<_>>>()
        }))
    }
}

/// A delivery from a row of [`DELIVERY_COLUMNS`].
fn delivery(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryStatus> {
    let event_id: String = r.get(0)?;
    Ok(DeliveryStatus {
        event_id: Uuid::parse_str(&event_id).unwrap_or_default(),
        event: r.get(1)?,
        global_position: r.get(2)?,
        status: r.get(3)?,
        attempts: r.get(4)?,
        last_status: r.get(5)?,
        last_error: r.get(6)?,
        first_attempt_at: from_micros(r.get(7)?),
        last_attempt_at: from_micros(r.get(8)?),
        next_attempt_at: r.get::<_, Option<i64>>(9)?.map(from_micros),
        delivered_at: r.get::<_, Option<i64>>(10)?.map(from_micros),
    })
}
