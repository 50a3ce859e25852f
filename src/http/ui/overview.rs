//! The overview: connections by health, refresh outcomes over the last day per integration, and
//! how the loops that follow the log are doing (projections, webhooks, the scheduler, the
//! instances seen in the log).
//!
//! Counting every connection and reading a day of the log are the two costly parts: their
//! result is kept for [`FRESH_FOR`] on this instance, so reloading the page costs nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Timelike, Utc};
use maud::{PreEscaped, html};
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

/// The last counted figures of this instance.
#[derive(Debug, Default)]
pub struct Cache(Mutex<Option<(Instant, Figures)>>);

/// What is counted for the overview.
#[derive(Clone, Debug)]
pub struct Figures {
    counted_at: DateTime<Utc>,
    health: HealthCounts,
    activity: RefreshActivity,
}

impl Cache {
    async fn figures(&self, state: &AppState) -> Result<Figures, Refusal> {
        if let Some((at, figures)) = &*self.0.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < FRESH_FOR
        {
            return Ok(figures.clone());
        }
        let now = Utc::now();
        let idle_since = now
            - chrono::Duration::from_std(state.scheduler.policy().active_for)
                .unwrap_or(chrono::Duration::days(1));
        let health = queries::health_counts(&state.read_models, now + SOON, idle_since)
            .await
            .map_err(Refusal::api)?;
        let activity =
            queries::refresh_activity(&state.read_models, now - chrono::Duration::hours(24))
                .await
                .map_err(Refusal::api)?;
        let figures = Figures {
            counted_at: now,
            health,
            activity,
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), figures.clone()));
        Ok(figures)
    }
}

/// Refresh outcomes per hour (the last 24, oldest first) in all and per integration.
fn by_hour(activity: &RefreshActivity, now: DateTime<Utc>) -> (Hours, BTreeMap<&str, (i64, i64)>) {
    let this_hour = now
        .with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    let mut hours = [(0, 0); 24];
    let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for bucket in &activity.buckets {
        let ago = (this_hour - bucket.hour).num_hours();
        if let Ok(ago) = usize::try_from(ago)
            && ago < 24
        {
            let slot = &mut hours[23 - ago];
            slot.0 += bucket.refreshed;
            slot.1 += bucket.failed;
        }
        let total = totals.entry(&bucket.provider_config_key).or_default();
        total.0 += bucket.refreshed;
        total.1 += bucket.failed;
    }
    (hours, totals)
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
    let (hours, per_integration) = by_hour(&figures.activity, Utc::now());
    let svg = chart::hourly(&hours, (720, 220));
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
        ("idle", "Idle (not read lately)", h.idle, None),
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
            p.muted { "Counted " (relative(figures.counted_at)) " (kept for 15 s)." }
        }
        section aria-labelledby="refreshes" {
            h2 #refreshes { "Refreshes over the last 24 hours" }
            @if !svg.is_empty() {
                figure.chart role="img" aria-label="Refreshes per hour: successful in green, failed in red" {
                    (PreEscaped(svg))
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
                    tbody { @for (key, (ok, failed)) in &per_integration { tr {
                        th scope="row" { (key) }
                        td.num { (ok) }
                        td.num { (failed) }
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
