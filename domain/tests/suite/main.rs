//! The domain crate's integration tests, one binary: the event-store contract suite run against
//! PostgreSQL and SQLite, the ordering proofs, and envelope encryption on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commands;
mod keys;
mod ordering;
mod store;

use grantline_domain::keys::{MasterKey, Vault};
use grantline_domain::store::Backend;
use grantline_domain::testing::TestDatabase;

/// The vault on `backend` under `master` (rotating away from `previous`), which must open.
async fn open_vault(backend: &Backend, master: MasterKey, previous: Option<MasterKey>) -> Vault {
    Vault::open(backend.key_repository(), master, previous)
        .await
        .unwrap()
}

/// A vault on `backend` under a new master key, and that key in base64, as configuration holds it.
async fn new_vault(backend: &Backend) -> (Vault, String) {
    let (master, master_b64) = MasterKey::generate();
    (
        open_vault(backend, master, None).await,
        master_b64.to_string(),
    )
}

/// The vault of a later instance on `db` (a backend of its own), with the master key read from
/// configuration as `master_b64`.
async fn reopen_vault(db: &TestDatabase, master_b64: &str) -> Vault {
    let master = MasterKey::from_base64(master_b64).unwrap();
    open_vault(&db.open().await, master, None).await
}
