//! A rebuild's states held in memory between batches.
//!
//! A log of refresh cycles touches a connection once per cycle, and the cycles of different
//! connections interleave, so a rebuild batch of a few thousand events holds about one event
//! pair per stream. Folding each batch onto snapshots in the shadow table meant, per refresh
//! cycle, a row read back, parsed, serialized and written again. The replay instead holds
//! states in memory, folds events onto them there and writes each state when it leaves memory:
//! with `COPY` if the shadow has no row of it yet, else as an upsert.
//!
//! Memory is bounded by a number of states: past it, the least recently touched half leaves.
//! A later event of a stream that left is folded onto its row in the shadow as before, by the
//! writer, which hands the state back; the replay takes it in again once no later batch of
//! that stream is on its way to the writer.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::mpsc;

use crate::model::{self, EventOf, Row, StateModel};
use crate::store::Batch;
use domain::commands::Aggregate;
use domain::store::Position;

/// States held at most. (100,000 connections, 20,000 of them refreshed 20 times: 900,001 events
/// rebuilt in 8.9 s with 50,000 held, peak RSS 305 MB; 10.6 s and 221 MB with 25,000; 18–20 s
/// and 110 MB folding every batch onto the shadow's rows.)
pub(crate) const CAPACITY: usize = 50_000;

/// A decoded event: stream, version, event.
type Decoded<M> = (String, u32, EventOf<M>);

struct Held<S> {
    version: u32,
    state: S,
    /// The batch that last touched it.
    touched: u64,
    /// When it was first seen: rows are written in the order the log created them.
    seen: u64,
    /// The shadow has a (older) row of it.
    in_shadow: bool,
}

/// A state the writer folded, handed back with the number of the batch that folded it.
struct Returned<S> {
    stream_id: String,
    version: u32,
    state: S,
    batch: u64,
}

/// The states of `M` a rebuild holds, and which streams it has written to the shadow.
pub(crate) struct Resident<M: StateModel> {
    held: HashMap<String, Held<M::State>>,
    /// Hashes of the streams written to the shadow. (A new stream whose hash collides with one
    /// of them is folded onto a snapshot that is not there, i.e. from its start, as it should.)
    written: HashSet<u64>,
    /// Streams whose events went to the writer, with the last batch that took any.
    in_flight: HashMap<String, u64>,
    /// Where the writer hands states back, and where the replay takes them.
    hand_back: mpsc::Sender<Returned<M::State>>,
    handed_back: mpsc::Receiver<Returned<M::State>>,
    hasher: RandomState,
    capacity: usize,
    clock: u64,
    seen: u64,
}

impl<M: StateModel> Resident<M> {
    pub(crate) fn new(capacity: usize) -> Self {
        let (hand_back, handed_back) = mpsc::channel();
        Self {
            hand_back,
            handed_back,
            held: HashMap::new(),
            written: HashSet::new(),
            in_flight: HashMap::new(),
            hasher: RandomState::new(),
            capacity: capacity.max(1),
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
            if self.in_flight.get(&back.stream_id) == Some(&back.batch) {
                self.in_flight.remove(&back.stream_id);
                leaving.extend(self.make_room());
                self.hold(back.stream_id, back.version, back.state, true);
            }
        }
        let mut rest = Vec::new();
        for (stream_id, version, event) in events {
            if let Some(held) = self.held.get_mut(&stream_id) {
                if version > held.version {
                    held.state.apply(&event);
                    held.version = version;
                }
                held.touched = self.clock;
            } else if self.in_flight.contains_key(&stream_id)
                || self.written.contains(&self.hasher.hash_one(&stream_id))
            {
                self.in_flight.insert(stream_id.clone(), self.clock);
                rest.push((stream_id, version, event));
            } else {
                leaving.extend(self.make_room());
                let mut state = M::State::default();
                state.apply(&event);
                self.hold(stream_id, version, state, false);
            }
        }
        let mut batches = written_out(leaving);
        if !rest.is_empty() {
            batches.push(self.handing_back(rest, to));
        }
        batches
    }

    fn hold(&mut self, stream_id: String, version: u32, state: M::State, in_shadow: bool) {
        self.seen += 1;
        let held = Held {
            version,
            state,
            touched: self.clock,
            seen: self.seen,
            in_shadow,
        };
        self.held.insert(stream_id, held);
    }

    /// The batch folding `events` onto the shadow's rows, which hands the states back.
    fn handing_back(&self, events: Vec<Decoded<M>>, to: Position) -> Batch {
        let mut stream_ids: Vec<String> = events.iter().map(|(id, ..)| id.clone()).collect();
        stream_ids.sort_unstable();
        stream_ids.dedup();
        let (back, number) = (self.hand_back.clone(), self.clock);
        let fold = Box::new(move |snapshots| {
            let folded = model::fold_states::<M>(M::SHADOW, snapshots, events)?;
            let rows = folded.iter().filter_map(model::Folded::row::<M>).collect();
            for f in folded {
                // The replay may have finished reading; then nothing waits for these.
                let _ = back.send(Returned {
                    stream_id: f.stream_id,
                    version: f.version,
                    state: f.state,
                    batch: number,
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
    fn make_room(&mut self) -> Vec<(u64, bool, Option<Row>)> {
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
        ids.into_iter()
            .filter_map(|id| {
                let held = self.held.remove(&id)?;
                Some(self.leave(&id, held))
            })
            .collect()
    }

    /// A held state leaving memory for the shadow: when it was first seen, whether the shadow
    /// has a row of it, and its row.
    fn leave(&mut self, stream_id: &str, held: Held<M::State>) -> (u64, bool, Option<Row>) {
        self.written.insert(self.hasher.hash_one(stream_id));
        let row = M::row(stream_id, held.version, &held.state);
        (held.seen, held.in_shadow, row)
    }

    /// Every held state, as batches of up to `chunk` rows; nothing is held after.
    pub(crate) fn drain(&mut self, chunk: usize) -> impl Iterator<Item = Batch> + '_ {
        let mut held: Vec<(String, Held<M::State>)> = self.held.drain().collect();
        held.sort_unstable_by_key(|(_, h)| std::cmp::Reverse(h.seen));
        std::iter::from_fn(move || {
            let at = held.len().saturating_sub(chunk.max(1));
            let leaving: Vec<_> = held
                .drain(at..)
                .rev()
                .map(|(id, h)| self.leave(&id, h))
                .collect();
            (!leaving.is_empty()).then(|| written_out(leaving))
        })
        .flatten()
    }
}

/// The batches writing out states that left memory, in the order the log created them: new
/// rows with `COPY`, the others as upserts.
fn written_out(mut leaving: Vec<(u64, bool, Option<Row>)>) -> Vec<Batch> {
    leaving.sort_unstable_by_key(|(seen, ..)| *seen);
    let (updated, new): (Vec<_>, Vec<_>) = leaving.into_iter().partition(|(_, s, _)| *s);
    [(new, true), (updated, false)]
        .into_iter()
        .filter_map(|(rows, fresh)| {
            let rows: Vec<Row> = rows.into_iter().filter_map(|(.., row)| row).collect();
            (!rows.is_empty()).then(|| Batch {
                stream_ids: Vec::new(),
                fold: Box::new(move |_| Ok(rows)),
                to: Position::START,
                fresh,
            })
        })
        .collect()
}
