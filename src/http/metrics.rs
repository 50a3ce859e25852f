//! `GET /metrics`: the refresh service's and the scheduler's counters in the Prometheus text
//! exposition format (0.0.4), written by hand: a handful of counters needs no metrics registry.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::startup::AppState;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes one metric family: its help and type lines, then `(labels, value)` samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = if labels.is_empty() {
            writeln!(out, "{name} {value}")
        } else {
            writeln!(out, "{name}{{{labels}}} {value}")
        };
    }
}

/// Writes a summary with only its `_sum` (seconds, from microseconds) and `_count`.
fn summary(out: &mut String, name: &str, help: &str, micros: u64, count: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} summary");
    let _ = writeln!(out, "{name}_sum {}", micros as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {count}");
}

/// The metrics text.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let refresh = state.refresh.counters();
    let calls = refresh.provider_calls.each_ref().map(load);
    let outcomes = refresh
        .outcomes
        .each_ref()
        .map(|row| row.each_ref().map(load));
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "grantline_refresh_provider_calls_total",
        "counter",
        "Refresh requests sent to providers, by trigger.",
        &[
            ("trigger=\"read\"", calls[0] as f64),
            ("trigger=\"schedule\"", calls[1] as f64),
            ("trigger=\"force\"", calls[2] as f64),
        ],
    );
    let mut outcome_samples = Vec::new();
    for (t, trigger) in ["read", "schedule", "force"].iter().enumerate() {
        for (o, outcome) in [
            "refreshed",
            "failed_permanent",
            "failed_transient",
            "lease_lost",
        ]
        .iter()
        .enumerate()
        {
            outcome_samples.push((
                format!("trigger=\"{trigger}\",outcome=\"{outcome}\""),
                outcomes[t][o] as f64,
            ));
        }
    }
    family(
        &mut out,
        "grantline_refresh_outcomes_total",
        "counter",
        "Refresh outcomes by trigger: appended (refreshed, failed permanently or transiently) \
         or dropped because the lease was lost.",
        &outcome_samples
            .iter()
            .map(|(labels, value)| (labels.as_str(), *value))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "grantline_refresh_lease_waits_total",
        "counter",
        "Waits on a refresh lease held by another refresher.",
        &[("", load(&refresh.lease_waits) as f64)],
    );
    family(
        &mut out,
        "grantline_refresh_joins_total",
        "counter",
        "Callers that joined a refresh already running in this process.",
        &[("", load(&refresh.joined) as f64)],
    );
    summary(
        &mut out,
        "grantline_refresh_provider_duration_seconds",
        "Time spent in provider refresh calls.",
        load(&refresh.provider_micros),
        calls.iter().sum(),
    );
    let scheduler = state.scheduler.counters();
    let ticks = load(&scheduler.ticks);
    family(
        &mut out,
        "grantline_scheduler_ticks_total",
        "counter",
        "Refresh scheduler ticks run.",
        &[("", ticks as f64)],
    );
    family(
        &mut out,
        "grantline_scheduler_tick_errors_total",
        "counter",
        "Refresh scheduler ticks that could not list the due connections.",
        &[("", load(&scheduler.tick_errors) as f64)],
    );
    family(
        &mut out,
        "grantline_scheduler_connections_total",
        "counter",
        "Connections the scheduler found due, and what became of them.",
        &[
            ("result=\"due\"", load(&scheduler.due) as f64),
            ("result=\"refreshed\"", load(&scheduler.refreshed) as f64),
            ("result=\"failed\"", load(&scheduler.failed) as f64),
            ("result=\"skipped\"", load(&scheduler.skipped) as f64),
        ],
    );
    summary(
        &mut out,
        "grantline_scheduler_tick_duration_seconds",
        "Duration of completed refresh scheduler ticks.",
        load(&scheduler.tick_micros),
        ticks.saturating_sub(load(&scheduler.tick_errors)),
    );
    family(
        &mut out,
        "grantline_scheduler_last_tick_timestamp_seconds",
        "gauge",
        "When the last refresh scheduler tick finished (0: never).",
        &[("", scheduler.last_tick_unix.load(Ordering::Relaxed) as f64)],
    );
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out)
}
