//! Which connection event makes which webhook, and the webhook's body.
//!
//! Whether an authorization is a creation or a re-authorization, and a refresh a recovery,
//! depends on the connection's state before the event, which the caller folds and passes in:
//! the mapping itself is pure. Bodies carry no secret: no token, no fingerprint, no provider
//! free text (a failure's class and code, and the provider's HTTP status, are ours to tell).

use chrono::SecondsFormat;
use domain::connection::{self, Connection, ConnectionEvent};
use domain::store::RecordedEvent;
use serde_json::{Value, json};

/// The kinds of webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookEvent {
    /// A connection was authorized that did not exist or had been deleted.
    ConnectionCreated,
    /// An existing connection was authorized again.
    ConnectionReauthorized,
    /// A connection was deleted.
    ConnectionDeleted,
    /// A refresh failed.
    RefreshFailed,
    /// A refresh succeeded after one or more failures.
    RefreshRecovered,
}

impl WebhookEvent {
    /// The `event` field of the body.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectionCreated => "connection.created",
            Self::ConnectionReauthorized => "connection.reauthorized",
            Self::ConnectionDeleted => "connection.deleted",
            Self::RefreshFailed => "refresh.failed",
            Self::RefreshRecovered => "refresh.recovered",
        }
    }

    /// Nango's `operation` for it.
    fn operation(self) -> &'static str {
        match self {
            Self::ConnectionCreated => "creation",
            Self::ConnectionReauthorized => "override",
            Self::ConnectionDeleted => "deletion",
            Self::RefreshFailed | Self::RefreshRecovered => "refresh",
        }
    }
}

/// A webhook ready to be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub event: WebhookEvent,
    pub body: Value,
}

/// The webhook of `event` (recorded as `recorded`), given the connection's state before it;
/// `None` for events without one (leases, metadata, a refresh that did not follow a failure,
/// and authorizations a bulk import brought over from elsewhere: their metadata names an
/// `origin`, and a migration of a million connections must not become a million webhooks).
pub fn webhook_for(
    prior: &Connection,
    event: &ConnectionEvent,
    recorded: &RecordedEvent,
) -> Option<Webhook> {
    let (kind, occurred_at, identity) = match event {
        ConnectionEvent::ConnectionAuthorized(_)
            if recorded
                .metadata
                .get(domain::history::ORIGIN_METADATA_KEY)
                .is_some() =>
        {
            return None;
        }
        ConnectionEvent::ConnectionAuthorized(authorized) => {
            let kind = match prior {
                Connection::Active(_) => WebhookEvent::ConnectionReauthorized,
                Connection::NeverAuthorized | Connection::Deleted(_) => {
                    WebhookEvent::ConnectionCreated
                }
            };
            let authorization = &authorized.authorization;
            let identity = Identity {
                provider_config_key: &authorization.provider_config_key,
                connection_id: &authorization.connection_id,
                provider: &authorization.provider,
                auth_mode: json!(authorization.credentials_type),
                generation: authorized.generation,
            };
            (kind, authorized.authorized_at, identity)
        }
        ConnectionEvent::ConnectionDeleted(deleted) => (
            WebhookEvent::ConnectionDeleted,
            deleted.deleted_at,
            Identity::of(prior.active()?),
        ),
        ConnectionEvent::RefreshFailed(failed) => (
            WebhookEvent::RefreshFailed,
            failed.failed_at,
            Identity::of(prior.active()?),
        ),
        ConnectionEvent::TokensRefreshed(refreshed) => {
            let active = prior.active()?;
            active.last_failure.as_ref()?;
            (
                WebhookEvent::RefreshRecovered,
                refreshed.refreshed_at,
                Identity::of(active),
            )
        }
        ConnectionEvent::RefreshLeased(_)
        | ConnectionEvent::MetadataSet(_)
        | ConnectionEvent::OwnershipSet(_) => return None,
    };
    let mut body = json!({
        "id": recorded.event_id,
        "event": kind.name(),
        "occurred_at": occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "provider_config_key": identity.provider_config_key,
        "connection_id": identity.connection_id,
        "provider": identity.provider,
        "generation": identity.generation,
        "global_position": recorded.position.global,
        // Nango's auth webhook fields. `from` says the webhook is the service's own, not a
        // provider's it forwards, which is what Nango handlers tell apart by it.
        "from": "nango",
        "type": "auth",
        "operation": kind.operation(),
        "success": kind != WebhookEvent::RefreshFailed,
        "connectionId": identity.connection_id,
        "providerConfigKey": identity.provider_config_key,
        "authMode": identity.auth_mode,
    });
    // The connection's tags (Nango sends them whenever the connection exists), and the end
    // user of an authorization through a connect session.
    let ownership = match event {
        ConnectionEvent::ConnectionAuthorized(authorized)
            if !authorized.authorization.ownership.is_empty() =>
        {
            Some(&*authorized.authorization.ownership)
        }
        _ => prior.active().map(|active| &active.ownership),
    };
    body["tags"] = json!(ownership.map(|o| &o.tags).cloned().unwrap_or_default());
    match event {
        ConnectionEvent::ConnectionAuthorized(authorized) => {
            body["flow"] = json!(authorized.authorization.flow);
            if let Some(user) = &authorized.authorization.ownership.end_user {
                body["endUser"] = json!({
                    "endUserId": user.id,
                    "endUserEmail": user.email,
                    "displayName": user.display_name,
                    "organizationId": user.organization.as_ref().map(|o| &o.id),
                    "tags": authorized.authorization.ownership.tags,
                });
            }
        }
        ConnectionEvent::RefreshFailed(failed) => {
            // The provider's free-text description is not forwarded: it is theirs, not ours.
            let class = json!(failed.failure.class);
            body["error"] = json!({
                "type": failed.failure.code.as_ref().map_or(class.clone(), |code| json!(code)),
                "description": class,
            });
            body["failure"] = json!({
                "class": failed.failure.class,
                "code": failed.failure.code,
                "provider_status": failed.failure.provider_status,
            });
        }
        ConnectionEvent::TokensRefreshed(refreshed) => {
            body["refresh_token_generation"] = json!(refreshed.refresh_token_generation);
            body["expires_at"] = json!(
                refreshed
                    .expires_at
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
            );
        }
        _ => {}
    }
    Some(Webhook { event: kind, body })
}

/// Who a webhook is about.
struct Identity<'a> {
    provider_config_key: &'a str,
    connection_id: &'a str,
    provider: &'a str,
    auth_mode: Value,
    generation: u32,
}

impl<'a> Identity<'a> {
    fn of(active: &'a connection::ActiveConnection) -> Self {
        Self {
            provider_config_key: &active.provider_config_key,
            connection_id: &active.connection_id,
            provider: &active.provider,
            auth_mode: json!(active.credentials_type),
            generation: active.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::{DateTime, TimeZone, Utc};
    use domain::connection::{
        Authorization, ConnectionAuthorized, ConnectionDeleted, CredentialsType, FailureClass,
        Flow, MetadataMode, MetadataSet, RefreshFailed, RefreshFailure, RefreshLeased,
        RefreshTrigger, TokenFingerprints, TokensRefreshed,
    };
    use domain::event::DomainEvent;
    use domain::keys::Sealed;
    use domain::store::Position;
    use serde_json::Map;
    use uuid::Uuid;

    use super::*;

    fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap() + chrono::Duration::minutes(minute)
    }

    fn sealed() -> Sealed {
        Sealed {
            key_id: Uuid::nil(),
            ciphertext: b"sealed".to_vec(),
        }
    }

    fn authorized(generation: u32) -> ConnectionEvent {
        ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
            authorization: Authorization {
                ownership: Default::default(),
                provider_config_key: "github-prod".to_owned(),
                connection_id: "user-1".to_owned(),
                provider: "github".to_owned(),
                flow: Flow::Import,
                credentials_type: CredentialsType::Oauth2,
                data_key_id: Uuid::from_u128(u128::from(generation)),
                credentials: sealed(),
                has_refresh_token: true,
                expires_at: None,
                scopes: Vec::new(),
                connection_config: Map::new(),
                fingerprints: TokenFingerprints {
                    access_token: Some("fp-access".to_owned()),
                    refresh_token: Some("fp-refresh".to_owned()),
                },
            },
            generation,
            authorized_at: at(0),
        })
    }

    fn leased() -> ConnectionEvent {
        ConnectionEvent::RefreshLeased(RefreshLeased {
            lease_id: Uuid::nil(),
            holder: "a".to_owned(),
            trigger: RefreshTrigger::Read,
            leased_at: at(1),
            lease_expires_at: at(2),
        })
    }

    fn failed(code: Option<&str>) -> ConnectionEvent {
        ConnectionEvent::RefreshFailed(RefreshFailed {
            lease_id: Uuid::nil(),
            failure: RefreshFailure {
                class: FailureClass::Permanent,
                code: code.map(str::to_owned),
                provider_status: Some(400),
                description: Some("provider says: token abc123 revoked".to_owned()),
            },
            failed_at: at(3),
        })
    }

    fn refreshed() -> ConnectionEvent {
        ConnectionEvent::TokensRefreshed(TokensRefreshed {
            lease_id: Uuid::nil(),
            credentials: sealed(),
            expires_at: Some(at(60)),
            has_refresh_token: true,
            refresh_token_rotated: true,
            refresh_token_generation: 2,
            fingerprints: TokenFingerprints::default(),
            refreshed_at: at(4),
        })
    }

    fn deleted() -> ConnectionEvent {
        ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
            deleted_at: at(5),
            shredded_data_keys: Vec::new(),
        })
    }

    fn recorded(event: &ConnectionEvent) -> RecordedEvent {
        RecordedEvent {
            position: Position {
                commit: 7,
                global: 42,
            },
            stream_id: connection::stream_id("github-prod", "user-1"),
            stream_version: 1,
            event_id: Uuid::from_u128(99),
            event_type: event.event_type().to_owned(),
            event_version: 1,
            payload: domain::store::Payload::from_value(&event.to_payload()),
            metadata: json!({}),
            recorded_at: at(0),
        }
    }

    /// The webhook names produced by `events` in order, folding the state as the subscriber does.
    fn names(events: &[ConnectionEvent]) -> Vec<Option<&'static str>> {
        let mut state = Connection::default();
        events
            .iter()
            .map(|event| {
                let webhook = webhook_for(&state, event, &recorded(event));
                connection::apply(&mut state, event);
                webhook.map(|w| w.event.name())
            })
            .collect()
    }

    #[test]
    fn auth_webhooks_carry_the_connections_tags_and_a_sessions_end_user() {
        let mut through_session = authorized(1);
        if let ConnectionEvent::ConnectionAuthorized(a) = &mut through_session {
            *a.authorization.ownership = domain::connect_session::Ownership {
                tags: [("end_user_id".to_owned(), "u1".to_owned())].into(),
                end_user: Some(domain::connect_session::EndUser {
                    id: "u1".to_owned(),
                    email: Some("u1@example.com".to_owned()),
                    ..Default::default()
                }),
                connect_session_id: Some(Uuid::nil()),
            };
        }
        let mut state = Connection::default();
        let created = webhook_for(&state, &through_session, &recorded(&through_session)).unwrap();
        assert_eq!(created.body["tags"], json!({"end_user_id": "u1"}));
        assert_eq!(created.body["endUser"]["endUserId"], "u1");
        assert_eq!(created.body["endUser"]["endUserEmail"], "u1@example.com");
        connection::apply(&mut state, &through_session);
        // Later events carry the connection's tags, not the end user.
        let failure = failed(None);
        let failed = webhook_for(&state, &failure, &recorded(&failure)).unwrap();
        assert_eq!(failed.body["tags"], json!({"end_user_id": "u1"}));
        assert!(failed.body.get("endUser").is_none());
        // Without a session: empty tags, no end user.
        let plain = authorized(1);
        let plain = webhook_for(&Connection::default(), &plain, &recorded(&plain)).unwrap();
        assert_eq!(plain.body["tags"], json!({}));
        assert!(plain.body.get("endUser").is_none());
    }

    #[test]
    fn authorizations_are_creations_unless_the_connection_exists() {
        assert_eq!(
            names(&[authorized(1), authorized(2), deleted(), authorized(3)]),
            [
                Some("connection.created"),
                Some("connection.reauthorized"),
                Some("connection.deleted"),
                Some("connection.created"),
            ]
        );
    }

    #[test]
    fn a_refresh_is_a_recovery_only_after_a_failure() {
        assert_eq!(
            names(&[
                authorized(1),
                leased(),
                refreshed(),
                leased(),
                failed(None),
                leased(),
                failed(Some("invalid_grant")),
                leased(),
                refreshed(),
                leased(),
                refreshed(),
            ]),
            [
                Some("connection.created"),
                None,
                None,
                None,
                Some("refresh.failed"),
                None,
                Some("refresh.failed"),
                None,
                Some("refresh.recovered"),
                None,
                None,
            ]
        );
        // A re-authorization clears the failures: the next refresh recovers nothing.
        assert_eq!(
            names(&[authorized(1), failed(None), authorized(2), refreshed()]),
            [
                Some("connection.created"),
                Some("refresh.failed"),
                Some("connection.reauthorized"),
                None
            ]
        );
    }

    #[test]
    fn metadata_and_leases_have_no_webhook() {
        let metadata = ConnectionEvent::MetadataSet(MetadataSet {
            metadata: json!({"a": 1}),
            mode: MetadataMode::Merge,
            set_at: at(1),
        });
        assert_eq!(
            names(&[authorized(1), metadata, leased()]),
            [Some("connection.created"), None, None]
        );
    }

    #[test]
    fn bulk_imported_authorizations_have_no_webhook() {
        let event = authorized(1);
        let mut imported = recorded(&event);
        imported.metadata = json!({"instance": "grantline-import-x", "origin": "nango"});
        assert!(webhook_for(&Connection::default(), &event, &imported).is_none());
        assert!(webhook_for(&Connection::default(), &event, &recorded(&event)).is_some());
    }

    #[test]
    fn bodies_carry_nango_fields_and_no_secret_or_provider_text() {
        let mut state = Connection::default();
        connection::apply(&mut state, &authorized(1));
        let event = failed(Some("invalid_grant"));
        let webhook = webhook_for(&state, &event, &recorded(&event)).unwrap();
        let body = &webhook.body;
        assert_eq!(body["id"], "00000000-0000-0000-0000-000000000063");
        assert_eq!(body["event"], "refresh.failed");
        assert_eq!(body["occurred_at"], "2024-05-01T12:03:00.000Z");
        assert_eq!(body["from"], "nango");
        assert_eq!(body["type"], "auth");
        assert_eq!(body["operation"], "refresh");
        assert_eq!(body["success"], false);
        assert_eq!(body["connectionId"], "user-1");
        assert_eq!(body["providerConfigKey"], "github-prod");
        assert_eq!(body["provider"], "github");
        assert_eq!(body["authMode"], "OAUTH2");
        assert_eq!(body["generation"], 1);
        assert_eq!(
            body["error"],
            json!({"type": "invalid_grant", "description": "permanent"})
        );
        let text = body.to_string();
        for secret in ["abc123", "fp-access", "fp-refresh", "c2VhbGVk"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // Without a provider code the class is the type.
        let event = failed(None);
        let webhook = webhook_for(&state, &event, &recorded(&event)).unwrap();
        assert_eq!(webhook.body["error"]["type"], "permanent");
    }
}
