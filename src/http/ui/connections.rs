//! Connections: the list (search, filters, pages), a connection's page (facts, refresh-token
//! lineage, history timeline) and its actions (refresh now, delete after a confirmation).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use chrono::{Duration, Utc};
use domain::connection::ConnectionKey;
use domain::history::{EntryType, HistoryEntry};
use maud::{Markup, html};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use projections::queries::{self, ConnectionFilter, ConnectionSummary, Health};
use serde::Deserialize;

use super::layout::{Nav, csrf, moment, page, relative};
use super::session::Viewer;
use super::{Action, Posted, Refusal};
use crate::http::{HttpState, Routes};
use crate::{connections, history, integrations};

/// Connections per page of the list.
const PAGE: u32 = 50;
/// History entries per page of a connection's timeline.
const TIMELINE_PAGE: usize = 100;
/// What "expiring" means in the health filter.
const EXPIRING_WITHIN: Duration = Duration::minutes(30);

pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/ui/connections", get(list))
        .route(
            "/ui/connections/{provider_config_key}/{connection_id}",
            get(connection),
        )
        .route(
            "/ui/connections/{provider_config_key}/{connection_id}/refresh",
            axum::routing::post(refresh),
        )
        .route(
            "/ui/connections/{provider_config_key}/{connection_id}/delete",
            get(confirm_delete).post(delete),
        )
}

/// The address of a connection's page.
pub fn href(key: &str, connection_id: &str) -> String {
    format!(
        "/ui/connections/{}/{}",
        utf8_percent_encode(key, NON_ALPHANUMERIC),
        utf8_percent_encode(connection_id, NON_ALPHANUMERIC)
    )
}

/// The list's filters, as the form sends them (empty fields are no filter).
#[derive(Deserialize, Default)]
pub struct Filters {
    #[serde(default)]
    q: String,
    #[serde(default)]
    integration: String,
    /// `key=value`.
    #[serde(default)]
    tag: String,
    #[serde(default)]
    end_user: String,
    /// `failed`, `retrying`, `expiring` or `idle`.
    #[serde(default)]
    health: String,
    #[serde(default)]
    page: u32,
}

impl Filters {
    /// The filter for the store, or what is wrong with the fields.
    fn filter(&self, idle_after: Duration) -> Result<ConnectionFilter, String> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let mut tags = BTreeMap::new();
        if let Some(tag) = text(&self.tag) {
            let (key, value) = tag
                .split_once('=')
                .ok_or("A tag filter is written key=value.")?;
            tags.insert(key.trim().to_lowercase(), value.trim().to_owned());
        }
        let health = match self.health.as_str() {
            "" => None,
            "failed" => Some(Health::Failed),
            "retrying" => Some(Health::Retrying),
            "expiring" => Some(Health::Expiring(Utc::now() + EXPIRING_WITHIN)),
            "idle" => Some(Health::Idle(Utc::now() - idle_after)),
            _ => return Err("Unknown health filter.".to_owned()),
        };
        if [&self.q, &self.integration, &self.tag, &self.end_user]
            .iter()
            .any(|s| s.len() > 255)
        {
            return Err("A filter is longer than 255 characters.".to_owned());
        }
        if [&self.q, &self.integration, &self.tag, &self.end_user]
            .iter()
            .any(|s| s.chars().any(char::is_control))
        {
            return Err("A filter contains control characters.".to_owned());
        }
        Ok(ConnectionFilter {
            search: text(&self.q).map(|q| q.to_lowercase()),
            integrations: text(&self.integration).into_iter().collect(),
            tags,
            end_user_id: text(&self.end_user),
            health,
            // One more than a page: whether there is a next one.
            limit: PAGE + 1,
            offset: u64::from(self.page.min(100_000)) * u64::from(PAGE),
            ..ConnectionFilter::default()
        })
    }

    /// The list's address with these filters, on page `page`.
    fn href(&self, page: u32) -> String {
        let mut url = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("q", &self.q),
            ("integration", &self.integration),
            ("tag", &self.tag),
            ("end_user", &self.end_user),
            ("health", &self.health),
        ] {
            if !value.is_empty() {
                url.append_pair(name, value);
            }
        }
        if page > 0 {
            url.append_pair("page", &page.to_string());
        }
        format!("/ui/connections?{}", url.finish())
    }
}

/// `GET /ui/connections`.
async fn list(
    State(state): State<HttpState>,
    viewer: Viewer,
    filters: Result<Query<Filters>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let (filters, mut problem) = match filters {
        Ok(Query(filters)) => (filters, None),
        Err(e) => (Filters::default(), Some(e.body_text())),
    };
    let integrations = integrations::list(&state.app).await.map_err(Refusal::api)?;
    let mut rows = Vec::new();
    let idle_after =
        Duration::from_std(state.app.scheduler.policy().active_for).unwrap_or(Duration::days(1));
    match filters.filter(idle_after) {
        Ok(filter) => {
            rows = connections::list(&state.app, &filter)
                .await
                .map_err(Refusal::api)?
        }
        Err(e) => problem = Some(e),
    }
    let more = rows.len() > PAGE as usize;
    rows.truncate(PAGE as usize);
    let body = html! {
        form.filters.card method="get" action="/ui/connections" role="search" {
            div {
                label for="q" { "Search (id, end user's name or e-mail)" }
                input #q type="search" name="q" value=(filters.q);
            }
            div {
                label for="integration" { "Integration" }
                select #integration name="integration" {
                    option value="" { "All" }
                    @for record in &integrations {
                        @let key = &record.integration.provider_config_key;
                        option value=(key) selected[*key == filters.integration] { (key) }
                    }
                }
            }
            div {
                label for="tag" { "Tag (key=value)" }
                input #tag type="text" name="tag" value=(filters.tag) placeholder="plan=pro";
            }
            div {
                label for="end_user" { "End user id" }
                input #end_user type="text" name="end_user" value=(filters.end_user);
            }
            div {
                label for="health" { "Health" }
                select #health name="health" {
                    @for (value, name) in [("", "Any"), ("failed", "Failed"),
                        ("retrying", "Retrying"), ("expiring", "Expiring within 30 min"),
                        ("idle", "Idle (not read lately)")] {
                        option value=(value) selected[value == filters.health] { (name) }
                    }
                }
            }
            div { button type="submit" { "Filter" } }
        }
        @if let Some(problem) = &problem {
            p.error role="alert" { (problem) }
        }
        @if rows.is_empty() {
            p { "No connection matches." }
        } @else {
            table {
                caption.muted { "Newest first" }
                thead { tr {
                    th scope="col" { "Connection" } th scope="col" { "Integration" }
                    th scope="col" { "Health" } th scope="col" { "Expires" }
                    th scope="col" { "End user" } th scope="col" { "Tags" }
                    th scope="col" { "Created" }
                } }
                tbody {
                    @for row in &rows { (list_row(row)) }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if filters.page > 0 {
                a rel="prev" href=(filters.href(filters.page - 1)) { "← Newer" }
            }
            @if more {
                a rel="next" href=(filters.href(filters.page + 1)) { "Older →" }
            }
        }
    };
    Ok(page("Connections", Nav::Connections, Some(&viewer), body).into_response())
}

/// The health of a listed connection, as a word.
fn health_of(refresh_state: &str, expires_at: Option<chrono::DateTime<Utc>>) -> &'static str {
    match refresh_state {
        "failed" => "failed",
        "retrying" => "retrying",
        _ if expires_at.is_some_and(|at| at < Utc::now() + EXPIRING_WITHIN) => "expiring",
        _ => "valid",
    }
}

fn list_row(row: &ConnectionSummary) -> Markup {
    let health = health_of(&row.refresh_state, row.expires_at);
    html! {
        tr {
            td { a.mono href=(href(&row.provider_config_key, &row.connection_id)) {
                (row.connection_id) } }
            td { (row.provider_config_key) }
            td { span.badge.(health) { (health) } }
            td { @match row.expires_at {
                Some(at) => span title=(moment(at)) { (relative(at)) },
                None => span.muted { "—" },
            } }
            td { @if let Some(user) = &row.ownership.end_user {
                (user.display_name.as_deref().unwrap_or(&user.id))
            } }
            td { @for (key, value) in &row.ownership.tags {
                code { (key) "=" (value) } " "
            } }
            td { span title=(moment(row.created_at)) { (relative(row.created_at)) } }
        }
    }
}

#[derive(Deserialize)]
pub struct TimelinePage {
    /// Show entries older than this stream version.
    before: Option<u32>,
}

/// `GET /ui/connections/{key}/{id}`: facts, lineage and history of one connection.
async fn connection(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path((key, id)): Path<(String, String)>,
    Query(page_asked): Query<TimelinePage>,
) -> Result<Response, Refusal> {
    let key = ConnectionKey::new(&key, &id);
    let record = queries::find_connection(&state.app.read_models, &key)
        .await
        .map_err(Refusal::api)?;
    let timeline = state
        .ui
        .timelines
        .page(
            &state.app.backend,
            &key,
            page_asked.before.unwrap_or(u32::MAX),
            TIMELINE_PAGE,
        )
        .await
        .map_err(Refusal::api)?;
    let webhooks = match &state.app.webhooks {
        Some(service) => Some(
            service
                .deliveries_of(&timeline.webhook_events)
                .await
                .map_err(Refusal::api)?,
        ),
        None => None,
    };
    let (shown, older, lineage, compaction) = (
        &timeline.entries,
        timeline.older,
        &timeline.lineage,
        &timeline.compaction,
    );
    let here = href(key.provider_config_key(), key.connection_id());
    let body = html! {
        @match &record {
            Some(record) => {
                @let c = &record.connection;
                section.card aria-labelledby="facts" {
                    h2 #facts { "Connection" }
                    dl.facts {
                        dt { "Connection id" } dd.mono { (c.connection_id) }
                        dt { "Integration" } dd { (c.provider_config_key) " (" (c.provider) ")" }
                        dt { "Credentials" } dd { (serde_json::to_value(c.credentials_type).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()) }
                        dt { "Authorization generation" } dd { (c.generation) }
                        dt { "Access token expires" } dd { @match c.expires_at {
                            Some(at) => { (moment(at)) " (" (relative(at)) ")" },
                            None => "unknown or never",
                        } }
                        dt { "Refresh token" } dd {
                            @if c.has_refresh_token {
                                "generation " (c.refresh_token_generation)
                            } @else { "none" }
                        }
                        dt { "Refresh" } dd {
                            @if let Some(failure) = &c.blocking_failure {
                                span.badge.failed { "failed" } " "
                                (failure.failure.code.as_deref().unwrap_or("")) " — the end user must authorize again"
                            } @else if c.consecutive_transient_failures > 0 {
                                span.badge.retrying { "retrying" } " "
                                (c.consecutive_transient_failures) " failed attempts"
                            } @else {
                                span.badge.valid { "healthy" }
                            }
                        }
                        dt { "Scopes" } dd { (c.scopes.join(" ")) }
                        dt { "Created" } dd { (moment(c.created_at)) }
                        dt { "End user" } dd { @if let Some(user) = &c.ownership.end_user {
                            (user.id)
                            @if let Some(name) = &user.display_name { " · " (name) }
                            @if let Some(email) = &user.email { " · " (email) }
                        } @else { span.muted { "none" } } }
                        dt { "Tags" } dd { @for (k, v) in &c.ownership.tags { code { (k) "=" (v) } " " } }
                        dt { "Metadata" } dd { @if c.metadata.is_empty() { span.muted { "none" } } @else {
                            code { (serde_json::to_string(&c.metadata).unwrap_or_default()) }
                        } }
                    }
                    div.actions {
                        form method="post" action=(format!("{here}/refresh")) {
                            (csrf(&viewer))
                            button type="submit" { "Refresh now" }
                        }
                        a href=(format!("{here}/delete")) { "Delete…" }
                    }
                }
            },
            None => {
                p.card.notice { "This connection is deleted. Its history stays." }
            },
        }
        section aria-labelledby="lineage" {
            h2 #lineage { "Refresh-token lineage" }
            @if lineage.is_empty() {
                p.muted { "No refresh token was ever recorded." }
            } @else {
                table {
                    thead { tr {
                        th scope="col" class="num" { "Generation" }
                        th scope="col" { "Fingerprint" }
                        th scope="col" { "Recorded" } th scope="col" { "By" }
                    } }
                    tbody { @for entry in lineage { tr {
                        td.num { (entry.refresh_token_generation.unwrap_or(0)) }
                        td.mono { (entry.fingerprints.as_ref().and_then(|f| f.refresh_token.as_deref()).unwrap_or("")) }
                        td { (entry.recorded_at) }
                        td { (entry.entry_type.as_str())
                            @if entry.refresh_token_rotated == Some(true) { " (rotated)" } }
                    } } }
                }
                p.muted { "Keyed fingerprints: they identify a token without revealing it." }
            }
        }
        section aria-labelledby="webhooks" {
            h2 #webhooks { "Webhooks sent for it" }
            @match &webhooks {
                None => p.muted { "No webhook target on this instance." },
                Some(deliveries) if deliveries.is_empty() => p.muted { "None yet." },
                Some(deliveries) => table {
                    thead { tr {
                        th scope="col" { "Webhook" } th scope="col" { "To" }
                        th scope="col" { "Status" } th scope="col" class="num" { "Attempts" }
                        th scope="col" { "Last attempt" }
                    } }
                    tbody { @for (url, d) in deliveries { tr {
                        td { (d.event) }
                        td.mono { (url) }
                        td { span.badge.(d.status) { (d.status) }
                            @if let Some(status) = d.last_status { " " (status) } }
                        td.num { (d.attempts) }
                        td { (relative(d.last_attempt_at)) }
                    } } }
                },
            }
        }
        section aria-labelledby="history" {
            h2 #history { "History" }
            p.muted { (timeline.total) " events, newest first." }
            ol.timeline {
                @for entry in shown { (timeline_entry(entry)) }
                @if older.is_none() {
                    @if let Some(record) = compaction {
                        li.compaction { strong { "Compacted" } " — " (history::compaction_line(record)) }
                    }
                }
            }
            nav.pager aria-label="History pages" {
                @if page_asked.before.is_some() { a href=(here) { "← Newest" } }
                @if let Some(version) = older {
                    a rel="next" href=(format!("{here}?before={version}")) { "Older →" }
                }
            }
        }
    };
    Ok(page(key.connection_id(), Nav::Connections, Some(&viewer), body).into_response())
}

fn timeline_entry(entry: &HistoryEntry) -> Markup {
    let class = match entry.entry_type {
        EntryType::ConnectionAuthorized => "authorization",
        EntryType::TokensRefreshed => "refresh",
        EntryType::RefreshFailed | EntryType::ConnectionDeleted => "failure",
        _ => "other",
    };
    html! {
        li class=(class) {
            strong { (entry.entry_type.as_str()) }
            " " span.when { "#" (entry.stream_version) " · " (entry.recorded_at)
                " · generation " (entry.generation) }
            @if let Some(trigger) = entry.trigger {
                " · " span { "trigger " (history::trigger_name(trigger)) }
            }
            @if let Some(instance) = &entry.instance {
                " · " span.muted { (instance) }
            }
            @let detail = history::detail(entry);
            @if !detail.is_empty() && detail != "-" { div.mono { (detail) } }
        }
    }
}

/// `POST …/refresh`: a refresh through the fence now; back to the page, which shows its outcome.
async fn refresh(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path((key, id)): Path<(String, String)>,
    Posted(action): Posted<Action>,
) -> Result<Response, Refusal> {
    viewer.check(&action.csrf)?;
    let key = ConnectionKey::new(&key, &id);
    // A failed refresh is recorded in the history, which the page shows; only a missing
    // connection is refused here.
    match connections::refresh_now(&state.app, &key).await {
        Ok(()) | Err(connections::ConnectionsError::Refresh(_)) => {}
        Err(e) => return Err(Refusal::api(e)),
    }
    Ok(Redirect::to(&format!(
        "{}#history",
        href(key.provider_config_key(), key.connection_id())
    ))
    .into_response())
}

/// `GET …/delete`: what deleting means, and the button.
async fn confirm_delete(viewer: Viewer, Path((key, id)): Path<(String, String)>) -> Response {
    let here = href(&key, &id);
    let body = html! {
        form.card.narrow method="post" action=(format!("{here}/delete")) {
            p { "Delete connection " code { (id) } " of " strong { (key) } "?" }
            p { "Its credentials are destroyed for good (their keys are shredded); its history
                stays, without them. The end user will have to connect again." }
            (csrf(&viewer))
            div.actions {
                button.danger type="submit" { "Delete the connection" }
                a href=(here) { "Cancel" }
            }
        }
    };
    page("Delete connection", Nav::Connections, Some(&viewer), body).into_response()
}

/// `POST …/delete`.
async fn delete(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path((key, id)): Path<(String, String)>,
    Posted(action): Posted<Action>,
) -> Result<Response, Refusal> {
    viewer.check(&action.csrf)?;
    let key = ConnectionKey::new(&key, &id);
    connections::delete(&state.app, &key)
        .await
        .map_err(Refusal::api)?;
    Ok(Redirect::to(&href(key.provider_config_key(), key.connection_id())).into_response())
}
