//! Grantline's workers: the provider HTTP client (OAuth 2.0 token requests, OAuth 1.0a signed
//! requests, and the parsing of their answers), and the refresh service
//! (the only code that refreshes tokens) with its proactive scheduler, and the webhook
//! subscribers that follow the event log.

pub mod oauth1;
pub mod provider;
pub mod refresh;
pub mod scheduler;
mod transport;
pub mod webhooks;
