//! PostgreSQL backend (tokio-postgres + deadpool-postgres).
//!
//! An append is one statement, so one round trip and one implicit transaction: the expected
//! version is checked by the statement itself (`EXISTS` on the previous version plus the unique
//! `(stream_id, stream_version)` key), which is why no lock is taken and concurrent appenders to
//! different streams commit in parallel. Readers of the whole log stay below the xid8 horizon
//! (see the module docs of [`crate::store`]). After each commit a coalescing notifier sends one
//! `pg_notify` on its own connection, outside the appending transaction, so NOTIFY's queue lock
//! never serializes commits. The same connection also relays short messages between instances
//! ([`PostgresStore::publish`], [`PostgresStore::messages`]), for what is not in the log.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use uuid::Uuid;

use super::{
    Appended, ChangeSignal, EventStore, ExpectedVersion, Listener, NewEvent, Position,
    RecordedEvent, StoreError, StoreOptions, StreamId, expected_number,
};
use crate::keys::{KeyRepository, MasterKeyRecord, Sealed, StoredDataKey};
use crate::oauth_session::{FlowSession, SessionRepository};

mod embedded {
    refinery::embed_migrations!("../migrations/postgres");
}

/// The channel commits are announced on.
const CHANNEL: &str = "grantline_events";
/// The channel instances send each other messages on.
const MESSAGE_CHANNEL: &str = "grantline_messages";
/// Messages kept for a slow local subscriber before it misses some.
const MESSAGE_BACKLOG: usize = 256;
/// The shortest time between two NOTIFYs of one instance.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);
/// Key of the transaction advisory lock that serializes master-key activation.
const MASTER_KEY_LOCK: i64 = 0x6772_616e_746b_6579; // "grantkey"
/// Key of the session advisory lock that serializes migrations across instances.
const MIGRATION_LOCK: i64 = 0x6772_616e_746c_696e; // "grantlin"

/// The PostgreSQL event store and key repository.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    inner: Arc<Inner>,
}

struct Inner {
    signal: ChangeSignal,
    kick: Arc<Notify>,
    poll_interval: Duration,
    /// Messages from every instance (this one included), as the notifier receives them.
    messages: broadcast::Sender<String>,
}

impl PostgresStore {
    /// Connects, applies the migrations under an advisory lock, and starts the notifier.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Database(format!("invalid PostgreSQL URL: {e}")))?;
        migrate(&config).await?;

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        // Fail at start-up, not at the first request, when the database cannot be reached.
        drop(pool.get().await.map_err(pool_error)?);

        let signal = ChangeSignal::new();
        let kick = Arc::new(Notify::new());
        let (messages, _) = broadcast::channel(MESSAGE_BACKLOG);
        tokio::spawn(notifier(
            config,
            signal.sender(),
            kick.clone(),
            messages.clone(),
        ));
        Ok(Self {
            pool,
            inner: Arc::new(Inner {
                signal,
                kick,
                poll_interval: options.poll_interval,
                messages,
            }),
        })
    }

    /// Sends `payload` (under 8000 bytes; never a secret: anyone who can LISTEN sees it) to every
    /// instance on this database, this one included, through [`PostgresStore::messages`].
    /// Best effort: an instance whose notifier is reconnecting misses it.
    pub async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&MESSAGE_CHANNEL, &payload])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// The messages instances [`PostgresStore::publish`] from now on.
    pub fn messages(&self) -> broadcast::Receiver<String> {
        self.inner.messages.subscribe()
    }

    /// The connection pool, for the projections and workers that keep their tables here.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn committed(&self) {
        self.inner.signal.notify();
        self.inner.kick.notify_one();
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
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

/// The highest migration version embedded in this binary.
pub(super) fn latest_migration() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

impl PostgresStore {
    /// How long the oldest transaction holding an xid anywhere in the cluster has been open
    /// (0 when none is). Log readers see events only below the oldest running xid, so this is
    /// how far behind every projection, cache follower and webhook may be held. Needs the
    /// `pg_read_all_stats` role (or superuser) to see other users' sessions.
    pub async fn horizon_age_seconds(&self) -> Result<f64, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(xact_start)), 0)::float8 \
                 FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }

    /// The highest migration version applied to the database (0: none).
    pub(super) async fn applied_migration(&self) -> Result<i64, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT coalesce(max(version), 0)::int8 FROM refinery_schema_history",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }
}

async fn migrate(config: &tokio_postgres::Config) -> Result<(), StoreError> {
    let (mut client, connection) = config.connect(NoTls).await.map_err(db_error)?;
    let driver = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    let outcome = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Database(format!("migration failed: {e}")));
    // Closing the session releases the lock even if the unlock is never sent.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    outcome.map(|_| ())
}

/// Owns one connection that LISTENs for commits of any instance and sends this instance's
/// NOTIFYs, coalesced: many appends while one NOTIFY is in flight cost one more NOTIFY.
async fn notifier(
    config: tokio_postgres::Config,
    changes: watch::Sender<u64>,
    kick: Arc<Notify>,
    relay: broadcast::Sender<String>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if changes.is_closed() {
            return;
        }
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let forward = changes.clone();
                let relay = relay.clone();
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut driver = tokio::spawn(async move {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) if n.channel() == MESSAGE_CHANNEL => {
                                // No local subscriber is not an error.
                                let _ = relay.send(n.payload().to_owned());
                            }
                            Ok(AsyncMessage::Notification(_)) => {
                                forward.send_modify(|n| *n = n.wrapping_add(1));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error.message = %e, "store.notifier connection lost");
                                return;
                            }
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {MESSAGE_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    // A reconnect may have missed notifications: wake the readers to poll.
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                    loop {
                        tokio::select! {
                            () = kick.notified() => {
                                if client.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await.is_err() {
                                    break;
                                }
                                // Each NOTIFY is a transaction with an xid: cap them, since
                                // readers only need to know that something changed.
                                tokio::time::sleep(NOTIFY_INTERVAL).await;
                            }
                            _ = &mut driver => break,
                            () = changes.closed() => {
                                driver.abort();
                                return;
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error.message = %e, "store.notifier cannot connect"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = changes.closed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

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

const SELECT_COLUMNS: &str = "global_position, transaction_id, stream_id, stream_version, \
     event_id, event_type, event_version, payload::text, metadata::text, recorded_at";

#[async_trait]
impl EventStore for PostgresStore {
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
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions: Vec<i16> = events.iter().map(|e| e.event_version).collect();
        let payloads: Vec<&Value> = events.iter().map(|e| &e.payload).collect();
        let metadata: Vec<&Value> = events.iter().map(|e| &e.metadata).collect();

        let client = self.client().await?;
        // `Any` can lose the race for the end of the stream; it just tries again.
        for _ in 0..8 {
            let result = match (expected_at, events.as_slice()) {
                (Some(at), [event]) => {
                    let statement = client
                        .prepare_cached(INSERT_ONE_AT)
                        .await
                        .map_err(db_error)?;
                    let at = i32::try_from(at)
                        .map_err(|_| StoreError::InvalidAppend("version out of range"))?;
                    client
                        .query(
                            &statement,
                            &[
                                &stream.as_str(),
                                &at,
                                &event.event_id,
                                &event.event_type,
                                &event.event_version,
                                &event.payload,
                                &event.metadata,
                            ],
                        )
                        .await
                }
                (Some(at), _) => {
                    let statement = client.prepare_cached(INSERT_AT).await.map_err(db_error)?;
                    let at = i32::try_from(at)
                        .map_err(|_| StoreError::InvalidAppend("version out of range"))?;
                    client
                        .query(
                            &statement,
                            &[
                                &stream.as_str(),
                                &at,
                                &ids,
                                &types,
                                &versions,
                                &payloads,
                                &metadata,
                            ],
                        )
                        .await
                }
                (None, _) => {
                    let statement = client
                        .prepare_cached(INSERT_AT_END)
                        .await
                        .map_err(db_error)?;
                    client
                        .query(
                            &statement,
                            &[
                                &stream.as_str(),
                                &ids,
                                &types,
                                &versions,
                                &payloads,
                                &metadata,
                            ],
                        )
                        .await
                }
            };
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

    async fn read_stream(
        &self,
        stream: &StreamId,
        after_version: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {SELECT_COLUMNS} FROM events \
                 WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
            ))
            .await
            .map_err(db_error)?;
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
        let client = self.client().await?;
        // The limit is part of the text: a generic plan with `LIMIT $n` guesses a large result
        // and sorts the whole tail instead of walking the commit-order index.
        let statement = client
            .prepare_cached(&format!(
                "SELECT {SELECT_COLUMNS} FROM events \
                 WHERE (transaction_id, global_position) > ($1::text::xid8, $2) \
                   AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY events.transaction_id, events.global_position LIMIT {}",
                limit.max(1)
            ))
            .await
            .map_err(db_error)?;
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
        let client = self.client().await?;
        let row = client
            .query_one("SELECT coalesce(max(global_position), 0) FROM events", &[])
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
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
        // Sent as text (cheaper for the server than jsonb's binary form) and parsed here.
        payload: serde_json::from_str(row.try_get(7).map_err(|e| corrupt(e.to_string()))?)
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

fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Database(e.to_string())
}

#[async_trait]
impl KeyRepository for PostgresStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT m.key_id, m.check_value, m.active, \
                        (SELECT count(*) FROM data_keys d WHERE d.master_key_id = m.key_id) \
                 FROM master_keys m ORDER BY m.created_at",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| MasterKeyRecord {
                key_id: r.get(0),
                check_value: r.get(1),
                active: r.get(2),
                data_keys: r.get::<_, i64>(3).unsigned_abs(),
            })
            .collect())
    }

    async fn activate_master_key(
        &self,
        key_id: &str,
        check_value: &[u8],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // Instances starting together would otherwise race on the one-active-key index, which
        // ON CONFLICT (key_id) does not arbitrate.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MASTER_KEY_LOCK])
            .await
            .map_err(db_error)?;
        tx.execute(
            "UPDATE master_keys SET active = false WHERE active AND key_id <> $1",
            &[&key_id],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO master_keys (key_id, check_value, active) VALUES ($1, $2, true) \
             ON CONFLICT (key_id) DO UPDATE SET active = true",
            &[&key_id, &check_value],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn forget_master_key(&self, key_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM master_keys WHERE key_id = $1 AND NOT active \
                 AND NOT EXISTS (SELECT 1 FROM data_keys WHERE master_key_id = $1)",
                &[&key_id],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn insert_data_key(
        &self,
        key_id: Uuid,
        owner: &str,
        master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(db_error)?;
        client
            .execute(&statement, &[&key_id, &owner, &master_key_id, &wrapped])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn data_key(&self, key_id: Uuid) -> Result<Option<StoredDataKey>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys WHERE key_id = $1",
            )
            .await
            .map_err(db_error)?;
        let row = client
            .query_opt(&statement, &[&key_id])
            .await
            .map_err(db_error)?;
        Ok(row.as_ref().map(stored_data_key))
    }

    async fn destroy_data_keys(&self, owner: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = now() \
                 WHERE owner = $1 AND wrapped IS NOT NULL",
                &[&owner],
            )
            .await
            .map_err(db_error)
    }

    async fn data_keys_to_rewrap(
        &self,
        active_master_key_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredDataKey>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys \
                 WHERE master_key_id IS NOT NULL AND master_key_id <> $1 ORDER BY key_id LIMIT $2",
                &[&active_master_key_id, &limit],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(stored_data_key).collect())
    }

    async fn rewrap_data_key(
        &self,
        key_id: Uuid,
        from_master_key_id: &str,
        to_master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE data_keys SET master_key_id = $3, wrapped = $4 \
                 WHERE key_id = $1 AND master_key_id = $2",
                &[&key_id, &from_master_key_id, &to_master_key_id, &wrapped],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }
}

fn stored_data_key(row: &Row) -> StoredDataKey {
    StoredDataKey {
        key_id: row.get(0),
        owner: row.get(1),
        master_key_id: row.get(2),
        wrapped: row.get(3),
    }
}

const SESSION_COLUMNS: &str = "state, provider_config_key, provider, connection_id, callback_url, \
     connection_config, scopes, api_redirect_url, ws_client_id, secrets_key_id, secrets, \
     created_at, expires_at";

#[async_trait]
impl SessionRepository for PostgresStore {
    async fn create_session(&self, session: &FlowSession) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "INSERT INTO oauth_sessions ({SESSION_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            ))
            .await
            .map_err(db_error)?;
        let config = Value::Object(session.connection_config.clone());
        let scopes = Value::from(session.scopes.clone());
        let secrets_key_id = session.secrets.as_ref().map(|s| s.key_id);
        let secrets = session.secrets.as_ref().map(|s| s.ciphertext.as_slice());
        client
            .execute(
                &statement,
                &[
                    &session.state,
                    &session.provider_config_key,
                    &session.provider,
                    &session.connection_id,
                    &session.callback_url,
                    &config,
                    &scopes,
                    &session.api_redirect_url,
                    &session.ws_client_id,
                    &secrets_key_id,
                    &secrets,
                    &session.created_at,
                    &session.expires_at,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn take_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "DELETE FROM oauth_sessions WHERE state = $1 RETURNING {SESSION_COLUMNS}"
            ))
            .await
            .map_err(db_error)?;
        let row = client
            .query_opt(&statement, &[&state])
            .await
            .map_err(db_error)?;
        row.as_ref().map(flow_session).transpose()
    }

    async fn sweep_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM oauth_sessions WHERE expires_at <= $1", &[&now])
            .await
            .map_err(db_error)
    }
}

fn flow_session(row: &Row) -> Result<FlowSession, StoreError> {
    let corrupt =
        |reason: String| StoreError::Database(format!("unreadable oauth session: {reason}"));
    let connection_config = match row.get::<_, Value>(5) {
        Value::Object(map) => map,
        other => return Err(corrupt(format!("connection_config is {other}"))),
    };
    let scopes: Vec<String> =
        serde_json::from_value(row.get::<_, Value>(6)).map_err(|e| corrupt(e.to_string()))?;
    let secrets = match (
        row.get::<_, Option<Uuid>>(9),
        row.get::<_, Option<Vec<u8>>>(10),
    ) {
        (Some(key_id), Some(ciphertext)) => Some(Sealed { key_id, ciphertext }),
        _ => None,
    };
    Ok(FlowSession {
        state: row.get(0),
        provider_config_key: row.get(1),
        provider: row.get(2),
        connection_id: row.get(3),
        callback_url: row.get(4),
        connection_config,
        scopes,
        api_redirect_url: row.get(7),
        ws_client_id: row.get(8),
        secrets,
        created_at: row.get(11),
        expires_at: row.get(12),
    })
}
