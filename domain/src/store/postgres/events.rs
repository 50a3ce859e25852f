//! The PostgreSQL [`EventStore`]: an append is one statement checked by the unique
//! `(stream_id, stream_version)` key; whole-log readers stay below the xid8 horizon.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{PostgresStore, db_error};
use crate::store::{
    Appended, EventStore, ExpectedVersion, Listener, NewEvent, NewStream, Payload, Position,
    RecordedEvent, StoreError, StreamAppend, StreamId, append_target, check_new_streams,
    check_stream_appends,
};

const INSERT_AT: &str = "\
INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, metadata)
SELECT $1, $2 + e.ord::int, e.id, e.typ, e.ver, e.payload, e.meta
FROM unnest($3::uuid[], $4::text[], $5::int2[], $6::jsonb[], $7::jsonb[])
     WITH ORDINALITY AS e(id, typ, ver, payload, meta, ord)
WHERE $2 = 0 OR EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2)
RETURNING global_position, stream_version";

/// `INSERT_AT` for the common single event, without arrays.
const INSERT_ONE_AT: &str = "\
INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, metadata)
SELECT $1, $2 + 1, $3, $4, $5, $6, $7
WHERE $2 = 0 OR EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2)
RETURNING global_position, stream_version";

const INSERT_AT_END: &str = "\
WITH head AS (SELECT coalesce(max(stream_version), 0) AS v FROM events WHERE stream_id = $1)
INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, metadata)
SELECT $1, head.v + e.ord::int, e.id, e.typ, e.ver, e.payload, e.meta
FROM head, unnest($2::uuid[], $3::text[], $4::int2[], $5::jsonb[], $6::jsonb[])
     WITH ORDINALITY AS e(id, typ, ver, payload, meta, ord)
RETURNING global_position, stream_version";

/// Rows of new streams, flattened: one array per column.
const CREATE_STREAMS: &str = "\
INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, metadata)
SELECT * FROM unnest($1::text[], $2::int4[], $3::uuid[], $4::text[], $5::int2[], $6::jsonb[], $7::jsonb[])
RETURNING stream_id, stream_version, global_position";

/// [`CREATE_STREAMS`] for existing streams: nothing is inserted unless every stream has the
/// version it is expected at (`$8`, `$9`); one ahead of it is refused by the unique index.
const APPEND_STREAMS: &str = "\
INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, metadata)
SELECT * FROM unnest($1::text[], $2::int4[], $3::uuid[], $4::text[], $5::int2[], $6::jsonb[], $7::jsonb[])
WHERE NOT EXISTS (
    SELECT 1 FROM unnest($8::text[], $9::int4[]) AS h(stream_id, version)
    WHERE NOT EXISTS (
        SELECT 1 FROM events e WHERE e.stream_id = h.stream_id AND e.stream_version = h.version))
RETURNING stream_id, stream_version, global_position";

/// Each stream's head, by the unique `(stream_id, stream_version)` index: one row read each.
const STREAM_VERSIONS: &str = "\
SELECT coalesce((SELECT max(stream_version) FROM events WHERE stream_id = s.id), 0)
FROM unnest($1::text[]) WITH ORDINALITY AS s(id, ord) ORDER BY s.ord";

const SELECT_COLUMNS: &str = "global_position, transaction_id, stream_id, stream_version, \
     event_id, event_type, event_version, payload::text, metadata::text, recorded_at";

impl PostgresStore {
    /// The conflict of a refused [`EventStore::append_streams`]: the first stream that is not at
    /// its expected version (or that `detail`, the database's message, names).
    async fn append_conflict(
        &self,
        client: &deadpool_postgres::Object,
        appends: &[StreamAppend],
        detail: &str,
    ) -> Result<StoreError, StoreError> {
        for append in appends {
            let actual = self.stream_head(client, &append.stream).await?;
            if actual != append.expected || detail.contains(append.stream.as_str()) {
                return Ok(StoreError::Conflict {
                    stream: append.stream.clone(),
                    expected: ExpectedVersion::Exact(append.expected),
                    actual,
                });
            }
        }
        // Moved back meanwhile (not for a log that only grows): still nothing was written.
        let first = &appends[0];
        Ok(StoreError::Conflict {
            stream: first.stream.clone(),
            expected: ExpectedVersion::Exact(first.expected),
            actual: first.expected,
        })
    }

    async fn stream_head(
        &self,
        client: &deadpool_postgres::Object,
        stream: &StreamId,
    ) -> Result<u32, StoreError> {
        let row = client
            .query_one(
                "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1",
                &[&stream.as_str()],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get::<_, i32>(0).unsigned_abs())
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    #[tracing::instrument(name = "store.append", skip_all, fields(stream_id = %stream))]
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let expected_at = append_target(expected, &events)?;
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions: Vec<i16> = events.iter().map(|e| e.event_version).collect();
        let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
        let metadata: Vec<&Value> = events.iter().map(|e| &e.metadata).collect();

        let at = expected_at
            .map(|at| {
                i32::try_from(at).map_err(|_| StoreError::InvalidAppend("version out of range"))
            })
            .transpose()?;
        let stream_id = stream.as_str();

        let client = self.client().await?;
        // `Any` can lose the race for the end of the stream; it just tries again.
        for _ in 0..8 {
            let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = match (&at, events.as_slice()) {
                (Some(at), [event]) => (
                    INSERT_ONE_AT,
                    vec![
                        &stream_id,
                        at,
                        &event.event_id,
                        &event.event_type,
                        &event.event_version,
                        &event.payload,
                        &event.metadata,
                    ],
                ),
                (Some(at), _) => (
                    INSERT_AT,
                    vec![
                        &stream_id, at, &ids, &types, &versions, &payloads, &metadata,
                    ],
                ),
                (None, _) => (
                    INSERT_AT_END,
                    vec![&stream_id, &ids, &types, &versions, &payloads, &metadata],
                ),
            };
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            let result = client.query(&statement, &params).await;
            match result {
                Ok(rows) if rows.len() == events.len() => {
                    let mut written: Vec<(i32, i64)> =
                        rows.iter().map(|r| (r.get(1), r.get(0))).collect();
                    written.sort_unstable();
                    self.committed();
                    return Ok(Appended {
                        stream_version: written.last().map_or(0, |w| w.0.unsigned_abs()),
                        global_positions: written.into_iter().map(|w| w.1).collect(),
                    });
                }
                // The previous version does not exist: the stream is behind the expectation.
                Ok(_) => break,
                Err(e) => match unique_violation(&e) {
                    Some("events_event_id_key") => {
                        return Err(StoreError::DuplicateEvent(duplicate_id(&ids, &e)));
                    }
                    Some(_) if expected_at.is_none() => continue,
                    Some(_) => break,
                    None => return Err(db_error(e)),
                },
            }
        }
        let actual = self.stream_head(&client, stream).await?;
        Err(StoreError::Conflict {
            stream: stream.clone(),
            expected,
            actual,
        })
    }

    #[tracing::instrument(name = "store.create_streams", skip_all, fields(streams = streams.len()))]
    async fn create_streams(&self, streams: Vec<NewStream>) -> Result<Vec<Appended>, StoreError> {
        check_new_streams(&streams)?;
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let rows = streams.iter().flat_map(|s| {
            (1i32..)
                .zip(&s.events)
                .map(move |(version, event)| (s.stream.as_str(), version, event))
        });
        let mut columns = Columns::with_capacity(streams.iter().map(|s| s.events.len()).sum());
        for (stream, version, event) in rows {
            columns.push(stream, version, event);
        }
        let (client, statement) = self.prepared(CREATE_STREAMS).await?;
        let written = client.query(&statement, &columns.params()).await;
        let rows = match written {
            Ok(rows) => rows,
            Err(e) => {
                return Err(match unique_violation(&e) {
                    Some("events_event_id_key") => {
                        StoreError::DuplicateEvent(duplicate_id(&columns.ids, &e))
                    }
                    Some(_) => {
                        let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or("");
                        let existing = streams
                            .iter()
                            .find(|s| detail.contains(s.stream.as_str()))
                            .or(streams.first())
                            .map(|s| s.stream.clone())
                            .unwrap_or_else(|| StreamId::from_raw(""));
                        let actual = self.stream_head(&client, &existing).await?;
                        StoreError::Conflict {
                            stream: existing,
                            expected: ExpectedVersion::NoStream,
                            actual,
                        }
                    }
                    None => db_error(e),
                });
            }
        };
        self.committed();
        Ok(per_stream(&rows, streams.iter().map(|s| &s.stream)))
    }

    async fn append_streams(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<Appended>, StoreError> {
        check_stream_appends(&appends)?;
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        let version = |v: u32| {
            i32::try_from(v).map_err(|_| StoreError::InvalidAppend("version out of range"))
        };
        let count: usize = appends.iter().map(|a| a.events.len()).sum();
        let mut columns = Columns::with_capacity(count);
        let mut heads = (Vec::with_capacity(appends.len()), Vec::new());
        for append in &appends {
            let at = version(append.expected)?;
            heads.0.push(append.stream.as_str());
            heads.1.push(at);
            for (offset, event) in (1..).zip(&append.events) {
                let version = at.checked_add(offset);
                let version = version.ok_or(StoreError::InvalidAppend("version out of range"))?;
                columns.push(append.stream.as_str(), version, event);
            }
        }
        let (client, statement) = self.prepared(APPEND_STREAMS).await?;
        let mut params = columns.params().to_vec();
        params.extend([&heads.0 as &(dyn ToSql + Sync), &heads.1]);
        let written = client.query(&statement, &params).await;
        let rows = match written {
            Ok(rows) if rows.len() == count => rows,
            Ok(_) => return Err(self.append_conflict(&client, &appends, "").await?),
            Err(e) => {
                return Err(match unique_violation(&e) {
                    Some("events_event_id_key") => {
                        StoreError::DuplicateEvent(duplicate_id(&columns.ids, &e))
                    }
                    Some(_) => {
                        let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or("");
                        self.append_conflict(&client, &appends, detail).await?
                    }
                    None => db_error(e),
                });
            }
        };
        self.committed();
        Ok(per_stream(&rows, appends.iter().map(|a| &a.stream)))
    }

    async fn stream_versions(&self, streams: &[StreamId]) -> Result<Vec<u32>, StoreError> {
        let ids: Vec<&str> = streams.iter().map(StreamId::as_str).collect();
        let (client, statement) = self.prepared(STREAM_VERSIONS).await?;
        let rows = client.query(&statement, &[&ids]).await.map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i32>(0).unsigned_abs())
            .collect())
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_version: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let (client, statement) = self
            .prepared(&format!(
                "SELECT {SELECT_COLUMNS} FROM events \
                 WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
            ))
            .await?;
        let after = i32::try_from(after_version).unwrap_or(i32::MAX);
        let rows = client
            .query(&statement, &[&stream.as_str(), &after])
            .await
            .map_err(db_error)?;
        rows.iter().map(decode_row).collect()
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // The limit is part of the text: a generic plan with `LIMIT $n` guesses a large result
        // and sorts the whole tail instead of walking the commit-order index.
        let (client, statement) = self
            .prepared(&format!(
                "SELECT {SELECT_COLUMNS} FROM events \
                 WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                   AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY events.transaction_id, events.global_position LIMIT {}",
                limit.max(1)
            ))
            .await?;
        // Decode rows as they stream in, while the server is still sending the rest.
        let commit = after.commit.to_string();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&commit, &after.global];
        let rows = client
            .query_raw(&statement, params)
            .await
            .map_err(db_error)?;
        futures_util::pin_mut!(rows);
        let mut events = Vec::with_capacity(limit.min(4096));
        while let Some(row) = rows.next().await {
            events.push(decode_row(&row.map_err(db_error)?)?);
        }
        Ok(events)
    }

    async fn head_position(&self) -> Result<i64, StoreError> {
        self.query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
            .await
    }

    async fn committed_after(&self, after: Position, through: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let commit = after.commit.to_string();
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM events \
                 WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                   AND global_position <= $3)",
                &[&commit, &after.global, &through],
            )
            .await
            .map_err(db_error)?;
        row.try_get(0).map_err(db_error)
    }

    async fn last_position(&self) -> Result<Position, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT transaction_id, global_position FROM events \
                 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row.map_or(Position::START, |r| {
            let Xid8(commit) = r.get(0);
            Position {
                commit,
                global: r.get(1),
            }
        }))
    }

    fn listener(&self) -> Listener {
        Listener::new(self.inner.signal.subscribe(), self.inner.poll_interval)
    }
}

fn decode_row(row: &Row) -> Result<RecordedEvent, StoreError> {
    let global: i64 = row.get(0);
    let corrupt = |reason: String| StoreError::Corrupt {
        global_position: global,
        reason,
    };
    let Xid8(commit) = row.try_get(1).map_err(|e| corrupt(e.to_string()))?;
    let stream_version: i32 = row.try_get(3).map_err(|e| corrupt(e.to_string()))?;
    Ok(RecordedEvent {
        position: Position { commit, global },
        stream_id: StreamId::from_raw(
            row.try_get::<_, String>(2)
                .map_err(|e| corrupt(e.to_string()))?,
        ),
        stream_version: stream_version.unsigned_abs(),
        event_id: row.try_get(4).map_err(|e| corrupt(e.to_string()))?,
        event_type: row.try_get(5).map_err(|e| corrupt(e.to_string()))?,
        event_version: row.try_get(6).map_err(|e| corrupt(e.to_string()))?,
        // Sent as text (cheaper for the server than jsonb's binary form); parsed by the reader.
        payload: Payload::from_text(row.try_get(7).map_err(|e| corrupt(e.to_string()))?)
            .map_err(|e| corrupt(format!("payload: {e}")))?,
        metadata: match row.try_get(8).map_err(|e| corrupt(e.to_string()))? {
            "{}" => Value::Object(serde_json::Map::new()),
            text => serde_json::from_str(text).map_err(|e| corrupt(format!("metadata: {e}")))?,
        },
        recorded_at: row
            .try_get::<_, DateTime<Utc>>(9)
            .map_err(|e| corrupt(e.to_string()))?,
    })
}

/// PostgreSQL's 64-bit transaction id, read in its binary form (8 bytes, big-endian).
struct Xid8(u64);

impl<'a> tokio_postgres::types::FromSql<'a> for Xid8 {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "xid8 is not 8 bytes")?;
        Ok(Self(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        ty.name() == "xid8"
    }
}

/// The constraint a unique violation hit, if the error is one.
fn unique_violation(e: &tokio_postgres::Error) -> Option<&str> {
    let db = e.as_db_error()?;
    (db.code() == &SqlState::UNIQUE_VIOLATION).then(|| db.constraint().unwrap_or(""))
}

fn duplicate_id(ids: &[Uuid], e: &tokio_postgres::Error) -> Uuid {
    let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or("");
    ids.iter()
        .copied()
        .find(|id| detail.contains(&id.to_string()))
        .unwrap_or_else(|| ids.first().copied().unwrap_or_default())
}

/// The columns of a multi-row insert of events, one array each, as [`CREATE_STREAMS`] and
/// [`APPEND_STREAMS`] take them (`$1` to `$7`).
struct Columns<'a> {
    streams: Vec<&'a str>,
    versions: Vec<i32>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    type_versions: Vec<i16>,
    payloads: Vec<&'a Value>,
    metadata: Vec<&'a Value>,
}

impl<'a> Columns<'a> {
    fn with_capacity(count: usize) -> Self {
        Self {
            streams: Vec::with_capacity(count),
            versions: Vec::with_capacity(count),
            ids: Vec::with_capacity(count),
            types: Vec::with_capacity(count),
            type_versions: Vec::with_capacity(count),
            payloads: Vec::with_capacity(count),
            metadata: Vec::with_capacity(count),
        }
    }

    fn push(&mut self, stream: &'a str, version: i32, event: &'a NewEvent) {
        self.streams.push(stream);
        self.versions.push(version);
        self.ids.push(event.event_id);
        self.types.push(event.event_type.as_str());
        self.type_versions.push(event.event_version);
        self.payloads.push(&event.payload);
        self.metadata.push(&event.metadata);
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.streams,
            &self.versions,
            &self.ids,
            &self.types,
            &self.type_versions,
            &self.payloads,
            &self.metadata,
        ]
    }
}

/// What a multi-stream insert appended to each of `streams` (in their order), from the rows it
/// returned (`stream_id, stream_version, global_position`).
fn per_stream<'a>(rows: &[Row], streams: impl Iterator<Item = &'a StreamId>) -> Vec<Appended> {
    let mut positions: std::collections::HashMap<&str, Vec<(i32, i64)>> =
        std::collections::HashMap::new();
    for row in rows {
        positions
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    streams
        .map(|stream| {
            let mut written = positions.remove(stream.as_str()).unwrap_or_default();
            written.sort_unstable();
            Appended {
                stream_version: written.last().map_or(0, |w| w.0.unsigned_abs()),
                global_positions: written.into_iter().map(|w| w.1).collect(),
            }
        })
        .collect()
}
