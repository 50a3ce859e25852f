//! The WebSocket clients of this instance that wait for an OAuth flow's outcome (the
//! `@nangohq/frontend` protocol, reference §3.4), and the relay that carries outcomes between
//! instances.
//!
//! A client is registered under a fresh random `ws_client_id` when its socket opens and
//! unregistered when the socket's [`SocketRegistration`] is dropped; the registry holds only the
//! sending halves of the sockets' channels, never a socket. A client's socket and its flow's
//! callback may be served by different instances, so:
//! - [`Sockets::deliver`] hands a message to the client when this instance holds it, and else
//!   publishes it to every instance on the database ([`Backend::publish`]);
//! - [`run`] follows what instances publish ([`Backend::messages`]) and delivers the messages meant
//!   for this instance's clients ([`Sockets::relay_once`]); the others are dropped.
//!
//! Delivery is best effort, like the channel under it: a message published while an instance
//! reconnects is lost, and that client sees its socket time out. Messages carry ids and error
//! types, never a secret.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use domain::store::Backend;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::messages::Message;

/// The WebSocket clients of this instance, by `ws_client_id`.
#[derive(Debug)]
pub struct Sockets {
    clients: Mutex<HashMap<String, mpsc::Sender<String>>>,
    /// Set once the service stops: upgraded connections are not part of the graceful shutdown.
    closing: watch::Sender<bool>,
}

impl Default for Sockets {
    fn default() -> Self {
        Self {
            clients: Mutex::default(),
            closing: watch::Sender::new(false),
        }
    }
}

/// A registered WebSocket client; dropping it unregisters the client.
#[derive(Debug)]
pub struct SocketRegistration<'a> {
    sockets: &'a Sockets,
    /// The `ws_client_id` the client was given.
    pub id: String,
}

impl Drop for SocketRegistration<'_> {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.sockets.clients.lock() {
            clients.remove(&self.id);
        }
    }
}

/// A message on its way to a WebSocket client, as instances relay it to each other.
#[derive(Debug, Serialize, Deserialize)]
struct Relayed {
    ws_client_id: String,
    message: String,
}

impl Sockets {
    /// Registers a new client under a fresh random id; its messages arrive on `messages`.
    pub fn register(&self, messages: mpsc::Sender<String>) -> SocketRegistration<'_> {
        let id = Uuid::new_v4().to_string();
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(id.clone(), messages);
        }
        SocketRegistration { sockets: self, id }
    }

    /// Resolves once [`Sockets::close_all`] was called.
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }

    /// Tells every socket to close (the service is stopping).
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Sends `message` to the client `ws_client_id`: to its socket when this instance holds it,
    /// else to every instance through `backend`, for the one that holds it.
    pub async fn deliver(&self, backend: &Backend, ws_client_id: &str, message: String) {
        let Err(message) = self.send(ws_client_id, message) else {
            return;
        };
        let relayed = Relayed {
            ws_client_id: ws_client_id.to_owned(),
            message,
        };
        let payload = match serde_json::to_string(&relayed) {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(error.message = %e, "oauth.relay cannot encode an outcome");
                return;
            }
        };
        if let Err(e) = backend.publish(&payload).await {
            tracing::warn!(error.message = %e, "oauth.relay cannot reach the other instances");
        }
    }

    /// Delivers a message another instance relayed, if its client is on this instance; whether
    /// it was. Payloads that are not relayed messages are skipped: other kinds of message may
    /// share the channel.
    pub fn relay_once(&self, payload: &str) -> bool {
        match serde_json::from_str::<Relayed>(payload) {
            Ok(relayed) => self.send(&relayed.ws_client_id, relayed.message).is_ok(),
            Err(_) => false,
        }
    }

    /// Sends `message` to the client `id` of this instance; gives it back when the client is
    /// not here (or cannot take it).
    fn send(&self, id: &str, message: String) -> Result<(), String> {
        let sender = self
            .clients
            .lock()
            .ok()
            .and_then(|clients| clients.get(id).cloned());
        match sender {
            Some(sender) => sender.try_send(message).map_err(|e| match e {
                mpsc::error::TrySendError::Full(message)
                | mpsc::error::TrySendError::Closed(message) => message,
            }),
            None => Err(message),
        }
    }
}

/// Delivers the messages other instances relay to this instance's WebSocket clients, until
/// `shutdown`.
pub async fn run(sockets: Arc<Sockets>, backend: Backend, shutdown: impl Future<Output = ()>) {
    crate::messages::follow(&backend, shutdown, |message| match message {
        Message::Received(payload) => {
            sockets.relay_once(payload);
        }
        Message::Missed(missed) => {
            tracing::warn!(missed, "oauth.relay fell behind; outcomes were lost");
        }
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_message_reaches_its_client_and_no_other() {
        let sockets = Sockets::default();
        let (sender, mut received) = mpsc::channel(1);
        let registration = sockets.register(sender);
        let payload = serde_json::to_string(&Relayed {
            ws_client_id: registration.id.clone(),
            message: "outcome".into(),
        })
        .unwrap();
        assert!(sockets.relay_once(&payload));
        assert_eq!(received.try_recv().unwrap(), "outcome");

        let elsewhere = r#"{"ws_client_id":"on-another-instance","message":"x"}"#;
        assert!(!sockets.relay_once(elsewhere));
        assert!(!sockets.relay_once("not a relayed message"));
        drop(registration);
        assert!(!sockets.relay_once(&payload), "dropping unregisters");
    }
}
