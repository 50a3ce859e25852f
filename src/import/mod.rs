//! `grantline import`: connections from a file of JSON lines, each a `POST /connections` body
//! (every credential type the route takes), or from a Nango database (`nango`), whose rows
//! become such bodies.
//!
//! Two passes over a [`Source`]. The first checks every record as the route would (JSON,
//! fields, integration, bounds, the decision on a new connection) and that no connection appears
//! twice; one bad record and nothing is written, every bad record reported with where it is. The second writes in
//! batches through [`Commands::import_connections`]: a batch of new connections is one insert
//! of data keys and one atomic append, so a connection is never half written. A connection that
//! exists is kept unless `replace` is asked for, so running an import again (after a crash, say)
//! only adds what is missing.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;

use chrono::Utc;
use domain::catalog::Catalog;
use domain::commands::{AuthorizeConnection, CommandError, Commands, Imported};
use domain::integration::IntegrationSettings;
use projections::queries::IntegrationRecord;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::connections::Import;

mod lines;
mod nango;
mod run;
mod store;

pub use lines::JsonLines;
pub use run::run;

/// The longest line taken: the API's body limit.
pub const MAX_LINE: usize = 1024 * 1024;

/// How many batches are written at once: one seals while another is in the database.
const CONCURRENT_BATCHES: usize = 2;

/// How many bad lines are kept for the report; the rest are only counted.
const MAX_REPORTED: usize = 100;

/// Why a line cannot be imported: an error code, as the API would answer, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineFault {
    pub code: &'static str,
    pub message: String,
}

/// Decodes one line's JSON as the `POST /connections` route decodes its body.
pub type ParseBody = fn(Value) -> Result<Import, LineFault>;

/// One body to import, or why what stood there is not one.
#[derive(Debug)]
pub struct Record {
    /// Where it is, for people: `line 3`, `Nango connection "c1" of "github" (row 17)`.
    pub at: String,
    /// Its position in the source, from 1 (for progress).
    pub number: u64,
    pub body: Result<Value, LineFault>,
}

/// Where bodies come from, in a stable order: read once to check, once again to write.
#[expect(
    async_fn_in_trait,
    reason = "used only here, awaited on the caller's task; no Send bound is needed"
)]
pub trait Source {
    /// The next record, or `None` at the end.
    async fn next_record(&mut self) -> anyhow::Result<Option<Record>>;
}

/// A bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Where it is ([`Record::at`]).
    pub at: String,
    pub fault: LineFault,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.at, self.fault.message, self.fault.code
        )
    }
}

/// What the first pass found.
#[derive(Debug, Default)]
pub struct Checked {
    /// The connections the file holds (blank lines aside).
    pub connections: u64,
    /// The first bad lines, in order.
    pub errors: Vec<LineError>,
    /// All bad lines.
    pub bad_lines: u64,
}

/// What the second pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub created: u64,
    pub kept: u64,
    pub replaced: u64,
}

impl Report {
    fn add(&mut self, outcome: Imported) {
        match outcome {
            Imported::Created => self.created += 1,
            Imported::Kept => self.kept += 1,
            Imported::Replaced => self.replaced += 1,
        }
    }

    /// Every connection it accounts for.
    pub fn total(&self) -> u64 {
        self.created + self.kept + self.replaced
    }
}

/// Checks and writes imports against the integrations that exist.
pub struct Importer {
    commands: Commands,
    integrations: HashMap<String, IntegrationSettings>,
    /// The templates, for the kind of credentials each provider takes.
    catalog: Catalog,
    parse: ParseBody,
}

impl fmt::Debug for Importer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Importer")
            .field("integrations", &self.integrations.len())
            .finish_non_exhaustive()
    }
}

impl Importer {
    pub fn new(
        commands: Commands,
        integrations: Vec<IntegrationRecord>,
        catalog: Catalog,
        parse: ParseBody,
    ) -> Self {
        Self {
            commands,
            catalog,
            integrations: integrations
                .into_iter()
                .map(|r| (r.integration.provider_config_key, r.integration.settings))
                .collect(),
            parse,
        }
    }

    /// The provider templates lines are checked against.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Adds integrations the import itself creates before writing (Nango's), unless one of the
    /// same key exists.
    pub fn with_integrations(
        mut self,
        planned: impl IntoIterator<Item = (String, IntegrationSettings)>,
    ) -> Self {
        for (key, settings) in planned {
            self.integrations.entry(key).or_insert(settings);
        }
        self
    }

    /// The first pass: every record checked, nothing written.
    pub async fn check<S: Source>(
        &self,
        source: &mut S,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<Checked> {
        let mut checked = Checked::default();
        // Who holds each connection, by a 128-bit hash of its stream id: a million connections
        // take 24 MB, not the ids themselves.
        let (first, second) = (std::hash::RandomState::new(), std::hash::RandomState::new());
        let mut seen: HashMap<u128, String> = HashMap::new();
        while let Some(record) = source.next_record().await? {
            let decided = record
                .body
                .and_then(|body| self.command(body))
                .and_then(|command| {
                    let stream = command.key.stream_id();
                    let hash = u128::from(first.hash_one(stream.as_str())) << 64
                        | u128::from(second.hash_one(stream.as_str()));
                    match seen.get(&hash) {
                        Some(earlier) => Err(LineFault {
                            code: "duplicate_connection",
                            message: format!(
                                "connection {:?} of {:?} is already on {earlier}",
                                command.key.connection_id(),
                                command.key.provider_config_key()
                            ),
                        }),
                        None => {
                            seen.insert(hash, record.at.clone());
                            Ok(())
                        }
                    }
                });
            match decided {
                Ok(()) => checked.connections += 1,
                Err(fault) => {
                    checked.bad_lines += 1;
                    if checked.errors.len() < MAX_REPORTED {
                        checked.errors.push(LineError {
                            at: record.at,
                            fault,
                        });
                    }
                }
            }
            progress(record.number);
        }
        Ok(checked)
    }

    /// The second pass: the records written `batch` at a time, [`CONCURRENT_BATCHES`] batches in
    /// flight (their connections are distinct: the first pass saw to it). A record that no
    /// longer passes (the source changed since it was checked) stops it; the batches before it
    /// are written, and running the import again adds the rest.
    pub async fn write<S: Source>(
        &self,
        source: &mut S,
        batch: usize,
        replace: bool,
        mut progress: impl FnMut(&Report),
    ) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let mut in_flight = InFlight::default();
        let mut pending = Vec::with_capacity(batch);
        loop {
            let next = source.next_record().await?;
            let done = next.is_none();
            if let Some(record) = next {
                let command = record
                    .body
                    .and_then(|body| self.command(body))
                    .map_err(|fault| LineError {
                        at: record.at,
                        fault,
                    })
                    .map_err(|e| anyhow::anyhow!("{e}; the source changed since it was checked"))?;
                pending.push(command);
                if pending.len() < batch.max(1) {
                    continue;
                }
            }
            if !pending.is_empty() {
                if in_flight.0.len() >= CONCURRENT_BATCHES {
                    in_flight.finish_one(&mut report).await?;
                    progress(&report);
                }
                let (commands, batch) = (self.commands.clone(), std::mem::take(&mut pending));
                in_flight.0.push_back(tokio::spawn(async move {
                    commands.import_connections(batch, replace).await
                }));
            }
            if done {
                while !in_flight.0.is_empty() {
                    in_flight.finish_one(&mut report).await?;
                    progress(&report);
                }
                return Ok(report);
            }
        }
    }

    /// The command one body asks for, checked as far as it can be without writing.
    fn command(&self, body: Value) -> Result<AuthorizeConnection, LineFault> {
        let import = (self.parse)(body)?;
        let settings = self
            .integrations
            .get(import.key.provider_config_key())
            .ok_or_else(|| LineFault {
                code: "unknown_provider_config",
                message: format!(
                    "unknown provider config key {:?}",
                    import.key.provider_config_key()
                ),
            })?;
        crate::connections::fitting(&self.catalog, settings, &import.credentials).map_err(|e| {
            LineFault {
                code: "invalid_body",
                message: e.to_string(),
            }
        })?;
        let command = import.authorization(settings, Utc::now());
        command.check().map_err(|e| LineFault {
            code: "invalid_body",
            message: match e {
                CommandError::Connection(rejected) => rejected.to_string(),
                other => other.to_string(),
            },
        })?;
        Ok(command)
    }
}

/// Batches being written, oldest first; aborted when dropped (after an error), which leaves
/// each batch written whole or not at all.
#[derive(Default)]
struct InFlight(VecDeque<JoinHandle<Result<Vec<Imported>, CommandError>>>);

impl InFlight {
    /// Waits for the oldest batch and adds its outcomes to `report`.
    async fn finish_one(&mut self, report: &mut Report) -> anyhow::Result<()> {
        if let Some(oldest) = self.0.pop_front() {
            let outcomes = oldest
                .await
                .map_err(|e| anyhow::anyhow!("a batch stopped: {e}"))?
                .map_err(|e| anyhow::anyhow!("writing a batch failed: {e}"))?;
            outcomes.into_iter().for_each(|o| report.add(o));
        }
        Ok(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}
