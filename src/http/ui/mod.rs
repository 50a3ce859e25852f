//! The operator dashboard at `/ui/`: server-rendered pages over the same services the API uses.
//!
//! - Pages are HTML written with `maud` (escaped by construction) and one stylesheet; every
//!   read-only page works without JavaScript. `app.js` only adds conveniences.
//! - Sign-in, sessions and CSRF: [`session`]. Every response carries a strict
//!   `Content-Security-Policy` (nothing but this server's own scripts and styles; no framing).
//! - No page shows a token, a secret or a key: connections show what the history API shows
//!   (keyed fingerprints, generations), integrations never show their client secret.
//!
//! Rooms: [`overview`] (health, refresh activity, loops), [`connections`] (list, page, actions),
//! [`integrations`] (list, create, edit), [`operations`] (projections and their rebuilds,
//! webhooks, keys).

mod assets;
mod chart;
mod connections;
mod integrations;
mod layout;
mod operations;
mod overview;
pub mod session;

use axum::Form;
use axum::extract::{FromRequest, Request};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderValue, SET_COOKIE};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::html;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use self::layout::{Nav, page};
use self::session::{COOKIE_NAME, LIFETIME, Sessions, Viewer};
use super::auth::is_secret;
use super::{ApiError, HttpState, Routes};
use crate::state::AppState;

/// What the dashboard keeps on this instance: its sessions and the rebuilds it started.
#[derive(Debug)]
pub struct Dashboard {
    pub sessions: Sessions,
    pub rebuilds: operations::Rebuilds,
    pub overview: overview::Cache,
    /// The folded histories of long streams, for connection pages.
    pub timelines: crate::history::Timelines,
}

impl Dashboard {
    /// The dashboard of a server with `state`'s configuration.
    pub fn new(state: &AppState) -> Self {
        let secret = state
            .config
            .secret_key
            .as_ref()
            .map(|s| s.expose().as_bytes());
        Self {
            sessions: Sessions::new(secret),
            rebuilds: operations::Rebuilds::default(),
            overview: overview::Cache::default(),
            timelines: crate::history::Timelines::default(),
        }
    }
}

/// The dashboard's routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(overview::overview))
        .route("/ui/login", get(sign_in_page).post(sign_in))
        .route("/ui/logout", post(sign_out))
        .route("/ui/assets/{file}", get(assets::asset))
        .merge(connections::routes())
        .merge(integrations::routes())
        .merge(operations::routes())
        .map(|router| router.layer(axum::middleware::map_response(secure_headers)))
}

/// What no dashboard response goes without.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A page that says why something was not done, with its status (never a stack trace).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    title: String,
    message: String,
    /// Offer a link to sign in.
    sign_in: bool,
    /// Send the browser to sign in, then back here.
    redirect: Option<String>,
}

impl Refusal {
    pub fn new(status: StatusCode, title: &str, message: &str) -> Self {
        Self {
            status,
            title: title.to_owned(),
            message: message.to_owned(),
            sign_in: false,
            redirect: None,
        }
    }

    /// Adds a link to the sign-in page.
    pub fn with_sign_in(mut self) -> Self {
        self.sign_in = true;
        self
    }

    /// Sends the browser to sign in, and back to `back` (a path of this dashboard) after.
    pub fn sign_in(back: Option<&str>) -> Self {
        let back = back.filter(|b| is_dashboard_path(b)).unwrap_or("/ui/");
        let mut refusal = Self::new(StatusCode::SEE_OTHER, "Sign in", "");
        refusal.redirect = Some(format!(
            "/ui/login?next={}",
            percent_encoding::utf8_percent_encode(back, percent_encoding::NON_ALPHANUMERIC)
        ));
        refusal
    }

    /// The page for a failure of the services, with the API's status, code and message.
    pub fn api(error: impl Into<ApiError>) -> Self {
        let error: ApiError = error.into();
        let status = error.status();
        let message = format!("{} ({})", error, error.code());
        let title = if status == StatusCode::NOT_FOUND {
            "Not found"
        } else if status.is_client_error() {
            "Not done"
        } else {
            "Something went wrong"
        };
        error.log();
        Self::new(status, title, &message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if let Some(to) = self.redirect {
            return Redirect::to(&to).into_response();
        }
        let body = html! {
            p { (self.message) }
            @if self.sign_in {
                p { a href="/ui/login" { "Sign in" } }
            } @else {
                p { a href="/ui/" { "Back to the overview" } }
            }
        };
        (self.status, page(&self.title, Nav::None, None, body)).into_response()
    }
}

/// Whether `path` is a path of the dashboard (where signing in may send the browser back to).
/// Only visible ASCII: the path goes into a `Location` header as it is.
fn is_dashboard_path(path: &str) -> bool {
    path.starts_with("/ui/") && !path.contains("://") && path.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

/// `GET /ui/login`.
async fn sign_in_page(State(state): State<HttpState>, Query(next): Query<Next>) -> Response {
    if !state.ui.sessions.required() {
        return Redirect::to("/ui/").into_response();
    }
    sign_in_form(StatusCode::OK, next.next.as_deref(), None)
}

fn sign_in_form(status: StatusCode, next: Option<&str>, error: Option<&str>) -> Response {
    let next = next.filter(|n| is_dashboard_path(n)).unwrap_or("/ui/");
    let body = html! {
        form.card.narrow method="post" action="/ui/login" {
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            p { "Enter the server's secret key (" code { "GRANTLINE_SECRET_KEY" } ")." }
            label for="secret_key" { "Secret key" }
            input #secret_key type="password" name="secret_key" autocomplete="current-password"
                required autofocus;
            input type="hidden" name="next" value=(next);
            button type="submit" { "Sign in" }
        }
    };
    (status, page("Sign in", Nav::None, None, body)).into_response()
}

#[derive(Deserialize)]
struct SignIn {
    secret_key: String,
    next: Option<String>,
}

/// `POST /ui/login`: the secret key, compared in constant time, opens a session.
async fn sign_in(State(state): State<HttpState>, Posted(form): Posted<SignIn>) -> Response {
    let Some(secret) = &state.app.config.secret_key else {
        return Redirect::to("/ui/").into_response();
    };
    if !is_secret(&form.secret_key, secret.expose().as_bytes()) {
        tracing::warn!("dashboard sign-in refused");
        return sign_in_form(
            StatusCode::UNAUTHORIZED,
            form.next.as_deref(),
            Some("That is not the secret key."),
        );
    }
    let secure = if state.app.config.server_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE_NAME}={}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        state.ui.sessions.open(),
        LIFETIME.as_secs()
    );
    let next = form
        .next
        .as_deref()
        .filter(|n| is_dashboard_path(n))
        .unwrap_or("/ui/");
    let mut response = Redirect::to(next).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(SET_COOKIE, value);
    }
    response
}

/// A form that carries only the CSRF token.
#[derive(Deserialize)]
pub struct Action {
    pub csrf: String,
}

/// `POST /ui/logout`.
async fn sign_out(
    State(state): State<HttpState>,
    viewer: Viewer,
    Posted(action): Posted<Action>,
) -> Result<Response, Refusal> {
    viewer.check(&action.csrf)?;
    viewer.sign_out(&state).await?;
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static("grantline_ui=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(response)
}

/// A form posted to the dashboard; a body that is not such a form is refused with a page.
pub struct Posted<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Posted<T> {
    type Rejection = Refusal;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(request, state).await {
            Ok(Form(form)) => Ok(Self(form)),
            Err(rejection) => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "Not done",
                &format!("The form could not be read: {}", rejection.body_text()),
            )),
        }
    }
}
