//! The vault's cache of opened data keys: a bounded [`quick_cache`] cache, so that sealing and
//! opening do not read and unwrap a key from the database each time, and so that its size stays
//! within a capacity the caller sets, however many connections there are.
//!
//! Guarantees:
//! - It never holds more than its capacity: past it, the least useful keys are evicted one at a
//!   time (CLOCK-Pro), never the whole cache at once.
//! - It keeps the 32 key bytes, not the expanded cipher (about 1 KiB of round keys and hash
//!   tables): a seal or an open expands the key again, which costs far less than the database
//!   read a miss would, and a cache of 100,000 keys stays near 10 MB instead of 100 MB.
//! - An evicted, forgotten or cleared key leaves the cache at once, and its memory is wiped
//!   and released once no seal or unseal in flight still holds it (the bytes are `Zeroizing`;
//!   the `zeroize` features of `aes` and `ghash`/`polyval` wipe the expanded ciphers built from
//!   them).
//! - [`CacheStats`] counts every lookup as a hit or a miss, and as evictions only what the
//!   capacity pushed out (not what was forgotten or cleared).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};
use uuid::Uuid;
use zeroize::Zeroizing;

/// How many opened data keys a vault keeps unless told otherwise.
pub const DEFAULT_KEY_CACHE_CAPACITY: usize = 100_000;

/// What one cached data key takes in memory, estimated: the 32 key bytes and their shared
/// allocation, the id, and the cache's slot with its share of the table.
pub const KEY_ENTRY_BYTES: u64 = 128;

/// How large an in-memory cache may grow: a number of entries, or the memory its entries take
/// (estimated per entry, so that a cache of big entries holds fewer of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheBudget {
    Entries(u64),
    Bytes(u64),
}

impl CacheBudget {
    /// The entries the budget allows when each takes about `entry_bytes` (at least one).
    pub fn entries(self, entry_bytes: u64) -> usize {
        let entries = match self {
            Self::Entries(n) => n,
            Self::Bytes(bytes) => bytes / entry_bytes.max(1),
        };
        usize::try_from(entries).unwrap_or(usize::MAX).max(1)
    }
}

/// What a vault's cache of opened data keys has done since the vault was opened, and what it
/// holds now: for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to read and unwrap the key from the database.
    pub misses: u64,
    /// Keys dropped to stay within the capacity (not those forgotten or cleared).
    pub evictions: u64,
    /// Keys held now.
    pub entries: u64,
    /// The most entries it holds; 0 when it is bounded by memory alone.
    pub capacity: u64,
    /// The memory its entries take now, estimated (0 from a cache bounded by a number of
    /// entries that does not estimate it).
    pub bytes: u64,
    /// The most memory its entries may take; 0 when it is bounded by a number of entries.
    pub budget_bytes: u64,
}

/// An opened data key's bytes, shared by the cache and the seals and unseals using it.
pub(super) type KeyBytes = Arc<Zeroizing<[u8; 32]>>;

/// Opened data keys by id, bounded, with their statistics.
pub(super) struct KeyCache {
    keys: Cache<Uuid, KeyBytes, UnitWeighter, DefaultHashBuilder, CountEvictions>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
    /// The memory budget it was sized from, if any (for the statistics).
    pub(super) budget_bytes: u64,
}

impl KeyCache {
    /// An empty cache for at most `capacity` keys (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let evictions = Arc::new(AtomicU64::new(0));
        Self {
            keys: Cache::with(
                capacity,
                u64::try_from(capacity).unwrap_or(u64::MAX),
                UnitWeighter,
                DefaultHashBuilder::default(),
                CountEvictions(evictions.clone()),
            ),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
            budget_bytes: 0,
        }
    }

    /// The key `key_id`, if cached; counted as a hit or a miss.
    pub(super) fn get(&self, key_id: &Uuid) -> Option<KeyBytes> {
        let found = self.keys.get(key_id);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `cipher` as the key `key_id`, evicting another if the cache is full.
    pub(super) fn insert(&self, key_id: Uuid, cipher: KeyBytes) {
        self.keys.insert(key_id, cipher);
    }

    /// Drops the key `key_id`, if cached.
    pub(super) fn remove(&self, key_id: &Uuid) {
        self.keys.remove(key_id);
    }

    /// Drops every key.
    pub(super) fn clear(&self) {
        self.keys.clear();
    }

    /// The counts so far and the size now.
    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: u64::try_from(self.keys.len()).unwrap_or(u64::MAX),
            capacity: self.keys.capacity(),
            bytes: u64::try_from(self.keys.len())
                .unwrap_or(u64::MAX)
                .saturating_mul(KEY_ENTRY_BYTES),
            budget_bytes: self.budget_bytes,
        }
    }
}

/// Counts the keys the capacity evicts.
#[derive(Clone)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Uuid, KeyBytes> for CountEvictions {
    /// The keys evicted by one request, released after the cache's lock is.
    type RequestState = Vec<KeyBytes>;

    fn on_evict(&self, evicted: &mut Vec<KeyBytes>, _key_id: Uuid, cipher: KeyBytes) {
        self.0.fetch_add(1, Ordering::Relaxed);
        evicted.push(cipher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(n: u8) -> KeyBytes {
        Arc::new(Zeroizing::new([n; 32]))
    }

    fn key_id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn the_cache_stays_within_its_capacity_and_counts_what_it_evicts() {
        let cache = KeyCache::new(64);
        for n in 0..1_000 {
            cache.insert(key_id(n), cipher(1));
        }
        let stats = cache.stats();
        assert_eq!(stats.capacity, 64);
        assert!(stats.entries <= 64, "{stats:?}");
        assert!(stats.entries > 0, "{stats:?}");
        assert_eq!(stats.evictions, 1_000 - stats.entries, "{stats:?}");
    }

    #[test]
    fn a_full_cache_keeps_answering_from_memory() {
        let cache = KeyCache::new(64);
        for n in 0..64 {
            cache.insert(key_id(n), cipher(1));
        }
        // One more: the old cache started over empty here, so every next lookup missed. Spread
        // over shards that hold 32 keys each, at least 33 of the 65 stay, whatever the hashes.
        cache.insert(key_id(64), cipher(1));
        let hits = (0..=64)
            .filter(|n| cache.get(&key_id(*n)).is_some())
            .count();
        assert!(hits > 32, "only {hits} of 65 keys still cached");
    }

    #[test]
    fn lookups_count_as_hits_and_misses() {
        let cache = KeyCache::new(8);
        cache.insert(key_id(1), cipher(1));
        assert!(cache.get(&key_id(1)).is_some());
        assert!(cache.get(&key_id(1)).is_some());
        assert!(cache.get(&key_id(2)).is_none());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (2, 1));
        assert_eq!(stats.entries, 1);
    }

    #[test]
    fn forgotten_and_cleared_keys_are_gone_and_are_not_evictions() {
        let cache = KeyCache::new(8);
        for n in 1..=3 {
            cache.insert(key_id(n), cipher(1));
        }
        cache.remove(&key_id(1));
        assert!(cache.get(&key_id(1)).is_none());
        assert!(cache.get(&key_id(2)).is_some());
        cache.clear();
        assert!(cache.get(&key_id(2)).is_none());
        assert!(cache.get(&key_id(3)).is_none());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions), (0, 0));
    }

    #[test]
    fn a_capacity_of_zero_still_holds_one_key() {
        let cache = KeyCache::new(0);
        cache.insert(key_id(1), cipher(1));
        assert!(cache.get(&key_id(1)).is_some());
        assert_eq!(cache.stats().capacity, 1);
    }
}
