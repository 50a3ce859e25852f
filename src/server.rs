//! The HTTP server: HTTP/1.1 connections (hyper) over tokio, with what a service facing the
//! internet needs around the router:
//!
//! - a cap on open connections: past it a connection gets a bare `503` with `Retry-After` and is
//!   closed, before anything is read;
//! - a header timeout: a request head (or a new connection's first) must arrive whole within it,
//!   or the connection is closed (a client trickling headers holds nothing for long);
//! - an idle timeout: a keep-alive connection that carries nothing for that long is closed
//!   gracefully. Keep it longer than a load balancer's own (60 s on AWS), so that the balancer,
//!   not the server, closes idle connections first;
//! - the request timeout and the early `413` are the router's (see `crate::http`), the caps on
//!   WebSockets the socket endpoint's ([`SocketGate`]).
//!
//! Every refusal is counted in [`ServerStats`], which `/metrics` shows.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::Request;
use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::ended::OnEnd;

mod unparsed;

/// The server's limits (`GRANTLINE_HEADER_TIMEOUT` and the rest; see the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// How long a request head may take to arrive.
    pub header_timeout: Duration,
    /// How long one request may take, its body included.
    pub request_timeout: Duration,
    /// How long a keep-alive connection may carry nothing.
    pub idle_timeout: Duration,
    /// Open connections at most (WebSockets not included: they have their own caps).
    pub max_connections: usize,
    /// Open WebSockets at most.
    pub max_websockets: usize,
    /// Open WebSockets of one client address at most.
    pub max_websockets_per_client: usize,
    /// How long a WebSocket may go without a frame from its client (it is pinged at half this).
    pub websocket_idle_timeout: Duration,
    /// OAuth flows open at once, on all instances.
    pub max_open_flows: usize,
    /// OAuth flows one client address may start per minute.
    pub flows_per_minute: usize,
}

/// What the limits did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub open_connections: AtomicU64,
    /// WebSockets open now.
    pub open_websockets: AtomicU64,
    /// Refusals and closings, by limit.
    pub refused: Refused,
}

/// A limit that refuses or closes something, as `/metrics` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Host,
    HeaderTimeout,
    IdleTimeout,
    RequestTimeout,
    BodyTooLarge,
    Websockets,
    WebsocketsPerClient,
    WebsocketOrigin,
    WebsocketIdle,
    FlowsPerClient,
    OpenFlows,
}

impl Limit {
    /// Every limit, in the order `/metrics` lists them.
    pub const ALL: [Self; 12] = [
        Self::Connections,
        Self::Host,
        Self::HeaderTimeout,
        Self::IdleTimeout,
        Self::RequestTimeout,
        Self::BodyTooLarge,
        Self::Websockets,
        Self::WebsocketsPerClient,
        Self::WebsocketOrigin,
        Self::WebsocketIdle,
        Self::FlowsPerClient,
        Self::OpenFlows,
    ];

    /// Its `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Host => "host",
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::RequestTimeout => "request_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::Websockets => "websockets",
            Self::WebsocketsPerClient => "websockets_per_client",
            Self::WebsocketOrigin => "websocket_origin",
            Self::WebsocketIdle => "websocket_idle",
            Self::FlowsPerClient => "flows_per_client",
            Self::OpenFlows => "open_flows",
        }
    }
}

/// How often each limit refused or closed something.
#[derive(Debug, Default)]
pub struct Refused([AtomicU64; Limit::ALL.len()]);

impl Refused {
    /// Counts one refusal by `limit`.
    pub fn add(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many `limit` refused so far.
    pub fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish its request in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(OpenConnections::default());
    let watchdog = tokio::spawn(watch_connections(open.clone(), limits, stats.clone()));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (mut stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(error.message = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused.add(Limit::Connections);
            connections.spawn(async move {
                let refuse = async {
                    stream.write_all(unparsed::BUSY).await?;
                    stream.shutdown().await?;
                    // What the client sent is read and dropped: closed unread, the socket
                    // would answer with a reset, and the client could lose the 503.
                    let mut sink = [0u8; 1024];
                    while stream.read(&mut sink).await? > 0 {}
                    Ok::<_, io::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), refuse).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, stats, open) = (router.clone(), stats.clone(), open.clone());
        connections.spawn(async move {
            stats.open_connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(stream, peer, router, &open).await;
            stats.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // New connections are refused from now on, not left in the backlog with no answer.
    drop(listener);
    // Every connection finishes its request in flight and closes; the watchdog keeps closing
    // the idle and the trickling meanwhile.
    open.stop();
    while connections.join_next().await.is_some() {}
    watchdog.abort();
}

/// The open connections, for the one task per server that watches their timeouts and tells
/// them to close: a connection's own task polls only its connection (and reads an atomic), with
/// no timer or channel of its own to poll at every wake-up.
#[derive(Debug, Default)]
struct OpenConnections {
    inner: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    connections: HashMap<u64, Arc<Activity>>,
    next: u64,
    stopping: bool,
}

impl OpenConnections {
    /// Watches `activity` until the returned guard is dropped.
    fn register(self: &Arc<Self>, activity: Arc<Activity>) -> Registered {
        let mut open = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if open.stopping {
            activity.tell(Verdict::Finish);
        }
        let id = open.next;
        open.next += 1;
        open.connections.insert(id, activity);
        Registered {
            open: self.clone(),
            id,
        }
    }

    /// Tells every connection, and any registered later, to finish and close.
    fn stop(&self) {
        let mut open = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        open.stopping = true;
        for activity in open.connections.values() {
            activity.tell(Verdict::Finish);
        }
    }

    /// Tells the connections past a timeout to close, counting each once.
    fn check(&self, limits: &ServerLimits, stats: &ServerStats) {
        let open = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for activity in open.connections.values() {
            match activity.overdue(limits) {
                Some(Overdue::Head) if activity.tell(Verdict::Close) => {
                    stats.refused.add(Limit::HeaderTimeout);
                }
                // Counted with the idle connections: a reader that takes nothing is idle too.
                Some(Overdue::Stalled) if activity.tell(Verdict::Close) => {
                    stats.refused.add(Limit::IdleTimeout);
                }
                Some(Overdue::Idle) if activity.tell(Verdict::Finish) => {
                    stats.refused.add(Limit::IdleTimeout);
                }
                _ => {}
            }
        }
    }
}

/// A watched connection; dropping it ends the watch.
struct Registered {
    open: Arc<OpenConnections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self
            .open
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.connections.remove(&self.id);
    }
}

/// Checks the open connections' timeouts a few times per the shortest of them.
async fn watch_connections(
    open: Arc<OpenConnections>,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
) {
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        open.check(&limits, &stats);
    }
}

/// What the watchdog told a connection; only ever raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Verdict {
    Serve = 0,
    /// Finish the request in flight, then close (idle, or the server stops).
    Finish = 1,
    /// Close now (no request head in time).
    Close = 2,
}

/// One connection, watched for the header and idle timeouts by [`watch_connections`].
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    open: &Arc<OpenConnections>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
        replacing: None,
    });
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        // A request is in progress until its answer's body has been handed over whole (or
        // dropped), not only until the router returns: a streamed body can take long.
        let answering = Answering::begin(&requests);
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(axum::body::Body::new)).await;
            let response = response.unwrap_or_else(|never| match never {});
            if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                answering.0.upgraded.store(true, Ordering::Relaxed);
            }
            // Read whole, broken off or dropped: the request is over.
            Ok::<_, Infallible>(response.map(|body| OnEnd::new(body, move |_| drop(answering))))
        }
    });
    // The header timeout is the watchdog's: hyper's own would arm a timer in the runtime's
    // wheel for every request head.
    let connection = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let _watched = open.register(activity.clone());
    let mut finishing = false;
    std::future::poll_fn(|cx| {
        activity.waker.register(cx.waker());
        match activity.verdict() {
            // Dropping the connection closes the socket.
            Verdict::Close => return Poll::Ready(()),
            Verdict::Finish if !finishing => {
                connection.as_mut().graceful_shutdown();
                finishing = true;
            }
            _ => {}
        }
        connection.as_mut().poll(cx).map(drop)
    })
    .await;
}

/// What a connection is doing, in milliseconds since it was accepted.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    /// Requests handed to the router whose answers' bodies are not yet handed over whole.
    busy: AtomicUsize,
    /// Whether everything answered so far has been flushed to the socket (no request begun
    /// since): the next bytes written, if no request begins, can only be hyper's own answer.
    settled: AtomicBool,
    /// Whether the connection was upgraded (a WebSocket): hyper writes nothing any more.
    upgraded: AtomicBool,
    /// When the first byte of a request head not yet handed to the router arrived (0: none;
    /// a new connection counts as waiting for its first head from the start).
    head_since: AtomicU64,
    /// When the connection last finished a request (or was accepted).
    idle_since: AtomicU64,
    /// Since when the socket has taken none of the bytes written to it (0: it takes them).
    write_blocked_since: AtomicU64,
    /// The watchdog's [`Verdict`].
    verdict: AtomicU8,
    /// Wakes the connection's task when the verdict is raised.
    waker: AtomicWaker,
}

/// Which timeout a connection has passed.
#[derive(Debug, PartialEq, Eq)]
enum Overdue {
    Head,
    Idle,
    /// The client has read none of the answer for the idle timeout: it holds the connection
    /// (and the answer's memory) without using it, whatever the requests' state. A client
    /// that reads slowly is not stalled.
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            busy: AtomicUsize::new(0),
            settled: AtomicBool::new(true),
            upgraded: AtomicBool::new(false),
            head_since: AtomicU64::new(1),
            idle_since: AtomicU64::new(1),
            write_blocked_since: AtomicU64::new(0),
            verdict: AtomicU8::new(Verdict::Serve as u8),
            waker: AtomicWaker::new(),
        }
    }

    fn verdict(&self) -> Verdict {
        match self.verdict.load(Ordering::Acquire) {
            0 => Verdict::Serve,
            1 => Verdict::Finish,
            _ => Verdict::Close,
        }
    }

    /// Raises the verdict to `verdict` and wakes the connection; whether it was lower.
    fn tell(&self, verdict: Verdict) -> bool {
        let raised = self.verdict.fetch_max(verdict as u8, Ordering::AcqRel) < verdict as u8;
        if raised {
            self.waker.wake();
        }
        raised
    }

    /// Now, never 0.
    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn read(&self) {
        if self.busy.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Whether hyper may be writing an answer of its own: no request in progress, everything
    /// answered flushed, not upgraded.
    fn hyper_may_answer(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
            && self.settled.load(Ordering::Acquire)
            && !self.upgraded.load(Ordering::Relaxed)
    }

    /// hyper flushed its buffer to the socket.
    fn flushed(&self) {
        if self.busy.load(Ordering::Acquire) == 0 {
            self.settled.store(true, Ordering::Release);
        }
    }

    fn begin(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.settled.store(false, Ordering::Release);
        self.head_since.store(0, Ordering::Relaxed);
    }

    fn end(&self) {
        self.idle_since.store(self.now(), Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// Notes how a write went: blocked (the socket's buffer is full) or through.
    fn wrote<T>(&self, polled: &Poll<io::Result<T>>) {
        if polled.is_pending() {
            if self.write_blocked_since.load(Ordering::Relaxed) == 0 {
                self.write_blocked_since
                    .store(self.now(), Ordering::Relaxed);
            }
        } else {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
    }

    fn overdue(&self, limits: &ServerLimits) -> Option<Overdue> {
        let now = self.now();
        let passed = |since: u64, limit: Duration| {
            since != 0 && u128::from(now.saturating_sub(since)) >= limit.as_millis()
        };
        if passed(
            self.write_blocked_since.load(Ordering::Relaxed),
            limits.idle_timeout,
        ) {
            return Some(Overdue::Stalled);
        }
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        if passed(
            self.head_since.load(Ordering::Relaxed),
            limits.header_timeout,
        ) {
            Some(Overdue::Head)
        } else if self.head_since.load(Ordering::Relaxed) == 0
            && passed(self.idle_since.load(Ordering::Relaxed), limits.idle_timeout)
        {
            Some(Overdue::Idle)
        } else {
            None
        }
    }
}

pin_project_lite::pin_project! {
    /// A socket that reports reads and writes to its connection's [`Activity`], and puts a
    /// JSON answer in place of hyper's bodiless one to a request it cannot parse.
    struct Watched {
        #[pin]
        inner: TcpStream,
        activity: Arc<Activity>,
        // The answer written in place of hyper's, and how much of it is out.
        replacing: Option<(Vec<u8>, usize)>,
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl Watched {
    /// Writes what is left of the answer put in place of hyper's.
    fn poll_replacement(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while let Some((answer, sent)) = this.replacing.as_mut() {
            if *sent == answer.len() {
                *this.replacing = None;
                break;
            }
            let polled = this.inner.as_mut().poll_write(cx, &answer[*sent..]);
            this.activity.wrote(&polled);
            match std::task::ready!(polled) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.as_mut().poll_replacement(cx))?;
        // hyper's own answer is written alone, after everything answered before was flushed.
        if self.activity.hyper_may_answer()
            && let Some(answer) = unparsed::hyper_answer(buf)
        {
            *self.as_mut().project().replacing = Some((answer, 0));
            // Taken: what is left of it goes out on the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        this.activity.wrote(&polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_replacement(cx))?;
        let this = self.project();
        // hyper flushes the socket only once its own buffer is empty.
        let flushed = std::task::ready!(this.inner.poll_flush(cx));
        if flushed.is_ok() {
            this.activity.flushed();
        }
        Poll::Ready(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_replacement(cx))?;
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_some() || self.activity.hyper_may_answer() {
            // Rare (nothing is being answered): one slice at a time, looked at in poll_write.
            let first = bufs.iter().find(|buf| !buf.is_empty());
            return self.poll_write(cx, first.map_or(&[][..], |buf| &**buf));
        }
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        this.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request in progress on its connection's [`Activity`], until dropped.
struct Answering(Arc<Activity>);

impl Answering {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.begin();
        Self(activity.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Admits WebSockets up to the total and per-client caps; each admitted socket holds a
/// [`SocketPass`] until it closes.
#[derive(Debug)]
pub struct SocketGate {
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a WebSocket was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRefusal {
    /// The server holds as many as it may.
    Full,
    /// This client holds as many as it may.
    ClientFull,
}

impl SocketGate {
    pub fn new(limits: ServerLimits, stats: Arc<ServerStats>) -> Self {
        Self {
            limits,
            stats,
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// How long a socket may go without a frame from its client.
    pub fn socket_idle_timeout(&self) -> Duration {
        self.limits.websocket_idle_timeout
    }

    /// What the limits did.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// A pass for one more socket of `client` (counted by [`client_key`]), or why not (counted).
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<SocketPass, SocketRefusal> {
        let client = client_key(client);
        let mut per_client = self
            .per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let open = self.stats.open_websockets.load(Ordering::Relaxed);
        if open >= self.limits.max_websockets as u64 {
            self.stats.refused.add(Limit::Websockets);
            return Err(SocketRefusal::Full);
        }
        let of_client = per_client.entry(client).or_insert(0);
        if *of_client >= self.limits.max_websockets_per_client {
            self.stats.refused.add(Limit::WebsocketsPerClient);
            return Err(SocketRefusal::ClientFull);
        }
        *of_client += 1;
        self.stats.open_websockets.fetch_add(1, Ordering::Relaxed);
        Ok(SocketPass {
            gate: self.clone(),
            client,
        })
    }
}

/// The client a per-client limit counts `address` as: an IPv4 address itself (also when it
/// arrives IPv4-mapped), an IPv6 address by its /64, the block one subscriber is usually given
/// whole, and can pick any of 2^64 addresses from.
pub fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One admitted WebSocket; dropping it frees its place.
#[derive(Debug)]
pub struct SocketPass {
    gate: Arc<SocketGate>,
    client: IpAddr,
}

impl Drop for SocketPass {
    fn drop(&mut self) {
        let mut per_client = self
            .gate
            .per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = per_client.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                per_client.remove(&self.client);
            }
        }
        self.gate
            .stats
            .open_websockets
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10,
            max_websockets: 3,
            max_websockets_per_client: 2,
            websocket_idle_timeout: Duration::from_secs(60),
            max_open_flows: 100,
            flows_per_minute: 60,
        }
    }

    #[test]
    fn the_gate_caps_sockets_in_all_and_per_client_and_frees_places_on_drop() {
        let gate = Arc::new(SocketGate::new(limits(), Arc::default()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), SocketRefusal::ClientFull);
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), SocketRefusal::Full);
        drop(a1);
        let _b2 = gate.admit(b).unwrap();
        let stats = gate.stats();
        assert_eq!(stats.open_websockets.load(Ordering::Relaxed), 3);
        assert_eq!(stats.refused.get(Limit::Websockets), 1);
        assert_eq!(stats.refused.get(Limit::WebsocketsPerClient), 1);
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_one_as_ipv4() {
        let gate = Arc::new(SocketGate::new(limits(), Arc::default()));
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _first = gate.admit(one).unwrap();
        let _second = gate.admit(same_64).unwrap();
        assert_eq!(gate.admit(one).unwrap_err(), SocketRefusal::ClientFull);
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(gate.admit(other_64).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_watchdog_tells_overdue_connections_once_and_every_connection_when_stopping() {
        let open = Arc::new(OpenConnections::default());
        let stats = ServerStats::default();
        let mut limits = limits();
        let (late, busy) = (Arc::new(Activity::new()), Arc::new(Activity::new()));
        let watched = open.register(late.clone());
        let _busy = open.register(busy.clone());
        busy.begin();
        limits.header_timeout = Duration::ZERO;
        open.check(&limits, &stats);
        open.check(&limits, &stats);
        assert_eq!(late.verdict(), Verdict::Close);
        assert_eq!(
            busy.verdict(),
            Verdict::Serve,
            "a request in flight is never overdue"
        );
        assert_eq!(stats.refused.get(Limit::HeaderTimeout), 1, "counted once");
        drop(watched);
        open.stop();
        assert_eq!(busy.verdict(), Verdict::Finish);
        let newcomer = Arc::new(Activity::new());
        let _newcomer = open.register(newcomer.clone());
        assert_eq!(
            newcomer.verdict(),
            Verdict::Finish,
            "registered after the stop"
        );
        assert_eq!(open.inner.lock().unwrap().connections.len(), 2);
    }

    #[test]
    fn a_connection_is_overdue_for_its_head_or_its_idleness_only_between_requests() {
        let activity = Activity::new();
        let mut limits = limits();
        limits.header_timeout = Duration::ZERO;
        // A new connection waits for its first head.
        assert_eq!(activity.overdue(&limits), Some(Overdue::Head));
        activity.begin();
        assert_eq!(
            activity.overdue(&limits),
            None,
            "a request in flight is never overdue"
        );
        activity.end();
        limits.idle_timeout = Duration::ZERO;
        assert_eq!(activity.overdue(&limits), Some(Overdue::Idle));
        activity.read();
        assert_eq!(activity.overdue(&limits), Some(Overdue::Head));
    }

    #[test]
    fn a_client_that_takes_none_of_the_answer_is_stalled_even_mid_request() {
        let activity = Activity::new();
        let mut limits = limits();
        activity.begin();
        activity.wrote(&Poll::<io::Result<usize>>::Pending);
        assert_eq!(activity.overdue(&limits), None, "within the idle timeout");
        limits.idle_timeout = Duration::ZERO;
        assert_eq!(activity.overdue(&limits), Some(Overdue::Stalled));
        // Bytes taken, however slowly, start the count again.
        activity.wrote(&Poll::Ready(Ok(1)));
        assert_eq!(activity.overdue(&limits), None);
    }
}
