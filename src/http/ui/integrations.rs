//! Integrations: the list, a form to create one and a form to edit one. Client secrets are
//! write-only: a form never shows one, and an edit that leaves the field empty keeps it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use domain::commands::IntegrationConfig;
use domain::credentials::ClientSecret;
use maud::{Markup, html};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::layout::{Nav, csrf, moment, page};
use super::session::Viewer;
use super::{Posted, Refusal};
use crate::http::extract::identifier;
use crate::http::{HttpState, Routes};
use crate::integrations::{self, IntegrationsError};

pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/ui/integrations", get(list).post(create))
        .route("/ui/integrations/new", get(new))
        .route("/ui/integrations/{key}", get(edit).post(update))
}

fn href(key: &str) -> String {
    format!(
        "/ui/integrations/{}",
        utf8_percent_encode(key, NON_ALPHANUMERIC)
    )
}

/// `GET /ui/integrations`.
async fn list(State(state): State<HttpState>, viewer: Viewer) -> Result<Response, Refusal> {
    let records = integrations::list(&state.app).await.map_err(Refusal::api)?;
    let body = html! {
        p { a href="/ui/integrations/new" { "New integration" } }
        @if records.is_empty() {
            p { "No integration yet." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Key" } th scope="col" { "Provider" }
                    th scope="col" { "Auth mode" } th scope="col" { "Client id" }
                    th scope="col" { "Scopes" } th scope="col" { "Created" }
                    th scope="col" { "Connections" }
                } }
                tbody { @for record in &records {
                    @let i = &record.integration;
                    @let template = state.app.catalog.get(&i.settings.provider);
                    tr {
                        td { a href=(href(&i.provider_config_key)) { (i.provider_config_key) } }
                        td { (i.settings.provider) }
                        td { (template.map_or("unknown template", |t| t.auth_mode.as_str())) }
                        td.mono { (i.settings.oauth_client_id) }
                        td { (i.settings.oauth_scopes.join(" ")) }
                        td { (moment(i.created_at)) }
                        td { a href=(format!("/ui/connections?integration={}",
                            utf8_percent_encode(&i.provider_config_key, NON_ALPHANUMERIC))) { "List" } }
                    }
                } }
            }
        }
    };
    Ok(page("Integrations", Nav::Integrations, Some(&viewer), body).into_response())
}

/// What the create and edit forms send.
#[derive(Deserialize)]
struct IntegrationForm {
    csrf: String,
    /// Create only.
    #[serde(default)]
    key: String,
    provider: String,
    #[serde(default)]
    client_id: String,
    /// Empty on an edit: keep the current one.
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    scopes: String,
}

/// The form's fields, filled with `values` (the client secret never).
fn fields(state: &HttpState, creating: bool, values: &IntegrationForm) -> Markup {
    let mut providers: Vec<&str> = state.app.catalog.names().collect();
    providers.sort_unstable();
    html! {
        @if creating {
            label for="key" { "Key (the provider config key)" }
            input #key name="key" required maxlength="255" value=(values.key);
        }
        label for="provider" { "Provider template" }
        select #provider name="provider" required {
            @for name in providers {
                option value=(name) selected[name == values.provider] { (name) }
            }
        }
        label for="client_id" { "OAuth client id (not needed for API-key and Basic providers)" }
        input #client_id name="client_id" maxlength="255" value=(values.client_id);
        label for="client_secret" {
            @if creating { "OAuth client secret" }
            @else { "OAuth client secret (write-only; leave empty to keep the current one)" }
        }
        input #client_secret name="client_secret" type="password" autocomplete="off";
        label for="scopes" { "Scopes (comma or space separated)" }
        input #scopes name="scopes" value=(values.scopes);
    }
}

fn form_page(
    state: &HttpState,
    viewer: &Viewer,
    key: Option<&str>,
    values: &IntegrationForm,
    problem: Option<String>,
) -> Response {
    let (title, action) = match key {
        None => ("New integration".to_owned(), "/ui/integrations".to_owned()),
        Some(key) => (format!("Integration {key}"), href(key)),
    };
    let body = html! {
        form.card.narrow.stack method="post" action=(action) {
            @if let Some(problem) = &problem { p.error role="alert" { (problem) } }
            (csrf(viewer))
            (fields(state, key.is_none(), values))
            button type="submit" { "Save" }
        }
        @if let Some(template) = state.app.catalog.get(&values.provider) {
            section.card aria-labelledby="template" {
                h2 #template { "Template " (template.name) }
                dl.facts {
                    dt { "Auth mode" } dd { (template.auth_mode.as_str()) }
                    @if !template.authorization_url.is_empty() {
                        dt { "Authorization URL" } dd.mono { (template.authorization_url) }
                    }
                    @if !template.token_url.is_empty() {
                        dt { "Token URL" } dd.mono { (template.token_url) }
                    }
                    dt { "Default scopes" } dd { (template.default_scopes.join(" ")) }
                }
            }
        }
    };
    let status = if problem.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, page(&title, Nav::Integrations, Some(viewer), body)).into_response()
}

/// `GET /ui/integrations/new`.
async fn new(State(state): State<HttpState>, viewer: Viewer) -> Response {
    let values = IntegrationForm {
        csrf: String::new(),
        key: String::new(),
        provider: String::new(),
        client_id: String::new(),
        client_secret: String::new(),
        scopes: String::new(),
    };
    form_page(&state, &viewer, None, &values, None)
}

/// `GET /ui/integrations/{key}`.
async fn edit(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path(key): Path<String>,
) -> Result<Response, Refusal> {
    let (record, _) = integrations::get(&state.app, &key, false)
        .await
        .map_err(Refusal::api)?;
    let settings = &record.integration.settings;
    let values = IntegrationForm {
        csrf: String::new(),
        key: key.clone(),
        provider: settings.provider.clone(),
        client_id: settings.oauth_client_id.clone(),
        client_secret: String::new(),
        scopes: settings.oauth_scopes.join(","),
    };
    Ok(form_page(&state, &viewer, Some(&key), &values, None))
}

/// The configuration a form describes, with `secret` as the client secret.
fn config_of(form: &IntegrationForm, secret: ClientSecret) -> Result<IntegrationConfig, String> {
    identifier(&form.client_id, "the client id").map_err(|e| e.to_string())?;
    if form.client_secret.len() > 4096 || form.scopes.len() > 4096 {
        return Err("A field is longer than 4096 characters.".to_owned());
    }
    // As the API refuses them: they go into token requests' form bodies and headers.
    if form.client_secret.chars().any(char::is_control) || form.scopes.chars().any(char::is_control)
    {
        return Err("The client secret and scopes may not hold control characters.".to_owned());
    }
    Ok(IntegrationConfig {
        provider: form.provider.trim().to_owned(),
        oauth_client_id: form.client_id.trim().to_owned(),
        client_secret: secret,
        oauth_scopes: form
            .scopes
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        display_name: None,
    })
}

/// Why a save was refused, in words for the form.
fn refused(error: IntegrationsError) -> Result<String, Refusal> {
    match error {
        IntegrationsError::ReadModel(_) | IntegrationsError::Connection(_) => {
            Err(Refusal::api(error))
        }
        IntegrationsError::Command { .. } => Err(Refusal::api(error)),
        other => Ok(other.to_string()),
    }
}

/// `POST /ui/integrations`: creates one.
async fn create(
    State(state): State<HttpState>,
    viewer: Viewer,
    Posted(form): Posted<IntegrationForm>,
) -> Result<Response, Refusal> {
    viewer.check(&form.csrf)?;
    let key = form.key.trim().to_owned();
    let problem = if key.is_empty() {
        Some("The key is required.".to_owned())
    } else if let Err(e) = identifier(&key, "the key") {
        Some(e.to_string())
    } else {
        match config_of(&form, ClientSecret::new(form.client_secret.clone())) {
            Err(problem) => Some(problem),
            Ok(config) => match integrations::create(&state.app, &key, config).await {
                Ok(_) => return Ok(Redirect::to(&href(&key)).into_response()),
                Err(e) => Some(refused(e)?),
            },
        }
    };
    Ok(form_page(&state, &viewer, None, &form, problem))
}

/// `POST /ui/integrations/{key}`: replaces its configuration.
async fn update(
    State(state): State<HttpState>,
    viewer: Viewer,
    Path(key): Path<String>,
    Posted(form): Posted<IntegrationForm>,
) -> Result<Response, Refusal> {
    viewer.check(&form.csrf)?;
    let secret = if form.client_secret.is_empty() {
        let (_, secret) = integrations::get(&state.app, &key, true)
            .await
            .map_err(Refusal::api)?;
        secret.unwrap_or_else(|| ClientSecret::new(""))
    } else {
        ClientSecret::new(form.client_secret.clone())
    };
    let problem = match config_of(&form, secret) {
        Err(problem) => Some(problem),
        Ok(config) => match integrations::update(&state.app, &key, config).await {
            Ok(()) => return Ok(Redirect::to(&href(&key)).into_response()),
            Err(e) => Some(refused(e)?),
        },
    };
    Ok(form_page(&state, &viewer, Some(&key), &form, problem))
}
