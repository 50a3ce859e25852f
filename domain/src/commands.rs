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

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tracing::field::Empty;
use uuid::Uuid;

use crate::connection::{
    self, ActiveConnection, Connection, ConnectionCommand, ConnectionEvent, ConnectionKey,
    ConnectionRejected, Flow, MetadataMode, RefreshFailure, RefreshTrigger, TokenFingerprints,
};
use crate::credentials::{ClientSecret, Credentials};
use crate::event::{DomainEvent, UnreadableEvent};
use crate::integration::{
    self, ActiveIntegration, Integration, IntegrationCommand, IntegrationEvent, IntegrationRejected,
};
use crate::keys::{KeyError, Sealed, Vault};
use crate::store::{Backend, ExpectedVersion, StoreError, StreamId};

/// How many times a command is decided and appended before a run of conflicts gives up.
pub const MAX_ATTEMPTS: u32 = 12;

/// How many times a new data key is made when concurrent deletions keep shredding it.
const MAX_RESEALS: u32 = 3;

/// The first conflict backoff's upper bound; it doubles with each attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(2);

/// The largest conflict backoff.
const BACKOFF_CAP: Duration = Duration::from_millis(200);

/// A pure event-sourced aggregate the command service can load and fold.
pub trait Aggregate: Default + Clone + std::fmt::Debug + Send + Sync + DeserializeOwned {
    /// Its events.
    type Event: DomainEvent + Clone + std::fmt::Debug + Send + Sync;

    /// The state after `event`.
    fn apply(&mut self, event: &Self::Event);

    /// Whether `event` deletes the aggregate, shredding its stream's data keys.
    fn deletes(event: &Self::Event) -> bool;
}

impl Aggregate for Connection {
    type Event = ConnectionEvent;

    fn apply(&mut self, event: &ConnectionEvent) {
        connection::apply(self, event);
    }

    fn deletes(event: &ConnectionEvent) -> bool {
        matches!(event, ConnectionEvent::ConnectionDeleted(_))
    }
}

impl Aggregate for Integration {
    type Event = IntegrationEvent;

    fn apply(&mut self, event: &IntegrationEvent) {
        integration::apply(self, event);
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

/// Record new or renewed credentials (OAuth callback or import).
#[derive(Clone, Debug)]
pub struct AuthorizeConnection {
    /// Which connection.
    pub key: ConnectionKey,
    /// The provider template's name.
    pub provider: String,
    /// How the credentials were obtained.
    pub flow: Flow,
    /// The plaintext credentials; only their sealed form is stored. Its `Debug` redacts them.
    pub credentials: Credentials,
    /// The granted scopes.
    pub scopes: Vec<String>,
    /// Provider-specific configuration.
    pub connection_config: Map<String, Value>,
    /// When the authorization completed.
    pub now: DateTime<Utc>,
    /// Metadata to set (replacing what is there) in the same append: an import that carries
    /// metadata is recorded whole or not at all.
    pub metadata: Option<Map<String, Value>>,
}

/// Take a connection's refresh lease.
#[derive(Clone, Debug)]
pub struct LeaseRefresh {
    /// The new lease's id; its outcome names it.
    pub lease_id: Uuid,
    /// The instance taking it.
    pub holder: String,
    /// What started the refresh.
    pub trigger: RefreshTrigger,
    /// How long it lasts; longer than the provider call's timeout.
    pub lease_duration: chrono::Duration,
    /// When it is taken.
    pub now: DateTime<Utc>,
}

/// An integration's configuration, as created or replaced.
#[derive(Clone, Debug)]
pub struct IntegrationConfig {
    /// The provider template's name.
    pub provider: String,
    /// The OAuth client id.
    pub oauth_client_id: String,
    /// The OAuth client secret; only its sealed form is stored. Its `Debug` redacts it.
    pub client_secret: ClientSecret,
    /// The scopes to request.
    pub oauth_scopes: Vec<String>,
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

    // -----------------------------------------------------------------------------------------
    // Connections
    // -----------------------------------------------------------------------------------------

    /// The connection as its stream leaves it.
    #[tracing::instrument(
        name = "commands.load_connection",
        skip_all,
        fields(provider_config_key = %key.provider_config_key(), connection_id = %key.connection_id())
    )]
    pub async fn load_connection(
        &self,
        key: &ConnectionKey,
    ) -> Result<Loaded<Connection>, CommandError> {
        self.load(key.stream_id()).await
    }

    /// Records new credentials as the connection's next generation, sealed under a new data key,
    /// with fingerprints of its tokens. Always allowed: also over a live or deleted connection.
    #[tracing::instrument(
        name = "commands.authorize",
        skip_all,
        fields(
            provider_config_key = %command.key.provider_config_key(),
            connection_id = %command.key.connection_id(),
            stream_version = Empty,
        )
    )]
    pub async fn authorize_connection(
        &self,
        command: AuthorizeConnection,
    ) -> Result<Loaded<Connection>, CommandError> {
        let stream_id = command.key.stream_id();
        let fingerprints = self.fingerprints(&command.credentials).await?;
        let credentials = &command.credentials;
        let loaded = self
            .execute_sealed(stream_id, credentials, |state, data_key_id, sealed, _| {
                let authorize = ConnectionCommand::Authorize {
                    provider_config_key: command.key.provider_config_key().to_owned(),
                    connection_id: command.key.connection_id().to_owned(),
                    provider: command.provider.clone(),
                    flow: command.flow,
                    credentials_type: credentials.credentials_type(),
                    data_key_id,
                    credentials: sealed.clone(),
                    has_refresh_token: credentials.has_refresh_token(),
                    expires_at: credentials.expires_at(),
                    scopes: command.scopes.clone(),
                    connection_config: command.connection_config.clone(),
                    fingerprints: fingerprints.clone(),
                    now: command.now,
                };
                let mut events = connection::decide(state, authorize)?;
                if let Some(metadata) = &command.metadata {
                    let mut authorized = state.clone();
                    for event in &events {
                        connection::apply(&mut authorized, event);
                    }
                    let set = ConnectionCommand::SetMetadata {
                        metadata: Value::Object(metadata.clone()),
                        mode: MetadataMode::Replace,
                        now: command.now,
                    };
                    events.extend(connection::decide(&authorized, set)?);
                }
                Ok(events)
            })
            .await?;
        tracing::Span::current().record("stream_version", loaded.version);
        Ok(loaded)
    }

    /// Replaces or merges the connection's metadata (a JSON object).
    #[tracing::instrument(
        name = "commands.set_metadata",
        skip_all,
        fields(
            provider_config_key = %key.provider_config_key(),
            connection_id = %key.connection_id(),
            stream_version = Empty,
        )
    )]
    pub async fn set_metadata(
        &self,
        key: &ConnectionKey,
        metadata: Value,
        mode: MetadataMode,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Connection>, CommandError> {
        let stream_id = key.stream_id();
        let loaded = self
            .execute(stream_id, |state: &Connection| {
                let set = ConnectionCommand::SetMetadata {
                    metadata: metadata.clone(),
                    mode,
                    now,
                };
                Ok(connection::decide(state, set)?)
            })
            .await?;
        tracing::Span::current().record("stream_version", loaded.version);
        Ok(loaded)
    }

    /// Deletes the connection: appends `ConnectionDeleted` naming every data key of its
    /// generations, then destroys them. The history stays; its secrets become unrecoverable.
    ///
    /// Deleting a deleted connection is rejected, after destroying whatever key of its stream is
    /// still live: a deletion whose shredding failed after its append is finished by the retry.
    #[tracing::instrument(
        name = "commands.delete_connection",
        skip_all,
        fields(
            provider_config_key = %key.provider_config_key(),
            connection_id = %key.connection_id(),
            stream_version = Empty,
        )
    )]
    pub async fn delete_connection(
        &self,
        key: &ConnectionKey,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Connection>, CommandError> {
        let stream_id = key.stream_id();
        let result = self
            .execute(stream_id.clone(), |state: &Connection| {
                let shredded_data_keys = state
                    .active()
                    .map(|active| active.data_key_ids.clone())
                    .unwrap_or_default();
                let delete = ConnectionCommand::Delete {
                    now,
                    shredded_data_keys,
                };
                Ok(connection::decide(state, delete)?)
            })
            .await;
        match result {
            Ok(loaded) => {
                tracing::Span::current().record("stream_version", loaded.version);
                // Only now that the deletion is in the log: had the append failed, the
                // connection would still need its keys.
                let destroyed = self.vault.destroy(&stream_id).await?;
                tracing::info!(destroyed, "connection deleted, its data keys shredded");
                Ok(loaded)
            }
            Err(CommandError::Connection(ConnectionRejected::Deleted)) => {
                self.vault.destroy(&stream_id).await?;
                Err(ConnectionRejected::Deleted.into())
            }
            Err(error) => Err(error),
        }
    }

    /// The plaintext credentials of the connection's current generation.
    /// [`KeyError::Shredded`] (as [`CommandError::Keys`]) once the connection was deleted.
    #[tracing::instrument(
        name = "commands.reveal_credentials",
        skip_all,
        fields(
            provider_config_key = %connection.provider_config_key,
            connection_id = %connection.connection_id,
        )
    )]
    pub async fn reveal_credentials(
        &self,
        connection: &ActiveConnection,
    ) -> Result<Credentials, CommandError> {
        self.reveal(&connection.credentials).await
    }

    /// Takes the refresh lease on `loaded` as it is: one attempt, appended with `loaded.version`
    /// as the expected version. A conflict is returned as [`StoreError::Conflict`] (someone else
    /// moved first: the caller starts over from the head, DESIGN.md §3 step 3); a rejection
    /// (`LeaseHeld`, `RefreshBlocked`, `NoRefreshToken`, …) is returned as is.
    #[tracing::instrument(
        name = "refresh.lease",
        skip_all,
        fields(stream_version = loaded.version, lease_id = %lease.lease_id)
    )]
    pub async fn lease_refresh(
        &self,
        loaded: Loaded<Connection>,
        lease: LeaseRefresh,
    ) -> Result<Loaded<Connection>, CommandError> {
        self.execute_at_most(
            loaded,
            |state| {
                Ok(connection::decide(
                    state,
                    ConnectionCommand::LeaseRefresh {
                        lease_id: lease.lease_id,
                        holder: lease.holder.clone(),
                        trigger: lease.trigger,
                        now: lease.now,
                        lease_duration: lease.lease_duration,
                    },
                )?)
            },
            1,
        )
        .await
    }

    /// Records the provider's new tokens under the lease taken in `leased` (the state right after
    /// the lease). The append expects `leased.version` (the fence); on a conflict the events since
    /// are folded in and the outcome decided again: events that leave the lease open (metadata)
    /// let it append at the new head, a later lease, a re-authorization or a deletion make it
    /// [`ConnectionRejected::LeaseNotHeld`] and nothing is appended.
    ///
    /// The credentials are sealed under the current generation's data key (the one that seals
    /// the credentials they replace), so no key is made. A deletion can shred that key; if it is
    /// in the log before this outcome, the fence refuses the outcome (the lease is no longer
    /// held), and if it comes after, shredding what the outcome sealed is what it meant. So unlike
    /// [`Commands::authorize_connection`] nothing is sealed again. A key shredded before sealing
    /// is [`KeyError::Shredded`]: a deletion is in the log and the lease is lost.
    #[tracing::instrument(
        name = "refresh.complete",
        skip_all,
        fields(stream_version = leased.version, lease_id = %lease_id)
    )]
    pub async fn complete_refresh(
        &self,
        leased: Loaded<Connection>,
        lease_id: Uuid,
        credentials: &Credentials,
        refresh_token_rotated: bool,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Connection>, CommandError> {
        let Some(active) = leased.state.active() else {
            return Err(ConnectionRejected::LeaseNotHeld { lease_id }.into());
        };
        let sealed = self
            .vault
            .seal_json(active.credentials.key_id, credentials)
            .await?;
        let fingerprints = self.fingerprints(credentials).await?;
        self.execute_from(leased, |state| {
            Ok(connection::decide(
                state,
                ConnectionCommand::CompleteRefresh {
                    lease_id,
                    credentials: sealed.clone(),
                    expires_at: credentials.expires_at(),
                    has_refresh_token: credentials.has_refresh_token(),
                    refresh_token_rotated,
                    fingerprints: fingerprints.clone(),
                    now,
                },
            )?)
        })
        .await
    }

    /// Records a failed refresh under the lease taken in `leased`; fenced as
    /// [`Commands::complete_refresh`]. The stored credentials are left as they are.
    #[tracing::instrument(
        name = "refresh.fail",
        skip_all,
        fields(stream_version = leased.version, lease_id = %lease_id)
    )]
    pub async fn fail_refresh(
        &self,
        leased: Loaded<Connection>,
        lease_id: Uuid,
        failure: RefreshFailure,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Connection>, CommandError> {
        self.execute_from(leased, |state| {
            Ok(connection::decide(
                state,
                ConnectionCommand::FailRefresh {
                    lease_id,
                    failure: failure.clone(),
                    now,
                },
            )?)
        })
        .await
    }

    /// The connection's events after `after_version`, folded onto nothing: what a waiter reads
    /// to see whether a lease got its outcome.
    pub async fn connection_events_after(
        &self,
        stream_id: &StreamId,
        after_version: u32,
    ) -> Result<Vec<ConnectionEvent>, CommandError> {
        let recorded = self
            .backend
            .events()
            .read_stream(stream_id, after_version)
            .await?;
        recorded
            .iter()
            .map(|record| Ok(ConnectionEvent::from_recorded(record)?))
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Integrations
    // -----------------------------------------------------------------------------------------

    /// The integration as its stream leaves it.
    #[tracing::instrument(
        name = "commands.load_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key)
    )]
    pub async fn load_integration(
        &self,
        provider_config_key: &str,
    ) -> Result<Loaded<Integration>, CommandError> {
        self.load(integration::stream_id(provider_config_key)).await
    }

    /// Creates the integration (again, after a deletion), its client secret sealed under a new
    /// data key. Rejected while a live integration has this key.
    #[tracing::instrument(
        name = "commands.create_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn create_integration(
        &self,
        provider_config_key: &str,
        config: IntegrationConfig,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        let stream_id = integration::stream_id(provider_config_key);
        let loaded = self
            .execute_sealed(
                stream_id,
                &config.client_secret,
                |state, _, sealed, again| {
                    // Sealing again means this creation is in the log with a shredded key: what
                    // fixes it is an update.
                    let command = if again {
                        IntegrationCommand::Update {
                            provider: config.provider.clone(),
                            oauth_client_id: config.oauth_client_id.clone(),
                            client_secret: sealed.clone(),
                            oauth_scopes: config.oauth_scopes.clone(),
                            now,
                        }
                    } else {
                        IntegrationCommand::Create {
                            provider_config_key: provider_config_key.to_owned(),
                            provider: config.provider.clone(),
                            oauth_client_id: config.oauth_client_id.clone(),
                            client_secret: sealed.clone(),
                            oauth_scopes: config.oauth_scopes.clone(),
                            now,
                        }
                    };
                    Ok(integration::decide(state, command)?)
                },
            )
            .await?;
        tracing::Span::current().record("stream_version", loaded.version);
        Ok(loaded)
    }

    /// Replaces the live integration's configuration; the client secret is sealed under a new
    /// data key (the previous ones are shredded when the integration is deleted).
    #[tracing::instrument(
        name = "commands.update_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn update_integration(
        &self,
        provider_config_key: &str,
        config: IntegrationConfig,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        let stream_id = integration::stream_id(provider_config_key);
        let loaded = self
            .execute_sealed(stream_id, &config.client_secret, |state, _, sealed, _| {
                let update = IntegrationCommand::Update {
                    provider: config.provider.clone(),
                    oauth_client_id: config.oauth_client_id.clone(),
                    client_secret: sealed.clone(),
                    oauth_scopes: config.oauth_scopes.clone(),
                    now,
                };
                Ok(integration::decide(state, update)?)
            })
            .await?;
        tracing::Span::current().record("stream_version", loaded.version);
        Ok(loaded)
    }

    /// Deletes the integration, then destroys the data keys of its client secrets.
    ///
    /// Deleting a deleted integration is rejected, after destroying whatever key of its stream
    /// is still live (see [`Commands::delete_connection`]).
    #[tracing::instrument(
        name = "commands.delete_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn delete_integration(
        &self,
        provider_config_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        let stream_id = integration::stream_id(provider_config_key);
        let result = self
            .execute(stream_id.clone(), |state: &Integration| {
                Ok(integration::decide(
                    state,
                    IntegrationCommand::Delete { now },
                )?)
            })
            .await;
        match result {
            Ok(loaded) => {
                tracing::Span::current().record("stream_version", loaded.version);
                // After the append, as for connections.
                let destroyed = self.vault.destroy(&stream_id).await?;
                tracing::info!(destroyed, "integration deleted, its data keys shredded");
                Ok(loaded)
            }
            Err(CommandError::Integration(IntegrationRejected::Deleted)) => {
                self.vault.destroy(&stream_id).await?;
                Err(IntegrationRejected::Deleted.into())
            }
            Err(error) => Err(error),
        }
    }

    /// The plaintext client secret of the live integration.
    #[tracing::instrument(
        name = "commands.reveal_client_secret",
        skip_all,
        fields(provider_config_key = %integration.provider_config_key)
    )]
    pub async fn reveal_client_secret(
        &self,
        integration: &ActiveIntegration,
    ) -> Result<ClientSecret, CommandError> {
        self.reveal(&integration.client_secret).await
    }

    // -----------------------------------------------------------------------------------------
    // Load, decide, append
    // -----------------------------------------------------------------------------------------

    /// The stream's state from its first event.
    async fn load<S: Aggregate>(&self, stream_id: StreamId) -> Result<Loaded<S>, CommandError> {
        let mut loaded = Loaded::empty(stream_id);
        if let Some(snapshots) = &self.snapshots
            && let Some((version, state)) = snapshots.snapshot(&loaded.stream_id).await
        {
            match S::deserialize(state) {
                Ok(state) => {
                    loaded.version = version;
                    loaded.state = state;
                }
                Err(error) => tracing::warn!(
                    error.message = %error,
                    "commands.load cannot read the snapshot; folding the whole stream"
                ),
            }
        }
        self.catch_up(&mut loaded).await?;
        Ok(loaded)
    }

    /// Folds the events appended after `loaded.version` into `loaded`.
    async fn catch_up<S: Aggregate>(&self, loaded: &mut Loaded<S>) -> Result<(), CommandError> {
        let recorded = self
            .backend
            .events()
            .read_stream(&loaded.stream_id, loaded.version)
            .await?;
        for record in &recorded {
            let event = S::Event::from_recorded(record)?;
            loaded.state.apply(&event);
            loaded.version = record.stream_version;
        }
        Ok(())
    }

    /// Loads the stream and runs [`Commands::execute_from`].
    async fn execute<S, F>(&self, stream_id: StreamId, decide: F) -> Result<Loaded<S>, CommandError>
    where
        S: Aggregate,
        F: FnMut(&S) -> Result<Vec<S::Event>, CommandError> + Send,
    {
        let loaded = self.load(stream_id).await?;
        self.execute_from(loaded, decide).await
    }

    /// [`Commands::execute_from`] with up to `max_attempts` attempts.
    async fn execute_from<S, F>(
        &self,
        loaded: Loaded<S>,
        decide: F,
    ) -> Result<Loaded<S>, CommandError>
    where
        S: Aggregate,
        F: FnMut(&S) -> Result<Vec<S::Event>, CommandError> + Send,
    {
        self.execute_at_most(loaded, decide, MAX_ATTEMPTS).await
    }

    /// Decides on `loaded` and appends at its version; on a conflict, catches up and decides
    /// again (a rejection ends it), at most `max_attempts` times in all. With one attempt, a
    /// conflict is returned as [`StoreError::Conflict`].
    async fn execute_at_most<S, F>(
        &self,
        mut loaded: Loaded<S>,
        mut decide: F,
        max_attempts: u32,
    ) -> Result<Loaded<S>, CommandError>
    where
        S: Aggregate,
        F: FnMut(&S) -> Result<Vec<S::Event>, CommandError> + Send,
    {
        let mut attempt = 1;
        loop {
            let events = decide(&loaded.state)?;
            let expected = match loaded.version {
                0 => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
            let new_events = events
                .iter()
                .map(|event| {
                    event
                        .to_new_event()
                        .with_metadata(self.event_metadata.clone())
                })
                .collect();
            match self
                .backend
                .events()
                .append(&loaded.stream_id, expected, new_events)
                .await
            {
                Ok(appended) => {
                    let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
                    let first = appended.stream_version.saturating_sub(count) + 1;
                    loaded.events = Vec::with_capacity(events.len());
                    for ((stream_version, global_position), event) in
                        (first..).zip(appended.global_positions).zip(events)
                    {
                        loaded.state.apply(&event);
                        loaded.events.push(AppendedEvent {
                            stream_version,
                            global_position,
                            event,
                        });
                    }
                    loaded.version = appended.stream_version;
                    return Ok(loaded);
                }
                Err(conflict @ StoreError::Conflict { .. }) if max_attempts <= 1 => {
                    return Err(conflict.into());
                }
                Err(StoreError::Conflict { actual, .. }) => {
                    if attempt >= max_attempts {
                        tracing::warn!(
                            attempts = attempt,
                            stream_version = actual,
                            "every attempt conflicted; giving up"
                        );
                        return Err(CommandError::Conflict);
                    }
                    tracing::debug!(
                        attempt,
                        stream_version = actual,
                        "another writer appended first; deciding again"
                    );
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    self.catch_up(&mut loaded).await?;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs a command that stores `secret` sealed: `decide` gets the state, the new data key's
    /// id, the sealed secret, and whether this call's own event is already in the log with a
    /// shredded key. The key is created once the command is not rejected on the loaded state,
    /// and again if a concurrent deletion shredded it (see the module docs).
    async fn execute_sealed<S, T, F>(
        &self,
        stream_id: StreamId,
        secret: &T,
        mut decide: F,
    ) -> Result<Loaded<S>, CommandError>
    where
        S: Aggregate,
        T: Serialize + Sync,
        F: FnMut(&S, Uuid, &Sealed, bool) -> Result<Vec<S::Event>, CommandError> + Send,
    {
        let mut loaded = self.load::<S>(stream_id).await?;
        // Refuse before making a key: a placeholder stands for the sealed secret.
        let placeholder = Sealed {
            key_id: Uuid::nil(),
            ciphertext: Vec::new(),
        };
        decide(&loaded.state, Uuid::nil(), &placeholder, false)?;
        // Every event this call appends, also those whose key was shredded under them.
        let mut appended = Vec::new();
        for reseal in 0..MAX_RESEALS {
            // If the append below fails, this key stays unused: harmless garbage, shredded with
            // the stream's other keys when it is deleted.
            let data_key_id = self.vault.create_data_key(&loaded.stream_id).await?;
            let sealed = self.vault.seal_json(data_key_id, secret).await?;
            loaded = self
                .execute_from(loaded, |state| {
                    decide(state, data_key_id, &sealed, reseal > 0)
                })
                .await?;
            appended.append(&mut loaded.events);
            // A deletion after this event may have shredded the key, as it should.
            if self.data_key_is_live(data_key_id).await? || self.deleted_since(&loaded).await? {
                loaded.events = appended;
                return Ok(loaded);
            }
            tracing::warn!(
                stream_version = loaded.version,
                "a deletion that precedes this event shredded its new data key; sealing again"
            );
        }
        Err(CommandError::Conflict)
    }

    /// Whether the data key still exists unshredded, asked of the database: another instance's
    /// deletion does not clear this vault's cache.
    async fn data_key_is_live(&self, key_id: Uuid) -> Result<bool, CommandError> {
        let stored = self.backend.keys().data_key(key_id).await?;
        Ok(stored.is_some_and(|key| key.wrapped.is_some()))
    }

    /// Whether an event after `loaded.version` deleted the aggregate.
    async fn deleted_since<S: Aggregate>(&self, loaded: &Loaded<S>) -> Result<bool, CommandError> {
        let recorded = self
            .backend
            .events()
            .read_stream(&loaded.stream_id, loaded.version)
            .await?;
        for record in &recorded {
            if S::deletes(&S::Event::from_recorded(record)?) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Fingerprints of the tokens of `credentials` (none for an API key or basic credentials).
    async fn fingerprints(
        &self,
        credentials: &Credentials,
    ) -> Result<TokenFingerprints, CommandError> {
        let mut fingerprints = TokenFingerprints::default();
        if let Some(token) = credentials.access_token() {
            fingerprints.access_token = Some(self.vault.fingerprint(token).await?);
        }
        if let Some(token) = credentials.refresh_token() {
            fingerprints.refresh_token = Some(self.vault.fingerprint(token).await?);
        }
        Ok(fingerprints)
    }

    /// Opens a sealed JSON secret. A malformed one is reported by position only: a parser's
    /// message could quote the secret.
    async fn reveal<T: DeserializeOwned>(&self, sealed: &Sealed) -> Result<T, CommandError> {
        let plain = self.vault.unseal(sealed).await?;
        serde_json::from_slice(&plain).map_err(|error| {
            KeyError::Format(format!(
                "{:?} error at line {} column {} of the sealed value of key {}",
                error.classify(),
                error.line(),
                error.column(),
                sealed.key_id
            ))
            .into()
        })
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

/// A random wait before attempt `attempt + 1`: up to twice as long as the previous bound, capped
/// ("full jitter"), so that writers who conflicted do not meet again in lockstep.
fn backoff(attempt: u32) -> Duration {
    let bound = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_CAP);
    let bound_micros = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX).max(1);
    // A v4 uuid is 122 random bits: randomness without another dependency.
    let random = u64::try_from(Uuid::new_v4().as_u128() >> 64).unwrap_or(0);
    Duration::from_micros(random % bound_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_a_bound_that_doubles_up_to_the_cap() {
        for attempt in 1..20 {
            let bound = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_CAP);
            for _ in 0..50 {
                assert!(backoff(attempt) < bound);
            }
        }
        assert!(
            (0..200).any(|_| backoff(10) > Duration::from_millis(5)),
            "it spreads over the bound"
        );
    }
}
