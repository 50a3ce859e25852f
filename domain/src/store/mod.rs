//! The event store: an append-only log of streams, each stream versioned from 1 without gaps.
//!
//! Guarantees every backend keeps (one contract suite in `domain/tests` holds them to it):
//! - `append` writes all of its events or none, and only if the stream is at the expected version;
//!   losing that race is [`StoreError::Conflict`], never a partial write.
//! - A reader that follows the log with [`EventStore::read_all`] from a [`Position`] sees every
//!   committed event exactly once, in one total order, even when transactions commit out of
//!   position order. On PostgreSQL the order is `(transaction id, global position)` read below the
//!   oldest running transaction (the xid8 horizon); on SQLite, with a single writer, it is the rowid.
//! - [`Listener::wait`] returns soon after a new commit (NOTIFY on PostgreSQL, an in-process signal
//!   on both) and in any case after the poll interval, because notifications can be lost.
//! - Events are never updated or deleted (the schema refuses it).

mod batch;
mod listen;
mod payload;
mod postgres;
mod sqlite;
mod unanswered;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use batch::StreamAppend;
use batch::check_stream_appends;
pub(crate) use listen::ChangeSignal;
pub use listen::Listener;
pub use payload::Payload;
pub use postgres::{
    PostgresStore, connect_other as connect_other_postgres, error_text as postgres_error_text,
    sessions_ended,
};
pub use sqlite::{SqliteStore, read_all_on as sqlite_read_all_on};
pub use unanswered::answered_within;

use crate::connect_session::ConnectSessionRepository;
use crate::keys::KeyRepository;
use crate::oauth_session::SessionRepository;
use crate::sign_out::SignOutRepository;

/// The identity of a stream: `<category>-<id>`, e.g. `connection-3f0c…`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(String);

impl StreamId {
    /// A stream id from its category and the id within it.
    pub fn new(category: &str, id: impl fmt::Display) -> Self {
        Self(format!("{category}-{id}"))
    }

    /// `<category>-<uuid>`, the UUID hyphenated in lower case (as [`StreamId::new`] writes it).
    pub fn from_uuid(category: &str, id: uuid::Uuid) -> Self {
        let mut buffer = uuid::Uuid::encode_buffer();
        let id = id.hyphenated().encode_lower(&mut buffer);
        let mut raw = String::with_capacity(category.len() + 1 + id.len());
        raw.push_str(category);
        raw.push('-');
        raw.push_str(id);
        Self(raw)
    }

    /// Wraps an id read back from storage.
    pub fn from_raw(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`.
    pub fn category(&self) -> &str {
        self.0
            .split_once('-')
            .map_or(&self.0, |(category, _)| category)
    }
}

impl std::borrow::Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the appender believes the stream's current version to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have exactly this version (≥ 1).
    Exact(u32),
    /// Append at the end, whatever the version.
    Any,
}

/// An event ready to be appended.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: i16,
    pub payload: Value,
    pub metadata: Value,
}

impl NewEvent {
    /// A new event with a fresh id and empty metadata.
    pub fn new(event_type: impl Into<String>, event_version: i16, payload: Value) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            event_version,
            payload,
            metadata: Value::Object(serde_json::Map::new()),
        }
    }

    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A stream to create, with its first events (see [`EventStore::create_streams`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NewStream {
    pub stream: StreamId,
    pub events: Vec<NewEvent>,
}

/// A place in the global order of the log. Readers checkpoint it and read after it.
///
/// `commit` is the writing transaction's id on PostgreSQL and always 0 on SQLite; `global` is the
/// position assigned at insert. Ordered by `(commit, global)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit: u64,
    pub global: i64,
}

impl Position {
    /// Before the first event.
    pub const START: Position = Position {
        commit: 0,
        global: 0,
    };

    /// A position from the two `bigint` columns a checkpoint is kept in (a commit id is never
    /// negative, so a negative column reads as 0).
    pub fn from_columns(commit: i64, global: i64) -> Self {
        Self {
            commit: commit.max(0).unsigned_abs(),
            global,
        }
    }

    /// The commit id as a checkpoint's `bigint` column keeps it (a commit id never exceeds
    /// `i64::MAX`).
    pub fn commit_column(self) -> i64 {
        i64::try_from(self.commit).unwrap_or(i64::MAX)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.commit, self.global)
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    pub position: Position,
    pub stream_id: StreamId,
    pub stream_version: u32,
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: i16,
    pub payload: Payload,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// What a successful append wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append (the version of its last new event).
    pub stream_version: u32,
    /// The global position of each appended event, in stream order.
    pub global_positions: Vec<i64>,
}

/// A failure of the store, as opposed to a rejection by an aggregate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream was not at the expected version; someone else appended first.
    #[error("stream {stream} is at version {actual}, not at the expected {expected:?}")]
    Conflict {
        stream: StreamId,
        expected: ExpectedVersion,
        actual: u32,
    },
    /// An event with this id is already in the log.
    #[error("event {0} is already in the log")]
    DuplicateEvent(Uuid),
    /// An append with no events, or an `Exact(0)` expectation.
    #[error("invalid append: {0}")]
    InvalidAppend(&'static str),
    /// A stored row that cannot be read back; the reader must stop here.
    #[error("corrupt event at global position {global_position}: {reason}")]
    Corrupt {
        global_position: i64,
        reason: String,
    },
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(String),
}

/// The operations every event-log backend provides. Narrow on purpose: a KurrentDB backend must fit.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if it is at `expected`, atomically.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError>;

    /// Creates every stream of `streams` with its events, in one atomic write: when one of them
    /// exists already, nothing is written and the error is a [`StoreError::Conflict`] naming it.
    /// For bulk imports; one [`Appended`] per stream, in the order given.
    async fn create_streams(&self, streams: Vec<NewStream>) -> Result<Vec<Appended>, StoreError>;

    /// Appends to every existing stream of `appends` at its `expected` version, in one atomic
    /// write: when one of them is elsewhere, nothing is written and the error is a
    /// [`StoreError::Conflict`] naming it. One [`Appended`] per stream, in the order given.
    async fn append_streams(&self, appends: Vec<StreamAppend>)
    -> Result<Vec<Appended>, StoreError>;

    /// The current version of each of `streams` (0: it does not exist), in the order given.
    async fn stream_versions(&self, streams: &[StreamId]) -> Result<Vec<u32>, StoreError>;

    /// The events of `stream` with a version above `after_version`, in version order.
    async fn read_stream(
        &self,
        stream: &StreamId,
        after_version: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events after `after` in the log's global order; only events that can no
    /// longer be preceded by a later commit are returned.
    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The highest global position written so far (0 for an empty log), for lag reporting.
    async fn head_position(&self) -> Result<i64, StoreError>;

    /// Whether an event committed at or below global position `through` lies after `after` in
    /// the log's order. Unlike [`EventStore::read_all`], it also counts commits that readers
    /// must still wait for (behind an older open transaction), so `false` means a reader at
    /// `after` has applied everything committed up to `through`. Comparing `after.global` with
    /// `through` says nothing on PostgreSQL: the last event in commit order need not have the
    /// highest position.
    async fn committed_after(&self, after: Position, through: i64) -> Result<bool, StoreError>;

    /// The position of the last event a reader can see now ([`Position::START`] for an empty
    /// log): a reader that starts here sees every event committed from now on, and none before.
    async fn last_position(&self) -> Result<Position, StoreError>;

    /// A handle that waits for new commits.
    fn listener(&self) -> Listener;
}

/// What one compaction pass removes from a stream (see [`crate::compaction`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamCompaction {
    pub stream: StreamId,
    /// The global positions of the events removed.
    pub positions: Vec<i64>,
    /// Routine refresh cycles (a lease and its refresh) among them.
    pub routine_cycles: u64,
    /// Superseded failures, lapsed leases and metadata changes among them.
    pub lifecycle_events: u64,
    /// The highest stream version removed.
    pub through_version: u32,
    /// When the oldest and the newest of them were recorded.
    pub first_recorded_at: DateTime<Utc>,
    pub last_recorded_at: DateTime<Utc>,
}

/// What compaction removed from a stream over every pass: the history shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CompactionRecord {
    pub routine_cycles: u64,
    pub lifecycle_events: u64,
    pub events_removed: u64,
    /// Every removed event had at most this stream version.
    pub through_version: u32,
    pub first_recorded_at: DateTime<Utc>,
    pub last_recorded_at: DateTime<Utc>,
    /// When a pass last removed events from the stream.
    pub compacted_at: DateTime<Utc>,
}

/// The one way events leave the log: the compactor's, and only what it planned.
#[async_trait]
pub trait LogCompaction: Send + Sync {
    /// How far through the log the compactor has looked ([`Position::START`] at first).
    async fn compaction_cursor(&self) -> Result<Position, StoreError>;

    /// In one transaction: removes the planned events (the log refuses any other removal),
    /// adds them to each stream's [`CompactionRecord`], and moves the cursor from `from` to
    /// `to`. `Ok(None)` when the cursor is no longer at `from` (another compactor moved first):
    /// nothing is changed.
    async fn compact(
        &self,
        plans: &[StreamCompaction],
        from: Position,
        to: Position,
        now: DateTime<Utc>,
    ) -> Result<Option<u64>, StoreError>;

    /// What compaction removed from `stream`, if anything.
    async fn compaction_of(
        &self,
        stream: &StreamId,
    ) -> Result<Option<CompactionRecord>, StoreError>;
}

/// The repositories one database implements; [`Backend`] hands each out from it.
trait Repositories:
    EventStore
    + KeyRepository
    + SessionRepository
    + ConnectSessionRepository
    + SignOutRepository
    + LogCompaction
{
}

impl<
    T: EventStore
        + KeyRepository
        + SessionRepository
        + ConnectSessionRepository
        + SignOutRepository
        + LogCompaction,
> Repositories for T
{
}

/// A database backend: the event store, the key repository and the OAuth flow sessions on one
/// connection pool.
#[derive(Clone)]
pub enum Backend {
    Postgres(PostgresStore),
    Sqlite(SqliteStore),
}

impl Backend {
    /// Opens the database named by `url` (`postgres://…` or `sqlite://path`), applies the
    /// migrations under a lock, and returns the backend.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(PostgresStore::open(url, options).await?))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Self::Sqlite(SqliteStore::open(path, options).await?))
        } else {
            Err(StoreError::Database(
                "the database URL must start with postgres:// or sqlite://".into(),
            ))
        }
    }

    /// Ends the database sessions properly at the end of the process, after the last use
    /// (PostgreSQL would log a "connection reset" for each one dropped instead).
    pub async fn close(&self) {
        if let Self::Postgres(store) = self {
            store.close().await;
        }
    }

    /// The backend's store, as every repository it implements: the one match the accessors
    /// below share.
    fn repositories(&self) -> &dyn Repositories {
        match self {
            Self::Postgres(store) => store,
            Self::Sqlite(store) => store,
        }
    }

    /// [`Backend::repositories`] as a shared handle, for users that outlive a borrow.
    fn shared_repositories(&self) -> Arc<dyn Repositories> {
        match self {
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    pub fn events(&self) -> &dyn EventStore {
        self.repositories()
    }

    /// The event store as a shared handle, for readers that outlive a borrow.
    pub fn event_store(&self) -> Arc<dyn EventStore> {
        self.shared_repositories()
    }

    pub fn compaction(&self) -> &dyn LogCompaction {
        self.repositories()
    }

    pub fn keys(&self) -> &dyn KeyRepository {
        self.repositories()
    }

    /// The key repository as a shared handle, for the vault.
    pub fn key_repository(&self) -> Arc<dyn KeyRepository> {
        self.shared_repositories()
    }

    /// The OAuth flow sessions.
    pub fn sessions(&self) -> &dyn SessionRepository {
        self.repositories()
    }

    /// The connect sessions.
    pub fn connect_sessions(&self) -> &dyn ConnectSessionRepository {
        self.repositories()
    }

    /// The dashboard's sign-outs.
    pub fn sign_outs(&self) -> &dyn SignOutRepository {
        self.repositories()
    }

    /// Sends `payload` (under 8000 bytes; never a secret) to every instance on this database,
    /// this one included, through [`Backend::messages`]: what instances tell each other that is
    /// not in the log. Best effort: an instance that is reconnecting misses it.
    pub async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        match self {
            Self::Postgres(store) => store.publish(payload).await,
            Self::Sqlite(store) => {
                store.publish(payload);
                Ok(())
            }
        }
    }

    /// The messages instances [`Backend::publish`] from now on.
    pub fn messages(&self) -> broadcast::Receiver<String> {
        match self {
            Self::Postgres(store) => store.messages(),
            Self::Sqlite(store) => store.messages(),
        }
    }

    /// How long the oldest open transaction has held every log reader back (PostgreSQL's xid8
    /// horizon, see [`PostgresStore::horizon_age_seconds`]); `None` where readers are never held
    /// back (SQLite).
    pub async fn horizon_age_seconds(&self) -> Result<Option<f64>, StoreError> {
        match self {
            Self::Postgres(store) => store.horizon_age_seconds().await.map(Some),
            Self::Sqlite(_) => Ok(None),
        }
    }

    /// The TLS version a connection to the database runs over (`TLSv1.3`), `None` when it is
    /// not encrypted (always on SQLite, a file).
    pub async fn tls_version(&self) -> Result<Option<String>, StoreError> {
        match self {
            Self::Postgres(store) => store.tls_version().await,
            Self::Sqlite(_) => Ok(None),
        }
    }

    /// The connection pool's state: what this instance holds of the database's connections.
    pub fn pool_status(&self) -> PoolStatus {
        match self {
            Self::Postgres(store) => store.pool_status(),
            Self::Sqlite(store) => store.pool_status(),
        }
    }

    /// `postgres` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    /// The highest migration version this binary embeds for this backend.
    pub fn latest_migration(&self) -> i64 {
        match self {
            Self::Postgres(_) => postgres::latest_migration(),
            Self::Sqlite(_) => sqlite::latest_migration(),
        }
    }

    /// The highest migration version applied to the database (0: none). One round trip, so it
    /// also tells whether the database answers.
    pub async fn applied_migration(&self) -> Result<i64, StoreError> {
        match self {
            Self::Postgres(store) => store.applied_migration().await,
            Self::Sqlite(store) => store.applied_migration().await,
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Backend({})", self.kind())
    }
}

/// What an instance holds of its database's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections the pools may open (PostgreSQL: the pool; the notifier's own is extra).
    pub max: usize,
    /// Connections open now.
    pub open: usize,
    /// Open connections no request is using.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

impl PoolStatus {
    fn of(status: deadpool_postgres::Status) -> Self {
        Self {
            max: status.max_size,
            open: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }
}

/// Tuning shared by the backends.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Maximum connections in the pool.
    pub pool_size: usize,
    /// How long a caller waits for a pooled (or new) connection before [`StoreError::Database`]:
    /// a request fails fast instead of hanging while the database is away or every one is busy.
    pub pool_wait: Duration,
    /// How often listeners poll when no wake-up arrives.
    pub poll_interval: Duration,
    /// Whether opening waits (until cancelled) while the database refuses connections or starts
    /// up (the service does), or fails at once (a one-off command).
    pub wait_until_up: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            pool_wait: Duration::from_secs(5),
            poll_interval: Duration::from_millis(500),
            wait_until_up: false,
        }
    }
}

/// The version a stream must be at for `events` to be appended, as a number (0 = no stream;
/// `None`: any), or why the append is invalid.
fn append_target(
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Option<u32>, StoreError> {
    if events.is_empty() {
        return Err(StoreError::InvalidAppend("no events"));
    }
    match expected {
        ExpectedVersion::NoStream => Ok(Some(0)),
        ExpectedVersion::Exact(0) => Err(StoreError::InvalidAppend(
            "Exact(0) is not a version; use NoStream",
        )),
        ExpectedVersion::Exact(n) => Ok(Some(n)),
        ExpectedVersion::Any => Ok(None),
    }
}

/// Why [`EventStore::create_streams`] cannot write `streams`: a stream without events, or one
/// named twice.
fn check_new_streams(streams: &[NewStream]) -> Result<(), StoreError> {
    if streams.iter().any(|s| s.events.is_empty()) {
        return Err(StoreError::InvalidAppend("a new stream without events"));
    }
    let mut seen = std::collections::HashSet::with_capacity(streams.len());
    if !streams.iter().all(|s| seen.insert(s.stream.as_str())) {
        return Err(StoreError::InvalidAppend("the same new stream twice"));
    }
    Ok(())
}

/// The highest migration version a backend's embedded `runner` holds (0: none).
fn newest_migration(runner: &refinery::Runner) -> i64 {
    runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

/// Messages a backend keeps for a slow local subscriber before it misses some.
const MESSAGE_BACKLOG: usize = 256;

/// The columns of `oauth_sessions`, in the order both backends read and write them.
const SESSION_COLUMNS: &str = "state, provider_config_key, provider, connection_id, callback_url, \
     connection_config, scopes, api_redirect_url, ws_client_id, secrets_key_id, secrets, \
     created_at, expires_at, ownership, only_new, only_existing";

/// A stored OAuth flow session that cannot be read back.
fn unreadable_session(reason: String) -> StoreError {
    StoreError::Database(format!("unreadable oauth session: {reason}"))
}

/// Follows the log from a position, batch by batch. It moves past an event only once that event
/// was read (and, with [`LogReader::next_decoded`], decoded): an unreadable event stops it at that
/// event, every time, instead of being skipped.
///
/// After a full batch it already fetches the next one in the background, so the database works on
/// batch n + 1 while the caller handles batch n. A prefetched batch that came back empty is never
/// handed out: the caller may have waited for new events since, so it reads afresh.
pub struct LogReader {
    store: Arc<dyn EventStore>,
    position: Position,
    batch_size: usize,
    prefetch: Option<(Position, Prefetch)>,
}

/// A batch being read ahead.
type Prefetch = JoinHandle<Result<Vec<RecordedEvent>, StoreError>>;

impl fmt::Debug for LogReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogReader")
            .field("position", &self.position)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// Why a [`LogReader`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unreadable(#[from] crate::event::UnreadableEvent),
}

impl LogReader {
    pub fn new(store: Arc<dyn EventStore>, from: Position, batch_size: usize) -> Self {
        Self {
            store,
            position: from,
            batch_size: batch_size.max(1),
            prefetch: None,
        }
    }

    /// The position of the last event handed out.
    pub fn position(&self) -> Position {
        self.position
    }

    async fn fetch(&mut self) -> Result<Vec<RecordedEvent>, StoreError> {
        if let Some((from, handle)) = self.prefetch.take()
            && from == self.position
        {
            match handle.await {
                Ok(Ok(events)) if events.is_empty() => {}
                Ok(result) => return result,
                Err(join) => return Err(StoreError::Database(format!("prefetch failed: {join}"))),
            }
        }
        self.store.read_all(self.position, self.batch_size).await
    }

    /// Starts reading the batch after `events` if they filled a batch (a prefetch from a position
    /// the reader does not reach, after an unreadable event, is dropped unused).
    fn prefetch_after(&mut self, events: &[RecordedEvent]) {
        if events.len() == self.batch_size
            && let Some(last) = events.last()
        {
            let (store, from, limit) = (self.store.clone(), last.position, self.batch_size);
            let handle = tokio::spawn(async move { store.read_all(from, limit).await });
            self.prefetch = Some((from, handle));
        }
    }

    /// The next batch of raw events (empty when caught up).
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, StoreError> {
        let events = self.fetch().await?;
        if let Some(last) = events.last() {
            self.position = last.position;
        }
        self.prefetch_after(&events);
        Ok(events)
    }

    /// The next batch decoded as `E`, with their records, for the events `accept` takes (the
    /// others are passed over). An event that cannot be decoded ends the batch with an error,
    /// and the reader stays just before it.
    pub async fn next_decoded<E: crate::event::DomainEvent>(
        &mut self,
        accept: impl Fn(&RecordedEvent) -> bool,
    ) -> Result<Vec<(RecordedEvent, E)>, ReadError> {
        let events = self.fetch().await?;
        self.prefetch_after(&events);
        let mut decoded = Vec::with_capacity(events.len());
        for event in events {
            let position = event.position;
            if accept(&event) {
                let domain = E::from_recorded(&event)?;
                decoded.push((event, domain));
            }
            self.position = position;
        }
        Ok(decoded)
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.prefetch.take() {
            handle.abort();
        }
    }
}
