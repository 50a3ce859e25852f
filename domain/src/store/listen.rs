//! Waiting for new events: in-process commits and the cross-process notifier wake listeners.

use std::time::Duration;

use tokio::sync::watch;

/// Waits for new events: woken by commits (in-process and, on PostgreSQL, NOTIFY) and by a poll
/// interval, since wake-ups can be lost.
#[derive(Clone, Debug)]
pub struct Listener {
    changes: watch::Receiver<u64>,
    poll_interval: Duration,
}

impl Listener {
    pub(crate) fn new(changes: watch::Receiver<u64>, poll_interval: Duration) -> Self {
        Self {
            changes,
            poll_interval,
        }
    }

    /// Returns when an event may have been appended since the last call, or after the poll
    /// interval. Call it after a read came back short.
    pub async fn wait(&mut self) {
        let poll_interval = self.poll_interval;
        self.wait_at_most(poll_interval).await;
    }

    /// Like [`Listener::wait`] with an explicit bound.
    pub async fn wait_at_most(&mut self, bound: Duration) {
        // A closed sender means the store is gone; fall back to the timer alone.
        let _ = tokio::time::timeout(bound, self.changes.changed()).await;
    }
}

/// Signals in-process listeners and, where the backend has one, the cross-process notifier.
#[derive(Debug)]
pub(crate) struct ChangeSignal {
    changes: watch::Sender<u64>,
    // Keeps the channel open while the store lives, so a notifier task (which ends when the
    // channel closes) outlives moments without listeners.
    _alive: watch::Receiver<u64>,
}

impl ChangeSignal {
    pub(crate) fn new() -> Self {
        let (changes, alive) = watch::channel(0);
        Self {
            changes,
            _alive: alive,
        }
    }

    pub(crate) fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn sender(&self) -> watch::Sender<u64> {
        self.changes.clone()
    }
}
