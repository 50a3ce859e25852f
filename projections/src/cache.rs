//! An in-memory replica of the live connections read model, for the hot read path.
//!
//! Entries are dropped when any event of their stream appears in the log (every instance follows
//! the log, woken by NOTIFY), when a write on this instance touches them, and in any case after
//! a short time to live. A read that raced with an invalidation does not fill the cache, so a
//! stale row can only be served between a commit and the moment this instance hears of it.
//!
//! The replica is bounded: past its capacity, `quick_cache` evicts the entries least worth
//! keeping (recently inserted ones read once go first, ones read again stay), one at a time, so
//! a working set larger than the cache costs misses in proportion, never a cliff. What a reader
//! derives from an entry ([`Cached::derived`]) is dropped with it: on eviction, invalidation and
//! expiry alike.
//!
//! The follower also makes crypto-shredding hold across instances: when the log shows a
//! deletion, the data keys it shredded are dropped from this process's vault cache, so a key
//! destroyed by another instance stops opening anything here as soon as this instance hears of
//! it (and whenever following restarts, the whole key cache is dropped).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use domain::connection::{self, ConnectionEvent, ConnectionKey};
use domain::event::DomainEvent;
use domain::integration::INTEGRATION_DELETED;
pub use domain::keys::{CacheBudget, CacheStats};
use domain::keys::{StoredDataKey, Vault};
use domain::store::{Backend, LogReader, StoreError, StreamId};
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::ProjectionError;
use crate::queries::{self, ConnectionRecord};
use crate::store::ReadModels;

/// A cached connection, with what its reader derived from it (`A`): built with the entry and
/// dropped with it, so whatever the reader keeps there (opened credentials, finished answers)
/// lives no longer than the record it came from.
#[derive(Debug)]
pub struct Cached<A> {
    pub record: Arc<ConnectionRecord>,
    pub derived: A,
    stream_id: StreamId,
    /// What it takes in memory, estimated ([`footprint`]).
    bytes: u64,
    /// When it was last found current, in microseconds since the cache's origin.
    loaded_at: AtomicU64,
    /// The minute (since the cache's origin) of the last read let through by
    /// [`ConnectionCache::first_read`]; `u64::MAX` before the first.
    noted_minute: AtomicU64,
}

/// Hands the entries an insert pushed out (or replaced) back to the inserter, which drops them
/// from the index and counts them, and releases them once the cache's lock is let go.
#[derive(Clone, Debug, Default)]
struct Pushed;

impl<A> Lifecycle<ConnectionKey, Arc<Cached<A>>> for Pushed {
    type RequestState = Vec<Arc<Cached<A>>>;

    fn on_evict(&self, pushed: &mut Self::RequestState, _: ConnectionKey, cached: Arc<Cached<A>>) {
        pushed.push(cached);
    }
}

/// What an entry weighs against the budget: its estimated bytes, or 1 when the budget counts
/// entries.
#[derive(Clone, Copy, Debug)]
struct Weight {
    by_bytes: bool,
}

impl<A> Weighter<ConnectionKey, Arc<Cached<A>>> for Weight {
    fn weight(&self, _: &ConnectionKey, cached: &Arc<Cached<A>>) -> u64 {
        if self.by_bytes {
            cached.bytes.max(1)
        } else {
            1
        }
    }
}

type Entries<A> = Cache<ConnectionKey, Arc<Cached<A>>, Weight, DefaultHashBuilder, Pushed>;

/// What an entry takes besides its record's text: the entry, its `Arc`s, its key in the cache
/// and in the stream index (a stream id, a key pair), and its slots in both tables.
const ENTRY_OVERHEAD: u64 = 512;

/// What an entry takes in memory, estimated from the length of the JSON its record was parsed
/// from: the record as parsed plus the answers a reader renders from it come to about two and a
/// half times that. (Measured: 100,000 connections of GitHub-sized tokens, each read once, grew
/// the server by 2.5 KB each with their data keys, for records of 1.1 KB of JSON.) The stored
/// text's length is at hand; serializing the record again to measure it cost a miss about a
/// twentieth of the server's CPU under uniform reads.
fn footprint(stored_bytes: usize) -> u64 {
    let stored_bytes = u64::try_from(stored_bytes).unwrap_or(u64::MAX);
    ENTRY_OVERHEAD.saturating_add(stored_bytes.saturating_mul(5) / 2)
}

/// A typical entry's estimated size, for sizing the tables of a cache bounded by memory.
const TYPICAL_ENTRY: u64 = 3 * 1024;

/// The replica: at most `capacity` connections, the least useful dropped first. Cheap to share
/// behind an `Arc`.
///
/// Entries are found by [`ConnectionKey`], so a hit costs a hash lookup and no stream id (a
/// SHA-1 of the pair); the log names streams, so an index from stream to key, holding exactly
/// the cached keys, turns an invalidation into the key to drop.
pub struct ConnectionCache<A = ()> {
    entries: Entries<A>,
    /// The key of each cached stream. Its lock is held while an entry is filled or dropped, so
    /// that an invalidation cannot fall between a fill's check of the epoch and its insert
    /// (hits never take it).
    index: Mutex<HashMap<StreamId, ConnectionKey>>,
    /// Bumped by every invalidation; a read that saw another value does not fill the cache.
    epoch: AtomicU64,
    /// What `loaded_at` counts from.
    origin: Instant,
    ttl: Duration,
    budget: CacheBudget,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl<A: Default + Send + Sync + 'static> std::fmt::Debug for ConnectionCache<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCache")
            .field("stats", &self.stats())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<A: Default + Send + Sync + 'static> ConnectionCache<A> {
    /// A cache of at most `capacity` connections (at least 1), each served for at most `ttl`
    /// without hearing of a change.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self::with_budget(
            ttl,
            CacheBudget::Entries(u64::try_from(capacity).unwrap_or(u64::MAX)),
        )
    }

    /// A cache within `budget`: a number of connections, or the memory they take (estimated
    /// per entry from its record), each served for at most `ttl` without hearing of a change.
    pub fn with_budget(ttl: Duration, budget: CacheBudget) -> Self {
        let (items, weight, by_bytes) = match budget {
            CacheBudget::Entries(n) => (budget.entries(1), n.max(1), false),
            CacheBudget::Bytes(bytes) => (budget.entries(TYPICAL_ENTRY), bytes.max(1), true),
        };
        Self {
            entries: Cache::with(
                items,
                weight,
                Weight { by_bytes },
                DefaultHashBuilder::default(),
                Pushed,
            ),
            index: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            origin: Instant::now(),
            ttl,
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The live connection, from memory when fresh, else from the read model.
    pub async fn find(
        &self,
        read_models: &ReadModels,
        key: &ConnectionKey,
    ) -> Result<Option<Arc<Cached<A>>>, ProjectionError> {
        Ok(self
            .find_keyed(read_models, key)
            .await?
            .map(|(cached, _)| cached))
    }

    /// [`ConnectionCache::find`], with the data key of the credentials when the read model was
    /// asked (a miss): the caller can open them without asking the key store again.
    pub async fn find_keyed(
        &self,
        read_models: &ReadModels,
        key: &ConnectionKey,
    ) -> Result<Option<(Arc<Cached<A>>, Option<StoredDataKey>)>, ProjectionError> {
        // An expired entry stays until the reload replaces it.
        let expired = match self.entries.get(key) {
            Some(cached) if self.age(&cached) < self.ttl => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some((cached, None)));
            }
            other => other,
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Acquire);
        let stream_id = key.stream_id();
        let found = match queries::find_connection_keyed(read_models, &stream_id).await {
            Ok(found) => found,
            // The database is away: nothing can be committed meanwhile, so the entry last
            // loaded is as current as the log can be, but for commits this instance had not
            // heard of yet when the database went. Reads keep answering from it.
            Err(ProjectionError::Store(StoreError::Database(_))) if expired.is_some() => {
                return Ok(expired.map(|cached| (cached, None)));
            }
            Err(e) => return Err(e),
        };
        let Some(queries::KeyedConnection {
            record,
            data_key,
            stored_bytes,
        }) = found
        else {
            return Ok(None);
        };
        // Unchanged since it was loaded: the entry, with what its reader derived from it, is
        // current again, and the reader need not derive it anew (at scale, where the working
        // set is read less often than the time to live, most reads land here).
        if let Some(old) = expired
            && old.record.version == record.version
            && old.record.id == record.id
        {
            let _index = self.index();
            if self.epoch.load(Ordering::Acquire) == epoch {
                old.loaded_at.store(self.now(), Ordering::Relaxed);
            }
            return Ok(Some((old, data_key)));
        }
        let cached = Arc::new(Cached {
            bytes: footprint(stored_bytes),
            record: Arc::new(record),
            derived: A::default(),
            stream_id,
            loaded_at: AtomicU64::new(self.now()),
            noted_minute: AtomicU64::new(u64::MAX),
        });
        let mut pushed = Vec::new();
        {
            let mut index = self.index();
            // A read that raced with an invalidation may hold what it invalidated.
            if self.epoch.load(Ordering::Acquire) == epoch {
                self.entries
                    .insert_with_lifecycle(key.clone(), cached.clone(), &mut pushed);
                for old in &pushed {
                    index.remove(&old.stream_id);
                }
                index.insert(cached.stream_id.clone(), key.clone());
            }
        }
        // The entry it replaced (an expired one, or a concurrent reload's) is no eviction.
        let evicted = pushed
            .iter()
            .filter(|old| old.stream_id != cached.stream_id)
            .count();
        self.evictions.fetch_add(
            u64::try_from(evicted).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(Some((cached, data_key)))
    }

    /// The stream of `cached` if this is its first read this minute (for activity tracking,
    /// [`crate::activity`]), else `None`: on the hot path one atomic load and, once a minute per
    /// connection, one compare-and-swap.
    pub fn first_read<'a>(&self, cached: &'a Cached<A>) -> Option<&'a StreamId> {
        let minute = self.now() / 60_000_000;
        let noted = cached.noted_minute.load(Ordering::Relaxed);
        (noted != minute
            && cached
                .noted_minute
                .compare_exchange(noted, minute, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok())
        .then_some(&cached.stream_id)
    }

    /// Microseconds since the origin.
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// How long ago `cached` was last found current.
    fn age(&self, cached: &Cached<A>) -> Duration {
        Duration::from_micros(
            self.now()
                .saturating_sub(cached.loaded_at.load(Ordering::Relaxed)),
        )
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, ConnectionKey>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets a stream's entry.
    pub fn invalidate(&self, stream_id: &str) {
        let dropped = {
            let mut index = self.index();
            self.epoch.fetch_add(1, Ordering::AcqRel);
            index
                .remove(stream_id)
                .and_then(|key| self.entries.remove(&key))
        };
        // Released (its answers wiped) outside the lock.
        drop(dropped);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        let mut index = self.index();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        index.clear();
        self.entries.clear();
    }

    /// Hits, misses, evictions and entries so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: u64::try_from(self.entries.len()).unwrap_or(u64::MAX),
            capacity: match self.budget {
                CacheBudget::Entries(n) => n.max(1),
                CacheBudget::Bytes(_) => 0,
            },
            bytes: match self.budget {
                CacheBudget::Entries(_) => 0,
                CacheBudget::Bytes(_) => self.entries.weight(),
            },
            budget_bytes: match self.budget {
                CacheBudget::Entries(_) => 0,
                CacheBudget::Bytes(bytes) => bytes,
            },
        }
    }

    /// Follows the log from now on and invalidates the streams it changes, and forgets the data
    /// keys deletions shredded from `vault`'s cache, until `shutdown`. After a failure it clears
    /// everything and starts again from the log's end.
    pub async fn follow(&self, backend: Backend, vault: Vault, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let store = backend.event_store();
        let mut listener = store.listener();
        loop {
            let start = match store.last_position().await {
                Ok(position) => position,
                Err(error) => {
                    tracing::warn!(error.message = %error, "cache.follow cannot read the log");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Whatever happened before `start` may be cached stale: start clean.
            self.clear();
            vault.clear_cache();
            let mut reader = LogReader::new(store.clone(), start, 1000);
            loop {
                match reader.next_batch().await {
                    Ok(events) if events.is_empty() => {
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = listener.wait() => {}
                        }
                    }
                    Ok(events) => {
                        // An integration's deletion shredded its data keys on the instance
                        // that ran it; the event names none, so every key is dropped here (a
                        // rare event; the live ones load again on use).
                        if events.iter().any(|e| e.event_type == INTEGRATION_DELETED) {
                            vault.clear_cache();
                        }
                        for event in events
                            .iter()
                            .filter(|e| e.stream_id.category() == connection::CATEGORY)
                        {
                            self.invalidate(event.stream_id.as_str());
                            if event.event_type == "ConnectionDeleted"
                                && let Ok(ConnectionEvent::ConnectionDeleted(deleted)) =
                                    ConnectionEvent::from_recorded(event)
                            {
                                vault.forget_cached(&deleted.shredded_data_keys);
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error.message = %error, "cache.follow lost the log");
                        break;
                    }
                }
            }
        }
    }
}
