//! The SQLite [`LogCompaction`]: one transaction on the single writer per pass step; events
//! leave only through the permits the append-only trigger checks.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{SqliteStore, db_error};
use crate::store::{
    CompactionRecord, LogCompaction, Position, StoreError, StreamCompaction, StreamId,
};

const RECORD: &str = "\
INSERT INTO stream_compactions (stream_id, routine_cycles, lifecycle_events, events_removed,
                                through_version, first_recorded_at, last_recorded_at, compacted_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (stream_id) DO UPDATE SET
    routine_cycles = routine_cycles + excluded.routine_cycles,
    lifecycle_events = lifecycle_events + excluded.lifecycle_events,
    events_removed = events_removed + excluded.events_removed,
    through_version = max(through_version, excluded.through_version),
    first_recorded_at = min(first_recorded_at, excluded.first_recorded_at),
    last_recorded_at = max(last_recorded_at, excluded.last_recorded_at),
    compacted_at = excluded.compacted_at";

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl LogCompaction for SqliteStore {
    async fn compaction_cursor(&self) -> Result<Position, StoreError> {
        let global: Option<i64> = self
            .read(|conn| {
                conn.query_row(
                    "SELECT global_position FROM compaction_cursor WHERE id = 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_error)
            })
            .await?;
        Ok(Position::from_columns(0, global.unwrap_or(0)))
    }

    #[tracing::instrument(name = "store.compact", skip_all, fields(streams = plans.len()))]
    async fn compact(
        &self,
        plans: &[StreamCompaction],
        from: Position,
        to: Position,
        now: DateTime<Utc>,
    ) -> Result<Option<u64>, StoreError> {
        let plans = plans.to_vec();
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let at: Option<i64> = tx
                .query_row(
                    "SELECT global_position FROM compaction_cursor WHERE id = 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_error)?;
            if at.unwrap_or(0) != from.global {
                return Ok(None);
            }
            let mut removed = 0u64;
            {
                let mut permit = tx
                    .prepare_cached("INSERT INTO compaction_permits (global_position) VALUES (?1)")
                    .map_err(db_error)?;
                let mut delete = tx
                    .prepare_cached("DELETE FROM events WHERE global_position = ?1")
                    .map_err(db_error)?;
                let mut record = tx.prepare_cached(RECORD).map_err(db_error)?;
                for plan in &plans {
                    for position in &plan.positions {
                        permit.execute([position]).map_err(db_error)?;
                        removed += delete.execute([position]).map_err(db_error)? as u64;
                    }
                    record
                        .execute(params![
                            plan.stream.as_str(),
                            count(plan.routine_cycles),
                            count(plan.lifecycle_events),
                            count(plan.positions.len() as u64),
                            plan.through_version,
                            plan.first_recorded_at.timestamp_micros(),
                            plan.last_recorded_at.timestamp_micros(),
                            now.timestamp_micros(),
                        ])
                        .map_err(db_error)?;
                }
            }
            tx.execute("DELETE FROM compaction_permits", [])
                .map_err(db_error)?;
            tx.execute(
                "INSERT INTO compaction_cursor (id, global_position, updated_at) VALUES (1, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET global_position = excluded.global_position, \
                 updated_at = excluded.updated_at",
                params![to.global, now.timestamp_micros()],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(Some(removed))
        })
        .await
    }

    async fn compaction_of(
        &self,
        stream: &StreamId,
    ) -> Result<Option<CompactionRecord>, StoreError> {
        let stream = stream.clone();
        self.read(move |conn| {
            let row = conn
                .query_row(
                    "SELECT routine_cycles, lifecycle_events, events_removed, through_version, \
                     first_recorded_at, last_recorded_at, compacted_at \
                     FROM stream_compactions WHERE stream_id = ?1",
                    [stream.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(db_error)?;
            let time = |micros: i64| {
                DateTime::from_timestamp_micros(micros)
                    .ok_or_else(|| StoreError::Database(format!("time {micros} out of range")))
            };
            let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
            row.map(|(routine, lifecycle, events, through, first, last, at)| {
                Ok(CompactionRecord {
                    routine_cycles: unsigned(routine),
                    lifecycle_events: unsigned(lifecycle),
                    events_removed: unsigned(events),
                    through_version: u32::try_from(through).unwrap_or(0),
                    first_recorded_at: time(first)?,
                    last_recorded_at: time(last)?,
                    compacted_at: time(at)?,
                })
            })
            .transpose()
        })
        .await
    }
}
