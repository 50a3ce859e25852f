//! Projections: read models built from the event log, and the runner that keeps them current.
//!
//! Delivery guarantee: each read model applies every event of its categories exactly once in
//! effect. A runner applies a batch and advances its checkpoint in one transaction; appliers are
//! idempotent by stream version, so an event applied early (read-your-writes, see
//! [`model::upsert_state`]) is skipped when the runner reaches it. A checkpoint is claimed with
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL, so among many instances one runner works on a
//! projection at a time. An event that cannot be decoded stops the projection at that event (the
//! error is recorded on its checkpoint), it is never skipped.
//!
//! Each read model is a table of aggregate snapshots, one row per stream: the aggregate's state
//! as JSON (secrets only sealed) and the columns queries filter on. A rebuild replays the log
//! into the table's shadow twin and swaps the two by renaming, while the live table keeps serving.

pub mod cache;
pub mod model;
pub mod queries;
pub mod runner;
pub mod snapshots;
mod table;

pub use model::{ConnectionsModel, IntegrationsModel, StateModel};
pub use runner::{ProjectionStatus, Runner};

use domain::event::UnreadableEvent;
use domain::store::StoreError;

/// A projection failure.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unreadable(#[from] UnreadableEvent),
    /// A stored snapshot that cannot be read back.
    #[error("read model {table} holds an unreadable row for {stream_id}: {reason}")]
    CorruptRow {
        table: &'static str,
        stream_id: String,
        reason: String,
    },
    /// There is no projection by that name.
    #[error("unknown projection {0:?}; the projections are connections, integrations")]
    UnknownProjection(String),
}

impl From<tokio_postgres::Error> for ProjectionError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Store(StoreError::Database(e.to_string()))
    }
}

impl From<deadpool_postgres::PoolError> for ProjectionError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Store(StoreError::Database(e.to_string()))
    }
}

impl From<rusqlite::Error> for ProjectionError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::Database(e.to_string()))
    }
}

/// The names of all projections, in the order they are run and reported.
pub const PROJECTIONS: [&str; 2] = [ConnectionsModel::NAME, IntegrationsModel::NAME];
