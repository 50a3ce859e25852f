//! What may be asked of a connection and what it answers: the commands, the rejections and
//! [`decide`], which keeps the invariants listed in the module docs of [`crate::connection`].

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::events::{
    Authorization, ConnectionAuthorized, ConnectionDeleted, ConnectionEvent, MetadataMode,
    MetadataSet, OwnershipSet, RefreshFailed, RefreshFailure, RefreshLeased, RefreshTrigger,
    TokenFingerprints, TokensRefreshed,
};
use super::state::{ActiveConnection, Connection};
use crate::bounds::{JsonBounds, OutOfBounds, TimeOutOfRange, in_range};
use crate::connect_session::Ownership;
use crate::keys::Sealed;

/// What may be asked of a connection. Time and provider answers are data here.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectionCommand {
    /// Record (new or renewed) credentials: always allowed, the generation moves on.
    Authorize {
        /// The connection and its credentials, sealed under a fresh data key.
        authorization: Authorization,
        now: DateTime<Utc>,
    },
    /// Take the refresh lease for `lease_duration`.
    LeaseRefresh {
        lease_id: Uuid,
        /// The instance id of the caller.
        holder: String,
        trigger: RefreshTrigger,
        now: DateTime<Utc>,
        /// Must be positive, and longer than the provider call's timeout.
        lease_duration: Duration,
    },
    /// Record the provider's new tokens under the lease.
    CompleteRefresh {
        lease_id: Uuid,
        credentials: Sealed,
        expires_at: Option<DateTime<Utc>>,
        has_refresh_token: bool,
        /// Whether the provider returned a new refresh token.
        refresh_token_rotated: bool,
        fingerprints: TokenFingerprints,
        now: DateTime<Utc>,
    },
    /// Record a failed refresh under the lease.
    FailRefresh {
        lease_id: Uuid,
        failure: RefreshFailure,
        now: DateTime<Utc>,
    },
    /// Replace or merge the metadata (must be a JSON object).
    /// Replace the tags and end user.
    SetOwnership {
        ownership: Ownership,
        now: DateTime<Utc>,
    },
    SetMetadata {
        metadata: Value,
        mode: MetadataMode,
        now: DateTime<Utc>,
    },
    /// Delete the connection; the caller has shredded `shredded_data_keys`.
    Delete {
        now: DateTime<Utc>,
        shredded_data_keys: Vec<Uuid>,
    },
}

/// Why a connection command was refused. A domain answer, not a failure of the store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRejected {
    /// The connection was never authorized.
    #[error("the connection does not exist")]
    NotFound,
    /// The connection was deleted.
    #[error("the connection was deleted")]
    Deleted,
    /// The authorization may only create a connection, and this one exists.
    #[error("the connection exists already")]
    AlreadyExists,
    /// There is no refresh token to refresh with.
    #[error("the connection has no refresh token")]
    NoRefreshToken,
    /// Another refresher holds an unexpired lease.
    #[error("a refresh is already in progress: {holder} holds the lease until {until}")]
    LeaseHeld {
        holder: String,
        until: DateTime<Utc>,
    },
    /// The last refresh failed permanently and the trigger is not `force`.
    #[error(
        "refreshing is blocked by a permanent failure ({}); re-authorize the connection or force \
         a refresh",
        .code.as_deref().unwrap_or("no error code")
    )]
    RefreshBlocked { code: Option<String> },
    /// The lease is not the open one: never taken, or superseded by a later lease, a
    /// re-authorization or a deletion.
    #[error("refresh lease {lease_id} is not held (superseded, or never taken)")]
    LeaseNotHeld { lease_id: Uuid },
    /// Metadata must be a JSON object.
    #[error("metadata must be a JSON object")]
    MetadataNotObject,
    /// The lease duration is not positive or overflows the calendar.
    #[error("a refresh lease needs a positive duration")]
    InvalidLeaseDuration,
    /// A client-chosen JSON value passes [`JsonBounds::CLIENT`].
    #[error("{field} is out of bounds: {reason}")]
    OutOfBounds {
        field: &'static str,
        reason: OutOfBounds,
    },
    /// A time passes [`crate::bounds::TimeRange`].
    #[error("{field}: {reason}")]
    TimeOutOfRange {
        field: &'static str,
        reason: TimeOutOfRange,
    },
}

/// Checks a client-chosen JSON object named `field` against [`JsonBounds::CLIENT`].
pub(crate) fn bounded(
    field: &'static str,
    members: &Map<String, Value>,
) -> Result<(), ConnectionRejected> {
    JsonBounds::CLIENT
        .check_object(members)
        .map_err(|reason| ConnectionRejected::OutOfBounds { field, reason })
}

/// Checks that setting `metadata` over `current` in `mode` leaves metadata within
/// [`JsonBounds::CLIENT`] (a merge is checked as merged).
pub fn check_metadata(
    current: &Map<String, Value>,
    metadata: &Map<String, Value>,
    mode: MetadataMode,
) -> Result<(), ConnectionRejected> {
    bounded("metadata", metadata)?;
    if mode == MetadataMode::Merge && !current.is_empty() {
        let mut merged = current.clone();
        merged.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        bounded("metadata", &merged)?;
    }
    Ok(())
}

/// Checks the expiry a command records against [`crate::bounds::TimeRange`].
fn expiry_in_range(expires_at: Option<DateTime<Utc>>) -> Result<(), ConnectionRejected> {
    in_range(expires_at).map_err(|reason| ConnectionRejected::TimeOutOfRange {
        field: "expires_at",
        reason,
    })
}

/// The events `command` produces in `state`, or why it is refused.
pub fn decide(
    state: &Connection,
    command: ConnectionCommand,
) -> Result<Vec<ConnectionEvent>, ConnectionRejected> {
    let event = match command {
        ConnectionCommand::Authorize {
            mut authorization,
            now,
        } => {
            bounded("connection_config", &authorization.connection_config)?;
            expiry_in_range(authorization.expires_at)?;
            // A connect session that names no end user (a reconnect session) leaves the
            // connection with the end user it has now, and, naming no tags either, its tags:
            // resolved here, against the state this is appended after, so that a change made
            // since the session was created is not undone.
            if let Connection::Active(active) = state
                && authorization.ownership.connect_session_id.is_some()
                && authorization.ownership.end_user.is_none()
            {
                let ownership = &mut authorization.ownership;
                ownership.end_user = active.ownership.end_user.clone();
                if ownership.tags.is_empty() {
                    ownership.tags = active.ownership.tags.clone();
                }
            }
            ConnectionEvent::ConnectionAuthorized(ConnectionAuthorized {
                authorization,
                generation: state.generation().saturating_add(1),
                authorized_at: now,
            })
        }
        ConnectionCommand::LeaseRefresh {
            lease_id,
            holder,
            trigger,
            now,
            lease_duration,
        } => {
            let active = existing(state)?;
            if !active.renewable() {
                return Err(ConnectionRejected::NoRefreshToken);
            }
            if let Some(lease) = &active.lease
                && !lease.is_expired_at(now)
            {
                return Err(ConnectionRejected::LeaseHeld {
                    holder: lease.holder.clone(),
                    until: lease.expires_at,
                });
            }
            if trigger != RefreshTrigger::Force
                && let Some(blocking) = &active.blocking_failure
            {
                return Err(ConnectionRejected::RefreshBlocked {
                    code: blocking.failure.code.clone(),
                });
            }
            if lease_duration <= Duration::zero() {
                return Err(ConnectionRejected::InvalidLeaseDuration);
            }
            let lease_expires_at = now
                .checked_add_signed(lease_duration)
                .ok_or(ConnectionRejected::InvalidLeaseDuration)?;
            ConnectionEvent::RefreshLeased(RefreshLeased {
                lease_id,
                holder,
                trigger,
                leased_at: now,
                lease_expires_at,
            })
        }
        ConnectionCommand::CompleteRefresh {
            lease_id,
            credentials,
            expires_at,
            has_refresh_token,
            refresh_token_rotated,
            fingerprints,
            now,
        } => {
            let active = holding(state, lease_id)?;
            expiry_in_range(expires_at)?;
            let refresh_token_generation = if refresh_token_rotated {
                active.refresh_token_generation.saturating_add(1)
            } else {
                active.refresh_token_generation
            };
            ConnectionEvent::TokensRefreshed(TokensRefreshed {
                lease_id,
                credentials,
                expires_at,
                has_refresh_token,
                refresh_token_rotated,
                refresh_token_generation,
                fingerprints,
                refreshed_at: now,
            })
        }
        ConnectionCommand::FailRefresh {
            lease_id,
            failure,
            now,
        } => {
            holding(state, lease_id)?;
            ConnectionEvent::RefreshFailed(RefreshFailed {
                lease_id,
                failure,
                failed_at: now,
            })
        }
        ConnectionCommand::SetMetadata {
            metadata,
            mode,
            now,
        } => {
            let active = existing(state)?;
            let Value::Object(members) = &metadata else {
                return Err(ConnectionRejected::MetadataNotObject);
            };
            check_metadata(&active.metadata, members, mode)?;
            ConnectionEvent::MetadataSet(MetadataSet {
                metadata,
                mode,
                set_at: now,
            })
        }
        ConnectionCommand::SetOwnership { ownership, now } => {
            existing(state)?;
            ConnectionEvent::OwnershipSet(Box::new(OwnershipSet {
                ownership,
                set_at: now,
            }))
        }
        ConnectionCommand::Delete {
            now,
            shredded_data_keys,
        } => {
            existing(state)?;
            ConnectionEvent::ConnectionDeleted(ConnectionDeleted {
                deleted_at: now,
                shredded_data_keys,
            })
        }
    };
    Ok(vec![event])
}

/// The active connection, or `NotFound` / `Deleted`.
fn existing(state: &Connection) -> Result<&ActiveConnection, ConnectionRejected> {
    match state {
        Connection::NeverAuthorized => Err(ConnectionRejected::NotFound),
        Connection::Deleted(_) => Err(ConnectionRejected::Deleted),
        Connection::Active(active) => Ok(active),
    }
}

/// The active connection if `lease_id` is its open lease.
fn holding(state: &Connection, lease_id: Uuid) -> Result<&ActiveConnection, ConnectionRejected> {
    match state {
        Connection::NeverAuthorized => Err(ConnectionRejected::NotFound),
        Connection::Active(active)
            if active
                .lease
                .as_ref()
                .is_some_and(|lease| lease.lease_id == lease_id) =>
        {
            Ok(active)
        }
        Connection::Active(_) | Connection::Deleted(_) => {
            Err(ConnectionRejected::LeaseNotHeld { lease_id })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connection::fixtures::*;
    use crate::connection::{DeletedConnection, FailureClass, apply};
    use crate::scenario::{Decider, Given, at};

    use FailureClass::{Permanent, Transient};
    use RefreshTrigger::{Force, Read, Schedule};

    impl Decider for Connection {
        type Event = ConnectionEvent;
        type Command = ConnectionCommand;
        type Rejection = ConnectionRejected;

        fn apply(state: &mut Self, event: &ConnectionEvent) {
            apply(state, event);
        }

        fn decide(
            state: &Self,
            command: ConnectionCommand,
        ) -> Result<Vec<ConnectionEvent>, ConnectionRejected> {
            decide(state, command)
        }
    }

    fn given(events: &[ConnectionEvent]) -> Given<Connection> {
        crate::scenario::given(events)
    }

    /// Authorized at 0, then lease 1 taken at 50 for a read.
    fn lease_one_taken() -> Vec<ConnectionEvent> {
        vec![
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(50)),
        ]
    }

    fn lease_not_held(n: u128) -> ConnectionRejected {
        ConnectionRejected::LeaseNotHeld {
            lease_id: lease_id(n),
        }
    }

    // --- authorization ------------------------------------------------------------------------

    #[test]
    fn a_first_authorization_is_generation_one() {
        let state = given(&[])
            .when(authorize(key(1), at(0)))
            .then(&[authorized(1, key(1), at(0))]);
        let active = active(&state);
        assert_eq!(active.generation, 1);
        assert_eq!(active.refresh_token_generation, 1);
        assert_eq!(active.credentials, sealed(key(1), b"authorized"));
        assert_eq!(active.authorized_at, at(0));
    }

    #[test]
    fn a_reauthorization_starts_a_new_generation_and_clears_lease_and_failure() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            leased(lease_id(1), Read, at(60)),
            refreshed(lease_id(1), true, 2, at(60)),
            leased(lease_id(2), Read, at(120)),
            failed(lease_id(2), Permanent, at(120)),
            leased(lease_id(3), Force, at(130)),
        ])
        .when(authorize(key(2), at(140)))
        .then(&[authorized(2, key(2), at(140))]);
        let active = active(&state);
        assert_eq!(active.generation, 2);
        assert_eq!(active.credentials.key_id, key(2));
        assert_eq!(active.data_key_ids, vec![key(2)]);
        assert_eq!(active.refresh_token_generation, 1);
        assert_eq!(active.lease, None);
        assert_eq!(active.last_failure, None);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(active.last_refreshed_at, None);
    }

    #[test]
    fn a_reauthorization_keeps_the_metadata() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(json!({"team": "a"}), MetadataMode::Replace, at(1)),
        ])
        .when(authorize(key(2), at(2)))
        .then(&[authorized(2, key(2), at(2))]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"team": "a"})
        );
    }

    #[test]
    fn an_authorization_after_a_deletion_continues_the_generation_count() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            authorized(2, key(2), at(10)),
            metadata_set(json!({"team": "a"}), MetadataMode::Replace, at(11)),
            deleted(vec![key(1), key(2)], at(20)),
        ])
        .when(authorize(key(3), at(30)))
        .then(&[authorized(3, key(3), at(30))]);
        let active = active(&state);
        assert_eq!(active.generation, 3);
        assert_eq!(active.credentials.key_id, key(3));
        assert!(
            active.metadata.is_empty(),
            "a deletion forgets the metadata"
        );
    }

    // --- leases -------------------------------------------------------------------------------

    #[test]
    fn a_lease_is_granted_on_an_active_connection_with_a_refresh_token() {
        let state = given(&[authorized(1, key(1), at(0))])
            .when(lease(lease_id(1), Schedule, at(50)))
            .then(&[leased(lease_id(1), Schedule, at(50))]);
        let lease = active(&state).lease.clone().unwrap();
        assert_eq!(lease.lease_id, lease_id(1));
        assert_eq!(lease.expires_at, at(50) + Duration::seconds(30));
    }

    #[test]
    fn a_second_lease_is_refused_while_the_first_is_unexpired() {
        given(&lease_one_taken())
            .when(lease(lease_id(2), Force, at(50) + Duration::seconds(29)))
            .then_rejected(ConnectionRejected::LeaseHeld {
                holder: "instance-a".to_owned(),
                until: at(50) + Duration::seconds(30),
            });
    }

    #[test]
    fn a_lease_after_the_first_expired_supersedes_the_orphaned_lease() {
        let now = at(50) + Duration::seconds(30);
        let state = given(&lease_one_taken())
            .when(lease(lease_id(2), Read, now))
            .then(&[leased(lease_id(2), Read, now)]);
        assert_eq!(active(&state).lease.as_ref().unwrap().lease_id, lease_id(2));
    }

    #[test]
    fn a_lease_is_refused_without_a_refresh_token() {
        let mut authorized = authorized(1, key(1), at(0));
        if let ConnectionEvent::ConnectionAuthorized(event) = &mut authorized {
            event.authorization.has_refresh_token = false;
        }
        given(&[authorized])
            .when(lease(lease_id(1), Force, at(1)))
            .then_rejected(ConnectionRejected::NoRefreshToken);
    }

    #[test]
    fn a_lease_is_refused_on_a_connection_that_was_never_authorized() {
        given(&[])
            .when(lease(lease_id(1), Read, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn a_lease_is_refused_after_deletion() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(lease(lease_id(1), Force, at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    #[test]
    fn a_lease_needs_a_positive_duration() {
        for lease_duration in [Duration::zero(), Duration::seconds(-1), Duration::MAX] {
            given(&[authorized(1, key(1), at(0))])
                .when(ConnectionCommand::LeaseRefresh {
                    lease_id: lease_id(1),
                    holder: "instance-a".to_owned(),
                    trigger: Read,
                    now: at(1),
                    lease_duration,
                })
                .then_rejected(ConnectionRejected::InvalidLeaseDuration);
        }
    }

    // --- refresh outcomes ---------------------------------------------------------------------

    #[test]
    fn completing_with_the_held_lease_records_the_new_tokens() {
        let state = given(&lease_one_taken())
            .when(complete(lease_id(1), false, at(51)))
            .then(&[refreshed(lease_id(1), false, 1, at(51))]);
        let active = active(&state);
        assert_eq!(active.credentials, sealed(key(1), b"refreshed"));
        assert_eq!(active.fingerprints, fingerprints("a-new", "r-new"));
        assert_eq!(active.expires_at, Some(at(111)));
        assert_eq!(active.last_refreshed_at, Some(at(51)));
        assert_eq!(active.lease, None);
    }

    #[test]
    fn completing_an_expired_lease_nobody_superseded_is_accepted() {
        given(&lease_one_taken())
            .when(complete(lease_id(1), false, at(55)))
            .then(&[refreshed(lease_id(1), false, 1, at(55))]);
    }

    #[test]
    fn completing_without_a_lease_is_rejected() {
        given(&[authorized(1, key(1), at(0))])
            .when(complete(lease_id(1), false, at(51)))
            .then_rejected(lease_not_held(1));
    }

    /// One test per case: lease 1 taken, then the event; the outcome on lease 1 is rejected,
    /// the lease no longer held.
    macro_rules! lease_one_no_longer_held {
        ($($name:ident: $since:expr => $outcome:expr;)*) => {$(
            #[test]
            fn $name() {
                given(&lease_one_taken())
                    .and(&[$since])
                    .when($outcome)
                    .then_rejected(lease_not_held(1));
            }
        )*};
    }

    lease_one_no_longer_held! {
        completing_a_lease_that_already_has_an_outcome_is_rejected:
            refreshed(lease_id(1), false, 1, at(51)) => complete(lease_id(1), false, at(52));
        completing_a_superseded_lease_is_rejected:
            leased(lease_id(2), Read, at(51)) => complete(lease_id(1), false, at(52));
        completing_after_a_reauthorization_is_rejected:
            authorized(2, key(2), at(50)) => complete(lease_id(1), false, at(50));
        completing_after_a_deletion_is_rejected:
            deleted(vec![key(1)], at(50)) => complete(lease_id(1), false, at(50));
        failing_a_superseded_lease_is_rejected:
            leased(lease_id(2), Read, at(51)) => fail(lease_id(1), Permanent, at(52));
    }

    #[test]
    fn an_outcome_on_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(fail(lease_id(1), Transient, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    /// Lease 2 completes, `rotated` or not, after lease 1 rotated the refresh token to
    /// generation 2: the event and the state after it carry `generation`.
    fn completing_after_a_rotation(rotated: bool, generation: u32) {
        let state = given(&lease_one_taken())
            .and(&[
                refreshed(lease_id(1), true, 2, at(50)),
                leased(lease_id(2), Schedule, at(100)),
            ])
            .when(complete(lease_id(2), rotated, at(100)))
            .then(&[refreshed(lease_id(2), rotated, generation, at(100))]);
        assert_eq!(active(&state).refresh_token_generation, generation);
    }

    #[test]
    fn a_rotated_refresh_token_increments_the_refresh_token_generation() {
        completing_after_a_rotation(true, 3);
    }

    #[test]
    fn a_kept_refresh_token_keeps_the_refresh_token_generation() {
        completing_after_a_rotation(false, 2);
    }

    // --- failures -----------------------------------------------------------------------------

    /// Authorized, then lease 1 taken at 50 and failed permanently.
    fn permanently_failed() -> Vec<ConnectionEvent> {
        let mut events = lease_one_taken();
        events.push(failed(lease_id(1), Permanent, at(50)));
        events
    }

    fn blocked_by_invalid_grant() -> ConnectionRejected {
        ConnectionRejected::RefreshBlocked {
            code: Some("invalid_grant".to_owned()),
        }
    }

    #[test]
    fn a_failure_is_recorded_against_the_held_lease_and_keeps_the_credentials() {
        let state = given(&lease_one_taken())
            .when(fail(lease_id(1), Permanent, at(51)))
            .then(&[failed(lease_id(1), Permanent, at(51))]);
        let active = active(&state);
        assert_eq!(active.credentials, sealed(key(1), b"authorized"));
        assert_eq!(active.fingerprints, fingerprints("a-auth", "r-auth"));
        assert_eq!(active.expires_at, Some(at(60)));
        assert!(active.has_refresh_token);
        assert_eq!(active.lease, None);
        let recorded = active.blocking_failure.clone().unwrap();
        assert_eq!(recorded.failure, failure(Permanent));
        assert_eq!(recorded.failed_at, at(51));
        assert_eq!(active.last_failure, Some(recorded));
    }

    #[test]
    fn a_permanent_failure_blocks_read_and_schedule_leases_but_not_force() {
        for trigger in [Read, Schedule] {
            given(&permanently_failed())
                .when(lease(lease_id(2), trigger, at(60)))
                .then_rejected(blocked_by_invalid_grant());
        }
        given(&permanently_failed())
            .when(lease(lease_id(2), Force, at(60)))
            .then(&[leased(lease_id(2), Force, at(60))]);
    }

    #[test]
    fn a_transient_failure_does_not_block_and_is_counted() {
        let state = given(&lease_one_taken())
            .and(&[
                failed(lease_id(1), Transient, at(50)),
                leased(lease_id(2), Schedule, at(51)),
            ])
            .when(fail(lease_id(2), Transient, at(51)))
            .then(&[failed(lease_id(2), Transient, at(51))]);
        let active = active(&state);
        assert_eq!(active.consecutive_transient_failures, 2);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(
            active.last_failure.as_ref().map(|f| f.failure.clone()),
            Some(failure(Transient))
        );
        given(&lease_one_taken())
            .and(&[failed(lease_id(1), Transient, at(50))])
            .when(lease(lease_id(2), Read, at(52)))
            .then(&[leased(lease_id(2), Read, at(52))]);
    }

    #[test]
    fn a_transient_failure_of_a_forced_refresh_keeps_the_permanent_block() {
        given(&permanently_failed())
            .and(&[
                leased(lease_id(2), Force, at(60)),
                failed(lease_id(2), Transient, at(60)),
            ])
            .when(lease(lease_id(3), Schedule, at(70)))
            .then_rejected(blocked_by_invalid_grant());
    }

    #[test]
    fn a_successful_forced_refresh_lifts_the_block() {
        let mut events = permanently_failed();
        events.push(leased(lease_id(2), Force, at(60)));
        let state = given(&events)
            .when(complete(lease_id(2), true, at(60)))
            .then(&[refreshed(lease_id(2), true, 2, at(60))]);
        let active = active(&state);
        assert_eq!(active.blocking_failure, None);
        assert_eq!(active.last_failure, None);
        assert_eq!(active.consecutive_transient_failures, 0);
        events.push(refreshed(lease_id(2), true, 2, at(60)));
        given(&events)
            .when(lease(lease_id(3), Read, at(70)))
            .then(&[leased(lease_id(3), Read, at(70))]);
    }

    #[test]
    fn a_reauthorization_recovers_from_a_permanent_failure() {
        given(&permanently_failed())
            .and(&[authorized(2, key(2), at(60))])
            .when(lease(lease_id(2), Read, at(61)))
            .then(&[leased(lease_id(2), Read, at(61))]);
    }

    // --- metadata -----------------------------------------------------------------------------

    #[test]
    fn metadata_replace_sets_the_whole_object() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(json!({"a": 1, "b": 2}), MetadataMode::Replace, at(1)),
        ])
        .when(set_metadata(json!({"c": 3}), MetadataMode::Replace, at(2)))
        .then(&[metadata_set(json!({"c": 3}), MetadataMode::Replace, at(2))]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"c": 3})
        );
    }

    #[test]
    fn metadata_merge_overwrites_and_adds_top_level_keys_only() {
        let state = given(&[
            authorized(1, key(1), at(0)),
            metadata_set(
                json!({"a": 1, "nested": {"x": 1, "y": 2}}),
                MetadataMode::Replace,
                at(1),
            ),
        ])
        .when(set_metadata(
            json!({"nested": {"x": 9}, "b": 2}),
            MetadataMode::Merge,
            at(2),
        ))
        .then(&[metadata_set(
            json!({"nested": {"x": 9}, "b": 2}),
            MetadataMode::Merge,
            at(2),
        )]);
        assert_eq!(
            Value::Object(active(&state).metadata.clone()),
            json!({"a": 1, "b": 2, "nested": {"x": 9}})
        );
    }

    #[test]
    fn metadata_that_is_not_an_object_is_rejected() {
        for metadata in [json!([1, 2]), json!("text"), json!(null), json!(3)] {
            given(&[authorized(1, key(1), at(0))])
                .when(set_metadata(metadata, MetadataMode::Merge, at(1)))
                .then_rejected(ConnectionRejected::MetadataNotObject);
        }
    }

    #[test]
    fn metadata_of_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(set_metadata(json!({}), MetadataMode::Replace, at(1)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn metadata_after_deletion_is_rejected() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(set_metadata(json!({"a": 1}), MetadataMode::Replace, at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    #[test]
    fn re_authorizations_do_not_grow_the_state() {
        // Every snapshot and cached copy holds the state: it must not keep a record per
        // generation (a soak that re-authorized 500 connections all day grew the server).
        let state_after = |authorizations: u32| {
            let mut state = Connection::default();
            for generation in 1..=authorizations {
                apply(
                    &mut state,
                    &authorized(generation, key(u128::from(generation)), at(0)),
                );
            }
            serde_json::to_vec(&state).unwrap().len()
        };
        assert_eq!(state_after(10), state_after(99));
    }

    // --- deletion -----------------------------------------------------------------------------

    #[test]
    fn a_deletion_keeps_the_generation_and_names_the_shredded_keys() {
        let state = given(&[authorized(1, key(1), at(0)), authorized(2, key(2), at(1))])
            .when(delete(vec![key(1), key(2)], at(2)))
            .then(&[deleted(vec![key(1), key(2)], at(2))]);
        assert_eq!(
            state,
            Connection::Deleted(DeletedConnection {
                generation: 2,
                data_key_ids: vec![key(1), key(2)],
                deleted_at: at(2),
                provider_config_key: "github".to_owned(),
                connection_id: "user-1".to_owned(),
                provider: "github".to_owned(),
                created_at: Some(at(0)),
            })
        );
    }

    #[test]
    fn deleting_twice_is_rejected() {
        given(&[authorized(1, key(1), at(0)), deleted(vec![key(1)], at(1))])
            .when(delete(vec![key(1)], at(2)))
            .then_rejected(ConnectionRejected::Deleted);
    }

    #[test]
    fn deleting_a_connection_that_was_never_authorized_is_not_found() {
        given(&[])
            .when(delete(Vec::new(), at(2)))
            .then_rejected(ConnectionRejected::NotFound);
    }

    #[test]
    fn rejections_explain_themselves() {
        assert_eq!(
            ConnectionRejected::RefreshBlocked {
                code: Some("invalid_grant".to_owned())
            }
            .to_string(),
            "refreshing is blocked by a permanent failure (invalid_grant); re-authorize the \
             connection or force a refresh"
        );
        assert_eq!(
            ConnectionRejected::LeaseHeld {
                holder: "instance-a".to_owned(),
                until: at(0)
            }
            .to_string(),
            "a refresh is already in progress: instance-a holds the lease until 2024-05-01 \
             12:00:00 UTC"
        );
    }
}
