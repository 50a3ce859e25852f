//! The projection runner: catch-up, the continuous loop, status and rebuild.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{Backend, EventStore, LogReader, Position, RecordedEvent, sqlite_read_all_on};
use serde::Serialize;

use crate::model::{StateModel, decode, fold};
use crate::table::{
    checkpoint_from, from_micros, pg_load, pg_set_checkpoint, pg_write, sqlite_checkpoint,
    sqlite_load, sqlite_set_checkpoint, sqlite_write,
};
use crate::{ConnectionsModel, IntegrationsModel, PROJECTIONS, ProjectionError};

/// Lag is counted up to this many events.
const LAG_CAP: usize = 10_000;

/// How long a rebuild waits for committed events held back by a long-running transaction
/// before it gives up without swapping.
const HORIZON_WAIT: Duration = Duration::from_secs(120);

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Applied this many events (of all categories) and advanced the checkpoint.
    Applied(usize),
    /// Caught up: nothing to do.
    Idle,
    /// Another runner holds this projection's checkpoint.
    Busy,
}

/// Runs the projections of one backend.
#[derive(Clone)]
pub struct Runner {
    backend: Backend,
    store: Arc<dyn EventStore>,
    batch_size: usize,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("backend", &self.backend)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl Runner {
    pub fn new(backend: Backend) -> Self {
        Self {
            store: backend.event_store(),
            backend,
            batch_size: 1000,
        }
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// One batch of every projection. Returns the events applied in all.
    pub async fn run_once(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        if let Step::Applied(n) = self.step::<ConnectionsModel>().await? {
            applied += n;
        }
        if let Step::Applied(n) = self.step::<IntegrationsModel>().await? {
            applied += n;
        }
        Ok(applied)
    }

    /// Runs [`Runner::run_once`] until caught up with everything committed so far.
    pub async fn catch_up(&self) -> Result<(), ProjectionError> {
        while self.run_once().await? > 0 {}
        Ok(())
    }

    /// Keeps the projections current until `shutdown` completes: woken by new commits, polling
    /// otherwise, backing off after errors (which are logged and recorded on the checkpoint).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut listener = self.store.listener();
        let mut backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);
        loop {
            let pause = match self.run_once().await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    None
                }
                Ok(_) => continue,
                Err(error) => {
                    tracing::error!(error.message = %error, "projection.run failed; retrying");
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    Some(pause)
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = async {
                    match pause {
                        Some(pause) => tokio::time::sleep(pause).await,
                        None => listener.wait().await,
                    }
                } => {}
            }
        }
    }

    /// One batch of projection `M`.
    #[tracing::instrument(name = "projection.step", skip_all, fields(projection = M::NAME))]
    pub async fn step<M: StateModel>(&self) -> Result<Step, ProjectionError> {
        let outcome = match &self.backend {
            Backend::Postgres(_) => self.step_postgres::<M>().await,
            Backend::Sqlite(_) => self.step_sqlite::<M>().await,
        };
        if let Err(error) = &outcome {
            self.record_error(M::NAME, &error.to_string()).await;
        }
        outcome
    }

    async fn step_postgres<M: StateModel>(&self) -> Result<Step, ProjectionError> {
        let Backend::Postgres(store) = &self.backend else {
            return Ok(Step::Idle);
        };
        let mut client = store.pool().get().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "SELECT commit_position, global_position FROM projection_checkpoints \
                 WHERE name = $1 FOR UPDATE SKIP LOCKED",
                &[&M::NAME],
            )
            .await?
        else {
            return Ok(Step::Busy);
        };
        let position = checkpoint_from(row.get(0), row.get(1));
        let events = self.store.read_all(position, self.batch_size).await?;
        if events.is_empty() {
            return Ok(Step::Idle);
        }
        let (readable, unreadable) = decode_prefix::<M>(&events);
        if let Some(last) = readable.last_position {
            let ids = stream_ids(&readable.events);
            let snapshots = pg_load(&tx, M::NAME, &ids).await?;
            let rows = fold::<M>(M::NAME, snapshots, readable.events)?;
            pg_write(&tx, M::NAME, &rows).await?;
            pg_set_checkpoint(&tx, M::NAME, last).await?;
            tx.commit().await?;
        }
        match unreadable {
            Some(error) => Err(error),
            None => Ok(Step::Applied(readable.count)),
        }
    }

    async fn step_sqlite<M: StateModel>(&self) -> Result<Step, ProjectionError> {
        let Backend::Sqlite(store) = &self.backend else {
            return Ok(Step::Idle);
        };
        let position = store
            .read(|conn| sqlite_checkpoint(conn, M::NAME).map_err(sqlite_error))
            .await?;
        let events = self.store.read_all(position, self.batch_size).await?;
        if events.is_empty() {
            return Ok(Step::Idle);
        }
        let (readable, unreadable) = decode_prefix::<M>(&events);
        if let Some(last) = readable.last_position {
            let count = readable.count;
            let applied = store
                .write(move |conn| {
                    let tx = conn.transaction().map_err(sqlite_error)?;
                    // Someone (a rebuild) moved the checkpoint since it was read: start over.
                    if sqlite_checkpoint(&tx, M::NAME).map_err(sqlite_error)? != position {
                        return Ok(false);
                    }
                    apply_sqlite::<M>(&tx, M::NAME, readable.events)?;
                    sqlite_set_checkpoint(&tx, M::NAME, last).map_err(sqlite_error)?;
                    tx.commit().map_err(sqlite_error)?;
                    Ok(true)
                })
                .await?;
            if !applied {
                return Ok(Step::Busy);
            }
            if unreadable.is_none() {
                return Ok(Step::Applied(count));
            }
        }
        match unreadable {
            Some(error) => Err(error),
            None => Ok(Step::Applied(readable.count)),
        }
    }

    async fn record_error(&self, name: &'static str, message: &str) {
        let message = message.to_owned();
        let _ = match &self.backend {
            Backend::Postgres(store) => match store.pool().get().await {
                Ok(client) => client
                    .execute(
                        "UPDATE projection_checkpoints SET last_error = $2 WHERE name = $1",
                        &[&name, &message],
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Backend::Sqlite(store) => store
                .write(move |conn| {
                    conn.execute(
                        "UPDATE projection_checkpoints SET last_error = ?2 WHERE name = ?1",
                        [name, message.as_str()],
                    )
                    .map(|_| ())
                    .map_err(sqlite_error)
                })
                .await
                .map_err(|e| e.to_string()),
        };
    }

    /// Each projection's checkpoint, the log's head and the lag between them.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let head = self.store.head_position().await?;
        let rows: Vec<CheckpointRow> = match &self.backend {
            Backend::Postgres(store) => store
                .pool()
                .get()
                .await?
                .query(
                    "SELECT name, commit_position, global_position, updated_at, last_error \
                     FROM projection_checkpoints ORDER BY name",
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect(),
            Backend::Sqlite(store) => {
                store
                    .read(|conn| {
                        let mut statement = conn
                            .prepare(
                                "SELECT name, commit_position, global_position, updated_at, \
                                 last_error FROM projection_checkpoints ORDER BY name",
                            )
                            .map_err(sqlite_error)?;
                        let rows = statement
                            .query_map([], |r| {
                                Ok((
                                    r.get(0)?,
                                    r.get(1)?,
                                    r.get(2)?,
                                    from_micros(r.get(3)?),
                                    r.get(4)?,
                                ))
                            })
                            .map_err(sqlite_error)?;
                        rows.collect::<Result<_, _>>().map_err(sqlite_error)
                    })
                    .await?
            }
        };
        let mut statuses = Vec::new();
        for (name, commit, global, updated_at, last_error) in rows {
            if !PROJECTIONS.contains(&name.as_str()) {
                continue;
            }
            let checkpoint = checkpoint_from(commit, global);
            // Counted in log order: positions alone are not commit order on PostgreSQL.
            let behind = self.store.read_all(checkpoint, LAG_CAP).await?.len();
            statuses.push(ProjectionStatus {
                name,
                checkpoint: checkpoint.to_string(),
                checkpoint_position: global,
                head_position: head,
                lag: i64::try_from(behind).unwrap_or(i64::MAX),
                updated_at,
                last_error,
            });
        }
        Ok(statuses)
    }

    /// Rebuilds the projection `name` from the whole log into its shadow table and swaps it in
    /// atomically; the live table serves reads until the swap. `progress` gets the running count
    /// of events replayed.
    pub async fn rebuild(
        &self,
        name: &str,
        progress: impl FnMut(u64),
    ) -> Result<u64, ProjectionError> {
        match name {
            ConnectionsModel::NAME => self.rebuild_model::<ConnectionsModel>(progress).await,
            IntegrationsModel::NAME => self.rebuild_model::<IntegrationsModel>(progress).await,
            other => Err(ProjectionError::UnknownProjection(other.to_owned())),
        }
    }

    #[tracing::instrument(name = "projection.rebuild", skip_all, fields(projection = M::NAME))]
    async fn rebuild_model<M: StateModel>(
        &self,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ProjectionError> {
        match &self.backend {
            Backend::Postgres(store) => {
                // One rebuild per projection at a time, across instances.
                let guard = store.pool().get().await?;
                let lock_key = format!("grantline.rebuild.{}", M::NAME);
                let locked: bool = guard
                    .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key])
                    .await?
                    .get(0);
                if !locked {
                    return Err(ProjectionError::Store(domain::store::StoreError::Database(
                        format!("a rebuild of {} is already running", M::NAME),
                    )));
                }
                let outcome = self.rebuild_postgres::<M>(&mut progress).await;
                let _ = guard
                    .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
                    .await;
                outcome
            }
            Backend::Sqlite(_) => self.rebuild_sqlite::<M>(&mut progress).await,
        }
    }

    async fn rebuild_postgres<M: StateModel>(
        &self,
        progress: &mut impl FnMut(u64),
    ) -> Result<u64, ProjectionError> {
        let Backend::Postgres(store) = &self.backend else {
            return Ok(0);
        };
        let mut client = store.pool().get().await?;
        client
            .batch_execute(&format!("TRUNCATE {}", M::SHADOW))
            .await?;
        // Everything committed before the rebuild started must be in the shadow before it is
        // swapped in. Readers see the log only up to the oldest running transaction (the xid8
        // horizon), so an empty batch is not the end: the rebuild waits until it has read every
        // event at or below the head it saw at the start. Swapping earlier would serve a table
        // missing connections (404s) until the live runner caught up.
        let head = self.store.head_position().await?;
        let mut seen_to_head = 0i64;
        let mut waited_since: Option<std::time::Instant> = None;
        let mut listener = self.store.listener();
        let mut reader = LogReader::new(self.store.clone(), Position::START, self.batch_size);
        let mut replayed = 0u64;
        loop {
            let events = reader.next_batch().await?;
            if events.is_empty() {
                let committed: i64 = client
                    .query_one(
                        "SELECT count(*) FROM events WHERE global_position <= $1",
                        &[&head],
                    )
                    .await?
                    .get(0);
                if seen_to_head >= committed {
                    break;
                }
                let since = *waited_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > HORIZON_WAIT {
                    return Err(ProjectionError::Store(domain::store::StoreError::Database(
                        format!(
                            "the rebuild of {} cannot see {} committed events: a long-running \
                             transaction holds the log back (see pg_stat_activity); nothing \
                             was swapped",
                            M::NAME,
                            committed - seen_to_head
                        ),
                    )));
                }
                listener.wait_at_most(Duration::from_millis(100)).await;
                continue;
            }
            waited_since = None;
            seen_to_head += events.iter().filter(|e| e.position.global <= head).count() as i64;
            replayed += events.len() as u64;
            let decoded = decode::<M>(&events)?;
            let tx = client.transaction().await?;
            let snapshots = pg_load(&tx, M::SHADOW, &stream_ids(&decoded)).await?;
            pg_write(&tx, M::SHADOW, &fold::<M>(M::SHADOW, snapshots, decoded)?).await?;
            tx.commit().await?;
            progress(replayed);
        }
        // Stop the live runner, take in what it committed meanwhile, swap, hand over.
        let tx = client.transaction().await?;
        tx.query_one(
            "SELECT global_position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
            &[&M::NAME],
        )
        .await?;
        let mut position = reader.position();
        loop {
            let events = self.store.read_all(position, self.batch_size).await?;
            let Some(last) = events.last().map(|e| e.position) else {
                break;
            };
            replayed += events.len() as u64;
            let decoded = decode::<M>(&events)?;
            let snapshots = pg_load(&tx, M::SHADOW, &stream_ids(&decoded)).await?;
            pg_write(&tx, M::SHADOW, &fold::<M>(M::SHADOW, snapshots, decoded)?).await?;
            position = last;
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {live} RENAME TO {live}_swapping; \
             ALTER TABLE {shadow} RENAME TO {live}; \
             ALTER TABLE {live}_swapping RENAME TO {shadow};",
            live = M::NAME,
            shadow = M::SHADOW
        ))
        .await?;
        pg_set_checkpoint(&tx, M::NAME, position).await?;
        tx.commit().await?;
        client
            .batch_execute(&format!("TRUNCATE {}", M::SHADOW))
            .await?;
        progress(replayed);
        Ok(replayed)
    }

    async fn rebuild_sqlite<M: StateModel>(
        &self,
        progress: &mut impl FnMut(u64),
    ) -> Result<u64, ProjectionError> {
        let Backend::Sqlite(store) = &self.backend else {
            return Ok(0);
        };
        store
            .write(|conn| {
                conn.execute_batch(&format!("DELETE FROM {}", M::SHADOW))
                    .map_err(sqlite_error)
            })
            .await?;
        let mut reader = LogReader::new(self.store.clone(), Position::START, self.batch_size);
        let mut replayed = 0u64;
        loop {
            let events = reader.next_batch().await?;
            if events.is_empty() {
                break;
            }
            replayed += events.len() as u64;
            let decoded = decode::<M>(&events)?;
            store
                .write(move |conn| {
                    let tx = conn.transaction().map_err(sqlite_error)?;
                    apply_sqlite::<M>(&tx, M::SHADOW, decoded)?;
                    tx.commit().map_err(sqlite_error)
                })
                .await?;
            progress(replayed);
        }
        // The writer connection is the lock: catch up, swap and hand over in one transaction.
        let (position, batch_size) = (reader.position(), self.batch_size);
        let tail = store
            .write(move |conn| {
                let tx = conn.transaction().map_err(sqlite_error)?;
                let mut position = position;
                let mut tail = 0u64;
                loop {
                    let events = sqlite_read_all_on(&tx, position, batch_size)?;
                    let Some(last) = events.last().map(|e| e.position) else {
                        break;
                    };
                    tail += events.len() as u64;
                    let decoded = decode::<M>(&events).map_err(to_store_error)?;
                    apply_sqlite::<M>(&tx, M::SHADOW, decoded)?;
                    position = last;
                }
                tx.execute_batch(&format!(
                    "ALTER TABLE {live} RENAME TO {live}_swapping; \
                     ALTER TABLE {shadow} RENAME TO {live}; \
                     ALTER TABLE {live}_swapping RENAME TO {shadow}; \
                     DELETE FROM {shadow};",
                    live = M::NAME,
                    shadow = M::SHADOW
                ))
                .map_err(sqlite_error)?;
                sqlite_set_checkpoint(&tx, M::NAME, position).map_err(sqlite_error)?;
                tx.commit().map_err(sqlite_error)?;
                Ok(tail)
            })
            .await?;
        replayed += tail;
        progress(replayed);
        Ok(replayed)
    }
}

/// `(name, commit, global, updated_at, last_error)` of a checkpoint row.
type CheckpointRow = (String, i64, i64, DateTime<Utc>, Option<String>);

/// One projection's progress, as `grantline projections status` and `/admin/projections` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    /// `commit:position` of the last applied event.
    pub checkpoint: String,
    pub checkpoint_position: i64,
    pub head_position: i64,
    /// Events after the checkpoint that a reader can see now (counted up to 10,000).
    pub lag: i64,
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// The decodable prefix of a batch.
struct Readable<E> {
    events: Vec<(String, u32, E)>,
    /// Events of all categories up to the first unreadable one.
    count: usize,
    last_position: Option<Position>,
}

/// Decodes events until the first that cannot be read; the prefix is applied, the error
/// returned after it, so the checkpoint stops right before the bad event.
fn decode_prefix<M: StateModel>(
    events: &[RecordedEvent],
) -> (Readable<M::Event>, Option<ProjectionError>) {
    let mut readable = Readable {
        events: Vec::new(),
        count: 0,
        last_position: None,
    };
    for event in events {
        if event.stream_id.category() == M::CATEGORY {
            match decode::<M>(std::slice::from_ref(event)) {
                Ok(mut decoded) => readable.events.append(&mut decoded),
                Err(error) => return (readable, Some(error)),
            }
        }
        readable.count += 1;
        readable.last_position = Some(event.position);
    }
    (readable, None)
}

fn stream_ids<E>(events: &[(String, u32, E)]) -> Vec<String> {
    events
        .iter()
        .map(|(id, ..)| id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn apply_sqlite<M: StateModel>(
    conn: &rusqlite::Connection,
    table: &'static str,
    events: Vec<(String, u32, M::Event)>,
) -> Result<(), domain::store::StoreError> {
    let snapshots = sqlite_load(conn, table, &stream_ids(&events)).map_err(to_store_error)?;
    let rows = fold::<M>(table, snapshots, events).map_err(to_store_error)?;
    sqlite_write(conn, table, &rows).map_err(sqlite_error)
}

fn sqlite_error(e: rusqlite::Error) -> domain::store::StoreError {
    domain::store::StoreError::Database(e.to_string())
}

/// Inside a SQLite write closure only store errors can cross; keep the message.
fn to_store_error(e: ProjectionError) -> domain::store::StoreError {
    match e {
        ProjectionError::Store(e) => e,
        other => domain::store::StoreError::Database(other.to_string()),
    }
}
