//! Grantline's domain: the events of connections and integrations, their pure aggregates, the
//! event store with its PostgreSQL and SQLite backends, and envelope encryption.
//!
//! Nothing here knows about HTTP. Aggregates take time and provider answers as command data and
//! do no I/O; the store and the vault are the only parts that touch the database.

pub mod bounds;
pub mod catalog;
pub mod commands;
pub mod compaction;
pub mod connect_session;
pub mod connection;
pub mod credentials;
pub mod event;
pub mod history;
pub mod integration;
pub mod keys;
pub mod log_scope;
pub mod oauth_session;
pub mod sign_out;
pub mod store;
pub mod testing;

#[cfg(test)]
mod scenario;
