//! Given/when/then for the pure aggregates' tests, one harness for all of them: given the events
//! already in a stream, when a command is decided, then these events (and the state they leave)
//! or this rejection. Also the checks every event type's tests share: its JSON pinned, and how
//! decoding fails.
//!
//! An aggregate joins by implementing [`Decider`] beside its tests; each test module names its
//! aggregate once, in a `given` of its own that calls [`given`].
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::event::{DecodeError, DomainEvent};

/// A pure aggregate as its tests drive it: a state folded from events, and a decision.
pub(crate) trait Decider: Default + Clone + Debug + PartialEq {
    /// What happens to it.
    type Event: Clone + Debug + PartialEq;
    /// What may be asked of it.
    type Command;
    /// Why a command is refused.
    type Rejection: Debug + PartialEq;

    /// The aggregate's `apply`.
    fn apply(state: &mut Self, event: &Self::Event);

    /// The aggregate's `decide`.
    fn decide(state: &Self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Rejection>;
}

/// The state `events` leave, ready for a command.
pub(crate) fn given<A: Decider>(events: &[A::Event]) -> Given<A> {
    Given(A::default()).and(events)
}

/// A state built from past events.
pub(crate) struct Given<A>(A);

impl<A: Decider> Given<A> {
    /// More past events, after those given so far.
    pub(crate) fn and(mut self, events: &[A::Event]) -> Self {
        for event in events {
            A::apply(&mut self.0, event);
        }
        self
    }

    /// Decides `command` on the state.
    pub(crate) fn when(self, command: A::Command) -> Then<A> {
        let result = A::decide(&self.0, command);
        Then {
            state: self.0,
            result,
        }
    }
}

/// What a command decided, to be checked.
pub(crate) struct Then<A: Decider> {
    state: A,
    result: Result<Vec<A::Event>, A::Rejection>,
}

impl<A: Decider> Then<A> {
    /// Asserts the decided events and returns the state after them.
    #[track_caller]
    pub(crate) fn then(self, expected: &[A::Event]) -> A {
        assert_eq!(self.result, Ok(expected.to_vec()));
        let mut state = self.state;
        for event in expected {
            A::apply(&mut state, event);
        }
        state
    }

    /// Asserts that the command was refused, and why.
    #[track_caller]
    pub(crate) fn then_rejected(self, expected: A::Rejection) {
        assert_eq!(self.result, Err(expected));
    }
}

/// 2024-05-01T12:00:00Z plus `minutes`: the clock of every scenario.
pub(crate) fn at(minutes: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_564_800 + minutes * 60, 0).unwrap()
}

/// Checks the type name, version 1 and JSON of `event`, and that it decodes back to itself.
#[track_caller]
pub(crate) fn assert_pinned<E>(event: &E, event_type: &str, expected: &Value)
where
    E: DomainEvent + Debug + PartialEq,
{
    assert_eq!(event.event_type(), event_type);
    assert_eq!(event.event_version(), 1);
    assert_eq!(&event.to_payload(), expected);
    assert_eq!(
        E::decode(event_type, 1, &expected.to_string()).as_ref(),
        Ok(event)
    );
}

/// Checks that `event_type` at `event_version` is unknown to `E`, whatever the payload.
#[track_caller]
pub(crate) fn assert_unknown<E>(event_type: &str, event_version: i16, payload: &Value)
where
    E: DomainEvent + Debug + PartialEq,
{
    assert_eq!(
        E::decode(event_type, event_version, &payload.to_string()),
        Err(DecodeError::Unknown {
            event_type: event_type.to_owned(),
            event_version,
        })
    );
}

/// Checks that `event`'s payload without `field`, read as `event_type` version 1, is malformed,
/// and that the error names the type and the field.
#[track_caller]
pub(crate) fn assert_malformed_without<E>(event: &E, event_type: &str, field: &str)
where
    E: DomainEvent + Debug,
{
    let mut payload = event.to_payload();
    payload.as_object_mut().unwrap().remove(field);
    let error = E::decode(event_type, 1, &payload.to_string()).unwrap_err();
    let DecodeError::Malformed {
        event_type: named,
        reason,
    } = error
    else {
        panic!("expected Malformed, got {error:?}");
    };
    assert_eq!(named, event_type);
    assert!(reason.contains(field), "{reason}");
}
