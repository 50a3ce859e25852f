//! Grantline: an OAuth connection and token service that speaks the Nango Connections API.
//!
//! This crate is the composition root: configuration, start-up, the HTTP API and the command
//! line, and the services the API calls (connections, integrations, OAuth flows, history). The
//! domain, the read models and the workers live in their own crates.
//!
//! The HTTP layer sits on top: the services know nothing of it, and only the composition root
//! (`startup`) builds its router.

/// `impl From<E> for $target` for each listed error type `E` that wraps a store error in its
/// `Store` variant: that store error converts as `$target`'s `From<StoreError>` says, anything
/// else becomes `$target::Internal` with its message.
macro_rules! from_store_wrapping_errors {
    ($target:ty: $($source:ident),+ $(,)?) => {
        $(
            impl From<$source> for $target {
                fn from(e: $source) -> Self {
                    match e {
                        $source::Store(e) => e.into(),
                        other => Self::Internal(other.to_string()),
                    }
                }
            }
        )+
    };
}

pub mod cli;
pub mod config;
pub mod connect_sessions;
pub mod connections;
pub mod ended;
pub mod history;
pub mod http;
pub mod import;
pub mod integrations;
pub mod oauth;
pub mod proxy;
pub mod server;
pub mod startup;
pub mod state;
pub mod telemetry;
