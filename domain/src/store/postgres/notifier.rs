//! LISTEN/NOTIFY on one connection of its own: this instance's commits announced (coalesced)
//! and every instance's announced here, and short messages relayed between instances
//! ([`PostgresStore::publish`], [`PostgresStore::messages`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::AsyncMessage;

use super::drivers::{GOODBYE_LIMIT, Running};
use super::tls::Target;
use super::{PostgresStore, db_error};
use crate::store::StoreError;

/// The channel commits are announced on.
const CHANNEL: &str = "grantline_events";
/// The channel instances send each other messages on.
const MESSAGE_CHANNEL: &str = "grantline_messages";
/// The shortest time between two NOTIFYs of one instance.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

impl PostgresStore {
    /// Sends `payload` (under 8000 bytes; never a secret: anyone who can LISTEN sees it) to every
    /// instance on this database, this one included, through [`PostgresStore::messages`].
    /// Best effort: an instance whose notifier is reconnecting misses it.
    pub async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&MESSAGE_CHANNEL, &payload])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// The messages instances [`PostgresStore::publish`] from now on.
    pub fn messages(&self) -> broadcast::Receiver<String> {
        self.inner.messages.subscribe()
    }
}

/// Owns one connection that LISTENs for commits of any instance and sends this instance's
/// NOTIFYs, coalesced: many appends while one NOTIFY is in flight cost one more NOTIFY.
pub(super) async fn run(
    target: Target,
    changes: watch::Sender<u64>,
    kick: Arc<Notify>,
    relay: broadcast::Sender<String>,
    (mut closing, _running): (watch::Receiver<bool>, Running),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if changes.is_closed() || *closing.borrow() {
            return;
        }
        match target.config.connect(target.tls.clone()).await {
            Ok((client, mut connection)) => {
                let forward = changes.clone();
                let relay = relay.clone();
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut driver = tokio::spawn(async move {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) if n.channel() == MESSAGE_CHANNEL => {
                                // No local subscriber is not an error.
                                let _ = relay.send(n.payload().to_owned());
                            }
                            Ok(AsyncMessage::Notification(_)) => {
                                forward.send_modify(|n| *n = n.wrapping_add(1));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error.message = %e, "store.notifier connection lost");
                                return;
                            }
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {MESSAGE_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    // A reconnect may have missed notifications: wake the readers to poll.
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                    loop {
                        tokio::select! {
                            () = kick.notified() => {
                                if client.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await.is_err() {
                                    break;
                                }
                                // Each NOTIFY is a transaction with an xid: cap them, since
                                // readers only need to know that something changed.
                                tokio::time::sleep(NOTIFY_INTERVAL).await;
                            }
                            _ = &mut driver => break,
                            // The store dropped or closed: with its client dropped, the
                            // connection sends Terminate.
                            () = async {
                                tokio::select! {
                                    () = changes.closed() => {}
                                    () = closed(&mut closing) => {}
                                }
                            } => {
                                drop(client);
                                let _ = tokio::time::timeout(GOODBYE_LIMIT, &mut driver).await;
                                driver.abort();
                                return;
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error.message = %e, "store.notifier cannot connect"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = changes.closed() => return,
            () = closed(&mut closing) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Until the store closes.
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}
