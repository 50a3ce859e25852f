//! Grantline's workers: the provider HTTP client (OAuth 2.0 token requests, OAuth 1.0a signed
//! requests, and the parsing of their answers), and later the refresh service and its scheduler.

pub mod oauth1;
pub mod provider;
