//! The domain crate's integration tests, one binary: the event-store contract suite run against
//! PostgreSQL and SQLite, the ordering proofs, and envelope encryption on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commands;
mod keys;
mod ordering;
mod store;

/// Runs each listed `async fn(&TestDatabase)` once on a fresh PostgreSQL database and once on a
/// fresh SQLite file, as `postgres::name` and `sqlite::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = grantline_domain::testing::TestDatabase::postgres().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = grantline_domain::testing::TestDatabase::sqlite();
                    super::$name(&db).await;
                }
            )*
        }
    };
}
