//! The read models on PostgreSQL. States are `json`: written as the text serde made, read back as
//! that text and parsed once.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use domain::connection::ConnectionKey;
use domain::keys::StoredDataKey;
use domain::store::{EventStore, Position, PostgresStore};
use tokio_postgres::types::ToSql;

use self::rows::{copy_into, fold_into, write};
use super::{
    Analyzed, Batch, CHECKPOINTS, Checkpoint, ConnectionFilter, ConnectionSummary, HealthCounts,
    ListDialect, Planner, Providers, ReadModelStore, RebuildGuard, RefreshActivity, RefreshBucket,
    StoredRow, TAIL_BATCH, Tables, Tail, database, due_expiring_sql, due_keep_alive_sql, find_sql,
    health_sql, instances_sql, list_integrations_sql, list_sql, ownership_and_metadata, pg_error,
    refresh_activity_sql, swap_sql, version,
};
use crate::ProjectionError;
use crate::model::Row;

mod misses;
mod rows;
mod shadow;

/// How PostgreSQL writes a list query's filters: integrations and tags as JSON parameters, the
/// tags matched by containment (their GIN index). Every parameter is text (`::text` first, so
/// that PostgreSQL types it so).
const LIST: ListDialect = ListDialect {
    placeholder: |n| format!("${n}"),
    integrations: |p| {
        format!("c.provider_config_key IN (SELECT jsonb_array_elements_text({p}::text::jsonb))")
    },
    tags: |p| format!("c.tags @> {p}::text::jsonb"),
    // The trigram index (`connections_by_search`) takes escaped patterns.
    contains: |p, _| format!("c.search LIKE {p} ESCAPE '\\'"),
    ownership_and_metadata: "(c.state->'Active'->'ownership')::text, \
     (c.state->'Active'->'metadata')::text",
    integer: |p| format!("{p}::text::bigint"),
    timestamp: |p| format!("{p}::text::timestamptz"),
    moment: |moment| moment.to_rfc3339(),
};

/// Whether a row holds OAuth 2.0 credentials.
const OAUTH2: &str = "c.state->'Active'->>'credentials_type' = 'OAUTH2'";

/// Whether a row's token is renewed ahead of expiry: OAuth 2.0 (with a refresh token, which the
/// refresh state says) or a client-credentials grant. Keep-alives are for refresh tokens only.
const RENEWABLE: &str = "c.state->'Active'->>'credentials_type' IN ('OAUTH2', 'OAUTH2_CC')";

/// States are read as text: parsing the text once is cheaper than a JSON tree first.
const STATE: &str = "state::text";

#[derive(Clone)]
pub(super) struct PostgresReadModels {
    store: PostgresStore,
    /// The replica's misses, fetched together ([`misses`]).
    misses: misses::Misses,
}

impl std::fmt::Debug for PostgresReadModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresReadModels")
    }
}

impl PostgresReadModels {
    pub(super) fn new(store: PostgresStore) -> Self {
        Self {
            store,
            misses: misses::Misses::default(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ProjectionError> {
        self.store.pool().get().await.map_err(pg_error)
    }
}

async fn set_checkpoint(
    client: &impl GenericClient,
    name: &str,
    at: Position,
) -> Result<(), ProjectionError> {
    client
        .execute(
            "UPDATE projection_checkpoints SET commit_position = $2, global_position = $3, \
             updated_at = now(), last_error = NULL WHERE name = $1",
            &[&name, &at.commit_column(), &at.global],
        )
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// A session advisory lock, released with its connection: the guard takes the connection out of
/// the pool, so dropping it closes the session whatever happened.
struct AdvisoryLock {
    _session: deadpool_postgres::ClientWrapper,
}

impl RebuildGuard for AdvisoryLock {}

#[async_trait]
impl ReadModelStore for PostgresReadModels {
    async fn find(
        &self,
        table: &'static str,
        stream_id: &str,
    ) -> Result<Option<StoredRow>, ProjectionError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&find_sql(table, STATE, "$1"))
            .await
            .map_err(pg_error)?;
        Ok(client
            .query_opt(&statement, &[&stream_id])
            .await
            .map_err(pg_error)?
            .map(|r| StoredRow {
                id: r.get(0),
                version: version(r.get::<_, i32>(1).into()),
                state: r.get(2),
            }))
    }

    async fn find_connection(
        &self,
        stream_id: &str,
    ) -> Result<Option<(StoredRow, Option<StoredDataKey>)>, ProjectionError> {
        self.misses.find(&self.store, stream_id).await
    }

    async fn upsert(&self, table: &'static str, row: Row) -> Result<(), ProjectionError> {
        write(&self.client().await?, table, std::slice::from_ref(&row)).await
    }

    async fn list_connections(
        &self,
        filter: &ConnectionFilter,
    ) -> Result<Vec<ConnectionSummary>, ProjectionError> {
        let (sql, parameters) = list_sql(filter, &LIST);
        let parameters: Vec<&(dyn ToSql + Sync)> = parameters
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql).await.map_err(pg_error)?;
        let rows = client
            .query(&statement, &parameters)
            .await
            .map_err(pg_error)?;
        rows.iter()
            .map(|r| {
                let connection_id: String = r.get(2);
                let (ownership, metadata) =
                    ownership_and_metadata(&connection_id, r.get(7), r.get(8))?;
                Ok(ConnectionSummary {
                    id: r.get(0),
                    version: version(r.get::<_, i32>(1).into()),
                    connection_id,
                    provider_config_key: r.get(3),
                    provider: r.get(4),
                    created_at: r.get(5),
                    refresh_state: r.get(6),
                    ownership,
                    metadata,
                    expires_at: r.get(9),
                })
            })
            .collect()
    }

    async fn health_counts(
        &self,
        soon: DateTime<Utc>,
        read_since: DateTime<Utc>,
    ) -> Result<HealthCounts, ProjectionError> {
        let rows = self
            .client()
            .await?
            .query(&health_sql(["$1", "$2"]), &[&soon, &read_since])
            .await
            .map_err(pg_error)?;
        let mut counts = HealthCounts::default();
        for row in rows {
            counts.add(row.get(0), row.get(1));
        }
        Ok(counts)
    }

    async fn refresh_activity(
        &self,
        since: DateTime<Utc>,
    ) -> Result<RefreshActivity, ProjectionError> {
        let client = self.client().await?;
        // The first position recorded at or after `since`, by a binary search on the primary
        // key (the log has no index on its recording times).
        let bounds = client
            .query_one(
                "SELECT min(global_position), max(global_position) FROM events",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let (Some(mut low), Some(mut high)) = (
            bounds.get::<_, Option<i64>>(0),
            bounds.get::<_, Option<i64>>(1),
        ) else {
            return Ok(RefreshActivity::default());
        };
        high += 1;
        let at = client
            .prepare_cached(
                "SELECT recorded_at FROM events WHERE global_position >= $1 \
                 ORDER BY global_position LIMIT 1",
            )
            .await
            .map_err(pg_error)?;
        while low < high {
            let middle = low + (high - low) / 2;
            let recorded: Option<DateTime<Utc>> = client
                .query_opt(&at, &[&middle])
                .await
                .map_err(pg_error)?
                .map(|r| r.get(0));
            match recorded {
                Some(recorded) if recorded < since => low = middle + 1,
                _ => high = middle,
            }
        }
        let buckets = client
            .query(
                &refresh_activity_sql("date_trunc('hour', e.recorded_at)", "$1"),
                &[&low],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| RefreshBucket {
                provider_config_key: r.get(0),
                hour: r.get(1),
                refreshed: r.get(2),
                failed: r.get(3),
            })
            .collect();
        let instances = client
            .query(&instances_sql("e.metadata->>'instance'", "$1"), &[&low])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(RefreshActivity { buckets, instances })
    }

    async fn list_integrations(&self) -> Result<Vec<(String, StoredRow)>, ProjectionError> {
        Ok(self
            .client()
            .await?
            .query(&list_integrations_sql(STATE), &[])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| {
                (
                    r.get(3),
                    StoredRow {
                        id: r.get(0),
                        version: version(r.get::<_, i32>(1).into()),
                        state: r.get(2),
                    },
                )
            })
            .collect())
    }

    async fn connections_of(
        &self,
        provider_config_key: &str,
    ) -> Result<Vec<String>, ProjectionError> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT connection_id FROM connections \
                 WHERE provider_config_key = $1 AND deleted_at IS NULL ORDER BY connection_id",
                &[&provider_config_key],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn due_expiring(
        &self,
        expiring_before: DateTime<Utc>,
        read_since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        // Driven by the reads (the active few), not by every connection's expiry.
        let statement = client
            .prepare_cached(&due_expiring_sql(RENEWABLE, ["$1", "$2", "$3"]))
            .await
            .map_err(pg_error)?;
        keys(
            client
                .query(&statement, &[&expiring_before, &read_since, &limit])
                .await,
        )
    }

    async fn due_keep_alive(
        &self,
        renewed_before: DateTime<Utc>,
        providers: &Providers,
        limit: usize,
    ) -> Result<Vec<ConnectionKey>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (names, pick) = match providers {
            Providers::Only(names) => (names, "c.provider = ANY($2)"),
            Providers::Except(names) => (names, "NOT (c.provider = ANY($2))"),
        };
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&due_keep_alive_sql(OAUTH2, pick, ["$1", "$3"]))
            .await
            .map_err(pg_error)?;
        keys(
            client
                .query(&statement, &[&renewed_before, names, &limit])
                .await,
        )
    }

    async fn note_reads(
        &self,
        reads: Vec<(String, DateTime<Utc>)>,
        step: Duration,
    ) -> Result<(), ProjectionError> {
        if reads.is_empty() {
            return Ok(());
        }
        let (streams, times): (Vec<String>, Vec<DateTime<Utc>>) = reads.into_iter().unzip();
        let step = i64::try_from(step.as_micros()).unwrap_or(i64::MAX);
        self.client()
            .await?
            .execute(
                "INSERT INTO connection_reads AS r (stream_id, last_read_at) \
                 SELECT * FROM unnest($1::text[], $2::timestamptz[]) \
                 ON CONFLICT (stream_id) DO UPDATE SET last_read_at = excluded.last_read_at \
                 WHERE r.last_read_at < excluded.last_read_at - $3::bigint * interval '1 microsecond'",
                &[&streams, &times, &step],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn forget_reads(&self, before: DateTime<Utc>) -> Result<u64, ProjectionError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM connection_reads WHERE last_read_at < $1",
                &[&before],
            )
            .await
            .map_err(pg_error)
    }

    async fn count_reads(&self, since: DateTime<Utc>) -> Result<u64, ProjectionError> {
        let count: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM connection_reads WHERE last_read_at >= $1",
                &[&since],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn checkpoint(&self, name: &'static str) -> Result<Position, ProjectionError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT commit_position, global_position FROM projection_checkpoints \
                 WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(pg_error)?;
        Ok(Position::from_columns(row.get(0), row.get(1)))
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ProjectionError> {
        Ok(self
            .client()
            .await?
            .query(CHECKPOINTS, &[])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| Checkpoint {
                name: r.get(0),
                position: Position::from_columns(r.get(1), r.get(2)),
                updated_at: r.get(3),
                last_error: r.get(4),
            })
            .collect())
    }

    async fn record_error(&self, name: &'static str, message: String) {
        if let Ok(client) = self.client().await {
            let _ = client
                .execute(
                    "UPDATE projection_checkpoints SET last_error = $2 WHERE name = $1",
                    &[&name, &message],
                )
                .await;
        }
    }

    async fn apply(
        &self,
        name: &'static str,
        from: Position,
        batch: Batch,
    ) -> Result<bool, ProjectionError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let Some(row) = tx
            .query_opt(
                "SELECT commit_position, global_position FROM projection_checkpoints \
                 WHERE name = $1 FOR UPDATE SKIP LOCKED",
                &[&name],
            )
            .await
            .map_err(pg_error)?
        else {
            return Ok(false);
        };
        if Position::from_columns(row.get(0), row.get(1)) != from {
            return Ok(false);
        }
        let to = batch.to;
        fold_into(&tx, name, batch).await?;
        set_checkpoint(&tx, name, to).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }

    async fn lock_rebuild(
        &self,
        name: &'static str,
    ) -> Result<Box<dyn RebuildGuard>, ProjectionError> {
        let client = self.client().await?;
        let key = format!("grantline.rebuild.{name}");
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await
            .map_err(pg_error)?
            .get(0);
        if !locked {
            return Err(database(format!("a rebuild of {name} is already running")));
        }
        Ok(Box::new(AdvisoryLock {
            _session: deadpool_postgres::Object::take(client),
        }))
    }

    async fn clear(&self, tables: Tables) -> Result<(), ProjectionError> {
        self.client()
            .await?
            .batch_execute(&shadow::clear_sql(tables))
            .await
            .map_err(pg_error)
    }

    async fn index(&self, tables: Tables) -> Result<(), ProjectionError> {
        let statements = shadow::index_statements(&self.client().await?, tables).await?;
        shadow::build(self.store.pool(), statements).await
    }

    async fn write(&self, shadow: &'static str, batch: Batch) -> Result<(), ProjectionError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if batch.fresh {
            copy_into(&tx, shadow, &(batch.fold)(HashMap::new())?).await?;
        } else {
            fold_into(&tx, shadow, batch).await?;
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn events_through(&self, head: i64) -> Result<i64, ProjectionError> {
        Ok(self
            .client()
            .await?
            .query_one(
                "SELECT count(*) FROM events WHERE global_position <= $1",
                &[&head],
            )
            .await
            .map_err(pg_error)?
            .get(0))
    }

    async fn analyze(&self, what: Analyzed) -> Result<(), ProjectionError> {
        let client = self.client().await?;
        // One statement per query: VACUUM refuses to run in the implicit transaction of several.
        // VACUUM also merges the GIN indexes' pending lists (tags, search), which every search
        // reads through until then; the log only needs its statistics.
        if what != Analyzed::Log {
            for statement in [
                "VACUUM (ANALYZE) connections",
                "VACUUM (ANALYZE) integrations",
            ] {
                client.batch_execute(statement).await.map_err(pg_error)?;
            }
        }
        if what != Analyzed::ReadModels {
            client
                .batch_execute("ANALYZE events")
                .await
                .map_err(pg_error)?;
        }
        Ok(())
    }

    async fn swap(
        &self,
        tables: Tables,
        from: Position,
        planner: Planner,
    ) -> Result<u64, ProjectionError> {
        let Tables { live: name, shadow } = tables;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Waits for the live runner's batch in flight, and keeps the next one out.
        tx.query_one(
            "SELECT global_position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(pg_error)?;
        let mut tail = Tail::after(from);
        while let Some(batch) =
            tail.plan(&planner, &self.store.read_all(tail.at, TAIL_BATCH).await?)?
        {
            fold_into(&tx, shadow, batch).await?;
        }
        tx.batch_execute(&swap_sql(tables))
            .await
            .map_err(pg_error)?;
        tx.batch_execute(&shadow::after_swap_sql(tables))
            .await
            .map_err(pg_error)?;
        set_checkpoint(&tx, name, tail.at).await?;
        tx.commit().await.map_err(pg_error)?;
        client
            .batch_execute(&format!("TRUNCATE {shadow}"))
            .await
            .map_err(pg_error)?;
        Ok(tail.read)
    }
}

/// The connection keys of a due-for-refresh query's rows.
fn keys(
    rows: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
) -> Result<Vec<ConnectionKey>, ProjectionError> {
    Ok(rows
        .map_err(pg_error)?
        .iter()
        .map(|r| ConnectionKey::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}
