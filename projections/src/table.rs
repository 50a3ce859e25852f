//! Snapshot tables and checkpoints on each backend. Table names come from [`StateModel`]
//! constants, never from input.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::store::{Backend, Position};
use rusqlite::OptionalExtension;
use serde_json::Value;

use crate::ProjectionError;
use crate::model::{Row, Snapshot, StateModel};

/// Columns written by an upsert, in order.
const COLUMNS: &str = "stream_id, version, id, provider_config_key, connection_id, provider, \
     created_at, updated_at, deleted_at, expires_at, refresh_state, state";

/// Upsert that only moves a row forward, and keeps a deleted row's keys and creation time.
fn upsert_sql(table: &str, placeholders: &str) -> String {
    format!(
        "INSERT INTO {table} AS t ({COLUMNS}) VALUES ({placeholders}) \
         ON CONFLICT (stream_id) DO UPDATE SET \
           version = excluded.version, id = excluded.id, \
           provider_config_key = coalesce(nullif(excluded.provider_config_key, ''), t.provider_config_key), \
           connection_id = coalesce(nullif(excluded.connection_id, ''), t.connection_id), \
           provider = coalesce(nullif(excluded.provider, ''), t.provider), \
           created_at = CASE WHEN excluded.deleted_at IS NULL THEN excluded.created_at ELSE t.created_at END, \
           updated_at = excluded.updated_at, deleted_at = excluded.deleted_at, \
           expires_at = excluded.expires_at, refresh_state = excluded.refresh_state, \
           state = excluded.state \
         WHERE t.version < excluded.version"
    )
}

const PG_PLACEHOLDERS: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12";
const SQLITE_PLACEHOLDERS: &str = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12";

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Writes one row outside a projection batch (read-your-writes).
pub(crate) async fn upsert_row<M: StateModel>(
    backend: &Backend,
    row: Row,
) -> Result<(), ProjectionError> {
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await?;
            pg_write(&client, M::NAME, std::slice::from_ref(&row)).await
        }
        Backend::Sqlite(store) => Ok(store
            .write(move |conn| sqlite_write(conn, M::NAME, &[row]).map_err(db))
            .await?),
    }
}

fn db(e: rusqlite::Error) -> domain::store::StoreError {
    domain::store::StoreError::Database(e.to_string())
}

// PostgreSQL ------------------------------------------------------------------------------------

pub(crate) async fn pg_load(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
    stream_ids: &[String],
) -> Result<HashMap<String, Snapshot>, ProjectionError> {
    let statement = client
        .prepare_cached(&format!(
            "SELECT stream_id, version, state FROM {table} WHERE stream_id = ANY($1)"
        ))
        .await?;
    let rows = client.query(&statement, &[&stream_ids]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let version: i32 = r.get(1);
            (
                r.get::<_, String>(0),
                Snapshot {
                    version: version.unsigned_abs(),
                    state: r.get(2),
                },
            )
        })
        .collect())
}

pub(crate) async fn pg_write(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
    rows: &[Row],
) -> Result<(), ProjectionError> {
    let statement = client
        .prepare_cached(&upsert_sql(table, PG_PLACEHOLDERS))
        .await?;
    for row in rows {
        let version = i32::try_from(row.version).unwrap_or(i32::MAX);
        client
            .execute(
                &statement,
                &[
                    &row.stream_id,
                    &version,
                    &row.id,
                    &row.provider_config_key,
                    &row.connection_id,
                    &row.provider,
                    &row.created_at,
                    &row.updated_at,
                    &row.deleted_at,
                    &row.expires_at,
                    &row.refresh_state,
                    &row.state,
                ],
            )
            .await?;
    }
    Ok(())
}

pub(crate) async fn pg_set_checkpoint(
    client: &impl deadpool_postgres::GenericClient,
    name: &str,
    position: Position,
) -> Result<(), ProjectionError> {
    let commit = i64::try_from(position.commit).unwrap_or(i64::MAX);
    client
        .execute(
            "UPDATE projection_checkpoints SET commit_position = $2, global_position = $3, \
             updated_at = now(), last_error = NULL WHERE name = $1",
            &[&name, &commit, &position.global],
        )
        .await?;
    Ok(())
}

pub(crate) fn checkpoint_from(commit: i64, global: i64) -> Position {
    Position {
        commit: commit.max(0).unsigned_abs(),
        global,
    }
}

// SQLite ----------------------------------------------------------------------------------------

pub(crate) fn sqlite_load(
    conn: &rusqlite::Connection,
    table: &str,
    stream_ids: &[String],
) -> Result<HashMap<String, Snapshot>, ProjectionError> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT version, state FROM {table} WHERE stream_id = ?1"
    ))?;
    let mut snapshots = HashMap::new();
    for stream_id in stream_ids {
        let found = statement
            .query_row([stream_id], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .optional()?;
        if let Some((version, state)) = found {
            let state: Value =
                serde_json::from_str(&state).map_err(|e| ProjectionError::CorruptRow {
                    table: "snapshot",
                    stream_id: stream_id.clone(),
                    reason: e.to_string(),
                })?;
            snapshots.insert(
                stream_id.clone(),
                Snapshot {
                    version: u32::try_from(version).unwrap_or(0),
                    state,
                },
            );
        }
    }
    Ok(snapshots)
}

pub(crate) fn sqlite_write(
    conn: &rusqlite::Connection,
    table: &str,
    rows: &[Row],
) -> Result<(), rusqlite::Error> {
    let mut statement = conn.prepare_cached(&upsert_sql(table, SQLITE_PLACEHOLDERS))?;
    for row in rows {
        statement.execute(rusqlite::params![
            row.stream_id,
            row.version,
            row.id,
            row.provider_config_key,
            row.connection_id,
            row.provider,
            micros(row.created_at),
            micros(row.updated_at),
            row.deleted_at.map(micros),
            row.expires_at.map(micros),
            row.refresh_state,
            row.state.to_string(),
        ])?;
    }
    Ok(())
}

pub(crate) fn sqlite_checkpoint(
    conn: &rusqlite::Connection,
    name: &str,
) -> Result<Position, rusqlite::Error> {
    conn.query_row(
        "SELECT commit_position, global_position FROM projection_checkpoints WHERE name = ?1",
        [name],
        |r| Ok(checkpoint_from(r.get(0)?, r.get(1)?)),
    )
}

pub(crate) fn sqlite_set_checkpoint(
    conn: &rusqlite::Connection,
    name: &str,
    position: Position,
) -> Result<(), rusqlite::Error> {
    conn.execute(
        "UPDATE projection_checkpoints SET commit_position = ?2, global_position = ?3, \
         updated_at = ?4, last_error = NULL WHERE name = ?1",
        rusqlite::params![
            name,
            i64::try_from(position.commit).unwrap_or(i64::MAX),
            position.global,
            micros(Utc::now())
        ],
    )?;
    Ok(())
}
