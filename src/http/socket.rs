//! The `@nangohq/frontend` WebSocket (`GET /`): a browser waits here for the outcome of the
//! flow it started. Open to anyone (the frontend sends no key), so bounded: sockets are capped
//! in all and per client address ([`SocketGate`]), a browser's `Origin` must be the server's own
//! or one of `GRANTLINE_REDIRECT_ALLOWLIST`, buffers are small, and a socket whose client sends
//! no frame (not even the pong to our ping) for `GRANTLINE_WEBSOCKET_IDLE_TIMEOUT` is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::http::header::ORIGIN;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ApiError;
use crate::oauth::SocketMessage;
use crate::server::{Limit, SocketGate, SocketPass, SocketRefusal};
use crate::state::AppState;

/// How much longer than a session a WebSocket client may wait for its outcome.
const SOCKET_GRACE: Duration = Duration::from_secs(60);
/// The largest message (and frame) a client may send; it has nothing to say.
const MAX_MESSAGE: usize = 16 * 1024;
/// Read and write buffers: the messages are a few hundred bytes.
const BUFFER: usize = 4 * 1024;

/// `GET /` with `Upgrade: websocket`: the `@nangohq/frontend` WebSocket (reference §3.4). The
/// client gets `{"message_type":"connection_ack","ws_client_id":…}`, passes the id to
/// `/oauth/connect`, and receives one `success` or `error` message when that flow ends on this
/// instance; then the socket closes. Without an upgrade, `/` is an unknown route.
#[utoipa::path(
    get,
    path = "/",
    tag = "oauth",
    params(
        ("Upgrade" = String, Header, description = "`websocket`"),
        ("Sec-WebSocket-Version" = String, Header, description = "`13`"),
        ("Sec-WebSocket-Key" = String, Header, description = "The handshake key"),
    ),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol: first \
            `{\"message_type\":\"connection_ack\",\"ws_client_id\":…}`, then one `success` or \
            `error` message when the flow with that `ws_client_id` ends"),
        (status = 404, description = "Not a WebSocket upgrade (`not_found`)",
            body = super::error::ErrorBody),
    ),
    security(()),
)]
pub async fn websocket(
    State(state): State<AppState>,
    State(gate): State<Arc<SocketGate>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return ApiError::UnknownRoute.into_response();
    };
    if let Some(origin) = headers.get(ORIGIN)
        && !allowed_origin(&state, origin.as_bytes())
    {
        gate.stats().refused.add(Limit::WebsocketOrigin);
        return ApiError::ForbiddenOrigin.into_response();
    }
    let pass = match gate.admit(peer.ip()) {
        Ok(pass) => pass,
        Err(SocketRefusal::Full | SocketRefusal::ClientFull) => {
            return ApiError::TooManySockets.into_response();
        }
    };
    upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .max_write_buffer_size(4 * BUFFER)
        .on_upgrade(move |socket| serve_socket(state, gate, pass, socket))
}

/// Whether a browser on `origin` may open the socket: the server's own origin, one
/// `api_redirect_url` may point to, or one of `GRANTLINE_BROWSER_ORIGINS`.
fn allowed_origin(state: &AppState, origin: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let config = &state.config;
    let own = url::Url::parse(&config.server_url)
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_default();
    origin == own
        || config
            .redirect_allowlist
            .iter()
            .any(|allowed| allowed == origin)
        || config.browser_origins.allow(origin)
}

async fn serve_socket(
    state: AppState,
    gate: Arc<SocketGate>,
    pass: SocketPass,
    mut socket: WebSocket,
) {
    // The place is held as long as the socket is served.
    let _pass = pass;
    let (outcomes, mut outcome) = mpsc::channel(1);
    let registration = state.sockets.register(outcomes);
    let ack = SocketMessage::ConnectionAck {
        ws_client_id: &registration.id,
    };
    if socket.send(Message::text(ack.to_text())).await.is_err() {
        return;
    }
    // A flow cannot outlive its session; the socket waits that long and a little more.
    let deadline = tokio::time::sleep(state.config.oauth_session_lifetime + SOCKET_GRACE);
    let closing = state.sockets.closing();
    tokio::pin!(deadline, closing);
    let idle_timeout = gate.socket_idle_timeout();
    let mut pings = tokio::time::interval_at(Instant::now() + idle_timeout / 2, idle_timeout / 2);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            _ = pings.tick() => {
                if heard.elapsed() >= idle_timeout {
                    gate.stats().refused.add(Limit::WebsocketIdle);
                    break;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            message = outcome.recv() => {
                if let Some(message) = message {
                    let _ = socket.send(Message::text(message)).await;
                }
                break;
            }
            incoming = socket.recv() => match incoming {
                // The client says nothing we need; pings are answered by the library, and
                // any frame (a pong included) shows it is there.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => heard = Instant::now(),
            },
            () = &mut deadline => break,
            () = &mut closing => break,
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
