//! Operations: the projections (checkpoint, lag, a rebuild with live progress), the webhook
//! targets and their latest deliveries, and the encryption keys in use.
//!
//! A rebuild started here runs in the background on this instance (the runner takes a lock, so
//! two rebuilds of one projection never overlap across instances); the page reloads itself every
//! second while one runs, so its progress shows without JavaScript.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::html;

use super::layout::{Nav, csrf, moment, page_with, relative};
use super::session::Viewer;
use super::{Action, Posted, Refusal};
use crate::http::{HttpState, Routes};
use crate::state::AppState;

/// How many of a webhook target's latest deliveries are shown.
const RECENT_DELIVERIES: usize = 10;

pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/ui/operations", get(operations))
        .route("/ui/operations/rebuild/{name}", post(rebuild))
        .route("/ui/operations/webhooks/retry", post(retry_webhooks))
}

/// The rebuilds started from this instance's dashboard, by projection.
#[derive(Debug, Default)]
pub struct Rebuilds(Mutex<BTreeMap<String, Arc<Rebuild>>>);

/// One rebuild: its progress while it runs, its outcome once done.
#[derive(Debug)]
pub struct Rebuild {
    started: Instant,
    started_at: chrono::DateTime<chrono::Utc>,
    /// The log's head when it started: roughly how many events it replays.
    head: i64,
    replayed: AtomicU64,
    outcome: Mutex<Option<Result<(u64, f64), String>>>,
}

impl Rebuilds {
    fn get(&self, name: &str) -> Option<Arc<Rebuild>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Starts rebuilding `name` unless a rebuild of it started here is still running.
    fn start(&self, state: AppState, name: String, head: i64) -> bool {
        let mut rebuilds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if rebuilds.get(&name).is_some_and(|r| r.running()) {
            return false;
        }
        let rebuild = Arc::new(Rebuild {
            started: Instant::now(),
            started_at: chrono::Utc::now(),
            head,
            replayed: AtomicU64::new(0),
            outcome: Mutex::new(None),
        });
        rebuilds.insert(name.clone(), rebuild.clone());
        tokio::spawn(async move {
            let outcome = state
                .runner
                .rebuild(&name, |n| rebuild.replayed.store(n, Ordering::Relaxed))
                .await;
            let outcome = match outcome {
                Ok(replayed) => {
                    tracing::info!(projection = %name, replayed, "dashboard rebuild finished");
                    Ok((replayed, rebuild.started.elapsed().as_secs_f64()))
                }
                Err(e) => {
                    tracing::warn!(projection = %name, error.message = %e, "dashboard rebuild failed");
                    Err(e.to_string())
                }
            };
            *rebuild.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        });
        true
    }
}

impl Rebuild {
    fn running(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

/// `GET /ui/operations`.
async fn operations(State(state): State<HttpState>, viewer: Viewer) -> Result<Response, Refusal> {
    let projections = state.app.runner.status().await.map_err(Refusal::api)?;
    let targets = match &state.app.webhooks {
        Some(webhooks) => webhooks
            .status(RECENT_DELIVERIES)
            .await
            .map_err(Refusal::api)?,
        None => Vec::new(),
    };
    let rebuilds: Vec<(String, Option<Arc<Rebuild>>)> = projections
        .iter()
        .map(|p| (p.name.clone(), state.ui.rebuilds.get(&p.name)))
        .collect();
    let master_keys = state
        .app
        .commands
        .vault()
        .master_keys()
        .await
        .map_err(Refusal::api)?;
    let running = rebuilds
        .iter()
        .any(|(_, r)| r.as_ref().is_some_and(|r| r.running()));
    let body = html! {
        section aria-labelledby="projections" {
            h2 #projections { "Projections" }
            table {
                thead { tr {
                    th scope="col" { "Read model" } th scope="col" { "Checkpoint" }
                    th scope="col" class="num" { "Head" } th scope="col" class="num" { "Lag" }
                    th scope="col" { "Updated" } th scope="col" { "Rebuild" }
                } }
                tbody { @for (status, (_, rebuild)) in projections.iter().zip(&rebuilds) { tr {
                    th scope="row" { (status.name) }
                    td.mono { (status.checkpoint) }
                    td.num { (status.head_position) }
                    td.num { (status.lag)
                        @if status.caught_up { " " span.badge.ok { "caught up" } } }
                    td { (relative(status.updated_at))
                        @if let Some(error) = &status.last_error { div.error { (error) } } }
                    td {
                        @match rebuild.as_ref().map(|r| (r, r.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone())) {
                            Some((r, None)) => {
                                @let replayed = r.replayed.load(Ordering::Relaxed);
                                div role="status" aria-live="polite" {
                                    span.badge.running { "rebuilding" } " "
                                    (replayed) " events replayed"
                                }
                                progress max=(r.head.max(1)) value=(replayed.min(r.head.max(1) as u64)) {
                                    (replayed) " events" }
                            },
                            Some((r, Some(Ok((replayed, seconds))))) => {
                                p role="status" { span.badge.ok { "rebuilt" } " "
                                    (replayed) " events in " (format!("{seconds:.1}")) " s, started "
                                    (moment(r.started_at)) }
                                (rebuild_form(&viewer, &status.name))
                            },
                            Some((_, Some(Err(error)))) => {
                                p.error role="alert" { "Rebuild failed: " (error) }
                                (rebuild_form(&viewer, &status.name))
                            },
                            None => (rebuild_form(&viewer, &status.name)),
                        }
                    }
                } } }
            }
            p.muted { "A rebuild replays the whole log into a shadow table and swaps it in; the
                live table serves reads until then." }
        }
        section aria-labelledby="webhooks" {
            h2 #webhooks { "Webhooks" }
            @if targets.is_empty() {
                p.muted { "No webhook target on this instance (" code { "GRANTLINE_WEBHOOK_URLS" } ")." }
            }
            @for target in &targets {
                div.card {
                    h3 { code { (target.url) } }
                    p { "Lag " (target.lag) " events"
                        @if target.caught_up { " " span.badge.ok { "caught up" } }
                        @if let Some(holder) = &target.lease_holder { " · delivered by " (holder) }
                    }
                    @if let Some(error) = &target.last_error { p.error { (error) } }
                    @if target.deliveries.iter().any(|d| d.status == "retrying") {
                        form method="post" action="/ui/operations/webhooks/retry" {
                            (csrf(&viewer))
                            input type="hidden" name="url" value=(target.url);
                            button.secondary type="submit" { "Retry now" }
                        }
                    }
                    @if target.deliveries.is_empty() {
                        p.muted { "No delivery yet." }
                    } @else {
                        table {
                            thead { tr {
                                th scope="col" { "Event" } th scope="col" { "Status" }
                                th scope="col" class="num" { "Attempts" } th scope="col" { "Last answer" }
                                th scope="col" { "Last attempt" } th scope="col" { "Next attempt" }
                            } }
                            tbody { @for d in &target.deliveries { tr {
                                td { (d.event) " " span.muted.mono { (d.event_id) } }
                                td { span.badge.(d.status) { (d.status) } }
                                td.num { (d.attempts) }
                                td { @if let Some(status) = d.last_status { (status) " " }
                                    @if let Some(error) = &d.last_error { span.error { (error) } } }
                                td { (relative(d.last_attempt_at)) }
                                td { @if let Some(at) = d.next_attempt_at { (relative(at)) } }
                            } } }
                        }
                    }
                }
            }
        }
        section aria-labelledby="keys" {
            h2 #keys { "Encryption keys" }
            table {
                thead { tr {
                    th scope="col" { "Master key id" } th scope="col" { "State" }
                    th scope="col" class="num" { "Data keys it wraps" }
                } }
                tbody { @for key in &master_keys { tr {
                    td.mono { (key.key_id) }
                    td { @if key.active { span.badge.ok { "active" } }
                        @else if key.data_keys > 0 { span.badge.retrying { "rotation pending" } }
                        @else { span.muted { "retired" } } }
                    td.num { (key.data_keys) }
                } } }
            }
            @if master_keys.iter().any(|k| !k.active && k.data_keys > 0) {
                p role="status" { "A rotation is not finished: run " code { "grantline keys rotate" }
                    " (it can be resumed)." }
            } @else {
                p.muted { "Every data key is wrapped by the active master key. The key id is a
                    fingerprint, not the key." }
            }
        }
    };
    let refresh = running.then_some(1);
    Ok(page_with("Operations", Nav::Operations, Some(&viewer), refresh, body).into_response())
}

fn rebuild_form(viewer: &Viewer, name: &str) -> maud::Markup {
    html! {
        form method="post" action=(format!("/ui/operations/rebuild/{name}")) {
            (csrf(viewer))
            button.secondary type="submit" aria-label=(format!("Rebuild {name}")) { "Rebuild" }
        }
    }
}

/// `POST /ui/operations/rebuild/{name}`: starts a rebuild in the background.
async fn rebuild(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Posted(action): Posted<Action>,
) -> Result<Response, Refusal> {
    viewer.check(&action.csrf)?;
    let statuses = state.app.runner.status().await.map_err(Refusal::api)?;
    let Some(status) = statuses.iter().find(|s| s.name == name) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such projection.",
        ));
    };
    state
        .ui
        .rebuilds
        .start(state.app.clone(), name, status.head_position);
    // No fragment: the page reloads itself while the rebuild runs, and a reload of an address
    // with a fragment is only a scroll in browsers.
    Ok(Redirect::to("/ui/operations").into_response())
}

/// The "retry now" form of a webhook target.
#[derive(serde::Deserialize)]
struct Retry {
    csrf: String,
    /// The target as the page shows it (redacted).
    url: String,
}

/// `POST /ui/operations/webhooks/retry`: makes the target's retrying deliveries due now.
async fn retry_webhooks(
    State(state): State<HttpState>,
    viewer: Viewer,
    Posted(retry): Posted<Retry>,
) -> Result<Response, Refusal> {
    viewer.check(&retry.csrf)?;
    let not_found = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such webhook target on this instance.",
        )
    };
    let webhooks = state.app.webhooks.as_ref().ok_or_else(not_found)?;
    match webhooks.retry_now(&retry.url).await.map_err(Refusal::api)? {
        Some(due) => {
            tracing::info!(webhook.url = %retry.url, due, "webhook retries made due from the dashboard");
            Ok(Redirect::to("/ui/operations").into_response())
        }
        None => Err(not_found()),
    }
}
