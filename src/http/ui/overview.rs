//! The overview: connections by health, refresh outcomes over the last day per integration, and
//! how the loops that follow the log are doing (projections, webhooks, the scheduler, the
//! instances seen in the log).
//!
//! Counting every connection and reading a day of the log are the two costly parts (seconds at
//! a million connections): only the first view waits for them; after that a view shows the last
//! figures at once and, when they are older than [`FRESH_FOR`], counts again in the background.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Timelike, Utc};
use maud::{PreEscaped, html};
use projections::ProjectionError;
use projections::queries::{self, HealthCounts, RefreshActivity};

use super::Refusal;
use super::chart::{self, Hours};
use super::layout::{Nav, page, relative};
use super::session::Viewer;
use crate::http::HttpState;
use crate::state::AppState;

/// How long counted figures are shown before they are counted again.
const FRESH_FOR: Duration = Duration::from_secs(15);
/// What the overview calls "expiring soon".
const SOON: chrono::Duration = chrono::Duration::minutes(30);

/// The last counted figures of this instance, and whether a count is running.
#[derive(Debug, Default)]
pub struct Cache(Arc<Mutex<Counted>>);

#[derive(Debug, Default)]
struct Counted {
    figures: Option<(Instant, Figures)>,
    counting: bool,
}

/// What is counted for the overview.
#[derive(Clone, Debug)]
pub struct Figures {
    counted_at: DateTime<Utc>,
    health: HealthCounts,
    activity: RefreshActivity,
}

impl Cache {
    /// The figures: counted now the first time; later, the last ones at once, counted again in
    /// the background when older than [`FRESH_FOR`] (a count reads every connection).
    async fn figures(&self, state: &AppState) -> Result<Figures, Refusal> {
        {
            let mut counted = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, figures)) = &counted.figures {
                let figures = figures.clone();
                if at.elapsed() >= FRESH_FOR && !counted.counting {
                    counted.counting = true;
                    let (cache, state) = (self.0.clone(), state.clone());
                    tokio::spawn(async move {
                        let fresh = count(&state).await;
                        let mut counted = cache.lock().unwrap_or_else(|p| p.into_inner());
                        counted.counting = false;
                        match fresh {
                            Ok(figures) => counted.figures = Some((Instant::now(), figures)),
                            Err(e) => tracing::warn!(error.message = %e, "overview count failed"),
                        }
                    });
                }
                return Ok(figures);
            }
        }
        let figures = count(state).await.map_err(Refusal::api)?;
        self.0.lock().unwrap_or_else(|p| p.into_inner()).figures =
            Some((Instant::now(), figures.clone()));
        Ok(figures)
    }
}

/// Counts the connections by health and reads the last day's refresh outcomes.
async fn count(state: &AppState) -> Result<Figures, ProjectionError> {
    let now = Utc::now();
    let idle_since = now
        - chrono::Duration::from_std(state.scheduler.policy().active_for)
            .unwrap_or(chrono::Duration::days(1));
    let health = queries::health_counts(&state.read_models, now + SOON, idle_since).await?;
    let activity =
        queries::refresh_activity(&state.read_models, now - chrono::Duration::hours(24)).await?;
    Ok(Figures {
        counted_at: now,
        health,
        activity,
    })
}

/// The most integrations that get a chart of their own (the busiest); the table lists all.
const CHARTS: usize = 6;

/// One integration's refresh outcomes over the last day.
struct Integration<'a> {
    key: &'a str,
    hours: Hours,
    refreshed: i64,
    failed: i64,
}

/// Refresh outcomes per integration and hour (the last 24, oldest first), busiest first.
fn by_integration(activity: &RefreshActivity, now: DateTime<Utc>) -> Vec<Integration<'_>> {
    let this_hour = now
        .with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    let mut integrations: BTreeMap<&str, Integration<'_>> = BTreeMap::new();
    for bucket in &activity.buckets {
        let key = bucket.provider_config_key.as_str();
        let integration = integrations.entry(key).or_insert_with(|| Integration {
            key,
            hours: [(0, 0); 24],
            refreshed: 0,
            failed: 0,
        });
        let ago = (this_hour - bucket.hour).num_hours();
        if let Ok(ago) = usize::try_from(ago)
            && ago < 24
        {
            let slot = &mut integration.hours[23 - ago];
            slot.0 += bucket.refreshed;
            slot.1 += bucket.failed;
        }
        integration.refreshed += bucket.refreshed;
        integration.failed += bucket.failed;
    }
    let mut integrations: Vec<Integration<'_>> = integrations.into_values().collect();
    integrations.sort_by_key(|i| std::cmp::Reverse(i.refreshed + i.failed));
    integrations
}

/// `GET /ui/`.
pub async fn overview(State(state): State<HttpState>, viewer: Viewer) -> Result<Response, Refusal> {
    let figures = state.ui.overview.figures(&state.app).await?;
    let projections = state.app.runner.status().await.map_err(Refusal::api)?;
    let webhook_backlog = match &state.app.webhooks {
        Some(webhooks) => Some(
            webhooks
                .status(0)
                .await
                .map_err(Refusal::api)?
                .iter()
                .map(|t| t.lag)
                .sum::<i64>(),
        ),
        None => None,
    };
    let last_tick = state
        .app
        .scheduler
        .counters()
        .last_tick_unix
        .load(Ordering::Relaxed);
    let last_tick = (last_tick > 0)
        .then(|| DateTime::from_timestamp(last_tick, 0))
        .flatten();
    let per_integration = by_integration(&figures.activity, Utc::now());
    let charts: Vec<(&str, String)> = per_integration
        .iter()
        .take(CHARTS)
        .map(|i| (i.key, chart::hourly(&i.hours, (460, 170))))
        .filter(|(_, svg)| !svg.is_empty())
        .collect();
    let h = figures.health;
    let tiles = [
        ("valid", "Valid", h.valid, None),
        (
            "expiring",
            "Expiring within 30 min",
            h.expiring,
            Some("expiring"),
        ),
        (
            "retrying",
            "Refresh failing, retrying",
            h.retrying,
            Some("retrying"),
        ),
        ("failed", "Failed for good", h.failed, Some("failed")),
        ("idle", "Idle (not read lately)", h.idle, Some("idle")),
    ];
    let body = html! {
        section aria-labelledby="health" {
            h2 #health { "Connections by health" }
            ul.tiles {
                @for (class, name, count, filter) in tiles {
                    li {
                        @match filter {
                            Some(filter) => a href=(format!("/ui/connections?health={filter}")) {
                                span.n { (count) } span.badge.(class) { (name) } },
                            None => { span.n { (count) } span.badge.(class) { (name) } },
                        }
                    }
                }
            }
            p.muted { "Counted " (relative(figures.counted_at)) "; counted again in the background
                when a view finds them older than 15 s." }
        }
        section aria-labelledby="refreshes" {
            h2 #refreshes { "Refreshes over the last 24 hours" }
            div.charts {
                @for (key, svg) in &charts {
                    figure.chart {
                        div role="img" aria-label=(format!("{key}: refreshes per hour, successful in green, failed in red")) {
                            (PreEscaped(svg))
                        }
                        figcaption { (key) }
                    }
                }
            }
            @if per_integration.is_empty() {
                p.muted { "No refresh in the last 24 hours." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" { "Integration" }
                        th scope="col" class="num" { "Refreshed" }
                        th scope="col" class="num" { "Failed" }
                    } }
                    tbody { @for i in &per_integration { tr {
                        th scope="row" { (i.key) }
                        td.num { (i.refreshed) }
                        td.num { (i.failed) }
                    } } }
                }
            }
        }
        section aria-labelledby="loops" {
            h2 #loops { "Background work" }
            dl.facts {
                @for p in &projections {
                    dt { "Projection " (p.name) }
                    dd { (p.lag) " events behind"
                        @if p.caught_up { " " span.badge.ok { "caught up" } }
                        @if let Some(error) = &p.last_error { " " span.error { (error) } } }
                }
                dt { "Webhook backlog" }
                dd { @match webhook_backlog {
                    Some(lag) => { (lag) " events" },
                    None => span.muted { "no webhook target on this instance" },
                } }
                dt { "Scheduler's last tick" }
                dd { @match last_tick {
                    Some(at) => (relative(at)),
                    None => span.muted { "not run on this instance yet" },
                } }
                dt { "Instances in the log (24 h)" }
                dd { @if figures.activity.instances.is_empty() { span.muted { "none named" } }
                    @for name in &figures.activity.instances { code { (name) } " " } }
            }
        }
    };
    Ok(page("Overview", Nav::Overview, Some(&viewer), body).into_response())
}
