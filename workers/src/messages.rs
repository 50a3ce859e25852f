//! Following what instances tell each other ([`Backend::publish`]): the WebSocket relay and the
//! webhooks' "retry now" share one channel, each skipping the other's messages.

use std::future::Future;

use domain::store::Backend;
use tokio::sync::broadcast::error::RecvError;

/// What the channel gave a follower.
pub enum Message<'a> {
    /// A payload published by some instance (this one included).
    Received(&'a str),
    /// This many messages were lost: the follower fell behind the channel.
    Missed(u64),
}

/// Hands `handle` every message published from now on, until `shutdown` completes or the channel
/// closes.
pub async fn follow(
    backend: &Backend,
    shutdown: impl Future<Output = ()>,
    mut handle: impl FnMut(Message<'_>),
) {
    let mut messages = backend.messages();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            received = messages.recv() => match received {
                Ok(payload) => handle(Message::Received(&payload)),
                Err(RecvError::Lagged(missed)) => handle(Message::Missed(missed)),
                Err(RecvError::Closed) => return,
            },
        }
    }
}
