//! Provider templates: how to run OAuth against each provider.
//!
//! A catalog maps a provider name (`github`, `zendesk`, …) to a [`Template`] read from YAML in
//! Nango's `providers.yaml` format (`reference/nango-behaviour.md` §4.2). The built-in catalog is
//! `catalog/providers.yaml`, embedded in the binary and written from each provider's own
//! documentation (Nango's file is under the Elastic License and is not copied). An operator's
//! file, given at start-up, adds entries or replaces built-in ones ([`Catalog::with_file`]).
//!
//! Guarantees:
//! - Every [`Template`] in a catalog is complete for its auth mode: OAuth 2.0 has
//!   `authorization_url` and `token_url`, OAuth 1.0a also `request_url`; every URL starts with
//!   `https://` or `http://` (or with a placeholder that [`interpolate_url`] checks once filled),
//!   and its placeholders are all `${connectionConfig.x}` (or the old
//!   `${connectionConfig.params.x}`).
//! - `alias: other` inherits `other` (from the same file, or from the built-in catalog) field by
//!   field; the entry's own fields replace whole fields of the target (maps are not merged key by
//!   key). An alias to itself in a user file means the built-in entry of that name.
//! - Entries whose auth mode is a Nango mode Grantline does not serve (API_KEY, BASIC, APP, …)
//!   are left out and listed by [`Catalog::skipped`]; anything else that is wrong is a
//!   [`CatalogError`] naming the file and, when known, the entry.
//! - Fields Grantline does not use (`categories`, `connection_config`,
//!   `docs_connect`, …) are ignored. Parameter values keep their YAML text (`2.0` stays `"2.0"`).
//!
//! The YAML is read with `serde-saphyr`: pure Rust without `unsafe`, fuzzed to not panic on
//! malformed input, and it reports errors with line and column.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;

mod interpolation;
mod proxy;

pub use interpolation::{
    InterpolationError, UrlInterpolationError, config_values, fill_with, interpolate,
    interpolate_url, placeholder_values,
};
use interpolation::{fill, has_http_scheme};
pub use proxy::{Proxy, Verification};

/// How a provider authorizes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// OAuth 2.0 authorization code, with PKCE unless the template disables it. YAML `OAUTH2`.
    #[default]
    OAuth2,
    /// OAuth 1.0a three-legged flow. YAML `OAUTH1`.
    OAuth1,
    /// A key the user enters (no flow). YAML `API_KEY`.
    ApiKey,
    /// A username and password the user enters (no flow). YAML `BASIC`.
    Basic,
    /// An OAuth 2.0 client-credentials grant with client credentials the user enters (no
    /// browser flow; renewed by asking again). YAML `OAUTH2_CC`.
    OAuth2Cc,
}

impl AuthMode {
    /// The YAML spelling: `OAUTH2` or `OAUTH1`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::OAuth2 => "OAUTH2",
            AuthMode::OAuth1 => "OAUTH1",
            AuthMode::ApiKey => "API_KEY",
            AuthMode::Basic => "BASIC",
            AuthMode::OAuth2Cc => "OAUTH2_CC",
        }
    }

    /// Whether connections of this mode are made by an OAuth flow (the others take credentials
    /// the user enters).
    pub fn is_oauth(self) -> bool {
        matches!(self, AuthMode::OAuth2 | AuthMode::OAuth1)
    }

    /// Whether a connection of this mode can hold credentials of `kind`: the ones its flow or
    /// form makes, and no others (an API key under an OAuth 2 template would reach no request
    /// the template makes).
    pub fn takes(self, kind: crate::connection::CredentialsType) -> bool {
        use crate::connection::CredentialsType as Kind;
        matches!(
            (self, kind),
            (AuthMode::OAuth2, Kind::Oauth2)
                | (AuthMode::OAuth1, Kind::Oauth1)
                | (AuthMode::ApiKey, Kind::ApiKey)
                | (AuthMode::Basic, Kind::Basic)
                | (AuthMode::OAuth2Cc, Kind::Oauth2Cc)
        )
    }
}

/// Where the client credentials go at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthorizationMethod {
    /// `client_id` and `client_secret` in the request body. YAML `authorization_method: body`.
    #[default]
    Body,
    /// HTTP Basic `Authorization` header. YAML `authorization_method: header`, or
    /// `token_request_auth_method: basic`.
    Header,
    /// A JWT signed with the connection's private key (RFC 7523 client assertion, OpenID
    /// Connect's `private_key_jwt`). YAML `token_request_auth_method: private_key_jwt`; client
    /// credentials (`OAUTH2_CC`) only, where each connection brings its own key.
    PrivateKeyJwt,
}

/// Encoding of the token request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`. YAML `body_format: form`.
    #[default]
    Form,
    /// `application/json`. YAML `body_format: json`.
    Json,
}

/// How OAuth 1.0a requests are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMethod {
    /// YAML `HMAC-SHA1` (the default for OAuth 1.0a templates).
    HmacSha1,
    /// YAML `RSA-SHA1`.
    RsaSha1,
    /// YAML `PLAINTEXT`.
    Plaintext,
}

/// One provider's template, complete for its auth mode.
///
/// URLs may hold `${connectionConfig.x}` placeholders: fill them with [`interpolate_url`]. The
/// OAuth fields are blank for `API_KEY` and `BASIC` templates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    /// The catalog key, e.g. `github`.
    pub name: String,
    /// The provider's name as people read it (`GitHub`), when the template gives one.
    pub display_name: Option<String>,
    /// OAuth 2.0 or OAuth 1.0a.
    pub auth_mode: AuthMode,
    /// Where the user's browser is sent to grant access.
    pub authorization_url: String,
    /// OAuth 2.0: the token endpoint. OAuth 1.0a: the access-token endpoint.
    pub token_url: String,
    /// A refresh endpoint other than `token_url`, for the few providers that have one.
    pub refresh_url: Option<String>,
    /// Extra parameters of the authorization URL (e.g. `access_type: offline`).
    pub authorization_params: BTreeMap<String, String>,
    /// Extra parameters of the code exchange.
    pub token_params: BTreeMap<String, String>,
    /// Extra parameters of a refresh.
    pub refresh_params: BTreeMap<String, String>,
    /// Joins the scopes in the `scope` parameter; `" "` unless the template says otherwise.
    pub scope_separator: String,
    /// Scopes the provider suggests (Nango shows them in its UI); not added to requests here.
    pub default_scopes: Vec<String>,
    /// Where the client credentials go at the token endpoint.
    pub authorization_method: AuthorizationMethod,
    /// Encoding of the token request body.
    pub body_format: BodyFormat,
    /// Whether to leave PKCE out of the OAuth 2.0 flow (on by default).
    pub disable_pkce: bool,
    /// Token-response fields to keep as connection config (e.g. salesforce's `instance_url`).
    pub token_response_metadata: Vec<String>,
    /// Callback query parameters to keep as connection config (e.g. quickbooks' `realmId`).
    pub redirect_uri_metadata: Vec<String>,
    /// Seconds before expiry at which this provider's tokens count as expired, overriding the
    /// service-wide refresh margin.
    pub token_expiration_buffer: Option<u64>,
    /// How many days the provider documents an unused refresh token to live: the scheduler's
    /// keep-alive refreshes such connections after half of it, instead of after
    /// `GRANTLINE_REFRESH_IDLE_AFTER` (a Grantline field, not in Nango's format).
    pub refresh_token_idle_days: Option<u32>,
    /// OAuth 1.0a: the request-token endpoint.
    pub request_url: Option<String>,
    /// OAuth 1.0a: extra parameters of the request-token call.
    pub request_params: BTreeMap<String, String>,
    /// OAuth 1.0a: how requests are signed (`HmacSha1` when the YAML does not say); `None` for
    /// OAuth 2.0.
    pub signature_method: Option<SignatureMethod>,
    /// The provider's own OAuth documentation.
    pub docs: Option<String>,
    /// Its API: base URL, how a credential goes into a request, how one is verified.
    pub proxy: Proxy,
}

/// Provider templates by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    templates: BTreeMap<String, Template>,
    skipped: BTreeMap<String, String>,
}

const BUILTIN_SOURCE: &str = "built-in providers.yaml";
const BUILTIN_YAML: &str = include_str!("catalog/providers.yaml");

/// Nango auth modes that Grantline does not serve yet: entries using them are skipped, not
/// rejected, so that a copy of a larger providers file still loads.
const UNSERVED_AUTH_MODES: &[&str] = &[
    "APP",
    "APP_STORE",
    "CUSTOM",
    "NONE",
    "TBA",
    "TABLEAU",
    "JWT",
    "BILL",
    "TWO_STEP",
    "SIGNATURE",
    "MCP_OAUTH2",
    "MCP_OAUTH2_GENERIC",
    "INSTALL_PLUGIN",
    "AWS_SIGV4",
];

impl Catalog {
    /// The catalog embedded in the binary.
    pub fn builtin() -> Catalog {
        static BUILTIN: OnceLock<Catalog> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                let raw = builtin_raw();
                let resolved = Catalog::resolve(BUILTIN_SOURCE, raw, None);
                // The embedded file is fixed at build time and the unit tests load it.
                resolved.expect("the embedded providers.yaml is valid (checked by unit tests)")
            })
            .clone()
    }

    /// The built-in catalog plus the entries of the YAML file at `path`, which are added or
    /// replace built-in entries of the same name.
    pub fn with_file(path: &Path) -> Result<Catalog, CatalogError> {
        let source_name = path.display().to_string();
        let yaml = std::fs::read_to_string(path).map_err(|error| CatalogError::Io {
            path: source_name.clone(),
            message: error.to_string(),
        })?;
        let file = Catalog::from_yaml(&source_name, &yaml)?;
        Ok(Catalog::builtin().merged(file))
    }

    /// Only the entries of `yaml`; aliases may still name built-in entries. `source_name`
    /// (usually the file path) names the source in errors.
    pub fn from_yaml(source_name: &str, yaml: &str) -> Result<Catalog, CatalogError> {
        let raw = parse_raw(source_name, yaml)?;
        Catalog::resolve(source_name, &raw, Some(builtin_raw()))
    }

    /// `self` with the entries of `overrides` added or replacing. A name that `overrides`
    /// skipped (unserved auth mode) is removed, since the later definition wins.
    pub fn merged(mut self, overrides: Catalog) -> Catalog {
        for name in overrides.skipped.keys() {
            self.templates.remove(name);
        }
        for name in overrides.templates.keys() {
            self.skipped.remove(name);
        }
        self.templates.extend(overrides.templates);
        self.skipped.extend(overrides.skipped);
        self
    }

    /// The template named `name`.
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// Template names, in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }

    /// The templates, in name order.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.templates.values()
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Whether the catalog has no template.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Entries left out because Grantline does not serve their auth mode yet, as
    /// `(name, auth_mode)` in name order.
    pub fn skipped(&self) -> impl Iterator<Item = (&str, &str)> {
        self.skipped
            .iter()
            .map(|(name, mode)| (name.as_str(), mode.as_str()))
    }

    fn resolve(
        source_name: &str,
        raw: &RawFile,
        fallback: Option<&RawFile>,
    ) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        for name in raw.keys() {
            let entry_error = |problem: String| CatalogError::Entry {
                source_name: source_name.to_owned(),
                entry: name.clone(),
                problem,
            };
            let resolved =
                resolve_alias(name, raw, fallback, &mut Vec::new()).map_err(entry_error)?;
            match build(name, resolved).map_err(entry_error)? {
                Built::Template(template) => {
                    catalog.templates.insert(name.clone(), *template);
                }
                Built::Skipped(mode) => {
                    catalog.skipped.insert(name.clone(), mode);
                }
            }
        }
        Ok(catalog)
    }
}

/// A catalog that cannot be loaded. Every message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// The file cannot be read.
    #[error("cannot read the providers file {path}: {message}")]
    Io {
        /// The path as given.
        path: String,
        /// The operating system's reason.
        message: String,
    },
    /// The file is not YAML, or not a map of provider templates of the expected shapes.
    #[error("the providers file {source_name} is not valid: {message}")]
    Yaml {
        /// The file (or `built-in providers.yaml`).
        source_name: String,
        /// What is wrong, with line, column and, when known, the entry.
        message: String,
    },
    /// An entry is well-formed YAML but not a usable template.
    #[error("the providers file {source_name}, entry `{entry}`: {problem}")]
    Entry {
        /// The file (or `built-in providers.yaml`).
        source_name: String,
        /// The provider name.
        entry: String,
        /// What is wrong.
        problem: String,
    },
}

// ---- YAML shapes ---------------------------------------------------------------------------

type RawFile = BTreeMap<String, RawTemplate>;

/// Parameter values keep their YAML text; a null is read so that the error can name the key.
type RawParams = BTreeMap<String, Option<String>>;

/// One entry as written: every field optional so that aliases can be overlaid field by field.
/// Fields not listed here are ignored by serde.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RawTemplate {
    alias: Option<String>,
    display_name: Option<String>,
    auth_mode: Option<String>,
    authorization_url: Option<String>,
    token_url: Option<RawUrl>,
    refresh_url: Option<String>,
    authorization_params: Option<RawParams>,
    token_params: Option<RawParams>,
    refresh_params: Option<RawParams>,
    scope_separator: Option<String>,
    default_scopes: Option<Vec<String>>,
    authorization_method: Option<String>,
    token_request_auth_method: Option<String>,
    body_format: Option<String>,
    disable_pkce: Option<bool>,
    token_response_metadata: Option<Vec<String>>,
    redirect_uri_metadata: Option<Vec<String>>,
    token_expiration_buffer: Option<u64>,
    refresh_token_idle_days: Option<u32>,
    request_url: Option<String>,
    request_params: Option<RawParams>,
    signature_method: Option<String>,
    docs: Option<String>,
    proxy: Option<proxy::RawProxy>,
}

/// `token_url` is a string, or (in later Nango files) a map keyed by auth mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawUrl {
    One(String),
    ByMode(BTreeMap<String, String>),
}

impl RawTemplate {
    /// `self`'s fields, falling back to `base`'s. The alias itself is consumed.
    fn over(self, base: RawTemplate) -> RawTemplate {
        RawTemplate {
            alias: None,
            display_name: self.display_name.or(base.display_name),
            auth_mode: self.auth_mode.or(base.auth_mode),
            authorization_url: self.authorization_url.or(base.authorization_url),
            token_url: self.token_url.or(base.token_url),
            refresh_url: self.refresh_url.or(base.refresh_url),
            authorization_params: self.authorization_params.or(base.authorization_params),
            token_params: self.token_params.or(base.token_params),
            refresh_params: self.refresh_params.or(base.refresh_params),
            scope_separator: self.scope_separator.or(base.scope_separator),
            default_scopes: self.default_scopes.or(base.default_scopes),
            authorization_method: self.authorization_method.or(base.authorization_method),
            token_request_auth_method: self
                .token_request_auth_method
                .or(base.token_request_auth_method),
            body_format: self.body_format.or(base.body_format),
            disable_pkce: self.disable_pkce.or(base.disable_pkce),
            token_response_metadata: self
                .token_response_metadata
                .or(base.token_response_metadata),
            redirect_uri_metadata: self.redirect_uri_metadata.or(base.redirect_uri_metadata),
            token_expiration_buffer: self
                .token_expiration_buffer
                .or(base.token_expiration_buffer),
            refresh_token_idle_days: self
                .refresh_token_idle_days
                .or(base.refresh_token_idle_days),
            request_url: self.request_url.or(base.request_url),
            request_params: self.request_params.or(base.request_params),
            signature_method: self.signature_method.or(base.signature_method),
            proxy: self.proxy.or(base.proxy),
            docs: self.docs.or(base.docs),
        }
    }
}

fn builtin_raw() -> &'static RawFile {
    static RAW: OnceLock<RawFile> = OnceLock::new();
    RAW.get_or_init(|| {
        // The embedded file is fixed at build time and the unit tests load it.
        parse_raw(BUILTIN_SOURCE, BUILTIN_YAML)
            .expect("the embedded providers.yaml is valid YAML (checked by unit tests)")
    })
}

fn parse_raw(source_name: &str, yaml: &str) -> Result<RawFile, CatalogError> {
    let entries: BTreeMap<String, Option<RawTemplate>> =
        serde_saphyr::from_str(yaml).map_err(|error| {
            let entry = error
                .location()
                .and_then(|location| entry_at_line(yaml, location.line()));
            let message = error.without_snippet().to_string();
            CatalogError::Yaml {
                source_name: source_name.to_owned(),
                message: match entry {
                    Some(entry) => format!("{message} (in entry `{entry}`)"),
                    None => message,
                },
            }
        })?;
    entries
        .into_iter()
        .map(|(name, entry)| match entry {
            Some(entry) => Ok((name, entry)),
            None => Err(CatalogError::Entry {
                source_name: source_name.to_owned(),
                entry: name,
                problem: "the entry is empty".to_owned(),
            }),
        })
        .collect()
}

/// The top-level key whose block holds `line` (1-based), for error messages.
fn entry_at_line(yaml: &str, line: u64) -> Option<String> {
    let line = usize::try_from(line).ok()?;
    yaml.lines()
        .take(line)
        .filter(|text| {
            !text.starts_with([' ', '\t', '#', '-'])
                && !text.trim().is_empty()
                && text.contains(':')
        })
        .last()
        .and_then(|text| text.split(':').next())
        .map(|key| key.trim().trim_matches(['"', '\'']).to_owned())
        .filter(|key| !key.is_empty())
}

// ---- Resolution ----------------------------------------------------------------------------

/// `name`'s entry with its alias chain applied. `stack` holds the names being resolved in
/// `file`, to find cycles. An alias is looked up in `file`, then in `fallback` (the built-in
/// catalog); an alias to the entry's own name goes straight to `fallback`.
fn resolve_alias(
    name: &str,
    file: &RawFile,
    fallback: Option<&RawFile>,
    stack: &mut Vec<String>,
) -> Result<RawTemplate, String> {
    let Some(entry) = file.get(name) else {
        return Err(format!("no provider named `{name}`"));
    };
    let Some(target) = entry.alias.clone() else {
        return Ok(entry.clone());
    };
    stack.push(name.to_owned());
    let base = if target != name && file.contains_key(&target) {
        if stack.contains(&target) {
            let mut chain = stack.clone();
            chain.push(target);
            return Err(format!("alias cycle: {}", chain.join(" → ")));
        }
        resolve_alias(&target, file, fallback, stack)?
    } else if let Some(builtin) = fallback.filter(|builtin| builtin.contains_key(&target)) {
        resolve_alias(&target, builtin, None, &mut Vec::new())?
    } else if target == name {
        return Err(format!(
            "alias `{target}` names the entry itself and there is no built-in entry of that name"
        ));
    } else {
        return Err(format!(
            "alias `{target}` names no provider in this file or the built-in catalog"
        ));
    };
    stack.pop();
    Ok(entry.clone().over(base))
}

enum Built {
    Template(Box<Template>),
    Skipped(String),
}

/// A template's `display_name`: 1 to 255 characters that display as they read
/// ([`crate::bounds::displayable`]), or none.
fn display_name(name: Option<String>) -> Result<Option<String>, String> {
    match name {
        Some(name) if name.trim().is_empty() => Ok(None),
        Some(name) if name.chars().count() > 255 || !crate::bounds::displayable(&name) => Err(
            "display_name must be at most 255 characters, without control, bidirectional or \
             zero-width characters"
                .to_owned(),
        ),
        name => Ok(name),
    }
}

fn build(name: &str, raw: RawTemplate) -> Result<Built, String> {
    let auth_mode = match raw.auth_mode.as_deref() {
        None => return Err("auth_mode is missing".to_owned()),
        Some("OAUTH2") => AuthMode::OAuth2,
        Some("OAUTH1") => AuthMode::OAuth1,
        Some("API_KEY") => AuthMode::ApiKey,
        Some("BASIC") => AuthMode::Basic,
        Some("OAUTH2_CC") => AuthMode::OAuth2Cc,
        Some(mode) if UNSERVED_AUTH_MODES.contains(&mode) => {
            return Ok(Built::Skipped(mode.to_owned()));
        }
        Some(mode) => {
            return Err(format!(
                "auth_mode `{mode}` is unknown (Grantline serves OAUTH2, OAUTH1, OAUTH2_CC, API_KEY and BASIC)"
            ));
        }
    };

    if matches!(auth_mode, AuthMode::ApiKey | AuthMode::Basic) {
        return Ok(Built::Template(Box::new(Template {
            name: name.to_owned(),
            display_name: display_name(raw.display_name)?,
            auth_mode,
            proxy: raw.proxy.unwrap_or_default().build()?,
            docs: raw.docs,
            ..Template::default()
        })));
    }
    // A client-credentials grant has no browser step.
    let authorization_url = if auth_mode == AuthMode::OAuth2Cc {
        optional_url("authorization_url", raw.authorization_url)?.unwrap_or_default()
    } else {
        required_url("authorization_url", raw.authorization_url)?
    };
    let token_url = match raw.token_url {
        None => None,
        Some(RawUrl::One(url)) => Some(url),
        Some(RawUrl::ByMode(mut by_mode)) => {
            let url = by_mode.remove(auth_mode.as_str());
            if url.is_none() {
                return Err(format!("token_url has no {} entry", auth_mode.as_str()));
            }
            url
        }
    };
    let token_url = required_url("token_url", token_url)?;
    let refresh_url = optional_url("refresh_url", raw.refresh_url)?;
    let request_url = optional_url("request_url", raw.request_url)?;
    if auth_mode == AuthMode::OAuth1 && request_url.is_none() {
        return Err("request_url is missing (OAUTH1 needs it)".to_owned());
    }

    let mut authorization_method = match raw.authorization_method.as_deref() {
        None => AuthorizationMethod::Body,
        Some(method) if method.eq_ignore_ascii_case("body") => AuthorizationMethod::Body,
        Some(method) if method.eq_ignore_ascii_case("header") => AuthorizationMethod::Header,
        Some(method) => {
            return Err(format!(
                "authorization_method `{method}` is not supported (use body or header)"
            ));
        }
    };
    match raw.token_request_auth_method.as_deref() {
        None => {}
        Some(method) if method.eq_ignore_ascii_case("basic") => {
            authorization_method = AuthorizationMethod::Header;
        }
        Some(method) if method.eq_ignore_ascii_case("private_key_jwt") => {
            if auth_mode != AuthMode::OAuth2Cc {
                return Err(
                    "token_request_auth_method `private_key_jwt` is for OAUTH2_CC templates \
                     (the key is the connection's)"
                        .to_owned(),
                );
            }
            authorization_method = AuthorizationMethod::PrivateKeyJwt;
        }
        Some(method) => {
            return Err(format!(
                "token_request_auth_method `{method}` is not supported (basic, or \
                 private_key_jwt for OAUTH2_CC)"
            ));
        }
    }
    let body_format = match raw.body_format.as_deref() {
        None => BodyFormat::Form,
        Some(format) if format.eq_ignore_ascii_case("form") => BodyFormat::Form,
        Some(format) if format.eq_ignore_ascii_case("json") => BodyFormat::Json,
        Some(format) => {
            return Err(format!(
                "body_format `{format}` is not supported (use form or json)"
            ));
        }
    };
    let signature_method = match (auth_mode, raw.signature_method.as_deref()) {
        (AuthMode::OAuth2 | AuthMode::ApiKey | AuthMode::Basic | AuthMode::OAuth2Cc, _) => None,
        (AuthMode::OAuth1, None) => Some(SignatureMethod::HmacSha1),
        (AuthMode::OAuth1, Some(method)) => Some(match method.to_ascii_uppercase().as_str() {
            "HMAC-SHA1" => SignatureMethod::HmacSha1,
            "RSA-SHA1" => SignatureMethod::RsaSha1,
            "PLAINTEXT" => SignatureMethod::Plaintext,
            _ => {
                return Err(format!(
                    "signature_method `{method}` is not supported (use HMAC-SHA1, RSA-SHA1 or PLAINTEXT)"
                ));
            }
        }),
    };

    Ok(Built::Template(Box::new(Template {
        name: name.to_owned(),
        display_name: display_name(raw.display_name)?,
        auth_mode,
        authorization_url,
        token_url,
        refresh_url,
        authorization_params: params("authorization_params", raw.authorization_params)?,
        token_params: params("token_params", raw.token_params)?,
        refresh_params: params("refresh_params", raw.refresh_params)?,
        scope_separator: raw.scope_separator.unwrap_or_else(|| " ".to_owned()),
        default_scopes: raw.default_scopes.unwrap_or_default(),
        authorization_method,
        body_format,
        disable_pkce: raw.disable_pkce.unwrap_or(false),
        token_response_metadata: raw.token_response_metadata.unwrap_or_default(),
        redirect_uri_metadata: raw.redirect_uri_metadata.unwrap_or_default(),
        token_expiration_buffer: raw.token_expiration_buffer,
        refresh_token_idle_days: raw.refresh_token_idle_days.filter(|days| *days > 0),
        request_url,
        request_params: params("request_params", raw.request_params)?,
        signature_method,
        docs: raw.docs,
        proxy: raw.proxy.unwrap_or_default().build()?,
    })))
}

fn params(field: &str, raw: Option<RawParams>) -> Result<BTreeMap<String, String>, String> {
    raw.unwrap_or_default()
        .into_iter()
        .map(|(key, value)| match value {
            Some(value) => Ok((key, value)),
            None => Err(format!(
                "{field}.{key} has no value (quote it if it is text)"
            )),
        })
        .collect()
}

fn required_url(field: &str, url: Option<String>) -> Result<String, String> {
    optional_url(field, url)?.ok_or_else(|| format!("{field} is missing"))
}

fn optional_url(field: &str, url: Option<String>) -> Result<Option<String>, String> {
    let Some(url) = url else { return Ok(None) };
    if url.trim().is_empty() {
        return Ok(None);
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{field} `{url}` contains whitespace"));
    }
    if !has_http_scheme(&url) && !url.starts_with("${") {
        return Err(format!(
            "{field} `{url}` does not start with https:// or http://"
        ));
    }
    // Check the placeholders now, so that an unsupported one fails at start-up, not at the
    // first connection.
    fill(&url, |_, _| Ok("")).map_err(|error| {
        format!(
            "{field} has an unsupported placeholder: {}",
            error.placeholder
        )
    })?;
    Ok(Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn entry_error(result: Result<Catalog, CatalogError>) -> (String, String, String) {
        match result {
            Err(CatalogError::Entry {
                source_name,
                entry,
                problem,
            }) => (source_name, entry, problem),
            other => panic!("expected an entry error, got {other:?}"),
        }
    }

    #[test]
    fn the_builtin_catalog_parses_with_at_least_forty_oauth2_entries() {
        let catalog = Catalog::builtin();
        let oauth2 = catalog
            .templates()
            .filter(|t| t.auth_mode == AuthMode::OAuth2)
            .count();
        assert!(oauth2 >= 40, "only {oauth2} OAUTH2 templates");
        assert!(catalog.templates().any(|t| t.auth_mode == AuthMode::OAuth1));
        assert_eq!(catalog.skipped().count(), 0);
    }

    #[test]
    fn every_builtin_entry_has_https_urls_and_its_providers_docs() {
        for template in Catalog::builtin().templates() {
            let urls = [
                Some(&template.authorization_url),
                Some(&template.token_url),
                template.refresh_url.as_ref(),
                template.request_url.as_ref(),
                template.docs.as_ref(),
            ];
            for url in urls.into_iter().flatten() {
                if url.is_empty() {
                    assert!(!template.auth_mode.is_oauth(), "{}", template.name);
                    continue;
                }
                assert!(url.starts_with("https://"), "{}: {url}", template.name);
            }
            if !template.auth_mode.is_oauth() {
                let base = template.proxy.base_url.as_deref().unwrap_or_default();
                assert!(base.starts_with("https://"), "{}: {base}", template.name);
                assert!(template.proxy.verification.is_some(), "{}", template.name);
            }
            assert!(template.docs.is_some(), "{} has no docs", template.name);
            assert!(
                template.display_name.is_some(),
                "{} has no display name",
                template.name
            );
            if template.auth_mode == AuthMode::OAuth1 {
                assert!(template.request_url.is_some(), "{}", template.name);
            }
        }
    }

    #[test]
    fn the_builtin_catalog_has_the_providers_grantline_promises() {
        let catalog = Catalog::builtin();
        let promised = [
            "github",
            "google",
            "microsoft",
            "slack",
            "salesforce",
            "hubspot",
            "notion",
            "zendesk",
            "shopify",
            "xero",
            "quickbooks",
            "atlassian",
            "jira",
            "confluence",
            "asana",
            "dropbox",
            "box",
            "linear",
            "gitlab",
            "bitbucket",
            "discord",
            "figma",
            "intercom",
            "zoom",
            "linkedin",
            "spotify",
            "twitch",
            "airtable",
            "calendly",
            "clickup",
            "docusign",
            "freshbooks",
            "front",
            "pipedrive",
            "reddit",
            "mailchimp",
            "monday",
            "miro",
            "pagerduty",
            "paypal",
            "stripe-connect",
            "strava",
            "typeform",
            "webflow",
            "wrike",
            "zoho",
            "twitter",
            "trello",
            "tumblr",
        ];
        for name in promised {
            assert!(catalog.get(name).is_some(), "{name} is missing");
        }
    }

    #[test]
    fn builtin_templates_carry_the_settings_their_providers_document() {
        let catalog = Catalog::builtin();
        let get = |name: &str| catalog.get(name).cloned().expect(name);

        let google = get("google");
        assert_eq!(google.authorization_params["access_type"], "offline");
        assert_eq!(google.authorization_params["prompt"], "consent");
        assert!(get("microsoft").authorization_url.contains("/common/"));
        assert_eq!(get("slack").scope_separator, ",");
        assert_eq!(
            get("salesforce").token_response_metadata,
            vec!["instance_url".to_owned()]
        );
        assert_eq!(
            get("notion").authorization_method,
            AuthorizationMethod::Header
        );
        assert_eq!(
            get("zendesk").authorization_url,
            "https://${connectionConfig.subdomain}.zendesk.com/oauth/authorizations/new"
        );
        assert!(
            get("shopify")
                .token_url
                .starts_with("https://${connectionConfig.shop}.myshopify.com/admin/oauth/")
        );
        assert_eq!(
            get("dropbox").authorization_params["token_access_type"],
            "offline"
        );
        assert_eq!(get("github").scope_separator, " ");
        let trello = get("trello");
        assert_eq!(trello.auth_mode, AuthMode::OAuth1);
        assert_eq!(trello.signature_method, Some(SignatureMethod::HmacSha1));
    }

    #[test]
    fn builtin_aliases_inherit_their_target() {
        let catalog = Catalog::builtin();
        let atlassian = catalog.get("atlassian").expect("atlassian");
        let jira = catalog.get("jira").expect("jira");
        assert_eq!(jira.name, "jira");
        assert_eq!(jira.authorization_url, atlassian.authorization_url);
        assert_eq!(jira.authorization_params, atlassian.authorization_params);
        let confluence = catalog.get("confluence").expect("confluence");
        assert_eq!(confluence.token_url, atlassian.token_url);
        assert_ne!(confluence.docs, atlassian.docs, "its own docs override");
        let sandbox = catalog
            .get("salesforce-sandbox")
            .expect("salesforce-sandbox");
        assert!(
            sandbox
                .token_url
                .starts_with("https://test.salesforce.com/")
        );
        assert_eq!(
            sandbox.token_response_metadata,
            vec!["instance_url".to_owned()]
        );
    }

    #[test]
    fn a_user_file_adds_an_entry_and_overrides_a_builtin_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("providers.yaml");
        std::fs::write(
            &path,
            "acme:\n  auth_mode: OAUTH2\n  authorization_url: https://acme.example/authorize\n  \
             token_url: https://acme.example/token\n\
             github:\n  auth_mode: OAUTH2\n  authorization_url: https://ghe.example/login/oauth/authorize\n  \
             token_url: https://ghe.example/login/oauth/access_token\n",
        )
        .expect("write");

        let catalog = Catalog::with_file(&path).expect("loads");

        assert_eq!(catalog.len(), Catalog::builtin().len() + 1);
        assert_eq!(
            catalog.get("acme").map(|t| t.token_url.as_str()),
            Some("https://acme.example/token")
        );
        let github = catalog.get("github").expect("github");
        assert_eq!(
            github.authorization_url,
            "https://ghe.example/login/oauth/authorize"
        );
        assert_eq!(github.docs, None, "the whole built-in entry is replaced");
        assert!(catalog.get("google").is_some());
    }

    #[test]
    fn an_alias_inherits_its_target_and_its_own_keys_override() {
        let yaml = "\
base:
  auth_mode: OAUTH2
  authorization_url: https://base.example/authorize
  token_url: https://base.example/token
  scope_separator: ','
  authorization_params:
    prompt: consent
child:
  alias: base
  token_url: https://child.example/token
  authorization_params:
    audience: api
";
        let catalog = Catalog::from_yaml("test.yaml", yaml).expect("loads");
        let child = catalog.get("child").expect("child");

        assert_eq!(child.name, "child");
        assert_eq!(child.authorization_url, "https://base.example/authorize");
        assert_eq!(child.token_url, "https://child.example/token");
        assert_eq!(child.scope_separator, ",");
        assert_eq!(child.authorization_params, params(&[("audience", "api")]));
    }

    #[test]
    fn a_user_alias_can_inherit_a_builtin_entry_including_one_of_its_own_name() {
        let yaml = "\
my-google:
  alias: google
  authorization_params:
    prompt: select_account
github:
  alias: github
  scope_separator: ','
";
        let catalog = Catalog::from_yaml("test.yaml", yaml).expect("loads");
        let builtin = Catalog::builtin();

        let mine = catalog.get("my-google").expect("my-google");
        assert_eq!(
            mine.token_url,
            builtin.get("google").expect("google").token_url
        );
        assert_eq!(
            mine.authorization_params,
            params(&[("prompt", "select_account")])
        );
        let github = catalog.get("github").expect("github");
        assert_eq!(github.scope_separator, ",");
        assert_eq!(
            github.token_url,
            builtin.get("github").expect("github").token_url
        );
    }

    #[test]
    fn an_alias_to_an_unknown_entry_is_an_error_naming_the_entry() {
        let result = Catalog::from_yaml("test.yaml", "orphan:\n  alias: nowhere-at-all\n");
        let (source, entry, problem) = entry_error(result);
        assert_eq!((source.as_str(), entry.as_str()), ("test.yaml", "orphan"));
        assert!(problem.contains("nowhere-at-all"), "{problem}");
    }

    #[test]
    fn an_alias_cycle_is_an_error_naming_the_entry() {
        let yaml = "a:\n  alias: b\nb:\n  alias: c\nc:\n  alias: a\n";
        let error = Catalog::from_yaml("cycle.yaml", yaml).expect_err("cycle");
        let text = error.to_string();
        let (_, entry, problem) = entry_error(Err(error));
        assert_eq!(entry, "a");
        assert!(
            problem.contains("cycle") && problem.contains("a → b → c → a"),
            "{problem}"
        );
        assert!(
            text.contains("cycle.yaml") && text.contains("`a`"),
            "{text}"
        );

        let (_, entry, _) = entry_error(Catalog::from_yaml("self.yaml", "loop:\n  alias: loop\n"));
        assert_eq!(entry, "loop");
    }

    #[test]
    fn a_missing_token_url_names_the_file_and_the_entry() {
        let yaml = "acme:\n  auth_mode: OAUTH2\n  authorization_url: https://acme.example/a\n";
        let error = Catalog::from_yaml("/etc/grantline/providers.yaml", yaml).expect_err("error");
        let text = error.to_string();
        assert!(text.contains("/etc/grantline/providers.yaml"), "{text}");
        assert!(text.contains("`acme`"), "{text}");
        assert!(text.contains("token_url is missing"), "{text}");
    }

    #[test]
    fn oauth1_needs_a_request_url() {
        let yaml = "old:\n  auth_mode: OAUTH1\n  authorization_url: https://old.example/a\n  \
                    token_url: https://old.example/t\n";
        let (_, entry, problem) = entry_error(Catalog::from_yaml("f.yaml", yaml));
        assert_eq!(entry, "old");
        assert!(problem.contains("request_url"), "{problem}");
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let error =
            Catalog::from_yaml("broken.yaml", "acme:\n  auth_mode: [OAUTH2\n").expect_err("error");
        assert!(matches!(error, CatalogError::Yaml { .. }), "{error:?}");
        assert!(error.to_string().contains("broken.yaml"), "{error}");

        let error = Catalog::from_yaml("list.yaml", "- github\n").expect_err("not a map");
        assert!(error.to_string().contains("list.yaml"), "{error}");
    }

    #[test]
    fn a_wrongly_shaped_field_names_the_file_and_the_entry() {
        let yaml =
            "fine:\n  auth_mode: OAUTH2\nbad:\n  auth_mode: OAUTH2\n  token_params: [a, b]\n";
        let error = Catalog::from_yaml("shape.yaml", yaml).expect_err("error");
        let text = error.to_string();
        assert!(
            text.contains("shape.yaml") && text.contains("`bad`"),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_file_names_its_path() {
        let error = Catalog::with_file(Path::new("/nonexistent/grantline/providers.yaml"))
            .expect_err("missing file");
        assert!(matches!(error, CatalogError::Io { .. }));
        assert!(
            error
                .to_string()
                .contains("/nonexistent/grantline/providers.yaml")
        );
    }

    #[test]
    fn an_empty_file_is_an_empty_catalog() {
        let catalog = Catalog::from_yaml("empty.yaml", "# nothing yet\n").expect("loads");
        assert!(catalog.is_empty());
    }

    #[test]
    fn interpolation_fills_connection_config_placeholders() {
        let filled = interpolate(
            "https://${connectionConfig.subdomain}.zendesk.com/oauth/${connectionConfig.path}",
            &params(&[("subdomain", "acme"), ("path", "tokens")]),
        );
        assert_eq!(
            filled.as_deref(),
            Ok("https://acme.zendesk.com/oauth/tokens")
        );
    }

    #[test]
    fn interpolation_fills_the_old_params_placeholders() {
        let filled = interpolate(
            "https://${connectionConfig.params.subdomain}.zendesk.com",
            &params(&[("subdomain", "acme")]),
        );
        assert_eq!(filled.as_deref(), Ok("https://acme.zendesk.com"));
    }

    #[test]
    fn interpolation_reports_the_missing_placeholder() {
        let text = "https://${connectionConfig.subdomain}.zendesk.com";
        let error = interpolate(text, &params(&[("other", "x")])).expect_err("missing");
        assert_eq!(error.placeholder, "${connectionConfig.subdomain}");
        assert_eq!(error.key(), Some("subdomain"));
        assert!(error.to_string().contains("${connectionConfig.subdomain}"));

        let empty = interpolate(text, &params(&[("subdomain", "")])).expect_err("empty");
        assert_eq!(empty.placeholder, "${connectionConfig.subdomain}");
    }

    #[test]
    fn interpolation_rejects_expressions_it_cannot_fill() {
        let values = params(&[("x", "1")]);
        for text in [
            "${credentials.x}",
            "a ${connectionConfig.x",
            "${connectionConfig.}",
        ] {
            assert!(interpolate(text, &values).is_err(), "{text}");
        }
        assert_eq!(
            interpolate("no placeholders", &values).as_deref(),
            Ok("no placeholders")
        );
        let inserted = interpolate(
            "${connectionConfig.x}",
            &params(&[("x", "${connectionConfig.x}")]),
        );
        assert_eq!(
            inserted.as_deref(),
            Ok("${connectionConfig.x}"),
            "values are not rescanned"
        );
    }

    #[test]
    fn url_interpolation_stops_values_that_would_change_the_host() {
        let url = "https://${connectionConfig.subdomain}.zendesk.com/oauth/tokens";
        assert_eq!(
            interpolate_url(url, &params(&[("subdomain", "acme-eu")])).as_deref(),
            Ok("https://acme-eu.zendesk.com/oauth/tokens")
        );
        for evil in [
            "evil.example/x?",
            "evil.example#",
            "user@evil.example",
            "a b",
        ] {
            assert!(
                matches!(
                    interpolate_url(url, &params(&[("subdomain", evil)])),
                    Err(UrlInterpolationError::UnsafeValue { .. })
                ),
                "{evil}"
            );
        }
        assert!(matches!(
            interpolate_url(url, &BTreeMap::new()),
            Err(UrlInterpolationError::Missing(_))
        ));

        let based = "${connectionConfig.base_url}/oauth/token";
        assert_eq!(
            interpolate_url(
                based,
                &params(&[("base_url", "https://id.example:8443/sso")])
            )
            .as_deref(),
            Ok("https://id.example:8443/sso/oauth/token")
        );
        for evil in [
            "https://evil.example?",
            "ftp://x.example",
            "https://a@evil.example",
            "evil",
        ] {
            assert!(
                interpolate_url(based, &params(&[("base_url", evil)])).is_err(),
                "{evil}"
            );
        }
    }

    #[test]
    fn token_request_auth_method_basic_means_header_client_auth() {
        let entry = |name: &str, extra: &str| {
            format!(
                "{name}:\n  auth_mode: OAUTH2\n  authorization_url: https://x.example/a\n  \
                 token_url: https://x.example/t\n{extra}"
            )
        };
        let yaml = [
            entry("basic", "  token_request_auth_method: basic\n"),
            entry("header", "  authorization_method: header\n"),
            entry("plain", ""),
        ]
        .concat();
        let catalog = Catalog::from_yaml("f.yaml", &yaml).expect("loads");
        let method = |name: &str| catalog.get(name).map(|t| t.authorization_method);
        assert_eq!(method("basic"), Some(AuthorizationMethod::Header));
        assert_eq!(method("header"), Some(AuthorizationMethod::Header));
        assert_eq!(method("plain"), Some(AuthorizationMethod::Body));
        let cc = "jwt:\n  auth_mode: OAUTH2_CC\n  token_url: https://x.example/t\n  \
                  token_request_auth_method: private_key_jwt\n";
        let catalog = Catalog::from_yaml("f.yaml", cc).expect("loads");
        assert_eq!(
            catalog.get("jwt").map(|t| t.authorization_method),
            Some(AuthorizationMethod::PrivateKeyJwt)
        );
    }

    #[test]
    fn numbers_and_bools_in_params_are_stringified() {
        let yaml = "\
acme:
  auth_mode: OAUTH2
  authorization_url: https://acme.example/authorize
  token_url: https://acme.example/token
  authorization_params:
    version: 2.0
    max_age: 3600
    force: true
    code: 0012
  token_params:
    single_use: false
  token_expiration_buffer: 120
  disable_pkce: true
  body_format: json
";
        let catalog = Catalog::from_yaml("f.yaml", yaml).expect("loads");
        let acme = catalog.get("acme").expect("acme");
        assert_eq!(
            acme.authorization_params,
            params(&[
                ("version", "2.0"),
                ("max_age", "3600"),
                ("force", "true"),
                ("code", "0012")
            ])
        );
        assert_eq!(acme.token_params, params(&[("single_use", "false")]));
        assert_eq!(acme.token_expiration_buffer, Some(120));
        assert!(acme.disable_pkce);
        assert_eq!(acme.body_format, BodyFormat::Json);
    }

    #[test]
    fn a_param_without_a_value_is_an_error_naming_it() {
        let yaml = "acme:\n  auth_mode: OAUTH2\n  authorization_url: https://a.example/a\n  \
                    token_url: https://a.example/t\n  authorization_params:\n    prompt: ~\n";
        let (_, entry, problem) = entry_error(Catalog::from_yaml("f.yaml", yaml));
        assert_eq!(entry, "acme");
        assert!(problem.contains("authorization_params.prompt"), "{problem}");
    }

    #[test]
    fn unknown_fields_of_later_nango_files_are_ignored_and_the_display_name_kept() {
        let yaml = "\
acme:
  display_name: Acme
  categories: [crm, support]
  auth_mode: OAUTH2
  authorization_url: https://${connectionConfig.subdomain}.acme.example/authorize
  token_url:
    OAUTH2: https://${connectionConfig.subdomain}.acme.example/token
    APP: https://acme.example/app-token
  proxy:
    base_url: https://api.acme.example
    headers: {x-version: 3}
    retry: {at: [429, 503]}
  connection_config:
    subdomain:
      type: string
      title: Subdomain
      pattern: '^[a-z0-9-]+$'
  docs_connect: https://docs.example/connect
  webhook_routing_script: acmeWebhookRouting
";
        let catalog = Catalog::from_yaml("f.yaml", yaml).expect("loads");
        let acme = catalog.get("acme").expect("acme");
        assert_eq!(
            acme.token_url,
            "https://${connectionConfig.subdomain}.acme.example/token"
        );
        assert_eq!(acme.display_name.as_deref(), Some("Acme"));
    }

    #[test]
    fn unserved_auth_modes_are_skipped_and_reported() {
        let yaml = "\
keyed:
  auth_mode: TBA
github:
  auth_mode: APP
acme:
  auth_mode: OAUTH2
  authorization_url: https://acme.example/a
  token_url: https://acme.example/t
";
        let file = Catalog::from_yaml("f.yaml", yaml).expect("loads");
        assert_eq!(file.names().collect::<Vec<_>>(), vec!["acme"]);
        assert_eq!(
            file.skipped().collect::<Vec<_>>(),
            vec![("github", "APP"), ("keyed", "TBA")]
        );

        let merged = Catalog::builtin().merged(file);
        assert!(merged.get("github").is_none(), "the file's definition wins");
        assert!(merged.get("acme").is_some());
    }

    #[test]
    fn api_key_and_basic_templates_read_their_proxy_section() {
        let yaml = "\
keyed:
  auth_mode: API_KEY
  proxy:
    base_url: https://${connectionConfig.subdomain}.keyed.example
    headers:
      authorization: Bearer ${apiKey}
    query:
      team: ${connectionConfig.team}
    verification:
      endpoints: [/me, /other]
plain:
  auth_mode: BASIC
cc:
  auth_mode: OAUTH2_CC
  token_url: https://cc.example/token
";
        let file = Catalog::from_yaml("f.yaml", yaml).expect("loads");
        let keyed = file.get("keyed").expect("keyed");
        assert_eq!(keyed.auth_mode, AuthMode::ApiKey);
        assert_eq!(keyed.proxy.headers["authorization"], "Bearer ${apiKey}");
        let verification = keyed.proxy.verification.as_ref().expect("verification");
        assert_eq!(
            (verification.method.as_str(), verification.endpoint.as_str()),
            ("GET", "/me")
        );
        assert_eq!(file.get("plain").expect("plain").auth_mode, AuthMode::Basic);
        let cc = file.get("cc").expect("cc");
        assert_eq!(
            (cc.auth_mode, cc.authorization_url.as_str()),
            (AuthMode::OAuth2Cc, "")
        );
        let no_token_url = Catalog::from_yaml("f.yaml", "cc:\n  auth_mode: OAUTH2_CC\n");
        assert!(entry_error(no_token_url).2.contains("token_url is missing"));
        let filled = fill_with(
            "Bearer ${apiKey} ${connectionConfig.team}",
            |name| match name {
                "apiKey" => Some("k"),
                "connectionConfig.team" => Some("t"),
                _ => None,
            },
        );
        assert_eq!(filled.expect("filled"), "Bearer k t");
        assert!(fill_with("${password}", |_| None).is_err());

        for (bad, problem) in [
            ("headers:\n      x: ${secret}", "unsupported placeholder"),
            ("verification:\n      endpoints: [me]", "must be a path"),
            (
                "verification:\n      method: DELETE\n      endpoints: [/me]",
                "DELETE",
            ),
            ("base_url: ftp://x", "https://"),
        ] {
            let yaml = format!(
                "k:\n  auth_mode: API_KEY\n  proxy:\n    base_url: https://k.example\n    {bad}\n"
            );
            let yaml = yaml.replace("base_url: https://k.example\n    base_url", "base_url");
            let (_, entry, message) = entry_error(Catalog::from_yaml("f.yaml", &yaml));
            assert_eq!(entry, "k");
            assert!(message.contains(problem), "{bad}: {message}");
        }
    }

    #[test]
    fn an_unknown_auth_mode_is_an_error_naming_it() {
        let (_, entry, problem) =
            entry_error(Catalog::from_yaml("f.yaml", "acme:\n  auth_mode: oauth3\n"));
        assert_eq!(entry, "acme");
        assert!(problem.contains("oauth3"), "{problem}");
        let (_, _, problem) = entry_error(Catalog::from_yaml("f.yaml", "acme:\n  docs: x\n"));
        assert!(problem.contains("auth_mode is missing"), "{problem}");
    }

    #[test]
    fn urls_must_be_http_with_supported_placeholders() {
        let entry = |url: &str| {
            format!(
                "acme:\n  auth_mode: OAUTH2\n  authorization_url: {url}\n  token_url: https://acme.example/t\n"
            )
        };
        let (_, _, problem) = entry_error(Catalog::from_yaml("f.yaml", &entry("acme.example/a")));
        assert!(problem.contains("authorization_url"), "{problem}");
        let (_, _, problem) = entry_error(Catalog::from_yaml(
            "f.yaml",
            &entry("https://${credentials.apiKey}.example"),
        ));
        assert!(problem.contains("${credentials.apiKey}"), "{problem}");
        assert!(Catalog::from_yaml("f.yaml", &entry("http://localhost:8080/a")).is_ok());
        assert!(Catalog::from_yaml("f.yaml", &entry("${connectionConfig.base}/a")).is_ok());
    }

    #[test]
    fn unsupported_client_auth_and_body_formats_are_errors_naming_the_entry() {
        let base = "acme:\n  auth_mode: OAUTH2\n  authorization_url: https://a.example/a\n  \
                    token_url: https://a.example/t\n";
        for (extra, word) in [
            ("  body_format: query\n", "query"),
            (
                "  token_request_auth_method: private_key_jwt\n",
                "private_key_jwt",
            ),
            ("  token_request_auth_method: custom\n", "custom"),
            ("  authorization_method: cookie\n", "cookie"),
        ] {
            let (_, entry, problem) =
                entry_error(Catalog::from_yaml("f.yaml", &format!("{base}{extra}")));
            assert_eq!(entry, "acme");
            assert!(problem.contains(word), "{problem}");
        }
    }

    #[test]
    fn an_oauth1_entry_reads_its_signature_method() {
        let yaml = "\
old:
  auth_mode: OAUTH1
  request_url: https://old.example/request
  authorization_url: https://old.example/authorize
  token_url: https://old.example/access
  signature_method: PLAINTEXT
  request_params:
    x_auth_access_type: read
";
        let catalog = Catalog::from_yaml("f.yaml", yaml).expect("loads");
        let old = catalog.get("old").expect("old");
        assert_eq!(old.signature_method, Some(SignatureMethod::Plaintext));
        assert_eq!(
            old.request_params,
            params(&[("x_auth_access_type", "read")])
        );
    }
}
