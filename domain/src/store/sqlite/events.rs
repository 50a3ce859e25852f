//! The SQLite [`EventStore`]: appends serialized on the one writer connection, so rowid order is
//! commit order.

use async_trait::async_trait;
use chrono::DateTime;
use rusqlite::{ErrorCode, TransactionBehavior, params};
use uuid::Uuid;

use super::{SqliteStore, db_error, now_micros};
use crate::store::{
    Appended, EventStore, ExpectedVersion, Listener, NewEvent, NewStream, Payload, Position,
    RecordedEvent, StoreError, StreamAppend, StreamId, append_target, check_new_streams,
    check_stream_appends,
};

const SELECT_COLUMNS: &str = "global_position, stream_id, stream_version, event_id, event_type, \
     event_version, payload, metadata, recorded_at";

fn decode_row(row: &rusqlite::Row<'_>) -> Result<RecordedEvent, StoreError> {
    let global: i64 = row.get(0).map_err(db_error)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        global_position: global,
        reason,
    };
    let text = |i: usize| row.get::<_, String>(i).map_err(|e| corrupt(e.to_string()));
    let stream_version: i64 = row.get(2).map_err(|e| corrupt(e.to_string()))?;
    let event_version: i64 = row.get(5).map_err(|e| corrupt(e.to_string()))?;
    let recorded_at: i64 = row.get(8).map_err(|e| corrupt(e.to_string()))?;
    Ok(RecordedEvent {
        position: Position { commit: 0, global },
        stream_id: StreamId::from_raw(text(1)?),
        stream_version: u32::try_from(stream_version)
            .map_err(|_| corrupt(format!("stream version {stream_version}")))?,
        event_id: Uuid::parse_str(&text(3)?).map_err(|e| corrupt(format!("event id: {e}")))?,
        event_type: text(4)?,
        event_version: i16::try_from(event_version)
            .map_err(|_| corrupt(format!("event version {event_version}")))?,
        payload: Payload::from_text(text(6)?).map_err(|e| corrupt(format!("payload: {e}")))?,
        metadata: serde_json::from_str(&text(7)?).map_err(|e| corrupt(format!("metadata: {e}")))?,
        recorded_at: DateTime::from_timestamp_micros(recorded_at)
            .ok_or_else(|| corrupt(format!("recorded_at {recorded_at}")))?,
    })
}

fn query_events(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut statement = conn.prepare_cached(sql).map_err(db_error)?;
    let mut rows = statement.query(params).map_err(db_error)?;
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(db_error)? {
        events.push(decode_row(row)?);
    }
    Ok(events)
}

/// [`EventStore::read_all`] on a connection the caller holds, e.g. the writer inside a
/// transaction, which sees every committed event.
pub fn read_all_on(
    conn: &rusqlite::Connection,
    after: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    query_events(
        conn,
        &format!(
            "SELECT {SELECT_COLUMNS} FROM events \
             WHERE global_position > ?1 ORDER BY global_position LIMIT ?2"
        ),
        params![after.global, limit],
    )
}

fn stream_head(conn: &rusqlite::Connection, stream: &str) -> Result<u32, StoreError> {
    let head: i64 = conn
        .prepare_cached("SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = ?1")
        .and_then(|mut s| s.query_row([stream], |r| r.get(0)))
        .map_err(db_error)?;
    Ok(u32::try_from(head).unwrap_or(u32::MAX))
}

/// Inserts `events` into `stream` after version `head`; their global positions, in order.
fn insert_events(
    tx: &rusqlite::Transaction<'_>,
    stream: &StreamId,
    head: u32,
    events: &[NewEvent],
) -> Result<Vec<i64>, StoreError> {
    let mut positions = Vec::with_capacity(events.len());
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, \
             event_version, payload, metadata, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(db_error)?;
    let recorded_at = now_micros();
    for (offset, event) in (1u32..).zip(events) {
        let version = head + offset;
        insert
            .execute(params![
                stream.as_str(),
                version,
                event.event_id.to_string(),
                event.event_type,
                event.event_version,
                event.payload.to_string(),
                event.metadata.to_string(),
                recorded_at,
            ])
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::ConstraintViolation) if e.to_string().contains("event_id") => {
                    StoreError::DuplicateEvent(event.event_id)
                }
                _ => db_error(e),
            })?;
        positions.push(tx.last_insert_rowid());
    }
    Ok(positions)
}

impl SqliteStore {
    /// Appends each stream's events if it is at its expected version (`NoStream`: a new
    /// stream), all in one IMMEDIATE transaction: one stream elsewhere writes nothing.
    async fn write_streams(
        &self,
        writes: Vec<(StreamId, ExpectedVersion, Vec<NewEvent>)>,
    ) -> Result<Vec<Appended>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let appended = self
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_error)?;
                let mut appended = Vec::with_capacity(writes.len());
                for (stream, expected, events) in &writes {
                    let at = match expected {
                        ExpectedVersion::Exact(version) => *version,
                        _ => 0,
                    };
                    let head = stream_head(&tx, stream.as_str())?;
                    if head != at {
                        // Dropping the transaction rolls back what this call inserted.
                        return Err(StoreError::Conflict {
                            stream: stream.clone(),
                            expected: *expected,
                            actual: head,
                        });
                    }
                    let positions = insert_events(&tx, stream, at, events)?;
                    appended.push(Appended {
                        stream_version: at + u32::try_from(positions.len()).unwrap_or(u32::MAX),
                        global_positions: positions,
                    });
                }
                tx.commit().map_err(db_error)?;
                Ok(appended)
            })
            .await?;
        self.inner.signal.notify();
        Ok(appended)
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    #[tracing::instrument(name = "store.append", skip_all, fields(stream_id = %stream))]
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let expected_at = append_target(expected, &events)?;
        let stream = stream.clone();
        let appended = self
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_error)?;
                let head = stream_head(&tx, stream.as_str())?;
                if expected_at.is_some_and(|at| at != head) {
                    return Err(StoreError::Conflict {
                        stream,
                        expected,
                        actual: head,
                    });
                }
                let positions = insert_events(&tx, &stream, head, &events)?;
                tx.commit().map_err(db_error)?;
                Ok(Appended {
                    stream_version: head + u32::try_from(positions.len()).unwrap_or(u32::MAX),
                    global_positions: positions,
                })
            })
            .await?;
        self.inner.signal.notify();
        Ok(appended)
    }

    #[tracing::instrument(name = "store.create_streams", skip_all, fields(streams = streams.len()))]
    async fn create_streams(&self, streams: Vec<NewStream>) -> Result<Vec<Appended>, StoreError> {
        check_new_streams(&streams)?;
        let writes = streams
            .into_iter()
            .map(|s| (s.stream, ExpectedVersion::NoStream, s.events))
            .collect();
        self.write_streams(writes).await
    }

    async fn append_streams(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, StoreError> {
        check_stream_appends(&appends)?;
        let writes = appends
            .into_iter()
            .map(|a| (a.stream, ExpectedVersion::Exact(a.expected), a.events))
            .collect();
        self.write_streams(writes).await
    }

    async fn stream_versions(&self, streams: &[StreamId]) -> Result<Vec<u32>, StoreError> {
        let streams = streams.to_vec();
        self.read(move |conn| {
            streams
                .iter()
                .map(|stream| stream_head(conn, stream.as_str()))
                .collect()
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_version: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.clone();
        self.read(move |conn| {
            query_events(
                conn,
                &format!(
                    "SELECT {SELECT_COLUMNS} FROM events \
                     WHERE stream_id = ?1 AND stream_version > ?2 ORDER BY stream_version"
                ),
                params![stream.as_str(), after_version],
            )
        })
        .await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read(move |conn| read_all_on(conn, after, limit)).await
    }

    async fn head_position(&self) -> Result<i64, StoreError> {
        self.read_scalar("SELECT coalesce(max(global_position), 0) FROM events")
            .await
    }

    async fn committed_after(&self, after: Position, through: i64) -> Result<bool, StoreError> {
        // One writer at a time: positions are commit order here.
        self.read(move |conn| {
            conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM events \
                 WHERE global_position > ?1 AND global_position <= ?2)",
                params![after.global, through],
                |row| row.get(0),
            )
            .map_err(db_error)
        })
        .await
    }

    async fn last_position(&self) -> Result<Position, StoreError> {
        let global = self.head_position().await?;
        Ok(Position { commit: 0, global })
    }

    fn listener(&self) -> Listener {
        Listener::new(self.inner.signal.subscribe(), self.inner.poll_interval)
    }
}
