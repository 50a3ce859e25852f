//! The command service: load a stream, decide with its pure aggregate, append with the loaded
//! version as the expected version. The HTTP API and the refresh worker change connections and
//! integrations only through it.
//!
//! Guarantees:
//! - An event is appended only onto the version it was decided on. When another writer got
//!   there first ([`StoreError::Conflict`]), the events since are read and the command is decided
//!   again on the new state, up to [`MAX_ATTEMPTS`] times with a jittered backoff; a rejection on
//!   the new state wins. A rejection by the aggregate is an answer and is never retried.
//! - Secrets enter the log only sealed. Credentials and client secrets are sealed under a new data
//!   key per authorization (per creation or update for integrations) whose owner is the stream,
//!   and fingerprints come from the vault. A data key is created only once the command is known
//!   not to be rejected on the state as loaded.
//! - A deletion shreds the stream's data keys only after its event is in the log: a deletion that
//!   failed to append destroys nothing that is still in use. A data key created for an append
//!   that then fails is left unused: harmless garbage that seals nothing in the log, and is
//!   shredded with its owner's other keys when the owner is deleted.
//! - A deletion destroys every key its stream owns, so it can also destroy the new key of an
//!   authorization (or creation) that was appended after the deletion's event but sealed before
//!   its keys were destroyed. That authorization sees its key gone after its append and seals
//!   again under a fresh key, in a further event; a key shredded by a deletion that comes after
//!   the authorization's event is what the deletion meant, and is left so.
//! - Every appended event's metadata names the instance that appended it (`{"instance": name}`),
//!   so the audit trail can tell instances apart.
//! - No plaintext secret appears in an error or a tracing field; spans name the connection by
//!   `provider_config_key` and `connection_id` only.
//!
//! Its rooms: `connection` and `integration` (the commands of each aggregate), `import` (many
//! connections in a few writes) and `execute` (the machinery they share: load, decide, append,
//! retry on conflict, seal, delete and shred).

mod connection;
mod execute;
mod import;
mod integration;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::connection::{Connection, ConnectionEvent, ConnectionRejected};
use crate::event::{DomainEvent, UnreadableEvent};
use crate::integration::{Integration, IntegrationEvent, IntegrationRejected};
use crate::keys::{KeyError, Vault};
use crate::store::{Backend, StoreError, StreamId};

pub use connection::{AuthorizeConnection, LeaseRefresh};
pub use import::Imported;
pub use integration::IntegrationConfig;

/// How many times a command is decided and appended before a run of conflicts gives up.
pub const MAX_ATTEMPTS: u32 = 12;

/// A pure event-sourced aggregate the command service can load and fold.
pub trait Aggregate: Default + Clone + std::fmt::Debug + Send + Sync + DeserializeOwned {
    /// Its events.
    type Event: DomainEvent + Clone + std::fmt::Debug + Send + Sync;

    /// The state after `event`.
    fn apply(&mut self, event: &Self::Event);

    /// The state after `events`, in stream order.
    fn from_events<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }

    /// Whether `event` deletes the aggregate, shredding its stream's data keys.
    fn deletes(event: &Self::Event) -> bool;
}

impl Aggregate for Connection {
    type Event = ConnectionEvent;

    fn apply(&mut self, event: &ConnectionEvent) {
        crate::connection::apply(self, event);
    }

    fn deletes(event: &ConnectionEvent) -> bool {
        matches!(event, ConnectionEvent::ConnectionDeleted(_))
    }
}

impl Aggregate for Integration {
    type Event = IntegrationEvent;

    fn apply(&mut self, event: &IntegrationEvent) {
        crate::integration::apply(self, event);
    }

    fn deletes(event: &IntegrationEvent) -> bool {
        matches!(event, IntegrationEvent::IntegrationDeleted(_))
    }
}

/// An event this call appended, where it landed.
#[derive(Clone, Debug, PartialEq)]
pub struct AppendedEvent<E> {
    /// Its version in its stream.
    pub stream_version: u32,
    /// Its position in the global log.
    pub global_position: i64,
    /// The event.
    pub event: E,
}

/// A stream's state as of `version`, and what the call that produced it appended.
#[derive(Clone, Debug)]
pub struct Loaded<S: Aggregate> {
    /// The stream.
    pub stream_id: StreamId,
    /// The stream's version after the call (0: there is no stream).
    pub version: u32,
    /// The state at `version`.
    pub state: S,
    /// The events this call appended, in stream order (none for a plain load).
    pub events: Vec<AppendedEvent<S::Event>>,
}

impl<S: Aggregate> Loaded<S> {
    /// An empty stream.
    fn empty(stream_id: StreamId) -> Self {
        Self {
            stream_id,
            version: 0,
            state: S::default(),
            events: Vec::new(),
        }
    }

    /// Itself, its version recorded as `stream_version` on the current (the command's) span.
    fn traced(self) -> Self {
        tracing::Span::current().record("stream_version", self.version);
        self
    }
}

/// Why a command did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The connection refused the command (a domain answer).
    #[error(transparent)]
    Connection(#[from] ConnectionRejected),
    /// The integration refused the command (a domain answer).
    #[error(transparent)]
    Integration(#[from] IntegrationRejected),
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing, opening or managing keys failed (`Shredded` once a connection is deleted).
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// An event of the stream cannot be read.
    #[error(transparent)]
    Unreadable(#[from] UnreadableEvent),
    /// Other writers kept changing the stream; every attempt conflicted.
    #[error("the stream kept changing under the command; gave up after {MAX_ATTEMPTS} attempts")]
    Conflict,
}

impl CommandError {
    /// Whether the aggregate refused because it was deleted already.
    fn is_deleted_rejection(&self) -> bool {
        matches!(
            self,
            Self::Connection(ConnectionRejected::Deleted)
                | Self::Integration(IntegrationRejected::Deleted)
        )
    }
}

/// The instance name events carry when none was given.
pub const UNKNOWN_INSTANCE: &str = "unknown";

/// Kept folds of stream prefixes (the projections' read models), where loading a stream can
/// start instead of at its first event: streams only grow (a connection gains two events with
/// every refresh), so folding them whole gets slower for as long as the connection lives.
///
/// A snapshot must be the state after the stream's first `version` events, as the aggregate's
/// own `apply` folds them; the events after it are read and folded on top, and every append
/// still expects the version it was decided on, so a stale snapshot costs reads, never a wrong
/// write. A failure to read one is reported as none (the stream is then folded whole).
#[async_trait::async_trait]
pub trait Snapshots: Send + Sync + std::fmt::Debug {
    /// The state of `stream` after its first `version` events, as JSON, if one is kept.
    async fn snapshot(&self, stream: &StreamId) -> Option<(u32, Value)>;
}

/// Loads, decides and appends; seals and reveals secrets. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Commands {
    backend: Backend,
    vault: Vault,
    /// Every appended event's metadata: `{"instance": <this instance's name>}`.
    event_metadata: Value,
    /// Where loads start, when set (see [`Snapshots`]).
    snapshots: Option<Arc<dyn Snapshots>>,
}

impl Commands {
    /// A command service on `backend`, sealing with `vault`; its events name the instance
    /// [`UNKNOWN_INSTANCE`] until [`Commands::with_instance`] names it.
    pub fn new(backend: Backend, vault: Vault) -> Self {
        Self {
            backend,
            vault,
            event_metadata: instance_metadata(UNKNOWN_INSTANCE),
            snapshots: None,
        }
    }

    /// The same service, starting loads from `snapshots` where they have one.
    pub fn with_snapshots(mut self, snapshots: Arc<dyn Snapshots>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// The same service, naming `instance` in the metadata of every event it appends (the audit
    /// trail shows it).
    pub fn with_instance(mut self, instance: impl AsRef<str>) -> Self {
        self.event_metadata = instance_metadata(instance.as_ref());
        self
    }

    /// The same service, naming `origin` (the system its credentials come from, for an import)
    /// in the metadata of every event it appends.
    pub fn with_origin(mut self, origin: &str) -> Self {
        if let Value::Object(metadata) = &mut self.event_metadata {
            metadata.insert(
                crate::history::ORIGIN_METADATA_KEY.to_owned(),
                Value::String(origin.to_owned()),
            );
        }
        self
    }

    /// The instance named in the metadata of the events it appends.
    pub fn instance(&self) -> &str {
        self.event_metadata[crate::history::INSTANCE_METADATA_KEY]
            .as_str()
            .unwrap_or(UNKNOWN_INSTANCE)
    }

    /// The backend it appends to.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The vault it seals with.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }
}

/// Event metadata naming the instance that appends.
fn instance_metadata(instance: &str) -> Value {
    let mut metadata = Map::new();
    metadata.insert(
        crate::history::INSTANCE_METADATA_KEY.to_owned(),
        Value::String(instance.to_owned()),
    );
    Value::Object(metadata)
}
