//! Configuration: command-line flags, each backed by a `GRANTLINE_*` environment variable.
//!
//! Values arrive as text and are checked by [`ServeArgs::validate`] before anything starts; every
//! error names the variable (and flag) it came from.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use domain::keys::CacheBudget;

use self::cache::parse_budget;
pub use self::database::{DatabaseArgs, DatabaseConfig, MasterKeySource};
pub use self::limits::LimitArgs;
pub use self::proxy::{ProxyArgs, ProxyConfig};
pub use self::retention::RetentionArgs;
pub use self::tools::{
    EventsCommand, HistoryArgs, ImportArgs, KeysCommand, LogCommand, ProjectionsCommand,
};
use crate::server::ServerLimits;

mod cache;
mod database;
mod limits;
mod proxy;
mod retention;
mod tools;

const AFTER_HELP: &str = "\
Every option can also be set through the environment variable shown with it.
Durations take a unit: 90s, 15m, 1h, 7d.";

/// Grantline: OAuth connections and always-fresh access tokens, over the Nango Connections API.
#[derive(Debug, Parser)]
#[command(name = "grantline", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP API, projection runner and refresh scheduler (each can be turned off).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage encryption keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect and rebuild the read models.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Print a connection's credential history (audit trail); never a secret.
    History(HistoryArgs),
    /// Read the event log.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Work on the event log itself.
    #[command(subcommand)]
    Log(LogCommand),
    /// Import connections from JSON lines, one `POST /connections` body per line: every line is
    /// checked before anything is written; existing connections are kept (see --replace).
    Import(ImportArgs),
}

/// Options of `grantline serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,

    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// Address to listen on.
    #[arg(long, env = "GRANTLINE_LISTEN", default_value = "127.0.0.1:3003")]
    pub listen: String,

    /// Public base URL; the OAuth callback is SERVER_URL/oauth/callback. Default: http://LISTEN.
    #[arg(long, env = "GRANTLINE_SERVER_URL")]
    pub server_url: Option<String>,

    /// Secret key for the API (Bearer or Basic). Without it the API is open and only listens on
    /// loopback addresses.
    #[arg(long, env = "GRANTLINE_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,

    /// Public key checked by /oauth/connect.
    #[arg(long, env = "GRANTLINE_PUBLIC_KEY")]
    pub public_key: Option<String>,

    /// Key for /oauth/connect's `hmac` parameter. When set, every connect request must carry
    /// hmac = hex HMAC-SHA256 of "<provider_config_key>:<connection_id>" under this key.
    #[arg(long, env = "GRANTLINE_HMAC_KEY", hide_env_values = true)]
    pub hmac_key: Option<String>,

    /// YAML file of provider templates (Nango providers.yaml format) added to the catalog.
    #[arg(long, env = "GRANTLINE_PROVIDERS_FILE")]
    pub providers_file: Option<PathBuf>,

    /// How long an OAuth flow's state stays valid between /oauth/connect and the callback.
    #[arg(long, env = "GRANTLINE_OAUTH_SESSION_LIFETIME", default_value = "10m")]
    pub oauth_session_lifetime: String,

    /// Comma-separated origins that api_redirect_url may point to (e.g. https://app.example.com).
    #[arg(long, env = "GRANTLINE_REDIRECT_ALLOWLIST", default_value = "")]
    pub redirect_allowlist: String,

    /// Comma-separated origins of pages that may call the API from a browser (CORS) and open
    /// the WebSocket, or `*` for any. Default: any with a secret key, loopback origins without.
    #[arg(long, env = "GRANTLINE_BROWSER_ORIGINS")]
    pub browser_origins: Option<String>,

    /// Refresh on read when the token expires within this margin.
    #[arg(long, env = "GRANTLINE_REFRESH_MARGIN", default_value = "15m")]
    pub refresh_margin: String,

    /// The scheduler refreshes tokens expiring within this window (wider than the margin).
    #[arg(long, env = "GRANTLINE_REFRESH_WINDOW", default_value = "20m")]
    pub refresh_window: String,

    /// Scheduler cron expression (sec min hour day-of-month month day-of-week).
    #[arg(
        long,
        env = "GRANTLINE_REFRESH_SCHEDULE",
        default_value = "0 * * * * *"
    )]
    pub refresh_schedule: String,

    /// Refreshes the scheduler runs at once.
    #[arg(long, env = "GRANTLINE_REFRESH_CONCURRENCY", default_value = "16")]
    pub refresh_concurrency: String,

    /// Refresh idle connections whose last refresh is older than this, to keep refresh tokens
    /// alive (providers whose templates document an unused refresh token's lifetime use half
    /// of that instead).
    #[arg(long, env = "GRANTLINE_REFRESH_IDLE_AFTER", default_value = "7d")]
    pub refresh_idle_after: String,

    /// A connection read within this is in use: the scheduler refreshes its token ahead of
    /// expiry. Connections not read for longer are refreshed on their next read.
    #[arg(long, env = "GRANTLINE_REFRESH_ACTIVE_FOR", default_value = "24h")]
    pub refresh_active_for: String,

    /// Scheduled refreshes per second per integration (0: unpaced), with jitter, so a storm of
    /// due connections stays under the provider's rate limit. Reads are never paced.
    #[arg(long, env = "GRANTLINE_REFRESH_RATE", default_value = "50")]
    pub refresh_rate: String,

    /// How long a refresh lease lasts; the provider call times out before it ends.
    #[arg(long, env = "GRANTLINE_REFRESH_LEASE", default_value = "60s")]
    pub refresh_lease: String,

    /// Timeout of a call to a provider's token endpoint (shorter than the lease).
    #[arg(long, env = "GRANTLINE_PROVIDER_TIMEOUT", default_value = "30s")]
    pub provider_timeout: String,

    /// Comma-separated http(s) URLs that receive webhooks (connection created, re-authorized,
    /// deleted; refresh failed, recovered). Empty: no webhooks.
    #[arg(
        long,
        env = "GRANTLINE_WEBHOOK_URLS",
        default_value = "",
        hide_env_values = true
    )]
    pub webhook_urls: String,

    /// Key of the webhooks' HMAC-SHA256 signature (X-Grantline-Signature). Required with
    /// GRANTLINE_WEBHOOK_URLS.
    #[arg(long, env = "GRANTLINE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Timeout of one webhook POST.
    #[arg(long, env = "GRANTLINE_WEBHOOK_TIMEOUT", default_value = "10s")]
    pub webhook_timeout: String,

    /// Wait before retrying a failed webhook; it doubles (with jitter) after each further
    /// failure, up to 5 minutes.
    #[arg(long, env = "GRANTLINE_WEBHOOK_BACKOFF", default_value = "1s")]
    pub webhook_backoff: String,

    /// Roles this instance runs, comma-separated: api, projections, scheduler, webhooks,
    /// compactor.
    #[arg(
        long,
        env = "GRANTLINE_ROLES",
        default_value = "api,projections,scheduler,webhooks,compactor"
    )]
    pub roles: String,

    /// Log format: text or json.
    #[arg(long, env = "GRANTLINE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// GET /ready answers 503 when a projection is more than this many events behind the log.
    #[arg(long, env = "GRANTLINE_READY_MAX_LAG", default_value = "1000")]
    pub ready_max_lag: String,

    /// Memory for the in-memory replica of the read model, as a size (`128MiB`, estimated from
    /// each connection's size) or a number of connections; past it, the least useful are
    /// evicted (a miss costs one read-model query).
    #[arg(long, env = "GRANTLINE_CONNECTION_CACHE", default_value = "128MiB")]
    pub connection_cache: String,
}

/// The shortest secret key accepted: anything shorter can be guessed.
const MIN_SECRET_KEY: usize = 32;

/// A configuration value that cannot be used; its message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable} (--{flag}): {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub flag: &'static str,
    pub problem: String,
}

fn invalid(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    let flag = FLAGS
        .iter()
        .find(|(v, _)| *v == variable)
        .map_or("", |(_, f)| *f);
    ConfigError {
        variable,
        flag,
        problem: problem.into(),
    }
}

const FLAGS: &[(&str, &str)] = &[
    ("GRANTLINE_DATABASE_URL", "database-url"),
    ("GRANTLINE_DATA_DIR", "data-dir"),
    ("GRANTLINE_ENCRYPTION_KEY", "encryption-key"),
    (
        "GRANTLINE_ENCRYPTION_KEY_PREVIOUS",
        "encryption-key-previous",
    ),
    ("GRANTLINE_DATABASE_POOL_SIZE", "database-pool-size"),
    ("GRANTLINE_DATABASE_POOL_WAIT", "database-pool-wait"),
    ("GRANTLINE_DATA_KEY_CACHE", "data-key-cache"),
    ("GRANTLINE_LISTEN", "listen"),
    ("GRANTLINE_SERVER_URL", "server-url"),
    ("GRANTLINE_SECRET_KEY", "secret-key"),
    ("GRANTLINE_PUBLIC_KEY", "public-key"),
    ("GRANTLINE_HMAC_KEY", "hmac-key"),
    ("GRANTLINE_PROVIDERS_FILE", "providers-file"),
    ("GRANTLINE_OAUTH_SESSION_LIFETIME", "oauth-session-lifetime"),
    ("GRANTLINE_REDIRECT_ALLOWLIST", "redirect-allowlist"),
    ("GRANTLINE_REFRESH_MARGIN", "refresh-margin"),
    ("GRANTLINE_REFRESH_WINDOW", "refresh-window"),
    ("GRANTLINE_REFRESH_SCHEDULE", "refresh-schedule"),
    ("GRANTLINE_REFRESH_CONCURRENCY", "refresh-concurrency"),
    ("GRANTLINE_REFRESH_IDLE_AFTER", "refresh-idle-after"),
    ("GRANTLINE_REFRESH_ACTIVE_FOR", "refresh-active-for"),
    ("GRANTLINE_REFRESH_RATE", "refresh-rate"),
    ("GRANTLINE_REFRESH_LEASE", "refresh-lease"),
    ("GRANTLINE_PROVIDER_TIMEOUT", "provider-timeout"),
    ("GRANTLINE_WEBHOOK_URLS", "webhook-urls"),
    ("GRANTLINE_WEBHOOK_SECRET", "webhook-secret"),
    ("GRANTLINE_WEBHOOK_TIMEOUT", "webhook-timeout"),
    ("GRANTLINE_WEBHOOK_BACKOFF", "webhook-backoff"),
    ("GRANTLINE_ROLES", "roles"),
    ("GRANTLINE_HISTORY_RETENTION", "history-retention"),
    (
        "GRANTLINE_HISTORY_LIFECYCLE_RETENTION",
        "history-lifecycle-retention",
    ),
    ("GRANTLINE_LOG_FORMAT", "log-format"),
    ("GRANTLINE_READY_MAX_LAG", "ready-max-lag"),
    ("GRANTLINE_CONNECTION_CACHE", "connection-cache"),
    ("GRANTLINE_HEADER_TIMEOUT", "header-timeout"),
    ("GRANTLINE_REQUEST_TIMEOUT", "request-timeout"),
    ("GRANTLINE_IDLE_TIMEOUT", "idle-timeout"),
    ("GRANTLINE_MAX_CONNECTIONS", "max-connections"),
    ("GRANTLINE_MAX_WEBSOCKETS", "max-websockets"),
    (
        "GRANTLINE_MAX_WEBSOCKETS_PER_CLIENT",
        "max-websockets-per-client",
    ),
    ("GRANTLINE_WEBSOCKET_IDLE_TIMEOUT", "websocket-idle-timeout"),
    ("GRANTLINE_MAX_OPEN_FLOWS", "max-open-flows"),
    ("GRANTLINE_FLOWS_PER_MINUTE", "flows-per-minute"),
    ("GRANTLINE_PROXY_ALLOWED_HOSTS", "proxy-allowed-hosts"),
    ("GRANTLINE_PROXY_TIMEOUT", "proxy-timeout"),
];

/// Every environment variable the binary reads (for the help test and the README).
pub fn variables() -> impl Iterator<Item = &'static str> {
    FLAGS.iter().map(|(v, _)| *v)
}

/// A secret string from configuration; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The roles one instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub projections: bool,
    pub scheduler: bool,
    /// Delivers webhooks (when GRANTLINE_WEBHOOK_URLS names any).
    pub webhooks: bool,
    /// Removes history past retention.
    pub compactor: bool,
}

/// Refresh policy and scheduler settings.
#[derive(Clone, Debug)]
pub struct RefreshConfig {
    pub margin: Duration,
    pub window: Duration,
    pub schedule: cron::Schedule,
    pub concurrency: usize,
    pub idle_after: Duration,
    pub active_for: Duration,
    /// Scheduled refreshes per second per integration; `None`: unpaced.
    pub rate: Option<std::num::NonZeroU32>,
    pub lease: Duration,
    pub provider_timeout: Duration,
}

/// Webhook targets and how they are sent.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The targets; each may carry credentials (userinfo, query), so `Debug` shows them redacted.
    pub urls: Vec<url::Url>,
    pub secret: Secret,
    pub timeout: Duration,
    /// The first retry's delay.
    pub backoff: Duration,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(workers::webhooks::redact).collect();
        f.debug_struct("WebhookConfig")
            .field("urls", &urls)
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("backoff", &self.backoff)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The origins whose pages may call the API from a browser and open the WebSocket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrowserOrigins {
    Any,
    /// Pages served from this machine: `localhost`, a name under it, or a loopback address.
    Loopback,
    /// These origins, as browsers send them.
    Listed(Vec<String>),
}

impl BrowserOrigins {
    /// Whether a page of `origin` (an `Origin` header's value) is one of them.
    pub fn allow(&self, origin: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Listed(origins) => origins.iter().any(|listed| listed == origin),
            Self::Loopback => url::Url::parse(origin).is_ok_and(|url| match url.host() {
                Some(url::Host::Domain(name)) => {
                    name == "localhost" || name.ends_with(".localhost")
                }
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            }),
        }
    }
}

/// The validated configuration of `grantline serve`.
#[derive(Clone, Debug)]
pub struct Config {
    pub database: DatabaseConfig,
    pub listen: SocketAddr,
    pub server_url: String,
    pub secret_key: Option<Secret>,
    pub public_key: Option<String>,
    /// The key `/oauth/connect`'s `hmac` parameter is checked with, when set.
    pub hmac_key: Option<Secret>,
    pub providers_file: Option<PathBuf>,
    /// How long an OAuth flow's state is accepted.
    pub oauth_session_lifetime: Duration,
    pub redirect_allowlist: Vec<String>,
    /// Whose pages may read the API's answers and open the WebSocket.
    pub browser_origins: BrowserOrigins,
    pub refresh: RefreshConfig,
    pub roles: Roles,
    /// `None` when no webhook URL is configured.
    pub webhooks: Option<WebhookConfig>,
    pub log_format: LogFormat,
    /// The most events a projection may lag behind the log while `/ready` says ready.
    pub ready_max_lag: u64,
    /// How much the in-memory replica holds.
    pub connection_cache: CacheBudget,
    /// Timeouts and caps of the server.
    pub limits: ServerLimits,
    /// How long the history keeps what (the compactor role's setting).
    pub retention: workers::compactor::Retention,
    pub proxy: ProxyConfig,
}

impl ServeArgs {
    /// Checks every value; the first problem found is returned, naming its variable.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let database = self.database.validate()?;
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            invalid(
                "GRANTLINE_LISTEN",
                format!("{:?} is not an address like 127.0.0.1:3003", self.listen),
            )
        })?;
        let secret_key = non_empty(self.secret_key.as_deref()).map(|s| Secret(s.to_owned()));
        if let Some(secret) = &secret_key
            && secret.expose().chars().count() < MIN_SECRET_KEY
        {
            return Err(invalid(
                "GRANTLINE_SECRET_KEY",
                format!(
                    "must be at least {MIN_SECRET_KEY} characters, hard to guess (for example \
                     `openssl rand -hex 32`)"
                ),
            ));
        }
        if secret_key.is_none() && !listen.ip().is_loopback() {
            return Err(invalid(
                "GRANTLINE_LISTEN",
                format!(
                    "{listen} is not a loopback address, and without GRANTLINE_SECRET_KEY the API \
                     is open to anyone: set a secret key or listen on 127.0.0.1"
                ),
            ));
        }
        let server_url = match non_empty(self.server_url.as_deref()) {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(
                        "GRANTLINE_SERVER_URL",
                        "must be an http:// or https:// URL",
                    ));
                }
                url.trim_end_matches('/').to_owned()
            }
            None => format!("http://{listen}"),
        };
        if let Some(file) = &self.providers_file
            && !Path::new(file).is_file()
        {
            return Err(invalid(
                "GRANTLINE_PROVIDERS_FILE",
                format!("{} is not a readable file", file.display()),
            ));
        }
        let redirect_allowlist =
            parse_origins("GRANTLINE_REDIRECT_ALLOWLIST", &self.redirect_allowlist)?;
        let browser_origins = match non_empty(self.browser_origins.as_deref()) {
            Some("*") => BrowserOrigins::Any,
            Some(list) => BrowserOrigins::Listed(parse_origins("GRANTLINE_BROWSER_ORIGINS", list)?),
            // With a secret key every route a page could call needs the key, a session token or
            // the public key; without one the API is open to whoever reaches it, so only pages
            // served from this machine may read its answers.
            None if secret_key.is_some() => BrowserOrigins::Any,
            None => BrowserOrigins::Loopback,
        };
        let refresh = self.refresh()?;
        let limits = self.limits.validate(refresh.provider_timeout)?;
        let oauth_session_lifetime = parse_duration(
            "GRANTLINE_OAUTH_SESSION_LIFETIME",
            &self.oauth_session_lifetime,
        )?;
        Ok(Config {
            database,
            listen,
            server_url,
            secret_key,
            public_key: non_empty(self.public_key.as_deref()).map(str::to_owned),
            hmac_key: non_empty(self.hmac_key.as_deref()).map(|s| Secret(s.to_owned())),
            providers_file: self.providers_file.clone(),
            oauth_session_lifetime,
            redirect_allowlist,
            browser_origins,
            refresh,
            roles: parse_roles(&self.roles)?,
            webhooks: self.webhooks()?,
            log_format: parse_log_format(&self.log_format)?,
            ready_max_lag: self.ready_max_lag.trim().parse().map_err(|_| {
                invalid(
                    "GRANTLINE_READY_MAX_LAG",
                    format!("{:?} is not a whole number of events", self.ready_max_lag),
                )
            })?,
            connection_cache: parse_budget("GRANTLINE_CONNECTION_CACHE", &self.connection_cache)?,
            limits,
            retention: self.retention.validate()?,
            proxy: self.proxy.validate(limits.request_timeout)?,
        })
    }

    fn webhooks(&self) -> Result<Option<WebhookConfig>, ConfigError> {
        let timeout = parse_duration("GRANTLINE_WEBHOOK_TIMEOUT", &self.webhook_timeout)?;
        let backoff = parse_duration("GRANTLINE_WEBHOOK_BACKOFF", &self.webhook_backoff)?;
        if backoff > workers::webhooks::BACKOFF_CAP {
            return Err(invalid(
                "GRANTLINE_WEBHOOK_BACKOFF",
                "must be at most 5m, the longest wait between retries",
            ));
        }
        // Entries are named by position only: a URL may carry credentials.
        let urls = self
            .webhook_urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(n, text)| match url::Url::parse(text) {
                Ok(url)
                    if matches!(url.scheme(), "http" | "https")
                        && url.host_str().is_some_and(|h| !h.is_empty()) =>
                {
                    Ok(url)
                }
                _ => Err(invalid(
                    "GRANTLINE_WEBHOOK_URLS",
                    format!(
                        "entry {} is not an http:// or https:// URL with a host",
                        n + 1
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Ok(None);
        }
        let Some(secret) = non_empty(self.webhook_secret.as_deref()) else {
            return Err(invalid(
                "GRANTLINE_WEBHOOK_SECRET",
                "required with GRANTLINE_WEBHOOK_URLS: receivers check each webhook's signature \
                 with it",
            ));
        };
        Ok(Some(WebhookConfig {
            urls,
            secret: Secret(secret.to_owned()),
            timeout,
            backoff,
        }))
    }

    fn refresh(&self) -> Result<RefreshConfig, ConfigError> {
        let margin = parse_duration("GRANTLINE_REFRESH_MARGIN", &self.refresh_margin)?;
        let window = parse_duration("GRANTLINE_REFRESH_WINDOW", &self.refresh_window)?;
        if window <= margin {
            return Err(invalid(
                "GRANTLINE_REFRESH_WINDOW",
                "must be wider than GRANTLINE_REFRESH_MARGIN, so the scheduler refreshes before \
                 reads have to",
            ));
        }
        let schedule = cron::Schedule::from_str(&self.refresh_schedule).map_err(|e| {
            invalid(
                "GRANTLINE_REFRESH_SCHEDULE",
                format!("{:?} is not a cron expression: {e}", self.refresh_schedule),
            )
        })?;
        if schedule.upcoming(chrono::Utc).next().is_none() {
            let never = format!(
                "{:?} never fires (no date matches it)",
                self.refresh_schedule
            );
            return Err(invalid("GRANTLINE_REFRESH_SCHEDULE", never));
        }
        let lease = parse_duration("GRANTLINE_REFRESH_LEASE", &self.refresh_lease)?;
        let provider_timeout =
            parse_duration("GRANTLINE_PROVIDER_TIMEOUT", &self.provider_timeout)?;
        if provider_timeout >= lease {
            return Err(invalid(
                "GRANTLINE_PROVIDER_TIMEOUT",
                "must be shorter than GRANTLINE_REFRESH_LEASE, or a slow provider could answer \
                 after the lease passed to another refresher",
            ));
        }
        Ok(RefreshConfig {
            margin,
            window,
            schedule,
            concurrency: parse_positive(
                "GRANTLINE_REFRESH_CONCURRENCY",
                &self.refresh_concurrency,
            )?,
            idle_after: parse_duration("GRANTLINE_REFRESH_IDLE_AFTER", &self.refresh_idle_after)?,
            active_for: parse_duration("GRANTLINE_REFRESH_ACTIVE_FOR", &self.refresh_active_for)?,
            rate: match self.refresh_rate.trim().parse::<u32>() {
                Ok(rate) => std::num::NonZeroU32::new(rate),
                Err(_) => {
                    return Err(invalid(
                        "GRANTLINE_REFRESH_RATE",
                        format!(
                            "{:?} is not a whole number of refreshes per second (0: unpaced)",
                            self.refresh_rate
                        ),
                    ));
                }
            },
            lease,
            provider_timeout,
        })
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|s| !s.is_empty())
}

/// The largest count a setting takes: far past what one process can hold open, and within
/// what its semaphores can count.
const MOST: usize = 1_000_000_000;

fn parse_positive(variable: &'static str, text: &str) -> Result<usize, ConfigError> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MOST).contains(&n) => Ok(n),
        _ => Err(invalid(
            variable,
            format!("{text:?} is not a whole number from 1 to {MOST}"),
        )),
    }
}

/// A comma-separated list of origins (`https://app.example.com`, `http://localhost:3000`),
/// each kept as a browser sends it in `Origin` (host lower-case, default port left out).
fn parse_origins(variable: &'static str, text: &str) -> Result<Vec<String>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|origin| {
            let url = url::Url::parse(origin).ok().filter(|url| {
                matches!(url.scheme(), "http" | "https")
                    && url.has_host()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.path() == "/"
                    && url.query().is_none()
                    && url.fragment().is_none()
            });
            match url {
                Some(url) => Ok(url.origin().ascii_serialization()),
                None => Err(invalid(
                    variable,
                    format!("{origin:?} is not an origin like https://app.example.com"),
                )),
            }
        })
        .collect()
}

/// The longest duration setting: a century, so now ± it fits every store's timestamps.
const LONGEST_SETTING: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn parse_duration(variable: &'static str, text: &str) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d > LONGEST_SETTING => Err(invalid(variable, "must be at most 100 years")),
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(invalid(variable, "must be longer than zero")),
        Err(e) => Err(invalid(
            variable,
            format!("{text:?} is not a duration like 90s, 15m or 7d: {e}"),
        )),
    }
}

fn parse_roles(text: &str) -> Result<Roles, ConfigError> {
    let mut roles = Roles {
        api: false,
        projections: false,
        scheduler: false,
        webhooks: false,
        compactor: false,
    };
    for role in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match role {
            "api" => roles.api = true,
            "projections" => roles.projections = true,
            "scheduler" => roles.scheduler = true,
            "webhooks" => roles.webhooks = true,
            "compactor" => roles.compactor = true,
            other => {
                return Err(invalid(
                    "GRANTLINE_ROLES",
                    format!(
                        "unknown role {other:?}; the roles are api, projections, scheduler, \
                         webhooks, compactor"
                    ),
                ));
            }
        }
    }
    if roles
        == (Roles {
            api: false,
            projections: false,
            scheduler: false,
            webhooks: false,
            compactor: false,
        })
    {
        return Err(invalid("GRANTLINE_ROLES", "name at least one role"));
    }
    Ok(roles)
}

fn parse_log_format(text: &str) -> Result<LogFormat, ConfigError> {
    match text.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid(
            "GRANTLINE_LOG_FORMAT",
            format!("{other:?} is neither text nor json"),
        )),
    }
}
