//! Where the data lives and how it is encrypted: the database URL, the data directory, the master
//! keys and the pool.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use domain::keys::{CacheBudget, MasterKey};

use super::cache::parse_budget;
use super::{ConfigError, invalid, parse_duration, parse_positive};

/// Where the data lives and how it is encrypted.
#[derive(Clone, Debug, Args)]
pub struct DatabaseArgs {
    /// Database: postgres://user@host:port/db or sqlite://path. Default: a SQLite file in the data
    /// directory.
    #[arg(long, env = "GRANTLINE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory for the embedded SQLite database and the generated master-key file.
    #[arg(long, env = "GRANTLINE_DATA_DIR", default_value = ".grantline")]
    pub data_dir: PathBuf,

    /// Master key, base64 of 32 bytes. Required with PostgreSQL; with SQLite, a key file in the
    /// data directory is created on first start when it is not set.
    #[arg(long, env = "GRANTLINE_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,

    /// The previous master key, during a key rotation.
    #[arg(
        long,
        env = "GRANTLINE_ENCRYPTION_KEY_PREVIOUS",
        hide_env_values = true
    )]
    pub encryption_key_previous: Option<String>,

    /// Maximum database connections of this instance's pool (it also holds one for LISTEN).
    #[arg(long, env = "GRANTLINE_DATABASE_POOL_SIZE", default_value = "16")]
    pub database_pool_size: String,

    /// How long a request waits for a database connection before it is answered 503.
    #[arg(long, env = "GRANTLINE_DATABASE_POOL_WAIT", default_value = "5s")]
    pub database_pool_wait: String,

    /// Memory for opened data keys (about 128 bytes each), as a size (`16MiB`) or a number of
    /// keys; past it, the least useful are evicted (a miss costs one query and an unwrap).
    #[arg(long, env = "GRANTLINE_DATA_KEY_CACHE", default_value = "16MiB")]
    pub data_key_cache: String,
}

/// Where the master key comes from.
#[derive(Clone, Debug)]
pub enum MasterKeySource {
    /// Given in `GRANTLINE_ENCRYPTION_KEY`.
    Configured(Box<MasterKey>),
    /// The embedded default's key file (created with mode 0600 if missing).
    File(PathBuf),
}

/// Validated storage settings.
#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub url: String,
    pub master_key: MasterKeySource,
    pub previous_master_key: Option<MasterKey>,
    pub pool_size: usize,
    /// How long a request waits for a database connection.
    pub pool_wait: Duration,
    /// Opened data keys the vault keeps in memory.
    pub data_key_cache: CacheBudget,
}

impl DatabaseArgs {
    pub fn validate(&self) -> Result<DatabaseConfig, ConfigError> {
        let url = match &self.database_url {
            Some(url) => {
                if !(url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.starts_with("sqlite://"))
                {
                    return Err(invalid(
                        "GRANTLINE_DATABASE_URL",
                        "must start with postgres:// or sqlite://",
                    ));
                }
                if let Some(path) = url.strip_prefix("sqlite://")
                    && !is_file_path(path)
                {
                    // No path or `:memory:` would open a private temporary database per
                    // connection; a query would be part of the file's name.
                    return Err(invalid(
                        "GRANTLINE_DATABASE_URL",
                        "sqlite:// takes a file's path and nothing else, e.g. \
                         sqlite:///var/lib/grantline/grantline.db",
                    ));
                }
                url.clone()
            }
            None => format!("sqlite://{}", self.data_dir.join("grantline.db").display()),
        };
        let is_postgres = !url.starts_with("sqlite://");
        let master_key = match &self.encryption_key {
            Some(text) => MasterKeySource::Configured(Box::new(
                MasterKey::from_base64(text)
                    .map_err(|e| invalid("GRANTLINE_ENCRYPTION_KEY", e.to_string()))?,
            )),
            None if is_postgres => {
                return Err(invalid(
                    "GRANTLINE_ENCRYPTION_KEY",
                    "required with PostgreSQL, so that every instance shares it; create one \
                     with `grantline keys generate`",
                ));
            }
            None => MasterKeySource::File(self.data_dir.join("master.key")),
        };
        let uses_data_dir = self.database_url.is_none() || self.encryption_key.is_none();
        // The nearest part of the path that exists must be a directory.
        let existing = self.data_dir.ancestors().find(|dir| dir.exists());
        if uses_data_dir && existing.is_some_and(|dir| !dir.is_dir()) {
            return Err(invalid(
                "GRANTLINE_DATA_DIR",
                format!("{} is not a directory", self.data_dir.display()),
            ));
        }
        let previous_master_key = self
            .encryption_key_previous
            .as_deref()
            // Set and empty, as a template leaves it when there is no rotation: none.
            .filter(|key| !key.is_empty())
            .map(MasterKey::from_base64)
            .transpose()
            .map_err(|e| invalid("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", e.to_string()))?;
        let pool_size = parse_positive("GRANTLINE_DATABASE_POOL_SIZE", &self.database_pool_size)?;
        let pool_wait = parse_duration("GRANTLINE_DATABASE_POOL_WAIT", &self.database_pool_wait)?;
        Ok(DatabaseConfig {
            url,
            master_key,
            previous_master_key,
            pool_size,
            pool_wait,
            data_key_cache: parse_budget("GRANTLINE_DATA_KEY_CACHE", &self.data_key_cache)?,
        })
    }
}

/// Whether `path` (after `sqlite://`) names a file: not empty, not `:memory:`, not a directory,
/// no query and no surrounding blanks.
fn is_file_path(path: &str) -> bool {
    !path.is_empty()
        && path != ":memory:"
        && !path.ends_with('/')
        && !path.contains('?')
        && path.trim() == path
}
