//! Grantline: an OAuth connection and token service that speaks the Nango Connections API.
//!
//! This crate is the composition root: configuration, start-up, the HTTP API and the command
//! line, and the services the API calls (connections, integrations, OAuth flows, history). The
//! domain, the read models and the workers live in their own crates.
//!
//! The HTTP layer sits on top: the services know nothing of it, and only the composition root
//! (`startup`) builds its router.

pub mod cli;
pub mod config;
pub mod connections;
pub mod history;
pub mod http;
pub mod integrations;
pub mod oauth;
pub mod startup;
pub mod state;
pub mod telemetry;
