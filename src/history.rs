//! The credential history of connections (the audit trail), and a redacted follower of the whole
//! log, for the API (`GET /connection/:id/history`) and the command line (`grantline history`,
//! `grantline events tail`).
//!
//! Guarantees:
//! - The history is read from the connection's stream itself, not from a read model: it answers
//!   every event in stream order, across generations and after a deletion, as soon as it is
//!   appended. Pages are cut by stream version, so paging with `next_after` returns every entry
//!   exactly once.
//! - Nothing here prints or returns a secret: connection events go through
//!   [`domain::history`]; integration events show their type and key only; events of types this
//!   build does not know (or cannot read) show their type only.
//! - The follower never skips an event: it reads the log in its global order through
//!   [`LogReader`], from the position it started at.

mod timeline;

pub use timeline::{Timeline, Timelines};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;

use chrono::SecondsFormat;
use domain::connection::{self, ConnectionEvent, ConnectionKey};
use domain::event::{DomainEvent, UnreadableEvent};
use domain::history::{HistoryEntry, HistoryFolder, SecretsState};
use domain::integration::{self, IntegrationEvent};
use domain::store::{
    Backend, CompactionRecord, EventStore, LogReader, Position, RecordedEvent, StoreError, StreamId,
};
use serde::Serialize;

/// The most entries one page of the history API holds.
pub const MAX_PAGE: usize = 1000;

/// Entries per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;

/// Events the follower reads at a time.
const TAIL_BATCH: usize = 500;

/// Why a history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The connection's stream has no event: there never was such a connection.
    #[error(
        "no connection {:?} for provider config key {:?}: its stream has no events",
        .0.connection_id(),
        .0.provider_config_key()
    )]
    UnknownConnection(ConnectionKey),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event of the stream cannot be read; the history stops rather than skip it.
    #[error(transparent)]
    Unreadable(#[from] UnreadableEvent),
}

/// Every entry of the connection's history, in stream order; a stream without events is
/// [`HistoryError::UnknownConnection`].
#[tracing::instrument(
    name = "history.load",
    skip_all,
    fields(provider_config_key = %key.provider_config_key(), connection_id = %key.connection_id())
)]
pub async fn load(
    backend: &Backend,
    key: &ConnectionKey,
) -> Result<Vec<HistoryEntry>, HistoryError> {
    let stream = key.stream_id();
    let records = backend.events().read_stream(&stream, 0).await?;
    if records.is_empty() {
        return Err(HistoryError::UnknownConnection(key.clone()));
    }
    Ok(domain::history::history(&records)?)
}

/// The page of the connection's history after stream version `after`, at most `limit` entries
/// ([`load`], then [`page`]).
pub async fn load_page(
    backend: &Backend,
    key: &ConnectionKey,
    after: u32,
    limit: usize,
) -> Result<Page, HistoryError> {
    let mut page = page(load(backend, key).await?, after, limit);
    page.compaction = compaction(backend, key).await?;
    Ok(page)
}

/// What compaction removed from the connection's history, if anything.
pub async fn compaction(
    backend: &Backend,
    key: &ConnectionKey,
) -> Result<Option<CompactionRecord>, HistoryError> {
    Ok(backend.compaction().compaction_of(&key.stream_id()).await?)
}

/// One line saying what compaction removed, for people.
pub fn compaction_line(record: &CompactionRecord) -> String {
    format!(
        "compacted: {} routine refresh cycles and {} lifecycle events ({} events, stream \
         versions up to {}, recorded {} to {}) were removed past retention; last pass {}",
        record.routine_cycles,
        record.lifecycle_events,
        record.events_removed,
        record.through_version,
        record
            .first_recorded_at
            .to_rfc3339_opts(SecondsFormat::Secs, true),
        record
            .last_recorded_at
            .to_rfc3339_opts(SecondsFormat::Secs, true),
        record
            .compacted_at
            .to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

/// One page of a history.
#[derive(Debug, PartialEq)]
pub struct Page {
    /// Up to `limit` entries with a stream version above `after`.
    pub entries: Vec<HistoryEntry>,
    /// The `after` of the next page, when more entries follow.
    pub next_after: Option<u32>,
    /// What compaction removed from the stream (set by [`load_page`]).
    pub compaction: Option<CompactionRecord>,
}

/// The entries after stream version `after`, at most `limit` of them.
pub fn page(entries: Vec<HistoryEntry>, after: u32, limit: usize) -> Page {
    let mut rest = entries
        .into_iter()
        .filter(|entry| entry.stream_version > after)
        .peekable();
    let entries: Vec<HistoryEntry> = rest.by_ref().take(limit).collect();
    let next_after = match rest.peek() {
        Some(_) => entries.last().map(|entry| entry.stream_version),
        None => None,
    };
    Page {
        entries,
        next_after,
        compaction: None,
    }
}

/// The history as a table for people: version, time, type, generation, trigger, instance and a
/// short detail (fingerprints, error code, secrets state).
pub fn table(entries: &[HistoryEntry]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:<24}  {:<21}  {:>3}  {:<8}  {:<41}  detail",
        "ver", "recorded at", "type", "gen", "trigger", "instance"
    );
    for entry in entries {
        let _ = writeln!(
            out,
            "{:>4}  {:<24}  {:<21}  {:>3}  {:<8}  {:<41}  {}",
            entry.stream_version,
            entry.recorded_at,
            entry.entry_type.as_str(),
            entry.generation,
            entry.trigger.map_or("-", trigger_name),
            entry.instance.as_deref().unwrap_or("-"),
            detail(entry),
        );
    }
    out
}

/// A one-line summary of what an entry says beyond its type.
pub fn detail(entry: &HistoryEntry) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(flow) = entry.flow {
        parts.push(format!("flow={}", json_name(&flow)));
    }
    if let Some(fingerprints) = &entry.fingerprints {
        parts.push(format!(
            "access={}",
            fingerprints.access_token.as_deref().unwrap_or("-")
        ));
        if let Some(refresh) = &fingerprints.refresh_token {
            parts.push(format!("refresh={refresh}"));
        }
    }
    if let Some(generation) = entry.refresh_token_generation
        && entry.has_refresh_token != Some(false)
    {
        parts.push(format!("rt_gen={generation}"));
    }
    if entry.refresh_token_rotated == Some(true) {
        parts.push("rotated".to_owned());
    }
    if let Some(expires_at) = &entry.expires_at {
        parts.push(format!(
            "expires={}",
            expires_at.as_deref().unwrap_or("unknown")
        ));
    }
    if let Some(error) = &entry.error {
        parts.push(format!(
            "error={} code={} status={}",
            json_name(&error.class),
            error.code.as_deref().unwrap_or("-"),
            error
                .provider_status
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        ));
    }
    if let Some(metadata) = &entry.metadata {
        parts.push(format!(
            "metadata {} keys=[{}]",
            json_name(&metadata.mode),
            metadata.keys.join(",")
        ));
    }
    if let Some(count) = entry.shredded_data_keys {
        parts.push(format!("shredded {count} data keys"));
    }
    if let Some(secrets) = entry.secrets {
        parts.push(match secrets {
            SecretsState::Sealed => "secrets sealed".to_owned(),
            SecretsState::Shredded => "secrets SHREDDED".to_owned(),
        });
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

pub fn trigger_name(trigger: domain::connection::RefreshTrigger) -> &'static str {
    match trigger {
        domain::connection::RefreshTrigger::Read => "read",
        domain::connection::RefreshTrigger::Schedule => "schedule",
        domain::connection::RefreshTrigger::Force => "force",
        domain::connection::RefreshTrigger::Rejected => "rejected",
    }
}

/// A unit enum's serialized name (`"oauth2"` → `oauth2`).
fn json_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Following the log
// ---------------------------------------------------------------------------------------------

/// One event of the log, redacted, as `grantline events tail` prints it.
#[derive(Debug, Serialize)]
pub struct TailLine {
    /// Its position in the global log.
    pub global_position: i64,
    /// Its stream.
    pub stream_id: String,
    /// The integration's key, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_config_key: Option<String>,
    /// The connection's id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// What the event says.
    #[serde(flatten)]
    pub body: TailBody,
}

/// What a [`TailLine`] shows of its event.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum TailBody {
    /// A connection event, through the history mapping.
    Connection(Box<HistoryEntry>),
    /// Any other event: its type only.
    Other {
        #[serde(rename = "type")]
        event_type: String,
        stream_version: u32,
        recorded_at: String,
    },
}

impl TailLine {
    /// The line for people.
    pub fn text(&self) -> String {
        let target = match (&self.provider_config_key, &self.connection_id) {
            (Some(key), Some(id)) => format!("{key}/{id}"),
            (Some(key), None) => key.clone(),
            _ => self.stream_id.clone(),
        };
        match &self.body {
            TailBody::Connection(entry) => format!(
                "{} #{} {} {} v{} gen={} trigger={} instance={} {}",
                entry.recorded_at,
                self.global_position,
                entry.entry_type.as_str(),
                target,
                entry.stream_version,
                entry.generation,
                entry.trigger.map_or("-", trigger_name),
                entry.instance.as_deref().unwrap_or("-"),
                detail(entry)
            ),
            TailBody::Other {
                event_type,
                stream_version,
                recorded_at,
            } => format!(
                "{recorded_at} #{} {event_type} {target} v{stream_version}",
                self.global_position
            ),
        }
    }
}

/// Follows the log from a position, turning each event into a redacted [`TailLine`]. It keeps a
/// [`HistoryFolder`] per connection stream (primed from the stream's earlier events when it
/// starts mid-stream) and the key of each integration stream.
pub struct Tail {
    store: Arc<dyn EventStore>,
    reader: LogReader,
    connections: HashMap<StreamId, HistoryFolder>,
    integrations: HashMap<StreamId, Option<String>>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("reader", &self.reader)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

impl Tail {
    /// A follower from the log's start (`from_start`), or from now on.
    pub async fn start(backend: &Backend, from_start: bool) -> Result<Self, StoreError> {
        let store = backend.event_store();
        let from = if from_start {
            Position::START
        } else {
            store.last_position().await?
        };
        Ok(Self {
            reader: LogReader::new(store.clone(), from, TAIL_BATCH),
            store,
            connections: HashMap::new(),
            integrations: HashMap::new(),
        })
    }

    /// The lines of the next batch of events (empty when caught up).
    pub async fn next_lines(&mut self) -> Result<Vec<TailLine>, StoreError> {
        let records = self.reader.next_batch().await?;
        let mut lines = Vec::with_capacity(records.len());
        for record in &records {
            lines.push(self.line(record).await?);
        }
        Ok(lines)
    }

    async fn line(&mut self, record: &RecordedEvent) -> Result<TailLine, StoreError> {
        let mut line = TailLine {
            global_position: record.position.global,
            stream_id: record.stream_id.to_string(),
            provider_config_key: None,
            connection_id: None,
            body: other(record),
        };
        match record.stream_id.category() {
            connection::CATEGORY => {
                if let Ok(event) = ConnectionEvent::from_recorded(record) {
                    let folder = self.connection_folder(record).await?;
                    let entry = folder.entry(record, &event);
                    if let Some((key, id)) = folder.connection() {
                        line.provider_config_key = Some(key.to_owned());
                        line.connection_id = Some(id.to_owned());
                    }
                    line.body = TailBody::Connection(Box::new(entry));
                }
            }
            integration::CATEGORY => {
                if let Ok(event) = IntegrationEvent::from_recorded(record) {
                    line.body = TailBody::Other {
                        event_type: integration_type(&event).to_owned(),
                        stream_version: record.stream_version,
                        recorded_at: timestamp(record),
                    };
                    line.provider_config_key = self.integration_key(record, &event).await?;
                }
            }
            _ => {}
        }
        Ok(line)
    }

    /// The folder of the record's connection stream, primed with the stream's earlier events
    /// when the follower meets the stream mid-way.
    async fn connection_folder(
        &mut self,
        record: &RecordedEvent,
    ) -> Result<&mut HistoryFolder, StoreError> {
        if !self.connections.contains_key(&record.stream_id) {
            let mut folder = HistoryFolder::new();
            if record.stream_version > 1 {
                let earlier = self.store.read_stream(&record.stream_id, 0).await?;
                for previous in earlier
                    .iter()
                    .take_while(|e| e.stream_version < record.stream_version)
                {
                    if let Ok(event) = ConnectionEvent::from_recorded(previous) {
                        folder.entry(previous, &event);
                    }
                }
            }
            self.connections.insert(record.stream_id.clone(), folder);
        }
        // Inserted just above when missing.
        self.connections
            .get_mut(&record.stream_id)
            .ok_or_else(|| StoreError::Database("the follower lost a stream's state".into()))
    }

    /// The integration's key: from its creation event, seen now or read from its stream.
    async fn integration_key(
        &mut self,
        record: &RecordedEvent,
        event: &IntegrationEvent,
    ) -> Result<Option<String>, StoreError> {
        if let IntegrationEvent::IntegrationCreated(created) = event {
            let key = Some(created.provider_config_key.clone());
            self.integrations
                .insert(record.stream_id.clone(), key.clone());
            return Ok(key);
        }
        if let Some(key) = self.integrations.get(&record.stream_id) {
            return Ok(key.clone());
        }
        let key = self
            .store
            .read_stream(&record.stream_id, 0)
            .await?
            .iter()
            .find_map(|e| match IntegrationEvent::from_recorded(e) {
                Ok(IntegrationEvent::IntegrationCreated(created)) => {
                    Some(created.provider_config_key)
                }
                _ => None,
            });
        self.integrations
            .insert(record.stream_id.clone(), key.clone());
        Ok(key)
    }
}

/// Follows the log until `shutdown`, writing one line per event to `out` (JSON objects with
/// `json`, else text).
pub async fn follow(
    backend: &Backend,
    from_start: bool,
    json: bool,
    out: &mut (dyn Write + Send),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut tail = Tail::start(backend, from_start).await?;
    let mut listener = backend.events().listener();
    tokio::pin!(shutdown);
    loop {
        let lines = tokio::select! {
            () = &mut shutdown => return Ok(()),
            lines = tail.next_lines() => lines?,
        };
        if lines.is_empty() {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = listener.wait() => {}
            }
            continue;
        }
        for line in &lines {
            if json {
                serde_json::to_writer(&mut *out, line)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", line.text())?;
            }
        }
        out.flush()?;
    }
}

fn other(record: &RecordedEvent) -> TailBody {
    TailBody::Other {
        event_type: record.event_type.clone(),
        stream_version: record.stream_version,
        recorded_at: timestamp(record),
    }
}

fn integration_type(event: &IntegrationEvent) -> &'static str {
    match event {
        IntegrationEvent::IntegrationCreated(_) => "integration_created",
        IntegrationEvent::IntegrationUpdated(_) => "integration_updated",
        IntegrationEvent::IntegrationDeleted(_) => "integration_deleted",
    }
}

fn timestamp(record: &RecordedEvent) -> String {
    record
        .recorded_at
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
