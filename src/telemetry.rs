//! Logging: `tracing` to stderr, as text or JSON (`GRANTLINE_LOG_FORMAT`), filtered by
//! `RUST_LOG` (default `info` for the service, `warn` for the command-line tools, whose output is
//! their answer).
//!
//! In JSON every line is one object: `timestamp`, `level`, `target`, the event's fields at the top
//! (`message`, `connection_id`, …) and `spans`, the list of spans the line was logged in, outermost
//! first, each with its `name` and fields. A line logged while a request is handled lists the
//! `http.request` span with its `request_id`, `method` and `route` (see
//! [`crate::http::observe`]); in text, the same spans prefix the line.
//!
//! Secrets never reach a log line: token, key and secret types redact themselves, spans and
//! events carry ids and route templates, never credentials, request URLs with their query, or
//! headers. Dependencies' own logging is capped at `info` unless `RUST_LOG` names the dependency:
//! at `debug`, the database driver logs statement parameters.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Directive;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

use crate::config::LogFormat;

/// Dependencies whose debug or trace output may show request or statement contents.
const QUIET_DEPENDENCIES: [&str; 5] = ["tokio_postgres", "hyper", "hyper_util", "reqwest", "h2"];

/// Installs the global subscriber once (logging at `info` unless `RUST_LOG` says otherwise);
/// later calls are ignored.
pub fn init(format: LogFormat) {
    init_at(format, "info", "info");
}

/// Like [`init`] for the command-line tools: `warn` unless `RUST_LOG` says otherwise, so that
/// start-up chatter (migrations, catalog) does not bury their answer.
pub fn init_tool() {
    init_at(LogFormat::Text, "warn", "warn");
}

/// Logging at `default` unless `RUST_LOG` says otherwise, the chatty dependencies at
/// `dependencies` unless it names them.
fn init_at(format: LogFormat, default: &str, dependencies: &str) {
    let configured = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = Some(configured.trim())
        .filter(|directives| !directives.is_empty())
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    for dependency in QUIET_DEPENDENCIES {
        if !configured.contains(dependency)
            && let Ok(directive) = format!("{dependency}={dependencies}").parse::<Directive>()
        {
            filter = filter.add_directive(directive);
        }
    }
    // A log line that cannot be written (stderr closed by whoever read it) is dropped: the
    // subscriber's own report of it would be printed to that same stderr, and printing to a
    // broken pipe panics, which would take the service down over a log line.
    // Colours only on a terminal: a log file or collector gets plain text, and the service does
    // not style the fields of every request span it will most likely never print.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .fmt_fields(JsonSpanFields)
            .try_init(),
    };
}

/// Writes a span's fields as one JSON object, straight to text.
///
/// The JSON formatter keeps each span's fields as text and parses them only when a line is
/// logged inside the span. Its own field formatter builds a map of JSON values and serializes
/// it for every span created, which for the request span of every HTTP request cost about a
/// tenth of the service's CPU time; this one writes the object directly. A field recorded again
/// later is appended, and the last value wins when the line is written, as with the map.
#[derive(Debug, Default)]
struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        // Written out at once: the span's own text then grows once, not field by field.
        let mut buffer = String::with_capacity(128);
        let mut object = JsonObject::new(&mut buffer, false);
        fields.record(&mut object);
        object.finish()?;
        writer.write_str(&buffer)
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Reopen an object with members: drop its closing brace, write the new fields after
        // them and close it again. An empty one is written anew.
        let continued = match current.fields.strip_suffix('}').map(str::len) {
            Some(open) if open > 1 => {
                current.fields.truncate(open);
                true
            }
            _ => {
                current.fields.clear();
                false
            }
        };
        let mut object = JsonObject::new(&mut current.fields, continued);
        fields.record(&mut object);
        object.finish()
    }
}

/// Visits fields, writing each as a member of a JSON object.
struct JsonObject<'a, W: fmt::Write> {
    writer: &'a mut W,
    /// Whether a member was written (or the object was reopened after some).
    continued: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> JsonObject<'a, W> {
    fn new(writer: &'a mut W, continued: bool) -> Self {
        let result = if continued {
            Ok(())
        } else {
            writer.write_char('{')
        };
        Self {
            writer,
            continued,
            result,
        }
    }

    /// Writes `"name":` and then `value`, already JSON.
    fn member(&mut self, name: &str, value: impl fmt::Display) {
        self.name(name);
        if self.result.is_ok() {
            self.result = write!(self.writer, "{value}");
        }
    }

    /// Writes `"name":` and then `value` as a JSON string.
    fn member_str(&mut self, name: &str, value: &str) {
        self.name(name);
        self.string(value);
    }

    fn name(&mut self, name: &str) {
        if self.continued && self.result.is_ok() {
            self.result = self.writer.write_char(',');
        }
        self.continued = true;
        self.string(name);
        if self.result.is_ok() {
            self.result = self.writer.write_char(':');
        }
    }

    /// `text` as a JSON string literal: as it is between quotes when nothing in it needs
    /// escaping (ids, methods, route templates, names), else as serde_json escapes it.
    fn string(&mut self, text: &str) {
        if self.result.is_err() {
            return;
        }
        let plain = text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        self.result = if plain {
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(text))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            self.writer.write_str(&json_string(text))
        };
    }

    fn finish(self) -> fmt::Result {
        self.result?;
        self.writer.write_char('}')
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    // Serializing a string cannot fail.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

impl<W: fmt::Write> Visit for JsonObject<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member_str(field.name(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those are written as strings.
        if value.is_finite() {
            self.member(field.name(), value);
        } else {
            self.member_str(field.name(), &value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member_str(field.name(), &format!("{value:?}"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The fields the service's JSON formatter keeps for a span, recorded as a span would be.
    fn formatted(record: impl FnOnce(&mut JsonObject<'_, String>)) -> serde_json::Value {
        let mut text = String::new();
        let mut object = JsonObject::new(&mut text, false);
        record(&mut object);
        object.finish().unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn span_fields_are_written_as_one_json_object_with_every_kind_of_value() {
        let value = formatted(|object| {
            object.member_str("request_id", "3f9a-\"quoted\"\n");
            object.member_str("route", "/connection/{connection_id}");
            object.member("status", 200u64);
            object.member("delta", -3i64);
            object.member("ok", true);
            object.member("ratio", 0.5);
        });
        assert_eq!(
            value,
            serde_json::json!({"request_id": "3f9a-\"quoted\"\n",
                "route": "/connection/{connection_id}", "status": 200, "delta": -3, "ok": true,
                "ratio": 0.5})
        );
        assert_eq!(formatted(|_| {}), serde_json::json!({}));
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_lists_its_spans_with_fields_recorded_later_and_the_last_value_wins() {
        use tracing::field::Empty;

        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .fmt_fields(JsonSpanFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("outer", request_id = "r-1", empty = Empty);
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner", first = Empty, second = Empty, n = 7u64);
            inner.record("first", "a");
            inner.record("second", "b \"quoted\"");
            inner.record("first", "c");
            let _inner = inner.enter();
            tracing::info!(answer = 42, "inside");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "inside");
        assert_eq!(line["answer"], 42);
        assert_eq!(
            line["spans"],
            serde_json::json!([
                {"name": "outer", "request_id": "r-1"},
                {"name": "inner", "first": "c", "second": "b \"quoted\"", "n": 7},
            ])
        );
    }
}
