//! Bounded history: which events of a connection's stream the compactor may remove.
//!
//! A routine refresh cycle (a lease and the successful refresh under it) past the routine
//! retention may go once a later event replaces everything it set: a later refresh, a
//! re-authorization or the deletion. Every field a cycle sets (credentials, fingerprints,
//! expiry, the absolute refresh-token generation, lease and failure state, times) is set again
//! by such an event, so folding the stream without the cycle ends in the same state: that later
//! event is the snapshot the removal stands behind. With a lifecycle retention, failures (and
//! their leases) and leases that lapsed without an outcome go under the same rule, and metadata
//! changes once a later replacement or deletion sets the metadata anew. Authorizations and
//! deletions, which carry the generations and the record of shredded keys, always stay.
//!
//! [`plan`] checks its own work: it folds the stream with and without the events it picked and
//! returns no plan unless both states are equal, so a rule that is wrong for some stream costs
//! that stream its compaction, never an inexact rebuild.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::commands::Aggregate;
use crate::connection::{self, Connection, ConnectionEvent, MetadataMode};
use crate::event::{DomainEvent, UnreadableEvent};
use crate::store::{RecordedEvent, StreamCompaction};

/// Which events are old enough to go: those recorded before these times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cutoffs {
    /// Routine refresh cycles recorded before this may go.
    pub routine: DateTime<Utc>,
    /// Superseded failures, lapsed leases and metadata changes recorded before this may go;
    /// `None`: they stay forever.
    pub lifecycle: Option<DateTime<Utc>>,
}

/// What may leave `events`, the whole stream of a connection in version order; `None` when
/// nothing may (or when the events left would not fold to the same state).
pub fn plan(
    events: &[RecordedEvent],
    cutoffs: Cutoffs,
) -> Result<Option<StreamCompaction>, UnreadableEvent> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    if first.stream_id.category() != connection::CATEGORY {
        return Ok(None);
    }
    let decoded = events
        .iter()
        .map(ConnectionEvent::from_recorded)
        .collect::<Result<Vec<_>, _>>()?;
    let picked = pick(events, &decoded, cutoffs);
    if picked.iter().all(|p| p.is_none()) {
        return Ok(None);
    }
    let whole = Connection::from_events(&decoded);
    let kept = Connection::from_events(
        decoded
            .iter()
            .zip(&picked)
            .filter(|(_, p)| p.is_none())
            .map(|(e, _)| e),
    );
    if whole != kept {
        tracing::warn!(
            stream_id = %first.stream_id,
            "compaction.plan: the events left would not fold to the same state; the stream is left whole"
        );
        return Ok(None);
    }
    let removed: Vec<(&RecordedEvent, Kind)> = events
        .iter()
        .zip(&picked)
        .filter_map(|(e, p)| p.map(|kind| (e, kind)))
        .collect();
    let routine_events = removed.iter().filter(|(_, k)| *k == Kind::Routine).count();
    Ok(Some(StreamCompaction {
        stream: first.stream_id.clone(),
        positions: removed.iter().map(|(e, _)| e.position.global).collect(),
        routine_cycles: u64::try_from(routine_events / 2).unwrap_or(u64::MAX),
        lifecycle_events: u64::try_from(removed.len() - routine_events).unwrap_or(u64::MAX),
        through_version: removed
            .iter()
            .map(|(e, _)| e.stream_version)
            .max()
            .unwrap_or(0),
        first_recorded_at: removed
            .iter()
            .map(|(e, _)| e.recorded_at)
            .min()
            .unwrap_or(first.recorded_at),
        last_recorded_at: removed
            .iter()
            .map(|(e, _)| e.recorded_at)
            .max()
            .unwrap_or(first.recorded_at),
    }))
}

/// Why an event may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Half of a routine refresh cycle.
    Routine,
    /// A superseded failure, lapsed lease or metadata change.
    Lifecycle,
}

/// For each event, whether (and as what) it may go.
fn pick(
    events: &[RecordedEvent],
    decoded: &[ConnectionEvent],
    cutoffs: Cutoffs,
) -> Vec<Option<Kind>> {
    // Whether an event after each index sets the token state anew, or the metadata.
    let mut tokens_reset_after = vec![false; decoded.len()];
    let mut metadata_reset_after = vec![false; decoded.len()];
    let (mut tokens, mut metadata) = (false, false);
    for (i, event) in decoded.iter().enumerate().rev() {
        tokens_reset_after[i] = tokens;
        metadata_reset_after[i] = metadata;
        match event {
            ConnectionEvent::TokensRefreshed(_) | ConnectionEvent::ConnectionAuthorized(_) => {
                tokens = true;
            }
            ConnectionEvent::ConnectionDeleted(_) => (tokens, metadata) = (true, true),
            ConnectionEvent::MetadataSet(set) if set.mode == MetadataMode::Replace => {
                metadata = true;
            }
            _ => {}
        }
    }
    // Each lease's event, and the outcome that names it.
    let mut leases = HashMap::new();
    let mut outcomes = HashMap::new();
    for (i, event) in decoded.iter().enumerate() {
        match event {
            ConnectionEvent::RefreshLeased(lease) => {
                leases.insert(lease.lease_id, i);
            }
            ConnectionEvent::TokensRefreshed(refreshed) => {
                outcomes.insert(refreshed.lease_id, i);
            }
            ConnectionEvent::RefreshFailed(failed) => {
                outcomes.insert(failed.lease_id, i);
            }
            _ => {}
        }
    }
    let old =
        |i: usize, before: DateTime<Utc>| events.get(i).is_some_and(|e| e.recorded_at < before);
    let mut picked = vec![None; decoded.len()];
    for (i, event) in decoded.iter().enumerate() {
        match event {
            ConnectionEvent::TokensRefreshed(refreshed) => {
                if let Some(&lease) = leases.get(&refreshed.lease_id)
                    && lease < i
                    && old(lease, cutoffs.routine)
                    && old(i, cutoffs.routine)
                    && tokens_reset_after[i]
                {
                    picked[lease] = Some(Kind::Routine);
                    picked[i] = Some(Kind::Routine);
                }
            }
            ConnectionEvent::RefreshFailed(failed) => {
                if let Some(before) = cutoffs.lifecycle
                    && old(i, before)
                    && tokens_reset_after[i]
                {
                    picked[i] = Some(Kind::Lifecycle);
                    if let Some(&lease) = leases.get(&failed.lease_id)
                        && lease < i
                        && old(lease, before)
                    {
                        picked[lease] = Some(Kind::Lifecycle);
                    }
                }
            }
            ConnectionEvent::RefreshLeased(lease) => {
                if let Some(before) = cutoffs.lifecycle
                    && !outcomes.contains_key(&lease.lease_id)
                    && old(i, before)
                    && tokens_reset_after[i]
                {
                    picked[i] = Some(Kind::Lifecycle);
                }
            }
            ConnectionEvent::MetadataSet(_) => {
                if let Some(before) = cutoffs.lifecycle
                    && old(i, before)
                    && metadata_reset_after[i]
                {
                    picked[i] = Some(Kind::Lifecycle);
                }
            }
            // Tags and end user are few and rare: kept, like authorizations and deletions.
            ConnectionEvent::ConnectionAuthorized(_)
            | ConnectionEvent::OwnershipSet(_)
            | ConnectionEvent::ConnectionDeleted(_) => {}
        }
    }
    picked
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::connection::FailureClass::Transient;
    use crate::connection::RefreshTrigger::Schedule;
    use crate::connection::fixtures::*;
    use crate::scenario::at;
    use crate::store::{Position, StreamId};

    /// `events` as stored in the stream of `github`/`user-1`, each recorded at its time.
    fn stream(events: &[(ConnectionEvent, DateTime<Utc>)]) -> Vec<RecordedEvent> {
        (1u32..)
            .zip(events)
            .map(|(version, (event, recorded_at))| {
                let new = event.to_new_event();
                RecordedEvent {
                    position: Position::from_columns(0, 100 + i64::from(version)),
                    stream_id: connection::stream_id("github", "user-1"),
                    stream_version: version,
                    event_id: new.event_id,
                    event_type: new.event_type,
                    event_version: new.event_version,
                    payload: crate::store::Payload::from_value(&new.payload),
                    metadata: new.metadata,
                    recorded_at: *recorded_at,
                }
            })
            .collect()
    }

    /// A routine cycle under lease `n` at minute `m`, the refresh token rotated to `generation`.
    fn cycle(n: u128, generation: u32, m: i64) -> [(ConnectionEvent, DateTime<Utc>); 2] {
        [
            (leased(lease_id(n), Schedule, at(m)), at(m)),
            (refreshed(lease_id(n), true, generation, at(m)), at(m)),
        ]
    }

    fn routine_only(minutes: i64) -> Cutoffs {
        Cutoffs {
            routine: at(minutes),
            lifecycle: None,
        }
    }

    /// The versions `plan` removes.
    fn removed(events: &[RecordedEvent], cutoffs: Cutoffs) -> Vec<u32> {
        let Some(plan) = plan(events, cutoffs).unwrap() else {
            return Vec::new();
        };
        events
            .iter()
            .filter(|e| plan.positions.contains(&e.position.global))
            .map(|e| e.stream_version)
            .collect()
    }

    #[test]
    fn old_cycles_go_once_a_later_refresh_replaces_them_and_the_last_one_stays() {
        let mut events = vec![(authorized(1, key(1), at(0)), at(0))];
        events.extend(cycle(1, 2, 10));
        events.extend(cycle(2, 3, 20));
        events.extend(cycle(3, 4, 30));
        let events = stream(&events);
        let plan = plan(&events, routine_only(100)).unwrap().unwrap();
        assert_eq!(plan.routine_cycles, 2);
        assert_eq!(plan.lifecycle_events, 0);
        assert_eq!(plan.through_version, 5);
        assert_eq!(
            (plan.first_recorded_at, plan.last_recorded_at),
            (at(10), at(20))
        );
        assert_eq!(removed(&events, routine_only(100)), [2, 3, 4, 5]);
        // Only what is past the cutoff.
        assert_eq!(removed(&events, routine_only(15)), [2, 3]);
        assert_eq!(removed(&events, routine_only(5)), Vec::<u32>::new());
    }

    #[test]
    fn failures_leases_and_metadata_stay_unless_a_lifecycle_retention_is_set() {
        let mut events = vec![(authorized(1, key(1), at(0)), at(0))];
        events.push((leased(lease_id(1), Schedule, at(5)), at(5)));
        events.push((failed(lease_id(1), Transient, at(6)), at(6)));
        // A lease that lapsed without an outcome.
        events.push((leased(lease_id(2), Schedule, at(7)), at(7)));
        events.push((
            metadata_set(json!({"a": 1}), MetadataMode::Merge, at(8)),
            at(8),
        ));
        events.extend(cycle(3, 2, 10));
        events.push((
            metadata_set(json!({"b": 2}), MetadataMode::Replace, at(11)),
            at(11),
        ));
        events.push((
            metadata_set(json!({"c": 3}), MetadataMode::Merge, at(12)),
            at(12),
        ));
        events.extend(cycle(4, 3, 20));
        let events = stream(&events);
        // Routine retention only: the first cycle goes, nothing else.
        assert_eq!(removed(&events, routine_only(100)), [6, 7]);
        let both = Cutoffs {
            routine: at(100),
            lifecycle: Some(at(100)),
        };
        // The failure with its lease, the lapsed lease, the merge a replacement overwrote; the
        // replacement and the merge after it shape today's metadata and stay.
        assert_eq!(removed(&events, both), [2, 3, 4, 5, 6, 7]);
        let plan = plan(&events, both).unwrap().unwrap();
        assert_eq!((plan.routine_cycles, plan.lifecycle_events), (1, 4));
    }

    #[test]
    fn authorizations_and_deletions_stay_and_a_deletion_replaces_what_came_before() {
        let mut events = vec![(authorized(1, key(1), at(0)), at(0))];
        events.extend(cycle(1, 2, 10));
        events.push((deleted(vec![key(1)], at(20)), at(20)));
        events.push((authorized(2, key(2), at(30)), at(30)));
        events.extend(cycle(2, 2, 40));
        let events = stream(&events);
        let all = Cutoffs {
            routine: at(1000),
            lifecycle: Some(at(1000)),
        };
        assert_eq!(removed(&events, all), [2, 3]);
    }

    #[test]
    fn the_stream_left_folds_to_the_same_state() {
        let mut events = vec![(authorized(1, key(1), at(0)), at(0))];
        for n in 1..=20 {
            events.extend(cycle(
                n,
                u32::try_from(n).unwrap() + 1,
                10 * i64::try_from(n).unwrap(),
            ));
            if n % 3 == 0 {
                events.push((failed(lease_id(100 + n), Transient, at(1)), at(1)));
            }
        }
        let events = stream(&events);
        let all = Cutoffs {
            routine: at(1000),
            lifecycle: Some(at(1000)),
        };
        let plan = plan(&events, all).unwrap().unwrap();
        let decode = |e: &RecordedEvent| ConnectionEvent::from_recorded(e).unwrap();
        let kept: Vec<_> = events
            .iter()
            .filter(|e| !plan.positions.contains(&e.position.global))
            .map(decode)
            .collect();
        let whole: Vec<_> = events.iter().map(decode).collect();
        assert_eq!(
            Connection::from_events(&kept),
            Connection::from_events(&whole)
        );
        assert_eq!(plan.routine_cycles, 19);
        assert_eq!(kept.len(), 3, "the authorization and the last cycle");
    }

    #[test]
    fn only_connection_streams_are_compacted() {
        let mut events = stream(&cycle(1, 2, 10));
        for e in &mut events {
            e.stream_id = StreamId::new("integration", "x");
        }
        assert_eq!(plan(&events, routine_only(100)).unwrap(), None);
        assert_eq!(plan(&[], routine_only(100)).unwrap(), None);
    }
}
