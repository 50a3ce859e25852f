//! TLS to PostgreSQL with rustls, as libpq's `sslmode` and `sslrootcert` describe it, for every
//! connection the store opens (the pool, the notifier, the migrations):
//!
//! | `sslmode` | encrypted | certificate checked against the roots | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | only when `sslrootcert` is given (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! `sslrootcert` names a PEM file of trusted roots, or is `system` for the operating system's
//! store; `verify-ca` and `verify-full` need one. tokio-postgres knows neither `verify-*` nor
//! `sslrootcert`, so both are taken out of the URL here and the rest is parsed as it always was.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// How a connection is secured: libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(invalid(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                )));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// Where the store connects and how: the driver's configuration and the TLS connector.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    mode: SslMode,
    root: Option<String>,
}

impl fmt::Debug for Target {
    // The configuration may hold a password: only the TLS settings are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("sslmode", &self.mode)
            .field("sslrootcert", &self.root)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Parses a PostgreSQL URL (or `key=value` string) with its `sslmode` and `sslrootcert`.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let (rest, mode, root) = take_tls_options(url)?;
        let mode = mode
            .as_deref()
            .map_or(Ok(SslMode::Prefer), SslMode::parse)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e| invalid(super::error_text(&e)))?;
        config.ssl_mode(match mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        });
        let roots = match root.as_deref() {
            None => None,
            Some("system") => Some(system_roots()?),
            Some(path) => Some(file_roots(path)?),
        };
        let check = match (mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(invalid(format!(
                    "sslmode={} needs sslrootcert: a PEM file of trusted roots, or `system`",
                    mode.name()
                )));
            }
            (SslMode::VerifyFull, Some(roots)) => Check::Full(roots),
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Check::Chain(roots),
            (_, _) => Check::Nothing,
        };
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(client_config(check)?),
            mode,
            root,
        })
    }

    /// Says which TLS settings a connection failure happened under.
    /// Where the connections go, as `host:port` (or the socket directory), for log lines.
    pub fn address(&self) -> String {
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => format!("{host}:{port}"),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(dir)) => format!("{}:{port}", dir.display()),
            None => format!("localhost:{port}"),
        }
    }

    pub fn connect_error(&self, e: &tokio_postgres::Error) -> StoreError {
        let root = self
            .root
            .as_deref()
            .map(|r| format!(", sslrootcert={r}"))
            .unwrap_or_default();
        // The driver's own text leaves the cause (a refused certificate, say) to its sources.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        StoreError::Database(format!(
            "cannot connect to PostgreSQL (sslmode={}{root}): {text}",
            self.mode.name()
        ))
    }
}

fn invalid(reason: String) -> StoreError {
    StoreError::Database(format!("invalid PostgreSQL URL: {reason}"))
}

/// `url` (a `postgres://` URL, the only form the store opens) without `sslmode` and
/// `sslrootcert`, and their values.
fn take_tls_options(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid(
            "the URL must start with postgres:// or postgresql://".into(),
        ));
    }
    let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let (mut mode, mut root, mut kept) = (None, None, Vec::new());
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "sslmode" => mode = Some(value.into_owned()),
            "sslrootcert" => root = Some(value.into_owned()),
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((parsed.into(), mode, root))
}

fn file_roots(path: &str) -> Result<RootCertStore, StoreError> {
    let unreadable = |e: &dyn fmt::Display| invalid(format!("sslrootcert {path}: {e}"));
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(unreadable(&"no usable certificate in it"));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, StoreError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(invalid(
            "sslrootcert=system: the system has no trusted roots".into(),
        ));
    }
    Ok(roots)
}

/// What is checked of the server's certificate.
enum Check {
    Nothing,
    /// The chain up to one of these roots, not the host name.
    Chain(RootCertStore),
    /// The chain and the host name.
    Full(RootCertStore),
}

fn client_config(check: Check) -> Result<ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Database(format!("TLS set-up failed: {e}")))?;
    let webpki = |roots: RootCertStore| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| StoreError::Database(format!("TLS set-up failed: {e}")))
    };
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Full(roots) => webpki(roots)?,
        Check::Chain(roots) => Arc::new(Lenient {
            chain: Some(webpki(roots)?),
            algorithms,
        }),
        Check::Nothing => Arc::new(Lenient {
            chain: None,
            algorithms,
        }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `require`, `prefer` and `verify-ca`: the chain checked against the roots when there are
/// any, the host name never. The handshake's signatures are always checked against the
/// certificate, so the connection is at least encrypted to whoever holds its key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The name is checked last, so a name error means everything else held.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_options_are_taken_out_of_a_url_and_the_rest_kept() {
        let (rest, mode, root) = take_tls_options(
            "postgres://u:p%40ss@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%40ss@db:5432/app?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        let (rest, mode, root) = take_tls_options("postgres://db/app?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://db/app");
        assert_eq!((mode.as_deref(), root), (Some("disable"), None));
    }

    #[test]
    fn bad_tls_options_are_refused_with_what_to_do() {
        let message = |url: &str| Target::parse(url).unwrap_err().to_string();
        assert!(message("postgres://db/app?sslmode=allow").contains("is not one of"));
        assert!(message("postgres://db/app?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(
            message("postgres://db/app?sslmode=verify-ca&sslrootcert=/no/such/file.pem")
                .contains("sslrootcert /no/such/file.pem")
        );
        let target = Target::parse("postgres://u:secret@db/app?sslmode=require").unwrap();
        assert!(!format!("{target:?}").contains("secret"));
    }
}
