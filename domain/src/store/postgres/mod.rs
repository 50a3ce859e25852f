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
//!
//! Its rooms: `events` (the [`EventStore`](super::EventStore)), `keys` (the
//! [`KeyRepository`](crate::keys::KeyRepository)), `sessions` (the
//! [`SessionRepository`](crate::oauth_session::SessionRepository)) and `notifier` (LISTEN/NOTIFY
//! and the message relay); this module opens the pool and applies the migrations.

mod compaction;
mod drivers;
pub use drivers::sessions_ended;
mod events;
mod keys;
mod notifier;
mod sessions;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::types::FromSqlOwned;

use self::drivers::{Drivers, GOODBYE_LIMIT, GoodbyeConnect};
use self::tls::Target;
use super::{ChangeSignal, MESSAGE_BACKLOG, StoreError, StoreOptions, newest_migration};

mod embedded {
    refinery::embed_migrations!("../migrations/postgres");
}

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
    /// The connection tasks (the pool's and the notifier's), for a clean close.
    drivers: Arc<Drivers>,
    /// Set when the store closes: the notifier says goodbye and stops.
    closing: watch::Sender<bool>,
}

/// How long the database's host may leave data unacknowledged (or an idle connection
/// unprobed) before the connection is given up.
const UNANSWERED_LIMIT: Duration = Duration::from_secs(30);

/// A pooled connection last handed out this long ago is asked an empty query before it is
/// handed out again (see [`answering`]).
const QUIET_BEFORE_CHECK: Duration = Duration::from_secs(1);

/// tokio-postgres' keepalive idle time when the URL sets none (libpq's too).
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

impl PostgresStore {
    /// Connects, applies the migrations under an advisory lock, and starts the notifier.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let mut target = Target::parse(url)?;
        // A database that drops packets must not hold a connect for the kernel's minutes.
        if target.config.get_connect_timeout().is_none() {
            target.config.connect_timeout(options.pool_wait);
        }
        // Nor hold a pooled connection to a host that stopped answering (frozen, failed over,
        // cut off) for as long: data unacknowledged for this long closes it, and an idle one
        // is probed after this long. (A URL's `tcp_user_timeout`/`keepalives_idle` wins.)
        if target.config.get_tcp_user_timeout().is_none() {
            target.config.tcp_user_timeout(UNANSWERED_LIMIT);
        }
        if target.config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
            target.config.keepalives_idle(UNANSWERED_LIMIT);
        }
        migrate(&target, options.wait_until_up).await?;

        let drivers = Arc::new(Drivers::default());
        let connect = GoodbyeConnect {
            tls: target.tls.clone(),
            drivers: drivers.clone(),
        };
        let manager = Manager::from_connect(
            target.config.clone(),
            connect,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(options.pool_wait))
            .create_timeout(Some(options.pool_wait))
            // The most recently used connection first: at a low request rate the others sit
            // out, and only those pay the check below.
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .pre_recycle(answering(options.pool_wait))
            .build()
            .map_err(|e| StoreError::Database(e.to_string()))?;
        // Fail at start-up, not at the first request, when the database cannot be reached.
        drop(pool.get().await.map_err(pool_error)?);

        let signal = ChangeSignal::new();
        let kick = Arc::new(Notify::new());
        let (messages, _) = broadcast::channel(MESSAGE_BACKLOG);
        let (closing, closed) = watch::channel(false);
        tokio::spawn(notifier::run(
            target,
            signal.sender(),
            kick.clone(),
            messages.clone(),
            (closed, drivers.running()),
        ));
        Ok(Self {
            pool,
            inner: Arc::new(Inner {
                signal,
                kick,
                poll_interval: options.poll_interval,
                messages,
                drivers,
                closing,
            }),
        })
    }

    /// Ends every session of this store properly (PostgreSQL logs no "connection reset" for
    /// them), waiting at most a few seconds; for the end of the process, after the last use.
    /// A connection still in use is ended when it is returned.
    pub async fn close(&self) {
        self.pool.close();
        self.inner.closing.send_replace(true);
        self.inner.drivers.all_closed(GOODBYE_LIMIT * 2).await;
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

    /// A pooled connection with `sql` prepared on it (from the connection's statement cache).
    async fn prepared(
        &self,
        sql: &str,
    ) -> Result<(deadpool_postgres::Object, tokio_postgres::Statement), StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(db_error)?;
        Ok((client, statement))
    }

    /// The one value of the one row `sql` returns.
    async fn query_scalar<T: FromSqlOwned>(&self, sql: &str) -> Result<T, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(sql, &[])
            .await
            .map_err(db_error)?;
        row.try_get(0).map_err(db_error)
    }
}

/// The check a pooled connection passes before it is handed out again, when it was last handed
/// out [`QUIET_BEFORE_CHECK`] ago or longer: an empty query answered within `limit`, else the
/// connection is dropped from the pool and another one taken (or opened).
///
/// A peer that acknowledges and never answers (a hung pooler, a frozen proxy) leaves a query
/// waiting on its connection with the socket healthy, so neither the keepalives nor the fast
/// check (is it closed?) notice; the request that waited gives up at its timeout and the
/// connection went back to the pool, where every later query would queue behind the lost one.
/// The check finds those. It costs a round trip only on connections that sat out a second, so
/// a busy pool pays nothing.
fn answering(limit: Duration) -> Hook {
    Hook::async_fn(move |client, metrics| {
        Box::pin(async move {
            if metrics.last_used() < QUIET_BEFORE_CHECK {
                return Ok(());
            }
            match tokio::time::timeout(limit, client.simple_query("")).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(HookError::Backend(error)),
                Err(_) => Err(HookError::message("the database did not answer")),
            }
        })
    })
}

/// The highest migration version embedded in this binary.
pub(super) fn latest_migration() -> i64 {
    newest_migration(&embedded::migrations::runner())
}

impl PostgresStore {
    /// How long the oldest transaction holding an xid anywhere in the cluster has been open
    /// (0 when none is). Log readers see events only below the oldest running xid, so this is
    /// how far behind every projection, cache follower and webhook may be held. Needs the
    /// `pg_read_all_stats` role (or superuser) to see other users' sessions.
    pub async fn horizon_age_seconds(&self) -> Result<f64, StoreError> {
        self.query_scalar(
            "SELECT coalesce(extract(epoch FROM clock_timestamp() - min(xact_start)), 0)::float8 \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
        )
        .await
    }

    /// The pool's connections (the notifier holds one more of its own).
    pub fn pool_status(&self) -> super::PoolStatus {
        super::PoolStatus::of(self.pool.status())
    }

    /// The TLS version of a pooled connection, `None` when it is not encrypted.
    pub async fn tls_version(&self) -> Result<Option<String>, StoreError> {
        self.query_scalar(
            "SELECT CASE WHEN ssl THEN version END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await
    }

    /// The highest migration version applied to the database (0: none).
    pub(super) async fn applied_migration(&self) -> Result<i64, StoreError> {
        self.query_scalar("SELECT coalesce(max(version), 0)::int8 FROM refinery_schema_history")
            .await
    }
}

/// A client of another PostgreSQL database (an import source), connected with the TLS options
/// the store's own URL takes (`sslmode`, `sslrootcert`); a spawned task drives its connection.
pub async fn connect_other(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let target = Target::parse(url)?;
    let (client, connection) = target
        .config
        .connect(target.tls.clone())
        .await
        .map_err(|e| target.connect_error(&e))?;
    // Counted, so that the end of the process waits for its goodbye once the client is gone.
    let running = Arc::new(Drivers::default()).running();
    tokio::spawn(async move {
        let _running = running;
        if let Err(error) = connection.await {
            tracing::warn!(error.message = %error, "the source database connection failed");
        }
    });
    Ok(client)
}

async fn migrate(target: &Target, wait_until_up: bool) -> Result<(), StoreError> {
    let mut pause = Duration::from_millis(200);
    let (mut client, connection) = loop {
        match target.config.connect(target.tls.clone()).await {
            Ok(connected) => break connected,
            Err(e) if wait_until_up && not_up_yet(&e) => {
                tracing::warn!(
                    database = %target.address(),
                    error.message = %target.connect_error(&e),
                    retry_in_ms = pause.as_millis() as u64,
                    "the database does not take connections yet; waiting for it"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(target.connect_error(&e)),
        }
    };
    let driver = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    let outcome = embedded::migrations::runner()
        .set_abort_missing(false)
        .run_async(&mut client)
        .await
        .map_err(|e| StoreError::Database(format!("migration failed: {}", error_text(&e))));
    // Closing the session releases the lock even if the unlock is never sent.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    outcome.map(|_| ())
}

/// Whether `e` says the database is not up, yet or again: the connection was refused, reset or
/// timed out, or the server is starting, stopping or full. A wrong password, database, host name
/// or certificate is not waited out.
fn not_up_yet(e: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind;
    use tokio_postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        return [
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
        ]
        .contains(db.code());
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe
            );
        }
        source = cause.source();
    }
    // The driver's own "connection closed" during the handshake (a proxy in front of a server
    // that is not up yet).
    e.is_closed()
}

/// `error` and the errors beneath it, `: `-separated: a migration or URL error's own message
/// ("db error", "invalid connection string") says less than its cause.
/// What an error says, cause after cause, for logs and messages. A server error shows its
/// severity, message and SQLSTATE, never its DETAIL, which can quote a row's values.
/// (tokio-postgres's own text is only "db error".)
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let more = match e.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => {
                use tokio_postgres::error::SqlState;
                let code = db.code();
                // This session's prepared statements are another's: a pooler in transaction
                // mode moved it between server connections.
                let hint = if [
                    SqlState::DUPLICATE_PSTATEMENT,
                    SqlState::INVALID_SQL_STATEMENT_NAME,
                ]
                .contains(code)
                {
                    " (a connection pooler in transaction mode? Grantline needs session \
                     pooling or a direct connection)"
                } else {
                    ""
                };
                let (severity, message) = (db.severity(), db.message());
                format!("{severity}: {message} (SQLSTATE {}){hint}", code.code())
            }
            None => e.to_string(),
        };
        if !text.contains(&more) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&more);
        }
        next = e.source();
    }
    text
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(error_text(&e))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Database(error_text(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDatabase;

    #[tokio::test]
    async fn a_database_error_says_what_the_server_said_without_its_detail() {
        let db = TestDatabase::postgres().await;
        let client = db.postgres_client().await;
        let setup = "CREATE TABLE t (v text UNIQUE); INSERT INTO t VALUES ('row-value-7');";
        assert!(client.batch_execute(setup).await.is_ok());
        let Err(duplicate) = client
            .execute("INSERT INTO t VALUES ('row-value-7')", &[])
            .await
        else {
            panic!("a duplicate was inserted");
        };
        let text = error_text(&duplicate);
        assert!(
            text.contains("duplicate key value violates unique constraint"),
            "{text}"
        );
        assert!(text.contains("SQLSTATE 23505"), "{text}");
        // The DETAIL quotes the row: "Key (v)=(row-value-7) already exists".
        assert!(!text.contains("row-value-7"), "{text}");
        assert!(!text.contains("pooler"), "{text}");

        let Err(unknown) = client.batch_execute("EXECUTE never_prepared").await else {
            panic!("an unknown prepared statement ran");
        };
        let text = error_text(&unknown);
        assert!(
            text.contains("prepared statement \"never_prepared\" does not exist"),
            "{text}"
        );
        assert!(text.contains("pooler in transaction mode"), "{text}");
    }
}
