//! `grantline import`: connections from a file of JSON lines, each a `POST /connections` body
//! (every credential type the route takes).
//!
//! Two passes. The first checks every line as the route would (JSON, fields, integration,
//! bounds, the decision on a new connection) and that no connection appears twice; one bad line
//! and nothing is written, every bad line reported with its number. The second writes in
//! batches through [`Commands::import_connections`]: a batch of new connections is one insert
//! of data keys and one atomic append, so a connection is never half written. A connection that
//! exists is kept unless `replace` is asked for, so running an import again (after a crash, say)
//! only adds what is missing.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::io::{self, BufRead, Read};

use chrono::Utc;
use domain::commands::{AuthorizeConnection, CommandError, Commands, Imported};
use domain::integration::IntegrationSettings;
use projections::queries::IntegrationRecord;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::connections::Import;

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

/// A bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// Its number, from 1.
    pub line: u64,
    pub fault: LineFault,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {} ({})",
            self.line, self.fault.message, self.fault.code
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
    pub fn new(commands: Commands, integrations: Vec<IntegrationRecord>, parse: ParseBody) -> Self {
        Self {
            commands,
            integrations: integrations
                .into_iter()
                .map(|r| (r.integration.provider_config_key, r.integration.settings))
                .collect(),
            parse,
        }
    }

    /// The first pass: every line checked, nothing written.
    pub fn check(&self, input: impl BufRead, mut progress: impl FnMut(u64)) -> io::Result<Checked> {
        let mut checked = Checked::default();
        // Who holds each connection, by a 128-bit hash of its stream id: a million connections
        // take 24 MB, not the ids themselves.
        let (first, second) = (std::hash::RandomState::new(), std::hash::RandomState::new());
        let mut seen: HashMap<u128, u64> = HashMap::new();
        let mut lines = Lines::new(input);
        while let Some((number, line)) = lines.next_line()? {
            let decided = line
                .and_then(|bytes| self.command(bytes))
                .and_then(|command| {
                    let stream = command.key.stream_id();
                    let hash = u128::from(first.hash_one(stream.as_str())) << 64
                        | u128::from(second.hash_one(stream.as_str()));
                    match seen.insert(hash, number) {
                        Some(earlier) => Err(LineFault {
                            code: "duplicate_connection",
                            message: format!(
                                "connection {:?} of {:?} is already on line {earlier}",
                                command.key.connection_id(),
                                command.key.provider_config_key()
                            ),
                        }),
                        None => Ok(()),
                    }
                });
            match decided {
                Ok(()) => checked.connections += 1,
                Err(fault) => {
                    checked.bad_lines += 1;
                    if checked.errors.len() < MAX_REPORTED {
                        checked.errors.push(LineError {
                            line: number,
                            fault,
                        });
                    }
                }
            }
            progress(number);
        }
        Ok(checked)
    }

    /// The second pass: the lines written `batch` at a time, [`CONCURRENT_BATCHES`] batches in
    /// flight (their connections are distinct: the first pass saw to it). A line that no longer
    /// passes (the file changed since it was checked) stops it; the batches before it are
    /// written, and running the import again adds the rest.
    pub async fn write(
        &self,
        input: impl BufRead,
        batch: usize,
        replace: bool,
        mut progress: impl FnMut(&Report),
    ) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let mut in_flight = InFlight::default();
        let mut lines = Lines::new(input);
        let mut pending = Vec::with_capacity(batch);
        loop {
            let next = lines.next_line()?;
            let done = next.is_none();
            if let Some((number, line)) = next {
                let command = line
                    .and_then(|bytes| self.command(bytes))
                    .map_err(|fault| LineError {
                        line: number,
                        fault,
                    })
                    .map_err(|e| anyhow::anyhow!("{e}; the file changed since it was checked"))?;
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

    /// The command one line asks for, checked as far as it can be without writing.
    fn command(&self, line: &[u8]) -> Result<AuthorizeConnection, LineFault> {
        let body: Value = serde_json::from_slice(line).map_err(|e| LineFault {
            code: "invalid_json",
            message: format!("not valid JSON: {e}"),
        })?;
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

/// The lines of a reader, numbered from 1, blank ones skipped; a line longer than
/// [`MAX_LINE`] or not UTF-8 is a fault of that line, and reading goes on after it.
struct Lines<R> {
    input: R,
    buffer: Vec<u8>,
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(input: R) -> Self {
        Self {
            input,
            buffer: Vec::new(),
            number: 0,
        }
    }

    /// The next non-blank line, or `None` at the end.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> io::Result<Option<(u64, Result<&[u8], LineFault>)>> {
        let (start, end) = loop {
            self.buffer.clear();
            let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
            let read = (&mut self.input)
                .take(limit)
                .read_until(b'\n', &mut self.buffer)?;
            if read == 0 {
                return Ok(None);
            }
            self.number += 1;
            if self.buffer.last() != Some(&b'\n') && self.buffer.len() > MAX_LINE {
                // Skip the rest of the line, a chunk at a time.
                loop {
                    self.buffer.clear();
                    let more = (&mut self.input)
                        .take(limit)
                        .read_until(b'\n', &mut self.buffer)?;
                    if more == 0 || self.buffer.last() == Some(&b'\n') {
                        break;
                    }
                }
                return Ok(Some((
                    self.number,
                    Err(LineFault {
                        code: "line_too_long",
                        message: format!("longer than {MAX_LINE} bytes (the API's body limit)"),
                    }),
                )));
            }
            let start = self.buffer.len() - self.buffer.trim_ascii_start().len();
            let end = self.buffer.trim_ascii_end().len();
            if start >= end {
                continue;
            }
            if std::str::from_utf8(self.buffer.get(start..end).unwrap_or_default()).is_err() {
                return Ok(Some((
                    self.number,
                    Err(LineFault {
                        code: "invalid_json",
                        message: "not UTF-8".into(),
                    }),
                )));
            }
            break (start, end);
        };
        let line = self.buffer.get(start..end).unwrap_or_default();
        Ok(Some((self.number, Ok(line))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lines(text: &[u8]) -> Vec<(u64, Result<String, &'static str>)> {
        let mut lines = Lines::new(text);
        let mut out = Vec::new();
        while let Some((n, line)) = lines.next_line().unwrap() {
            out.push((
                n,
                line.map(|b| String::from_utf8_lossy(b).into_owned())
                    .map_err(|f| f.code),
            ));
        }
        out
    }

    #[test]
    fn lines_are_numbered_from_one_and_blank_ones_are_skipped() {
        assert_eq!(
            lines(b"{}\n\n  \r\n{\"a\":1}\r\n{}"),
            vec![
                (1, Ok("{}".into())),
                (4, Ok("{\"a\":1}".into())),
                (5, Ok("{}".into()))
            ]
        );
    }

    #[test]
    fn an_overlong_or_binary_line_is_a_fault_and_reading_goes_on() {
        let mut text = vec![b'x'; MAX_LINE * 2 + 7];
        text.extend_from_slice(b"\n{}\n\xff\xfe\n{}");
        assert_eq!(
            lines(&text),
            vec![
                (1, Err("line_too_long")),
                (2, Ok("{}".into())),
                (3, Err("invalid_json")),
                (4, Ok("{}".into()))
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_taken() {
        let mut text = vec![b' '; MAX_LINE - 2];
        text.extend_from_slice(b"{}\n");
        assert_eq!(lines(&text), vec![(1, Ok("{}".into()))]);
    }
}
