//! A connection's history as the dashboard pages through it, newest first, without folding the
//! whole stream again on every view: the folded history of long streams is kept (bounded, by
//! entries) and extended with the events appended since it was folded. The stream is
//! append-only except for compaction, so a kept history is dropped when the stream's compaction
//! record changes.

use std::sync::Arc;

use domain::connection::ConnectionKey;
use domain::history::{EntryType, FoldedHistory, HistoryEntry};
use domain::store::{Backend, CompactionRecord};

use super::HistoryError;

/// Streams shorter than this are folded on every view (it is cheap); longer ones are kept.
const KEPT_FROM: usize = 200;
/// The most entries kept across all streams.
const BUDGET: u64 = 200_000;

/// One page of a connection's history, newest first.
#[derive(Debug)]
pub struct Timeline {
    /// Entries in the stream.
    pub total: usize,
    /// Newest first: at most the page's length, all below the version asked for.
    pub entries: Vec<HistoryEntry>,
    /// The version to ask for the next, older page, when there is one.
    pub older: Option<u32>,
    /// The entries that recorded a refresh token, newest first (at most [`LINEAGE`]).
    pub lineage: Vec<HistoryEntry>,
    /// What compaction removed from the stream.
    pub compaction: Option<CompactionRecord>,
    /// The events that may have made a webhook (authorizations, failures, recoveries,
    /// deletions), newest first, at most [`WEBHOOK_EVENTS`].
    pub webhook_events: Vec<uuid::Uuid>,
}

/// How many of a stream's webhook-making events a timeline names.
pub const WEBHOOK_EVENTS: usize = 100;

/// The events of `entries` (in stream order) that may have made a webhook, newest first: an
/// authorization, a failure, a deletion, and a refresh that followed a failure (a recovery).
fn webhook_events(entries: &[HistoryEntry]) -> Vec<uuid::Uuid> {
    let mut found = Vec::new();
    let mut after_failure = false;
    for entry in entries {
        match entry.entry_type {
            EntryType::ConnectionAuthorized | EntryType::ConnectionDeleted => {
                found.push(entry.event_id);
                after_failure = false;
            }
            EntryType::RefreshFailed => {
                found.push(entry.event_id);
                after_failure = true;
            }
            EntryType::TokensRefreshed => {
                if after_failure {
                    found.push(entry.event_id);
                }
                after_failure = false;
            }
            _ => {}
        }
    }
    found.reverse();
    found.truncate(WEBHOOK_EVENTS);
    found
}

/// How many entries of the refresh-token lineage a timeline shows.
pub const LINEAGE: usize = 20;

/// A kept history and the compaction state it was folded under.
#[derive(Debug, Default)]
struct Kept {
    folded: FoldedHistory,
    compacted: Option<(u64, chrono::DateTime<chrono::Utc>)>,
}

/// A kept history with its weight (its entries when it was inserted: a weight must not change
/// while the cache holds it; a history that grew is inserted again).
#[derive(Clone)]
struct Weighed {
    entries: u64,
    kept: Arc<tokio::sync::Mutex<Kept>>,
}

#[derive(Clone)]
struct ByEntries;

impl quick_cache::Weighter<String, Weighed> for ByEntries {
    fn weight(&self, _: &String, weighed: &Weighed) -> u64 {
        weighed.entries.max(1)
    }
}

/// The kept histories of long streams.
pub struct Timelines {
    kept: quick_cache::sync::Cache<String, Weighed, ByEntries>,
}

impl std::fmt::Debug for Timelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timelines")
            .field("streams", &self.kept.len())
            .finish()
    }
}

impl Default for Timelines {
    fn default() -> Self {
        Self {
            kept: quick_cache::sync::Cache::with_weighter(1024, BUDGET, ByEntries),
        }
    }
}

impl Timelines {
    /// The page of `key`'s history below stream version `before`, `limit` entries long.
    pub async fn page(
        &self,
        backend: &Backend,
        key: &ConnectionKey,
        before: u32,
        limit: usize,
    ) -> Result<Timeline, HistoryError> {
        let limit = limit.max(1);
        let stream = key.stream_id();
        let compaction = super::compaction(backend, key).await?;
        let compacted = compaction
            .as_ref()
            .map(|record| (record.events_removed, record.compacted_at));
        let found = self.kept.get(stream.as_str());
        let kept = found.as_ref().map_or_else(
            || Arc::new(tokio::sync::Mutex::new(Kept::default())),
            |weighed| weighed.kept.clone(),
        );
        let mut history = kept.lock().await;
        if history.compacted != compacted {
            *history = Kept {
                folded: FoldedHistory::default(),
                compacted,
            };
        }
        let before_extension = history.folded.entries().len();
        let records = backend
            .events()
            .read_stream(&stream, history.folded.version())
            .await?;
        history.folded.extend(&records)?;
        let entries = history.folded.entries();
        if entries.is_empty() {
            return Err(HistoryError::UnknownConnection(key.clone()));
        }
        let mut shown: Vec<HistoryEntry> = entries
            .iter()
            .rev()
            .filter(|entry| entry.stream_version < before)
            .take(limit + 1)
            .cloned()
            .collect();
        let older = (shown.len() > limit).then(|| shown[limit - 1].stream_version);
        shown.truncate(limit);
        let lineage = entries
            .iter()
            .rev()
            .filter(|entry| {
                entry
                    .fingerprints
                    .as_ref()
                    .is_some_and(|f| f.refresh_token.is_some())
            })
            .take(LINEAGE)
            .cloned()
            .collect();
        let total = entries.len();
        let webhook_events = webhook_events(entries);
        let grew = total != before_extension || found.is_none();
        drop(history);
        if total >= KEPT_FROM && grew {
            let entries = u64::try_from(total).unwrap_or(u64::MAX);
            self.kept
                .insert(stream.as_str().to_owned(), Weighed { entries, kept });
        }
        Ok(Timeline {
            total,
            entries: shown,
            older,
            lineage,
            compaction,
            webhook_events,
        })
    }
}
