//! The projection runner: catch-up, the continuous loop, status and rebuild.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{Backend, EventStore, LogReader, Position, RecordedEvent, StoreError};
use serde::Serialize;

use crate::model::{self, EventOf, StateModel, decode};
use crate::resident::{CAPACITY as RESIDENT, Resident};
use crate::store::{Analyzed, Batch, Planner, ReadModels, Tables};
use crate::{ConnectionsModel, IntegrationsModel, PROJECTIONS, ProjectionError};

/// Lag is counted up to this many events.
pub const LAG_CAP: usize = 10_000;

/// Events a rebuild reads per batch (the live runner reads fewer, to stay close to the head).
const REBUILD_BATCH: usize = 5000;

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
    read_models: ReadModels,
    events: Arc<dyn EventStore>,
    batch_size: usize,
    rebuild_batch_size: usize,
    /// States a rebuild holds in memory at most.
    resident: usize,
    /// The longest one step of [`Runner::run`] may take before it is given up and retried.
    step_limit: Duration,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("read_models", &self.read_models)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl Runner {
    /// The runner of `backend`'s projections.
    pub fn new(backend: &Backend) -> Self {
        Self {
            read_models: ReadModels::open(backend),
            events: backend.event_store(),
            batch_size: 1000,
            rebuild_batch_size: REBUILD_BATCH,
            resident: RESIDENT,
            step_limit: Duration::from_secs(60),
        }
    }

    /// How long one step of [`Runner::run`] may take (at least 10 s, so that a short setting
    /// never gives up a slow but answering database's batch again and again). A step waiting
    /// longer is waiting on a database that stopped answering on its connection (a hung pooler
    /// keeps the socket open): it is given up, its transaction with it, and retried like a
    /// failed step.
    pub fn with_step_limit(mut self, limit: Duration) -> Self {
        self.step_limit = limit.max(Duration::from_secs(10));
        self
    }

    /// States a rebuild holds in memory at most (see [`crate::resident`]).
    pub fn with_resident_states(mut self, states: usize) -> Self {
        self.resident = states.max(1);
        self
    }

    /// Events per batch, for the live runner and rebuilds alike.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self.rebuild_batch_size = self.batch_size;
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
        let mut listener = self.events.listener();
        let mut backoff = Duration::from_millis(100);
        tokio::pin!(shutdown);
        loop {
            let step = tokio::time::timeout(self.step_limit, self.run_once()).await;
            let step = step.unwrap_or_else(|_| {
                Err(ProjectionError::Store(StoreError::Database(format!(
                    "the database did not answer within {:?}",
                    self.step_limit
                ))))
            });
            let pause = match step {
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
        let outcome = self.apply_next::<M>().await;
        if let Err(error) = &outcome {
            self.read_models
                .store()
                .record_error(M::NAME, error.to_string())
                .await;
        }
        outcome
    }

    /// Reads the batch after the checkpoint and applies its readable prefix; an unreadable
    /// event is reported after the events before it are applied.
    async fn apply_next<M: StateModel>(&self) -> Result<Step, ProjectionError> {
        let store = self.read_models.store();
        let from = store.checkpoint(M::NAME).await?;
        let events = self.events.read_all(from, self.batch_size).await?;
        if events.is_empty() {
            return Ok(Step::Idle);
        }
        let (readable, unreadable) = decode_prefix::<M>(&events);
        if let Some(to) = readable.last_position {
            let batch = model::batch::<M>(M::NAME, readable.events, to);
            if !store.apply(M::NAME, from, batch).await? {
                return Ok(Step::Busy);
            }
        }
        match unreadable {
            Some(error) => Err(error),
            None => Ok(Step::Applied(readable.count)),
        }
    }

    /// Each projection's checkpoint, the log's head and the lag between them.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let head = self.events.head_position().await?;
        let mut statuses = Vec::new();
        for checkpoint in self.read_models.store().checkpoints().await? {
            if !PROJECTIONS.contains(&checkpoint.name.as_str()) {
                continue;
            }
            // Counted in log order: positions alone are not commit order on PostgreSQL.
            let behind = self
                .events
                .read_all(checkpoint.position, LAG_CAP)
                .await?
                .len();
            let caught_up = !self
                .events
                .committed_after(checkpoint.position, head)
                .await?;
            statuses.push(ProjectionStatus {
                name: checkpoint.name,
                checkpoint: checkpoint.position.to_string(),
                checkpoint_position: checkpoint.position.global,
                head_position: head,
                lag: i64::try_from(behind).unwrap_or(i64::MAX),
                caught_up,
                updated_at: checkpoint.updated_at,
                last_error: checkpoint.last_error,
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
        let store = self.read_models.store();
        // One rebuild per projection at a time, across instances.
        let _rebuilding = store.lock_rebuild(M::NAME).await?;
        let tables = Tables {
            live: M::NAME,
            shadow: M::SHADOW,
        };
        store.clear(tables).await?;
        // Two stages, one batch apart: the replay reads and folds the next batch while this
        // task writes the one before into the shadow.
        let (batches, mut planned) = tokio::sync::mpsc::channel(2);
        let replay = tokio::spawn(replay::<M>(
            self.read_models.clone(),
            self.events.clone(),
            self.rebuild_batch_size,
            self.resident,
            batches,
        ));
        let written = async {
            while let Some((batch, replayed)) = planned.recv().await {
                if let Some(batch) = batch {
                    store.write(M::SHADOW, batch).await?;
                }
                progress(replayed);
            }
            Ok::<_, ProjectionError>(())
        }
        .await;
        if let Err(error) = written {
            replay.abort();
            return Err(error);
        }
        let (through, mut replayed) = replay.await.map_err(|e| {
            ProjectionError::Store(StoreError::Database(format!(
                "the rebuild's log reader stopped: {e}"
            )))
        })??;
        store.index(tables).await?;
        // Stop the live runner, take in what it committed meanwhile, swap, hand over.
        let planner: Planner = Arc::new(|events| model::plan::<M>(M::SHADOW, events));
        replayed += store.swap(tables, through, planner).await?;
        progress(replayed);
        // The swapped-in table's statistics are those of the empty shadow.
        store.analyze(Analyzed::ReadModels).await?;
        Ok(replayed)
    }

    /// Refreshes the planner's statistics of the read models, the log or both (after a bulk
    /// import).
    pub async fn analyze(&self, what: Analyzed) -> Result<(), ProjectionError> {
        self.read_models.store().analyze(what).await
    }
}

/// A rebuild's first stage: reads the whole log and folds it, holding the states of streams not
/// yet written in memory ([`Resident`]), and sends on the batches for the shadow of `M` (rows
/// that leave memory, events of streams already written) with the running count of events
/// read; `None` when a batch leaves nothing to write. Returns where it stopped and that count.
///
/// Everything committed before the rebuild started must be in the shadow before it is swapped
/// in. Readers see the log only up to the oldest running transaction (the xid8 horizon on
/// PostgreSQL), so an empty batch is not the end: the replay waits until it has read every
/// event at or below the head it saw at the start. Swapping earlier would serve a table missing
/// connections (404s) until the live runner caught up.
async fn replay<M: StateModel>(
    read_models: ReadModels,
    events: Arc<dyn EventStore>,
    batch_size: usize,
    resident: usize,
    batches: tokio::sync::mpsc::Sender<(Option<Batch>, u64)>,
) -> Result<(Position, u64), ProjectionError> {
    let store = read_models.store();
    let head = events.head_position().await?;
    let mut seen_to_head = 0i64;
    let mut waited_since: Option<std::time::Instant> = None;
    let mut listener = events.listener();
    let mut reader = LogReader::new(events, Position::START, batch_size);
    let mut replayed = 0u64;
    let mut resident = Resident::<M>::new(resident, batch_size);
    // Sends a batch on; fails once the writer stopped (its error is the one reported).
    let send = |batch: Option<Batch>, replayed: u64| batches.send((batch, replayed));
    loop {
        let events = reader.next_batch().await?;
        if events.is_empty() {
            let committed = store.events_through(head).await?;
            if seen_to_head >= committed {
                for batch in resident.drain() {
                    if send(Some(batch), replayed).await.is_err() {
                        break;
                    }
                }
                return Ok((reader.position(), replayed));
            }
            let since = *waited_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > HORIZON_WAIT {
                return Err(ProjectionError::Store(StoreError::Database(format!(
                    "the rebuild of {} cannot see {} committed events: a long-running \
                     transaction holds the log back (see pg_stat_activity); nothing was \
                     swapped",
                    M::NAME,
                    committed - seen_to_head
                ))));
            }
            listener.wait_at_most(Duration::from_millis(100)).await;
            continue;
        }
        waited_since = None;
        seen_to_head += events.iter().filter(|e| e.position.global <= head).count() as i64;
        replayed += events.len() as u64;
        let to = events.last().map_or(Position::START, |e| e.position);
        let batches = resident.take(decode::<M>(&events)?, to);
        // A batch that leaves nothing to write still reports the progress.
        let batches: Vec<Option<Batch>> = if batches.is_empty() {
            vec![None]
        } else {
            batches.into_iter().map(Some).collect()
        };
        for batch in batches {
            if send(batch, replayed).await.is_err() {
                return Ok((reader.position(), replayed));
            }
        }
    }
}

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
    /// Every event committed up to `head_position` is applied, also those readers still wait
    /// for. (The checkpoint's position need not reach the head: on PostgreSQL the last event
    /// in commit order can have a lower position than an earlier-committed one.)
    pub caught_up: bool,
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
) -> (Readable<EventOf<M>>, Option<ProjectionError>) {
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
