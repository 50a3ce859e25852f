//! Cache misses fetched together. Each miss of the connection replica is one row found by its
//! stream id, and a query of its own costs a round trip, a pool connection and PostgreSQL's work
//! per statement (pgbench on 200,000 connections: 40,000 single-row lookups a second against
//! 97,000 rows a second in lookups of 16). So concurrent misses queue here, and at most
//! [`IN_FLIGHT`] queries take up to [`BATCH`] of them each: a lone miss goes at once, and under
//! load the queue that builds while the queries run becomes the next batch. (Uniform reads over
//! 1,000,000 connections, server and PostgreSQL on two cores: 17,700 against 15,100 reads a
//! second, with 39 against 54 µs of server CPU each; the rows' own work dominates there.)
//!
//! The queries run in tasks of their own, so a reader that goes away (its client hung up) never
//! strands the others waiting on its batch, and a query that fails or panics answers every miss
//! it took with an error. A miss still reads the database after it was asked for, as a query of
//! its own would, so the replica's invalidation epochs hold as before.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use domain::keys::StoredDataKey;
use domain::store::{PostgresStore, StoreError};
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::super::{StoredRow, database, pg_error, version};
use crate::ProjectionError;

/// Most queries at once; the rest of the pool stays for everything else. Two: while one runs
/// the next batch gathers, and one slow query (its pages read from disk) does not hold up every
/// miss. More queries make smaller batches, and a query's fixed cost is most of its cost: with
/// uniform reads over 200,000 connections (server and PostgreSQL on two cores, 3 alternated
/// runs) four gave 15,900–18,700 reads a second with p99 4.6–5.8 ms, two 20,100–22,000 with p99
/// 3.6–4.4 ms, and one 21,600–24,200 with p99 4.2–4.4 ms.
const IN_FLIGHT: usize = 2;
/// Most rows a query asks for.
const BATCH: usize = 64;

/// A live connection row with its data key, as a miss wants it.
pub(super) type Found = Option<(StoredRow, Option<StoredDataKey>)>;

type Reply = oneshot::Sender<Result<Found, ProjectionError>>;

/// The queue of misses and the queries taking from it. Cheap to clone (shared).
#[derive(Clone, Default)]
pub(super) struct Misses {
    shared: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(String, Reply)>,
    /// Query tasks running; each takes from `waiting` until it is empty.
    running: usize,
}

impl Misses {
    /// The live row of `stream_id` and its data key, in a query shared with other misses.
    pub(super) async fn find(
        &self,
        store: &PostgresStore,
        stream_id: &str,
    ) -> Result<Found, ProjectionError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue();
            queue.waiting.push((stream_id.to_owned(), reply));
            let start = queue.running < IN_FLIGHT;
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.clone().drain(store.clone()));
        }
        // A query task ends only after answering every miss it took, so the sender is only
        // dropped unanswered if the runtime is shutting down.
        answer
            .await
            .unwrap_or_else(|_| Err(database("the lookup was cancelled")))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes batches until none is waiting. The check for an empty queue and leaving `running`
    /// happen under one lock with `find`'s push and check, so no miss is left without a task.
    async fn drain(self, store: PostgresStore) {
        loop {
            let batch: Vec<(String, Reply)> = {
                let mut queue = self.queue();
                if queue.waiting.is_empty() {
                    queue.running -= 1;
                    return;
                }
                let take = queue.waiting.len().min(BATCH);
                queue.waiting.drain(..take).collect()
            };
            // A panic must not leave `running` counting a task that is gone.
            let found = AssertUnwindSafe(fetch_many(&store, &batch_ids(&batch)))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(database("the lookup failed")));
            answer(batch, found);
        }
    }
}

/// The distinct stream ids a batch asks for.
fn batch_ids(batch: &[(String, Reply)]) -> Vec<&str> {
    let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Hands each miss its row (or nothing), or each the query's error.
fn answer(
    batch: Vec<(String, Reply)>,
    found: Result<HashMap<String, (StoredRow, Option<StoredDataKey>)>, ProjectionError>,
) {
    match found {
        Ok(rows) => {
            for (stream_id, reply) in batch {
                let _ = reply.send(Ok(rows.get(&stream_id).cloned()));
            }
        }
        Err(error) => {
            let message = match error {
                ProjectionError::Store(StoreError::Database(message)) => message,
                other => other.to_string(),
            };
            for (_, reply) in batch {
                let _ = reply.send(Err(database(&message)));
            }
        }
    }
}

/// The live rows of `stream_ids` with the data keys their credentials are sealed under (named by
/// the row's column, or inside its state for rows written before that column).
async fn fetch_many(
    store: &PostgresStore,
    stream_ids: &[&str],
) -> Result<HashMap<String, (StoredRow, Option<StoredDataKey>)>, ProjectionError> {
    let client = store.pool().get().await.map_err(pg_error)?;
    let statement = client
        .prepare_cached(
            "SELECT c.stream_id, c.id, c.version, c.state::text, k.key_id, k.owner, \
             k.master_key_id, k.wrapped FROM connections c LEFT JOIN data_keys k \
             ON k.key_id = coalesce(c.data_key_id, \
                                    (c.state #>> '{Active,credentials,key_id}')::uuid) \
             WHERE c.stream_id = ANY($1) AND c.deleted_at IS NULL",
        )
        .await
        .map_err(pg_error)?;
    // Planned once: PostgreSQL would otherwise plan the query afresh for every batch (the
    // known length of the array makes each custom plan look cheaper than the generic one), and
    // planning cost more than running it. The three go out together, in order, on this one
    // connection, so the setting never outlives the query, whatever its outcome.
    let (_, rows, _) = futures_util::future::join3(
        client.batch_execute("SET plan_cache_mode = force_generic_plan"),
        client.query(&statement, &[&stream_ids]),
        client.batch_execute("RESET plan_cache_mode"),
    )
    .await;
    let rows = rows.map_err(pg_error)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let row = StoredRow {
                id: r.get(1),
                version: version(r.get::<_, i32>(2).into()),
                state: r.get(3),
            };
            let key = r
                .get::<_, Option<uuid::Uuid>>(4)
                .map(|key_id| StoredDataKey {
                    key_id,
                    owner: r.get::<_, Option<String>>(5).unwrap_or_default(),
                    master_key_id: r.get(6),
                    wrapped: r.get(7),
                });
            (r.get(0), (row, key))
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use domain::store::{Backend, StoreOptions};
    use domain::testing::TestDatabase;

    use super::*;

    /// The query that misses share is planned once for all batches, whatever their length
    /// (PostgreSQL would plan it afresh for each), and the connection it ran on goes back to
    /// the pool with the default planning for every other statement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn misses_are_planned_once_and_leave_their_connection_planning_as_before() {
        let db = TestDatabase::postgres().await;
        let options = StoreOptions {
            pool_size: 1,
            ..StoreOptions::default()
        };
        let Backend::Postgres(store) = db.open_with(&options).await else {
            unreachable!("a PostgreSQL database");
        };
        let misses = Misses::default();
        for batch in 1..=12 {
            let ids: Vec<String> = (0..batch)
                .map(|n| format!("connection-{batch}-{n}"))
                .collect();
            let found =
                futures_util::future::join_all(ids.iter().map(|id| misses.find(&store, id)));
            for found in found.await {
                assert!(found.unwrap().is_none());
            }
        }
        // The pool's one connection ran every batch.
        let client = store.pool().get().await.unwrap();
        let mode = client.query_one("SHOW plan_cache_mode", &[]).await.unwrap();
        assert_eq!(mode.get::<_, String>(0), "auto");
        let plans = client
            .query_one(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
                 WHERE statement LIKE '%LEFT JOIN data_keys%' \
                 AND statement NOT LIKE '%pg_prepared_statements%'",
                &[],
            )
            .await
            .unwrap();
        let (generic, custom): (i64, i64) = (plans.get(0), plans.get(1));
        assert_eq!(custom, 0, "custom plans");
        assert!(generic >= 12, "{generic} generic plans");
    }
}
