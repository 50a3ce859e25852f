//! What the API does with provider configs (integrations): create, replace, read, delete.
//! Deleting one deletes its connections.

use chrono::Utc;
use domain::commands::{IntegrationConfig, Loaded};
use domain::connection::ConnectionKey;
use domain::credentials::ClientSecret;
use domain::integration::{ActiveIntegration, Integration};
use projections::model::upsert_state;
use projections::queries::{self, IntegrationRecord};
use projections::{ConnectionsModel, IntegrationsModel};

use crate::http::ApiError;
use crate::http::error::{command_error, integration_command_error};
use crate::state::AppState;

pub async fn list(state: &AppState) -> Result<Vec<IntegrationRecord>, ApiError> {
    Ok(queries::list_integrations(&state.backend).await?)
}

pub async fn get(state: &AppState, key: &str) -> Result<IntegrationRecord, ApiError> {
    queries::find_integration(&state.backend, key)
        .await?
        .ok_or_else(|| ApiError::ProviderConfigNotFound(key.to_owned()))
}

pub async fn client_secret(
    state: &AppState,
    integration: &ActiveIntegration,
) -> Result<ClientSecret, ApiError> {
    state
        .commands
        .reveal_client_secret(integration)
        .await
        .map_err(|e| integration_command_error(e, &integration.provider_config_key))
}

pub async fn create(
    state: &AppState,
    key: &str,
    config: IntegrationConfig,
) -> Result<i64, ApiError> {
    let loaded = state
        .commands
        .create_integration(key, config, Utc::now())
        .await
        .map_err(|e| integration_command_error(e, key))?;
    publish(state, &loaded).await?;
    Ok(projections::model::stable_id(loaded.stream_id.as_str()))
}

/// Replaces an integration's configuration; an unknown key is `unknown_provider_config` (400).
pub async fn update(
    state: &AppState,
    key: &str,
    config: IntegrationConfig,
) -> Result<(), ApiError> {
    if queries::find_integration(&state.backend, key)
        .await?
        .is_none()
    {
        return Err(ApiError::UnknownProviderConfig(key.to_owned()));
    }
    let loaded = state
        .commands
        .update_integration(key, config, Utc::now())
        .await
        .map_err(|e| integration_command_error(e, key))?;
    publish(state, &loaded).await
}

/// Deletes the integration, then each of its connections (shredding their secrets). The
/// integration goes first: its connections are hidden from then on, even if this stops halfway.
pub async fn delete(state: &AppState, key: &str) -> Result<(), ApiError> {
    let loaded = state
        .commands
        .delete_integration(key, Utc::now())
        .await
        .map_err(|e| integration_command_error(e, key))?;
    publish(state, &loaded).await?;
    let now = Utc::now();
    for connection in queries::list_connections_of(&state.backend, key).await? {
        let connection = ConnectionKey::new(key, connection);
        let deleted = state
            .commands
            .delete_connection(&connection, now)
            .await
            .map_err(|e| command_error(e, &connection))?;
        upsert_state::<ConnectionsModel>(
            &state.backend,
            deleted.stream_id.as_str(),
            deleted.version,
            &deleted.state,
        )
        .await?;
        state.cache.invalidate(deleted.stream_id.as_str());
    }
    Ok(())
}

async fn publish(state: &AppState, loaded: &Loaded<Integration>) -> Result<(), ApiError> {
    upsert_state::<IntegrationsModel>(
        &state.backend,
        loaded.stream_id.as_str(),
        loaded.version,
        &loaded.state,
    )
    .await?;
    Ok(())
}
