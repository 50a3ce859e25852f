//! The PostgreSQL [`LogCompaction`]: one transaction per pass step, serialized by the cursor
//! row's lock; events leave only through the permits the append-only trigger checks.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::{PostgresStore, db_error};
use crate::store::{
    CompactionRecord, LogCompaction, Position, StoreError, StreamCompaction, StreamId,
};

const RECORD: &str = "\
INSERT INTO stream_compactions (stream_id, routine_cycles, lifecycle_events, events_removed,
                                through_version, first_recorded_at, last_recorded_at, compacted_at)
SELECT s.*, $8 FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int4[],
                           $6::timestamptz[], $7::timestamptz[]) AS s
ON CONFLICT (stream_id) DO UPDATE SET
    routine_cycles = stream_compactions.routine_cycles + excluded.routine_cycles,
    lifecycle_events = stream_compactions.lifecycle_events + excluded.lifecycle_events,
    events_removed = stream_compactions.events_removed + excluded.events_removed,
    through_version = greatest(stream_compactions.through_version, excluded.through_version),
    first_recorded_at = least(stream_compactions.first_recorded_at, excluded.first_recorded_at),
    last_recorded_at = greatest(stream_compactions.last_recorded_at, excluded.last_recorded_at),
    compacted_at = excluded.compacted_at";

#[async_trait]
impl LogCompaction for PostgresStore {
    async fn compaction_cursor(&self) -> Result<Position, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT commit_position, global_position FROM compaction_cursor WHERE id = 1",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row.map_or(Position::START, |r| {
            Position::from_columns(r.get(0), r.get(1))
        }))
    }

    #[tracing::instrument(name = "store.compact", skip_all, fields(streams = plans.len()))]
    async fn compact(
        &self,
        plans: &[StreamCompaction],
        from: Position,
        to: Position,
        now: DateTime<Utc>,
    ) -> Result<Option<u64>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO compaction_cursor (id, commit_position, global_position, updated_at) \
             VALUES (1, 0, 0, now()) ON CONFLICT (id) DO NOTHING",
            &[],
        )
        .await
        .map_err(db_error)?;
        let cursor = tx
            .query_one(
                "SELECT commit_position, global_position FROM compaction_cursor \
                 WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(db_error)?;
        if Position::from_columns(cursor.get(0), cursor.get(1)) != from {
            return Ok(None);
        }
        let positions: Vec<i64> = plans.iter().flat_map(|p| p.positions.clone()).collect();
        let mut removed = 0;
        if !positions.is_empty() {
            tx.execute(
                "INSERT INTO compaction_permits (global_position) SELECT unnest($1::int8[])",
                &[&positions],
            )
            .await
            .map_err(db_error)?;
            removed = tx
                .execute(
                    "DELETE FROM events WHERE global_position = ANY($1::int8[])",
                    &[&positions],
                )
                .await
                .map_err(db_error)?;
            tx.execute(
                "DELETE FROM compaction_permits WHERE global_position = ANY($1::int8[])",
                &[&positions],
            )
            .await
            .map_err(db_error)?;
            let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let streams: Vec<&str> = plans.iter().map(|p| p.stream.as_str()).collect();
            let routine: Vec<i64> = plans.iter().map(|p| count(p.routine_cycles)).collect();
            let lifecycle: Vec<i64> = plans.iter().map(|p| count(p.lifecycle_events)).collect();
            let events: Vec<i64> = plans
                .iter()
                .map(|p| count(p.positions.len() as u64))
                .collect();
            let through: Vec<i32> = plans
                .iter()
                .map(|p| i32::try_from(p.through_version).unwrap_or(i32::MAX))
                .collect();
            let first: Vec<DateTime<Utc>> = plans.iter().map(|p| p.first_recorded_at).collect();
            let last: Vec<DateTime<Utc>> = plans.iter().map(|p| p.last_recorded_at).collect();
            tx.execute(
                RECORD,
                &[
                    &streams, &routine, &lifecycle, &events, &through, &first, &last, &now,
                ],
            )
            .await
            .map_err(db_error)?;
        }
        tx.execute(
            "UPDATE compaction_cursor SET commit_position = $1, global_position = $2, \
             updated_at = $3 WHERE id = 1",
            &[&to.commit_column(), &to.global, &now],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(removed))
    }

    async fn compaction_of(
        &self,
        stream: &StreamId,
    ) -> Result<Option<CompactionRecord>, StoreError> {
        let (client, statement) = self
            .prepared(
                "SELECT routine_cycles, lifecycle_events, events_removed, through_version, \
                 first_recorded_at, last_recorded_at, compacted_at \
                 FROM stream_compactions WHERE stream_id = $1",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&stream.as_str()])
            .await
            .map_err(db_error)?;
        Ok(row.as_ref().map(record))
    }
}

fn record(row: &Row) -> CompactionRecord {
    let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    CompactionRecord {
        routine_cycles: count(0),
        lifecycle_events: count(1),
        events_removed: count(2),
        through_version: row.get::<_, i32>(3).unsigned_abs(),
        first_recorded_at: row.get(4),
        last_recorded_at: row.get(5),
        compacted_at: row.get(6),
    }
}
