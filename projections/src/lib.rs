//! Projections: read models built from the event log, and the runner that keeps them current.
//!
//! Delivery guarantee: each read model applies every event of its categories exactly once in
//! effect. A runner applies a batch and advances its checkpoint in one transaction; appliers are
//! idempotent by stream version, so an event applied early (read-your-writes, see
//! [`model::upsert_state`]) is skipped when the runner reaches it. A batch is written only while
//! its runner holds the checkpoint (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and the checkpoint is
//! where the batch was read from, so among many instances one runner moves a projection at a
//! time. An event that cannot be decoded stops the projection at that event (the error is
//! recorded on its checkpoint), it is never skipped.
//!
//! Each read model is a table of aggregate snapshots, one row per stream: the aggregate's state
//! as JSON (secrets only sealed) and the columns queries filter on. A rebuild replays the log
//! into the table's shadow twin and swaps the two by renaming, while the live table keeps serving.
//!
//! Layout: [`model`] says how an aggregate's state becomes a row (pure), [`store`] keeps rows and
//! checkpoints (one implementation per backend), [`runner`] follows the log, [`queries`] is what
//! the API reads, [`cache`] the hot path's in-memory replica, [`activity`] which connections are
//! being read (for the scheduler), and [`snapshots`] where commands start loading a stream. A new read model is a [`StateModel`], a migration for its table and a
//! line in [`runner::Runner::run_once`].

pub mod activity;
pub mod cache;
pub mod model;
pub mod queries;
pub(crate) mod resident;
pub mod runner;
pub mod snapshots;
pub mod store;

pub use model::{ConnectionsModel, IntegrationsModel, StateModel};
pub use runner::{LAG_CAP, ProjectionStatus, Runner};
pub use store::ReadModels;

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

/// The names of all projections, in the order they are run and reported.
pub const PROJECTIONS: [&str; 2] = [ConnectionsModel::NAME, IntegrationsModel::NAME];
