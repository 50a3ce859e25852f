//! Where the read models are kept: one trait, one implementation per backend, chosen once by
//! [`ReadModels::open`] (the only place in this crate that looks at which backend it is).
//!
//! Guarantees every implementation keeps:
//! - A row only moves forward: an upsert at or below the stored version changes nothing, so an
//!   event applied early by its command (read-your-writes) is not applied twice, and a deleted
//!   row keeps its keys and creation time.
//! - [`ReadModelStore::apply`] writes a batch's rows and moves the checkpoint past it in one
//!   transaction, and only if the checkpoint is still where the batch was read from and no
//!   other runner holds it (`FOR UPDATE SKIP LOCKED` on PostgreSQL, the single writer on
//!   SQLite); otherwise it writes nothing and says so. No transaction is held open while the
//!   log is read.
//! - [`ReadModelStore::swap`] makes the shadow table the live one atomically, after folding the
//!   log's tail into it while the live runner is stopped; readers see the old table or the new
//!   one, never a mix.
//! - Every query hides deleted rows; lists also hide connections of deleted integrations.

mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::connect_session::Ownership;
use domain::connection::ConnectionKey;
use domain::keys::StoredDataKey;
use domain::store::{Backend, Position, RecordedEvent, StoreError};

use serde_json::{Map, Value};

use crate::ProjectionError;
use crate::model::Row;

/// Whose planner statistics [`ReadModelStore::analyze`] brings up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Analyzed {
    /// The read models (after a rebuild's swap).
    ReadModels,
    /// The log only (after an import whose rebuild already analyzed the read models).
    Log,
    /// Both (after an import caught the read models up).
    Both,
}

/// A live row as stored: Nango's numeric id, the stream version it reflects, and the
/// aggregate's state as JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRow {
    pub id: i64,
    pub version: u32,
    pub state: String,
}

/// A line of the connection list.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionSummary {
    pub id: i64,
    /// The stream version the row reflects.
    pub version: u32,
    pub connection_id: String,
    pub provider_config_key: String,
    pub provider: String,
    pub created_at: DateTime<Utc>,
    /// The one-word refresh summary (`failed`, `retrying`, `ok`, …).
    pub refresh_state: String,
    pub ownership: Ownership,
    /// `None` when empty.
    pub metadata: Option<Map<String, Value>>,
    /// When the access token expires, when known.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where a connection's refresh stands, as the dashboard filters and counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Its refresh failed for good: the end user must authorize again.
    Failed,
    /// Its last refresh failed and is being retried.
    Retrying,
    /// Its access token expires before the moment given with the filter.
    Expiring(DateTime<Utc>),
    /// Not read since the moment given with the filter.
    Idle(DateTime<Utc>),
}

/// How many live connections are in each health class; a connection counts once, in the first
/// class that holds: failed, retrying, expiring, idle, valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthCounts {
    pub failed: i64,
    pub retrying: i64,
    /// Expiring before the moment given.
    pub expiring: i64,
    /// Not read since the moment given.
    pub idle: i64,
    pub valid: i64,
}

/// Refresh outcomes of one integration in one hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshBucket {
    pub provider_config_key: String,
    /// The start of the hour.
    pub hour: DateTime<Utc>,
    pub refreshed: i64,
    pub failed: i64,
}

/// What the log shows of refreshes since a moment: outcomes per integration and hour, and the
/// instances that appended events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefreshActivity {
    pub buckets: Vec<RefreshBucket>,
    /// Instance names found in the events' metadata (at most [`MAX_INSTANCES`]).
    pub instances: Vec<String>,
}

/// The most instance names [`RefreshActivity`] lists.
pub const MAX_INSTANCES: i64 = 50;

/// Which connections a list shows (every condition given must hold), and which page of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionFilter {
    /// Exactly this connection id (of any integration).
    pub connection_id: Option<String>,
    /// A substring of the connection id, the end user's display name or e-mail; matched as
    /// given against their lower-cased text, so give it lower-cased.
    pub search: Option<String>,
    pub end_user_id: Option<String>,
    pub end_user_org_id: Option<String>,
    /// Any of these integrations; all when empty.
    pub integrations: Vec<String>,
    /// All of these tags.
    pub tags: BTreeMap<String, String>,
    /// Only connections in this health class.
    pub health: Option<Health>,
    /// At most this many, newest first…
    pub limit: u32,
    /// …after skipping this many.
    pub offset: u64,
}

impl ConnectionFilter {
    /// How many a list holds when the caller does not say (Nango's default).
    pub const DEFAULT_LIMIT: u32 = 10_000;
}

impl Default for ConnectionFilter {
    /// Every live connection (up to the default limit).
    fn default() -> Self {
        Self {
            connection_id: None,
            search: None,
            end_user_id: None,
            end_user_org_id: None,
            integrations: Vec::new(),
            tags: BTreeMap::new(),
            health: None,
            limit: Self::DEFAULT_LIMIT,
            offset: 0,
        }
    }
}

/// A stored snapshot as a fold starts from it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u32,
    /// The state as JSON text.
    pub state: String,
}

/// Folds a batch's events onto the snapshots of its streams: the rows to write.
pub type Fold =
    Box<dyn FnOnce(HashMap<String, Snapshot>) -> Result<Vec<Row>, ProjectionError> + Send>;

/// What one batch of the log does to a read model.
pub struct Batch {
    /// The streams the batch touches, whose snapshots the fold starts from.
    pub stream_ids: Vec<String>,
    pub fold: Fold,
    /// The position of the batch's last event: the checkpoint after it.
    pub to: Position,
    /// None of its streams has a row in the table it is written to (a rebuild's batch of streams
    /// it has not written yet): its rows are inserted, with no upsert.
    pub fresh: bool,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("streams", &self.stream_ids.len())
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// Turns events read from the log into a [`Batch`] (decoding the ones of its category).
pub type Planner = Arc<dyn Fn(&[RecordedEvent]) -> Result<Batch, ProjectionError> + Send + Sync>;

/// A projection's checkpoint as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    pub position: Position,
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Held while a rebuild runs; dropping it lets another rebuild of the same projection start.
pub trait RebuildGuard: Send {}

/// A projection's two tables, which a rebuild's [`swap`](ReadModelStore::swap) trades places.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    /// The table readers see, named after the projection: its name also keys the checkpoint.
    pub live: &'static str,
    /// The table a rebuild fills.
    pub shadow: &'static str,
}

/// Which providers a keep-alive query covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Providers {
    /// Only these.
    Only(Vec<String>),
    /// All but these.
    Except(Vec<String>),
}

/// What every due-for-refresh query requires of a connection (the partial index on
/// `renewed_at` is built on the first two conditions).
const REFRESHABLE: &str = "c.deleted_at IS NULL \
     AND c.refresh_state NOT IN ('failed', 'no_refresh_token') \
     AND EXISTS (SELECT 1 FROM integrations i \
       WHERE i.provider_config_key = c.provider_config_key AND i.deleted_at IS NULL)";

/// The in-use connections expiring soon (see [`ReadModelStore::due_expiring`]), in a dialect:
/// `oauth2` tests a row's credentials type, `[expiring_before, read_since, limit]` are the
/// placeholders.
fn due_expiring_sql(oauth2: &str, [expiring_before, read_since, limit]: [&str; 3]) -> String {
    format!(
        "SELECT c.provider_config_key, c.connection_id FROM connection_reads r \
         JOIN connections c ON c.stream_id = r.stream_id \
         WHERE r.last_read_at >= {read_since} AND c.expires_at < {expiring_before} \
           AND {REFRESHABLE} AND {oauth2} \
         ORDER BY c.expires_at, c.stream_id LIMIT {limit}"
    )
}

/// The connections due a keep-alive (see [`ReadModelStore::due_keep_alive`]), in a dialect:
/// `pick` selects the providers, `[renewed_before, limit]` are the placeholders.
fn due_keep_alive_sql(oauth2: &str, pick: &str, [renewed_before, limit]: [&str; 2]) -> String {
    format!(
        "SELECT c.provider_config_key, c.connection_id FROM connections c \
         WHERE c.renewed_at < {renewed_before} AND {pick} AND {REFRESHABLE} AND {oauth2} \
         ORDER BY c.renewed_at, c.stream_id LIMIT {limit}"
    )
}

/// The operations on the read models, their checkpoints and their shadow tables. Table names
/// are the [`StateModel`](crate::StateModel) constants, never input.
#[async_trait]
pub trait ReadModelStore: Send + Sync + std::fmt::Debug {
    /// The live (not deleted) row of `stream_id` in `table`.
    async fn find(
        &self,
        table: &'static str,
        stream_id: &str,
    ) -> Result<Option<StoredRow>, ProjectionError>;

    /// The live connection row of `stream_id`, with the data key its current credentials are
    /// sealed under, as the key store holds it now: one query, so a read that misses every
    /// cache costs one round trip.
    async fn find_connection(
        &self,
        stream_id: &str,
    ) -> Result<Option<(StoredRow, Option<StoredDataKey>)>, ProjectionError>;

    /// Writes one row outside a projection batch (read-your-writes), unless the stored row is
    /// at or past its version.
    async fn upsert(&self, table: &'static str, row: Row) -> Result<(), ProjectionError>;

    /// Live connections of live integrations that `filter` picks, newest first (creation time,
    /// then id), one page of them.
    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<ConnectionSummary>, ProjectionError>;

    /// How many live connections are in each health class: expiring before `soon`, idle when
    /// not read since `read_since`.
    async fn health_counts(
        &self,
        soon: DateTime<Utc>,
        read_since: DateTime<Utc>,
    ) -> Result<HealthCounts, ProjectionError>;

    /// Refresh outcomes per integration and hour, and the instances seen, in the log since
    /// `since` (found by its recording times, which follow the log's order closely).
    async fn refresh_activity(
        &self,
        since: DateTime<Utc>,
    ) -> Result<RefreshActivity, ProjectionError>;

    /// Live integrations by key, with their stream ids.
    async fn list_integrations(&self) -> Result<Vec<(String, StoredRow)>, ProjectionError>;

    /// The ids of the live connections of `provider_config_key`, whatever its integration's
    /// state.
    async fn connections_of(
        &self,
        provider_config_key: &str,
    ) -> Result<Vec<String>, ProjectionError>;

    /// Refreshable OAuth 2.0 connections of live integrations read at or after `read_since`
    /// whose access token expires before `expiring_before`, soonest first.
    async fn due_expiring(
        &self,
        expiring_before: DateTime<Utc>,
        read_since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError>;

    /// Refreshable OAuth 2.0 connections of live integrations, of the providers `providers`
    /// picks, whose tokens were last issued before `renewed_before`, oldest first.
    async fn due_keep_alive(
        &self,
        renewed_before: DateTime<Utc>,
        providers: &Providers,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError>;

    /// Records reads: each stream's last read moves forward to the time given (never back), and
    /// only when by more than `step` (a stream read all the time is written once per `step`).
    async fn note_reads(
        &self,
        reads: Vec<(String, DateTime<Utc>)>,
        step: Duration,
    ) -> Result<(), ProjectionError>;

    /// Forgets the reads older than `before`; returns how many.
    async fn forget_reads(&self, before: DateTime<Utc>) -> Result<u64, ProjectionError>;

    /// How many streams were read at or after `since`.
    async fn count_reads(&self, since: DateTime<Utc>) -> Result<u64, ProjectionError>;

    /// Where projection `name` stands.
    async fn checkpoint(&self, name: &'static str) -> Result<Position, ProjectionError>;

    /// Every projection's checkpoint, by name.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ProjectionError>;

    /// Notes the error that stopped projection `name` on its checkpoint (best effort).
    async fn record_error(&self, name: &'static str, message: String);

    /// Applies `batch` to projection `name`'s table (which bears its name) and moves its
    /// checkpoint from `from` to `batch.to`, in one transaction. `false` (nothing written) when
    /// the checkpoint is held by another runner or is no longer at `from`.
    async fn apply(
        &self,
        name: &'static str,
        from: Position,
        batch: Batch,
    ) -> Result<bool, ProjectionError>;

    /// Claims the rebuild of `name` (one at a time across instances); an error when another
    /// rebuild holds it.
    async fn lock_rebuild(
        &self,
        name: &'static str,
    ) -> Result<Box<dyn RebuildGuard>, ProjectionError>;

    /// Empties `tables.shadow` for a rebuild to fill.
    async fn clear(&self, tables: Tables) -> Result<(), ProjectionError>;

    /// Gives `tables.shadow`, now filled, whatever indexes [`clear`](Self::clear) left out
    /// for the load; the swap follows.
    async fn index(&self, tables: Tables) -> Result<(), ProjectionError> {
        let _ = tables;
        Ok(())
    }

    /// Writes a batch's rows to `shadow`, without a checkpoint.
    async fn write(&self, shadow: &'static str, batch: Batch) -> Result<(), ProjectionError>;

    /// How many events the log holds at or below global position `head`, visible to readers
    /// or not: a rebuild that read fewer must wait for the rest.
    async fn events_through(&self, head: i64) -> Result<i64, ProjectionError>;

    /// Refreshes the planner's statistics of the read-model tables and the log: after a bulk
    /// write (an import, a rebuild's swap) they describe the tables before it, and plans made
    /// from them can be orders of magnitude slower (a sort or scan of every row instead of an
    /// index walk) until autovacuum gets to them. On PostgreSQL the read models are vacuumed
    /// too, which empties the GIN indexes' pending lists (measured on 300,000 imported
    /// connections: a tag filter 3.4 → 0.8 ms, a search 14 → 10 ms). `log`: the log grew too
    /// (an import; a rebuild only reads it, and analyzing 100,000 events took 0.44 s of its
    /// 4.5 s).
    async fn analyze(&self, what: Analyzed) -> Result<(), ProjectionError>;

    /// Stops the live runner of projection `tables.live`, folds the log after `from` into
    /// `tables.shadow` with `planner`, swaps the two tables, empties the new shadow and moves the
    /// checkpoint to the end of the tail, atomically. Returns how many tail events it read.
    async fn swap(
        &self,
        tables: Tables,
        from: Position,
        planner: Planner,
    ) -> Result<u64, ProjectionError>;
}

/// The read models of one backend: a cheap, shared handle on its [`ReadModelStore`]. The typed
/// queries of [`crate::queries`] take it.
#[derive(Clone, Debug)]
pub struct ReadModels(Arc<dyn ReadModelStore>);

impl ReadModels {
    /// The read models kept in `backend`'s database.
    pub fn open(backend: &Backend) -> Self {
        Self(match backend {
            Backend::Postgres(store) => Arc::new(postgres::PostgresReadModels::new(store.clone())),
            Backend::Sqlite(store) => Arc::new(sqlite::SqliteReadModels::new(store.clone())),
        })
    }

    /// The store behind the handle.
    pub fn store(&self) -> &dyn ReadModelStore {
        &*self.0
    }
}

/// Columns written by an upsert, in order.
const COLUMNS: &str = "stream_id, version, id, provider_config_key, connection_id, provider, \
     created_at, updated_at, deleted_at, expires_at, refresh_state, state, renewed_at, \
     end_user_id, end_user_org_id, search, data_key_id";

/// Upsert that only moves a row forward, and keeps a deleted row's keys and creation time; the
/// rows come from `source` (`VALUES (…)`, or a `SELECT` of many rows, one per stream), with a
/// last `tags` column where the dialect keeps tags in the row.
fn upsert_sql(table: &str, source: &str, tags_column: bool) -> String {
    let (tags, set_tags) = if tags_column {
        (", tags", ", tags = excluded.tags")
    } else {
        ("", "")
    };
    format!(
        "INSERT INTO {table} AS t ({COLUMNS}{tags}) {source} \
         ON CONFLICT (stream_id) DO UPDATE SET \
           version = excluded.version, id = excluded.id, \
           provider_config_key = coalesce(nullif(excluded.provider_config_key, ''), t.provider_config_key), \
           connection_id = coalesce(nullif(excluded.connection_id, ''), t.connection_id), \
           provider = coalesce(nullif(excluded.provider, ''), t.provider), \
           created_at = CASE WHEN excluded.deleted_at IS NULL THEN excluded.created_at ELSE t.created_at END, \
           updated_at = excluded.updated_at, deleted_at = excluded.deleted_at, \
           expires_at = excluded.expires_at, refresh_state = excluded.refresh_state, \
           state = excluded.state, renewed_at = excluded.renewed_at, \
           end_user_id = excluded.end_user_id, end_user_org_id = excluded.end_user_org_id, \
           search = excluded.search, data_key_id = excluded.data_key_id{set_tags} \
         WHERE t.version < excluded.version"
    )
}

/// The live row of a stream, its state read as `state` (an expression giving JSON text).
fn find_sql(table: &str, state: &str, placeholder: &str) -> String {
    format!(
        "SELECT id, version, {state} FROM {table} \
         WHERE stream_id = {placeholder} AND deleted_at IS NULL"
    )
}

/// How a dialect writes the parts of a list query that differ.
struct ListDialect {
    /// The `n`-th (1-based) text parameter.
    placeholder: fn(usize) -> String,
    /// `c.provider_config_key` is one of the keys in the JSON array `parameter`.
    integrations: fn(&str) -> String,
    /// The connection `c` has every tag of the JSON object `parameter`.
    tags: fn(&str) -> String,
    /// `c.search` contains the text of the `LIKE` pattern `parameter` (`%text%`, with `\\`
    /// escapes; `plain`: the text has no `%`, `_` or `\\`, so the pattern needs none).
    contains: fn(&str, bool) -> String,
    /// The JSON text of `c`'s ownership and metadata (as two columns).
    ownership_and_metadata: &'static str,
    /// The text `parameter` as an integer.
    integer: fn(&str) -> String,
    /// The text `parameter` as the type of timestamp columns.
    timestamp: fn(&str) -> String,
    /// A moment as the text [`ListDialect::timestamp`] reads.
    moment: fn(DateTime<Utc>) -> String,
}

/// The list query for `filter` in `dialect`, with its parameters (all text): live connections of
/// live integrations, newest first. Every filter has an index behind it (the migrations' notes).
fn list_sql(filter: &ConnectionFilter, dialect: &ListDialect) -> (String, Vec<String>) {
    // The page is picked by its keys alone; the ownership and metadata are read out of the
    // state only for the rows of the page. Read for every row the page skips or sorts, they
    // were most of the time of a page deep in a list (measured at 1,000,000 connections on
    // PostgreSQL: page 20 of an integration 45 → 4 ms, a tag 31 → 7 ms).
    let mut sql = String::from(
        "SELECT c.stream_id FROM connections c \
         WHERE c.deleted_at IS NULL AND EXISTS (SELECT 1 FROM integrations i \
           WHERE i.provider_config_key = c.provider_config_key AND i.deleted_at IS NULL)",
    );
    let mut parameters = Vec::new();
    let mut condition = |parameter: String, clause: &dyn Fn(&str) -> String| {
        parameters.push(parameter);
        sql.push_str(" AND ");
        sql.push_str(&clause(&(dialect.placeholder)(parameters.len())));
    };
    if let Some(id) = &filter.connection_id {
        condition(id.clone(), &|p| format!("c.connection_id = {p}"));
    }
    if let Some(id) = &filter.end_user_id {
        condition(id.clone(), &|p| format!("c.end_user_id = {p}"));
    }
    if let Some(id) = &filter.end_user_org_id {
        condition(id.clone(), &|p| format!("c.end_user_org_id = {p}"));
    }
    if let Some(search) = &filter.search {
        let contains = |text: &str| {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        };
        match email_local_part(search) {
            // An e-mail's domain is shared by many end users, so its trigrams select almost
            // nothing, and reading their posting lists is most of a search's time (measured at
            // 1,000,000 connections that share one domain: 40 ms for `user500000@example`,
            // 14 ms for `user500000@`). The index is asked for the part up to the `@`; the
            // whole text is checked on the rows it finds (`|| ''` keeps that check off the
            // index).
            Some(local) => {
                condition(contains(local), &|p| (dialect.contains)(p, plain(local)));
                condition(contains(search), &|p| {
                    format!("(c.search || '') LIKE {p} ESCAPE '\\'")
                });
            }
            None => condition(contains(search), &|p| (dialect.contains)(p, plain(search))),
        }
    }
    if !filter.integrations.is_empty() {
        let keys = serde_json::to_string(&filter.integrations).unwrap_or_default();
        condition(keys, &|p| (dialect.integrations)(p));
    }
    if !filter.tags.is_empty() {
        let tags = serde_json::to_string(&filter.tags).unwrap_or_default();
        condition(tags, &|p| (dialect.tags)(p));
    }
    match filter.health {
        // The partial index `connections_failing` serves both.
        Some(Health::Failed) => {
            sql.push_str(
                " AND c.refresh_state IN ('failed', 'retrying') AND c.refresh_state = 'failed'",
            );
        }
        Some(Health::Retrying) => {
            sql.push_str(
                " AND c.refresh_state IN ('failed', 'retrying') AND c.refresh_state = 'retrying'",
            );
        }
        Some(Health::Expiring(before)) => {
            condition((dialect.moment)(before), &|p| {
                format!("c.expires_at < {}", (dialect.timestamp)(p))
            });
        }
        Some(Health::Idle(since)) => {
            condition((dialect.moment)(since), &|p| {
                format!(
                    "NOT EXISTS (SELECT 1 FROM connection_reads r \
                     WHERE r.stream_id = c.stream_id AND r.last_read_at >= {})",
                    (dialect.timestamp)(p)
                )
            });
        }
        None => {}
    }
    // The page is a parameter too, so that one prepared statement serves every page.
    parameters.push(filter.limit.to_string());
    let limit = (dialect.integer)(&(dialect.placeholder)(parameters.len()));
    parameters.push(filter.offset.min(i64::MAX as u64).to_string());
    let offset = (dialect.integer)(&(dialect.placeholder)(parameters.len()));
    let sql = format!(
        "SELECT c.id, c.version, c.connection_id, c.provider_config_key, c.provider, \
           c.created_at, c.refresh_state, {}, c.expires_at \
         FROM ({sql} ORDER BY c.created_at DESC, c.id DESC LIMIT {limit} OFFSET {offset}) page \
         JOIN connections c ON c.stream_id = page.stream_id \
         ORDER BY c.created_at DESC, c.id DESC",
        dialect.ownership_and_metadata
    );
    (sql, parameters)
}

/// Whether `text` has none of the characters a `LIKE` pattern must escape.
fn plain(text: &str) -> bool {
    !text.contains(['%', '_', '\\'])
}

/// The part of an e-mail-like search up to and including its `@`, when a domain follows it and
/// the part before it is long enough to have trigrams of its own (three letters or digits).
fn email_local_part(search: &str) -> Option<&str> {
    let at = search.find('@')?;
    let before = &search[..at];
    let letters = before
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric())
        .count();
    (letters >= 3 && at + 1 < search.len()).then(|| &search[..=at])
}

/// A list row's ownership and metadata, from their JSON text (absent when NULL).
fn ownership_and_metadata(
    connection_id: &str,
    ownership: Option<&str>,
    metadata: Option<&str>,
) -> Result<(Ownership, Option<Map<String, Value>>), ProjectionError> {
    let corrupt = |e: serde_json::Error| ProjectionError::CorruptRow {
        table: "connections",
        stream_id: connection_id.to_owned(),
        reason: e.to_string(),
    };
    let ownership = match ownership {
        Some(text) => serde_json::from_str(text).map_err(corrupt)?,
        None => Ownership::default(),
    };
    let metadata = match metadata {
        Some(text) => Some(serde_json::from_str::<Map<String, Value>>(text).map_err(corrupt)?),
        None => None,
    };
    Ok((ownership, metadata.filter(|m| !m.is_empty())))
}

/// [`HealthCounts`] in a dialect: `[soon, read_since]` are the placeholders.
fn health_sql([soon, read_since]: [&str; 2]) -> String {
    format!(
        "SELECT CASE \
           WHEN c.refresh_state = 'failed' THEN 'failed' \
           WHEN c.refresh_state = 'retrying' THEN 'retrying' \
           WHEN c.expires_at < {soon} THEN 'expiring' \
           WHEN r.last_read_at IS NULL OR r.last_read_at < {read_since} THEN 'idle' \
           ELSE 'valid' END AS health, count(*) \
         FROM connections c LEFT JOIN connection_reads r ON r.stream_id = c.stream_id \
         WHERE c.deleted_at IS NULL GROUP BY 1"
    )
}

impl HealthCounts {
    /// Adds `count` connections of the class named `health` (as [`health_sql`] names them).
    fn add(&mut self, health: &str, count: i64) {
        let class = match health {
            "failed" => &mut self.failed,
            "retrying" => &mut self.retrying,
            "expiring" => &mut self.expiring,
            "idle" => &mut self.idle,
            _ => &mut self.valid,
        };
        *class += count;
    }
}

/// The event types of refresh outcomes, as [`RefreshActivity`] counts them.
const REFRESHED: &str = "TokensRefreshed";
const REFRESH_FAILED: &str = "RefreshFailed";

/// Refresh outcomes per integration and hour from the log position `{from}` on, in a dialect
/// (`hour` truncates `e.recorded_at` to its hour).
fn refresh_activity_sql(hour: &str, from: &str) -> String {
    format!(
        "SELECT c.provider_config_key, {hour} AS hour, \
           sum(CASE WHEN e.event_type = '{REFRESHED}' THEN 1 ELSE 0 END), \
           sum(CASE WHEN e.event_type = '{REFRESH_FAILED}' THEN 1 ELSE 0 END) \
         FROM events e JOIN connections c ON c.stream_id = e.stream_id \
         WHERE e.global_position >= {from} \
           AND e.event_type IN ('{REFRESHED}', '{REFRESH_FAILED}') \
         GROUP BY 1, 2 ORDER BY 2, 1"
    )
}

/// The instances named in events' metadata from the log position `{from}` on (`instance`
/// reads the name from `e.metadata`).
fn instances_sql(instance: &str, from: &str) -> String {
    format!(
        "SELECT DISTINCT {instance} FROM events e \
         WHERE e.global_position >= {from} AND {instance} IS NOT NULL \
         ORDER BY 1 LIMIT {MAX_INSTANCES}"
    )
}

/// Live integrations by key, their states read as `state` (an expression giving JSON text).
fn list_integrations_sql(state: &str) -> String {
    format!(
        "SELECT id, version, {state}, stream_id FROM integrations \
         WHERE deleted_at IS NULL ORDER BY provider_config_key"
    )
}

const CHECKPOINTS: &str = "SELECT name, commit_position, global_position, updated_at, last_error \
     FROM projection_checkpoints ORDER BY name";

/// The statements of a rebuild's swap of `tables`.
fn swap_sql(Tables { live, shadow }: Tables) -> String {
    format!(
        "ALTER TABLE {live} RENAME TO {live}_swapping; \
         ALTER TABLE {shadow} RENAME TO {live}; \
         ALTER TABLE {live}_swapping RENAME TO {shadow};"
    )
}

/// How many events a swap reads per batch of the tail.
const TAIL_BATCH: usize = 1000;

/// A rebuild's tail as a swap folds it, batch by batch: where it stands and how many events
/// it read.
struct Tail {
    at: Position,
    read: u64,
}

impl Tail {
    /// A tail that starts after `from`.
    fn after(from: Position) -> Self {
        Self { at: from, read: 0 }
    }

    /// The batch `planner` makes of `events`, the tail's next read, and moves past them;
    /// `None` once nothing is left to read.
    fn plan(
        &mut self,
        planner: &Planner,
        events: &[RecordedEvent],
    ) -> Result<Option<Batch>, ProjectionError> {
        if events.is_empty() {
            return Ok(None);
        }
        self.read += events.len() as u64;
        let batch = planner(events)?;
        self.at = batch.to;
        Ok(Some(batch))
    }
}

/// A stored version, which the schema keeps non-negative.
fn version(stored: i64) -> u32 {
    u32::try_from(stored).unwrap_or(0)
}

fn database(e: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::Store(StoreError::Database(e.to_string()))
}

/// A PostgreSQL (or pool) error with the server's message (tokio-postgres says only "db error").
fn pg_error(e: impl std::error::Error + 'static) -> ProjectionError {
    ProjectionError::Store(StoreError::Database(domain::store::postgres_error_text(&e)))
}
