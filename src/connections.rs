//! What the API does with connections: read, list, import, metadata, delete. Every write
//! answers from the state it produced and writes that state to the read model before it returns
//! (read-your-writes). Failures are [`ConnectionsError`]s; the HTTP layer decides what a client
//! sees of them.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use domain::catalog::Catalog;
use domain::commands::{AuthorizeConnection, CommandError, Loaded};
use domain::connect_session::Ownership;
use domain::connection::{
    ActiveConnection, Connection, ConnectionKey, ConnectionRejected, Flow, MetadataMode,
    RefreshTrigger, check_metadata,
};
use domain::credentials::Credentials;
use domain::integration::{ActiveIntegration, IntegrationSettings};
use projections::queries::{self, ConnectionFilter, ConnectionRecord, ConnectionSummary};
use projections::{ConnectionsModel, ProjectionError, StateModel};
use serde_json::{Map, Value};
use tokio::sync::OnceCell;
use workers::refresh::RefreshError;
use zeroize::Zeroizing;

use crate::state::AppState;

/// Why a connection could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    /// The integration the connection would belong to does not exist.
    #[error("unknown provider config key {0:?}")]
    UnknownProviderConfig(String),
    /// The connection does not exist: never authorized, or deleted.
    #[error(
        "no connection {:?} for provider config key {:?}",
        .0.connection_id(),
        .0.provider_config_key()
    )]
    UnknownConnection(ConnectionKey),
    /// The token is due and could not be refreshed: now, or permanently before (a recorded
    /// permanent failure blocks refreshes on read).
    #[error(transparent)]
    Refresh(RefreshError),
    /// A command on the connection was refused or could not be recorded.
    #[error(
        "a command on connection {:?} of {:?} failed: {source}",
        .key.connection_id(),
        .key.provider_config_key()
    )]
    Command {
        key: ConnectionKey,
        source: Box<CommandError>,
    },
    /// The read model cannot be read or written.
    #[error(transparent)]
    ReadModel(#[from] ProjectionError),
    /// New tags or end user break a rule.
    #[error("{0}")]
    InvalidOwnership(String),
    /// Imported credentials of a kind the integration's provider does not use.
    #[error("provider {provider:?} does not take {kind} credentials")]
    UnfitCredentials {
        provider: String,
        kind: &'static str,
    },
    /// A command left the connection not live where it must be (a bug).
    #[error("{0} is not live after the command")]
    NotLive(&'static str),
    /// The answer could not be rendered (a bug: connections always serialize).
    #[error("cannot render the connection: {0}")]
    Render(#[source] serde_json::Error),
}

impl ConnectionsError {
    /// A command's failure on the connection `key`.
    pub fn command(key: &ConnectionKey) -> impl FnOnce(CommandError) -> Self + '_ {
        move |source| Self::Command {
            key: key.clone(),
            source: Box::new(source),
        }
    }
}

/// A live connection with its credentials opened.
#[derive(Debug)]
pub struct ConnectionView {
    pub connection: Arc<ConnectionRecord>,
    pub credentials: Arc<Opened>,
}

/// Credentials opened from the log, wiped when the last reference to them goes.
pub struct Opened(Credentials);

impl Opened {
    pub fn new(credentials: Credentials) -> Arc<Self> {
        Arc::new(Self(credentials))
    }
}

impl std::ops::Deref for Opened {
    type Target = Credentials;

    fn deref(&self) -> &Credentials {
        &self.0
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.wipe();
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the replica keeps with a cached connection for the hot path: its finished answers, with
/// and without the refresh token, each rendered on first use, and — for a connection a proxied
/// call used — its credentials opened once (what every proxied call sends; the replica's size
/// estimate counts the answers, not these). They hold plaintext secrets, so they live no longer
/// than the entry (dropped on eviction, invalidation and expiry alike) and are wiped when the
/// last reference goes, once the answers sent from them are written out.
#[derive(Debug, Default)]
pub struct Answers {
    rendered: [OnceCell<Bytes>; 4],
    opened: OnceCell<Arc<Opened>>,
}

/// Writes a connection's answer, with its refresh token or without.
pub type Render =
    fn(&ConnectionView, bool, &mut dyn std::io::Write) -> Result<(), serde_json::Error>;

/// Which of a connection's answers: the seed's object (`/connection/:id`) or today's
/// (`/connections/:id`). Each is rendered and kept on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Seed,
    Current,
}

/// Bytes that are zeroed when the last reference to them goes.
struct Wiped(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Counts what is written to it.
struct Length(usize);

impl std::io::Write for Length {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `view`'s answer rendered into one buffer of exactly its size (measured by a first pass), so
/// that no reallocation leaves a copy of its secrets behind, and wiped when the last reference
/// to it goes.
fn rendered(
    view: &ConnectionView,
    with_refresh_token: bool,
    render: Render,
) -> Result<Bytes, ConnectionsError> {
    let mut length = Length(0);
    render(view, with_refresh_token, &mut length).map_err(ConnectionsError::Render)?;
    let mut answer = Zeroizing::new(Vec::with_capacity(length.0));
    render(view, with_refresh_token, &mut *answer).map_err(ConnectionsError::Render)?;
    Ok(Bytes::from_owner(Wiped(answer)))
}

/// A read of the connection `key` from the replica: its data key primed (a miss read it with
/// the row, so opening the credentials asks the store nothing) and the read noted.
async fn read(
    state: &AppState,
    key: &ConnectionKey,
) -> Result<Arc<projections::cache::Cached<Answers>>, ConnectionsError> {
    let Some((cached, data_key)) = state.cache.find_keyed(&state.read_models, key).await? else {
        return Err(missing(state, key).await);
    };
    if let Some(stored) = &data_key {
        state.commands.vault().prime(stored);
    }
    if let Some(stream_id) = state.cache.first_read(&cached) {
        state.activity.note(stream_id, Utc::now());
    }
    Ok(cached)
}

/// The answer for the connection `key`, as `render` makes it from the connection with a fresh
/// token (see [`fresh`] for when it is refreshed first). The hot path: a cached connection whose
/// token is not due answers what was rendered for it before, without opening its credentials
/// again.
pub async fn answer(
    state: &AppState,
    key: &ConnectionKey,
    force_refresh: bool,
    with_refresh_token: bool,
    (shape, render): (Shape, Render),
) -> Result<Bytes, ConnectionsError> {
    let cached = read(state, key).await?;
    if !force_refresh
        && !state
            .refresh
            .needs_refresh(&cached.record.connection, Utc::now())
    {
        let slot = &cached.derived.rendered
            [usize::from(with_refresh_token) + 2 * usize::from(shape == Shape::Current)];
        let answer = slot
            .get_or_try_init(|| async {
                // Opened for this rendering only (unless a proxied call keeps them already):
                // an answer is rendered once, and the replica's memory budget counts answers.
                let credentials = match cached.derived.opened.get() {
                    Some(opened) => opened.clone(),
                    None => Opened::new(reveal(state, key, &cached.record).await?),
                };
                let view = ConnectionView {
                    connection: cached.record.clone(),
                    credentials,
                };
                rendered(&view, with_refresh_token, render)
            })
            .await?;
        return Ok(answer.clone());
    }
    let view = fresh(state, key, cached.record.clone(), force_refresh).await?;
    rendered(&view, with_refresh_token, render)
}

/// The connection `key` as the replica holds it (no refresh, credentials sealed).
pub async fn record(
    state: &AppState,
    key: &ConnectionKey,
) -> Result<Arc<ConnectionRecord>, ConnectionsError> {
    Ok(read(state, key).await?.record.clone())
}

/// The connection `key` with a fresh token and its credentials opened (what a proxied call
/// sends): refreshed first when it is due, as a read does.
pub async fn with_credentials(
    state: &AppState,
    key: &ConnectionKey,
) -> Result<ConnectionView, ConnectionsError> {
    let cached = read(state, key).await?;
    if !state
        .refresh
        .needs_refresh(&cached.record.connection, Utc::now())
    {
        return Ok(ConnectionView {
            connection: cached.record.clone(),
            credentials: opened(state, key, &cached).await?,
        });
    }
    fresh(state, key, cached.record.clone(), false).await
}

/// The cached connection's credentials, opened on first use and kept with the entry (a proxied
/// call sends them on every call).
async fn opened(
    state: &AppState,
    key: &ConnectionKey,
    cached: &projections::cache::Cached<Answers>,
) -> Result<Arc<Opened>, ConnectionsError> {
    let opened = cached
        .derived
        .opened
        .get_or_try_init(|| async { reveal(state, key, &cached.record).await.map(Opened::new) })
        .await?;
    Ok(opened.clone())
}

/// The credentials of `record`, opened.
async fn reveal(
    state: &AppState,
    key: &ConnectionKey,
    record: &ConnectionRecord,
) -> Result<Credentials, ConnectionsError> {
    state
        .commands
        .reveal_credentials(&record.connection)
        .await
        .map_err(ConnectionsError::command(key))
}

/// Refreshes the connection `key` now, through the fence, as a read with `force_refresh` does
/// (the dashboard's "refresh now").
pub async fn refresh_now(state: &AppState, key: &ConnectionKey) -> Result<(), ConnectionsError> {
    let cached = read(state, key).await?;
    fresh(state, key, cached.record.clone(), true).await?;
    Ok(())
}

/// The connection `key` after the provider rejected the token read at `read_at`: refreshed
/// through the fence unless someone renewed it since (then that token is answered).
pub async fn after_rejection(
    state: &AppState,
    key: &ConnectionKey,
    read_at: DateTime<Utc>,
) -> Result<ConnectionView, ConnectionsError> {
    match state.refresh.refresh_rejected(key, read_at).await {
        Ok(fresh) => refreshed(state, fresh).await,
        Err(RefreshError::NotFound | RefreshError::Deleted) => {
            state.cache.invalidate(key.stream_id().as_str());
            Err(missing(state, key).await)
        }
        Err(e) => {
            let _ = refresh_read_model(state, key).await;
            Err(ConnectionsError::Refresh(e))
        }
    }
}

/// The view of a refreshed connection, published to the read model and the replica first.
async fn refreshed(
    state: &AppState,
    fresh: workers::refresh::Fresh,
) -> Result<ConnectionView, ConnectionsError> {
    let connection = publish(state, &fresh.loaded).await?;
    Ok(ConnectionView {
        connection: Arc::new(ConnectionRecord {
            id: projections::model::stable_id(fresh.loaded.stream_id.as_str()),
            version: fresh.loaded.version,
            connection,
        }),
        credentials: Opened::new(fresh.credentials),
    })
}

/// The connection as the read model has it (`record`), with a fresh token: refreshed through
/// the refresh service when it expires within the margin, or when `force_refresh`.
///
/// When a due token's refresh fails transiently and the old token has not expired yet, the old
/// token is answered: it still works, and the next read after the backoff tries again. An
/// expired token is never answered after a failed refresh (503 `connection_refresh_retrying`
/// or 424 `connection_refresh_failed`).
async fn fresh(
    state: &AppState,
    key: &ConnectionKey,
    record: Arc<ConnectionRecord>,
    force_refresh: bool,
) -> Result<ConnectionView, ConnectionsError> {
    let now = Utc::now();
    let active = &record.connection;
    if force_refresh || state.refresh.needs_refresh(active, now) {
        // A permanent failure in the read model answers at once: the provider is not asked
        // again, and the stream is not even loaded.
        if !force_refresh && let Some(blocking) = &active.blocking_failure {
            return Err(ConnectionsError::Refresh(RefreshError::Permanent(
                blocking.clone(),
            )));
        }
        let trigger = if force_refresh {
            RefreshTrigger::Force
        } else {
            RefreshTrigger::Read
        };
        match state.refresh.refresh(key, trigger).await {
            Ok(fresh) => return refreshed(state, fresh).await,
            Err(RefreshError::NotFound | RefreshError::Deleted) => {
                state.cache.invalidate(key.stream_id().as_str());
                return Err(missing(state, key).await);
            }
            Err(RefreshError::Transient { .. })
                if !force_refresh && active.expires_at.is_some_and(|t| t > now) =>
            {
                // Still valid: answered below. The failure is in the log; show it.
                let _ = refresh_read_model(state, key).await;
            }
            Err(e) => {
                // The failure is in the log: the read model should show it.
                let _ = refresh_read_model(state, key).await;
                return Err(ConnectionsError::Refresh(e));
            }
        }
    }
    let credentials = reveal(state, key, &record).await?;
    Ok(ConnectionView {
        connection: record,
        credentials: Opened::new(credentials),
    })
}

/// Writes the connection's state as its stream leaves it to the read model.
async fn refresh_read_model(state: &AppState, key: &ConnectionKey) -> Result<(), ConnectionsError> {
    let loaded = state
        .commands
        .load_connection(key)
        .await
        .map_err(ConnectionsError::command(key))?;
    write_read_model(state, &loaded).await
}

/// The error for a connection that is not there: its integration may be missing instead.
async fn missing(state: &AppState, key: &ConnectionKey) -> ConnectionsError {
    match queries::find_integration(&state.read_models, key.provider_config_key()).await {
        Ok(None) => ConnectionsError::UnknownProviderConfig(key.provider_config_key().to_owned()),
        Ok(Some(_)) => ConnectionsError::UnknownConnection(key.clone()),
        Err(e) => e.into(),
    }
}

/// The connections (of every integration) that `filter` picks, without their credentials.
pub async fn list(
    state: &AppState,
    filter: &ConnectionFilter,
) -> Result<Vec<ConnectionSummary>, ConnectionsError> {
    Ok(queries::list_connections(&state.read_models, filter).await?)
}

/// Existing credentials to record as a connection.
#[derive(Debug)]
pub struct Import {
    pub key: ConnectionKey,
    /// Tags and end user; empty keeps those of an existing connection.
    pub ownership: Ownership,
    pub credentials: Credentials,
    pub connection_config: Map<String, Value>,
    pub metadata: Option<Map<String, Value>>,
}

impl Import {
    /// The command that records it, for an integration with `settings`.
    pub fn authorization(
        self,
        settings: &IntegrationSettings,
        now: DateTime<Utc>,
    ) -> AuthorizeConnection {
        AuthorizeConnection {
            only_new: Default::default(),
            only_existing: Default::default(),
            ownership: self.ownership,
            key: self.key,
            provider: settings.provider.clone(),
            flow: Flow::Import,
            credentials: self.credentials,
            scopes: settings.oauth_scopes.clone(),
            connection_config: self.connection_config,
            now,
            metadata: self.metadata,
        }
    }
}

/// Refuses `credentials` that the provider of the integration with `settings` does not use:
/// an API key under an OAuth 2 template, say, would reach no request the template makes (a
/// proxied call would go out without it). A provider the catalog no longer has is not checked.
pub fn fitting(
    catalog: &Catalog,
    settings: &IntegrationSettings,
    credentials: &Credentials,
) -> Result<(), ConnectionsError> {
    let kind = credentials.credentials_type();
    match catalog.get(&settings.provider) {
        Some(template) if !template.auth_mode.takes(kind) => {
            Err(ConnectionsError::UnfitCredentials {
                provider: settings.provider.clone(),
                kind: kind.as_str(),
            })
        }
        _ => Ok(()),
    }
}

/// Records imported credentials (a new connection, or the next generation of an existing one).
pub async fn import(state: &AppState, import: Import) -> Result<ConnectionView, ConnectionsError> {
    let integration =
        queries::find_integration(&state.read_models, import.key.provider_config_key())
            .await?
            .ok_or_else(|| {
                ConnectionsError::UnknownProviderConfig(import.key.provider_config_key().to_owned())
            })?;
    let settings = &integration.integration.settings;
    fitting(&state.catalog, settings, &import.credentials)?;
    let command = import.authorization(settings, Utc::now());
    let (key, credentials) = (command.key.clone(), command.credentials.clone());
    let loaded = state
        .commands
        .authorize_connection(command)
        .await
        .map_err(ConnectionsError::command(&key))?;
    let connection = publish_authorized(state, &loaded, &integration.integration).await?;
    Ok(ConnectionView {
        connection: Arc::new(ConnectionRecord {
            id: projections::model::stable_id(loaded.stream_id.as_str()),
            version: loaded.version,
            connection,
        }),
        credentials: Opened::new(credentials),
    })
}

/// Sets (replace) or merges metadata on each of the connections `keys` (each once), in one
/// append: if any is unknown, deleted meanwhile or would pass the bounds, nothing is written.
pub async fn set_metadata(
    state: &AppState,
    keys: &[ConnectionKey],
    metadata: Map<String, Value>,
    mode: MetadataMode,
) -> Result<(), ConnectionsError> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    let keys: Vec<ConnectionKey> = keys.iter().filter(|k| seen.insert(*k)).cloned().collect();
    for key in &keys {
        let Some(found) = queries::find_connection(&state.read_models, key).await? else {
            return Err(missing(state, key).await);
        };
        // Checked for every connection first, so that none is written if one would pass the
        // bounds; the command checks again against the log.
        check_metadata(&found.connection.metadata, &metadata, mode).map_err(|rejected| {
            ConnectionsError::command(key)(CommandError::Connection(rejected))
        })?;
    }
    let now = Utc::now();
    let all = state
        .commands
        .set_metadata_of_all(&keys, Value::Object(metadata), mode, now);
    let written = match all.await {
        Ok(written) => written,
        Err(e) => {
            // Deleted since the check: the answer names the first one gone.
            if let CommandError::Connection(
                ConnectionRejected::NotFound | ConnectionRejected::Deleted,
            ) = e
            {
                for key in &keys {
                    if queries::find_connection(&state.read_models, key)
                        .await?
                        .is_none()
                    {
                        return Err(missing(state, key).await);
                    }
                }
            }
            return Err(ConnectionsError::command(&keys[0])(e));
        }
    };
    for loaded in &written {
        publish(state, loaded).await?;
    }
    Ok(())
}

/// Replaces the tags and end user of the connection `key` as `PATCH /connections/:id` asks.
pub async fn set_ownership(
    state: &AppState,
    key: &ConnectionKey,
    body: crate::connect_sessions::PatchBody,
) -> Result<(), ConnectionsError> {
    let Some(found) = queries::find_connection(&state.read_models, key).await? else {
        return Err(missing(state, key).await);
    };
    let ownership = crate::connect_sessions::patched_ownership(&found.connection.ownership, body)
        .map_err(|e| ConnectionsError::InvalidOwnership(e.to_string()))?;
    if let Some(ownership) = ownership {
        let loaded = state
            .commands
            .set_ownership(key, ownership, Utc::now())
            .await
            .map_err(ConnectionsError::command(key))?;
        publish(state, &loaded).await?;
    }
    Ok(())
}

/// Deletes the connection and shreds its secrets. One the read model no longer has is
/// answered as missing, after the command has destroyed any data key of it still live: a
/// deletion whose shredding failed after its append (the database went away) is finished by
/// the client's retry.
pub async fn delete(state: &AppState, key: &ConnectionKey) -> Result<(), ConnectionsError> {
    if queries::find_connection(&state.read_models, key)
        .await?
        .is_none()
    {
        return match state.commands.delete_connection(key, Utc::now()).await {
            // The read model had not caught up with the log: deleted now.
            Ok(loaded) => write_read_model(state, &loaded).await,
            Err(CommandError::Connection(
                ConnectionRejected::Deleted | ConnectionRejected::NotFound,
            )) => Err(missing(state, key).await),
            Err(e) => Err(ConnectionsError::command(key)(e)),
        };
    }
    shred(state, key, Utc::now()).await
}

/// Deletes the connection, shredding its secrets, without looking for it in the read model
/// first (its integration is being deleted). One deleted already is left as it is: the
/// deletion of its integration and its own authorization may both see to it.
pub(crate) async fn shred(
    state: &AppState,
    key: &ConnectionKey,
    now: DateTime<Utc>,
) -> Result<(), ConnectionsError> {
    match state.commands.delete_connection(key, now).await {
        Ok(loaded) => write_read_model(state, &loaded).await,
        Err(CommandError::Connection(
            ConnectionRejected::Deleted | ConnectionRejected::NotFound,
        )) => Ok(()),
        Err(e) => Err(ConnectionsError::command(key)(e)),
    }
}

/// Writes a command's resulting state to the read model (and drops the cached copy).
async fn write_read_model(
    state: &AppState,
    loaded: &Loaded<Connection>,
) -> Result<(), ConnectionsError> {
    state.write_read_model::<ConnectionsModel>(loaded).await?;
    state.cache.invalidate(loaded.stream_id.as_str());
    Ok(())
}

/// [`publish`] for an authorization made under `integration`, which must still be there once
/// the connection is in the read model. Deleting an integration deletes the connections it
/// lists after its own deletion is in the read model; one authorized meanwhile is either
/// listed then or finds the integration gone (or replaced by a new one of the same key) here,
/// and deletes itself: no connection outlives its integration to come back with a new one.
pub(crate) async fn publish_authorized(
    state: &AppState,
    loaded: &Loaded<Connection>,
    integration: &ActiveIntegration,
) -> Result<ActiveConnection, ConnectionsError> {
    let active = publish(state, loaded).await?;
    let key = &integration.provider_config_key;
    let still = queries::find_integration(&state.read_models, key)
        .await?
        .is_some_and(|found| found.integration.created_at == integration.created_at);
    if !still {
        let connection = ConnectionKey::new(key, &active.connection_id);
        shred(state, &connection, Utc::now()).await?;
        return Err(ConnectionsError::UnknownProviderConfig(key.clone()));
    }
    Ok(active)
}

/// Writes a command's resulting state to the read model and returns it, which must be live.
pub(crate) async fn publish(
    state: &AppState,
    loaded: &Loaded<Connection>,
) -> Result<ActiveConnection, ConnectionsError> {
    write_read_model(state, loaded).await?;
    match &loaded.state {
        Connection::Active(active) => Ok(active.clone()),
        _ => Err(ConnectionsError::NotLive(ConnectionsModel::NAME)),
    }
}
