//! Values the connection's tests build their scenarios from: one fixed connection
//! (`github` / `user-1`), its commands and the events they decide, by data key, lease and time.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::*;
use crate::keys::Sealed;

pub(crate) fn key(n: u128) -> Uuid {
    Uuid::from_u128(0xd000 + n)
}

pub(crate) fn lease_id(n: u128) -> Uuid {
    Uuid::from_u128(0x1ea5e + n)
}

pub(crate) fn sealed(key_id: Uuid, bytes: &[u8]) -> Sealed {
    Sealed {
        key_id,
        ciphertext: bytes.to_vec(),
    }
}

pub(crate) fn fingerprints(access: &str, refresh: &str) -> TokenFingerprints {
    TokenFingerprints {
        access_token: Some(access.to_owned()),
        refresh_token: Some(refresh.to_owned()),
    }
}

/// An OAuth 2 authorization sealed under `data_key`, its token expiring an hour after `now`.
pub(crate) fn authorization(data_key: Uuid, now: DateTime<Utc>) -> Authorization {
    Authorization {
        ownership: Default::default(),
        provider_config_key: "github".to_owned(),
        connection_id: "user-1".to_owned(),
        provider: "github".to_owned(),
        flow: Flow::Oauth2,
        credentials_type: CredentialsType::Oauth2,
        data_key_id: data_key,
        credentials: sealed(data_key, b"authorized"),
        has_refresh_token: true,
        expires_at: Some(now + Duration::hours(1)),
        scopes: vec!["repo".to_owned()],
        connection_config: Map::new(),
        fingerprints: fingerprints("a-auth", "r-auth"),
    }
}

pub(crate) fn authorize(data_key: Uuid, now: DateTime<Utc>) -> ConnectionCommand {
    ConnectionCommand::Authorize {
        authorization: authorization(data_key, now),
        now,
    }
}

pub(crate) fn authorized(generation: u32, data_key: Uuid, now: DateTime<Utc>) -> ConnectionEvent {
    ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
        authorization: authorization(data_key, now),
        generation,
        authorized_at: now,
    })
}

pub(crate) fn lease(id: Uuid, trigger: RefreshTrigger, now: DateTime<Utc>) -> ConnectionCommand {
    ConnectionCommand::LeaseRefresh {
        lease_id: id,
        holder: "instance-a".to_owned(),
        trigger,
        now,
        lease_duration: Duration::seconds(30),
    }
}

pub(crate) fn leased(id: Uuid, trigger: RefreshTrigger, now: DateTime<Utc>) -> ConnectionEvent {
    ConnectionEvent::RefreshLeased(RefreshLeased {
        lease_id: id,
        holder: "instance-a".to_owned(),
        trigger,
        leased_at: now,
        lease_expires_at: now + Duration::seconds(30),
    })
}

pub(crate) fn complete(id: Uuid, rotated: bool, now: DateTime<Utc>) -> ConnectionCommand {
    ConnectionCommand::CompleteRefresh {
        lease_id: id,
        credentials: sealed(key(1), b"refreshed"),
        expires_at: Some(now + Duration::hours(1)),
        has_refresh_token: true,
        refresh_token_rotated: rotated,
        fingerprints: fingerprints("a-new", "r-new"),
        now,
    }
}

pub(crate) fn refreshed(
    id: Uuid,
    rotated: bool,
    refresh_token_generation: u32,
    now: DateTime<Utc>,
) -> ConnectionEvent {
    ConnectionEvent::TokensRefreshed(TokensRefreshed {
        lease_id: id,
        credentials: sealed(key(1), b"refreshed"),
        expires_at: Some(now + Duration::hours(1)),
        has_refresh_token: true,
        refresh_token_rotated: rotated,
        refresh_token_generation,
        fingerprints: fingerprints("a-new", "r-new"),
        refreshed_at: now,
    })
}

pub(crate) fn failure(class: FailureClass) -> RefreshFailure {
    match class {
        FailureClass::Permanent => RefreshFailure {
            class,
            code: Some("invalid_grant".to_owned()),
            provider_status: Some(400),
            description: Some("refresh token revoked".to_owned()),
        },
        FailureClass::Transient => RefreshFailure {
            class,
            code: None,
            provider_status: Some(503),
            description: Some("service unavailable".to_owned()),
        },
    }
}

pub(crate) fn fail(id: Uuid, class: FailureClass, now: DateTime<Utc>) -> ConnectionCommand {
    ConnectionCommand::FailRefresh {
        lease_id: id,
        failure: failure(class),
        now,
    }
}

pub(crate) fn failed(id: Uuid, class: FailureClass, now: DateTime<Utc>) -> ConnectionEvent {
    ConnectionEvent::RefreshFailed(RefreshFailed {
        lease_id: id,
        failure: failure(class),
        failed_at: now,
    })
}

pub(crate) fn set_metadata(
    metadata: Value,
    mode: MetadataMode,
    now: DateTime<Utc>,
) -> ConnectionCommand {
    ConnectionCommand::SetMetadata {
        metadata,
        mode,
        now,
    }
}

pub(crate) fn metadata_set(
    metadata: Value,
    mode: MetadataMode,
    now: DateTime<Utc>,
) -> ConnectionEvent {
    ConnectionEvent::MetadataSet(MetadataSet {
        metadata,
        mode,
        set_at: now,
    })
}

pub(crate) fn delete(keys: Vec<Uuid>, now: DateTime<Utc>) -> ConnectionCommand {
    ConnectionCommand::Delete {
        now,
        shredded_data_keys: keys,
    }
}

pub(crate) fn deleted(keys: Vec<Uuid>, now: DateTime<Utc>) -> ConnectionEvent {
    ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
        deleted_at: now,
        shredded_data_keys: keys,
    })
}

pub(crate) fn active(state: &Connection) -> &ActiveConnection {
    state.active().unwrap()
}
