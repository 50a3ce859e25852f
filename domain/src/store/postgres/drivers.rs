//! The tasks that drive this store's connections, closed with a goodbye.
//!
//! deadpool aborts a connection's task when it drops the connection (a failed check, an error,
//! the pool closing), and a process that exits drops the rest: PostgreSQL then logs "could not
//! receive data from client: Connection reset by peer" for each one, at every deploy. Here the
//! task deadpool holds only stands in for the driver: its end tells the driver that the client
//! is gone, and the driver then ends the session properly (a Terminate message, a TLS
//! close_notify) within [`GOODBYE_LIMIT`]. [`Drivers::all_closed`] waits for a store's drivers
//! when it closes, [`sessions_ended`] for every store's at the end of the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_postgres::Connect;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, Error};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long a connection whose client is gone may take to say goodbye.
pub(super) const GOODBYE_LIMIT: Duration = Duration::from_secs(2);

/// The connection tasks still running.
#[derive(Debug, Default)]
pub(super) struct Drivers {
    live: AtomicUsize,
    gone: Notify,
}

/// Every store's connection tasks, for the end of the process: [`sessions_ended`].
static EVERY: Drivers = Drivers {
    live: AtomicUsize::new(0),
    gone: Notify::const_new(),
};

/// Counts one running task in its store's [`Drivers`] and in [`EVERY`] until dropped.
pub(super) struct Running(Arc<Drivers>);

impl Drop for Running {
    fn drop(&mut self) {
        for drivers in [&*self.0, &EVERY] {
            drivers.live.fetch_sub(1, Ordering::AcqRel);
            drivers.gone.notify_waiters();
        }
    }
}

/// Waits until the connection tasks of every store the process opened have ended (the
/// stores dropped, or closed), or `limit` passes: for the end of `main`, where the runtime
/// would otherwise drop them before they say goodbye.
pub async fn sessions_ended(limit: Duration) {
    EVERY.all_closed(limit).await;
}

impl Drivers {
    /// Counts a task as running until the returned guard is dropped.
    pub(super) fn running(self: &Arc<Self>) -> Running {
        self.live.fetch_add(1, Ordering::AcqRel);
        EVERY.live.fetch_add(1, Ordering::AcqRel);
        Running(self.clone())
    }

    /// Waits until no task is running, or `limit` passes.
    pub(super) async fn all_closed(&self, limit: Duration) {
        let none_left = async {
            loop {
                let gone = self.gone.notified();
                tokio::pin!(gone);
                gone.as_mut().enable();
                if self.live.load(Ordering::Acquire) == 0 {
                    return;
                }
                gone.await;
            }
        };
        let _ = tokio::time::timeout(limit, none_left).await;
    }
}

/// Opens the pool's connections; see the module docs.
pub(super) struct GoodbyeConnect {
    pub(super) tls: MakeRustlsConnect,
    pub(super) drivers: Arc<Drivers>,
}

impl Connect for GoodbyeConnect {
    fn connect(&self, config: &Config) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), Error>> {
        let (tls, config) = (self.tls.clone(), config.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let running = self.drivers.running();
            let (stand_in, client_gone) = oneshot::channel::<()>();
            tokio::spawn(async move {
                let _running = running;
                tokio::pin!(connection);
                tokio::select! {
                    outcome = &mut connection => {
                        if let Err(e) = outcome {
                            tracing::warn!(error.message = %e, "a database connection failed");
                        }
                    }
                    // With its client dropped, the connection sends Terminate and ends.
                    _ = client_gone => {
                        let _ = tokio::time::timeout(GOODBYE_LIMIT, connection).await;
                    }
                }
            });
            let held = tokio::spawn(async move {
                let _stand_in = stand_in;
                std::future::pending::<()>().await;
            });
            Ok((client, held))
        })
    }
}
