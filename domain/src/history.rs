//! The credential history of a connection: its stream's events as audit entries, for auditors
//! (`GET /connection/:id/history`, `grantline history`, `grantline events tail`).
//!
//! Pure: no I/O, no clock. What the mapping guarantees:
//! - Never a secret. Entries carry no sealed credentials or ciphertext, no metadata values (only
//!   the metadata's mode and top-level keys, since metadata may hold anything) and no failure
//!   description (it could echo what a provider sent); tokens appear only as the short keyed
//!   fingerprints already in the events, so generations can be told apart and nothing revealed.
//! - Every event of the stream becomes exactly one entry, in stream order, across generations and
//!   after deletions.
//! - Each entry names the authorization generation in force when it was recorded. A refresh
//!   outcome names the trigger and the instance of the lease it ran under (tracked while
//!   folding); other entries name the instance recorded in the event's metadata, when there is one.
//! - An entry that carried sealed credentials says whether they are still `sealed` or were
//!   `shredded` by a later deletion that destroyed its data key ([`history`]; a [`HistoryFolder`]
//!   on its own sees no later events and says `sealed`).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::connect_session::Ownership;
use crate::connection::{
    ConnectionEvent, CredentialsType, FailureClass, Flow, MetadataMode, RefreshTrigger,
    TokenFingerprints,
};
use crate::event::{DomainEvent, UnreadableEvent};
use crate::store::RecordedEvent;

/// The key of the event metadata field that names the instance that appended the event.
pub const INSTANCE_METADATA_KEY: &str = "instance";

/// The metadata key naming the system credentials were imported from (e.g. `nango`).
pub const ORIGIN_METADATA_KEY: &str = "origin";

/// What kind of event an entry records.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    /// `ConnectionAuthorized`.
    ConnectionAuthorized,
    /// `RefreshLeased`.
    RefreshLeased,
    /// `TokensRefreshed`.
    TokensRefreshed,
    /// `RefreshFailed`.
    RefreshFailed,
    /// `MetadataSet`.
    MetadataSet,
    /// `OwnershipSet`.
    OwnershipSet,
    /// `ConnectionDeleted`.
    ConnectionDeleted,
}

impl EntryType {
    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionAuthorized => "connection_authorized",
            Self::RefreshLeased => "refresh_leased",
            Self::TokensRefreshed => "tokens_refreshed",
            Self::RefreshFailed => "refresh_failed",
            Self::MetadataSet => "metadata_set",
            Self::OwnershipSet => "ownership_set",
            Self::ConnectionDeleted => "connection_deleted",
        }
    }
}

/// Whether the credentials an entry carried can still be opened.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecretsState {
    /// Their data key exists: the credentials are stored sealed.
    Sealed,
    /// A later deletion destroyed their data key: they are unrecoverable.
    Shredded,
}

/// A refresh failure as auditors see it: no free-text description.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct EntryError {
    /// Permanent or transient.
    pub class: FailureClass,
    /// The provider's error code, e.g. `invalid_grant`.
    pub code: Option<String>,
    /// The provider's HTTP status, if it answered.
    pub provider_status: Option<u16>,
}

/// A metadata change as auditors see it: no values.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct EntryMetadata {
    /// Replace or merge.
    pub mode: MetadataMode,
    /// The top-level keys that were set.
    pub keys: Vec<String>,
}

/// One event of a connection's stream, as the audit trail shows it. Fields that do not apply to
/// the event's type are left out of the JSON; `expires_at` is `null` where it applies but is not
/// known.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    /// The event's version in the connection's stream (from 1).
    pub stream_version: u32,
    /// The event's id.
    pub event_id: Uuid,
    /// What happened.
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    /// When the event was recorded (RFC 3339, milliseconds, UTC).
    pub recorded_at: String,
    /// The authorization generation in force (0 before any authorization).
    pub generation: u32,
    /// The provider template (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// How the credentials were obtained (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<Flow>,
    /// The kind of credentials (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_type: Option<CredentialsType>,
    /// The granted scopes (authorizations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// When the access token expires: `Some(None)` (JSON `null`) when the expiry is unknown
    /// (authorizations and refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Option<String>>,
    /// Whether the credentials include a refresh token (authorizations and refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_refresh_token: Option<bool>,
    /// The refresh-token generation after the event (authorizations and refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_generation: Option<u32>,
    /// Whether the provider returned a new refresh token (refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_rotated: Option<bool>,
    /// Keyed fingerprints of the tokens (authorizations and refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprints: Option<TokenFingerprints>,
    /// What started the refresh (leases and their outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<RefreshTrigger>,
    /// The instance that appended the event (for outcomes: the lease's holder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The system the credentials were imported from (authorizations by an import from one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The refresh lease (leases and their outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<Uuid>,
    /// When the lease lapses without an outcome (leases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// What went wrong (failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<EntryError>,
    /// The mode and keys that were set (metadata changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EntryMetadata>,
    /// How many data keys the deletion destroyed (deletions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shredded_data_keys: Option<usize>,
    /// Whether the sealed credentials the event carried can still be opened (authorizations and
    /// refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsState>,
    /// The tags, end user and connect session an authorization through a connect session set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ownership: Option<Ownership>,
    /// The data key of the credentials the event carried; internal, to mark them shredded.
    #[serde(skip)]
    data_key_id: Option<Uuid>,
}

impl HistoryEntry {
    /// An entry with only the fields every type has.
    fn base(record: &RecordedEvent, entry_type: EntryType, generation: u32) -> Self {
        Self {
            stream_version: record.stream_version,
            event_id: record.event_id,
            entry_type,
            recorded_at: timestamp(record.recorded_at),
            generation,
            provider: None,
            flow: None,
            credentials_type: None,
            scopes: None,
            expires_at: None,
            has_refresh_token: None,
            refresh_token_generation: None,
            refresh_token_rotated: None,
            fingerprints: None,
            trigger: None,
            instance: None,
            origin: None,
            lease_id: None,
            lease_expires_at: None,
            error: None,
            metadata: None,
            shredded_data_keys: None,
            secrets: None,
            ownership: None,
            data_key_id: None,
        }
    }
}

/// A lease as the folder remembers it, until its outcome.
#[derive(Clone, Debug)]
struct LeaseSeen {
    trigger: RefreshTrigger,
    holder: String,
}

/// Turns one connection stream's events into entries, one at a time and in stream order, keeping
/// what later entries need: the generation in force and the open leases.
#[derive(Clone, Debug, Default)]
pub struct HistoryFolder {
    generation: u32,
    connection: Option<(String, String)>,
    leases: HashMap<Uuid, LeaseSeen>,
}

impl HistoryFolder {
    /// A folder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `(provider_config_key, connection_id)` of the stream, once an authorization was folded.
    pub fn connection(&self) -> Option<(&str, &str)> {
        self.connection
            .as_ref()
            .map(|(key, id)| (key.as_str(), id.as_str()))
    }

    /// The entry of `event`, recorded as `record`; the next event of the same stream goes next.
    pub fn entry(&mut self, record: &RecordedEvent, event: &ConnectionEvent) -> HistoryEntry {
        let recorded_instance = instance_of(&record.metadata);
        match event {
            ConnectionEvent::ConnectionAuthorized(authorized) => {
                let e = &authorized.authorization;
                self.generation = authorized.generation;
                self.connection = Some((e.provider_config_key.clone(), e.connection_id.clone()));
                // A re-authorization ends every lease of the previous generation.
                self.leases.clear();
                let mut entry = HistoryEntry::base(
                    record,
                    EntryType::ConnectionAuthorized,
                    authorized.generation,
                );
                entry.provider = Some(e.provider.clone());
                entry.flow = Some(e.flow);
                entry.credentials_type = Some(e.credentials_type);
                entry.scopes = Some(e.scopes.clone());
                entry.expires_at = Some(e.expires_at.map(timestamp));
                entry.has_refresh_token = Some(e.has_refresh_token);
                entry.refresh_token_generation = Some(1);
                entry.fingerprints = Some(e.fingerprints.clone());
                entry.instance = recorded_instance;
                entry.origin = record
                    .metadata
                    .get(ORIGIN_METADATA_KEY)
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                entry.secrets = Some(SecretsState::Sealed);
                entry.data_key_id = Some(e.data_key_id);
                entry.ownership = (!e.ownership.is_empty()).then(|| (*e.ownership).clone());
                entry
            }
            ConnectionEvent::RefreshLeased(e) => {
                self.leases.insert(
                    e.lease_id,
                    LeaseSeen {
                        trigger: e.trigger,
                        holder: e.holder.clone(),
                    },
                );
                let mut entry =
                    HistoryEntry::base(record, EntryType::RefreshLeased, self.generation);
                entry.trigger = Some(e.trigger);
                entry.instance = Some(e.holder.clone());
                entry.lease_id = Some(e.lease_id);
                entry.lease_expires_at = Some(timestamp(e.lease_expires_at));
                entry
            }
            ConnectionEvent::TokensRefreshed(e) => {
                let mut entry =
                    HistoryEntry::base(record, EntryType::TokensRefreshed, self.generation);
                self.fill_lease(&mut entry, e.lease_id, recorded_instance);
                entry.expires_at = Some(e.expires_at.map(timestamp));
                entry.has_refresh_token = Some(e.has_refresh_token);
                entry.refresh_token_generation = Some(e.refresh_token_generation);
                entry.refresh_token_rotated = Some(e.refresh_token_rotated);
                entry.fingerprints = Some(e.fingerprints.clone());
                entry.secrets = Some(SecretsState::Sealed);
                entry.data_key_id = Some(e.credentials.key_id);
                entry
            }
            ConnectionEvent::RefreshFailed(e) => {
                let mut entry =
                    HistoryEntry::base(record, EntryType::RefreshFailed, self.generation);
                self.fill_lease(&mut entry, e.lease_id, recorded_instance);
                entry.error = Some(EntryError {
                    class: e.failure.class,
                    code: e.failure.code.clone(),
                    provider_status: e.failure.provider_status,
                });
                entry
            }
            ConnectionEvent::MetadataSet(e) => {
                let mut entry = HistoryEntry::base(record, EntryType::MetadataSet, self.generation);
                entry.instance = recorded_instance;
                entry.metadata = Some(EntryMetadata {
                    mode: e.mode,
                    keys: metadata_keys(&e.metadata),
                });
                entry
            }
            ConnectionEvent::OwnershipSet(e) => {
                let mut entry =
                    HistoryEntry::base(record, EntryType::OwnershipSet, self.generation);
                entry.instance = recorded_instance;
                entry.ownership = Some(e.ownership.clone());
                entry
            }
            ConnectionEvent::ConnectionDeleted(e) => {
                self.leases.clear();
                let mut entry =
                    HistoryEntry::base(record, EntryType::ConnectionDeleted, self.generation);
                entry.instance = recorded_instance;
                entry.shredded_data_keys = Some(e.shredded_data_keys.len());
                entry
            }
        }
    }

    /// Names the lease of an outcome, its trigger and its holder, and forgets the lease.
    fn fill_lease(&mut self, entry: &mut HistoryEntry, lease_id: Uuid, recorded: Option<String>) {
        entry.lease_id = Some(lease_id);
        match self.leases.remove(&lease_id) {
            Some(lease) => {
                entry.trigger = Some(lease.trigger);
                entry.instance = Some(lease.holder);
            }
            None => entry.instance = recorded,
        }
    }
}

/// The audit trail of a whole connection stream, `records` in stream order from version 1: one
/// entry per event, with the credentials of every entry whose data key a later deletion destroyed
/// marked `shredded`. An event that cannot be decoded stops it (never skipped).
pub fn history(records: &[RecordedEvent]) -> Result<Vec<HistoryEntry>, UnreadableEvent> {
    let mut folded = FoldedHistory::default();
    folded.extend(records)?;
    Ok(folded.entries)
}

/// A stream's history folded up to some version, to be extended with the events appended since:
/// extended with them, it holds exactly what [`history`] makes of the whole stream.
#[derive(Clone, Debug, Default)]
pub struct FoldedHistory {
    folder: HistoryFolder,
    entries: Vec<HistoryEntry>,
}

impl FoldedHistory {
    /// Folds `records`, the stream's next events in version order.
    pub fn extend(&mut self, records: &[RecordedEvent]) -> Result<(), UnreadableEvent> {
        self.entries.reserve(records.len());
        let mut deletions = Vec::new();
        for record in records {
            let event = ConnectionEvent::from_recorded(record)?;
            if let ConnectionEvent::ConnectionDeleted(deleted) = &event {
                deletions.push((self.entries.len(), deleted.shredded_data_keys.clone()));
            }
            self.entries.push(self.folder.entry(record, &event));
        }
        // A deletion shreds the credentials of the entries before it (deletions are rare: one
        // pass over those entries each).
        for (at, keys) in deletions {
            let keys: HashSet<Uuid> = keys.into_iter().collect();
            for entry in &mut self.entries[..at] {
                if entry.data_key_id.is_some_and(|key| keys.contains(&key)) {
                    entry.secrets = Some(SecretsState::Shredded);
                }
            }
        }
        Ok(())
    }

    /// The entries, in stream order.
    pub fn entries(&self) -> &[HistoryEntry] {
        &self.entries
    }

    /// The stream version folded last (0: none).
    pub fn version(&self) -> u32 {
        self.entries.last().map_or(0, |entry| entry.stream_version)
    }
}

/// The top-level keys of a metadata object, sorted (whatever order the JSON map keeps).
fn metadata_keys(metadata: &Value) -> Vec<String> {
    let mut keys: Vec<String> = metadata
        .as_object()
        .map(|fields| fields.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}

/// The instance named in an event's metadata, if any.
fn instance_of(metadata: &Value) -> Option<String> {
    metadata
        .get(INSTANCE_METADATA_KEY)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// RFC 3339 with milliseconds and `Z`, as the API shows times.
fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::TimeZone;
    use serde_json::{Map, json};

    use super::*;
    use crate::connection::{
        Authorization, ConnectionAuthorized, ConnectionDeleted, MetadataSet, RefreshFailed,
        RefreshFailure, RefreshLeased, TokensRefreshed,
    };
    use crate::keys::Sealed;
    use crate::store::{Position, StreamId};

    const PLAIN_ACCESS: &str = "ya29.PLAINTEXT-ACCESS-TOKEN";
    const PLAIN_REFRESH: &str = "1//PLAINTEXT-REFRESH-TOKEN";
    const DESCRIPTION: &str = "token rt-PLAINTEXT was revoked by the user";
    const METADATA_VALUE: &str = "metadata-value-SECRET-ish";

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
    }

    fn key(n: u128) -> Uuid {
        Uuid::from_u128(0x1000 + n)
    }

    fn lease(n: u128) -> Uuid {
        Uuid::from_u128(0x2000 + n)
    }

    /// Sealed bytes that would show up, in base64, if they leaked.
    fn sealed(key_id: Uuid) -> Sealed {
        Sealed {
            key_id,
            ciphertext: format!("{PLAIN_ACCESS}|{PLAIN_REFRESH}").into_bytes(),
        }
    }

    fn record(version: u32, event: &ConnectionEvent, metadata: Value) -> RecordedEvent {
        RecordedEvent {
            position: Position {
                commit: 0,
                global: i64::from(version),
            },
            stream_id: StreamId::new("connection", "x"),
            stream_version: version,
            event_id: Uuid::from_u128(u128::from(version)),
            event_type: event.event_type().to_owned(),
            event_version: event.event_version(),
            payload: crate::store::Payload::from_value(&event.to_payload()),
            metadata,
            recorded_at: at(i64::from(version)),
        }
    }

    fn fingerprints(n: u8) -> TokenFingerprints {
        TokenFingerprints {
            access_token: Some(format!("fp_a{n:015x}")),
            refresh_token: Some(format!("fp_r{n:015x}")),
        }
    }

    fn authorized(generation: u32, data_key: Uuid) -> ConnectionEvent {
        ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            authorization: Authorization {
                ownership: Default::default(),
                provider_config_key: "github".into(),
                connection_id: "user-1".into(),
                provider: "github".into(),
                flow: Flow::Oauth2,
                credentials_type: CredentialsType::Oauth2,
                data_key_id: data_key,
                credentials: sealed(data_key),
                has_refresh_token: true,
                expires_at: Some(at(3600)),
                scopes: vec!["repo".into(), "user".into()],
                connection_config: Map::from_iter([("subdomain".to_owned(), json!("acme"))]),
                fingerprints: fingerprints(generation as u8),
            },
            generation,
            authorized_at: at(0),
        })
    }

    fn leased(id: Uuid, trigger: RefreshTrigger) -> ConnectionEvent {
        ConnectionEvent::RefreshLeased(RefreshLeased {
            lease_id: id,
            holder: "grantline-a".into(),
            trigger,
            leased_at: at(10),
            lease_expires_at: at(70),
        })
    }

    fn refreshed(id: Uuid, data_key: Uuid) -> ConnectionEvent {
        ConnectionEvent::TokensRefreshed(TokensRefreshed {
            lease_id: id,
            credentials: sealed(data_key),
            expires_at: None,
            has_refresh_token: true,
            refresh_token_rotated: true,
            refresh_token_generation: 2,
            fingerprints: fingerprints(9),
            refreshed_at: at(11),
        })
    }

    fn failed(id: Uuid) -> ConnectionEvent {
        ConnectionEvent::RefreshFailed(RefreshFailed {
            lease_id: id,
            failure: RefreshFailure {
                class: FailureClass::Permanent,
                code: Some("invalid_grant".into()),
                provider_status: Some(400),
                description: Some(DESCRIPTION.into()),
            },
            failed_at: at(12),
        })
    }

    fn metadata_set() -> ConnectionEvent {
        ConnectionEvent::MetadataSet(MetadataSet {
            metadata: json!({ "team": METADATA_VALUE, "plan": { "tier": METADATA_VALUE } }),
            mode: MetadataMode::Merge,
            set_at: at(13),
        })
    }

    fn deleted(keys: Vec<Uuid>) -> ConnectionEvent {
        ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
            deleted_at: at(14),
            shredded_data_keys: keys,
        })
    }

    /// Two generations: authorized, refreshed, failed, metadata, deleted, authorized again.
    fn stream() -> Vec<RecordedEvent> {
        let by = |name: &str| json!({ "instance": name });
        vec![
            record(1, &authorized(1, key(1)), by("grantline-api")),
            record(
                2,
                &leased(lease(1), RefreshTrigger::Read),
                by("grantline-a"),
            ),
            record(3, &refreshed(lease(1), key(1)), by("grantline-a")),
            record(
                4,
                &leased(lease(2), RefreshTrigger::Force),
                by("grantline-a"),
            ),
            record(5, &failed(lease(2)), by("grantline-a")),
            record(6, &metadata_set(), by("grantline-api")),
            record(7, &deleted(vec![key(1)]), by("grantline-api")),
            record(8, &authorized(2, key(2)), json!({})),
        ]
    }

    fn json_of(entry: &HistoryEntry) -> Value {
        serde_json::to_value(entry).unwrap()
    }

    #[test]
    fn an_authorization_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[0]),
            json!({
                "stream_version": 1,
                "event_id": "00000000-0000-0000-0000-000000000001",
                "type": "connection_authorized",
                "recorded_at": "2023-11-14T22:13:21.000Z",
                "generation": 1,
                "provider": "github",
                "flow": "oauth2",
                "credentials_type": "OAUTH2",
                "scopes": ["repo", "user"],
                "expires_at": "2023-11-14T23:13:20.000Z",
                "has_refresh_token": true,
                "refresh_token_generation": 1,
                "fingerprints": {
                    "access_token": "fp_a000000000000001",
                    "refresh_token": "fp_r000000000000001"
                },
                "instance": "grantline-api",
                "secrets": "shredded"
            })
        );
        // The re-authorization after the deletion is sealed, with no instance recorded.
        assert_eq!(json_of(&entries[7])["secrets"], "sealed");
        assert_eq!(json_of(&entries[7])["generation"], 2);
        assert!(json_of(&entries[7]).get("instance").is_none());
    }

    #[test]
    fn a_lease_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[1]),
            json!({
                "stream_version": 2,
                "event_id": "00000000-0000-0000-0000-000000000002",
                "type": "refresh_leased",
                "recorded_at": "2023-11-14T22:13:22.000Z",
                "generation": 1,
                "trigger": "read",
                "instance": "grantline-a",
                "lease_id": "00000000-0000-0000-0000-000000002001",
                "lease_expires_at": "2023-11-14T22:14:30.000Z"
            })
        );
    }

    #[test]
    fn a_refresh_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[2]),
            json!({
                "stream_version": 3,
                "event_id": "00000000-0000-0000-0000-000000000003",
                "type": "tokens_refreshed",
                "recorded_at": "2023-11-14T22:13:23.000Z",
                "generation": 1,
                "expires_at": null,
                "has_refresh_token": true,
                "refresh_token_generation": 2,
                "refresh_token_rotated": true,
                "fingerprints": {
                    "access_token": "fp_a000000000000009",
                    "refresh_token": "fp_r000000000000009"
                },
                "trigger": "read",
                "instance": "grantline-a",
                "lease_id": "00000000-0000-0000-0000-000000002001",
                "secrets": "shredded"
            })
        );
    }

    #[test]
    fn a_failure_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[4]),
            json!({
                "stream_version": 5,
                "event_id": "00000000-0000-0000-0000-000000000005",
                "type": "refresh_failed",
                "recorded_at": "2023-11-14T22:13:25.000Z",
                "generation": 1,
                "trigger": "force",
                "instance": "grantline-a",
                "lease_id": "00000000-0000-0000-0000-000000002002",
                "error": { "class": "permanent", "code": "invalid_grant", "provider_status": 400 }
            })
        );
    }

    #[test]
    fn a_metadata_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[5]),
            json!({
                "stream_version": 6,
                "event_id": "00000000-0000-0000-0000-000000000006",
                "type": "metadata_set",
                "recorded_at": "2023-11-14T22:13:26.000Z",
                "generation": 1,
                "instance": "grantline-api",
                "metadata": { "mode": "merge", "keys": ["plan", "team"] }
            })
        );
    }

    #[test]
    fn a_deletion_entry_is_pinned() {
        let entries = history(&stream()).unwrap();
        assert_eq!(
            json_of(&entries[6]),
            json!({
                "stream_version": 7,
                "event_id": "00000000-0000-0000-0000-000000000007",
                "type": "connection_deleted",
                "recorded_at": "2023-11-14T22:13:27.000Z",
                "generation": 1,
                "instance": "grantline-api",
                "shredded_data_keys": 1
            })
        );
    }

    #[test]
    fn every_event_becomes_one_entry_in_order() {
        let entries = history(&stream()).unwrap();
        let versions: Vec<u32> = entries.iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6, 7, 8]);
        let types: Vec<&str> = entries.iter().map(|e| e.entry_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "connection_authorized",
                "refresh_leased",
                "tokens_refreshed",
                "refresh_leased",
                "refresh_failed",
                "metadata_set",
                "connection_deleted",
                "connection_authorized",
            ]
        );
        for entry in &entries {
            assert_eq!(json_of(entry)["type"], entry.entry_type.as_str());
        }
    }

    #[test]
    fn no_sealed_bytes_description_or_metadata_value_appears() {
        let text = serde_json::to_string(&history(&stream()).unwrap()).unwrap();
        let sealed_json = serde_json::to_string(&sealed(key(1))).unwrap();
        let ciphertext = serde_json::from_str::<Value>(&sealed_json).unwrap()["ciphertext"]
            .as_str()
            .unwrap()
            .to_owned();
        for forbidden in [
            PLAIN_ACCESS,
            PLAIN_REFRESH,
            DESCRIPTION,
            "revoked",
            METADATA_VALUE,
            "tier",
            "acme",
            "subdomain",
            &ciphertext,
            "ciphertext",
            "credentials\"",
            "connection_config",
        ] {
            assert!(!text.contains(forbidden), "{forbidden:?} leaked: {text}");
        }
        assert!(!text.contains(&key(1).to_string()), "no data key ids");
    }

    #[test]
    fn only_keys_destroyed_by_a_later_deletion_are_shredded() {
        // A deletion that lists a key shreds only the entries before it; an entry after it under
        // the same key id (impossible in practice) stays sealed.
        let records = vec![
            record(1, &authorized(1, key(1)), json!({})),
            record(2, &deleted(vec![key(1)]), json!({})),
            record(3, &authorized(2, key(2)), json!({})),
            record(4, &leased(lease(1), RefreshTrigger::Schedule), json!({})),
            record(5, &refreshed(lease(1), key(2)), json!({})),
        ];
        let states: Vec<Option<SecretsState>> = history(&records)
            .unwrap()
            .iter()
            .map(|e| e.secrets)
            .collect();
        use SecretsState::{Sealed, Shredded};
        assert_eq!(
            states,
            [Some(Shredded), None, Some(Sealed), None, Some(Sealed)]
        );
    }

    #[test]
    fn a_history_folded_in_parts_is_the_history_folded_at_once() {
        let mut records = stream();
        records.push(record(
            records.len() as u32 + 1,
            &deleted(vec![key(1), key(2)]),
            json!({}),
        ));
        let whole = serde_json::to_value(history(&records).unwrap()).unwrap();
        for split in 0..=records.len() {
            let mut folded = FoldedHistory::default();
            folded.extend(&records[..split]).unwrap();
            assert_eq!(folded.version() as usize, split);
            folded.extend(&records[split..]).unwrap();
            assert_eq!(
                serde_json::to_value(folded.entries()).unwrap(),
                whole,
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_outcome_without_a_known_lease_takes_the_instance_from_its_metadata() {
        let mut folder = HistoryFolder::new();
        let entry = folder.entry(
            &record(
                9,
                &failed(lease(7)),
                json!({ "instance": "grantline-late" }),
            ),
            &failed(lease(7)),
        );
        assert_eq!(entry.instance.as_deref(), Some("grantline-late"));
        assert_eq!(entry.trigger, None);
        assert_eq!(entry.generation, 0);
        assert_eq!(folder.connection(), None);
    }

    #[test]
    fn a_folder_names_the_connection_once_it_saw_an_authorization() {
        let mut folder = HistoryFolder::new();
        let event = authorized(3, key(3));
        folder.entry(&record(1, &event, json!({})), &event);
        assert_eq!(folder.connection(), Some(("github", "user-1")));
    }

    #[test]
    fn an_unreadable_event_stops_the_history() {
        let mut records = stream();
        records[3].payload = crate::store::Payload::from_value(&json!({ "nonsense": true }));
        let error = history(&records).unwrap_err();
        assert_eq!(error.stream_version, 4);
    }
}
