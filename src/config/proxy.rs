//! The proxy's settings: where `Base-Url-Override` may point, and how long a proxied call may
//! take.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, invalid, parse_duration};

/// Proxy settings.
#[derive(Clone, Debug, Args)]
pub struct ProxyArgs {
    /// Hosts a proxied call's `Base-Url-Override` may name, comma-separated (`api.example.com`,
    /// or `*.example.com` for its subdomains). Empty: overrides are refused.
    #[arg(long, env = "GRANTLINE_PROXY_ALLOWED_HOSTS", default_value = "")]
    pub proxy_allowed_hosts: String,

    /// The longest a proxied call may wait for the provider's answer, retries included (at most
    /// 90% of GRANTLINE_REQUEST_TIMEOUT).
    #[arg(long, env = "GRANTLINE_PROXY_TIMEOUT", default_value = "30s")]
    pub proxy_timeout: String,
}

/// The validated proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Lower-cased host names; a leading `*.` allows the subdomains.
    pub allowed_hosts: Vec<String>,
    pub timeout: Duration,
}

impl ProxyConfig {
    /// Whether `Base-Url-Override` may name `host`.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix("*.") {
                Some(parent) => host
                    .strip_suffix(parent)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => *allowed == host,
            })
    }
}

impl ProxyArgs {
    pub fn validate(&self, request_timeout: Duration) -> Result<ProxyConfig, ConfigError> {
        // The proxy answers (504) before the server's request timeout (408) would.
        let timeout = parse_duration("GRANTLINE_PROXY_TIMEOUT", &self.proxy_timeout)?
            .min(request_timeout.mul_f64(0.9));
        let allowed_hosts = self
            .proxy_allowed_hosts
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .map(|host| {
                let name = host.strip_prefix("*.").unwrap_or(&host);
                let valid = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
                if valid {
                    Ok(host)
                } else {
                    Err(invalid(
                        "GRANTLINE_PROXY_ALLOWED_HOSTS",
                        format!("{host:?} is not a host name like api.example.com"),
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(ProxyConfig {
            allowed_hosts,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_match_exactly_or_as_subdomains() {
        let config = ProxyArgs {
            proxy_allowed_hosts: "api.example.com, *.corp.example".into(),
            proxy_timeout: "30s".into(),
        }
        .validate(Duration::from_secs(60))
        .expect("valid");
        assert!(config.allows("API.example.com"));
        assert!(!config.allows("example.com"));
        assert!(!config.allows("evil-api.example.com"));
        assert!(config.allows("eu.corp.example"));
        assert!(!config.allows("corp.example"));
        assert!(!config.allows("evilcorp.example"));
        for bad in ["http://x", "a/b", "*."] {
            let args = ProxyArgs {
                proxy_allowed_hosts: bad.into(),
                proxy_timeout: "30s".into(),
            };
            assert!(args.validate(Duration::from_secs(60)).is_err(), "{bad}");
        }
        let slow = ProxyArgs {
            proxy_allowed_hosts: String::new(),
            proxy_timeout: "60s".into(),
        };
        let clamped = slow.validate(Duration::from_secs(60)).expect("valid");
        assert_eq!(clamped.timeout, Duration::from_secs(54));
    }
}
