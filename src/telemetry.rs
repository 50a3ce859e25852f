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

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

use crate::config::LogFormat;

/// Dependencies whose debug or trace output may show request or statement contents.
const QUIET_DEPENDENCIES: [&str; 5] = ["tokio_postgres", "hyper", "hyper_util", "reqwest", "h2"];

/// Installs the global subscriber once (logging at `info` unless `RUST_LOG` says otherwise);
/// later calls are ignored.
pub fn init(format: LogFormat) {
    init_at(format, "info");
}

/// Like [`init`] for the command-line tools: `warn` unless `RUST_LOG` says otherwise, so that
/// start-up chatter (migrations, catalog) does not bury their answer.
pub fn init_tool() {
    init_at(LogFormat::Text, "warn");
}

fn init_at(format: LogFormat, default: &str) {
    let configured = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = Some(configured.trim())
        .filter(|directives| !directives.is_empty())
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    for dependency in QUIET_DEPENDENCIES {
        if !configured.contains(dependency)
            && let Ok(directive) = format!("{dependency}=info").parse::<Directive>()
        {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}
