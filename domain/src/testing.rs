//! Test support shared by the crates' test suites: a fresh database per test.
//!
//! PostgreSQL tests get a new database on the server named by `GRANTLINE_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), dropped when the handle drops. SQLite
//! tests get a file in a fresh temporary directory, removed on drop. Panics here are test
//! failures, not production paths.
#![allow(clippy::expect_used)]

use std::path::PathBuf;

use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::store::{Backend, StoreOptions};

/// Runs each listed `async fn(&TestDatabase)` once on a fresh PostgreSQL database and once on a
/// fresh SQLite file, as `postgres::name` and `sqlite::name` inside the calling module. The
/// calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::testing::TestDatabase::postgres().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::testing::TestDatabase::sqlite();
                    super::$name(&db).await;
                }
            )*
        }
    };
}

/// Runs each listed `async fn(&TestDatabase)` on a fresh PostgreSQL database only, as
/// `postgres_only::name` inside the calling module: for what needs PostgreSQL itself (several
/// processes on one database, its locks and transaction horizon). Each test gets two worker
/// threads; `name(4)` gives it four.
#[macro_export]
macro_rules! on_postgres_only {
    (@test $name:ident) => {
        $crate::on_postgres_only!(@test $name 2);
    };
    (@test $name:ident $threads:tt) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
        async fn $name() {
            let db = $crate::testing::TestDatabase::postgres().await;
            super::$name(&db).await;
        }
    };
    ($($name:ident $(($threads:tt))?),* $(,)?) => {
        mod postgres_only {
            $(
                $crate::on_postgres_only!(@test $name $($threads)?);
            )*
        }
    };
}

/// The server test databases are created on.
pub fn admin_url() -> String {
    std::env::var("GRANTLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
#[derive(Debug)]
pub enum TestDatabase {
    Postgres { name: String, url: String },
    Sqlite { dir: PathBuf, url: String },
}

impl TestDatabase {
    /// Creates an empty PostgreSQL database.
    pub async fn postgres() -> Self {
        let admin = admin_url();
        let name = format!("grantline_test_{}", Uuid::new_v4().simple());
        let (client, connection) = tokio_postgres::connect(&admin, NoTls)
            .await
            .expect("PostgreSQL must be reachable for the tests (see README)");
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        drop(client);
        let _ = driver.await;
        let url = replace_database(&admin, &name);
        Self::Postgres { name, url }
    }

    /// Creates an empty SQLite database file in a new temporary directory.
    pub fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("grantline-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let url = format!("sqlite://{}", dir.join("grantline.db").display());
        Self::Sqlite { dir, url }
    }

    /// The `GRANTLINE_DATABASE_URL` of this database.
    pub fn url(&self) -> &str {
        match self {
            Self::Postgres { url, .. } | Self::Sqlite { url, .. } => url,
        }
    }

    /// Opens (and migrates) a backend on this database, polling every 100 ms.
    pub async fn open(&self) -> Backend {
        let options = StoreOptions {
            poll_interval: std::time::Duration::from_millis(100),
            ..StoreOptions::default()
        };
        self.open_with(&options).await
    }

    /// Opens a backend with explicit options.
    pub async fn open_with(&self, options: &StoreOptions) -> Backend {
        Backend::open(self.url(), options)
            .await
            .expect("open the test database")
    }

    /// A plain client of this PostgreSQL database, for what a test does behind the store's back;
    /// its connection is driven by a spawned task. Panics on SQLite.
    pub async fn postgres_client(&self) -> tokio_postgres::Client {
        let Self::Postgres { url, .. } = self else {
            panic!("a PostgreSQL client of a SQLite test database");
        };
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    /// A client holding a transaction open with an xid (until it commits or drops): no log
    /// reader on the server passes the events committed after it, as with a slow writer.
    pub async fn hold_horizon(&self) -> tokio_postgres::Client {
        let blocker = self.postgres_client().await;
        blocker
            .batch_execute("BEGIN; SELECT pg_current_xact_id();")
            .await
            .expect("open a transaction with an xid");
        blocker
    }
}

/// `url` with its database name replaced by `name`.
fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut replaced = format!("{}/{name}", &base[..host_end]);
    if let Some(query) = query {
        replaced.push('?');
        replaced.push_str(query);
    }
    replaced
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self {
            Self::Postgres { name, .. } => {
                let name = name.clone();
                // Drop runs inside the test's runtime; a thread with its own runtime can block.
                let dropped = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime to drop the test database");
                    runtime.block_on(async move {
                        if let Ok((client, connection)) =
                            tokio_postgres::connect(&admin_url(), NoTls).await
                        {
                            let driver = tokio::spawn(connection);
                            let _ = client
                                .batch_execute(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await;
                            drop(client);
                            let _ = driver.await;
                        }
                    });
                });
                let _ = dropped.join();
            }
            Self::Sqlite { dir, .. } => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
