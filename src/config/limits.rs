//! The server's limits: timeouts and caps on connections and WebSockets (see `crate::server`).

use clap::Args;

use super::{ConfigError, invalid, parse_duration, parse_positive};
use crate::server::ServerLimits;

/// Options of `grantline serve` that bound what one client can hold.
#[derive(Clone, Debug, Args)]
pub struct LimitArgs {
    /// How long a request head may take to arrive (a new connection's first included).
    #[arg(long, env = "GRANTLINE_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: String,

    /// How long one request may take, its body included; longer than GRANTLINE_PROVIDER_TIMEOUT.
    #[arg(long, env = "GRANTLINE_REQUEST_TIMEOUT", default_value = "60s")]
    pub request_timeout: String,

    /// How long a keep-alive connection may carry nothing (longer than a load balancer's).
    #[arg(long, env = "GRANTLINE_IDLE_TIMEOUT", default_value = "75s")]
    pub idle_timeout: String,

    /// Open connections at most; past it new ones get 503.
    #[arg(long, env = "GRANTLINE_MAX_CONNECTIONS", default_value = "4096")]
    pub max_connections: String,

    /// Open WebSockets (`GET /`) at most.
    #[arg(long, env = "GRANTLINE_MAX_WEBSOCKETS", default_value = "1000")]
    pub max_websockets: String,

    /// Open WebSockets of one client address at most.
    #[arg(
        long,
        env = "GRANTLINE_MAX_WEBSOCKETS_PER_CLIENT",
        default_value = "20"
    )]
    pub max_websockets_per_client: String,

    /// How long a WebSocket may go without a frame from its client (pinged at half of it).
    #[arg(long, env = "GRANTLINE_WEBSOCKET_IDLE_TIMEOUT", default_value = "60s")]
    pub websocket_idle_timeout: String,

    /// OAuth flows open at once (started, not yet finished or expired), on all instances.
    #[arg(long, env = "GRANTLINE_MAX_OPEN_FLOWS", default_value = "10000")]
    pub max_open_flows: String,

    /// OAuth flows one client address may start per minute (on this instance).
    #[arg(long, env = "GRANTLINE_FLOWS_PER_MINUTE", default_value = "60")]
    pub flows_per_minute: String,
}

impl LimitArgs {
    /// Checks every value; the request timeout must leave room for a provider call.
    pub fn validate(
        &self,
        provider_timeout: std::time::Duration,
    ) -> Result<ServerLimits, ConfigError> {
        let request_timeout = parse_duration("GRANTLINE_REQUEST_TIMEOUT", &self.request_timeout)?;
        if request_timeout <= provider_timeout {
            return Err(invalid(
                "GRANTLINE_REQUEST_TIMEOUT",
                "must be longer than GRANTLINE_PROVIDER_TIMEOUT, or a refresh on read could be \
                 cut off",
            ));
        }
        let websocket_idle_timeout = parse_duration(
            "GRANTLINE_WEBSOCKET_IDLE_TIMEOUT",
            &self.websocket_idle_timeout,
        )?;
        if websocket_idle_timeout < std::time::Duration::from_secs(1) {
            return Err(invalid(
                "GRANTLINE_WEBSOCKET_IDLE_TIMEOUT",
                "must be at least 1s (a socket is pinged at half of it)",
            ));
        }
        Ok(ServerLimits {
            header_timeout: parse_duration("GRANTLINE_HEADER_TIMEOUT", &self.header_timeout)?,
            request_timeout,
            idle_timeout: parse_duration("GRANTLINE_IDLE_TIMEOUT", &self.idle_timeout)?,
            max_connections: parse_positive("GRANTLINE_MAX_CONNECTIONS", &self.max_connections)?,
            max_websockets: parse_positive("GRANTLINE_MAX_WEBSOCKETS", &self.max_websockets)?,
            max_websockets_per_client: parse_positive(
                "GRANTLINE_MAX_WEBSOCKETS_PER_CLIENT",
                &self.max_websockets_per_client,
            )?,
            websocket_idle_timeout,
            max_open_flows: parse_positive("GRANTLINE_MAX_OPEN_FLOWS", &self.max_open_flows)?,
            flows_per_minute: parse_positive("GRANTLINE_FLOWS_PER_MINUTE", &self.flows_per_minute)?,
        })
    }
}
