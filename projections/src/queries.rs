//! What the API reads from the read models, typed. Every query hides deleted rows; connections
//! of a deleted integration are hidden from lists as well.

use chrono::{DateTime, Utc};
use domain::connection::{ActiveConnection, Connection, ConnectionKey};
use domain::integration::{self, ActiveIntegration, Integration};
use domain::store::StreamId;
use serde::de::DeserializeOwned;

use crate::store::{ReadModels, StoredRow};
use crate::{ConnectionsModel, IntegrationsModel, ProjectionError, StateModel};

pub use crate::store::ConnectionSummary;

/// A live connection as the read model has it.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    /// Nango's numeric id.
    pub id: i64,
    pub version: u32,
    pub connection: ActiveConnection,
}

/// A live integration as the read model has it.
#[derive(Clone, Debug)]
pub struct IntegrationRecord {
    pub id: i64,
    pub version: u32,
    pub integration: ActiveIntegration,
}

/// The state of a stored row.
fn state<S: DeserializeOwned>(
    table: &'static str,
    stream_id: &str,
    row: &StoredRow,
) -> Result<S, ProjectionError> {
    serde_json::from_str(&row.state).map_err(|e| ProjectionError::CorruptRow {
        table,
        stream_id: stream_id.to_owned(),
        reason: e.to_string(),
    })
}

/// The connection `key`, unless absent or deleted.
pub async fn find_connection(
    read_models: &ReadModels,
    key: &ConnectionKey,
) -> Result<Option<ConnectionRecord>, ProjectionError> {
    find_connection_in(read_models, &key.stream_id()).await
}

/// The connection of the stream `stream_id`, unless absent or deleted.
pub async fn find_connection_in(
    read_models: &ReadModels,
    stream_id: &StreamId,
) -> Result<Option<ConnectionRecord>, ProjectionError> {
    let table = ConnectionsModel::NAME;
    let Some(row) = read_models.store().find(table, stream_id.as_str()).await? else {
        return Ok(None);
    };
    match state(table, stream_id.as_str(), &row)? {
        Connection::Active(connection) => Ok(Some(ConnectionRecord {
            id: row.id,
            version: row.version,
            connection,
        })),
        _ => Ok(None),
    }
}

/// The integration `provider_config_key`, unless absent or deleted.
pub async fn find_integration(
    read_models: &ReadModels,
    provider_config_key: &str,
) -> Result<Option<IntegrationRecord>, ProjectionError> {
    let stream_id = integration::stream_id(provider_config_key);
    let table = IntegrationsModel::NAME;
    let Some(row) = read_models.store().find(table, stream_id.as_str()).await? else {
        return Ok(None);
    };
    integration_record(stream_id.as_str(), &row)
}

fn integration_record(
    stream_id: &str,
    row: &StoredRow,
) -> Result<Option<IntegrationRecord>, ProjectionError> {
    match state(IntegrationsModel::NAME, stream_id, row)? {
        Integration::Active(integration) => Ok(Some(IntegrationRecord {
            id: row.id,
            version: row.version,
            integration,
        })),
        _ => Ok(None),
    }
}

/// Live connections, oldest first; only those with `connection_id` when given.
pub async fn list_connections(
    read_models: &ReadModels,
    connection_id: Option<&str>,
) -> Result<Vec<ConnectionSummary>, ProjectionError> {
    read_models.store().list_connections(connection_id).await
}

/// Live integrations, by key.
pub async fn list_integrations(
    read_models: &ReadModels,
) -> Result<Vec<IntegrationRecord>, ProjectionError> {
    let mut integrations = Vec::new();
    for (stream_id, row) in read_models.store().list_integrations().await? {
        integrations.extend(integration_record(&stream_id, &row)?);
    }
    Ok(integrations)
}

/// The ids of the live connections of `provider_config_key` (whatever its integration's state).
pub async fn list_connections_of(
    read_models: &ReadModels,
    provider_config_key: &str,
) -> Result<Vec<String>, ProjectionError> {
    read_models
        .store()
        .connections_of(provider_config_key)
        .await
}

/// Live OAuth 2.0 connections with a refresh token and no blocking (permanent) failure whose
/// access token expires before `expiring_before`, or whose tokens were last refreshed (or
/// authorized) before `idle_before`: what a scheduler tick refreshes, soonest expiry first (no
/// expiry last), at most `limit`. Connections of a deleted integration are left out (their
/// refresh could only fail).
pub async fn due_for_refresh(
    read_models: &ReadModels,
    expiring_before: DateTime<Utc>,
    idle_before: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<ConnectionKey>, ProjectionError> {
    read_models
        .store()
        .due_for_refresh(expiring_before, idle_before, limit)
        .await
}
