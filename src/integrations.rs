//! What the API does with provider configs (integrations): create, replace, read, delete.
//! Deleting one deletes its connections. A config must name a provider template of the catalog:
//! a connect flow could never use any other. Failures are [`IntegrationsError`]s; the HTTP
//! layer decides what a client sees of them.

use chrono::Utc;
use domain::commands::{CommandError, IntegrationConfig};
use domain::connection::ConnectionKey;
use domain::credentials::ClientSecret;
use projections::queries::{self, IntegrationRecord};
use projections::{IntegrationsModel, ProjectionError};

use crate::connections::{self, ConnectionsError};
use crate::state::AppState;

/// Why an integration could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationsError {
    /// The integration asked for does not exist.
    #[error("no provider config with key {0:?}")]
    NotFound(String),
    /// The integration a request means to replace does not exist.
    #[error("unknown provider config key {0:?}")]
    UnknownProviderConfig(String),
    /// The config names a provider that is not a template of the catalog.
    #[error("unknown provider template {0:?}")]
    UnknownTemplate(String),
    /// A new integration's key is not one every route can name (see [`valid_key`]).
    #[error(
        "invalid integration key {0:?}: 1 to 255 letters, digits, spaces, `~`, `:`, `.`, `@`, \
         `_` or `-`, neither beginning nor ending with a space"
    )]
    InvalidKey(String),
    /// An OAuth provider's config has no client id.
    #[error("missing oauth_client_id")]
    MissingClientId,
    /// An OAuth provider's config has no client secret.
    #[error("missing oauth_client_secret")]
    MissingClientSecret,
    /// A command on the integration was refused or could not be recorded.
    #[error("a command on provider config {key:?} failed: {source}")]
    Command { key: String, source: CommandError },
    /// One of the integration's connections could not be deleted.
    #[error(transparent)]
    Connection(Box<ConnectionsError>),
    /// The read model cannot be read or written.
    #[error(transparent)]
    ReadModel(#[from] ProjectionError),
}

impl From<ConnectionsError> for IntegrationsError {
    fn from(e: ConnectionsError) -> Self {
        Self::Connection(Box::new(e))
    }
}

impl IntegrationsError {
    /// A command's failure on the integration `key`.
    fn command(key: &str) -> impl FnOnce(CommandError) -> Self + '_ {
        move |source| Self::Command {
            key: key.to_owned(),
            source,
        }
    }
}

/// Every integration, without client secrets.
pub async fn list(state: &AppState) -> Result<Vec<IntegrationRecord>, IntegrationsError> {
    Ok(queries::list_integrations(&state.read_models).await?)
}

/// The integration `key`, with its client secret opened when `with_secret`.
pub async fn get(
    state: &AppState,
    key: &str,
    with_secret: bool,
) -> Result<(IntegrationRecord, Option<ClientSecret>), IntegrationsError> {
    let record = find(state, key).await?;
    let secret = if with_secret {
        let secret = state
            .commands
            .reveal_client_secret(&record.integration)
            .await
            .map_err(IntegrationsError::command(
                &record.integration.provider_config_key,
            ))?;
        Some(secret)
    } else {
        None
    };
    Ok((record, secret))
}

/// Creates the integration `key`; its id.
pub async fn create(
    state: &AppState,
    key: &str,
    config: IntegrationConfig,
) -> Result<i64, IntegrationsError> {
    if !valid_key(key) {
        return Err(IntegrationsError::InvalidKey(key.to_owned()));
    }
    known_template(state, &config)?;
    let loaded = state
        .commands
        .create_integration(key, config, Utc::now())
        .await
        .map_err(IntegrationsError::command(key))?;
    state.write_read_model::<IntegrationsModel>(&loaded).await?;
    Ok(projections::model::stable_id(loaded.stream_id.as_str()))
}

/// Replaces an integration's configuration.
pub async fn update(
    state: &AppState,
    key: &str,
    config: IntegrationConfig,
) -> Result<(), IntegrationsError> {
    known_template(state, &config)?;
    if queries::find_integration(&state.read_models, key)
        .await?
        .is_none()
    {
        return Err(IntegrationsError::UnknownProviderConfig(key.to_owned()));
    }
    let loaded = state
        .commands
        .update_integration(key, config, Utc::now())
        .await
        .map_err(IntegrationsError::command(key))?;
    Ok(state.write_read_model::<IntegrationsModel>(&loaded).await?)
}

/// Gives an integration a new name, nothing else changed (one that does not exist, or no
/// longer, is refused by the command itself: not found).
pub async fn rename(
    state: &AppState,
    key: &str,
    display_name: &str,
) -> Result<(), IntegrationsError> {
    let loaded = state
        .commands
        .rename_integration(key, display_name, Utc::now())
        .await
        .map_err(IntegrationsError::command(key))?;
    Ok(state.write_read_model::<IntegrationsModel>(&loaded).await?)
}

/// Deletes the integration, then each of its connections (shredding their secrets). The
/// integration goes first: its connections are hidden from then on, even if this stops halfway.
pub async fn delete(state: &AppState, key: &str) -> Result<(), IntegrationsError> {
    find(state, key).await?;
    let loaded = state
        .commands
        .delete_integration(key, Utc::now())
        .await
        .map_err(IntegrationsError::command(key))?;
    state.write_read_model::<IntegrationsModel>(&loaded).await?;
    let now = Utc::now();
    for connection in queries::list_connections_of(&state.read_models, key).await? {
        connections::shred(state, &ConnectionKey::new(key, connection), now).await?;
    }
    Ok(())
}

/// Whether `key` may name a new integration: Nango's characters for a unique key, and no
/// space at either end (request fields are trimmed, so such a key could hold no connection),
/// no comma (lists of keys are comma-separated) and no slash (it is a path segment).
pub fn valid_key(key: &str) -> bool {
    in_nango_key_charset(key) && !key.starts_with(' ') && !key.ends_with(' ')
}

/// Whether `key` is 1–255 of the characters Nango allows in a unique key (letters, digits,
/// space, `~ : . @ _ -`).
pub fn in_nango_key_charset(key: &str) -> bool {
    (1..=255).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "~:.@ _-".contains(c))
}

/// The integration `key` as the read model has it.
async fn find(state: &AppState, key: &str) -> Result<IntegrationRecord, IntegrationsError> {
    queries::find_integration(&state.read_models, key)
        .await?
        .ok_or_else(|| IntegrationsError::NotFound(key.to_owned()))
}

/// Refuses a provider the catalog has no template for (a connect flow could never use it), and
/// an OAuth provider's config without client credentials (API-key and Basic providers need
/// none).
fn known_template(state: &AppState, config: &IntegrationConfig) -> Result<(), IntegrationsError> {
    let template = state
        .catalog
        .get(&config.provider)
        .ok_or_else(|| IntegrationsError::UnknownTemplate(config.provider.clone()))?;
    if template.auth_mode.is_oauth() {
        if config.oauth_client_id.is_empty() {
            return Err(IntegrationsError::MissingClientId);
        }
        if config.client_secret.expose().is_empty() {
            return Err(IntegrationsError::MissingClientSecret);
        }
    }
    Ok(())
}
