//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the handlers'
//! `#[utoipa::path]` attributes and the `ToSchema` types of their bodies.
//!
//! The `/connections…` family is not annotated twice: its path items are copied from the
//! `/connection…` ones (the router serves both with the same handlers), with their own operation
//! ids. The document is built once, on first use, and served from memory. It reveals nothing
//! secret, so it is an open route like `/health`. `tests/api/openapi.rs` probes every route the
//! router registers and fails when one is missing here, or when a documented one is not served.
//!
//! An operation that says nothing of security takes the secret key and may answer 401: the
//! attributes leave that out, and the open routes say `security(())`.

use std::collections::HashSet;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::ApiError;
use super::error::ErrorBody;

/// The seed's route family; `/connections…` is a copy of it.
const SEED_FAMILY: &str = "/connection";
const CURRENT_FAMILY: &str = "/connections";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Grantline",
        description = "OAuth connection and token service speaking the Nango Connections API. \
            Every `/connection…` route is also served as `/connections…`. Errors are \
            `{\"error\": {\"code\", \"message\", \"payload\"}}` (schema `Error`). Unknown query \
            parameters and `Nango-*` headers are ignored, except by the connection list, which \
            refuses unknown parameters as Nango's does."
    ),
    paths(
        super::health,
        super::admin::projections_status,
        super::metrics::metrics,
        openapi_json,
        super::connection_list::list_connections,
        super::api_auth::api_key,
        super::api_auth::basic,
        super::api_auth::client_credentials,
        super::proxy::proxy,
        super::proxy::proxy_with_body,
        super::import::import_connection,
        super::connection::get_connection,
        super::connection::delete_connection,
        super::connection::patch_connection,
        super::connection::get_connection_named_metadata,
        super::connection::delete_connection_named_metadata,
        super::connection::set_metadata,
        super::connection::set_metadata_of,
        super::history::get_history,
        super::ready::ready,
        super::admin::webhooks_status,
        super::config::list_configs,
        super::config::create_config,
        super::config::update_config,
        super::config::get_config,
        super::config::delete_config,
        super::oauth::connect,
        super::oauth::callback,
        super::connect::create_session,
        super::connect::reconnect_session,
        super::connect::get_session,
        super::connect::delete_session,
        super::integrations::list_integrations,
        super::integrations::create_integration,
        super::integrations::get_integration,
        super::integrations::update_integration,
        super::integrations::delete_integration,
        super::integrations::list_providers,
        super::integrations::get_provider,
        super::logos::logo,
        super::socket::websocket,
        super::connect_ui::page,
        super::connect_ui::redirect,
        super::connect_ui::script,
        super::connect_ui::style,
    ),
    components(schemas(super::connection::CurrentBody)),
    modifiers(&SecuritySchemes, &SecretKeyByDefault),
    tags(
        (name = "connections", description = "Connections and their credentials"),
        (name = "integrations", description = "Provider configs (`/config`)"),
        (name = "oauth", description = "The browser's side of OAuth flows; no secret key"),
        (name = "connect", description = "Connect sessions: made with the secret key, used with \
            their own token"),
        (name = "service", description = "Health, metrics, projections and this document"),
    )
)]
struct ApiDoc;

/// Names of the security schemes; every API operation accepts either.
pub const BEARER: &str = "secret_key";
pub const BASIC: &str = "secret_key_basic";

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some(
            "The secret key as a bearer token. Only enforced when the server runs with a secret \
             key; without one the API is open (and listens on loopback only)."
                .into(),
        );
        let mut basic = Http::new(HttpAuthScheme::Basic);
        basic.description = Some(
            "The secret key as the user name of Basic authentication, with an empty password \
             (`base64(<key>:)`). Only enforced when the server runs with a secret key."
                .into(),
        );
        let mut session = Http::new(HttpAuthScheme::Bearer);
        session.description =
            Some("A connect session's token (`POST /connect/sessions`) as a bearer token.".into());
        components.add_security_scheme(BEARER, SecurityScheme::Http(bearer));
        components.add_security_scheme("connect_session_token", SecurityScheme::Http(session));
        components.add_security_scheme(BASIC, SecurityScheme::Http(basic));
    }
}

/// Gives each operation that declares no security of its own (the open routes say `security(())`)
/// what all the others share: either secret key scheme, and the 401 answer to a missing or wrong
/// key.
struct SecretKeyByDefault;

impl Modify for SecretKeyByDefault {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let unauthorized = ResponseBuilder::new()
            .description("Missing or wrong secret key")
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name(ErrorBody::name()))),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item).filter(|o| o.security.is_none()) {
                operation.security = Some(
                    [BEARER, BASIC]
                        .map(|scheme| SecurityRequirement::new(scheme, Vec::<String>::new()))
                        .into(),
                );
                operation
                    .responses
                    .responses
                    .insert("401".into(), unauthorized.clone().into());
            }
        }
    }
}

/// The document: the annotated operations plus the `/connections…` copies.
fn build() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let copies: Vec<(String, utoipa::openapi::PathItem)> = doc
        .paths
        .paths
        .iter()
        .filter_map(|(path, item)| {
            let rest = path.strip_prefix(SEED_FAMILY)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let mut item = item.clone();
            for operation in operations(&mut item) {
                if let Some(id) = &mut operation.operation_id {
                    id.push_str("_plural");
                }
            }
            // One connection reads back in today's shape on the plural routes.
            if let Some(get) = item.get.as_mut()
                && (rest == "/{connection_id}" || rest == "/metadata")
            {
                let current = json_response(
                    "The connection with its credentials, in today's shape",
                    "CurrentConnection",
                );
                get.responses.responses.insert("200".into(), current.into());
            }
            // So does an import there, which may leave the id to the server.
            if let Some(post) = item.post.as_mut()
                && rest.is_empty()
            {
                let current = json_response(
                    "Imported (`connection_id`: a new UUID when none is given); the connection \
                     with its credentials, in today's shape",
                    "CurrentConnection",
                );
                post.responses
                    .responses
                    .insert("201".into(), current.into());
                let not_found = json_response("`not_found`: no such integration", "Error");
                post.responses
                    .responses
                    .insert("404".into(), not_found.into());
            }
            Some((format!("{CURRENT_FAMILY}{rest}"), item))
        })
        .collect();
    doc.paths.paths.extend(copies);
    // A handler serving two methods (POST and PATCH metadata) yields one operation id twice;
    // operation ids must be unique, so the later one gets its method appended.
    let mut seen = HashSet::new();
    for item in doc.paths.paths.values_mut() {
        for (method, operation) in [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("patch", &mut item.patch),
        ] {
            if let Some(id) = operation.as_mut().and_then(|o| o.operation_id.as_mut())
                && !seen.insert(id.clone())
            {
                id.push('_');
                id.push_str(method);
                seen.insert(id.clone());
            }
        }
    }
    doc
}

/// A JSON answer of the schema `schema`.
fn json_response(description: &str, schema: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(schema))),
        )
        .build()
}

/// The operations of a path item.
fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

static DOCUMENT: OnceLock<Result<String, String>> = OnceLock::new();

/// The document as JSON text, built on first use.
pub fn document() -> Result<&'static str, ApiError> {
    DOCUMENT
        .get_or_init(|| build().to_json().map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| ApiError::Internal(format!("cannot serialize the OpenAPI document: {e}")))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "service",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API",
            content_type = "application/json", body = Object),
    ),
    security(()),
)]
pub async fn openapi_json() -> Response {
    match document() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_path_has_a_connections_copy_with_its_own_operation_ids() {
        let mut doc = build();
        let paths = &mut doc.paths.paths;
        let seed: Vec<String> = paths
            .keys()
            .filter(|p| *p == SEED_FAMILY || p.starts_with("/connection/"))
            .cloned()
            .collect();
        assert!(seed.len() >= 4, "{seed:?}");
        for path in &seed {
            let copy = format!("{CURRENT_FAMILY}{}", &path[SEED_FAMILY.len()..]);
            assert!(paths.contains_key(&copy), "{copy} is missing");
        }
        let mut ids = HashSet::new();
        for item in paths.values_mut() {
            for operation in operations(item) {
                let id = operation.operation_id.clone().unwrap();
                assert!(ids.insert(id.clone()), "operation id {id} twice");
            }
        }
    }
}
