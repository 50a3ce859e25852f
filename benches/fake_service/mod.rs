//! What the refresh benchmarks share: a fresh PostgreSQL database, a master key and the
//! in-process fake provider (`tests/api/fake_provider.rs`) with its providers file, a real
//! `grantline serve` started on them, the integration `fake` and connections imported into it.

#[path = "../../tests/api/fake_provider.rs"]
#[allow(dead_code)]
pub mod fake_provider;

#[path = "../../tests/api/fake_api.rs"]
#[allow(dead_code)]
pub mod fake_api;

use std::path::PathBuf;

use domain::testing::TestDatabase;
use serde_json::json;

use crate::support::{self, Server};
use fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider};

/// The integration of the fake provider.
pub const KEY: &str = "fake";

/// A database, its master key and the fake provider, with a providers file naming it.
pub struct Setup {
    pub db: TestDatabase,
    pub key: String,
    pub fake: FakeProvider,
    /// The `grantline` binary [`Setup::start`] runs: this build's unless a benchmark sets
    /// another (a baseline's).
    pub binary: PathBuf,
    providers: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub async fn new() -> Self {
        Self::with_template("").await
    }

    /// As [`Setup::new`], with YAML lines added to the `fake` template (`{base}`: the
    /// provider's address).
    pub async fn with_template(extra: &str) -> Self {
        let db = TestDatabase::postgres().await;
        let key = domain::keys::MasterKey::generate().1.as_str().to_owned();
        let fake = FakeProvider::start().await;
        let (dir, providers) = fake.providers_file(extra);
        Self {
            db,
            key,
            fake,
            binary: support::grantline(),
            providers,
            _dir: dir,
        }
    }

    /// `grantline serve` (`binary`) on the database with the fake provider's templates and
    /// the flags `extra`, logging at `rust_log`.
    pub fn start(&self, extra: &[&str], rust_log: &str) -> Server {
        let providers = self.providers.to_string_lossy();
        let mut args = vec!["--providers-file", providers.as_ref()];
        args.extend_from_slice(extra);
        Server::start(&self.binary, self.db.url(), &self.key, &args, rust_log)
    }

    /// Creates the integration `fake` on the server at `base`.
    pub async fn create_integration(&self, client: &reqwest::Client, base: &str) {
        let response = client
            .post(format!("{base}/config"))
            .json(&json!({
                "provider_config_key": KEY, "provider": KEY,
                "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
            }))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }

    /// Imports connection `id` into the server at `base` with these tokens, the access token
    /// expiring `expires_in` seconds from now, after making `refresh` live at the provider.
    pub async fn import(
        &self,
        client: &reqwest::Client,
        base: &str,
        id: &str,
        (access, refresh): (&str, &str),
        expires_in: i64,
    ) {
        self.fake.accept_refresh_token(refresh);
        let body = json!({
            "provider_config_key": KEY, "connection_id": id,
            "access_token": access, "refresh_token": refresh,
            "expires_at": chrono::Utc::now().timestamp() + expires_in,
        });
        let response = client
            .post(format!("{base}/connection"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
}
