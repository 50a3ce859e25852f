//! An integration (a provider configuration: provider, OAuth client, scopes) as a pure
//! event-sourced aggregate.
//!
//! An integration's stream is [`stream_id`]`(provider_config_key)`, derived deterministically so
//! that two concurrent creations meet at the store's expected-version check.
//!
//! Invariants [`decide`] keeps:
//! - At most one live integration per key: creating one that exists is refused; creating it again
//!   after a deletion is allowed and continues the same stream.
//! - Only a live integration can be updated or deleted.
//! - The client secret appears only [`Sealed`].
//!
//! [`apply`] is total and trusts the log: events that cannot concern the state they meet (an
//! update of an integration that does not exist) are ignored; `decide` never produces them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::event::{DecodeError, DomainEvent, payload_json, read_payload};
use crate::keys::Sealed;
use crate::store::StreamId;

/// The stream category of integrations.
pub const CATEGORY: &str = "integration";

/// The UUID v5 namespace of integration stream ids. Changing it orphans every existing stream.
pub const STREAM_NAMESPACE: Uuid = Uuid::from_u128(0x446a_214a_c532_4392_b628_5eca_fbff_7bb4);

const EVENT_VERSION: i16 = 1;
const INTEGRATION_CREATED: &str = "IntegrationCreated";
const INTEGRATION_UPDATED: &str = "IntegrationUpdated";
/// The type name of [`IntegrationDeleted`] in the log.
pub const INTEGRATION_DELETED: &str = "IntegrationDeleted";

/// The stream of the integration `provider_config_key`. Deterministic.
pub fn stream_id(provider_config_key: &str) -> StreamId {
    StreamId::new(
        CATEGORY,
        Uuid::new_v5(&STREAM_NAMESPACE, provider_config_key.as_bytes()),
    )
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// An integration's configuration, its client secret sealed: what a creation or an update
/// sets. Its fields stand flat in the payloads of both events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IntegrationSettings {
    /// The provider template's name.
    pub provider: String,
    /// The OAuth client id (not a secret).
    pub oauth_client_id: String,
    /// The OAuth client secret, sealed.
    pub client_secret: Sealed,
    /// The scopes to request.
    pub oauth_scopes: Vec<String>,
    /// The name it is shown by; the template's when absent. (Absent in events written before
    /// integrations had one.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// The integration was created (first time, or again after a deletion).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IntegrationCreated {
    /// The integration's key, unique among live integrations.
    pub provider_config_key: String,
    /// Its configuration.
    #[serde(flatten)]
    pub settings: IntegrationSettings,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// The integration's configuration was replaced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IntegrationUpdated {
    /// The new configuration.
    #[serde(flatten)]
    pub settings: IntegrationSettings,
    /// When it was updated.
    pub updated_at: DateTime<Utc>,
}

/// The integration was deleted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IntegrationDeleted {
    /// When it was deleted.
    pub deleted_at: DateTime<Utc>,
}

/// Everything that happens to an integration. Stored with the variant's name as `event_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum IntegrationEvent {
    /// See [`IntegrationCreated`].
    IntegrationCreated(IntegrationCreated),
    /// See [`IntegrationUpdated`].
    IntegrationUpdated(IntegrationUpdated),
    /// See [`IntegrationDeleted`].
    IntegrationDeleted(IntegrationDeleted),
}

impl DomainEvent for IntegrationEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::IntegrationCreated(_) => INTEGRATION_CREATED,
            Self::IntegrationUpdated(_) => INTEGRATION_UPDATED,
            Self::IntegrationDeleted(_) => INTEGRATION_DELETED,
        }
    }

    fn event_version(&self) -> i16 {
        EVENT_VERSION
    }

    fn to_payload(&self) -> Value {
        match self {
            Self::IntegrationCreated(payload) => payload_json(payload),
            Self::IntegrationUpdated(payload) => payload_json(payload),
            Self::IntegrationDeleted(payload) => payload_json(payload),
        }
    }

    fn decode(event_type: &str, event_version: i16, payload: &str) -> Result<Self, DecodeError> {
        match (event_type, event_version) {
            (INTEGRATION_CREATED, 1) => {
                read_payload(event_type, payload).map(Self::IntegrationCreated)
            }
            (INTEGRATION_UPDATED, 1) => {
                read_payload(event_type, payload).map(Self::IntegrationUpdated)
            }
            (INTEGRATION_DELETED, 1) => {
                read_payload(event_type, payload).map(Self::IntegrationDeleted)
            }
            _ => Err(DecodeError::Unknown {
                event_type: event_type.to_owned(),
                event_version,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// An integration as its events leave it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub enum Integration {
    /// No event yet.
    #[default]
    NeverCreated,
    /// Created and not deleted since.
    Active(ActiveIntegration),
    /// Deleted; it may be created again.
    Deleted(DeletedIntegration),
}

/// The state of a live integration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ActiveIntegration {
    /// The integration's key.
    pub provider_config_key: String,
    /// Its configuration, as the last creation or update set it.
    #[serde(flatten)]
    pub settings: IntegrationSettings,
    /// When it was (last) created.
    pub created_at: DateTime<Utc>,
    /// When it was last updated, if ever since its creation.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The state of a deleted integration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeletedIntegration {
    /// When it was deleted.
    pub deleted_at: DateTime<Utc>,
}

impl Integration {
    /// The live state, unless never created or deleted.
    pub fn active(&self) -> Option<&ActiveIntegration> {
        match self {
            Self::Active(active) => Some(active),
            Self::NeverCreated | Self::Deleted(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// What may be asked of an integration.
#[derive(Clone, Debug, PartialEq)]
pub enum IntegrationCommand {
    /// Create the integration (again, if it was deleted).
    Create {
        provider_config_key: String,
        settings: IntegrationSettings,
        now: DateTime<Utc>,
    },
    /// Replace the live integration's configuration; a `display_name` of `None` keeps the
    /// current one.
    Update {
        settings: IntegrationSettings,
        now: DateTime<Utc>,
    },
    /// Give the live integration a new name; the rest of its configuration stays as the log
    /// has it when this is decided (so a concurrent update is never undone).
    Rename {
        display_name: String,
        now: DateTime<Utc>,
    },
    /// Delete the live integration.
    Delete { now: DateTime<Utc> },
}

/// Why an integration command was refused. A domain answer, not a failure of the store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrationRejected {
    /// A live integration with this key exists.
    #[error("the integration already exists")]
    AlreadyExists,
    /// The integration was never created.
    #[error("the integration does not exist")]
    NotFound,
    /// The integration was deleted.
    #[error("the integration was deleted")]
    Deleted,
}

// ---------------------------------------------------------------------------------------------
// Decide and apply
// ---------------------------------------------------------------------------------------------

/// The events `command` produces in `state`, or why it is refused.
pub fn decide(
    state: &Integration,
    command: IntegrationCommand,
) -> Result<Vec<IntegrationEvent>, IntegrationRejected> {
    let event = match command {
        IntegrationCommand::Create {
            provider_config_key,
            settings,
            now,
        } => {
            if let Integration::Active(_) = state {
                return Err(IntegrationRejected::AlreadyExists);
            }
            IntegrationEvent::IntegrationCreated(IntegrationCreated {
                provider_config_key,
                settings,
                created_at: now,
            })
        }
        IntegrationCommand::Update { mut settings, now } => {
            let current = existing(state)?;
            if settings.display_name.is_none() {
                settings.display_name = current.settings.display_name.clone();
            }
            IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
                settings,
                updated_at: now,
            })
        }
        IntegrationCommand::Rename { display_name, now } => {
            let current = existing(state)?;
            IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
                settings: IntegrationSettings {
                    display_name: Some(display_name),
                    ..current.settings.clone()
                },
                updated_at: now,
            })
        }
        IntegrationCommand::Delete { now } => {
            existing(state)?;
            IntegrationEvent::IntegrationDeleted(IntegrationDeleted { deleted_at: now })
        }
    };
    Ok(vec![event])
}

/// The live integration, or `NotFound` / `Deleted`.
fn existing(state: &Integration) -> Result<&ActiveIntegration, IntegrationRejected> {
    match state {
        Integration::NeverCreated => Err(IntegrationRejected::NotFound),
        Integration::Deleted(_) => Err(IntegrationRejected::Deleted),
        Integration::Active(active) => Ok(active),
    }
}

/// `state` after `event`.
pub fn apply(state: &mut Integration, event: &IntegrationEvent) {
    match event {
        IntegrationEvent::IntegrationCreated(event) => {
            *state = Integration::Active(ActiveIntegration {
                provider_config_key: event.provider_config_key.clone(),
                settings: event.settings.clone(),
                created_at: event.created_at,
                updated_at: None,
            });
        }
        IntegrationEvent::IntegrationUpdated(event) => {
            if let Integration::Active(active) = state {
                active.settings = event.settings.clone();
                active.updated_at = Some(event.updated_at);
            }
        }
        IntegrationEvent::IntegrationDeleted(event) => {
            *state = Integration::Deleted(DeletedIntegration {
                deleted_at: event.deleted_at,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::IntegrationRejected::{AlreadyExists, Deleted, NotFound};
    use super::*;
    use crate::scenario::{
        Decider, Given, assert_malformed_without, assert_pinned, assert_unknown, at,
    };

    fn secret(bytes: &[u8]) -> Sealed {
        Sealed {
            key_id: Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_00bb),
            ciphertext: bytes.to_vec(),
        }
    }

    /// The first configuration: client 1, scope `repo`.
    fn first_settings() -> IntegrationSettings {
        IntegrationSettings {
            provider: "github".to_owned(),
            oauth_client_id: "client-1".to_owned(),
            client_secret: secret(b"secret-1"),
            oauth_scopes: vec!["repo".to_owned()],
            display_name: None,
        }
    }

    /// The second configuration: client 2, scopes `repo` and `user`.
    fn second_settings() -> IntegrationSettings {
        IntegrationSettings {
            provider: "github".to_owned(),
            oauth_client_id: "client-2".to_owned(),
            client_secret: secret(b"secret-2"),
            oauth_scopes: vec!["repo".to_owned(), "user".to_owned()],
            display_name: Some("GitHub (production)".to_owned()),
        }
    }

    fn create(now: DateTime<Utc>) -> IntegrationCommand {
        IntegrationCommand::Create {
            provider_config_key: "github-prod".to_owned(),
            settings: first_settings(),
            now,
        }
    }

    fn created(now: DateTime<Utc>) -> IntegrationEvent {
        IntegrationEvent::IntegrationCreated(IntegrationCreated {
            provider_config_key: "github-prod".to_owned(),
            settings: first_settings(),
            created_at: now,
        })
    }

    fn update(now: DateTime<Utc>) -> IntegrationCommand {
        IntegrationCommand::Update {
            settings: second_settings(),
            now,
        }
    }

    fn updated(now: DateTime<Utc>) -> IntegrationEvent {
        IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
            settings: second_settings(),
            updated_at: now,
        })
    }

    fn deleted(now: DateTime<Utc>) -> IntegrationEvent {
        IntegrationEvent::IntegrationDeleted(IntegrationDeleted { deleted_at: now })
    }

    impl Decider for Integration {
        type Event = IntegrationEvent;
        type Command = IntegrationCommand;
        type Rejection = IntegrationRejected;

        fn apply(state: &mut Self, event: &IntegrationEvent) {
            apply(state, event);
        }

        fn decide(
            state: &Self,
            command: IntegrationCommand,
        ) -> Result<Vec<IntegrationEvent>, IntegrationRejected> {
            decide(state, command)
        }
    }

    fn given(events: &[IntegrationEvent]) -> Given<Integration> {
        crate::scenario::given(events)
    }

    /// After `events`, `command` is refused with `rejection`.
    fn rejected(
        events: &[IntegrationEvent],
        command: IntegrationCommand,
        rejection: IntegrationRejected,
    ) {
        given(events).when(command).then_rejected(rejection);
    }

    #[test]
    fn an_integration_is_created() {
        let state = given(&[]).when(create(at(0))).then(&[created(at(0))]);
        let active = state.active().unwrap();
        assert_eq!(active.provider_config_key, "github-prod");
        assert_eq!(active.settings.client_secret, secret(b"secret-1"));
        assert_eq!(active.created_at, at(0));
        assert_eq!(active.updated_at, None);
    }

    #[test]
    fn creating_an_existing_integration_is_rejected() {
        rejected(&[created(at(0))], create(at(1)), AlreadyExists);
        rejected(
            &[created(at(0)), updated(at(1))],
            create(at(2)),
            AlreadyExists,
        );
    }

    #[test]
    fn an_integration_can_be_created_again_after_its_deletion() {
        let state = given(&[created(at(0)), updated(at(1)), deleted(at(2))])
            .when(create(at(3)))
            .then(&[created(at(3))]);
        let active = state.active().unwrap();
        assert_eq!(active.settings.oauth_client_id, "client-1");
        assert_eq!(active.created_at, at(3));
        assert_eq!(active.updated_at, None);
    }

    #[test]
    fn a_rename_changes_only_the_name_and_an_update_without_one_keeps_it() {
        let named = |name: &str| IntegrationSettings {
            display_name: Some(name.to_owned()),
            ..second_settings()
        };
        // Renamed after the update: the update's configuration stays.
        given(&[created(at(0)), updated(at(1))])
            .when(IntegrationCommand::Rename {
                display_name: "Work".to_owned(),
                now: at(2),
            })
            .then(&[IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
                settings: named("Work"),
                updated_at: at(2),
            })]);
        // An update that names none keeps the one the log has.
        let renamed = IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
            settings: IntegrationSettings {
                display_name: Some("Work".to_owned()),
                ..first_settings()
            },
            updated_at: at(1),
        });
        given(&[created(at(0)), renamed])
            .when(IntegrationCommand::Update {
                settings: IntegrationSettings {
                    display_name: None,
                    ..second_settings()
                },
                now: at(2),
            })
            .then(&[IntegrationEvent::IntegrationUpdated(IntegrationUpdated {
                settings: named("Work"),
                updated_at: at(2),
            })]);
        rejected(
            &[created(at(0)), deleted(at(1))],
            IntegrationCommand::Rename {
                display_name: "Work".to_owned(),
                now: at(2),
            },
            Deleted,
        );
    }

    #[test]
    fn an_update_replaces_the_configuration() {
        let state = given(&[created(at(0))])
            .when(update(at(1)))
            .then(&[updated(at(1))]);
        let active = state.active().unwrap();
        assert_eq!(active.settings.oauth_client_id, "client-2");
        assert_eq!(active.settings.client_secret, secret(b"secret-2"));
        assert_eq!(active.settings.oauth_scopes, vec!["repo", "user"]);
        assert_eq!(active.created_at, at(0));
        assert_eq!(active.updated_at, Some(at(1)));
    }

    #[test]
    fn updating_a_missing_or_deleted_integration_is_rejected() {
        rejected(&[], update(at(1)), NotFound);
        rejected(&[created(at(0)), deleted(at(1))], update(at(2)), Deleted);
    }

    #[test]
    fn an_integration_is_deleted() {
        let state = given(&[created(at(0))])
            .when(IntegrationCommand::Delete { now: at(1) })
            .then(&[deleted(at(1))]);
        assert_eq!(
            state,
            Integration::Deleted(DeletedIntegration { deleted_at: at(1) })
        );
    }

    #[test]
    fn deleting_a_missing_integration_or_deleting_twice_is_rejected() {
        rejected(&[], IntegrationCommand::Delete { now: at(1) }, NotFound);
        rejected(
            &[created(at(0)), deleted(at(1))],
            IntegrationCommand::Delete { now: at(2) },
            Deleted,
        );
    }

    #[test]
    fn the_stream_id_is_deterministic_and_pinned() {
        assert_eq!(stream_id("github-prod"), stream_id("github-prod"));
        assert_ne!(stream_id("github-prod"), stream_id("github"));
        assert_eq!(
            stream_id("github-prod").as_str(),
            "integration-a8a5781f-e345-50ba-884a-76864e834cd3"
        );
        assert_eq!(stream_id("github-prod").category(), CATEGORY);
    }

    // --- JSON pinning -------------------------------------------------------------------------

    #[test]
    fn integration_created_json_is_pinned() {
        assert_pinned(
            &created(at(0)),
            "IntegrationCreated",
            &json!({
                "provider_config_key": "github-prod",
                "provider": "github",
                "oauth_client_id": "client-1",
                "client_secret": {
                    "key_id": "00000000-0000-4000-8000-0000000000bb",
                    "ciphertext": "c2VjcmV0LTE="
                },
                "oauth_scopes": ["repo"],
                "created_at": "2024-05-01T12:00:00Z"
            }),
        );
    }

    #[test]
    fn integration_updated_json_is_pinned() {
        assert_pinned(
            &updated(at(1)),
            "IntegrationUpdated",
            &json!({
                "provider": "github",
                "oauth_client_id": "client-2",
                "client_secret": {
                    "key_id": "00000000-0000-4000-8000-0000000000bb",
                    "ciphertext": "c2VjcmV0LTI="
                },
                "oauth_scopes": ["repo", "user"],
                "display_name": "GitHub (production)",
                "updated_at": "2024-05-01T12:01:00Z"
            }),
        );
    }

    #[test]
    fn integration_deleted_json_is_pinned() {
        assert_pinned(
            &deleted(at(2)),
            "IntegrationDeleted",
            &json!({"deleted_at": "2024-05-01T12:02:00Z"}),
        );
    }

    #[test]
    fn decoding_an_unknown_type_or_version_is_unknown() {
        assert_unknown::<IntegrationEvent>("IntegrationRenamed", 1, &json!({}));
        assert_unknown::<IntegrationEvent>("IntegrationDeleted", 2, &deleted(at(0)).to_payload());
    }

    #[test]
    fn decoding_a_payload_without_a_required_field_is_malformed() {
        assert_malformed_without(&created(at(0)), "IntegrationCreated", "client_secret");
    }
}
