//! The read models as snapshots for the command service ([`domain::commands::Snapshots`]): a
//! live row of `connections` or `integrations` is the fold of its stream's first `version`
//! events (appliers are the aggregates' own `apply`), so loading a stream can start there and
//! read only the events after it. Deleted rows are not offered (their streams are short-lived
//! in use); a row that cannot be read is reported as none, and the stream is folded whole.

use async_trait::async_trait;
use domain::commands::Snapshots;
use domain::store::{Backend, StreamId};
use domain::{connection, integration};
use serde_json::Value;

use crate::queries::find_row;

/// Snapshots from the live read models of one backend.
#[derive(Clone, Debug)]
pub struct ReadModelSnapshots {
    backend: Backend,
}

impl ReadModelSnapshots {
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }
}

#[async_trait]
impl Snapshots for ReadModelSnapshots {
    async fn snapshot(&self, stream: &StreamId) -> Option<(u32, Value)> {
        let table = match stream.category() {
            connection::CATEGORY => "connections",
            integration::CATEGORY => "integrations",
            _ => return None,
        };
        match find_row(&self.backend, table, stream.as_str()).await {
            // A row at version 0 would be a state without events: never offer it.
            Ok(row) => row
                .filter(|(_, version, _)| *version > 0)
                .map(|(_, version, state)| (version, state)),
            Err(error) => {
                tracing::warn!(error.message = %error, "snapshots.read failed; folding the stream");
                None
            }
        }
    }
}
