//! `POST /connection` (and `/connections`): existing credentials imported as a connection, in
//! the flat shape of Nango ≤ 0.6x or the `credentials: {type, …}` shape of current Nango.
//!
//! The request types take each field as the JSON the client sent; the fields are then checked
//! one by one, so a missing or mistyped one gets Nango's code (`missing_access_token`,
//! `invalid_body`, …) and a message naming it, never a generic deserialization error. Their
//! schemas say what each field must be.

use axum::Json;
use axum::extract::{MatchedPath, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use domain::bounds::{TimeOutOfRange, TimeRange};
use domain::connection::ConnectionKey;
use domain::credentials::Credentials;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use workers::provider::parse_expires_at;

use super::ApiError;
use super::connection::{ConnectionBody, connection_json, render_current};
use super::extract::{
    ApiJson, identifier, in_body, object_body, optional_object, optional_str, provider_config_key,
    unpadded,
};
use crate::connect_sessions;
use crate::connections::{self, ConnectionsError, Import};
use crate::state::AppState;

/// `POST /connection`: existing credentials to import. Either `credentials: {type, …}` (current
/// Nango) or the credential fields flat in the body (Nango ≤ 0.6x: `access_token`, …, or
/// `oauth_token` + `oauth_token_secret`, or `api_key`, or `username` + `password`).
#[derive(Deserialize, ToSchema)]
pub struct ImportConnection {
    #[schema(value_type = String)]
    provider_config_key: Option<Value>,
    #[schema(value_type = String)]
    connection_id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<CredentialsInput>)]
    credentials: Option<Value>,
    /// Flat OAuth 2 shape: the access token (required when neither `credentials` nor another
    /// flat shape is given).
    #[schema(value_type = Option<String>)]
    access_token: Option<Value>,
    #[schema(value_type = Option<String>)]
    refresh_token: Option<Value>,
    /// RFC 3339 time or UNIX seconds.
    #[schema(value_type = Option<Value>)]
    expires_at: Option<Value>,
    /// Seconds from now; used when `expires_at` is absent.
    #[schema(value_type = Option<u64>)]
    expires_in: Option<Value>,
    #[schema(value_type = Option<Object>)]
    raw: Option<Value>,
    /// Flat OAuth 1 shape.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    oauth_token: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    oauth_token_secret: Option<Value>,
    /// Flat API key shape (also accepted as `apiKey`).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    api_key: Option<Value>,
    #[serde(rename = "apiKey", default, deserialize_with = "present")]
    #[schema(ignore)]
    api_key_camel: Option<Value>,
    /// Flat Basic shape.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    username: Option<Value>,
    #[schema(value_type = Option<String>)]
    password: Option<Value>,
    #[schema(value_type = Option<Object>)]
    connection_config: Option<Value>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// The end user the connection belongs to: `{id, email?, display_name?, tags?}`.
    #[schema(value_type = Option<Object>)]
    end_user: Option<Value>,
    /// The end user's organization: `{id, display_name?}` (its tags derived as for a connect
    /// session).
    #[schema(value_type = Option<Object>)]
    organization: Option<Value>,
    /// Tags, over those derived from `end_user` (Nango's tag rules).
    #[schema(value_type = Option<Object>)]
    tags: Option<Value>,
}

/// Credentials of an import, by `type`.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum CredentialsInput {
    #[serde(rename = "OAUTH2")]
    OAuth2 {
        #[schema(value_type = String)]
        access_token: Option<Value>,
        #[schema(value_type = Option<String>)]
        refresh_token: Option<Value>,
        /// RFC 3339 time or UNIX seconds.
        #[schema(value_type = Option<Value>)]
        expires_at: Option<Value>,
        /// Seconds from now; used when `expires_at` is absent.
        #[schema(value_type = Option<u64>)]
        expires_in: Option<Value>,
        #[schema(value_type = Option<Object>)]
        raw: Option<Value>,
    },
    #[serde(rename = "OAUTH1")]
    OAuth1 {
        #[schema(value_type = String)]
        oauth_token: Option<Value>,
        #[schema(value_type = String)]
        oauth_token_secret: Option<Value>,
        #[schema(value_type = Option<Object>)]
        raw: Option<Value>,
    },
    /// The key as `apiKey` (or `api_key`).
    #[serde(rename = "API_KEY")]
    ApiKey {
        #[serde(rename = "apiKey")]
        #[schema(value_type = String)]
        api_key: Option<Value>,
        #[serde(rename = "api_key")]
        #[schema(ignore)]
        api_key_snake: Option<Value>,
    },
    #[serde(rename = "BASIC")]
    Basic {
        #[schema(value_type = String)]
        username: Option<Value>,
        #[schema(value_type = Option<String>)]
        password: Option<Value>,
    },
    /// A client-credentials token and the client credentials that renew it.
    #[serde(rename = "OAUTH2_CC")]
    OAuth2Cc {
        #[schema(value_type = String)]
        token: Option<Value>,
        #[schema(value_type = String)]
        client_id: Option<Value>,
        #[schema(value_type = String)]
        client_secret: Option<Value>,
        #[schema(value_type = Option<String>)]
        client_certificate: Option<Value>,
        #[schema(value_type = Option<String>)]
        client_private_key: Option<Value>,
        /// RFC 3339 time or UNIX seconds.
        #[schema(value_type = Option<Value>)]
        expires_at: Option<Value>,
        #[schema(value_type = Option<Object>)]
        raw: Option<Value>,
    },
}

/// The `type`s of [`CredentialsInput`].
const CREDENTIALS_TYPES: [&str; 5] = ["OAUTH2", "OAUTH1", "API_KEY", "BASIC", "OAUTH2_CC"];

/// `POST /connection`: import existing credentials, in the flat shape of Nango ≤ 0.6x or the
/// `credentials: {type, …}` shape of current Nango.
#[utoipa::path(
    post,
    path = "/connection",
    tag = "connections",
    request_body = ImportConnection,
    responses(
        (status = 201, description = "Imported; the connection with its credentials", body = ConnectionBody),
        (status = 400, description = "A required field is missing (`missing_*`) or invalid (`invalid_body`, `invalid_json`, `unknown_provider_config`)", body = super::error::ErrorBody),
        (status = 413, description = "The body is too large", body = super::error::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::error::ErrorBody),
    ),
)]
pub async fn import_connection(
    State(state): State<AppState>,
    path: MatchedPath,
    ApiJson(mut body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    // Today's Nango route: the id is the server's when none is given, an unknown integration
    // is not found, and the answer is today's connection object.
    let current = path.as_str() == "/connections";
    if current
        && let Some(fields) = body.as_object_mut()
        && fields.get("connection_id").is_none_or(Value::is_null)
    {
        fields.insert(
            "connection_id".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
    }
    if body
        .get("webhook_url_override")
        .is_some_and(|url| !matches!(url, Value::Null) && url != "")
    {
        return Err(ApiError::InvalidBody(
            "webhook_url_override: per-connection webhook URLs are not supported; \
             GRANTLINE_WEBHOOK_URLS applies to every connection"
                .into(),
        ));
    }
    let import = import_of(body)?;
    let view = match connections::import(&state, import).await {
        Ok(view) => view,
        Err(ConnectionsError::UnknownProviderConfig(key)) if current => {
            return Err(ApiError::Refused {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: format!("integration {key:?} does not exist"),
            });
        }
        Err(error) => return Err(error.into()),
    };
    if current {
        let mut answer = Vec::new();
        render_current(&view, true, &mut answer)
            .map_err(|e| ApiError::Internal(format!("rendering the connection: {e}")))?;
        return Ok((
            StatusCode::CREATED,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            answer,
        )
            .into_response());
    }
    Ok((StatusCode::CREATED, Json(connection_json(&view, true))).into_response())
}

/// The import a `POST /connection` body asks for, checked field by field; also one line of
/// `grantline import`.
pub fn import_of(body: Value) -> Result<Import, ApiError> {
    // Other fields are ignored, but these are the wrong spelling of ones that matter: taken
    // for absent, a server id would stand in for the caller's.
    for (camel, snake) in [
        ("connectionId", "connection_id"),
        ("providerConfigKey", "provider_config_key"),
        ("connectionConfig", "connection_config"),
        ("accessToken", "access_token"),
        ("refreshToken", "refresh_token"),
        ("expiresAt", "expires_at"),
        ("expiresIn", "expires_in"),
        ("endUser", "end_user"),
    ] {
        if body.get(camel).is_some() {
            return Err(ApiError::InvalidBody(format!(
                "{camel}: the field is {snake}"
            )));
        }
    }
    object_body::<ImportConnection>(body)?.into_import()
}

impl ImportConnection {
    /// The import the body asks for, its fields checked in order.
    fn into_import(self) -> Result<Import, ApiError> {
        let key = optional_str(self.provider_config_key.as_ref(), "provider_config_key")?;
        let provider_config_key = provider_config_key(key).map_err(in_body)?;
        let connection_id = match optional_str(self.connection_id.as_ref(), "connection_id")? {
            None => return Err(ApiError::MissingConnection),
            Some(id) if id.trim().is_empty() => return Err(ApiError::MissingConnection),
            Some(id) => {
                unpadded(id, "connection_id")?;
                identifier(id, "connection_id").map_err(in_body)?;
                id.to_owned()
            }
        };
        let credentials = match &self.credentials {
            Some(Value::Object(fields)) => nested_credentials(fields)?,
            Some(_) => {
                return Err(ApiError::InvalidBody(
                    "credentials must be an object".into(),
                ));
            }
            None => self.flat_credentials()?,
        };
        printable(&credentials)?;
        let ownership =
            connect_sessions::imported_ownership(self.end_user, self.organization, self.tags)
                .map_err(|e| ApiError::InvalidBody(e.to_string()))?;
        Ok(Import {
            key: ConnectionKey::new(provider_config_key, connection_id),
            ownership,
            credentials,
            connection_config: optional_object(
                self.connection_config.as_ref(),
                "connection_config",
            )?
            .unwrap_or_default(),
            metadata: optional_object(self.metadata.as_ref(), "metadata")?,
        })
    }

    /// The credentials in the flat shape their fields name: OAuth 1 with an `oauth_token*`,
    /// an API key with an `api_key`/`apiKey`, Basic with a `username`, else OAuth 2.
    fn flat_credentials(&self) -> Result<Credentials, ApiError> {
        if self.oauth_token.is_some() || self.oauth_token_secret.is_some() {
            oauth1(
                self.oauth_token.as_ref(),
                self.oauth_token_secret.as_ref(),
                self.raw.as_ref(),
            )
        } else if self.api_key.is_some() || self.api_key_camel.is_some() {
            api_key(self.api_key_camel.as_ref(), self.api_key.as_ref())
        } else if self.username.is_some() {
            basic(self.username.as_ref(), self.password.as_ref())
        } else {
            oauth2(
                self.access_token.as_ref(),
                self.refresh_token.as_ref(),
                self.expires_at.as_ref(),
                self.expires_in.as_ref(),
                self.raw.as_ref(),
            )
        }
    }
}

/// Refuses credentials with control characters in the fields that go into requests (headers,
/// query strings, form bodies), as the form routes do: they could never be sent. PEM text keeps
/// its line breaks.
fn printable(credentials: &Credentials) -> Result<(), ApiError> {
    let fields: Vec<(&str, Option<&str>)> = match credentials {
        Credentials::OAuth2 {
            access_token,
            refresh_token,
            ..
        } => vec![
            ("access_token", Some(access_token)),
            ("refresh_token", refresh_token.as_deref()),
        ],
        Credentials::OAuth1 {
            oauth_token,
            oauth_token_secret,
            ..
        } => vec![
            ("oauth_token", Some(oauth_token)),
            ("oauth_token_secret", Some(oauth_token_secret)),
        ],
        Credentials::ApiKey { api_key } => vec![("apiKey", Some(api_key))],
        Credentials::Basic { username, password } => {
            vec![("username", Some(username)), ("password", Some(password))]
        }
        Credentials::OAuth2Cc {
            token,
            client_id,
            client_secret,
            ..
        } => vec![
            ("token", Some(token)),
            ("client_id", Some(client_id)),
            ("client_secret", Some(client_secret)),
        ],
    };
    match fields
        .into_iter()
        .find(|(_, value)| value.is_some_and(|v| v.chars().any(char::is_control)))
    {
        Some((field, _)) => Err(ApiError::InvalidBody(format!(
            "{field} contains control characters"
        ))),
        None => Ok(()),
    }
}

/// The credentials of a `credentials: {type, …}` object.
fn nested_credentials(fields: &Map<String, Value>) -> Result<Credentials, ApiError> {
    match optional_str(fields.get("type"), "type")? {
        Some(known) if CREDENTIALS_TYPES.contains(&known) => {}
        Some(other) => {
            return Err(ApiError::InvalidBody(format!(
                "credentials type {other:?} is not one of OAUTH2, OAUTH1, API_KEY, BASIC, OAUTH2_CC"
            )));
        }
        None => return Err(ApiError::InvalidBody("credentials need a type".into())),
    }
    // The type is known and every field takes any JSON: this cannot fail.
    let input: CredentialsInput = serde_json::from_value(Value::Object(fields.clone()))
        .map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    match input {
        CredentialsInput::OAuth2 {
            access_token,
            refresh_token,
            expires_at,
            expires_in,
            raw,
        } => oauth2(
            access_token.as_ref(),
            refresh_token.as_ref(),
            expires_at.as_ref(),
            expires_in.as_ref(),
            raw.as_ref(),
        ),
        CredentialsInput::OAuth1 {
            oauth_token,
            oauth_token_secret,
            raw,
        } => oauth1(
            oauth_token.as_ref(),
            oauth_token_secret.as_ref(),
            raw.as_ref(),
        ),
        CredentialsInput::ApiKey {
            api_key: camel,
            api_key_snake,
        } => api_key(camel.as_ref(), api_key_snake.as_ref()),
        CredentialsInput::Basic { username, password } => {
            basic(username.as_ref(), password.as_ref())
        }
        CredentialsInput::OAuth2Cc {
            token,
            client_id,
            client_secret,
            client_certificate,
            client_private_key,
            expires_at,
            raw,
        } => Ok(Credentials::OAuth2Cc {
            token: required_str(token.as_ref(), "token", "missing_token", "missing token")?,
            client_id: required_str(
                client_id.as_ref(),
                "client_id",
                "missing_client_id",
                "missing client_id",
            )?,
            client_secret: optional_str(client_secret.as_ref(), "client_secret")?
                .unwrap_or_default()
                .to_owned(),
            client_certificate: optional_str(client_certificate.as_ref(), "client_certificate")?
                .map(str::to_owned),
            client_private_key: optional_str(client_private_key.as_ref(), "client_private_key")?
                .map(str::to_owned),
            expires_at: expiry(expires_at.as_ref(), None)?,
            raw: raw_object(raw.as_ref())?,
        }),
    }
}

fn oauth2(
    access_token: Option<&Value>,
    refresh_token: Option<&Value>,
    expires_at: Option<&Value>,
    expires_in: Option<&Value>,
    raw: Option<&Value>,
) -> Result<Credentials, ApiError> {
    Ok(Credentials::OAuth2 {
        access_token: required_str(
            access_token,
            "access_token",
            "missing_access_token",
            "missing access_token",
        )?,
        refresh_token: optional_str(refresh_token, "refresh_token")?
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        expires_at: expiry(expires_at, expires_in)?,
        raw: raw_object(raw)?,
    })
}

fn oauth1(
    oauth_token: Option<&Value>,
    oauth_token_secret: Option<&Value>,
    raw: Option<&Value>,
) -> Result<Credentials, ApiError> {
    Ok(Credentials::OAuth1 {
        oauth_token: required_str(
            oauth_token,
            "oauth_token",
            "missing_oauth_token",
            "missing oauth_token",
        )?,
        oauth_token_secret: required_str(
            oauth_token_secret,
            "oauth_token_secret",
            "missing_oauth_token_secret",
            "missing oauth_token_secret",
        )?,
        raw: raw_object(raw)?,
    })
}

/// An API key: `apiKey` first, else `api_key`.
fn api_key(camel: Option<&Value>, snake: Option<&Value>) -> Result<Credentials, ApiError> {
    let key = optional_str(camel, "apiKey")?.or(optional_str(snake, "api_key")?);
    match key {
        Some(k) if !k.is_empty() => Ok(Credentials::ApiKey {
            api_key: k.to_owned(),
        }),
        _ => Err(ApiError::MissingField {
            code: "missing_api_key",
            message: "missing apiKey",
        }),
    }
}

fn basic(username: Option<&Value>, password: Option<&Value>) -> Result<Credentials, ApiError> {
    Ok(Credentials::Basic {
        username: required_str(username, "username", "missing_username", "missing username")?,
        password: optional_str(password, "password")?
            .unwrap_or_default()
            .to_owned(),
    })
}

/// A required, non-empty string; missing is `code`.
fn required_str(
    value: Option<&Value>,
    field: &str,
    code: &'static str,
    message: &'static str,
) -> Result<String, ApiError> {
    match optional_str(value, field)? {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ApiError::MissingField { code, message }),
    }
}

/// `raw`: an object, `{}` when absent.
fn raw_object(raw: Option<&Value>) -> Result<Value, ApiError> {
    Ok(optional_object(raw, "raw")?.map_or_else(|| Value::Object(Map::new()), Value::Object))
}

/// When the token expires: `expires_at` (RFC 3339 or UNIX seconds), else `expires_in` seconds
/// from now, else unknown.
fn expiry(
    expires_at: Option<&Value>,
    expires_in: Option<&Value>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match expires_at {
        None | Some(Value::Null) => {}
        Some(value) => {
            return parse_expires_at(value).map(Some).ok_or_else(|| {
                ApiError::InvalidBody(format!(
                    "expires_at must be an RFC 3339 time or UNIX seconds; {TimeOutOfRange}"
                ))
            });
        }
    }
    match expires_in {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|s| s >= 0) => {
            let seconds = n.as_i64().unwrap_or_default();
            TimeRange::after(Utc::now(), seconds)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::InvalidBody(format!("expires_in is too large; {TimeOutOfRange}"))
                })
        }
        Some(_) => Err(ApiError::InvalidBody(
            "expires_in must be a whole number of seconds".into(),
        )),
    }
}

/// A field that keeps `null` apart from absent: `None` when the field is not in the body,
/// `Some(Value::Null)` when it is `null` (the flat shapes are told apart by the fields present).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}
