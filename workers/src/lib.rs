//! Grantline's workers: the provider HTTP client (OAuth 2.0 token requests, OAuth 1.0a signed
//! requests, and the parsing of their answers), the refresh service (the only code that
//! refreshes tokens) with its proactive scheduler, the webhook subscribers that follow the event
//! log, the OAuth session sweeper, and the registry of WebSocket clients with the relay that
//! carries flow outcomes between instances, and the compactor that bounds the history.

pub mod client_credentials;
pub mod compactor;
pub mod messages;
pub mod oauth1;
pub mod provider;
pub mod refresh;
pub mod scheduler;
pub mod sessions;
pub mod sockets;
mod transport;
pub mod webhooks;
