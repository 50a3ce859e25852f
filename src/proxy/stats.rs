//! What the proxy counts per integration, for `/metrics`: calls by status class, a latency
//! histogram, retries, refreshes after a 401 and answers broken off. Never a header, token or
//! body.
//!
//! Label values are integration keys that named an integration (the proxy does not count a
//! call whose key named none), and at most [`MAX_INTEGRATIONS`] of them: calls of integrations
//! past that are counted only in [`ProxyStats::unrecorded`], so that the series stay bounded.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

/// Upper bounds of the latency histogram's buckets: microseconds, and the `le` label
/// (seconds). The HTTP histogram's bounds, and longer ones up to the proxy's timeout.
pub const DURATION_BUCKETS: [(u64, &str); 15] = [
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (2_500_000, "2.5"),
    (5_000_000, "5"),
    (10_000_000, "10"),
    (30_000_000, "30"),
    (60_000_000, "60"),
];

/// The most integrations counted apart.
pub const MAX_INTEGRATIONS: usize = 1000;

/// One integration's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntegrationStats {
    /// Calls answered by the provider, by status class (1xx … 5xx), and calls that got no
    /// answer (index 0: unreachable, timed out, refused before sending).
    pub calls: [u64; 6],
    pub micros: u64,
    /// Calls by duration: one count per bucket of [`DURATION_BUCKETS`] (not cumulative), the
    /// last one above every bound.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    pub retries: u64,
    /// 401s that led to a fenced refresh and a second attempt.
    pub rejected: u64,
    /// Answers whose body the provider broke off after it had begun.
    pub broken: u64,
}

/// The proxy's counters, by integration key.
#[derive(Debug, Default)]
pub struct ProxyStats(Mutex<Counted>);

#[derive(Debug, Default)]
struct Counted {
    by_key: BTreeMap<String, IntegrationStats>,
    unrecorded: u64,
}

impl ProxyStats {
    fn with(&self, key: &str, f: impl FnOnce(&mut IntegrationStats)) {
        let mut counted = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = counted.by_key.get_mut(key) {
            f(entry);
        } else if counted.by_key.len() < MAX_INTEGRATIONS {
            f(counted.by_key.entry(key.to_owned()).or_default());
        } else {
            counted.unrecorded += 1;
        }
    }

    /// A finished call: its status (`None`: no answer) and how long it took.
    pub fn record(&self, key: &str, status: Option<StatusCode>, took: Duration) {
        let class = status.map_or(0, |s| usize::from(s.as_u16() / 100).min(5));
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|(bound, _)| micros <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.with(key, |s| {
            s.calls[class] += 1;
            s.micros = s.micros.saturating_add(micros);
            s.buckets[bucket] += 1;
        });
    }

    pub fn retried(&self, key: &str) {
        self.with(key, |s| s.retries += 1);
    }

    pub fn rejected(&self, key: &str) {
        self.with(key, |s| s.rejected += 1);
    }

    pub fn broke_off(&self, key: &str) {
        self.with(key, |s| s.broken += 1);
    }

    /// Every integration's counters, by key.
    pub fn snapshot(&self) -> Vec<(String, IntegrationStats)> {
        let counted = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counted
            .by_key
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Events (calls, retries, refreshes) of integrations past [`MAX_INTEGRATIONS`].
    pub fn unrecorded(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unrecorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_bucket() {
        let stats = ProxyStats::default();
        stats.record("a", Some(StatusCode::OK), Duration::from_micros(800));
        stats.record("a", Some(StatusCode::OK), Duration::from_millis(3));
        stats.record("a", None, Duration::from_secs(120));
        let snapshot = stats.snapshot();
        let a = &snapshot[0].1;
        assert_eq!(a.buckets[0], 1, "up to 1 ms");
        assert_eq!(a.buckets[2], 1, "up to 5 ms");
        assert_eq!(a.buckets[DURATION_BUCKETS.len()], 1, "above every bound");
        assert_eq!(a.buckets.iter().sum::<u64>(), 3);
        assert_eq!(a.calls[0] + a.calls[2], 3);
    }

    #[test]
    fn integrations_past_the_cap_are_not_counted_apart() {
        let stats = ProxyStats::default();
        for n in 0..MAX_INTEGRATIONS + 5 {
            stats.record(&format!("key-{n}"), None, Duration::ZERO);
        }
        stats.retried("key-0");
        stats.retried("one-more");
        assert_eq!(stats.snapshot().len(), MAX_INTEGRATIONS);
        assert_eq!(stats.unrecorded(), 6);
        let first = stats.snapshot().into_iter().find(|(k, _)| k == "key-0");
        assert_eq!(first.map(|(_, s)| s.retries), Some(1));
    }
}
