//! The connection's commands: authorize, set metadata, delete, and the refresh protocol's lease
//! and outcomes (DESIGN.md §3), each decided by [`crate::connection::decide`].

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tracing::field::Empty;
use uuid::Uuid;

use super::{CommandError, Commands, Loaded, MAX_ATTEMPTS};
use crate::connect_session::Ownership;
use crate::connection::TokenFingerprints;
use crate::connection::{
    self, ActiveConnection, Authorization, Connection, ConnectionCommand, ConnectionEvent,
    ConnectionKey, ConnectionRejected, Flow, MetadataMode, RefreshFailure, RefreshTrigger,
};
use crate::credentials::Credentials;
use crate::event::DomainEvent;
use crate::keys::Sealed;
use crate::store::StreamId;

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
    /// Tags and end user from a connect session (empty: keep the connection's).
    pub ownership: Ownership,
    /// Refuse ([`ConnectionRejected::AlreadyExists`]) when the connection is authorized now:
    /// a flow started with only the public key may create a connection, never replace one.
    pub only_new: bool,
    /// Refuse ([`ConnectionRejected::NotFound`], [`ConnectionRejected::Deleted`]) when the
    /// connection is not authorized now: a reconnect re-authorizes a connection, never
    /// creates one.
    pub only_existing: bool,
}

impl AuthorizeConnection {
    /// Whether it could be recorded on a new connection: its bounds, then the decision itself
    /// on an empty state (nothing is sealed or written). A bulk import checks every line so.
    pub fn check(&self) -> Result<(), CommandError> {
        self.credentials.check_bounds()?;
        let placeholder = Sealed {
            key_id: Uuid::nil(),
            ciphertext: Vec::new(),
        };
        self.decide(
            &Connection::default(),
            Uuid::nil(),
            &placeholder,
            &TokenFingerprints::default(),
        )
        .map(drop)
    }

    /// The events that record it on `state`: the authorization of `sealed` (its credentials
    /// sealed under `data_key_id`), then the metadata if it carries some.
    pub(super) fn decide(
        &self,
        state: &Connection,
        data_key_id: Uuid,
        sealed: &Sealed,
        fingerprints: &TokenFingerprints,
    ) -> Result<Vec<ConnectionEvent>, CommandError> {
        if self.only_new && state.active().is_some() {
            return Err(CommandError::Connection(ConnectionRejected::AlreadyExists));
        }
        if self.only_existing {
            match state {
                Connection::Active(_) => {}
                Connection::NeverAuthorized => {
                    return Err(CommandError::Connection(ConnectionRejected::NotFound));
                }
                Connection::Deleted(_) => {
                    return Err(CommandError::Connection(ConnectionRejected::Deleted));
                }
            }
        }
        let authorization = Authorization {
            provider_config_key: self.key.provider_config_key().to_owned(),
            connection_id: self.key.connection_id().to_owned(),
            provider: self.provider.clone(),
            flow: self.flow,
            credentials_type: self.credentials.credentials_type(),
            data_key_id,
            credentials: sealed.clone(),
            has_refresh_token: self.credentials.has_refresh_token(),
            expires_at: self.credentials.expires_at(),
            scopes: self.scopes.clone(),
            connection_config: self.connection_config.clone(),
            fingerprints: fingerprints.clone(),
            ownership: Box::new(self.ownership.clone()),
        };
        let authorize = ConnectionCommand::Authorize {
            authorization,
            now: self.now,
        };
        let mut events = connection::decide(state, authorize)?;
        if let Some(metadata) = &self.metadata {
            let mut authorized = state.clone();
            for event in &events {
                connection::apply(&mut authorized, event);
            }
            let set = ConnectionCommand::SetMetadata {
                metadata: Value::Object(metadata.clone()),
                mode: MetadataMode::Replace,
                now: self.now,
            };
            events.extend(connection::decide(&authorized, set)?);
        }
        Ok(events)
    }
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

impl Commands {
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
        command.credentials.check_bounds()?;
        let stream_id = command.key.stream_id();
        let fingerprints = self.fingerprints(&command.credentials).await?;
        let credentials = &command.credentials;
        // The data key the credentials it replaces were sealed under.
        let superseded = std::sync::Mutex::new(None);
        let loaded = self
            .execute_sealed(
                stream_id,
                credentials,
                |state: &Connection, data_key_id, sealed, _| {
                    if let Ok(mut superseded) = superseded.lock() {
                        *superseded = state.active().map(|active| active.credentials.key_id);
                    }
                    command.decide(state, data_key_id, sealed, &fingerprints)
                },
            )
            .await?;
        // Only history reads (which never open secrets) may need the old generation's key now:
        // it leaves the cache, or every re-authorization would keep one more key in memory.
        if let Some(old) = superseded.into_inner().ok().flatten()
            && loaded
                .state
                .active()
                .is_none_or(|a| a.credentials.key_id != old)
        {
            self.vault.forget_cached(&[old]);
        }
        Ok(loaded.traced())
    }

    /// [`Commands::set_metadata`] on every connection of `keys` (each once) in one atomic
    /// append: all of them change, or none does (an unknown or deleted one refuses them all).
    pub async fn set_metadata_of_all(
        &self,
        keys: &[ConnectionKey],
        metadata: Value,
        mode: MetadataMode,
        now: DateTime<Utc>,
    ) -> Result<Vec<Loaded<Connection>>, CommandError> {
        let mut loaded = Vec::with_capacity(keys.len());
        for key in keys {
            let one: Loaded<Connection> = self.load(key.stream_id()).await?;
            if one.version == 0 {
                return Err(CommandError::Connection(ConnectionRejected::NotFound));
            }
            loaded.push(one);
        }
        self.execute_on_all(loaded, |state: &Connection| {
            let command = ConnectionCommand::SetMetadata {
                metadata: metadata.clone(),
                mode,
                now,
            };
            Ok(connection::decide(state, command)?)
        })
        .await
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
        let loaded = self.load(key.stream_id()).await?;
        let loaded = self
            .decide_connection(loaded, MAX_ATTEMPTS, |_| ConnectionCommand::SetMetadata {
                metadata: metadata.clone(),
                mode,
                now,
            })
            .await?;
        Ok(loaded.traced())
    }

    /// Replaces the connection's tags and end user.
    #[tracing::instrument(
        name = "commands.set_ownership",
        skip_all,
        fields(
            provider_config_key = %key.provider_config_key(),
            connection_id = %key.connection_id(),
            stream_version = Empty,
        )
    )]
    pub async fn set_ownership(
        &self,
        key: &ConnectionKey,
        ownership: Ownership,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Connection>, CommandError> {
        let loaded = self.load(key.stream_id()).await?;
        let loaded = self
            .decide_connection(loaded, MAX_ATTEMPTS, |_| ConnectionCommand::SetOwnership {
                ownership: ownership.clone(),
                now,
            })
            .await?;
        Ok(loaded.traced())
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
        // Every key the store holds live for the stream: the current generation's, superseded
        // ones, and any created for an append that never landed. A re-authorization racing
        // with this deletion makes it decide again on the new state, whose key joins the list.
        let live = self.vault.live_keys(&stream_id).await?;
        self.delete_and_shred(stream_id, |state: &Connection| {
            let mut shredded_data_keys = live.clone();
            if let Some(active) = state.active()
                && !shredded_data_keys.contains(&active.credentials.key_id)
            {
                shredded_data_keys.push(active.credentials.key_id);
            }
            let delete = ConnectionCommand::Delete {
                now,
                shredded_data_keys,
            };
            Ok(connection::decide(state, delete)?)
        })
        .await
    }

    /// The plaintext credentials of the connection's current generation.
    /// [`KeyError::Shredded`](crate::keys::KeyError::Shredded) (as [`CommandError::Keys`]) once
    /// the connection was deleted.
    ///
    /// Its span is at DEBUG: every cache miss of a read opens credentials, and at INFO the span
    /// cost about 2.5% of the server's CPU under uniform reads over 200,000 connections (a
    /// frame-pointer profile). Nothing inside logs; the request's own span names the route.
    #[tracing::instrument(
        name = "commands.reveal_credentials",
        level = "debug",
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
    /// as the expected version. A conflict is returned as
    /// [`StoreError::Conflict`](crate::store::StoreError::Conflict) (someone else moved first:
    /// the caller starts over from the head, DESIGN.md §3 step 3); a rejection
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
        self.decide_connection(loaded, 1, |_| ConnectionCommand::LeaseRefresh {
            lease_id: lease.lease_id,
            holder: lease.holder.clone(),
            trigger: lease.trigger,
            now: lease.now,
            lease_duration: lease.lease_duration,
        })
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
    /// is [`KeyError::Shredded`](crate::keys::KeyError::Shredded): a deletion is in the log and
    /// the lease is lost.
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
        credentials.check_bounds()?;
        let sealed = self
            .vault
            .seal_json(active.credentials.key_id, credentials)
            .await?;
        let fingerprints = self.fingerprints(credentials).await?;
        self.decide_connection(leased, MAX_ATTEMPTS, |_| {
            ConnectionCommand::CompleteRefresh {
                lease_id,
                credentials: sealed.clone(),
                expires_at: credentials.expires_at(),
                has_refresh_token: credentials.has_refresh_token(),
                refresh_token_rotated,
                fingerprints: fingerprints.clone(),
                now,
            }
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
        self.decide_connection(leased, MAX_ATTEMPTS, |_| ConnectionCommand::FailRefresh {
            lease_id,
            failure: failure.clone(),
            now,
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

    /// Decides the command `command` makes of the state on `loaded` and appends it, at most
    /// `max_attempts` times (see [`Commands::execute_at_most`]).
    async fn decide_connection(
        &self,
        loaded: Loaded<Connection>,
        max_attempts: u32,
        mut command: impl FnMut(&Connection) -> ConnectionCommand + Send,
    ) -> Result<Loaded<Connection>, CommandError> {
        self.execute_at_most(
            loaded,
            move |state| Ok(connection::decide(state, command(state))?),
            max_attempts,
        )
        .await
    }
}
