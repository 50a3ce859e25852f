//! What the services of one instance share: storage, the command side, the read models, the
//! refresh service and its scheduler, the OAuth flow machinery and the webhook subscribers.
//!
//! [`AppState`] holds services only, no HTTP type: the HTTP layer keeps what is its own (request
//! ids, latency histograms) in its own router state. Start-up builds it once; handing it to a
//! request or a background loop is one reference-count increment.

use std::sync::Arc;

use domain::catalog::Catalog;
use domain::commands::{Aggregate, Commands, Loaded};
use domain::store::Backend;
use projections::activity::ReadActivity;
use projections::cache::ConnectionCache;
use projections::model::upsert_state;
use projections::{ProjectionError, ReadModels, Runner, StateModel};
use workers::compactor::Compactor;
use workers::refresh::RefreshService;
use workers::scheduler::Scheduler;
use workers::sockets::Sockets;
use workers::webhooks::WebhookService;

use crate::config::Config;
use crate::connections::Answers;
use crate::oauth::Flows;
use crate::proxy::ProxyStats;
use crate::server::ServerStats;

/// The services of this instance, shared by the request handlers and the background loops.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Shares `services`.
    pub fn new(services: Shared) -> Self {
        Self(Arc::new(services))
    }
}

impl AppState {
    /// Writes the state a command left to the read model `M`, so the very next read sees it
    /// (read-your-writes) without waiting for the projection runner.
    pub async fn write_read_model<M>(
        &self,
        loaded: &Loaded<M::State>,
    ) -> Result<(), ProjectionError>
    where
        M: StateModel,
        M::State: Aggregate,
    {
        upsert_state::<M>(
            &self.read_models,
            loaded.stream_id.as_str(),
            loaded.version,
            &loaded.state,
        )
        .await
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct Shared {
    pub backend: Backend,
    /// The read models the API serves.
    pub read_models: ReadModels,
    pub commands: Commands,
    pub runner: Runner,
    /// The hot path's in-memory replica of the connections read model.
    pub cache: Arc<ConnectionCache<Answers>>,
    /// Which connections this instance served, on their way to the database.
    pub activity: Arc<ReadActivity>,
    pub config: Arc<Config>,
    /// The provider templates: the built-in catalog plus `GRANTLINE_PROVIDERS_FILE`.
    pub catalog: Arc<Catalog>,
    /// The OAuth flow machinery (provider client, session sealing key).
    pub oauth: Flows,
    /// The WebSocket clients of this instance waiting for a flow's outcome.
    pub sockets: Arc<Sockets>,
    /// The refresh service: the only code that refreshes tokens.
    pub refresh: RefreshService,
    /// The proactive refresh scheduler (run only with the `scheduler` role; its `tick_once`
    /// serves tests and its counters `/metrics`).
    pub scheduler: Scheduler,
    /// The compactor (run only with the `compactor` role; its counters serve `/metrics`).
    pub compactor: Compactor,
    /// What the server's limits refused, and the connections and sockets open now.
    pub server_stats: Arc<ServerStats>,
    /// The webhook subscribers, when `GRANTLINE_WEBHOOK_URLS` names any (run only with the
    /// `webhooks` role; `/admin/webhooks` shows their progress on every instance).
    pub webhooks: Option<WebhookService>,
    /// The proxy's HTTP clients (a template's own hosts; hosts a caller chose, checked where
    /// they resolve).
    pub proxy_client: crate::proxy::Clients,
    /// What the proxy counted, by integration.
    pub proxy_stats: Arc<ProxyStats>,
}
