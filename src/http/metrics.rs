//! `GET /metrics`: the HTTP latency histograms, the projections' lag, and the refresh service's
//! and the scheduler's counters in the Prometheus text exposition format (0.0.4), written by
//! hand: a handful of counters and histograms needs no metrics registry.
//!
//! The projection gauges are read from the checkpoints at each scrape (one query and a bounded
//! read of the log per projection); when they cannot be read, they are left out and the rest is
//! still served.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use domain::store::PoolStatus;
use projections::cache::CacheStats;

use super::observe::RequestObserver;
use crate::server::{Limit, ServerLimits, ServerStats};
use crate::state::AppState;

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

/// Writes a histogram from non-cumulative bucket counts (the last one above every bound), its
/// sum in seconds (from microseconds); `_count` is the `+Inf` bucket.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[f64],
    buckets: &[u64],
    micros: u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(buckets) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += buckets.get(bounds.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", micros as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

/// The in-memory caches' hits, misses, evictions, entries and capacity, by cache.
fn caches(out: &mut String, caches: &[(&str, CacheStats)]) {
    let labels: Vec<String> = caches
        .iter()
        .map(|(name, _)| format!("cache=\"{name}\""))
        .collect();
    let samples = |value: &dyn Fn(&CacheStats) -> u64| {
        labels
            .iter()
            .zip(caches)
            .map(|(labels, (_, stats))| (labels.as_str(), value(stats) as f64))
            .collect::<Vec<_>>()
    };
    type Family<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&CacheStats) -> u64);
    let families: [Family; 7] = [
        (
            "grantline_cache_hits_total",
            "counter",
            "Lookups answered from memory.",
            &|s| s.hits,
        ),
        (
            "grantline_cache_misses_total",
            "counter",
            "Lookups that went to the database.",
            &|s| s.misses,
        ),
        (
            "grantline_cache_evictions_total",
            "counter",
            "Entries dropped to stay within the capacity.",
            &|s| s.evictions,
        ),
        (
            "grantline_cache_entries",
            "gauge",
            "Entries held now.",
            &|s| s.entries,
        ),
        (
            "grantline_cache_capacity",
            "gauge",
            "Entries the cache may hold (0: bounded by memory).",
            &|s| s.capacity,
        ),
        (
            "grantline_cache_bytes",
            "gauge",
            "Memory its entries take now, estimated (0: not estimated).",
            &|s| s.bytes,
        ),
        (
            "grantline_cache_budget_bytes",
            "gauge",
            "Memory its entries may take (0: bounded by a number of entries).",
            &|s| s.budget_bytes,
        ),
    ];
    for (name, kind, help, value) in families {
        family(out, name, kind, help, &samples(value));
    }
}

/// The server's open connections and sockets, its caps, and what each limit refused.
fn server(out: &mut String, stats: &ServerStats, limits: &ServerLimits) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    family(
        out,
        "grantline_http_connections_open",
        "gauge",
        "HTTP connections open now (WebSockets not included).",
        &[("", load(&stats.open_connections))],
    );
    family(
        out,
        "grantline_websockets_open",
        "gauge",
        "WebSockets open now.",
        &[("", load(&stats.open_websockets))],
    );
    family(
        out,
        "grantline_server_limit",
        "gauge",
        "The server's caps (GRANTLINE_MAX_CONNECTIONS, _MAX_WEBSOCKETS, _PER_CLIENT).",
        &[
            ("limit=\"connections\"", limits.max_connections as f64),
            ("limit=\"websockets\"", limits.max_websockets as f64),
            (
                "limit=\"websockets_per_client\"",
                limits.max_websockets_per_client as f64,
            ),
        ],
    );
    let labels: Vec<String> = Limit::ALL
        .iter()
        .map(|limit| format!("limit=\"{}\"", limit.label()))
        .collect();
    family(
        out,
        "grantline_http_refused_total",
        "counter",
        "Connections, requests and WebSockets refused or closed by a limit: the connection \
         cap, a non-loopback Host in open mode, the header, idle and request timeouts, an \
         announced body over 1 MiB, the WebSocket caps, a WebSocket from an unknown origin or \
         gone idle, OAuth flows started too often by one address or past the open-flow cap.",
        &labels
            .iter()
            .zip(Limit::ALL)
            .map(|(labels, limit)| (labels.as_str(), stats.refused.get(limit) as f64))
            .collect::<Vec<_>>(),
    );
}

/// What this instance holds of the database's connections.
fn database(out: &mut String, pool: &PoolStatus) {
    family(
        out,
        "grantline_database_connections",
        "gauge",
        "Pooled database connections: the most the pool may open (on PostgreSQL the notifier \
         holds one more), open now, and idle among them.",
        &[
            ("state=\"max\"", pool.max as f64),
            ("state=\"open\"", pool.open as f64),
            ("state=\"idle\"", pool.idle as f64),
        ],
    );
    family(
        out,
        "grantline_database_waiting",
        "gauge",
        "Callers waiting for a pooled connection (they get 503 after GRANTLINE_DATABASE_POOL_WAIT).",
        &[("", pool.waiting as f64)],
    );
}

/// The projections' lag, checkpoint age and error state.
async fn projections(out: &mut String, state: &AppState) {
    let statuses = match state.runner.status().await {
        Ok(statuses) => statuses,
        Err(e) => {
            tracing::warn!(error.message = %e, "metrics: the projection status cannot be read");
            return;
        }
    };
    let now = chrono::Utc::now();
    let labels: Vec<String> = statuses
        .iter()
        .map(|s| format!("projection=\"{}\"", s.name))
        .collect();
    let samples = |value: &dyn Fn(&projections::ProjectionStatus) -> f64| {
        labels
            .iter()
            .zip(&statuses)
            .map(|(labels, s)| (labels.as_str(), value(s)))
            .collect::<Vec<_>>()
    };
    family(
        out,
        "grantline_projection_lag_events",
        "gauge",
        "Events in the log after the projection's checkpoint (counted up to 10000).",
        &samples(&|s| s.lag as f64),
    );
    // How stale the read model is: the age of the oldest event it has not applied (one event
    // read per lagging projection).
    let mut ages = Vec::new();
    for (labels, status) in labels.iter().zip(&statuses) {
        let age = if status.lag == 0 {
            Some(0.0)
        } else {
            oldest_unapplied(state, &status.checkpoint)
                .await
                .map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0)
        };
        if let Some(age) = age {
            ages.push((labels.as_str(), age));
        }
    }
    family(
        out,
        "grantline_projection_checkpoint_age_seconds",
        "gauge",
        "Age of the oldest event the projection has not applied yet; 0 when caught up.",
        &ages,
    );
    family(
        out,
        "grantline_projection_failing",
        "gauge",
        "1 when the projection's last step failed (see grantline projections status).",
        &samples(&|s| f64::from(u8::from(s.last_error.is_some()))),
    );
    match state.backend.horizon_age_seconds().await {
        Ok(None) => {}
        Ok(Some(age)) => family(
            out,
            "grantline_log_horizon_age_seconds",
            "gauge",
            "Age of the oldest open transaction holding an xid in the cluster: log readers \
             (projections, caches, webhooks) cannot see events committed after it started.",
            &[("", age)],
        ),
        Err(e) => {
            tracing::warn!(error.message = %e, "metrics: the log horizon cannot be read");
        }
    }
    family(
        out,
        "grantline_projection_head_position",
        "gauge",
        "The highest global position in the event log.",
        &[("", statuses.first().map_or(0.0, |s| s.head_position as f64))],
    );
}

/// When the first event after `checkpoint` (`commit:global`) was recorded.
async fn oldest_unapplied(
    state: &AppState,
    checkpoint: &str,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let (commit, global) = checkpoint.split_once(':')?;
    let after = domain::store::Position {
        commit: commit.parse().ok()?,
        global: global.parse().ok()?,
    };
    let events = state.backend.events().read_all(after, 1).await.ok()?;
    events.first().map(|event| event.recorded_at)
}

/// The metrics text: HTTP latency, projections, the log horizon, the refresh service, the
/// scheduler and webhooks, in the Prometheus text format (0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4",
            body = String),
    ),
)]
pub async fn metrics(
    State(state): State<AppState>,
    State(requests): State<Arc<RequestObserver>>,
) -> impl IntoResponse {
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
            ("trigger=\"rejected\"", calls[3] as f64),
        ],
    );
    let mut outcome_samples = Vec::new();
    for (t, trigger) in ["read", "schedule", "force", "rejected"].iter().enumerate() {
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
    compactor_families(&mut out, state.compactor.counters());
    proxy_families(
        &mut out,
        &state.proxy_stats.snapshot(),
        state.proxy_stats.unrecorded(),
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
    histogram(
        &mut out,
        "grantline_scheduler_tick_duration_seconds",
        "Duration of completed refresh scheduler ticks.",
        &workers::scheduler::TICK_BUCKETS,
        &scheduler.tick_buckets.each_ref().map(load),
        load(&scheduler.tick_micros),
    );
    family(
        &mut out,
        "grantline_scheduler_last_tick_duration_seconds",
        "gauge",
        "Duration of the last completed refresh scheduler tick.",
        &[("", load(&scheduler.last_tick_micros) as f64 / 1e6)],
    );
    family(
        &mut out,
        "grantline_scheduler_last_tick_timestamp_seconds",
        "gauge",
        "When the last refresh scheduler tick finished (0: never).",
        &[("", scheduler.last_tick_unix.load(Ordering::Relaxed) as f64)],
    );
    family(
        &mut out,
        "grantline_scheduler_due_total",
        "counter",
        "Connections the scheduler found due, by why: in use (read within \
         GRANTLINE_REFRESH_ACTIVE_FOR) and expiring within GRANTLINE_REFRESH_WINDOW, or a \
         keep-alive of a refresh token unused for its provider's keep-alive age.",
        &[
            (
                "reason=\"in_use_expiring\"",
                load(&scheduler.due_expiring) as f64,
            ),
            (
                "reason=\"keep_alive\"",
                load(&scheduler.due_keep_alive) as f64,
            ),
        ],
    );
    family(
        &mut out,
        "grantline_scheduler_budget_waits_total",
        "counter",
        "Scheduled refreshes that waited for their integration's budget (GRANTLINE_REFRESH_RATE).",
        &[("", load(&scheduler.budget_waits) as f64)],
    );
    family(
        &mut out,
        "grantline_scheduler_budget_wait_seconds_total",
        "counter",
        "Time scheduled refreshes spent waiting for their integration's budget.",
        &[("", load(&scheduler.budget_wait_micros) as f64 / 1e6)],
    );
    let policy = state.scheduler.policy();
    family(
        &mut out,
        "grantline_refresh_policy_seconds",
        "gauge",
        "The refresh policy: the read margin, the scheduler's window for connections in use, how \
         recently a read makes a connection in use, and the default keep-alive age.",
        &[
            (
                "setting=\"margin\"",
                state.config.refresh.margin.as_secs_f64(),
            ),
            ("setting=\"window\"", policy.window.as_secs_f64()),
            ("setting=\"active_for\"", policy.active_for.as_secs_f64()),
            ("setting=\"idle_after\"", policy.idle_after.as_secs_f64()),
        ],
    );
    let keep_alive: Vec<(String, f64)> = policy
        .keep_alive
        .iter()
        .map(|(provider, age)| (label("provider", provider), age.as_secs_f64()))
        .collect();
    family(
        &mut out,
        "grantline_refresh_keep_alive_seconds",
        "gauge",
        "Keep-alive age of the providers whose templates document an unused refresh token's \
         lifetime (half of it).",
        &keep_alive
            .iter()
            .map(|(labels, age)| (labels.as_str(), *age))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "grantline_refresh_budget_per_second",
        "gauge",
        "Scheduled refreshes per second per integration (0: unpaced).",
        &[("", policy.budget.map_or(0.0, |rate| f64::from(rate.get())))],
    );
    let activity = state.activity.stats();
    family(
        &mut out,
        "grantline_read_activity_total",
        "counter",
        "Reads noted for the scheduler (the first read of each cached copy of a connection), \
         written to the database (one per connection and flush), or dropped because too many \
         were waiting.",
        &[
            ("result=\"noted\"", activity.noted as f64),
            ("result=\"written\"", activity.written as f64),
            ("result=\"dropped\"", activity.dropped as f64),
        ],
    );
    family(
        &mut out,
        "grantline_read_activity_flush_errors_total",
        "counter",
        "Batches of noted reads that could not be written (kept for the next batch).",
        &[("", activity.flush_errors as f64)],
    );
    family(
        &mut out,
        "grantline_read_activity_pending",
        "gauge",
        "Noted reads waiting to be written.",
        &[("", activity.pending as f64)],
    );
    let since = chrono::Duration::from_std(policy.active_for)
        .ok()
        .and_then(|span| chrono::Utc::now().checked_sub_signed(span));
    if let Some(since) = since
        && let Ok(in_use) = state.read_models.store().count_reads(since).await
    {
        family(
            &mut out,
            "grantline_connections_in_use",
            "gauge",
            "Connections read within GRANTLINE_REFRESH_ACTIVE_FOR (by any instance, as written \
             so far): the ones the scheduler refreshes ahead of expiry.",
            &[("", in_use as f64)],
        );
    }
    if let Some(webhooks) = &state.webhooks {
        let counters = webhooks.counters();
        family(
            &mut out,
            "grantline_webhook_deliveries_total",
            "counter",
            "Webhook delivery attempts by this instance, by result.",
            &[
                ("result=\"delivered\"", load(&counters.delivered) as f64),
                ("result=\"failed\"", load(&counters.failed_attempts) as f64),
            ],
        );
    }
    caches(
        &mut out,
        &[
            ("connections", state.cache.stats()),
            ("data_keys", state.commands.vault().cache_stats()),
        ],
    );
    requests.render(&mut out);
    server(&mut out, &state.server_stats, &state.config.limits);
    database(&mut out, &state.backend.pool_status());
    projections(&mut out, &state).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out)
}

/// The compactor's totals (all 0 on an instance without the `compactor` role).
fn as_refs(samples: &[(String, f64)]) -> Vec<(&str, f64)> {
    samples.iter().map(|(l, v)| (l.as_str(), *v)).collect()
}

/// `name="value"`, the value escaped as the text format asks.
fn label(name: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{name}=\"{escaped}\"")
}

/// The proxy's counters and latency histogram, by integration, and what was not counted apart.
fn proxy_families(
    out: &mut String,
    stats: &[(String, crate::proxy::IntegrationStats)],
    unrecorded: u64,
) {
    let label = |key: &str| label("provider_config_key", key);
    let classes = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];
    let calls: Vec<(String, f64)> = stats
        .iter()
        .flat_map(|(key, s)| {
            classes
                .iter()
                .zip(s.calls)
                .filter(|(_, n)| *n > 0)
                .map(move |(class, n)| (format!("{},status=\"{class}\"", label(key)), n as f64))
        })
        .collect();
    let per_key = |value: fn(&crate::proxy::IntegrationStats) -> f64| {
        stats
            .iter()
            .map(|(key, s)| (label(key), value(s)))
            .collect::<Vec<_>>()
    };
    family(
        out,
        "grantline_proxy_calls_total",
        "counter",
        "Proxied calls by integration and the provider's status class (none: no answer).",
        &as_refs(&calls),
    );
    family(
        out,
        "grantline_proxy_seconds_total",
        "counter",
        "Time spent in proxied calls until the provider's answer began, by integration.",
        &as_refs(&per_key(|s| s.micros as f64 / 1e6)),
    );
    proxy_histogram(out, stats, &label);
    family(
        out,
        "grantline_proxy_unrecorded_total",
        "counter",
        "Proxied calls, retries and refreshes of integrations past the first 1000 seen, not \
         counted by integration.",
        &[("", unrecorded as f64)],
    );
    family(
        out,
        "grantline_proxy_retries_total",
        "counter",
        "Proxied calls sent again after a network error, 5xx, 429 or a Retry-On status.",
        &as_refs(&per_key(|s| s.retries as f64)),
    );
    family(
        out,
        "grantline_proxy_rejected_refreshes_total",
        "counter",
        "Upstream 401s answered by a fenced refresh and one more attempt.",
        &as_refs(&per_key(|s| s.rejected as f64)),
    );
    family(
        out,
        "grantline_proxy_broken_total",
        "counter",
        "Provider answers that broke off after their body had begun (the caller's answer \
         breaks off too).",
        &as_refs(&per_key(|s| s.broken as f64)),
    );
}

/// `grantline_proxy_request_duration_seconds`: proxied calls by duration (until the
/// provider's answer began, retries included), by integration.
fn proxy_histogram(
    out: &mut String,
    stats: &[(String, crate::proxy::IntegrationStats)],
    label: &dyn Fn(&str) -> String,
) {
    const NAME: &str = "grantline_proxy_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {NAME} Proxied calls by duration until the provider's answer began (retries \
         included), by integration."
    );
    let _ = writeln!(out, "# TYPE {NAME} histogram");
    for (key, s) in stats {
        let labels = label(key);
        let mut cumulative = 0;
        for ((_, le), count) in crate::proxy::DURATION_BUCKETS.iter().zip(&s.buckets) {
            cumulative += count;
            let _ = writeln!(out, "{NAME}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        cumulative += s.buckets.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{NAME}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{NAME}_sum{{{labels}}} {}", s.micros as f64 / 1e6);
        let _ = writeln!(out, "{NAME}_count{{{labels}}} {cumulative}");
    }
}

fn compactor_families(out: &mut String, compactor: &workers::compactor::CompactorCounters) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    family(
        out,
        "grantline_compactor_passes_total",
        "counter",
        "Compaction passes finished, and passes that stopped on an error.",
        &[
            ("result=\"finished\"", load(&compactor.passes) as f64),
            ("result=\"error\"", load(&compactor.errors) as f64),
        ],
    );
    family(
        out,
        "grantline_compactor_removed_total",
        "counter",
        "What compaction removed from the history: routine refresh cycles (two events each) \
         and lifecycle events.",
        &[
            (
                "kind=\"routine_cycles\"",
                load(&compactor.routine_cycles) as f64,
            ),
            (
                "kind=\"lifecycle_events\"",
                load(&compactor.lifecycle_events) as f64,
            ),
            ("kind=\"events\"", load(&compactor.events_removed) as f64),
        ],
    );
    family(
        out,
        "grantline_compactor_last_pass_timestamp_seconds",
        "gauge",
        "When the last compaction pass finished (0: never).",
        &[("", load(&compactor.last_pass_at) as f64)],
    );
}

#[cfg(test)]
mod tests {
    /// A provider template's name goes into a label: quotes, backslashes and line breaks stay
    /// inside the value (a raw one broke the scrape or added lines of its own).
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            super::label("provider", "evil\"} 1\ninjected 9\\"),
            r#"provider="evil\"} 1\ninjected 9\\""#
        );
    }
}
