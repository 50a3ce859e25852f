//! An in-memory replica of the live connections read model, for the hot read path.
//!
//! Entries are dropped when any event of their stream appears in the log (every instance follows
//! the log, woken by NOTIFY), when a write on this instance touches them, and in any case after
//! a short time to live. A read that raced with an invalidation does not fill the cache, so a
//! stale row can only be served between a commit and the moment this instance hears of it.
//!
//! The follower also makes crypto-shredding hold across instances: when the log shows a
//! deletion, the data keys it shredded are dropped from this process's vault cache, so a key
//! destroyed by another instance stops opening anything here as soon as this instance hears of
//! it (and whenever following restarts, the whole key cache is dropped).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use domain::connection::{self, ConnectionEvent, ConnectionKey};
use domain::event::DomainEvent;
use domain::keys::Vault;
use domain::store::{Backend, LogReader};

use crate::ProjectionError;
use crate::queries::{self, ConnectionRecord};

/// The replica. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ConnectionCache {
    entries: RwLock<HashMap<String, (Arc<ConnectionRecord>, Instant)>>,
    /// Bumped by every invalidation; a read that saw another value does not fill the cache.
    epoch: AtomicU64,
    ttl: Duration,
    capacity: usize,
}

impl ConnectionCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            ttl,
            capacity,
        }
    }

    /// The live connection, from memory when fresh, else from the read model.
    pub async fn find(
        &self,
        backend: &Backend,
        key: &ConnectionKey,
    ) -> Result<Option<Arc<ConnectionRecord>>, ProjectionError> {
        let stream_id = key.stream_id().to_string();
        if let Some(record) = self.cached(&stream_id) {
            return Ok(Some(record));
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(record) = queries::find_connection(backend, key).await? else {
            return Ok(None);
        };
        let record = Arc::new(record);
        if let Ok(mut entries) = self.entries.write()
            && self.epoch.load(Ordering::Acquire) == epoch
        {
            if entries.len() >= self.capacity {
                entries.clear();
            }
            entries.insert(stream_id, (record.clone(), Instant::now()));
        }
        Ok(Some(record))
    }

    fn cached(&self, stream_id: &str) -> Option<Arc<ConnectionRecord>> {
        let entries = self.entries.read().ok()?;
        let (record, loaded_at) = entries.get(stream_id)?;
        (loaded_at.elapsed() < self.ttl).then(|| record.clone())
    }

    /// Forgets a stream's entry.
    pub fn invalidate(&self, stream_id: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(stream_id);
        }
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
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
