//! How long the history keeps routine refresh cycles and lifecycle events (the compactor's
//! settings, for `serve` and `log compact`).

use std::time::Duration;

use clap::Args;
use workers::compactor::Retention;

use super::{ConfigError, invalid, parse_duration};

/// History retention.
#[derive(Clone, Debug, Args)]
pub struct RetentionArgs {
    /// How long routine refresh cycles (a lease and its successful refresh) stay in the history
    /// once a later event has replaced them; `forever` keeps them.
    #[arg(long, env = "GRANTLINE_HISTORY_RETENTION", default_value = "90d")]
    pub history_retention: String,

    /// How long superseded refresh failures, lapsed leases and overwritten metadata changes stay;
    /// `forever` (the default) keeps them. Authorizations and deletions always stay.
    #[arg(
        long,
        env = "GRANTLINE_HISTORY_LIFECYCLE_RETENTION",
        default_value = "forever"
    )]
    pub history_lifecycle_retention: String,
}

impl RetentionArgs {
    pub fn validate(&self) -> Result<Retention, ConfigError> {
        let routine = retention("GRANTLINE_HISTORY_RETENTION", &self.history_retention)?;
        let lifecycle = retention(
            "GRANTLINE_HISTORY_LIFECYCLE_RETENTION",
            &self.history_lifecycle_retention,
        )?;
        if lifecycle.is_some_and(|l| routine.is_none_or(|r| l < r)) {
            return Err(invalid(
                "GRANTLINE_HISTORY_LIFECYCLE_RETENTION",
                "keep lifecycle events at least as long as routine cycles \
                 (GRANTLINE_HISTORY_RETENTION)",
            ));
        }
        Ok(Retention {
            routine: routine.unwrap_or(Duration::MAX),
            lifecycle,
        })
    }
}

/// A retention: a duration of at least a day, or `forever` (`None`).
fn retention(variable: &'static str, text: &str) -> Result<Option<Duration>, ConfigError> {
    if text.trim() == "forever" {
        return Ok(None);
    }
    let duration = parse_duration(variable, text)?;
    if duration < Duration::from_secs(24 * 3600) {
        return Err(invalid(
            variable,
            "a retention is at least 1d (or forever): the refresh fence and webhooks need the \
             recent history",
        ));
    }
    Ok(Some(duration))
}
