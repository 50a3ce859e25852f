//! The read models as snapshots for the command service ([`domain::commands::Snapshots`]): a
//! live row of `connections` or `integrations` is the fold of its stream's first `version`
//! events (appliers are the aggregates' own `apply`), so loading a stream can start there and
//! read only the events after it. Deleted rows are not offered (their streams are short-lived
//! in use); a row that cannot be read is reported as none, and the stream is folded whole.

use async_trait::async_trait;
use domain::commands::Snapshots;
use domain::store::StreamId;
use domain::{connection, integration};
use serde_json::Value;

use crate::store::ReadModels;
use crate::{ConnectionsModel, IntegrationsModel, StateModel};

/// Snapshots from the live read models.
#[derive(Clone, Debug)]
pub struct ReadModelSnapshots {
    read_models: ReadModels,
}

impl ReadModelSnapshots {
    pub fn new(read_models: ReadModels) -> Self {
        Self { read_models }
    }
}

#[async_trait]
impl Snapshots for ReadModelSnapshots {
    async fn snapshot(&self, stream: &StreamId) -> Option<(u32, Value)> {
        let table = match stream.category() {
            connection::CATEGORY => ConnectionsModel::NAME,
            integration::CATEGORY => IntegrationsModel::NAME,
            _ => return None,
        };
        let failed = |error: &dyn std::fmt::Display| {
            tracing::warn!(error.message = %error, "snapshots.read failed; folding the stream");
        };
        match self.read_models.store().find(table, stream.as_str()).await {
            // A row at version 0 would be a state without events: never offer it.
            Ok(Some(row)) if row.version > 0 => match serde_json::from_str(&row.state) {
                Ok(state) => Some((row.version, state)),
                Err(error) => {
                    failed(&error);
                    None
                }
            },
            Ok(_) => None,
            Err(error) => {
                failed(&error);
                None
            }
        }
    }
}
