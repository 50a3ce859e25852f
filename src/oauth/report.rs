//! A flow's outcome and where it goes: [`Report`] is what is known of the flow when it ends (its
//! allow-listed `api_redirect_url`, its `ws_client_id`), and [`report_success`] /
//! [`report_failure`] tell the flow's WebSocket client, on whichever instance holds its socket
//! ([`workers::sockets`]), in the messages of the `@nangohq/frontend` protocol
//! ([`SocketMessage`], reference §3.4). Messages carry ids and error types, never a secret.

use domain::connection::ConnectionKey;
use serde::Serialize;
use url::Url;

use super::FlowError;
use crate::state::AppState;

/// Where a flow's outcome goes: what is known of the flow when it ends.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub provider_config_key: Option<String>,
    pub connection_id: Option<String>,
    /// An allow-listed `api_redirect_url`.
    pub api_redirect_url: Option<Url>,
    pub ws_client_id: Option<String>,
}

/// A failed flow and where to report it.
#[derive(Debug)]
pub struct Failure {
    pub error: FlowError,
    pub report: Report,
}

/// A flow that recorded its connection.
#[derive(Debug)]
pub struct Completed {
    pub connection: ConnectionKey,
    pub report: Report,
}

/// A message of the WebSocket protocol (reference §3.4).
#[derive(Debug, Serialize)]
#[serde(tag = "message_type", rename_all = "snake_case")]
pub enum SocketMessage<'a> {
    /// The first message on a new socket: the id to pass to `/oauth/connect`.
    ConnectionAck { ws_client_id: &'a str },
    /// The flow recorded its connection.
    Success {
        provider_config_key: &'a str,
        connection_id: &'a str,
    },
    /// The flow failed.
    Error {
        provider_config_key: Option<&'a str>,
        connection_id: Option<&'a str>,
        error_type: &'static str,
        error_desc: String,
    },
}

impl SocketMessage<'_> {
    /// The message as the socket sends it.
    pub fn to_text(&self) -> String {
        // Strings and options of strings always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Tells the flow's WebSocket client, if it has one, that the flow succeeded.
pub async fn report_success(state: &AppState, done: &Completed) {
    tell(state, &done.report, || SocketMessage::Success {
        provider_config_key: done.connection.provider_config_key(),
        connection_id: done.connection.connection_id(),
    })
    .await;
}

/// Tells the flow's WebSocket client, if it has one, that the flow failed.
pub async fn report_failure(state: &AppState, failure: &Failure) {
    let report = &failure.report;
    tell(state, report, || SocketMessage::Error {
        provider_config_key: report.provider_config_key.as_deref(),
        connection_id: report.connection_id.as_deref(),
        error_type: failure.error.error_type(),
        error_desc: failure.error.to_string(),
    })
    .await;
}

/// Sends the flow's WebSocket client, if it has one, the `message`.
async fn tell<'a>(state: &AppState, report: &Report, message: impl FnOnce() -> SocketMessage<'a>) {
    if let Some(ws_client_id) = &report.ws_client_id {
        let text = message().to_text();
        state
            .sockets
            .deliver(&state.backend, ws_client_id, text)
            .await;
    }
}
