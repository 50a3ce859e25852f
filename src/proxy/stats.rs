//! What the proxy counts per integration, for `/metrics`: calls by status class, time spent,
//! retries and refreshes after a 401. Never a header, token or body.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

/// One integration's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntegrationStats {
    /// Calls answered by the provider, by status class (1xx … 5xx), and calls that got no
    /// answer (index 0: unreachable, timed out, refused before sending).
    pub calls: [u64; 6],
    pub micros: u64,
    pub retries: u64,
    /// 401s that led to a fenced refresh and a second attempt.
    pub rejected: u64,
}

/// The proxy's counters, by integration key.
#[derive(Debug, Default)]
pub struct ProxyStats(Mutex<BTreeMap<String, IntegrationStats>>);

impl ProxyStats {
    fn with(&self, key: &str, f: impl FnOnce(&mut IntegrationStats)) {
        let mut stats = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match stats.get_mut(key) {
            Some(entry) => f(entry),
            None => f(stats.entry(key.to_owned()).or_default()),
        }
    }

    /// A finished call: its status (`None`: no answer) and how long it took.
    pub fn record(&self, key: &str, status: Option<StatusCode>, took: Duration) {
        let class = status.map_or(0, |s| usize::from(s.as_u16() / 100).min(5));
        self.with(key, |s| {
            s.calls[class] += 1;
            s.micros += u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        });
    }

    pub fn retried(&self, key: &str) {
        self.with(key, |s| s.retries += 1);
    }

    pub fn rejected(&self, key: &str) {
        self.with(key, |s| s.rejected += 1);
    }

    /// Every integration's counters, by key.
    pub fn snapshot(&self) -> Vec<(String, IntegrationStats)> {
        let stats = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stats.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
