//! What the API reads from the read models, typed. Every query hides deleted rows; connections
//! of a deleted integration are hidden from lists as well.

use chrono::{DateTime, Utc};
use domain::connection::{ActiveConnection, Connection, ConnectionKey};
use domain::integration::{self, ActiveIntegration, Integration};
use domain::keys::StoredDataKey;
use domain::store::StreamId;
use serde::de::DeserializeOwned;

use crate::store::{Providers, ReadModels, StoredRow};
use crate::{ConnectionsModel, IntegrationsModel, ProjectionError, StateModel};

pub use crate::store::{
    ConnectionFilter, ConnectionSummary, Health, HealthCounts, RefreshActivity, RefreshBucket,
};

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
    connection_record(stream_id, &row)
}

/// The record of a connection row, unless the connection is deleted.
fn connection_record(
    stream_id: &StreamId,
    row: &StoredRow,
) -> Result<Option<ConnectionRecord>, ProjectionError> {
    match state(ConnectionsModel::NAME, stream_id.as_str(), row)? {
        Connection::Active(connection) => Ok(Some(ConnectionRecord {
            id: row.id,
            version: row.version,
            connection,
        })),
        _ => Ok(None),
    }
}

/// A live connection as a cache miss loads it.
#[derive(Debug)]
pub struct KeyedConnection {
    pub record: ConnectionRecord,
    /// The data key its credentials are sealed under, as the key store holds it (when the
    /// store has it).
    pub data_key: Option<StoredDataKey>,
    /// The length of the stored state's JSON text, which the record was parsed from: what it
    /// takes in memory goes with it.
    pub stored_bytes: usize,
}

/// [`find_connection_in`], with the data key its credentials are sealed under: one query for
/// both.
pub async fn find_connection_keyed(
    read_models: &ReadModels,
    stream_id: &StreamId,
) -> Result<Option<KeyedConnection>, ProjectionError> {
    let Some((row, data_key)) = read_models
        .store()
        .find_connection(stream_id.as_str())
        .await?
    else {
        return Ok(None);
    };
    Ok(
        connection_record(stream_id, &row)?.map(|record| KeyedConnection {
            record,
            data_key,
            stored_bytes: row.state.len(),
        }),
    )
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

/// The live connections `filter` picks, newest first: one page of them.
pub async fn list_connections(
    read_models: &ReadModels,
    filter: &ConnectionFilter,
) -> Result<Vec<ConnectionSummary>, ProjectionError> {
    read_models.store().list_connections(filter).await
}

/// How many live connections are in each health class (`ReadModelStore::health_counts`).
pub async fn health_counts(
    read_models: &ReadModels,
    soon: DateTime<Utc>,
    read_since: DateTime<Utc>,
) -> Result<HealthCounts, ProjectionError> {
    read_models.store().health_counts(soon, read_since).await
}

/// Refresh outcomes per integration and hour since `since`, and the instances seen.
pub async fn refresh_activity(
    read_models: &ReadModels,
    since: DateTime<Utc>,
) -> Result<RefreshActivity, ProjectionError> {
    read_models.store().refresh_activity(since).await
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

/// What a scheduler tick looks for (README, "Refresh policy").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueQuery {
    /// Connections in use (read at or after `read_since`) whose access token expires before
    /// this are refreshed ahead of expiry.
    pub expiring_before: DateTime<Utc>,
    pub read_since: DateTime<Utc>,
    /// Keep-alives: connections of these providers whose tokens were last issued before the
    /// time given with them (providers that document how long an unused refresh token lives)…
    pub keep_alive: Vec<(Vec<String>, DateTime<Utc>)>,
    /// …and of every other provider, before this.
    pub renewed_before: DateTime<Utc>,
}

/// What the due-for-refresh queries look at in one refreshable connection (its read-model row
/// and its last recorded read).
#[derive(Clone, Copy, Debug)]
pub struct DueFacts<'a> {
    pub provider: &'a str,
    pub expires_at: Option<DateTime<Utc>>,
    pub renewed_at: DateTime<Utc>,
    pub last_read_at: Option<DateTime<Utc>>,
}

impl DueQuery {
    /// Whether, and why, the query finds a refreshable connection with `facts` due: the
    /// in-memory statement of what the store's queries select (the simulated day runs the
    /// policy through it, and a test holds the two to agreement).
    pub fn reason(&self, facts: &DueFacts<'_>) -> Option<DueReason> {
        let in_use = facts.last_read_at.is_some_and(|at| at >= self.read_since);
        if in_use && facts.expires_at.is_some_and(|at| at < self.expiring_before) {
            return Some(DueReason::Expiring);
        }
        let renewed_before = self
            .keep_alive
            .iter()
            .find(|(providers, _)| providers.iter().any(|p| p == facts.provider))
            .map_or(self.renewed_before, |(_, before)| *before);
        (facts.renewed_at < renewed_before).then_some(DueReason::KeepAlive)
    }
}

/// Why a connection is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DueReason {
    /// In use, and its access token expires soon.
    Expiring,
    /// Its refresh token could age out unused.
    KeepAlive,
}

/// Live OAuth 2.0 connections with a refresh token and no blocking (permanent) failure, of live
/// integrations (a deleted integration's refresh could only fail), that `query` finds due: the
/// expiring ones in use first, soonest first, then the keep-alives, oldest first; at most
/// `limit`, each once.
pub async fn due_for_refresh(
    read_models: &ReadModels,
    query: &DueQuery,
    limit: usize,
) -> Result<Vec<(ConnectionKey, DueReason)>, ProjectionError> {
    let store = read_models.store();
    let mut due: Vec<(ConnectionKey, DueReason)> = store
        .due_expiring(query.expiring_before, query.read_since, limit)
        .await?
        .into_iter()
        .map(|key| (key, DueReason::Expiring))
        .collect();
    let mut seen: std::collections::HashSet<ConnectionKey> =
        due.iter().map(|(key, _)| key.clone()).collect();
    let documented: Vec<String> = query
        .keep_alive
        .iter()
        .flat_map(|(providers, _)| providers.iter().cloned())
        .collect();
    let groups = query
        .keep_alive
        .iter()
        .map(|(providers, before)| (Providers::Only(providers.clone()), *before))
        .chain([(Providers::Except(documented), query.renewed_before)]);
    for (providers, before) in groups {
        if due.len() >= limit {
            break;
        }
        for key in store
            .due_keep_alive(before, &providers, limit - due.len())
            .await?
        {
            if seen.insert(key.clone()) {
                due.push((key, DueReason::KeepAlive));
            }
        }
    }
    Ok(due)
}
