//! Logging: `tracing` to stderr, as text or JSON (`GRANTLINE_LOG_FORMAT`), filtered by
//! `RUST_LOG` (default `info` for the service, `warn` for the command-line tools, whose output is
//! their answer).
//!
//! In JSON every line is one object: `timestamp`, `level`, `target`, the event's fields at the top
//! (`message`, `connection_id`, …) and `spans`, the list of spans the line was logged in, outermost
//! first, each with its `name` and fields. A line logged while a request is handled lists the
//! request first, as a span `http.request` with its `request_id`, `method` and `route` (see
//! [`crate::http::observe`] and [`WithRequest`]); in text, the same spans prefix the line.
//!
//! Secrets never reach a log line: token, key and secret types redact themselves, spans and
//! events carry ids and route templates, never credentials, request URLs with their query, or
//! headers. Dependencies' own logging is capped at `info` unless `RUST_LOG` names the dependency:
//! at `debug`, the database driver logs statement parameters.

use std::fmt;
use std::io::IsTerminal;

use domain::log_scope::{self, RequestLog};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Directive;
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.event_format(text_lines(ansi)).try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonSpanFields)
            .event_format(json_lines())
            .try_init(),
    };
}

/// Text lines: `tracing-subscriber`'s full format, with the request first among the spans.
fn text_lines(ansi: bool) -> WithRequest<Format<Full>> {
    WithRequest {
        inner: tracing_subscriber::fmt::format().with_ansi(ansi),
        json: false,
    }
}

/// JSON lines: `tracing-subscriber`'s JSON format, the event's fields at the top and the list of
/// spans without the current one repeated, with the request first in that list.
fn json_lines() -> WithRequest<Format<Json>> {
    WithRequest {
        inner: tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true),
        json: true,
    }
}

/// The name a request has among the spans of a line.
const REQUEST_SPAN: &str = "http.request";

/// Lists the request a line was logged for ([`domain::log_scope`]) as its outermost span, named
/// [`REQUEST_SPAN`] with the fields `request_id`, `method` and `route`, as if it were a
/// `tracing` span around everything else.
///
/// A line logged outside any request is written by `inner` as it is. One logged for a request
/// is written by `inner` to a buffer first, and the request is put in: at the head of the JSON
/// `spans` list (which is added when the line has no other span), or in text right after the
/// level, where the spans begin.
struct WithRequest<E> {
    inner: E,
    json: bool,
}

impl<S, N, E> FormatEvent<S, N> for WithRequest<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'writer> FormatFields<'writer> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(request) = log_scope::current() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        if self.json {
            put_json(&mut line, &request)?;
        } else {
            let other_spans = ctx.event_scope().is_some();
            put_text(&mut line, &request, other_spans, *event.metadata().level());
        }
        writer.write_str(&line)
    }
}

/// Puts `request` first in the `spans` of the JSON object on `line`.
fn put_json(line: &mut String, request: &RequestLog) -> fmt::Result {
    let mut span = String::with_capacity(128);
    let mut object = JsonObject::new(&mut span, false);
    object.member_str("request_id", &request.request_id);
    object.member_str("method", &request.method);
    object.member_str("route", &request.route);
    object.member_str("name", REQUEST_SPAN);
    object.finish()?;
    // A string's quotes are escaped inside it, so this text can only be the key itself.
    const SPANS: &str = "\"spans\":[";
    match line.find(SPANS) {
        Some(at) => {
            span.push(',');
            line.insert_str(at + SPANS.len(), &span);
        }
        None => {
            let end = line.rfind('}').unwrap_or(line.len());
            line.insert_str(end, &format!(",{}{span}]", SPANS));
        }
    }
    Ok(())
}

/// Puts `request` first among the spans of the text `line`, logged at `level`.
fn put_text(line: &mut String, request: &RequestLog, other_spans: bool, level: Level) {
    let mut span = format!(
        "{REQUEST_SPAN}{{request_id={:?} method={:?} route={:?}}}:",
        &*request.request_id, &*request.method, &*request.route
    );
    if !other_spans {
        span.push(' ');
    }
    // The line starts with the timestamp and the level, padded to five characters and maybe
    // coloured, then a space; a timestamp holds no level's name.
    let name = match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    };
    let at = line.find(name).map_or(0, |start| {
        let rest = &line[start + name.len()..];
        // Past the colour's reset, if any, and the space.
        let after_colour = rest.find(' ').unwrap_or(rest.len());
        start + name.len() + (after_colour + 1).min(rest.len())
    });
    line.insert_str(at, &span);
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

    /// What `log` writes through the service's formatter (`json` or text, with `ansi`), as the
    /// lines written inside a request and outside any.
    fn logged_in_request(json: bool, ansi: bool, log: impl Fn()) -> (String, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(ansi);
        let dispatch = if json {
            tracing::Dispatch::new(
                builder
                    .fmt_fields(JsonSpanFields)
                    .event_format(json_lines())
                    .finish(),
            )
        } else {
            tracing::Dispatch::new(builder.event_format(text_lines(ansi)).finish())
        };
        let text = |captured: &Captured| {
            let bytes = std::mem::take(&mut *captured.0.lock().unwrap());
            String::from_utf8(bytes).unwrap()
        };
        let request = std::sync::Arc::new(RequestLog {
            request_id: "3f9a1c2b-1a".into(),
            method: "GET".into(),
            route: std::sync::Arc::from("/connection/{connection_id}"),
        });
        tracing::dispatcher::with_default(&dispatch, || log_scope::within(&request, &log));
        let inside = text(&captured);
        tracing::dispatcher::with_default(&dispatch, &log);
        (inside, text(&captured))
    }

    #[test]
    fn a_json_line_logged_for_a_request_lists_it_first_among_its_spans() {
        let (inside, outside) = logged_in_request(true, false, || {
            tracing::info!(answer = 42, "alone");
            let span = tracing::info_span!("store.append", stream_id = "connection-1");
            let _entered = span.enter();
            tracing::warn!("in a span");
        });
        let lines: Vec<serde_json::Value> = inside
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        let request = serde_json::json!({"name": "http.request", "request_id": "3f9a1c2b-1a",
            "method": "GET", "route": "/connection/{connection_id}"});
        assert_eq!(lines[0]["message"], "alone");
        assert_eq!(lines[0]["answer"], 42);
        assert_eq!(lines[0]["spans"], serde_json::json!([request]));
        assert_eq!(lines[1]["message"], "in a span");
        assert_eq!(
            lines[1]["spans"],
            serde_json::json!([request, {"name": "store.append", "stream_id": "connection-1"}])
        );
        // Outside a request, the lines are as the formatter writes them.
        let lines: Vec<serde_json::Value> = outside
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert!(lines[0].get("spans").is_none(), "{}", lines[0]);
        assert_eq!(
            lines[1]["spans"],
            serde_json::json!([{"name": "store.append", "stream_id": "connection-1"}])
        );
    }

    #[test]
    fn a_text_line_logged_for_a_request_names_it_where_the_spans_begin() {
        let log = || {
            tracing::info!(answer = 42, "alone");
            let span = tracing::info_span!("store.append", stream_id = "connection-1");
            let _entered = span.enter();
            tracing::error!("in a span");
        };
        let request = r#"http.request{request_id="3f9a1c2b-1a" method="GET" route="/connection/{connection_id}"}:"#;
        let (inside, outside) = logged_in_request(false, false, log);
        let lines: Vec<&str> = inside.lines().collect();
        let (_, after_time) = lines[0].split_once(' ').unwrap();
        assert!(
            after_time.starts_with(&format!(" INFO {request} grantline::telemetry::tests: ")),
            "{after_time:?}"
        );
        let (_, after_time) = lines[1].split_once(' ').unwrap();
        assert_eq!(
            after_time,
            format!(
                "ERROR {request}store.append{{stream_id=\"connection-1\"}}: \
                 grantline::telemetry::tests: in a span"
            )
        );
        assert!(!outside.contains("http.request"), "{outside}");
        // Coloured for a terminal, the request still comes after the level.
        let (inside, _) = logged_in_request(false, true, log);
        for line in inside.lines() {
            let level = line.find("INFO").or_else(|| line.find("ERROR")).unwrap();
            let at = line.find(request).unwrap_or_else(|| panic!("{line:?}"));
            assert!(level < at && line[level..at].ends_with(' '), "{line:?}");
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
