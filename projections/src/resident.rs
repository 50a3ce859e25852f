//! A rebuild's states held in memory between batches.
//!
//! A log of refresh cycles touches a connection once per cycle, and the cycles of different
//! connections interleave, so a rebuild batch of a few thousand events holds about one event
//! pair per stream. Folding each batch onto snapshots in the shadow table meant, per refresh
//! cycle, a row read back, parsed, serialized and written again. The replay instead holds
//! states in memory and folds events onto them there.
//!
//! A new stream's row is written (with `COPY`) once no event has touched it for a while, so
//! that the shadow fills while the log is read. "A while" is learnt from the log: four batches
//! at first, then one more than the longest gap seen between two batches touching the same
//! stream. A log of imports is written four batches behind the reader; in a log of refresh
//! cycles, a connection refreshed every so many batches stays in memory and is written once,
//! when it leaves memory or the log ends. (Writing every new stream with the batch that created
//! it wrote each connection of such a log twice, a `COPY` and an upsert: 20,000 imported
//! connections then refreshed 5 times each, 220,001 events, rebuilt on PostgreSQL in 2.7–3.7 s
//! against 2.2–2.9 s written once, the latter faster in each of 9 pairs run alternately; a log
//! of 200,001 imports took as long either way, 5.7–6.8 s.)
//! A held state that changed after its row was written is written again (upserted) when it
//! leaves memory or the log ends, once however many events it took in between.
//!
//! Memory is bounded by a number of states: past it, the least recently touched half leaves.
//! The next event of a stream that left is folded onto its row in the shadow as before, by the
//! writer, which hands the state back; events of that stream read meanwhile wait for it and are
//! folded in memory once it is back (or, if the log ends first, by the writer after it).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::mpsc;

use crate::model::{self, EventOf, Row, StateModel};
use crate::store::Batch;
use domain::commands::Aggregate;
use domain::store::Position;

/// States held at most. (100,000 imported connections, 20,000 of them then refreshed 20 times:
/// 900,001 events rebuilt in 7.3–9.4 s against 16–17 s folding every batch onto the shadow's
/// rows, peak RSS 280–290 MB against 110 MB; the import alone, 100,001 events, 2.6–2.9 s
/// either way.)
pub(crate) const CAPACITY: usize = 50_000;

/// Batches a new stream stays unwritten at least (see the module's documentation).
const RIPENS_AFTER: u64 = 4;

/// A decoded event: stream, version, event.
type Decoded<M> = (String, u32, EventOf<M>);

struct Held<S> {
    version: u32,
    state: S,
    /// The batch that last touched it.
    touched: u64,
    /// When it was first seen: rows are written in the order the log created them.
    seen: u64,
    /// What the shadow has of it.
    shadow: Shadow,
}

/// What the shadow has of a held state.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shadow {
    /// No row: it is inserted.
    Nothing,
    /// An older row: it is upserted.
    Behind,
    /// This state's row.
    Current,
}

/// A state the writer folded, handed back.
struct Returned<S> {
    stream_id: String,
    version: u32,
    state: S,
}

/// The states of `M` a rebuild holds, and which streams it has written to the shadow.
pub(crate) struct Resident<M: StateModel> {
    held: HashMap<String, Held<M::State>>,
    /// Hashes of the streams written to the shadow. (A new stream whose hash collides with one
    /// of them is folded onto a snapshot that is not there, i.e. from its start, as it should.)
    written: HashSet<u64>,
    /// Streams whose events went to the writer (one batch at a time), with the events read
    /// since, which wait for the state to come back.
    in_flight: HashMap<String, Vec<(u32, EventOf<M>)>>,
    /// Where the writer hands states back, and where the replay takes them.
    hand_back: mpsc::Sender<Returned<M::State>>,
    handed_back: mpsc::Receiver<Returned<M::State>>,
    hasher: RandomState,
    capacity: usize,
    /// Rows per batch written out.
    chunk: usize,
    /// Batches a new stream stays unwritten without being touched: one more than the longest
    /// gap seen between two batches touching the same held stream, at least [`RIPENS_AFTER`].
    ripens_after: u64,
    /// The streams created without a row yet, about in the order they were last touched, with
    /// the batch that touched them then (a stream touched since waits again when it comes up).
    unwritten: VecDeque<(u64, String)>,
    clock: u64,
    seen: u64,
}

impl<M: StateModel> Resident<M> {
    /// Holds up to `capacity` states and writes them out `chunk` rows to a batch.
    pub(crate) fn new(capacity: usize, chunk: usize) -> Self {
        let (hand_back, handed_back) = mpsc::channel();
        Self {
            hand_back,
            handed_back,
            held: HashMap::new(),
            written: HashSet::new(),
            in_flight: HashMap::new(),
            hasher: RandomState::new(),
            capacity: capacity.max(1),
            chunk: chunk.max(1),
            ripens_after: RIPENS_AFTER,
            unwritten: VecDeque::new(),
            clock: 0,
            seen: 0,
        }
    }

    /// Folds `events` (in log order, the last at `to`) onto the held states, taking in new
    /// streams and those the writer handed back, and returns the batches to write, in order.
    pub(crate) fn take(&mut self, events: Vec<Decoded<M>>, to: Position) -> Vec<Batch> {
        self.clock += 1;
        let mut leaving = Vec::new();
        while let Ok(back) = self.handed_back.try_recv() {
            if let Some(waiting) = self.in_flight.remove(&back.stream_id) {
                leaving.extend(self.make_room());
                let (mut version, mut state, mut shadow) =
                    (back.version, back.state, Shadow::Current);
                for (v, event) in waiting {
                    if v > version {
                        state.apply(&event);
                        (version, shadow) = (v, Shadow::Behind);
                    }
                }
                self.hold(back.stream_id, version, state, shadow);
            }
        }
        let mut rest = Vec::new();
        for (stream_id, version, event) in events {
            if let Some(held) = self.held.get_mut(&stream_id) {
                self.ripens_after = self.ripens_after.max(self.clock - held.touched + 1);
                if version > held.version {
                    held.state.apply(&event);
                    held.version = version;
                    if held.shadow == Shadow::Current {
                        held.shadow = Shadow::Behind;
                    }
                }
                held.touched = self.clock;
            } else if let Some(waiting) = self.in_flight.get_mut(&stream_id) {
                // Its state comes back with the batch in flight; this waits for it.
                waiting.push((version, event));
            } else if self.written.contains(&self.hasher.hash_one(&stream_id)) {
                self.in_flight.insert(stream_id.clone(), Vec::new());
                rest.push((stream_id, version, event));
            } else {
                leaving.extend(self.make_room());
                let mut state = M::State::default();
                state.apply(&event);
                self.unwritten.push_back((self.clock, stream_id.clone()));
                self.hold(stream_id, version, state, Shadow::Nothing);
            }
        }
        leaving.extend(self.ripe());
        let mut batches = written_out(leaving, self.chunk);
        if !rest.is_empty() {
            batches.push(self.handing_back(rest, to));
        }
        batches
    }

    /// The rows of new streams nothing touched for a while: written now, and held on.
    fn ripe(&mut self) -> Vec<Leaving> {
        let ripe = self.clock.saturating_sub(self.ripens_after);
        let mut rows = Vec::new();
        while let Some((touched, _)) = self.unwritten.front()
            && *touched <= ripe
        {
            let Some((_, stream_id)) = self.unwritten.pop_front() else {
                break;
            };
            let Some(held) = self.held.get_mut(&stream_id) else {
                continue; // It left memory, and was written then.
            };
            if held.shadow != Shadow::Nothing {
                continue;
            }
            if held.touched > ripe {
                self.unwritten.push_back((held.touched, stream_id));
                continue;
            }
            held.shadow = Shadow::Current;
            let row = M::row(&stream_id, held.version, &held.state);
            rows.push((held.seen, Shadow::Nothing, row));
        }
        rows
    }

    fn hold(&mut self, stream_id: String, version: u32, state: M::State, shadow: Shadow) {
        self.seen += 1;
        let held = Held {
            version,
            state,
            touched: self.clock,
            seen: self.seen,
            shadow,
        };
        self.held.insert(stream_id, held);
    }

    /// The batch folding `events` onto the shadow's rows, which hands the states back.
    fn handing_back(&self, events: Vec<Decoded<M>>, to: Position) -> Batch {
        let mut stream_ids: Vec<String> = events.iter().map(|(id, ..)| id.clone()).collect();
        stream_ids.sort_unstable();
        stream_ids.dedup();
        let back = self.hand_back.clone();
        let fold = Box::new(move |snapshots| {
            let folded = model::fold_states::<M>(M::SHADOW, snapshots, events)?;
            let rows = folded.iter().filter_map(model::Folded::row::<M>).collect();
            for f in folded {
                // The replay may have finished reading; then nothing waits for these.
                let _ = back.send(Returned {
                    stream_id: f.stream_id,
                    version: f.version,
                    state: f.state,
                });
            }
            Ok(rows)
        });
        Batch {
            stream_ids,
            fold,
            to,
            fresh: false,
        }
    }

    /// When memory is full, the least recently touched half of the held states, leaving it.
    fn make_room(&mut self) -> Vec<Leaving> {
        if self.held.len() < self.capacity {
            return Vec::new();
        }
        let mut ages: Vec<u64> = self.held.values().map(|h| h.touched).collect();
        let half = ages.len() / 2;
        let (_, &mut newest_leaving, _) = ages.select_nth_unstable(half.saturating_sub(1));
        // Ties at the boundary go too: at least half leaves.
        let ids: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.touched <= newest_leaving)
            .map(|(id, _)| id.clone())
            .collect();
        let leaving = ids
            .into_iter()
            .filter_map(|id| {
                let held = self.held.remove(&id)?;
                self.leave(&id, held)
            })
            .collect();
        // Those that left unwritten were written now: the queue forgets them, so that it holds
        // no more streams than memory does.
        let held = &self.held;
        self.unwritten.retain(|(_, id)| held.contains_key(id));
        leaving
    }

    /// A held state leaving memory for the shadow: the row to write, unless the shadow has it.
    fn leave(&mut self, stream_id: &str, held: Held<M::State>) -> Option<Leaving> {
        self.written.insert(self.hasher.hash_one(stream_id));
        (held.shadow != Shadow::Current).then(|| {
            let row = M::row(stream_id, held.version, &held.state);
            (held.seen, held.shadow, row)
        })
    }

    /// Every held state, in batches, after the events still waiting for a state in flight
    /// (folded onto the rows their batches write); nothing is held after.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Batch> + '_ {
        let chunk = self.chunk;
        self.unwritten.clear();
        let waiting: Vec<Decoded<M>> = self
            .in_flight
            .drain()
            .flat_map(|(id, events)| events.into_iter().map(move |(v, e)| (id.clone(), v, e)))
            .collect();
        let waiting =
            (!waiting.is_empty()).then(|| model::batch::<M>(M::SHADOW, waiting, Position::START));
        let mut held: Vec<(String, Held<M::State>)> = self.held.drain().collect();
        held.sort_unstable_by_key(|(_, h)| std::cmp::Reverse(h.seen));
        let rows = std::iter::from_fn(move || {
            let at = held.len().saturating_sub(chunk);
            let leaving: Vec<_> = held
                .drain(at..)
                .rev()
                .filter_map(|(id, h)| self.leave(&id, h))
                .collect();
            (!held.is_empty() || !leaving.is_empty()).then(|| written_out(leaving, chunk))
        })
        .flatten();
        waiting.into_iter().chain(rows)
    }
}

/// A row to write: when its stream was first seen, what the shadow has of it, the row.
type Leaving = (u64, Shadow, Option<Row>);

/// The batches writing `leaving`, up to `chunk` rows each, in the order the log created the
/// streams: new rows with `COPY`, the others as upserts.
fn written_out(mut leaving: Vec<Leaving>, chunk: usize) -> Vec<Batch> {
    leaving.sort_unstable_by_key(|(seen, ..)| *seen);
    let (new, behind): (Vec<_>, Vec<_>) = leaving
        .into_iter()
        .partition(|(_, shadow, _)| *shadow == Shadow::Nothing);
    let mut batches = Vec::new();
    for (rows, fresh) in [(new, true), (behind, false)] {
        let mut rows = rows.into_iter().filter_map(|(.., row)| row).peekable();
        while rows.peek().is_some() {
            let rows: Vec<Row> = rows.by_ref().take(chunk).collect();
            batches.push(Batch {
                stream_ids: Vec::new(),
                fold: Box::new(move |_| Ok(rows)),
                to: Position::START,
                fresh,
            });
        }
    }
    batches
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use chrono::{TimeZone, Utc};
    use domain::integration::{IntegrationDeleted, IntegrationEvent};

    use super::*;
    use crate::IntegrationsModel;
    use crate::store::Snapshot;

    /// The shadow table as the writer leaves it: stream → (version, state JSON).
    type Table = HashMap<String, (u32, String)>;

    /// Event `version` of stream `id`: every one replaces the state, which names its version.
    fn event(id: &str, version: u32) -> Decoded<IntegrationsModel> {
        let at = Utc
            .timestamp_opt(1_700_000_000 + i64::from(version), 0)
            .unwrap();
        (
            id.to_owned(),
            version,
            IntegrationEvent::IntegrationDeleted(IntegrationDeleted { deleted_at: at }),
        )
    }

    fn take(
        resident: &mut Resident<IntegrationsModel>,
        events: Vec<Decoded<IntegrationsModel>>,
    ) -> Vec<Batch> {
        resident.take(events, Position::START)
    }

    /// Writes `batches` as the rebuild's writer does.
    fn write(table: &mut Table, batches: Vec<Batch>) {
        for batch in batches {
            let snapshots = batch
                .stream_ids
                .iter()
                .filter_map(|id| {
                    let (version, state) = table.get(id)?.clone();
                    Some((id.clone(), Snapshot { version, state }))
                })
                .collect();
            for row in (batch.fold)(snapshots).unwrap() {
                assert!(!batch.fresh || !table.contains_key(&row.stream_id));
                table.insert(row.stream_id, (row.version, row.state.get().to_owned()));
            }
        }
    }

    /// Holding one state, `a` leaves memory for `b`; `a`'s next event goes to the writer.
    fn with_a_in_flight() -> (Resident<IntegrationsModel>, Table, Vec<Batch>) {
        let mut resident = Resident::<IntegrationsModel>::new(1, 10);
        let mut table = Table::new();
        write(&mut table, take(&mut resident, vec![event("a", 1)]));
        write(&mut table, take(&mut resident, vec![event("b", 1)]));
        let in_flight = take(&mut resident, vec![event("a", 2)]);
        assert_eq!(in_flight.len(), 1);
        (resident, table, in_flight)
    }

    #[test]
    fn events_of_a_stream_in_flight_wait_for_its_state_and_are_folded_in_memory() {
        let (mut resident, mut table, in_flight) = with_a_in_flight();
        // Nothing more goes to the writer for `a` while its state is on the way back.
        assert!(take(&mut resident, vec![event("a", 3)]).is_empty());
        assert!(take(&mut resident, vec![event("a", 4)]).is_empty());
        write(&mut table, in_flight);
        assert_eq!(table["a"].0, 2);
        // Handed back at version 2, it takes in 3 and 4 and is written once, at the end; `b`
        // leaves memory for it, and only then is its row written.
        assert!(!table.contains_key("b"));
        write(&mut table, take(&mut resident, Vec::new()));
        assert_eq!(table["b"].0, 1);
        assert_eq!(resident.held["a"].version, 4);
        write(&mut table, resident.drain().collect());
        assert_eq!((table["a"].0, table["b"].0), (4, 1));
        assert!(
            table["a"].1.contains("2023-11-14T22:13:24Z"),
            "{}",
            table["a"].1
        );
    }

    /// The rows the batches of `take`ing `events` write, all new ones.
    fn written(
        resident: &mut Resident<IntegrationsModel>,
        events: Vec<Decoded<IntegrationsModel>>,
    ) -> Vec<String> {
        let batches = take(resident, events);
        assert!(batches.iter().all(|b| b.fresh));
        let mut table = Table::new();
        write(&mut table, batches);
        let mut streams: Vec<String> = table.into_keys().collect();
        streams.sort();
        streams
    }

    /// `batches` batches without events, none of which writes anything.
    fn nothing_written_for(resident: &mut Resident<IntegrationsModel>, batches: u64) {
        for _ in 0..batches {
            assert!(written(resident, Vec::new()).is_empty());
        }
    }

    #[test]
    fn a_new_stream_nothing_touches_is_written_a_few_batches_later() {
        let mut resident = Resident::<IntegrationsModel>::new(100, 10);
        assert!(written(&mut resident, vec![event("a", 1)]).is_empty());
        nothing_written_for(&mut resident, RIPENS_AFTER - 1);
        assert_eq!(written(&mut resident, vec![event("b", 1)]), ["a"]);
        assert_eq!(resident.held["a"].shadow, Shadow::Current);
        // Written once: held on, it has nothing more to write at the end.
        let mut table = Table::new();
        write(&mut table, resident.drain().collect());
        assert_eq!(table.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_stream_touched_every_few_batches_is_written_once_at_the_end() {
        let mut resident = Resident::<IntegrationsModel>::new(100, 10);
        let mut version = 1;
        assert!(written(&mut resident, vec![event("a", version)]).is_empty());
        for _ in 0..5 {
            nothing_written_for(&mut resident, RIPENS_AFTER - 1);
            version += 1;
            assert!(written(&mut resident, vec![event("a", version)]).is_empty());
        }
        let drained: Vec<Batch> = resident.drain().collect();
        assert!(drained.iter().all(|b| b.fresh));
        let mut table = Table::new();
        write(&mut table, drained);
        assert_eq!(table["a"].0, 6);
    }

    #[test]
    fn new_streams_wait_as_long_as_the_longest_gap_seen_between_touches() {
        let mut resident = Resident::<IntegrationsModel>::new(100, 10);
        assert!(written(&mut resident, vec![event("a", 1)]).is_empty());
        nothing_written_for(&mut resident, RIPENS_AFTER - 1);
        assert_eq!(written(&mut resident, Vec::new()), ["a"]);
        nothing_written_for(&mut resident, 3);
        // `a`, written, is touched again 2 × RIPENS_AFTER batches after it was created: `b`,
        // new in that batch, waits that long and one more.
        let gap = 2 * RIPENS_AFTER;
        let batches = take(&mut resident, vec![event("a", 2), event("b", 1)]);
        assert!(batches.is_empty());
        assert_eq!(resident.ripens_after, gap + 1);
        nothing_written_for(&mut resident, gap);
        assert_eq!(written(&mut resident, Vec::new()), ["b"]);
    }

    #[test]
    fn the_streams_waiting_unwritten_are_never_more_than_memory_holds() {
        let mut resident = Resident::<IntegrationsModel>::new(4, 10);
        // A gap that long makes every new stream wait until it leaves memory.
        resident.ripens_after = 1_000;
        let mut table = Table::new();
        for i in 0..100 {
            write(
                &mut table,
                take(&mut resident, vec![event(&format!("s{i}"), 1)]),
            );
            assert!(
                resident.unwritten.len() <= 4,
                "{}",
                resident.unwritten.len()
            );
        }
        write(&mut table, resident.drain().collect());
        assert_eq!(table.len(), 100);
    }

    #[test]
    fn events_still_waiting_when_the_log_ends_are_folded_onto_the_row_by_the_writer() {
        let (mut resident, mut table, in_flight) = with_a_in_flight();
        assert!(take(&mut resident, vec![event("a", 3)]).is_empty());
        let drained: Vec<Batch> = resident.drain().collect();
        write(&mut table, in_flight);
        write(&mut table, drained);
        assert_eq!((table["a"].0, table["b"].0), (3, 1));
    }
}
