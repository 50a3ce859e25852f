//! The read models on SQLite. Times are stored as microseconds since the epoch and states as
//! JSON text. Every write goes through the store's single writer connection, which is also what
//! makes a checkpoint's owner unique.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::connection::ConnectionKey;
use domain::keys::StoredDataKey;
use domain::store::{Position, SqliteStore, StoreError, sqlite_read_all_on};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Analyzed, Batch, CHECKPOINTS, Checkpoint, ConnectionFilter, ConnectionSummary, HealthCounts,
    ListDialect, Planner, Providers, ReadModelStore, RebuildGuard, RefreshActivity, RefreshBucket,
    Snapshot, StoredRow, TAIL_BATCH, Tables, Tail, due_expiring_sql, due_keep_alive_sql, find_sql,
    health_sql, instances_sql, list_integrations_sql, list_sql, ownership_and_metadata,
    refresh_activity_sql, swap_sql, upsert_sql, version,
};
use crate::ProjectionError;
use crate::model::Row;

mod side;

use self::side::{search_table, side_tables, tags_table, write_search, write_tags};

/// Whether a row holds OAuth 2.0 credentials.
const OAUTH2: &str = "json_extract(c.state, '$.Active.credentials_type') = 'OAUTH2'";

/// Whether a row's token is renewed ahead of expiry: OAuth 2.0 (with a refresh token, which the
/// refresh state says) or a client-credentials grant. Keep-alives are for refresh tokens only.
const RENEWABLE: &str =
    "json_extract(c.state, '$.Active.credentials_type') IN ('OAUTH2', 'OAUTH2_CC')";

const ROW: &str =
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

/// How SQLite writes a list query's filters: integrations and tags as JSON parameters, the
/// tags looked up pair by pair in `connection_tags` (its `(key, value)` index).
const LIST: ListDialect = ListDialect {
    placeholder: |n| format!("?{n}"),
    integrations: |p| format!("c.provider_config_key IN (SELECT value FROM json_each({p}))"),
    tags: |p| {
        format!(
            "c.stream_id IN (SELECT t.stream_id FROM json_each({p}) j \
             JOIN connection_tags t ON t.key = j.key AND t.value = j.value \
             GROUP BY t.stream_id HAVING count(*) = (SELECT count(*) FROM json_each({p})))"
        )
    },
    // The trigram index (`connection_search`) serves `LIKE` only without `ESCAPE`: a text that
    // needs escapes is matched row by row.
    contains: |p, plain| {
        if plain {
            format!(
                "c.stream_id IN (SELECT d.stream_id FROM connection_search s \
                 JOIN connection_search_docs d ON d.doc = s.rowid WHERE s.search LIKE {p})"
            )
        } else {
            format!("c.search LIKE {p} ESCAPE '\\'")
        }
    },
    ownership_and_metadata: "json_extract(c.state, '$.Active.ownership'), \
     json_extract(c.state, '$.Active.metadata')",
    integer: |p| format!("CAST({p} AS INTEGER)"),
    timestamp: |p| format!("CAST({p} AS INTEGER)"),
    moment: |moment| micros(moment).to_string(),
};

#[derive(Clone)]
pub(super) struct SqliteReadModels {
    store: SqliteStore,
}

impl std::fmt::Debug for SqliteReadModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteReadModels")
    }
}

impl SqliteReadModels {
    pub(super) fn new(store: SqliteStore) -> Self {
        Self { store }
    }

    /// The count `query` makes with its one parameter.
    async fn count(&self, query: &'static str, parameter: i64) -> Result<i64, ProjectionError> {
        Ok(self
            .store
            .read(move |conn| conn.query_row(query, [parameter], |r| r.get(0)).map_err(db))
            .await?)
    }
}

/// A lock on a file beside the database, held for the rebuild: the single writer keeps
/// rebuilds in one process apart, not those of two processes on the file (a `grantline import`
/// beside another, or beside `projections rebuild`), whose clears, loads and swaps would
/// interleave and swap in a table missing most rows. The operating system lets the lock go when
/// the process ends, however it ends.
struct FileLock {
    _file: std::fs::File,
}

impl RebuildGuard for FileLock {}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// Inside a store closure only store errors cross; keep the message.
fn to_store(e: ProjectionError) -> StoreError {
    match e {
        ProjectionError::Store(e) => e,
        other => StoreError::Database(other.to_string()),
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn load(
    conn: &Connection,
    table: &str,
    stream_ids: &[String],
) -> Result<HashMap<String, Snapshot>, StoreError> {
    let mut statement = conn
        .prepare_cached(&format!(
            "SELECT version, state FROM {table} WHERE stream_id = ?1"
        ))
        .map_err(db)?;
    let mut snapshots = HashMap::new();
    for stream_id in stream_ids {
        let found = statement
            .query_row([stream_id], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        if let Some((stored, state)) = found {
            snapshots.insert(
                stream_id.clone(),
                Snapshot {
                    version: version(stored),
                    state,
                },
            );
        }
    }
    Ok(snapshots)
}

fn write(conn: &Connection, table: &str, rows: &[Row]) -> Result<(), StoreError> {
    let mut statement = conn
        .prepare_cached(&upsert_sql(table, ROW, false))
        .map_err(db)?;
    for row in rows {
        let written = statement
            .execute(params![
                row.stream_id,
                row.version,
                row.id,
                row.provider_config_key,
                row.connection_id,
                row.provider,
                micros(row.created_at),
                micros(row.updated_at),
                row.deleted_at.map(micros),
                row.expires_at.map(micros),
                row.refresh_state,
                row.state.get(),
                row.renewed_at.map(micros),
                row.end_user_id,
                row.end_user_org_id,
                row.search,
                row.data_key_id.map(|key| key.to_string()),
            ])
            .map_err(db)?;
        // The tags and the search text move with the row: only when the upsert moved it
        // forward.
        if written > 0 {
            if let Some(tags) = tags_table(table) {
                write_tags(conn, tags, row)?;
            }
            if let Some(search) = search_table(table) {
                write_search(conn, search, row)?;
            }
        }
    }
    Ok(())
}

/// Loads the batch's snapshots, folds it and writes the rows to `table`.
fn fold_into(conn: &Connection, table: &str, batch: Batch) -> Result<(), StoreError> {
    let snapshots = load(conn, table, &batch.stream_ids)?;
    let rows = (batch.fold)(snapshots).map_err(to_store)?;
    write(conn, table, &rows)
}

fn checkpoint(conn: &Connection, name: &str) -> Result<Position, StoreError> {
    conn.query_row(
        "SELECT commit_position, global_position FROM projection_checkpoints WHERE name = ?1",
        [name],
        |r| Ok(Position::from_columns(r.get(0)?, r.get(1)?)),
    )
    .map_err(db)
}

fn set_checkpoint(conn: &Connection, name: &str, at: Position) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE projection_checkpoints SET commit_position = ?2, global_position = ?3, \
         updated_at = ?4, last_error = NULL WHERE name = ?1",
        params![name, at.commit_column(), at.global, micros(Utc::now())],
    )
    .map_err(db)?;
    Ok(())
}

/// Runs `query` (whose rows `map` reads) with `params` and collects the rows.
/// The first log position recorded at or after `since` (micros), by a binary search on the
/// primary key: positions and recording times rise together (one writer at a time), and the log
/// has no index on its recording times.
fn first_position_since(conn: &Connection, since: i64) -> Result<i64, StoreError> {
    let (low, high): (Option<i64>, Option<i64>) = conn
        .query_row(
            "SELECT min(global_position), max(global_position) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db)?;
    let (Some(mut low), Some(high)) = (low, high) else {
        return Ok(0);
    };
    let mut high = high + 1;
    let mut at = conn
        .prepare_cached(
            "SELECT recorded_at FROM events WHERE global_position >= ?1 \
             ORDER BY global_position LIMIT 1",
        )
        .map_err(db)?;
    while low < high {
        let middle = low + (high - low) / 2;
        let recorded: Option<i64> = at
            .query_row(params![middle], |r| r.get(0))
            .optional()
            .map_err(db)?;
        match recorded {
            Some(recorded) if recorded < since => low = middle + 1,
            _ => high = middle,
        }
    }
    Ok(low)
}

fn collect<T, P: rusqlite::Params>(
    conn: &Connection,
    query: &str,
    params: P,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = conn.prepare_cached(query).map_err(db)?;
    let rows = statement.query_map(params, map).map_err(db)?;
    rows.collect::<Result<Vec<T>, _>>().map_err(db)
}

#[async_trait]
impl ReadModelStore for SqliteReadModels {
    async fn find(
        &self,
        table: &'static str,
        stream_id: &str,
    ) -> Result<Option<StoredRow>, ProjectionError> {
        let stream_id = stream_id.to_owned();
        Ok(self
            .store
            .read(move |conn| {
                conn.prepare_cached(&find_sql(table, "state", "?1"))
                    .and_then(|mut s| {
                        s.query_row([&stream_id], |r| {
                            Ok(StoredRow {
                                id: r.get(0)?,
                                version: version(r.get(1)?),
                                state: r.get(2)?,
                            })
                        })
                        .optional()
                    })
                    .map_err(db)
            })
            .await?)
    }

    async fn find_connection(
        &self,
        stream_id: &str,
    ) -> Result<Option<(StoredRow, Option<StoredDataKey>)>, ProjectionError> {
        let stream_id = stream_id.to_owned();
        Ok(self
            .store
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT c.id, c.version, c.state, k.key_id, k.owner, k.master_key_id, \
                     k.wrapped FROM connections c LEFT JOIN data_keys k \
                     ON k.key_id = coalesce(c.data_key_id, \
                                            json_extract(c.state, '$.Active.credentials.key_id')) \
                     WHERE c.stream_id = ?1 AND c.deleted_at IS NULL",
                )
                .and_then(|mut s| {
                    s.query_row([&stream_id], |r| {
                        let key = r
                            .get::<_, Option<String>>(3)?
                            .and_then(|id| uuid::Uuid::parse_str(&id).ok())
                            .map(|key_id| -> rusqlite::Result<StoredDataKey> {
                                Ok(StoredDataKey {
                                    key_id,
                                    owner: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                                    master_key_id: r.get(5)?,
                                    wrapped: r.get(6)?,
                                })
                            })
                            .transpose()?;
                        Ok((
                            StoredRow {
                                id: r.get(0)?,
                                version: version(r.get(1)?),
                                state: r.get(2)?,
                            },
                            key,
                        ))
                    })
                    .optional()
                })
                .map_err(db)
            })
            .await?)
    }

    async fn upsert(&self, table: &'static str, row: Row) -> Result<(), ProjectionError> {
        Ok(self
            .store
            .write(move |conn| write(conn, table, &[row]))
            .await?)
    }

    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<ConnectionSummary>, ProjectionError> {
        let (sql, parameters) = list_sql(filter, &LIST);
        let rows = self
            .store
            .read(move |conn| {
                collect(
                    conn,
                    &sql,
                    rusqlite::params_from_iter(parameters.iter()),
                    |r| {
                        Ok((
                            (
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                            ),
                            (r.get::<_, String>(3)?, r.get::<_, String>(4)?),
                            (r.get::<_, i64>(5)?, r.get::<_, String>(6)?),
                            (
                                r.get::<_, Option<String>>(7)?,
                                r.get::<_, Option<String>>(8)?,
                            ),
                            r.get::<_, Option<i64>>(9)?,
                        ))
                    },
                )
            })
            .await?;
        rows.into_iter()
            .map(
                |(
                    (id, stored_version, connection_id),
                    (key, provider),
                    (created, refresh_state),
                    (ownership, metadata),
                    expires_at,
                )| {
                    let (ownership, metadata) = ownership_and_metadata(
                        &connection_id,
                        ownership.as_deref(),
                        metadata.as_deref(),
                    )?;
                    Ok(ConnectionSummary {
                        id,
                        version: version(stored_version),
                        connection_id,
                        provider_config_key: key,
                        provider,
                        created_at: from_micros(created),
                        refresh_state,
                        ownership,
                        metadata,
                        expires_at: expires_at.map(from_micros),
                    })
                },
            )
            .collect()
    }

    async fn health_counts(
        &self,
        soon: DateTime<Utc>,
        read_since: DateTime<Utc>,
    ) -> Result<HealthCounts, ProjectionError> {
        let (soon, read_since) = (micros(soon), micros(read_since));
        let rows = self
            .store
            .read(move |conn| {
                collect(
                    conn,
                    &health_sql(["?1", "?2"]),
                    params![soon, read_since],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
            })
            .await?;
        let mut counts = HealthCounts::default();
        for (health, count) in rows {
            counts.add(&health, count);
        }
        Ok(counts)
    }

    async fn refresh_activity(
        &self,
        since: DateTime<Utc>,
    ) -> Result<RefreshActivity, ProjectionError> {
        let since = micros(since);
        let (buckets, instances) = self
            .store
            .read(move |conn| {
                let from = first_position_since(conn, since)?;
                let buckets = collect(
                    conn,
                    &refresh_activity_sql("(e.recorded_at / 3600000000) * 3600000000", "?1"),
                    params![from],
                    |r| {
                        Ok(RefreshBucket {
                            provider_config_key: r.get(0)?,
                            hour: from_micros(r.get(1)?),
                            refreshed: r.get(2)?,
                            failed: r.get(3)?,
                        })
                    },
                )?;
                let instances = collect(
                    conn,
                    &instances_sql("json_extract(e.metadata, '$.instance')", "?1"),
                    params![from],
                    |r| r.get::<_, String>(0),
                )?;
                Ok((buckets, instances))
            })
            .await?;
        Ok(RefreshActivity { buckets, instances })
    }

    async fn list_integrations(&self) -> Result<Vec<(String, StoredRow)>, ProjectionError> {
        Ok(self
            .store
            .read(|conn| {
                collect(conn, &list_integrations_sql("state"), [], |r| {
                    Ok((
                        r.get(3)?,
                        StoredRow {
                            id: r.get(0)?,
                            version: version(r.get(1)?),
                            state: r.get(2)?,
                        },
                    ))
                })
            })
            .await?)
    }

    async fn connections_of(
        &self,
        provider_config_key: &str,
    ) -> Result<Vec<String>, ProjectionError> {
        let key = provider_config_key.to_owned();
        Ok(self
            .store
            .read(move |conn| {
                collect(
                    conn,
                    "SELECT connection_id FROM connections \
                     WHERE provider_config_key = ?1 AND deleted_at IS NULL ORDER BY connection_id",
                    [&key],
                    |r| r.get(0),
                )
            })
            .await?)
    }

    async fn due_expiring(
        &self,
        expiring_before: DateTime<Utc>,
        read_since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (expiring_before, read_since) = (micros(expiring_before), micros(read_since));
        Ok(self
            .store
            .read(move |conn| {
                collect(
                    conn,
                    &due_expiring_sql(RENEWABLE, ["?1", "?2", "?3"]),
                    params![expiring_before, read_since, limit],
                    key,
                )
            })
            .await?)
    }

    async fn due_keep_alive(
        &self,
        renewed_before: DateTime<Utc>,
        providers: &Providers,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let renewed_before = micros(renewed_before);
        let (names, pick) = match providers {
            Providers::Only(names) => (names, "c.provider IN (SELECT value FROM json_each(?2))"),
            Providers::Except(names) => {
                (names, "c.provider NOT IN (SELECT value FROM json_each(?2))")
            }
        };
        let names = serde_json::to_string(names).unwrap_or_else(|_| "[]".to_owned());
        Ok(self
            .store
            .read(move |conn| {
                collect(
                    conn,
                    &due_keep_alive_sql(OAUTH2, pick, ["?1", "?3"]),
                    params![renewed_before, names, limit],
                    key,
                )
            })
            .await?)
    }

    async fn note_reads(
        &self,
        reads: Vec<(String, DateTime<Utc>)>,
        step: Duration,
    ) -> Result<(), ProjectionError> {
        if reads.is_empty() {
            return Ok(());
        }
        let step = i64::try_from(step.as_micros()).unwrap_or(i64::MAX);
        Ok(self
            .store
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                {
                    let mut statement = tx
                        .prepare_cached(
                            "INSERT INTO connection_reads (stream_id, last_read_at) \
                             VALUES (?1, ?2) ON CONFLICT (stream_id) DO UPDATE \
                               SET last_read_at = excluded.last_read_at \
                               WHERE last_read_at < excluded.last_read_at - ?3",
                        )
                        .map_err(db)?;
                    for (stream_id, at) in &reads {
                        statement
                            .execute(params![stream_id, micros(*at), step])
                            .map_err(db)?;
                    }
                }
                tx.commit().map_err(db)
            })
            .await?)
    }

    async fn forget_reads(&self, before: DateTime<Utc>) -> Result<u64, ProjectionError> {
        let before = micros(before);
        Ok(self
            .store
            .write(move |conn| {
                conn.execute(
                    "DELETE FROM connection_reads WHERE last_read_at < ?1",
                    [before],
                )
                .map(|n| n as u64)
                .map_err(db)
            })
            .await?)
    }

    async fn count_reads(&self, since: DateTime<Utc>) -> Result<u64, ProjectionError> {
        let count = self
            .count(
                "SELECT count(*) FROM connection_reads WHERE last_read_at >= ?1",
                micros(since),
            )
            .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn checkpoint(&self, name: &'static str) -> Result<Position, ProjectionError> {
        Ok(self.store.read(move |conn| checkpoint(conn, name)).await?)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ProjectionError> {
        Ok(self
            .store
            .read(|conn| {
                collect(conn, CHECKPOINTS, [], |r| {
                    Ok(Checkpoint {
                        name: r.get(0)?,
                        position: Position::from_columns(r.get(1)?, r.get(2)?),
                        updated_at: from_micros(r.get(3)?),
                        last_error: r.get(4)?,
                    })
                })
            })
            .await?)
    }

    async fn record_error(&self, name: &'static str, message: String) {
        let _ = self
            .store
            .write(move |conn| {
                conn.execute(
                    "UPDATE projection_checkpoints SET last_error = ?2 WHERE name = ?1",
                    [name, message.as_str()],
                )
                .map_err(db)
            })
            .await;
    }

    async fn apply(
        &self,
        name: &'static str,
        from: Position,
        batch: Batch,
    ) -> Result<bool, ProjectionError> {
        Ok(self
            .store
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                // Someone (a rebuild) moved the checkpoint since it was read: start over.
                if checkpoint(&tx, name)? != from {
                    return Ok(false);
                }
                let to = batch.to;
                fold_into(&tx, name, batch)?;
                set_checkpoint(&tx, name, to)?;
                tx.commit().map_err(db)?;
                Ok(true)
            })
            .await?)
    }

    async fn lock_rebuild(
        &self,
        name: &'static str,
    ) -> Result<Box<dyn RebuildGuard>, ProjectionError> {
        let failed = |e: String| ProjectionError::Store(StoreError::Database(e));
        let path = format!("{}.rebuild-{name}.lock", self.store.path());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| failed(format!("cannot open the rebuild lock {path}: {e}")))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(FileLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(failed(format!("a rebuild of {name} is already running")))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(failed(format!("cannot take the rebuild lock {path}: {e}")))
            }
        }
    }

    async fn clear(&self, Tables { shadow, .. }: Tables) -> Result<(), ProjectionError> {
        Ok(self
            .store
            .write(move |conn| {
                conn.execute_batch(&format!("DELETE FROM {shadow}"))
                    .map_err(db)?;
                for side in side_tables(shadow) {
                    conn.execute_batch(&format!("DELETE FROM {side}"))
                        .map_err(db)?;
                }
                Ok(())
            })
            .await?)
    }

    async fn write(&self, shadow: &'static str, batch: Batch) -> Result<(), ProjectionError> {
        Ok(self
            .store
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                fold_into(&tx, shadow, batch)?;
                tx.commit().map_err(db)
            })
            .await?)
    }

    async fn events_through(&self, head: i64) -> Result<i64, ProjectionError> {
        self.count(
            "SELECT count(*) FROM events WHERE global_position <= ?1",
            head,
        )
        .await
    }

    async fn analyze(&self, _what: Analyzed) -> Result<(), ProjectionError> {
        // SQLite's own advice: `optimize` analyzes what changed enough to matter.
        Ok(self
            .store
            .write(move |conn| conn.execute_batch("PRAGMA optimize").map_err(db))
            .await?)
    }

    async fn swap(
        &self,
        tables: Tables,
        from: Position,
        planner: Planner,
    ) -> Result<u64, ProjectionError> {
        let Tables { live: name, shadow } = tables;
        // The writer connection is the lock: catch up, swap and hand over in one transaction.
        Ok(self
            .store
            .write(move |conn| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db)?;
                let mut tail = Tail::after(from);
                while let Some(batch) = tail
                    .plan(&planner, &sqlite_read_all_on(&tx, tail.at, TAIL_BATCH)?)
                    .map_err(to_store)?
                {
                    fold_into(&tx, shadow, batch)?;
                }
                tx.execute_batch(&format!("{} DELETE FROM {shadow};", swap_sql(tables)))
                    .map_err(db)?;
                // The tags and the search index go with their rows.
                for (live, shadow) in side_tables(name).zip(side_tables(shadow)) {
                    let side = Tables { live, shadow };
                    tx.execute_batch(&format!("{} DELETE FROM {shadow};", swap_sql(side)))
                        .map_err(db)?;
                }
                set_checkpoint(&tx, name, tail.at)?;
                tx.commit().map_err(db)?;
                Ok(tail.read)
            })
            .await?)
    }
}

/// A due-for-refresh query's row as a connection key.
fn key(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConnectionKey> {
    Ok(ConnectionKey::new(
        r.get::<_, String>(0)?,
        r.get::<_, String>(1)?,
    ))
}
