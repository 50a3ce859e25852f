//! The domain crate's integration tests, one binary: the event-store contract suite run against
//! PostgreSQL and SQLite, the ordering proofs, and envelope encryption on both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commands;
mod keys;
mod ordering;
mod store;
