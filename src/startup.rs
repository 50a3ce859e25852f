//! The composition root: opens storage, checks keys, binds the listener and runs the service.
//! Tests build the real [`Application`] on port 0.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use domain::catalog::Catalog;
use domain::commands::Commands;
use domain::keys::{MasterKey, Vault};
use domain::store::{Backend, StoreOptions};
use projections::activity::ReadActivity;
use projections::cache::ConnectionCache;
use projections::snapshots::ReadModelSnapshots;
use projections::{ReadModels, Runner};
use tokio::net::TcpListener;
use workers::compactor::Compactor;
use workers::refresh::{RefreshService, RefreshSettings};
use workers::scheduler::{RefreshPolicy, Scheduler};
use workers::sockets::Sockets;
use workers::webhooks::{WebhookService, WebhookSettings};

use crate::config::{Config, DatabaseConfig, MasterKeySource};
use crate::http;
use crate::import::LineFault;
use crate::oauth::Flows;
use crate::server;
use crate::state::{AppState, Shared};

/// How long a cached connection is served without hearing of a change (a safety net: changes
/// invalidate it at once).
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the compactor role looks for history past retention.
const COMPACTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How often an instance writes the reads it noted (the scheduler sees a connection in use
/// this much later at most).
const ACTIVITY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// A built service, bound to its port and ready to run.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
}

impl Application {
    /// Migrates the database, opens the vault (refusing a wrong master key) and binds the
    /// listener.
    pub async fn build(mut config: Config) -> anyhow::Result<Self> {
        let catalog = load_catalog(&config)?;
        let oauth = Flows::new(
            config.refresh.provider_timeout,
            config.limits.flows_per_minute,
        )?;
        let (backend, vault) = open_storage(&config.database, WhileDown::Wait).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (GRANTLINE_LISTEN)", config.listen))?;
        let bound = listener.local_addr()?;
        let port = bound.port();
        // The default server URL is http://LISTEN; with port 0 that is the port actually bound,
        // or OAuth callbacks would point nowhere.
        if config.listen.port() == 0 && config.server_url == format!("http://{}", config.listen) {
            config.server_url = format!("http://{bound}");
        }
        // One name per process: the refresh leases it holds and every event it appends carry
        // it, so the audit trail tells instances apart.
        let instance = format!("grantline-{}", uuid::Uuid::new_v4().simple());
        // Loads start from the read models' snapshots: streams grow with every refresh.
        let read_models = ReadModels::open(&backend);
        let commands = Commands::new(backend.clone(), vault)
            .with_instance(&instance)
            .with_snapshots(Arc::new(ReadModelSnapshots::new(read_models.clone())));
        let webhooks = open_webhooks(&config, &backend, &instance).await?;
        let catalog = Arc::new(catalog);
        let refresh = RefreshService::new(
            commands.clone(),
            read_models.clone(),
            catalog.clone(),
            RefreshSettings {
                margin: config.refresh.margin,
                lease: config.refresh.lease,
                provider_timeout: config.refresh.provider_timeout,
                holder: instance,
            },
        )
        .context("cannot start the refresh service")?;
        let scheduler = Scheduler::new(
            refresh.clone(),
            read_models.clone(),
            RefreshPolicy {
                window: config.refresh.window,
                active_for: config.refresh.active_for,
                idle_after: config.refresh.idle_after,
                keep_alive: RefreshPolicy::keep_alive_of(&catalog),
                budget: config.refresh.rate,
            },
            config.refresh.concurrency,
        )
        // Listing the due connections gets as long as a request.
        .with_query_limit(config.limits.request_timeout);
        let compactor = Compactor::new(backend.clone(), config.retention);
        Ok(Self {
            listener,
            port,
            state: AppState::new(Shared {
                commands,
                refresh,
                scheduler,
                compactor,
                webhooks,
                // A projection step gets as long as a request.
                runner: Runner::new(&backend).with_step_limit(config.limits.request_timeout),
                read_models,
                cache: Arc::new(ConnectionCache::with_budget(
                    CACHE_TTL,
                    config.connection_cache,
                )),
                activity: Arc::new(ReadActivity::new(config.refresh.active_for)),
                backend,
                config: Arc::new(config),
                catalog,
                oauth,
                sockets: Arc::new(Sockets::default()),
                server_stats: Arc::default(),
                proxy_client: crate::proxy::client()?,
                proxy_stats: Arc::default(),
            }),
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stopping = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let mut tasks = Vec::new();
        if self.state.config.roles.projections {
            let runner = self.state.runner.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move { runner.run(until).await }));
        }
        if self.state.config.roles.webhooks
            && let Some(webhooks) = self.state.webhooks.clone()
        {
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move { webhooks.run(until).await }));
        }
        if self.state.config.roles.compactor {
            let compactor = self.state.compactor.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                compactor.run(COMPACTION_INTERVAL, until).await;
            }));
        }
        if self.state.config.roles.scheduler {
            let scheduler = self.state.scheduler.clone();
            let schedule = self.state.config.refresh.schedule.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                scheduler.run(schedule, until).await;
            }));
        }
        {
            // Every role opens secrets (the API on reads, the scheduler on refreshes), so every
            // instance follows the log to drop the data keys other instances shred.
            let (cache, backend) = (self.state.cache.clone(), self.state.backend.clone());
            let vault = self.state.commands.vault().clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                cache.follow(backend, vault, until).await;
            }));
        }
        if self.state.config.roles.api {
            // WebSocket clients are served by API instances; flows finished on another
            // instance reach them through the relay.
            let (sockets, backend) = (self.state.sockets.clone(), self.state.backend.clone());
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                workers::sockets::run(sockets, backend, until).await;
            }));
        }
        if self.state.config.roles.api {
            // The reads this instance serves, for the scheduler's demand-aware refresh.
            let state = self.state.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                let keep = state.config.refresh.active_for;
                state
                    .activity
                    .run(&state.read_models, ACTIVITY_FLUSH, keep, until)
                    .await;
            }));
        }
        if self.state.config.roles.api {
            let backend = self.state.backend.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                workers::sessions::run(backend, until).await;
            }));
        }
        {
            // Upgraded (WebSocket) connections outlive the graceful shutdown unless told.
            let sockets = self.state.sockets.clone();
            let until = stopping(stopped.clone());
            tasks.push(tokio::spawn(async move {
                until.await;
                sockets.close_all();
            }));
        }
        tracing::info!(port = self.port, "grantline listening");
        let backend = self.state.backend.clone();
        let (limits, stats) = (self.state.config.limits, self.state.server_stats.clone());
        server::serve(
            self.listener,
            http::router(self.state),
            limits,
            stats,
            async move {
                shutdown.await;
                let _ = stop.send(true);
            },
        )
        .await;
        for task in tasks {
            let _ = task.await;
        }
        backend.close().await;
        Ok(())
    }
}

/// The webhook targets, registered before the listener serves anything, so that every event
/// appended through this instance is delivered.
async fn open_webhooks(
    config: &Config,
    backend: &Backend,
    instance: &str,
) -> anyhow::Result<Option<WebhookService>> {
    let Some(webhooks) = &config.webhooks else {
        return Ok(None);
    };
    let settings = WebhookSettings {
        urls: webhooks.urls.clone(),
        secret: webhooks.secret.expose().to_owned(),
        timeout: webhooks.timeout,
        backoff: webhooks.backoff,
        holder: instance.to_owned(),
    };
    let service = WebhookService::open(backend.clone(), settings)
        .await
        .context("cannot set up the webhooks (GRANTLINE_WEBHOOK_URLS)")?;
    Ok(Some(service))
}

/// The built-in provider templates, plus those of `GRANTLINE_PROVIDERS_FILE`; a file that
/// cannot be used stops start-up with the catalog's message (file, entry, problem).
fn load_catalog(config: &Config) -> anyhow::Result<Catalog> {
    let catalog = match &config.providers_file {
        Some(path) => Catalog::with_file(path)
            .context("cannot load the provider templates (GRANTLINE_PROVIDERS_FILE)")?,
        None => Catalog::builtin(),
    };
    for (name, mode) in catalog.skipped() {
        tracing::debug!(
            provider = name,
            auth_mode = mode,
            "provider template not served"
        );
    }
    tracing::info!(templates = catalog.len(), "provider catalog loaded");
    Ok(catalog)
}

/// On SQLite, which serves one instance: the lock `<database>.serve.lock` beside the file, held
/// for as long as the returned file is (the system lets it go when the process ends, however it
/// ends). While another `grantline serve` holds it (a restart that overlaps the old process, or a
/// second instance by mistake), this waits, with a warning; `None` on PostgreSQL.
pub async fn sole_server(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    let Some(path) = url.strip_prefix("sqlite://").map(std::path::Path::new) else {
        return Ok(None);
    };
    // Named after the file itself, however the URL reaches it (a symlink, `..`), beside it;
    // its directory is created here on a first start, before the store would.
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    std::fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create the database's directory {}",
            parent.display()
        )
    })?;
    let file = std::fs::canonicalize(path)
        .or_else(|_| std::fs::canonicalize(parent).map(|dir| dir.join(name)))
        .with_context(|| format!("cannot resolve the database's path {}", path.display()))?;
    let lock = format!("{}.serve.lock", file.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&lock)
        .with_context(|| format!("cannot open the lock file {lock}"))?;
    let mut warned = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !warned {
                    tracing::warn!(
                        lock = %lock,
                        "another grantline serve uses this SQLite database; waiting until it \
                         stops (several instances need PostgreSQL)"
                    );
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("cannot take the lock file {lock}: {e}")
            }
        }
    }
}

/// What opening the database does while PostgreSQL refuses connections or is starting up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhileDown {
    /// Wait for it, however long (the service and `migrate`: a container may start first).
    Wait,
    /// Fail at once (a one-off command).
    Fail,
}

/// Opens the database (applying migrations under a lock) and the vault.
pub async fn open_storage(
    config: &DatabaseConfig,
    while_down: WhileDown,
) -> anyhow::Result<(Backend, Vault)> {
    let options = StoreOptions {
        pool_size: config.pool_size,
        pool_wait: config.pool_wait,
        wait_until_up: while_down == WhileDown::Wait,
        ..StoreOptions::default()
    };
    let backend = Backend::open(&config.url, &options)
        .await
        .context("cannot open the database (GRANTLINE_DATABASE_URL)")?;
    match backend.tls_version().await {
        Ok(tls) => tracing::info!(
            backend = backend.kind(),
            tls = tls.as_deref().unwrap_or("none"),
            "database opened"
        ),
        Err(e) => tracing::warn!(error.message = %e, "cannot tell the database connection's TLS"),
    }
    let repository: Arc<dyn domain::keys::KeyRepository> = backend.key_repository();
    let (master, source) = match &config.master_key {
        MasterKeySource::Configured(key) => {
            ((**key).clone(), "GRANTLINE_ENCRYPTION_KEY".to_owned())
        }
        MasterKeySource::File(path) => {
            refuse_a_new_key_for_sealed_data(repository.as_ref(), path).await?;
            (
                load_or_create_key_file(path)?,
                format!("the key file {}", path.display()),
            )
        }
    };
    let vault = Vault::open(repository, master, config.previous_master_key.clone())
        .await
        .with_context(|| format!("the master key check failed ({source})"))?
        .with_cache_budget(config.data_key_cache);
    Ok((backend, vault))
}

/// One line of `grantline import`, decoded as the `POST /connections` route decodes its body.
pub fn import_body(body: serde_json::Value) -> Result<crate::connections::Import, LineFault> {
    crate::http::import::import_of(body).map_err(|e| LineFault {
        code: e.code(),
        message: e.to_string(),
    })
}

/// A missing key file is created only for a database nothing was sealed in yet: next to one
/// that holds data, a new key could open none of it, and writing it would leave a second key
/// file for the operator to tell from the lost one.
async fn refuse_a_new_key_for_sealed_data(
    repository: &dyn domain::keys::KeyRepository,
    path: &Path,
) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let keys = repository
        .master_keys()
        .await
        .context("cannot read the database's master keys")?;
    let sealed_with = keys.iter().find(|k| k.active).or(keys.first());
    // Another instance may have created both the file and the record meanwhile.
    if let Some(key) = sealed_with
        && !path.exists()
    {
        bail!(
            "the key file {} is missing, and this database is sealed with master key {}: \
             restore that file (or set GRANTLINE_ENCRYPTION_KEY to that key); no new key was \
             written",
            path.display(),
            key.key_id
        );
    }
    Ok(())
}

/// Reads the embedded default's master key, creating it (mode 0600) on first start.
fn load_or_create_key_file(path: &Path) -> anyhow::Result<MasterKey> {
    for _ in 0..2 {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                warn_if_readable_by_others(path);
                return MasterKey::from_base64(&text)
                    .with_context(|| format!("the key file {} is damaged", path.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                }
                let (key, encoded) = MasterKey::generate();
                match create_private_file(path) {
                    Ok(mut file) => {
                        file.write_all(encoded.as_bytes())?;
                        file.write_all(b"\n")?;
                        file.sync_all()?;
                        tracing::info!(path = %path.display(), "created a new master key file");
                        return Ok(key);
                    }
                    // Another instance created it first: read theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot create {}", path.display()));
                    }
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    bail!("cannot read or create the key file {}", path.display())
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the master key file is readable by others; chmod 600 it");
        }
    }
}
