//! The options of the subcommands other than `serve`: the operator's tools.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{DatabaseArgs, RetentionArgs};

/// Options of `grantline import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file of JSON lines, or `-` for standard input.
    #[arg(required_unless_present = "from_nango", conflicts_with = "from_nango")]
    pub file: Option<PathBuf>,
    /// Import from a self-hosted Nango's PostgreSQL database instead (postgres://…): its
    /// integrations and the live connections of one environment, secrets opened with
    /// NANGO_ENCRYPTION_KEY.
    #[arg(long, value_name = "URL")]
    pub from_nango: Option<String>,
    /// Nango's encryption key (base64 of 32 bytes), for --from-nango.
    #[arg(long, env = "NANGO_ENCRYPTION_KEY", hide_env_values = true)]
    pub nango_encryption_key: Option<String>,
    /// The schema Nango's tables are in, for --from-nango.
    #[arg(long, default_value = "nango")]
    pub nango_schema: String,
    /// The Nango environment to import, for --from-nango.
    #[arg(long, default_value = "prod")]
    pub nango_environment: String,
    /// Leave out Nango connections of auth modes Grantline does not take yet (counted in the
    /// summary) instead of refusing the import.
    #[arg(long)]
    pub skip_unsupported: bool,
    /// Provider templates besides the built-in ones (as for `serve`), for --from-nango.
    #[arg(long, env = "GRANTLINE_PROVIDERS_FILE")]
    pub providers_file: Option<PathBuf>,
    /// Replace the credentials of connections that exist (by default they are kept, so running
    /// the same import again changes nothing).
    #[arg(long)]
    pub replace: bool,
    /// Check everything and report, without writing.
    #[arg(long)]
    pub dry_run: bool,
    /// Connections per write.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// Options of `grantline history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The connection's id.
    pub connection_id: String,
    /// The integration's key.
    #[arg(long)]
    pub provider_config_key: String,
    /// Print the entries as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Follow the log and print each event, redacted (no secret, no metadata value), until
    /// ctrl-c or SIGTERM.
    Tail {
        /// Start at the beginning of the log instead of at its end.
        #[arg(long)]
        from_start: bool,
        /// Print one JSON object per event.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Print each projection's checkpoint, the log's head position and the lag.
    Status(DatabaseArgs),
    /// Replay the whole log into a shadow table and swap it in; the API keeps serving meanwhile.
    Rebuild {
        /// connections or integrations
        name: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random master key (base64 of 32 bytes) for GRANTLINE_ENCRYPTION_KEY.
    Generate,
    /// Re-wrap every data key under GRANTLINE_ENCRYPTION_KEY, reading the old ones with
    /// GRANTLINE_ENCRYPTION_KEY_PREVIOUS. Safe to interrupt and run again.
    Rotate(DatabaseArgs),
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Remove what is past the history's retention now (one pass of the compactor role), and
    /// report what was summarized.
    Compact {
        #[command(flatten)]
        retention: RetentionArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}
