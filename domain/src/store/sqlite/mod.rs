//! Embedded SQLite backend (rusqlite + deadpool-sqlite), the default that needs nothing installed.
//!
//! All writes go through one connection (a pool of size one), so appends are serialized and
//! rowid order is commit order: a reader that follows `global_position` cannot skip an event.
//! Reads use their own pool; WAL mode lets them run beside the writer. `synchronous = FULL`
//! makes every acknowledged append durable.
//!
//! Its rooms: `events` (the [`EventStore`](super::EventStore)), `keys` (the
//! [`KeyRepository`](crate::keys::KeyRepository)) and `sessions` (the
//! [`SessionRepository`](crate::oauth_session::SessionRepository)); this module opens the pools,
//! applies the migrations and relays messages within the process (one process owns the file, so
//! there is no notifier).

mod compaction;
mod events;
mod keys;
mod sessions;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_sqlite::{Config, Hook, HookError, Pool, Runtime};
use rusqlite::types::FromSql;
use tokio::sync::broadcast;

use super::{ChangeSignal, MESSAGE_BACKLOG, StoreError, StoreOptions, newest_migration};

pub use events::read_all_on;

mod embedded {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// `secure_delete` overwrites what a delete frees (a shredded data key) instead of leaving it in
/// free pages of the file.
const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON;";

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
    /// The database file.
    path: String,
    /// Which file that was once opened (device, inode).
    file: std::sync::OnceLock<(u64, u64)>,
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
        let writer = pool(path, 1, options.pool_wait)?;
        let readers = pool(path, options.pool_size.max(1), options.pool_wait)?;
        let store = Self {
            writer,
            readers,
            inner: Arc::new(Inner {
                signal: ChangeSignal::new(),
                poll_interval: options.poll_interval,
                messages: broadcast::channel(MESSAGE_BACKLOG).0,
                path: path.to_owned(),
                file: std::sync::OnceLock::new(),
            }),
        };
        store
            .write(|conn| {
                // SQLite opens a file it may not write read-only, without a word: every write
                // would fail later (503s) while reads and /ready look fine.
                if conn.is_readonly(rusqlite::MAIN_DB).map_err(db_error)? {
                    return Err(StoreError::Database(
                        "the database file is read-only for this process".to_owned(),
                    ));
                }
                embedded::migrations::runner()
                    .set_abort_missing(false)
                    .run(conn)
                    .map(|_| ())
                    .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
            })
            .await?;
        if let Ok(file) = file_identity(path) {
            let _ = store.inner.file.set(file);
        }
        Ok(store)
    }

    /// An error once the database file was removed or replaced since it was opened: SQLite
    /// would go on writing to the unlinked file, acknowledging writes that are gone with the
    /// process.
    fn still_the_file(&self) -> Result<(), StoreError> {
        let Some(&opened) = self.inner.file.get() else {
            return Ok(());
        };
        match file_identity(&self.inner.path) {
            Ok(now) if now == opened => Ok(()),
            _ => Err(StoreError::Database(format!(
                "the database file {} was removed or replaced while this process had it open; \
                 restart it",
                self.inner.path
            ))),
        }
    }

    /// The database file's path, as opened.
    pub fn path(&self) -> &str {
        &self.inner.path
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
        self.still_the_file()?;
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

/// The device and inode of the file at `path`.
fn file_identity(path: &str) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

/// The highest migration version embedded in this binary.
pub(super) fn latest_migration() -> i64 {
    newest_migration(&embedded::migrations::runner())
}

impl SqliteStore {
    /// The highest migration version applied to the database (0: none).
    pub(super) async fn applied_migration(&self) -> Result<i64, StoreError> {
        self.still_the_file()?;
        self.read_scalar("SELECT coalesce(max(version), 0) FROM refinery_schema_history")
            .await
    }

    /// The one value of the one row `sql` returns, read on a reader connection.
    async fn read_scalar<T: FromSql + Send + 'static>(
        &self,
        sql: &'static str,
    ) -> Result<T, StoreError> {
        self.read(move |conn| conn.query_row(sql, [], |row| row.get(0)).map_err(db_error))
            .await
    }
}

impl SqliteStore {
    /// The writer's and the readers' connections together.
    pub fn pool_status(&self) -> super::PoolStatus {
        let (writer, readers) = (
            super::PoolStatus::of(self.writer.status()),
            super::PoolStatus::of(self.readers.status()),
        );
        super::PoolStatus {
            max: writer.max + readers.max,
            open: writer.open + readers.open,
            idle: writer.idle + readers.idle,
            waiting: writer.waiting + readers.waiting,
        }
    }
}

fn pool(path: &str, size: usize, wait: Duration) -> Result<Pool, StoreError> {
    Config::new(path)
        .builder(Runtime::Tokio1)
        .map_err(|e| StoreError::Database(e.to_string()))?
        .max_size(size)
        .wait_timeout(Some(wait))
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
fn db_error(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}
