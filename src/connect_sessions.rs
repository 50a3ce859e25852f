//! Connect sessions (Nango's `/connect/sessions`): made with the secret key, used by a browser
//! with the token they return. See [`domain::connect_session`] for what a session is and keeps.
//!
//! - A request body is checked whole before anything is stored: every integration it names
//!   must exist, tags follow Nango's rules, the end user's fields their bounds.
//! - The row is stored first, then the `ConnectSessionCreated` event; when the event cannot be
//!   written the row is deleted again, so a token is only ever handed out for a session the log
//!   knows. (A crash between the two leaves a row whose token nobody has; it expires.)
//! - Failures are [`SessionsError`]s; the HTTP layer decides what a client sees of them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::connect_session::{
    ConfigDefaults, ConnectSession, ConnectSessionEvent, EndUser, LIFETIME, Organization,
    Ownership, Reconnect, SessionToken, plausible_email, plausible_token, session_tags, token_hash,
};
use domain::connection::ConnectionKey;
use domain::event::DomainEvent;
use domain::store::{ExpectedVersion, StoreError};
use projections::ProjectionError;
use projections::queries;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::state::AppState;

/// Why a session could not be made, found or used.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// The body breaks a rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// A reconnect session names a connection that does not exist.
    #[error("ConnectionID or IntegrationId does not exists")]
    UnknownConnection,
    /// No live session has this token (never made, expired or deleted).
    #[error("unknown or expired connect session token")]
    UnknownToken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    ReadModel(#[from] ProjectionError),
}

/// The end user of a request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndUserBody {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
}

/// The organization of a request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrganizationBody {
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

/// One integration's defaults in a request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsBody {
    #[serde(default)]
    pub user_scopes: Option<String>,
    #[serde(default)]
    pub authorization_params: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub connection_config: Option<Map<String, Value>>,
}

/// `POST /connect/sessions` and, with `connection_id` and `integration_id`,
/// `POST /connect/sessions/reconnect`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    #[serde(default)]
    pub end_user: Option<EndUserBody>,
    #[serde(default)]
    pub organization: Option<OrganizationBody>,
    #[serde(default)]
    pub allowed_integrations: Option<Vec<String>>,
    #[serde(default)]
    pub integrations_config_defaults: Option<BTreeMap<String, DefaultsBody>>,
    #[serde(default)]
    pub overrides: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub webhook_url_override: Option<String>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// Reconnect only.
    #[serde(default)]
    pub connection_id: Option<String>,
    /// Reconnect only.
    #[serde(default)]
    pub integration_id: Option<String>,
}

/// A new session and its token.
#[derive(Debug)]
pub struct Created {
    pub token: SessionToken,
    pub session: ConnectSession,
}

fn invalid(message: impl Into<String>) -> SessionsError {
    SessionsError::Invalid(message.into())
}

fn check_len(value: &str, field: &str, min: usize, max: usize) -> Result<(), SessionsError> {
    let n = value.chars().count();
    if n < min || n > max || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must be {min} to {max} characters without control characters"
        )));
    }
    Ok(())
}

/// A name shown on the dashboard and the Connect page: at most 255 characters that display as
/// they read ([`domain::bounds::displayable`]).
fn check_display_name(value: &str, field: &str) -> Result<(), SessionsError> {
    if value.chars().count() > 255 || !domain::bounds::displayable(value) {
        return Err(invalid(format!(
            "{field} must be at most 255 characters without control, bidirectional or \
             zero-width characters"
        )));
    }
    Ok(())
}

/// Integration keys as Nango accepts them.
/// The most `authorization_params` a session's defaults may give an integration, and the
/// longest value (one of them, or `user_scopes`): they go into the provider's authorization
/// URL, which browsers and providers cut at a few kilobytes.
const MAX_AUTHORIZATION_PARAMS: usize = 32;
const MAX_AUTHORIZATION_VALUE: usize = 1024;

/// Refuses defaults that could not go into an authorization URL.
fn check_authorization_defaults(key: &str, given: &DefaultsBody) -> Result<(), SessionsError> {
    let fits = |text: &str| {
        text.chars().count() <= MAX_AUTHORIZATION_VALUE && !text.chars().any(char::is_control)
    };
    if given.user_scopes.as_deref().is_some_and(|s| !fits(s)) {
        return Err(invalid(format!(
            "integrations_config_defaults.{key}.user_scopes: at most {MAX_AUTHORIZATION_VALUE} \
             characters, none of them a control character"
        )));
    }
    let params = given.authorization_params.as_ref();
    if params.is_some_and(|p| {
        p.len() > MAX_AUTHORIZATION_PARAMS
            || p.iter().any(|(name, value)| {
                name.is_empty() || name.chars().count() > 64 || !fits(name) || !fits(value)
            })
    }) {
        return Err(invalid(format!(
            "integrations_config_defaults.{key}.authorization_params: at most \
             {MAX_AUTHORIZATION_PARAMS} parameters, names of 1 to 64 and values of at most \
             {MAX_AUTHORIZATION_VALUE} characters, no control characters"
        )));
    }
    Ok(())
}

fn check_integration_key(key: &str, field: &str) -> Result<(), SessionsError> {
    if crate::integrations::in_nango_key_charset(key) {
        Ok(())
    } else {
        Err(invalid(format!("{field}: invalid integration key {key:?}")))
    }
}

async fn check_integration_exists(
    state: &AppState,
    key: &str,
    field: &str,
) -> Result<(), SessionsError> {
    check_integration_key(key, field)?;
    match queries::find_integration(&state.read_models, key).await? {
        Some(_) => Ok(()),
        None => Err(invalid(format!("{field}: Integration does not exist"))),
    }
}

/// The end user of a body and the tags it makes: derived from the end user and its organization,
/// overlaid with `tags` (Nango's rules).
fn owner(
    end_user: Option<EndUserBody>,
    organization: Option<&OrganizationBody>,
    tags: Option<BTreeMap<String, String>>,
) -> Result<(Option<EndUser>, BTreeMap<String, String>), SessionsError> {
    // Sent alone, it would be dropped.
    if organization.is_some() && end_user.is_none() {
        return Err(invalid(
            "organization: it belongs to an end_user, and there is none",
        ));
    }
    let mut end_user_tags = BTreeMap::new();
    let end_user = match end_user {
        Some(user) => {
            check_len(&user.id, "end_user.id", 1, 255)?;
            if let Some(email) = &user.email
                && !plausible_email(email)
            {
                return Err(invalid("end_user.email must be an e-mail address"));
            }
            if let Some(name) = &user.display_name {
                check_display_name(name, "end_user.display_name")?;
            }
            end_user_tags = user.tags.unwrap_or_default();
            let organization = match organization {
                Some(org) => {
                    check_len(&org.id, "organization.id", 0, 255)?;
                    if let Some(name) = &org.display_name {
                        check_display_name(name, "organization.display_name")?;
                    }
                    Some(Organization {
                        id: org.id.clone(),
                        display_name: org.display_name.clone(),
                    })
                }
                None => None,
            };
            Some(EndUser {
                id: user.id,
                email: user.email,
                display_name: user.display_name,
                organization,
            })
        }
        None => None,
    };
    let tags = session_tags(end_user.as_ref(), &end_user_tags, &tags.unwrap_or_default())
        .map_err(|e| invalid(format!("tags: {e}")))?;
    Ok((end_user, tags))
}

/// `PATCH /connections/:id`: a connection's new end user and tags.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default)]
    pub end_user: Option<EndUserBody>,
    #[serde(default)]
    pub organization: Option<OrganizationBody>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub webhook_url_override: Option<String>,
}

/// The ownership an import's `end_user`, `organization` and `tags` give a connection (tags
/// derived from the end user and organization, overlaid with `tags`).
pub fn imported_ownership(
    end_user: Option<Value>,
    organization: Option<Value>,
    tags: Option<Value>,
) -> Result<Ownership, SessionsError> {
    let end_user: Option<EndUserBody> = match end_user {
        None | Some(Value::Null) => None,
        Some(value) => {
            Some(serde_json::from_value(value).map_err(|e| invalid(format!("end_user: {e}")))?)
        }
    };
    let organization: Option<OrganizationBody> = match organization {
        None | Some(Value::Null) => None,
        Some(value) => {
            Some(serde_json::from_value(value).map_err(|e| invalid(format!("organization: {e}")))?)
        }
    };
    let tags: Option<BTreeMap<String, String>> = match tags {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            serde_json::from_value(value)
                .map_err(|e| invalid(format!("tags must map keys to strings: {e}")))?,
        ),
    };
    let (end_user, tags) = owner(end_user, organization.as_ref(), tags)?;
    Ok(Ownership {
        tags,
        end_user,
        connect_session_id: None,
    })
}

/// What `PATCH /connections/:id` makes of a connection's ownership: with `end_user` or `tags`,
/// the tags are replaced by those derived from the end user overlaid with `tags` (tags not sent
/// again are dropped); the end user is replaced when one is given; the connect session stays.
/// `None`: nothing to change.
pub fn patched_ownership(
    current: &Ownership,
    body: PatchBody,
) -> Result<Option<Ownership>, SessionsError> {
    if body
        .webhook_url_override
        .as_deref()
        .is_some_and(|url| !url.is_empty())
    {
        return Err(invalid(
            "webhook_url_override: per-connection webhook URLs are not supported; \
             GRANTLINE_WEBHOOK_URLS applies to every connection",
        ));
    }
    if body.end_user.is_none() && body.tags.is_none() {
        return Ok(None);
    }
    let (end_user, tags) = owner(body.end_user, body.organization.as_ref(), body.tags)?;
    Ok(Some(Ownership {
        tags,
        end_user: end_user.or_else(|| current.end_user.clone()),
        connect_session_id: current.connect_session_id,
    }))
}

/// The end user the connection a reconnect session names has now, if any.
pub async fn current_end_user(
    state: &AppState,
    reconnect: &Reconnect,
) -> Result<Option<EndUser>, SessionsError> {
    let key = ConnectionKey::new(&reconnect.provider_config_key, &reconnect.connection_id);
    Ok(queries::find_connection(&state.read_models, &key)
        .await?
        .and_then(|found| found.connection.ownership.end_user))
}

/// Makes a session (a reconnect session when `reconnect` is set).
pub async fn create(
    state: &AppState,
    body: SessionBody,
    reconnect: bool,
    created_by: Option<String>,
    now: DateTime<Utc>,
) -> Result<Created, SessionsError> {
    let reconnect = if reconnect {
        let (Some(connection_id), Some(integration_id)) = (
            body.connection_id.as_deref(),
            body.integration_id.as_deref(),
        ) else {
            return Err(invalid("connection_id and integration_id are required"));
        };
        if body.allowed_integrations.is_some() {
            return Err(invalid(
                "allowed_integrations: not allowed when reconnecting",
            ));
        }
        check_integration_key(integration_id, "integration_id")?;
        check_len(connection_id, "connection_id", 1, 255)?;
        let key = ConnectionKey::new(integration_id, connection_id);
        if queries::find_connection(&state.read_models, &key)
            .await?
            .is_none()
        {
            return Err(SessionsError::UnknownConnection);
        }
        Some(Reconnect {
            provider_config_key: integration_id.to_owned(),
            connection_id: connection_id.to_owned(),
        })
    } else {
        if body.connection_id.is_some() || body.integration_id.is_some() {
            return Err(invalid(
                "connection_id and integration_id belong to /connect/sessions/reconnect",
            ));
        }
        None
    };
    // A new session says whom it is for; a reconnect session may leave it to the connection.
    if reconnect.is_none() && body.end_user.is_none() && body.tags.is_none() {
        return Err(invalid("end_user or tags is required"));
    }
    // A reconnect session that names no end user keeps the connection's, and with no tags
    // either, its tags (resolved when its flow authorizes: see `connection::decide`).
    let (end_user, tags) = owner(body.end_user, body.organization.as_ref(), body.tags)?;

    let allowed_integrations = match body.allowed_integrations {
        Some(keys) if !keys.is_empty() => {
            for (i, key) in keys.iter().enumerate() {
                check_integration_exists(state, key, &format!("allowed_integrations[{i}]")).await?;
            }
            Some(keys)
        }
        _ => reconnect
            .as_ref()
            .map(|r| vec![r.provider_config_key.clone()]),
    };
    let mut defaults = BTreeMap::new();
    for (key, given) in body.integrations_config_defaults.unwrap_or_default() {
        check_integration_exists(state, &key, &format!("integrations_config_defaults.{key}"))
            .await?;
        if let Some(config) = &given.connection_config
            && let Err(reason) = domain::bounds::JsonBounds::CLIENT.check_object(config)
        {
            return Err(invalid(format!(
                "integrations_config_defaults.{key}.connection_config: {reason}"
            )));
        }
        check_authorization_defaults(&key, &given)?;
        defaults.insert(
            key,
            ConfigDefaults {
                user_scopes: given.user_scopes,
                authorization_params: given.authorization_params,
                connection_config: given.connection_config,
            },
        );
    }
    for key in body.overrides.unwrap_or_default().keys() {
        check_integration_exists(state, key, &format!("overrides.{key}")).await?;
    }
    let webhook_url_override = match body.webhook_url_override.as_deref() {
        None | Some("") => None,
        Some(url) => {
            let parsed =
                url::Url::parse(url).map_err(|_| invalid("webhook_url_override must be a URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") || url.len() > 2048 {
                return Err(invalid("webhook_url_override must be an http(s) URL"));
            }
            Some(url.to_owned())
        }
    };

    let session = ConnectSession {
        id: Uuid::new_v4(),
        end_user,
        tags,
        allowed_integrations,
        integrations_config_defaults: defaults,
        reconnect,
        webhook_url_override,
        created_at: now,
        expires_at: now + LIFETIME,
    };
    let token = SessionToken::generate();
    let hash = token_hash(token.expose());
    let repository = state.backend.connect_sessions();
    repository.create_connect_session(&hash, &session).await?;
    let event = ConnectSessionEvent::Created {
        session: Box::new(session.clone()),
        created_by,
    };
    let appended = state
        .backend
        .events()
        .append(
            &session.stream(),
            ExpectedVersion::NoStream,
            vec![event.to_new_event()],
        )
        .await;
    if let Err(error) = appended {
        // Best effort: a row left behind has a token nobody holds, and it expires.
        let _ = repository.delete_connect_session(&hash).await;
        return Err(error.into());
    }
    tracing::info!(connect_session = %session.id, "connect session created");
    Ok(Created { token, session })
}

/// The live session of `token`.
pub async fn find(
    state: &AppState,
    token: &str,
    now: DateTime<Utc>,
) -> Result<ConnectSession, SessionsError> {
    if !plausible_token(token) {
        return Err(SessionsError::UnknownToken);
    }
    state
        .backend
        .connect_sessions()
        .connect_session(&token_hash(token), now)
        .await?
        .ok_or(SessionsError::UnknownToken)
}

/// Deletes the session of `token`, recording it in the session's stream first: a failure
/// after the event leaves the session live for the caller to delete again (a second
/// `ConnectSessionDeleted` is harmless), never a deletion the log does not know.
pub async fn delete(
    state: &AppState,
    token: &str,
    now: DateTime<Utc>,
) -> Result<(), SessionsError> {
    let session = find(state, token, now).await?;
    let event = ConnectSessionEvent::Deleted { deleted_at: now };
    state
        .backend
        .events()
        .append(
            &session.stream(),
            ExpectedVersion::Any,
            vec![event.to_new_event()],
        )
        .await?;
    if !state
        .backend
        .connect_sessions()
        .delete_connect_session(&token_hash(token))
        .await?
    {
        return Err(SessionsError::UnknownToken);
    }
    Ok(())
}
