//! What the API reads from the read models. Every query hides deleted rows; connections of a
//! deleted integration are hidden from lists as well.

use chrono::{DateTime, Utc};
use domain::connection::{ActiveConnection, Connection, ConnectionKey};
use domain::integration::{self, ActiveIntegration, Integration};
use domain::store::Backend;
use serde_json::Value;

use crate::ProjectionError;
use crate::table::from_micros;

/// A live connection as the read model has it.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    /// Nango's numeric id.
    pub id: i64,
    pub version: u32,
    pub connection: ActiveConnection,
}

/// A line of the connection list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionSummary {
    pub id: i64,
    pub connection_id: String,
    pub provider_config_key: String,
    pub provider: String,
    pub created_at: DateTime<Utc>,
}

/// A live integration as the read model has it.
#[derive(Clone, Debug)]
pub struct IntegrationRecord {
    pub id: i64,
    pub version: u32,
    pub integration: ActiveIntegration,
}

fn corrupt(table: &'static str, stream_id: &str, e: impl ToString) -> ProjectionError {
    ProjectionError::CorruptRow {
        table,
        stream_id: stream_id.to_owned(),
        reason: e.to_string(),
    }
}

/// The connection `key`, unless absent or deleted.
pub async fn find_connection(
    backend: &Backend,
    key: &ConnectionKey,
) -> Result<Option<ConnectionRecord>, ProjectionError> {
    let stream_id = key.stream_id().to_string();
    let Some((id, version, state)) = find_row(backend, "connections", &stream_id).await? else {
        return Ok(None);
    };
    match serde_json::from_value::<Connection>(state) {
        Ok(Connection::Active(connection)) => Ok(Some(ConnectionRecord {
            id,
            version,
            connection,
        })),
        Ok(_) => Ok(None),
        Err(e) => Err(corrupt("connections", &stream_id, e)),
    }
}

/// The integration `provider_config_key`, unless absent or deleted.
pub async fn find_integration(
    backend: &Backend,
    provider_config_key: &str,
) -> Result<Option<IntegrationRecord>, ProjectionError> {
    let stream_id = integration::stream_id(provider_config_key).to_string();
    let Some((id, version, state)) = find_row(backend, "integrations", &stream_id).await? else {
        return Ok(None);
    };
    match serde_json::from_value::<Integration>(state) {
        Ok(Integration::Active(integration)) => Ok(Some(IntegrationRecord {
            id,
            version,
            integration,
        })),
        Ok(_) => Ok(None),
        Err(e) => Err(corrupt("integrations", &stream_id, e)),
    }
}

/// `(id, version, state)` of a live row.
pub(crate) async fn find_row(
    backend: &Backend,
    table: &'static str,
    stream_id: &str,
) -> Result<Option<(i64, u32, Value)>, ProjectionError> {
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT id, version, state FROM {table} \
                     WHERE stream_id = $1 AND deleted_at IS NULL"
                ))
                .await?;
            Ok(client
                .query_opt(&statement, &[&stream_id])
                .await?
                .map(|r| (r.get(0), r.get::<_, i32>(1).unsigned_abs(), r.get(2))))
        }
        Backend::Sqlite(store) => {
            let stream_id = stream_id.to_owned();
            let found = store
                .read(move |conn| {
                    conn.prepare_cached(&format!(
                        "SELECT id, version, state FROM {table} \
                         WHERE stream_id = ?1 AND deleted_at IS NULL"
                    ))
                    .and_then(|mut s| {
                        rusqlite::OptionalExtension::optional(s.query_row([&stream_id], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                            ))
                        }))
                    })
                    .map_err(|e| domain::store::StoreError::Database(e.to_string()))
                })
                .await?;
            match found {
                None => Ok(None),
                Some((id, version, state)) => Ok(Some((
                    id,
                    u32::try_from(version).unwrap_or(0),
                    serde_json::from_str(&state).map_err(|e| corrupt(table, "?", e))?,
                ))),
            }
        }
    }
}

const LIST_CONNECTIONS: &str = "SELECT c.id, c.connection_id, c.provider_config_key, c.provider, \
     c.created_at FROM connections c \
     WHERE c.deleted_at IS NULL AND EXISTS (SELECT 1 FROM integrations i \
       WHERE i.provider_config_key = c.provider_config_key AND i.deleted_at IS NULL)";

/// Live connections, oldest first; only those with `connection_id` when given.
pub async fn list_connections(
    backend: &Backend,
    connection_id: Option<&str>,
) -> Result<Vec<ConnectionSummary>, ProjectionError> {
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await?;
            let rows = match connection_id {
                Some(id) => {
                    client
                        .query(
                            &format!(
                                "{LIST_CONNECTIONS} AND c.connection_id = $1 \
                                 ORDER BY c.created_at, c.id"
                            ),
                            &[&id],
                        )
                        .await?
                }
                None => {
                    client
                        .query(
                            &format!("{LIST_CONNECTIONS} ORDER BY c.created_at, c.id"),
                            &[],
                        )
                        .await?
                }
            };
            Ok(rows
                .iter()
                .map(|r| ConnectionSummary {
                    id: r.get(0),
                    connection_id: r.get(1),
                    provider_config_key: r.get(2),
                    provider: r.get(3),
                    created_at: r.get(4),
                })
                .collect())
        }
        Backend::Sqlite(store) => {
            let filter = connection_id.map(str::to_owned);
            Ok(store
                .read(move |conn| {
                    let sql = match filter {
                        Some(_) => format!(
                            "{LIST_CONNECTIONS} AND c.connection_id = ?1 ORDER BY c.created_at, c.id"
                        ),
                        None => format!("{LIST_CONNECTIONS} ORDER BY c.created_at, c.id"),
                    };
                    let mut statement = conn
                        .prepare_cached(&sql)
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    let map = |r: &rusqlite::Row<'_>| {
                        Ok(ConnectionSummary {
                            id: r.get(0)?,
                            connection_id: r.get(1)?,
                            provider_config_key: r.get(2)?,
                            provider: r.get(3)?,
                            created_at: from_micros(r.get(4)?),
                        })
                    };
                    let rows = match &filter {
                        Some(id) => statement.query_map([id], map),
                        None => statement.query_map([], map),
                    }
                    .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    rows.collect::<Result<Vec<_>, _>>()
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))
                })
                .await?)
        }
    }
}

/// Live integrations, by key.
pub async fn list_integrations(
    backend: &Backend,
) -> Result<Vec<IntegrationRecord>, ProjectionError> {
    let sql = "SELECT id, version, state, stream_id FROM integrations \
               WHERE deleted_at IS NULL ORDER BY provider_config_key";
    let rows: Vec<(i64, u32, Value, String)> = match backend {
        Backend::Postgres(store) => store
            .pool()
            .get()
            .await?
            .query(sql, &[])
            .await?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, i32>(1).unsigned_abs(),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect(),
        Backend::Sqlite(store) => {
            let raw = store
                .read(move |conn| {
                    let mut statement = conn
                        .prepare_cached(sql)
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    let rows = statement
                        .query_map([], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, String>(3)?,
                            ))
                        })
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    rows.collect::<Result<Vec<_>, _>>()
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))
                })
                .await?;
            raw.into_iter()
                .map(|(id, version, state, stream_id)| {
                    let state = serde_json::from_str(&state)
                        .map_err(|e| corrupt("integrations", &stream_id, e))?;
                    Ok((id, u32::try_from(version).unwrap_or(0), state, stream_id))
                })
                .collect::<Result<_, ProjectionError>>()?
        }
    };
    let mut integrations = Vec::with_capacity(rows.len());
    for (id, version, state, stream_id) in rows {
        if let Integration::Active(integration) = serde_json::from_value::<Integration>(state)
            .map_err(|e| corrupt("integrations", &stream_id, e))?
        {
            integrations.push(IntegrationRecord {
                id,
                version,
                integration,
            });
        }
    }
    Ok(integrations)
}

/// The ids of the live connections of `provider_config_key` (whatever its integration's state).
pub async fn list_connections_of(
    backend: &Backend,
    provider_config_key: &str,
) -> Result<Vec<String>, ProjectionError> {
    match backend {
        Backend::Postgres(store) => Ok(store
            .pool()
            .get()
            .await?
            .query(
                "SELECT connection_id FROM connections \
                 WHERE provider_config_key = $1 AND deleted_at IS NULL ORDER BY connection_id",
                &[&provider_config_key],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()),
        Backend::Sqlite(store) => {
            let key = provider_config_key.to_owned();
            Ok(store
                .read(move |conn| {
                    let mut statement = conn
                        .prepare(
                            "SELECT connection_id FROM connections \
                             WHERE provider_config_key = ?1 AND deleted_at IS NULL \
                             ORDER BY connection_id",
                        )
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    let rows = statement
                        .query_map([&key], |r| r.get(0))
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    rows.collect::<Result<Vec<String>, _>>()
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))
                })
                .await?)
        }
    }
}

/// Live OAuth 2.0 connections with a refresh token and no blocking (permanent) failure whose
/// access token expires before `expiring_before`, or whose tokens were last refreshed (or
/// authorized) before `idle_before`: what a scheduler tick refreshes, as
/// keys, soonest expiry first (no expiry last), at most `limit`.
/// Connections of a deleted integration are left out (their refresh could only fail).
pub async fn due_for_refresh(
    backend: &Backend,
    expiring_before: DateTime<Utc>,
    idle_before: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<ConnectionKey>, ProjectionError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await?;
            let statement = client
                .prepare_cached(
                    "SELECT c.provider_config_key, c.connection_id FROM connections c \
                     WHERE c.deleted_at IS NULL \
                       AND c.refresh_state NOT IN ('failed', 'no_refresh_token') \
                       AND c.state->'Active'->>'credentials_type' = 'OAUTH2' \
                       AND (c.expires_at < $1 \
                            OR COALESCE(c.state->'Active'->>'last_refreshed_at', \
                                        c.state->'Active'->>'authorized_at')::timestamptz < $2) \
                       AND EXISTS (SELECT 1 FROM integrations i \
                         WHERE i.provider_config_key = c.provider_config_key \
                           AND i.deleted_at IS NULL) \
                     ORDER BY c.expires_at NULLS LAST, c.stream_id LIMIT $3",
                )
                .await?;
            Ok(client
                .query(&statement, &[&expiring_before, &idle_before, &limit])
                .await?
                .iter()
                .map(|r| ConnectionKey::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect())
        }
        Backend::Sqlite(store) => {
            let expiring_before = crate::table::micros(expiring_before);
            // The state's timestamps are RFC 3339 text; julianday() reads them with any number
            // of fractional digits and a `Z` or offset suffix.
            let idle_before = idle_before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            Ok(store
                .read(move |conn| {
                    let mut statement = conn
                        .prepare_cached(
                            "SELECT c.provider_config_key, c.connection_id FROM connections c \
                             WHERE c.deleted_at IS NULL \
                               AND c.refresh_state NOT IN ('failed', 'no_refresh_token') \
                               AND json_extract(c.state, '$.Active.credentials_type') = 'OAUTH2' \
                               AND (c.expires_at < ?1 \
                                    OR julianday(COALESCE( \
                                         json_extract(c.state, '$.Active.last_refreshed_at'), \
                                         json_extract(c.state, '$.Active.authorized_at'))) \
                                       < julianday(?2)) \
                               AND EXISTS (SELECT 1 FROM integrations i \
                                 WHERE i.provider_config_key = c.provider_config_key \
                                   AND i.deleted_at IS NULL) \
                             ORDER BY c.expires_at IS NULL, c.expires_at, c.stream_id LIMIT ?3",
                        )
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    let rows = statement
                        .query_map(
                            rusqlite::params![expiring_before, idle_before, limit],
                            |r| {
                                Ok(ConnectionKey::new(
                                    r.get::<_, String>(0)?,
                                    r.get::<_, String>(1)?,
                                ))
                            },
                        )
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))?;
                    rows.collect::<Result<Vec<ConnectionKey>, _>>()
                        .map_err(|e| domain::store::StoreError::Database(e.to_string()))
                })
                .await?)
        }
    }
}
