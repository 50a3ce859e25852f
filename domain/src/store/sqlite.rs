//! Embedded SQLite backend (rusqlite + deadpool-sqlite), the default that needs nothing installed.
//!
//! All writes go through one connection (a pool of size one), so appends are serialized and
//! rowid order is commit order: a reader that follows `global_position` cannot skip an event.
//! Reads use their own pool; WAL mode lets them run beside the writer. `synchronous = FULL`
//! makes every acknowledged append durable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_sqlite::{Config, Hook, HookError, Pool, Runtime};
use rusqlite::{ErrorCode, OptionalExtension, TransactionBehavior, params};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{
    Appended, ChangeSignal, EventStore, ExpectedVersion, Listener, NewEvent, Position,
    RecordedEvent, StoreError, StoreOptions, StreamId, expected_number,
};
use crate::keys::{KeyRepository, MasterKeyRecord, Sealed, StoredDataKey};
use crate::oauth_session::{FlowSession, SessionRepository};

mod embedded {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// Messages kept for a slow local subscriber before it misses some.
const MESSAGE_BACKLOG: usize = 256;

const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;";

/// The SQLite event store and key repository.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Pool,
    readers: Pool,
    inner: Arc<Inner>,
}

struct Inner {
    signal: ChangeSignal,
    poll_interval: Duration,
    /// Messages [`SqliteStore::publish`]ed in this process (the only instance on the file).
    messages: broadcast::Sender<String>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies the migrations.
    pub async fn open(path: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        if let Some(parent) = Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let writer = pool(path, 1)?;
        let readers = pool(path, options.pool_size.max(1))?;
        let store = Self {
            writer,
            readers,
            inner: Arc::new(Inner {
                signal: ChangeSignal::new(),
                poll_interval: options.poll_interval,
                messages: broadcast::channel(MESSAGE_BACKLOG).0,
            }),
        };
        store
            .write(|conn| {
                embedded::migrations::runner()
                    .run(conn)
                    .map(|_| ())
                    .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
            })
            .await?;
        Ok(store)
    }

    /// Sends `payload` to this process's [`SqliteStore::messages`] subscribers: one process
    /// owns the file, so there is no other instance to reach.
    pub fn publish(&self, payload: &str) {
        // No subscriber is not an error.
        let _ = self.inner.messages.send(payload.to_owned());
    }

    /// The messages [`SqliteStore::publish`]ed from now on.
    pub fn messages(&self) -> broadcast::Receiver<String> {
        self.inner.messages.subscribe()
    }

    /// Runs `f` on the single writer connection.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        run(&self.writer, f).await
    }

    /// Runs `f` on a reader connection.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        run(&self.readers, f).await
    }
}

/// The highest migration version embedded in this binary.
pub(super) fn latest_migration() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

impl SqliteStore {
    /// The highest migration version applied to the database (0: none).
    pub(super) async fn applied_migration(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT coalesce(max(version), 0) FROM refinery_schema_history",
                [],
                |row| row.get(0),
            )
            .map_err(db_error)
        })
        .await
    }
}

fn pool(path: &str, size: usize) -> Result<Pool, StoreError> {
    Config::new(path)
        .builder(Runtime::Tokio1)
        .map_err(|e| StoreError::Database(e.to_string()))?
        .max_size(size)
        .post_create(Hook::async_fn(|conn, _| {
            Box::pin(async move {
                conn.interact(|c| c.execute_batch(PRAGMAS))
                    .await
                    .map_err(|e| HookError::message(e.to_string()))?
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .map_err(|e| StoreError::Database(e.to_string()))
}

async fn run<T, F>(pool: &Pool, f: F) -> Result<T, StoreError>
where
    F: FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let conn = pool
        .get()
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?;
    conn.interact(f)
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?
}

/// Converts a SQLite failure.
pub(crate) fn db_error(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

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
        payload: serde_json::from_str(&text(6)?).map_err(|e| corrupt(format!("payload: {e}")))?,
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

#[async_trait]
impl EventStore for SqliteStore {
    #[tracing::instrument(name = "store.append", skip_all, fields(stream_id = %stream))]
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        if events.is_empty() {
            return Err(StoreError::InvalidAppend("no events"));
        }
        let expected_at = expected_number(expected)?;
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
                let mut positions = Vec::with_capacity(events.len());
                {
                    let mut insert = tx
                        .prepare_cached(
                            "INSERT INTO events (stream_id, stream_version, event_id, event_type, \
                             event_version, payload, metadata, recorded_at) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )
                        .map_err(db_error)?;
                    let recorded_at = now_micros();
                    for (offset, event) in (1u32..).zip(&events) {
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
                                Some(ErrorCode::ConstraintViolation)
                                    if e.to_string().contains("event_id") =>
                                {
                                    StoreError::DuplicateEvent(event.event_id)
                                }
                                _ => db_error(e),
                            })?;
                        positions.push(tx.last_insert_rowid());
                    }
                }
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
        self.read(|conn| {
            conn.query_row(
                "SELECT coalesce(max(global_position), 0) FROM events",
                [],
                |r| r.get(0),
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

fn stored_data_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDataKey> {
    let key_id: String = row.get(0)?;
    Ok(StoredDataKey {
        key_id: Uuid::parse_str(&key_id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        owner: row.get(1)?,
        master_key_id: row.get(2)?,
        wrapped: row.get(3)?,
    })
}

#[async_trait]
impl KeyRepository for SqliteStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare(
                    "SELECT m.key_id, m.check_value, m.active, \
                            (SELECT count(*) FROM data_keys d WHERE d.master_key_id = m.key_id) \
                     FROM master_keys m ORDER BY m.created_at",
                )
                .map_err(db_error)?;
            let rows = statement
                .query_map([], |r| {
                    Ok(MasterKeyRecord {
                        key_id: r.get(0)?,
                        check_value: r.get(1)?,
                        active: r.get(2)?,
                        data_keys: r.get::<_, i64>(3)?.unsigned_abs(),
                    })
                })
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn activate_master_key(
        &self,
        key_id: &str,
        check_value: &[u8],
    ) -> Result<(), StoreError> {
        let (key_id, check_value) = (key_id.to_owned(), check_value.to_vec());
        self.write(move |conn| {
            let tx = conn.transaction().map_err(db_error)?;
            tx.execute(
                "UPDATE master_keys SET active = 0 WHERE active = 1 AND key_id <> ?1",
                [&key_id],
            )
            .map_err(db_error)?;
            tx.execute(
                "INSERT INTO master_keys (key_id, check_value, active, created_at) \
                 VALUES (?1, ?2, 1, ?3) ON CONFLICT (key_id) DO UPDATE SET active = 1",
                params![key_id, check_value, now_micros()],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)
        })
        .await
    }

    async fn forget_master_key(&self, key_id: &str) -> Result<(), StoreError> {
        let key_id = key_id.to_owned();
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM master_keys WHERE key_id = ?1 AND active = 0 \
                 AND NOT EXISTS (SELECT 1 FROM data_keys WHERE master_key_id = ?1)",
                [&key_id],
            )
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn insert_data_key(
        &self,
        key_id: Uuid,
        owner: &str,
        master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        let (owner, master_key_id, wrapped) =
            (owner.to_owned(), master_key_id.to_owned(), wrapped.to_vec());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key_id.to_string(),
                    owner,
                    master_key_id,
                    wrapped,
                    now_micros()
                ])
            })
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn data_key(&self, key_id: Uuid) -> Result<Option<StoredDataKey>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys WHERE key_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([key_id.to_string()], stored_data_key)
                    .optional()
            })
            .map_err(db_error)
        })
        .await
    }

    async fn destroy_data_keys(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            conn.execute(
                "UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = ?2 \
                 WHERE owner = ?1 AND wrapped IS NOT NULL",
                params![owner, now_micros()],
            )
            .map(|n| n as u64)
            .map_err(db_error)
        })
        .await
    }

    async fn data_keys_to_rewrap(
        &self,
        active_master_key_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredDataKey>, StoreError> {
        let active = active_master_key_id.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut statement = conn
                .prepare(
                    "SELECT key_id, owner, master_key_id, wrapped FROM data_keys \
                     WHERE master_key_id IS NOT NULL AND master_key_id <> ?1 \
                     ORDER BY key_id LIMIT ?2",
                )
                .map_err(db_error)?;
            let rows = statement
                .query_map(params![active, limit], stored_data_key)
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn rewrap_data_key(
        &self,
        key_id: Uuid,
        from_master_key_id: &str,
        to_master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let (from, to, wrapped) = (
            from_master_key_id.to_owned(),
            to_master_key_id.to_owned(),
            wrapped.to_vec(),
        );
        self.write(move |conn| {
            conn.execute(
                "UPDATE data_keys SET master_key_id = ?3, wrapped = ?4 \
                 WHERE key_id = ?1 AND master_key_id = ?2",
                params![key_id.to_string(), from, to, wrapped],
            )
            .map(|n| n == 1)
            .map_err(db_error)
        })
        .await
    }
}

const SESSION_COLUMNS: &str = "state, provider_config_key, provider, connection_id, callback_url, \
     connection_config, scopes, api_redirect_url, ws_client_id, secrets_key_id, secrets, \
     created_at, expires_at";

#[async_trait]
impl SessionRepository for SqliteStore {
    async fn create_session(&self, session: &FlowSession) -> Result<(), StoreError> {
        let config = serde_json::Value::Object(session.connection_config.clone()).to_string();
        let scopes = serde_json::Value::from(session.scopes.clone()).to_string();
        let session = session.clone();
        self.write(move |conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO oauth_sessions ({SESSION_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    session.state,
                    session.provider_config_key,
                    session.provider,
                    session.connection_id,
                    session.callback_url,
                    config,
                    scopes,
                    session.api_redirect_url,
                    session.ws_client_id,
                    session.secrets.as_ref().map(|s| s.key_id.to_string()),
                    session.secrets.as_ref().map(|s| s.ciphertext.as_slice()),
                    session.created_at.timestamp_micros(),
                    session.expires_at.timestamp_micros(),
                ])
            })
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn take_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let state = state.to_owned();
        // The one writer connection serializes this with every other take.
        self.write(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "DELETE FROM oauth_sessions WHERE state = ?1 RETURNING {SESSION_COLUMNS}"
                ))
                .and_then(|mut s| s.query_row([&state], session_row).optional())
                .map_err(db_error)?;
            row.map(flow_session).transpose()
        })
        .await
    }

    async fn sweep_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = now.timestamp_micros();
        self.write(move |conn| {
            conn.execute("DELETE FROM oauth_sessions WHERE expires_at <= ?1", [now])
                .map(|n| n as u64)
                .map_err(db_error)
        })
        .await
    }
}

/// A session row as SQLite stores it, before its JSON and times are decoded.
struct SessionRow {
    state: String,
    provider_config_key: String,
    provider: String,
    connection_id: String,
    callback_url: String,
    connection_config: String,
    scopes: String,
    api_redirect_url: Option<String>,
    ws_client_id: Option<String>,
    secrets_key_id: Option<String>,
    secrets: Option<Vec<u8>>,
    created_at: i64,
    expires_at: i64,
}

fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        state: row.get(0)?,
        provider_config_key: row.get(1)?,
        provider: row.get(2)?,
        connection_id: row.get(3)?,
        callback_url: row.get(4)?,
        connection_config: row.get(5)?,
        scopes: row.get(6)?,
        api_redirect_url: row.get(7)?,
        ws_client_id: row.get(8)?,
        secrets_key_id: row.get(9)?,
        secrets: row.get(10)?,
        created_at: row.get(11)?,
        expires_at: row.get(12)?,
    })
}

fn flow_session(row: SessionRow) -> Result<FlowSession, StoreError> {
    let corrupt =
        |reason: String| StoreError::Database(format!("unreadable oauth session: {reason}"));
    let connection_config = match serde_json::from_str(&row.connection_config) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(other) => return Err(corrupt(format!("connection_config is {other}"))),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let scopes = serde_json::from_str(&row.scopes).map_err(|e| corrupt(e.to_string()))?;
    let secrets = match (row.secrets_key_id, row.secrets) {
        (Some(key_id), Some(ciphertext)) => Some(Sealed {
            key_id: Uuid::parse_str(&key_id).map_err(|e| corrupt(e.to_string()))?,
            ciphertext,
        }),
        _ => None,
    };
    let time = |micros: i64| {
        DateTime::from_timestamp_micros(micros).ok_or_else(|| corrupt(format!("time {micros}")))
    };
    Ok(FlowSession {
        state: row.state,
        provider_config_key: row.provider_config_key,
        provider: row.provider,
        connection_id: row.connection_id,
        callback_url: row.callback_url,
        connection_config,
        scopes,
        api_redirect_url: row.api_redirect_url,
        ws_client_id: row.ws_client_id,
        secrets,
        created_at: time(row.created_at)?,
        expires_at: time(row.expires_at)?,
    })
}
