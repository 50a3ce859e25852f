//! Provider logos: `GET /images/template-logos/<name>.svg`, the address Nango's `logo_url` and
//! an integration's `logo` point to.
//!
//! Grantline ships no provider artwork (logos are the providers' marks). Each template gets a
//! monogram instead: its initial on a tile whose colour follows from its name, drawn here, so
//! that clients that show `logo_url` (the Connect UI, Nango's frontend) always have an image
//! and never fetch one from elsewhere. The SVG holds no script and no link, and is sent with a
//! CSP that forbids both.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiError;
use super::extract::{ApiPath, identifier};
use crate::state::AppState;

/// Where the logo of template `name` is served, on the server at `server_url`.
pub fn logo_url(server_url: &str, name: &str) -> String {
    format!(
        "{}/images/template-logos/{name}.svg",
        server_url.trim_end_matches('/')
    )
}

/// `GET /images/template-logos/{file}`: the logo of the template `file` names (`<name>.svg`).
#[utoipa::path(
    get,
    path = "/images/template-logos/{file}",
    tag = "integrations",
    params(("file" = String, Path, description = "The template's name and `.svg`")),
    responses(
        (status = 200, description = "The template's monogram", content_type = "image/svg+xml",
            body = String),
        (status = 400, description = "Not a template's name (`invalid_uri_params`)",
            body = super::error::ErrorBody),
        (status = 404, description = "No such template (`not_found`)",
            body = super::error::ErrorBody),
    ),
    security(()),
)]
pub async fn logo(
    State(state): State<AppState>,
    ApiPath(file): ApiPath<String>,
) -> Result<Response, ApiError> {
    let name = file.strip_suffix(".svg").unwrap_or(&file);
    identifier(name, "provider")?;
    let template = state
        .catalog
        .get(name)
        .ok_or_else(|| ApiError::UnknownProvider(name.to_owned()))?;
    let headers: HeaderMap = [
        (header::CONTENT_TYPE, "image/svg+xml"),
        (header::CACHE_CONTROL, "public, max-age=86400"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ]
    .into_iter()
    .map(|(name, value)| (name, HeaderValue::from_static(value)))
    .collect();
    Ok((StatusCode::OK, headers, monogram(&template.name)).into_response())
}

/// A 64×64 tile with `name`'s initial, its hue taken from the name.
fn monogram(name: &str) -> String {
    let initial = name
        .chars()
        .find(char::is_ascii_alphanumeric)
        .unwrap_or('?')
        .to_ascii_uppercase();
    // FNV-1a: a stable spread of hues; not a security property.
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let hue = hash % 360;
    // Template names come from the operator's providers file: only plain characters go into
    // the markup.
    let label: String = name
        .chars()
        .filter(|c| c.is_alphanumeric() || "-_ .".contains(*c))
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" height=\"64\" \
         viewBox=\"0 0 64 64\" role=\"img\" aria-label=\"{label}\">\
         <rect width=\"64\" height=\"64\" rx=\"14\" fill=\"hsl({hue},55%,42%)\"/>\
         <text x=\"32\" y=\"43\" text-anchor=\"middle\" font-family=\"system-ui,sans-serif\" \
         font-size=\"30\" font-weight=\"600\" fill=\"#fff\">{initial}</text></svg>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monogram_is_the_initial_on_a_tile_whose_colour_follows_the_name() {
        let github = monogram("github");
        assert!(github.contains(">G</text>"), "{github}");
        assert_eq!(github, monogram("github"));
        assert_ne!(
            github.split("hsl(").nth(1),
            monogram("gitlab").split("hsl(").nth(1)
        );
        assert!(monogram("_x").contains(">X</text>"));
        assert!(monogram("a\"<b").contains("aria-label=\"ab\""));
        assert!(!github.contains("<script"));
        assert_eq!(
            logo_url("https://grantline.example/", "github"),
            "https://grantline.example/images/template-logos/github.svg"
        );
    }
}
