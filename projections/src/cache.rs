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

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use domain::connection::{self, ConnectionEvent, ConnectionKey};
use domain::event::DomainEvent;
pub use domain::keys::CacheStats;
use domain::keys::Vault;
use domain::store::{Backend, LogReader};
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};

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
    loaded_at: Instant,
}

/// Counts the entries the cache drops to stay within its capacity.
#[derive(Clone, Debug, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl<K, V> Lifecycle<K, V> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: K, _: V) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Entries<A> = Cache<String, Arc<Cached<A>>, UnitWeighter, DefaultHashBuilder, CountEvictions>;

/// The replica: at most `capacity` connections, the least useful dropped first. Cheap to share
/// behind an `Arc`.
pub struct ConnectionCache<A = ()> {
    entries: Entries<A>,
    /// Bumped by every invalidation; a read that saw another value does not fill the cache.
    epoch: AtomicU64,
    ttl: Duration,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: CountEvictions,
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
        let capacity = capacity.max(1);
        let evictions = CountEvictions::default();
        Self {
            entries: Cache::with(
                capacity,
                u64::try_from(capacity).unwrap_or(u64::MAX),
                UnitWeighter,
                DefaultHashBuilder::default(),
                evictions.clone(),
            ),
            epoch: AtomicU64::new(0),
            ttl,
            capacity: u64::try_from(capacity).unwrap_or(u64::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    /// The live connection, from memory when fresh, else from the read model.
    pub async fn find(
        &self,
        read_models: &ReadModels,
        key: &ConnectionKey,
    ) -> Result<Option<Arc<Cached<A>>>, ProjectionError> {
        let stream_id = key.stream_id().to_string();
        if let Some(cached) = self.cached(&stream_id) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(cached));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(record) = queries::find_connection(read_models, key).await? else {
            return Ok(None);
        };
        let cached = Arc::new(Cached {
            record: Arc::new(record),
            derived: A::default(),
            loaded_at: Instant::now(),
        });
        // A read that raced with an invalidation may hold what it invalidated.
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.entries.insert(stream_id, cached.clone());
        }
        Ok(Some(cached))
    }

    fn cached(&self, stream_id: &str) -> Option<Arc<Cached<A>>> {
        let cached = self.entries.get(stream_id)?;
        if cached.loaded_at.elapsed() < self.ttl {
            return Some(cached);
        }
        // Expired: removed rather than replaced by the reload, which the cache would count as
        // an eviction.
        self.entries.remove(stream_id);
        None
    }

    /// Forgets a stream's entry.
    pub fn invalidate(&self, stream_id: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(stream_id);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }

    /// Hits, misses, evictions and entries so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.0.load(Ordering::Relaxed),
            entries: u64::try_from(self.entries.len()).unwrap_or(u64::MAX),
            capacity: self.capacity,
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
