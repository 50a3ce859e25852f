//! The projections crate's tests, one binary: the runner, idempotence, unreadable events and
//! rebuilds, on PostgreSQL and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

extern crate grantline_projections as projections;

mod bounds;
mod cache;
mod due;
mod runner;

use std::sync::Arc;

use chrono::Utc;
use domain::commands::{AuthorizeConnection, Commands, IntegrationConfig};
use domain::connection::{ConnectionKey, Flow, MetadataMode};
use domain::credentials::{ClientSecret, Credentials};
use domain::keys::{MasterKey, Vault};
use domain::store::Backend;
use domain::testing::TestDatabase;
use projections::queries::{self, ConnectionRecord, IntegrationRecord};
use projections::{ReadModels, Runner};

/// A backend with a vault and the command service.
pub struct Fixture {
    pub backend: Backend,
    pub read_models: ReadModels,
    pub commands: Commands,
}

pub async fn fixture(db: &TestDatabase) -> Fixture {
    let backend = db.open().await;
    let repository: Arc<dyn domain::keys::KeyRepository> = backend.key_repository();
    let vault = Vault::open(repository, MasterKey::generate().0, None)
        .await
        .unwrap();
    Fixture {
        commands: Commands::new(backend.clone(), vault),
        read_models: ReadModels::open(&backend),
        backend,
    }
}

impl Fixture {
    pub async fn integration(&self, key: &str) {
        self.commands
            .create_integration(
                key,
                IntegrationConfig {
                    provider: "github".into(),
                    oauth_client_id: "client".into(),
                    client_secret: ClientSecret::new("secret"),
                    oauth_scopes: vec!["repo".into()],
                    display_name: None,
                },
                Utc::now(),
            )
            .await
            .unwrap();
    }

    /// The read model's record of connection `id` of `key`, if it has one.
    pub async fn find(&self, key: &str, id: &str) -> Option<ConnectionRecord> {
        queries::find_connection(&self.read_models, &ConnectionKey::new(key, id))
            .await
            .unwrap()
    }

    /// The read model's record of the integration `key`, if it has one.
    pub async fn find_integration(&self, key: &str) -> Option<IntegrationRecord> {
        queries::find_integration(&self.read_models, key)
            .await
            .unwrap()
    }

    pub async fn connection(&self, key: &str, id: &str) {
        self.commands
            .authorize_connection(AuthorizeConnection {
                only_new: Default::default(),
                only_existing: Default::default(),
                ownership: Default::default(),
                key: ConnectionKey::new(key, id),
                provider: "github".into(),
                flow: Flow::Import,
                credentials: Credentials::OAuth2 {
                    access_token: format!("token-{id}"),
                    refresh_token: Some(format!("refresh-{id}")),
                    expires_at: Some(Utc::now() + chrono::Duration::hours(1)),
                    raw: serde_json::json!({}),
                },
                scopes: vec![],
                connection_config: serde_json::Map::new(),
                now: Utc::now(),
                metadata: None,
            })
            .await
            .unwrap();
    }

    /// Sets the metadata of connection `id` of integration `key`.
    pub async fn metadata(
        &self,
        key: &str,
        id: &str,
        metadata: serde_json::Value,
        mode: MetadataMode,
    ) {
        self.commands
            .set_metadata(&ConnectionKey::new(key, id), metadata, mode, Utc::now())
            .await
            .unwrap();
    }
}

/// Catches up, waiting out PostgreSQL's horizon (another test's open transaction) if needed.
pub async fn settle(runner: &Runner) {
    for _ in 0..300 {
        runner.catch_up().await.unwrap();
        let status = runner.status().await.unwrap();
        // Unlike the lag, `caught_up` also counts what the horizon still hides.
        if status.iter().all(|s| s.caught_up) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the projections did not catch up");
}
