//! What operators see of each request: a request id, a tracing span, a latency histogram.
//!
//! [`ObserveLayer`] wraps every route (and the fallbacks). For each request it
//! - takes the incoming `x-request-id` when it is sane (1 to 64 characters out of letters, digits
//!   and `-_.:/+=@`), else makes one: a random per-process prefix and a counter
//!   (`3f9a1c2b-1a`), no system call; the id is echoed in the `x-request-id` response header;
//! - handles the request as part of a [`RequestLog`] (`request_id`, `method`, `route`), so every
//!   line logged while handling it, at any level, lists it as its outermost span,
//!   `http.request` (see [`domain::log_scope`] for why this is not a `tracing` span).
//!   `route` is the route template (`/connection/{connection_id}`), never the raw path or query
//!   (the OAuth callback's query holds the authorization code);
//! - logs one line when the answer is ready, at DEBUG (at INFO, production logs would be one
//!   line per request), at ERROR for a 5xx;
//! - counts the latency (until the response head is ready) in a histogram keyed by route
//!   template, method and status; requests that match no route count under `unmatched`.
//!
//! The hot path takes no lock and allocates nothing for labels: each layered route remembers
//! its [`RouteSeries`] after its first request, and a series keeps its `(method, status)`
//! histograms in a fixed array of slots claimed with one compare-and-swap. A route with more
//! than [`SLOTS`] distinct `(method, status)` pairs counts the excess in
//! `grantline_http_requests_unrecorded_total` instead.

use std::borrow::Cow;
use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::Response;
use domain::log_scope::{self, RequestLog};
use tower::{Layer, Service};

/// The request id header, read and echoed.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming request id that is kept.
const MAX_REQUEST_ID: usize = 64;

/// Upper bounds of the latency buckets: nanoseconds, and the `le` label (seconds).
const BUCKETS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

/// The method labels; anything else counts as `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];

/// `(method, status)` histograms one route keeps.
const SLOTS: usize = 32;

/// The route label of requests that matched no route.
const UNMATCHED: &str = "unmatched";

const HISTOGRAM: &str = "grantline_http_request_duration_seconds";

/// One latency histogram. Buckets are not cumulative here; the rendering sums them, so `_count`
/// always equals the `+Inf` bucket.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKETS
            .iter()
            .position(|(bound, _)| nanos <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// A slot for one `(method, status)` histogram: `key` 0 is free, else `method << 16 | status`.
#[derive(Default)]
struct Slot {
    key: AtomicU32,
    histogram: OnceLock<Box<Histogram>>,
}

/// The histograms of one route template.
pub struct RouteSeries {
    route: Arc<str>,
    slots: [Slot; SLOTS],
}

impl RouteSeries {
    fn new(route: &str) -> Self {
        Self {
            route: route.into(),
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }

    /// The histogram of `(method, status)`, claiming a slot on first use; `None` when full.
    fn histogram(&self, method: usize, status: u16) -> Option<&Histogram> {
        // A status is at least 100, so a key is never 0.
        let key = (u32::try_from(method).unwrap_or(7) << 16) | u32::from(status);
        for slot in &self.slots {
            let mut current = slot.key.load(Ordering::Acquire);
            if current == 0 {
                current =
                    match slot
                        .key
                        .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => key,
                        Err(actual) => actual,
                    };
            }
            if current == key {
                return Some(slot.histogram.get_or_init(Box::default));
            }
        }
        None
    }
}

/// The request ids and latency histograms of one service instance.
pub struct RequestObserver {
    /// Every route series created; locked only the first time a layered route sees a request.
    routes: Mutex<Vec<Arc<RouteSeries>>>,
    /// Hex digits that start every generated request id of this process.
    prefix: [u8; 8],
    next_id: AtomicU64,
    unrecorded: AtomicU64,
}

impl std::fmt::Debug for RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestObserver").finish_non_exhaustive()
    }
}

impl Default for RequestObserver {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestObserver {
    pub fn new() -> Self {
        let random = uuid::Uuid::new_v4();
        let mut prefix = [0u8; 8];
        // Four random bytes always fit eight hex digits.
        let _ = hex::encode_to_slice(&random.as_bytes()[..4], &mut prefix);
        Self {
            routes: Mutex::new(Vec::new()),
            prefix,
            next_id: AtomicU64::new(1),
            unrecorded: AtomicU64::new(0),
        }
    }

    /// The layer that observes every request of a router.
    pub fn layer(self: &Arc<Self>) -> ObserveLayer {
        ObserveLayer {
            observer: self.clone(),
        }
    }

    /// The series of `route`, created on first use.
    fn series(&self, route: &str) -> Arc<RouteSeries> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = routes.iter().find(|s| *s.route == *route) {
            return series.clone();
        }
        let series = Arc::new(RouteSeries::new(route));
        routes.push(series.clone());
        series
    }

    /// The incoming id when it is sane, else a new one.
    fn request_id(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        if let Some(value) = incoming
            && is_sane_request_id(value.as_bytes())
        {
            return value.clone();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 8 + 1 + 16];
        id[..8].copy_from_slice(&self.prefix);
        id[8] = b'-';
        // The counter in hex: at most 16 digits, so the write always fits.
        let mut digits = &mut id[9..];
        let _ = std::io::Write::write_fmt(&mut digits, format_args!("{n:x}"));
        let end = 9 + 16 - digits.len();
        // Hex digits and '-' are always a valid header value.
        HeaderValue::from_bytes(&id[..end]).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    /// Writes the latency histograms in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {HISTOGRAM} HTTP request latency until the response head, by route template, \
             method and status."
        );
        let _ = writeln!(out, "# TYPE {HISTOGRAM} histogram");
        let mut routes: Vec<Arc<RouteSeries>> = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        routes.sort_by(|a, b| a.route.cmp(&b.route));
        for series in routes {
            let mut used: Vec<(u32, &Histogram)> = series
                .slots
                .iter()
                .filter_map(|slot| {
                    let key = slot.key.load(Ordering::Acquire);
                    Some((key, &**slot.histogram.get()?))
                })
                .collect();
            used.sort_by_key(|(key, _)| *key);
            let route = escape_label(&series.route);
            for (key, histogram) in used {
                let method = METHODS[((key >> 16) as usize).min(METHODS.len() - 1)];
                let status = key & 0xffff;
                let labels = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
                let mut cumulative = 0u64;
                for (i, (_, le)) in BUCKETS.iter().enumerate() {
                    cumulative += histogram.buckets[i].load(Ordering::Relaxed);
                    let _ = writeln!(
                        out,
                        "{HISTOGRAM}_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                    );
                }
                cumulative += histogram.buckets[BUCKETS.len()].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{HISTOGRAM}_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
                );
                let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(out, "{HISTOGRAM}_sum{{{labels}}} {sum}");
                let _ = writeln!(out, "{HISTOGRAM}_count{{{labels}}} {cumulative}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP grantline_http_requests_unrecorded_total Requests not in the latency \
             histogram because their route had too many method and status pairs."
        );
        let _ = writeln!(
            out,
            "# TYPE grantline_http_requests_unrecorded_total counter"
        );
        let _ = writeln!(
            out,
            "grantline_http_requests_unrecorded_total {}",
            self.unrecorded.load(Ordering::Relaxed)
        );
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn is_sane_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Observes every request of the router it is applied to (see the module docs).
#[derive(Clone)]
pub struct ObserveLayer {
    observer: Arc<RequestObserver>,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            observer: self.observer.clone(),
            route: Arc::new(OnceLock::new()),
        }
    }
}

/// One observed route (axum applies a router's layer to each route separately).
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    observer: Arc<RequestObserver>,
    /// The series of the route this service wraps, found on its first request.
    route: Arc<OnceLock<Arc<RouteSeries>>>,
}

impl<S> Observed<S> {
    fn series(&self, route: &str) -> Arc<RouteSeries> {
        let known = self.route.get_or_init(|| self.observer.series(route));
        if *known.route == *route {
            known.clone()
        } else {
            // Not expected (one service per route), but then the right series all the same.
            self.observer.series(route)
        }
    }
}

impl<S> Service<Request> for Observed<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED, MatchedPath::as_str);
        let series = self.series(route);
        let id = self.observer.request_id(request.headers().get(&REQUEST_ID));
        let method = request.method();
        let log = Arc::new(RequestLog {
            // A request id is ASCII (checked, or made here).
            request_id: id.to_str().unwrap_or_default().into(),
            method: match METHODS[method_index(method)] {
                "other" => Cow::Owned(method.as_str().to_owned()),
                known => Cow::Borrowed(known),
            },
            route: series.route.clone(),
        });
        let method = method_index(method);
        let inner = log_scope::within(&log, || self.inner.call(request));
        ObservedFuture {
            inner,
            log,
            started,
            series,
            method,
            id: Some(id),
            observer: self.observer.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of an [`Observed`] route: records the latency and adds the request id.
    pub struct ObservedFuture<F> {
        #[pin]
        inner: F,
        log: Arc<RequestLog>,
        started: Instant,
        series: Arc<RouteSeries>,
        method: usize,
        id: Option<HeaderValue>,
        observer: Arc<RequestObserver>,
    }
}

impl<F, E> Future for ObservedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        log_scope::within(this.log, || {
            let mut response = match this.inner.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(response)) => response,
            };
            let elapsed = this.started.elapsed();
            let status = response.status();
            match this.series.histogram(*this.method, status.as_u16()) {
                Some(histogram) => histogram.record(elapsed),
                None => {
                    this.observer.unrecorded.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(id) = this.id.take() {
                response.headers_mut().insert(REQUEST_ID, id);
            }
            let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
            if status.is_server_error() {
                tracing::error!(status = status.as_u16(), elapsed_ms, "request finished");
            } else {
                tracing::debug!(status = status.as_u16(), elapsed_ms, "request finished");
            }
            Poll::Ready(Ok(response))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn generated_request_ids_are_unique_and_sane() {
        let observer = RequestObserver::new();
        let a = observer.request_id(None);
        let b = observer.request_id(None);
        assert_ne!(a, b);
        assert!(is_sane_request_id(a.as_bytes()));
        assert_eq!(a.len(), "01234567-1".len());
    }

    #[test]
    fn a_sane_incoming_id_is_kept_and_others_replaced() {
        let observer = RequestObserver::new();
        let sane = HeaderValue::from_static("client-42:abc");
        assert_eq!(observer.request_id(Some(&sane)), sane);
        for bad in ["has space", "quote\"", "", &"x".repeat(65)] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert_ne!(observer.request_id(Some(&value)), value, "{bad:?}");
        }
    }

    #[test]
    fn a_full_series_reports_none_and_existing_pairs_keep_working() {
        let series = RouteSeries::new("/x");
        for status in 0..SLOTS {
            assert!(series.histogram(0, 200 + status as u16).is_some());
        }
        assert!(series.histogram(1, 200).is_none());
        assert!(series.histogram(0, 200).is_some());
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches() {
        let observer = RequestObserver::new();
        let series = observer.series("/r/{id}");
        let histogram = series.histogram(0, 200).unwrap();
        histogram.record(Duration::from_micros(100));
        histogram.record(Duration::from_millis(3));
        histogram.record(Duration::from_secs(20));
        let mut out = String::new();
        observer.render(&mut out);
        let labels = "route=\"/r/{id}\",method=\"GET\",status=\"200\"";
        for line in [
            format!("{HISTOGRAM}_bucket{{{labels},le=\"0.0005\"}} 1"),
            format!("{HISTOGRAM}_bucket{{{labels},le=\"0.0025\"}} 1"),
            format!("{HISTOGRAM}_bucket{{{labels},le=\"0.005\"}} 2"),
            format!("{HISTOGRAM}_bucket{{{labels},le=\"10\"}} 2"),
            format!("{HISTOGRAM}_bucket{{{labels},le=\"+Inf\"}} 3"),
            format!("{HISTOGRAM}_count{{{labels}}} 3"),
        ] {
            assert!(out.contains(&line), "{line} not in {out}");
        }
    }
}
