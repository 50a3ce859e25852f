//! `GET /connection/:id/history` (and `/connections/…`): a connection's credential history, paged
//! by stream version. Never a secret (see `domain::history`): the entries are the audit trail's
//! own, field for field, with tokens only as keyed fingerprints.

use axum::Json;
use axum::extract::State;
use domain::connect_session::Ownership;
use domain::connection::{CredentialsType, FailureClass, Flow, MetadataMode, RefreshTrigger};
use domain::history::{EntryType, HistoryEntry, SecretsState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::ApiError;
use super::extract::{ApiPath, ApiQuery, connection_key};
use crate::history::{self, DEFAULT_PAGE, MAX_PAGE};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    provider_config_key: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// The answer: one page of entries, and where the next page starts.
#[derive(Serialize, ToSchema)]
#[schema(as = History)]
pub struct HistoryBody {
    provider_config_key: String,
    connection_id: String,
    /// The events in stream order: `stream_version`, `event_id`, `type`, `recorded_at`,
    /// `generation`, and the fields that apply to the type; never a secret.
    events: Vec<HistoryEntryBody>,
    next_after: Option<u32>,
    /// Present when the compactor removed routine refresh cycles (or, with a lifecycle
    /// retention, superseded lifecycle events) from this history past retention: how many, up
    /// to which stream version, and when they were recorded. `null` otherwise.
    compacted: Option<CompactionBody>,
}

/// What compaction removed from a connection's history, over every pass.
#[derive(Serialize, ToSchema)]
#[schema(as = HistoryCompaction)]
pub struct CompactionBody {
    /// Routine refresh cycles (a lease and its successful refresh) removed.
    routine_cycles: u64,
    /// Superseded failures, lapsed leases and overwritten metadata changes removed.
    lifecycle_events: u64,
    /// Events removed in all.
    events_removed: u64,
    /// Every removed event had at most this stream version.
    through_version: u32,
    /// When the oldest and the newest removed events were recorded.
    first_recorded_at: String,
    last_recorded_at: String,
    /// When a compaction pass last removed events from this history.
    compacted_at: String,
}

impl From<domain::store::CompactionRecord> for CompactionBody {
    fn from(record: domain::store::CompactionRecord) -> Self {
        let time = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        Self {
            routine_cycles: record.routine_cycles,
            lifecycle_events: record.lifecycle_events,
            events_removed: record.events_removed,
            through_version: record.through_version,
            first_recorded_at: time(record.first_recorded_at),
            last_recorded_at: time(record.last_recorded_at),
            compacted_at: time(record.compacted_at),
        }
    }
}

/// One entry of a connection's credential history: what happened, when, in which generation,
/// by which instance and trigger. Fields after `generation` appear only on the entry types they
/// concern. Never a secret: tokens only as keyed fingerprints.
#[derive(Serialize, ToSchema)]
#[schema(as = HistoryEntry)]
pub struct HistoryEntryBody {
    /// The event's version in the connection's stream (from 1); pages are cut by it.
    stream_version: u32,
    #[schema(value_type = String, format = "uuid")]
    event_id: Uuid,
    #[serde(rename = "type")]
    entry_type: HistoryEntryType,
    #[schema(format = DateTime)]
    recorded_at: String,
    /// The authorization generation in force (1 for the first authorization, + 1 for every
    /// later one, also after a deletion).
    generation: u32,
    /// The provider template (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    /// How the credentials were obtained (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    flow: Option<HistoryFlow>,
    /// `OAUTH2`, `OAUTH1`, `API_KEY` or `BASIC` (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials_type: Option<&'static str>,
    /// The granted scopes (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<Vec<String>>,
    /// When the access token expires; `null` when unknown (authorizations and refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    expires_at: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    has_refresh_token: Option<bool>,
    /// 1 after an authorization, + 1 each time the provider returned a new refresh token.
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token_generation: Option<u32>,
    /// Whether the provider returned a new refresh token (refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token_rotated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprints: Option<HistoryFingerprints>,
    /// What started the refresh (leases and their outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger: Option<HistoryTrigger>,
    /// The instance that appended the event (for refresh outcomes: the lease's holder).
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
    /// Authorizations imported from another system: which (`nango`).
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = "uuid")]
    lease_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    lease_expires_at: Option<String>,
    /// What went wrong (failures); never the provider's free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<HistoryFailure>,
    /// The mode and the top-level keys set (metadata changes); never the values.
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<HistoryMetadata>,
    /// How many data keys the deletion destroyed (deletions).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u32>)]
    shredded_data_keys: Option<usize>,
    /// Whether the credentials the event sealed can still be opened (authorizations and
    /// refreshes): `shredded` once a deletion destroyed their data key.
    #[serde(skip_serializing_if = "Option::is_none")]
    secrets: Option<HistorySecrets>,
    /// Tags, end user and `connect_session_id` of an authorization through a connect session.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    ownership: Option<Ownership>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryEntryType {
    ConnectionAuthorized,
    RefreshLeased,
    TokensRefreshed,
    RefreshFailed,
    MetadataSet,
    OwnershipSet,
    ConnectionDeleted,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryFlow {
    Oauth2,
    Oauth1,
    Import,
    /// Credentials the user entered (API key, Basic).
    Form,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryTrigger {
    Read,
    Schedule,
    Force,
    Rejected,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistorySecrets {
    Sealed,
    Shredded,
}

/// Short keyed fingerprints (`fp_` and 16 hex digits, HMAC) of the tokens.
#[derive(Serialize, ToSchema)]
pub struct HistoryFingerprints {
    access_token: Option<String>,
    refresh_token: Option<String>,
}

/// A refresh failure as the audit trail shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = HistoryError)]
pub struct HistoryFailure {
    /// `permanent` (the grant is gone) or `transient`.
    class: &'static str,
    /// The provider's error code, e.g. `invalid_grant`.
    code: Option<String>,
    /// The provider's HTTP status, if it answered.
    provider_status: Option<u16>,
}

/// A metadata change as the audit trail shows it.
#[derive(Serialize, ToSchema)]
pub struct HistoryMetadata {
    /// `replace` or `merge`.
    mode: &'static str,
    keys: Vec<String>,
}

impl From<HistoryEntry> for HistoryEntryBody {
    fn from(entry: HistoryEntry) -> Self {
        Self {
            stream_version: entry.stream_version,
            event_id: entry.event_id,
            entry_type: match entry.entry_type {
                EntryType::ConnectionAuthorized => HistoryEntryType::ConnectionAuthorized,
                EntryType::RefreshLeased => HistoryEntryType::RefreshLeased,
                EntryType::TokensRefreshed => HistoryEntryType::TokensRefreshed,
                EntryType::RefreshFailed => HistoryEntryType::RefreshFailed,
                EntryType::MetadataSet => HistoryEntryType::MetadataSet,
                EntryType::OwnershipSet => HistoryEntryType::OwnershipSet,
                EntryType::ConnectionDeleted => HistoryEntryType::ConnectionDeleted,
            },
            recorded_at: entry.recorded_at,
            generation: entry.generation,
            provider: entry.provider,
            flow: entry.flow.map(|flow| match flow {
                Flow::Oauth2 => HistoryFlow::Oauth2,
                Flow::Oauth1 => HistoryFlow::Oauth1,
                Flow::Import => HistoryFlow::Import,
                Flow::Form => HistoryFlow::Form,
            }),
            credentials_type: entry.credentials_type.map(|kind| match kind {
                CredentialsType::Oauth2 => "OAUTH2",
                CredentialsType::Oauth1 => "OAUTH1",
                CredentialsType::ApiKey => "API_KEY",
                CredentialsType::Basic => "BASIC",
                CredentialsType::Oauth2Cc => "OAUTH2_CC",
            }),
            scopes: entry.scopes,
            expires_at: entry.expires_at,
            has_refresh_token: entry.has_refresh_token,
            refresh_token_generation: entry.refresh_token_generation,
            refresh_token_rotated: entry.refresh_token_rotated,
            fingerprints: entry.fingerprints.map(|fingerprints| HistoryFingerprints {
                access_token: fingerprints.access_token,
                refresh_token: fingerprints.refresh_token,
            }),
            trigger: entry.trigger.map(|trigger| match trigger {
                RefreshTrigger::Read => HistoryTrigger::Read,
                RefreshTrigger::Schedule => HistoryTrigger::Schedule,
                RefreshTrigger::Force => HistoryTrigger::Force,
                RefreshTrigger::Rejected => HistoryTrigger::Rejected,
            }),
            instance: entry.instance,
            origin: entry.origin,
            lease_id: entry.lease_id,
            lease_expires_at: entry.lease_expires_at,
            error: entry.error.map(|error| HistoryFailure {
                class: match error.class {
                    FailureClass::Permanent => "permanent",
                    FailureClass::Transient => "transient",
                },
                code: error.code,
                provider_status: error.provider_status,
            }),
            metadata: entry.metadata.map(|metadata| HistoryMetadata {
                mode: match metadata.mode {
                    MetadataMode::Replace => "replace",
                    MetadataMode::Merge => "merge",
                },
                keys: metadata.keys,
            }),
            shredded_data_keys: entry.shredded_data_keys,
            secrets: entry.secrets.map(|secrets| match secrets {
                SecretsState::Sealed => HistorySecrets::Sealed,
                SecretsState::Shredded => HistorySecrets::Shredded,
            }),
            ownership: entry.ownership,
        }
    }
}

/// `GET /connection/:id/history?provider_config_key=K[&after=N][&limit=N]`.
#[utoipa::path(
    get,
    path = "/connection/{connection_id}/history",
    tag = "connections",
    params(
        ("connection_id" = String, Path, description = "The connection's id"),
        ("provider_config_key" = String, Query, description = "The integration the connection belongs to"),
        ("after" = Option<u32>, Query, description = "Entries after this stream version (default 0: from the start)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Entries per page (default 100)"),
    ),
    responses(
        (status = 200, description = "One page of the connection's credential history", body = HistoryBody),
        (status = 400, description = "Missing `provider_config_key`, or invalid `after`/`limit`", body = super::error::ErrorBody),
        (status = 404, description = "No such connection (`unknown_connection`)", body = super::error::ErrorBody),
    ),
)]
pub async fn get_history(
    State(state): State<AppState>,
    ApiPath(connection_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryBody>, ApiError> {
    let key = connection_key(connection_id, query.provider_config_key.as_deref())?;
    let after = parse_after(query.after.as_deref())?;
    let limit = parse_limit(query.limit.as_deref())?;
    let page = history::load_page(&state.backend, &key, after, limit).await?;
    let (provider_config_key, connection_id) = key.into_parts();
    Ok(Json(HistoryBody {
        provider_config_key,
        connection_id,
        events: page
            .entries
            .into_iter()
            .map(HistoryEntryBody::from)
            .collect(),
        next_after: page.next_after,
        compacted: page.compaction.map(CompactionBody::from),
    }))
}

/// `after`: a stream version, 0 (the default) for the start.
fn parse_after(text: Option<&str>) -> Result<u32, ApiError> {
    match text.map(str::trim) {
        None | Some("") => Ok(0),
        Some(text) => text.parse().map_err(|_| {
            ApiError::InvalidQuery(format!(
                "after must be a stream version (a whole number from 0 to {}), not {text:?}",
                u32::MAX
            ))
        }),
    }
}

/// `limit`: 1 to [`MAX_PAGE`] entries, [`DEFAULT_PAGE`] by default.
fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    match text.map(str::trim) {
        None | Some("") => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
            _ => Err(ApiError::InvalidQuery(format!(
                "limit must be a whole number from 1 to {MAX_PAGE}, not {text:?}"
            ))),
        },
    }
}
