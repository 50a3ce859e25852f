//! Writing read-model rows on PostgreSQL: one row as plain values, a batch as one array per
//! column, a rebuild's rows of new streams with `COPY`; and loading the snapshots a batch folds
//! from.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::value::RawValue;
use tokio_postgres::types::{Json, ToSql};

use super::super::{Batch, Snapshot, pg_error, upsert_sql, version};
use super::STATE;
use crate::ProjectionError;
use crate::model::Row;

/// One row.
const ROW: &str =
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";

/// A batch's rows as one array per column: one statement, one round trip, however many rows.
const ROWS: &str = "SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::text[], \
     $5::text[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], \
     $10::timestamptz[], $11::text[], $12::json[], $13::timestamptz[], $14::text[], $15::text[], \
     $16::text[], $17::uuid[], $18::jsonb[])";

pub(super) async fn load(
    client: &impl GenericClient,
    table: &str,
    stream_ids: &[String],
) -> Result<HashMap<String, Snapshot>, ProjectionError> {
    if stream_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let statement = client
        .prepare_cached(&format!(
            "SELECT stream_id, version, {STATE} FROM {table} WHERE stream_id = ANY($1)"
        ))
        .await
        .map_err(pg_error)?;
    let rows = client
        .query(&statement, &[&stream_ids])
        .await
        .map_err(pg_error)?;
    Ok(rows
        .iter()
        .map(|r| {
            let stored: i32 = r.get(1);
            (
                r.get::<_, String>(0),
                Snapshot {
                    version: version(stored.into()),
                    state: r.get(2),
                },
            )
        })
        .collect())
}

pub(super) async fn write(
    client: &impl GenericClient,
    table: &str,
    rows: &[Row],
) -> Result<(), ProjectionError> {
    let [row] = rows else {
        return write_many(client, table, rows).await;
    };
    // One row (read-your-writes after a command): plain values plan and run faster than
    // arrays.
    let statement = client
        .prepare_cached(&upsert_sql(table, ROW, true))
        .await
        .map_err(pg_error)?;
    client
        .execute(&statement, &Params::of(row).values())
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// A row's values as statement parameters: `COLUMNS`, then tags.
struct Params<'a> {
    row: &'a Row,
    version: i32,
    state: Json<&'a RawValue>,
    tags: Option<Json<&'a BTreeMap<String, String>>>,
}

impl<'a> Params<'a> {
    fn of(row: &'a Row) -> Self {
        Self {
            row,
            version: i32::try_from(row.version).unwrap_or(i32::MAX),
            state: Json(&*row.state),
            tags: tags_json(&row.tags),
        }
    }

    fn values(&self) -> [&(dyn ToSql + Sync); 18] {
        let row = self.row;
        [
            &row.stream_id,
            &self.version,
            &row.id,
            &row.provider_config_key,
            &row.connection_id,
            &row.provider,
            &row.created_at,
            &row.updated_at,
            &row.deleted_at,
            &row.expires_at,
            &row.refresh_state,
            &self.state,
            &row.renewed_at,
            &row.end_user_id,
            &row.end_user_org_id,
            &row.search,
            &row.data_key_id,
            &self.tags,
        ]
    }
}

/// Writes a batch's rows in one statement.
async fn write_many(
    client: &impl GenericClient,
    table: &str,
    rows: &[Row],
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    let statement = client
        .prepare_cached(&upsert_sql(table, ROWS, true))
        .await
        .map_err(pg_error)?;
    let stream_ids: Vec<&str> = rows.iter().map(|r| r.stream_id.as_str()).collect();
    let versions: Vec<i32> = rows
        .iter()
        .map(|r| i32::try_from(r.version).unwrap_or(i32::MAX))
        .collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let keys: Vec<&str> = rows
        .iter()
        .map(|r| r.provider_config_key.as_str())
        .collect();
    let connection_ids: Vec<&str> = rows.iter().map(|r| r.connection_id.as_str()).collect();
    let providers: Vec<&str> = rows.iter().map(|r| r.provider.as_str()).collect();
    let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
    let updated: Vec<DateTime<Utc>> = rows.iter().map(|r| r.updated_at).collect();
    let deleted: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.deleted_at).collect();
    let expires: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.expires_at).collect();
    let refresh_states: Vec<&str> = rows.iter().map(|r| r.refresh_state).collect();
    let states: Vec<Json<&RawValue>> = rows.iter().map(|r| Json(&*r.state)).collect();
    let renewed: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.renewed_at).collect();
    let end_users: Vec<Option<&str>> = rows.iter().map(|r| r.end_user_id.as_deref()).collect();
    let orgs: Vec<Option<&str>> = rows.iter().map(|r| r.end_user_org_id.as_deref()).collect();
    let searches: Vec<Option<&str>> = rows.iter().map(|r| r.search.as_deref()).collect();
    let data_keys: Vec<Option<uuid::Uuid>> = rows.iter().map(|r| r.data_key_id).collect();
    let tags: Vec<Option<Json<&BTreeMap<String, String>>>> =
        rows.iter().map(|r| tags_json(&r.tags)).collect();
    client
        .execute(
            &statement,
            &[
                &stream_ids,
                &versions,
                &ids,
                &keys,
                &connection_ids,
                &providers,
                &created,
                &updated,
                &deleted,
                &expires,
                &refresh_states,
                &states,
                &renewed,
                &end_users,
                &orgs,
                &searches,
                &data_keys,
                &tags,
            ],
        )
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Loads the batch's snapshots, folds it and writes the rows to `table`.
pub(super) async fn fold_into(
    client: &impl GenericClient,
    table: &str,
    batch: Batch,
) -> Result<(), ProjectionError> {
    let snapshots = load(client, table, &batch.stream_ids).await?;
    write(client, table, &(batch.fold)(snapshots)?).await
}

/// Inserts rows of streams `table` has no row of, with `COPY … BINARY`: no upsert to plan, no
/// arrays to bind and unnest.
pub(super) async fn copy_into(
    client: &tokio_postgres::Transaction<'_>,
    table: &str,
    rows: &[Row],
) -> Result<(), ProjectionError> {
    use tokio_postgres::types::Type;
    if rows.is_empty() {
        return Ok(());
    }
    let sink = client
        .copy_in(&format!(
            "COPY {table} ({}, tags) FROM STDIN BINARY",
            super::super::COLUMNS
        ))
        .await
        .map_err(pg_error)?;
    let (text, time) = (Type::TEXT, Type::TIMESTAMPTZ);
    let types = [
        text.clone(),
        Type::INT4,
        Type::INT8,
        text.clone(),
        text.clone(),
        text.clone(),
        time.clone(),
        time.clone(),
        time.clone(),
        time.clone(),
        text.clone(),
        Type::JSON,
        time,
        text.clone(),
        text.clone(),
        text,
        Type::UUID,
        Type::JSONB,
    ];
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        writer
            .as_mut()
            .write(&Params::of(row).values())
            .await
            .map_err(pg_error)?;
    }
    writer.finish().await.map_err(pg_error)?;
    Ok(())
}

/// A row's tags as stored: `NULL` when there are none.
fn tags_json(tags: &BTreeMap<String, String>) -> Option<Json<&BTreeMap<String, String>>> {
    (!tags.is_empty()).then_some(Json(tags))
}
