//! The service with the fake provider (`fake_provider.rs`) as its integration `fake`: one or
//! more instances on one database, reading one providers file, and the connections a test
//! imports into `fake` with refresh tokens the provider accepts.

use chrono::Utc;
use domain::connection::ConnectionEvent;
use domain::event::DomainEvent;
use domain::store::{Backend, StoreOptions};
use domain::testing::TestDatabase;
use grantline::state::AppState;
use serde_json::json;

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider};
use crate::{TestApp, config_on, new_key, ok_json, spawn_with_state};

/// The integration every [`FakeService`] has.
pub const KEY: &str = "fake";

/// The connection of the tests that need only one, in [`KEY`].
pub const ID: &str = "conn-1";
/// The connection [`ID`]'s URL (`GET` reads it, `DELETE` deletes it).
pub const CONNECTION: &str = "/connection/conn-1?provider_config_key=fake";
/// [`CONNECTION`] read with a forced refresh.
pub const FORCED: &str = "/connection/conn-1?provider_config_key=fake&force_refresh=true";

/// Running instances of the service on one database, the fake provider, and its integration.
pub struct FakeService {
    /// The instances, in start order; the first one is [`FakeService::app`].
    pub apps: Vec<TestApp>,
    /// The instances' shared state (their services), in the same order.
    pub states: Vec<AppState>,
    pub fake: FakeProvider,
    db_url: String,
    _dir: tempfile::TempDir,
}

/// How to start a [`FakeService`]: one instance, the plain `fake` template and no extra flags
/// unless told otherwise.
pub struct Setup<'a> {
    db: &'a TestDatabase,
    template: String,
    instances: usize,
    args: Vec<String>,
}

impl FakeService {
    pub fn on(db: &TestDatabase) -> Setup<'_> {
        Setup {
            db,
            template: String::new(),
            instances: 1,
            args: Vec::new(),
        }
    }

    /// The first instance.
    pub fn app(&self) -> &TestApp {
        &self.apps[0]
    }

    /// The first instance's shared state.
    pub fn state(&self) -> &AppState {
        &self.states[0]
    }

    /// Imports (authorizes) the connection `id` of `fake` with these tokens, the access token
    /// expiring `expires_in` seconds from now (negative: already expired; none: no known
    /// expiry), after making `refresh` a live refresh token at the provider. Expects 201.
    pub async fn import(&self, id: &str, access: &str, refresh: &str, expires_in: Option<i64>) {
        self.fake.accept_refresh_token(refresh);
        let mut body = json!({
            "provider_config_key": KEY, "connection_id": id,
            "access_token": access, "refresh_token": refresh,
        });
        if let Some(expires_in) = expires_in {
            body["expires_at"] = json!(Utc::now().timestamp() + expires_in);
        }
        let response = self.app().post_json("/connection", &body).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }

    /// The events of connection `id`'s stream, read from the store.
    pub async fn events(&self, id: &str) -> Vec<ConnectionEvent> {
        let backend = Backend::open(&self.db_url, &StoreOptions::default())
            .await
            .unwrap();
        backend
            .events()
            .read_stream(&domain::connection::stream_id(KEY, id), 0)
            .await
            .unwrap()
            .iter()
            .map(|r| ConnectionEvent::from_recorded(r).unwrap())
            .collect()
    }
}

impl Setup<'_> {
    /// YAML lines added to the `fake` template (`{base}` stands for the provider's address).
    pub fn template(self, extra: &str) -> Self {
        Self {
            template: extra.to_owned(),
            ..self
        }
    }

    /// How many instances to start on the database.
    pub fn instances(self, instances: usize) -> Self {
        Self { instances, ..self }
    }

    /// `grantline serve` flags for every instance, beside the database, key and providers file.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Starts the provider and the instances, and creates the integration `fake` through the
    /// first one.
    pub async fn start(self) -> FakeService {
        let fake = FakeProvider::start().await;
        let (dir, file) = fake.providers_file(&self.template);
        let key = new_key();
        let mut args = vec!["--providers-file", file.to_str().unwrap()];
        // Instances share the PostgreSQL server (100 connections) with the other tests running
        // at the same time: several at the default pool of 16 each could exhaust it.
        if self.instances > 1 && !self.args.iter().any(|a| a == "--database-pool-size") {
            args.extend(["--database-pool-size", "6"]);
        }
        args.extend(self.args.iter().map(String::as_str));
        let mut apps = Vec::new();
        let mut states = Vec::new();
        // With a secret key, the instances' clients present it on every request.
        let secret = args
            .iter()
            .position(|a| *a == "--secret-key")
            .and_then(|i| args.get(i + 1))
            .map(|s| (*s).to_owned());
        for _ in 0..self.instances {
            let (mut app, state) = spawn_with_state(config_on(self.db, &key, &args)).await;
            if let Some(secret) = &secret {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {secret}").parse().unwrap(),
                );
                app.client = reqwest::Client::builder()
                    .default_headers(headers)
                    .build()
                    .unwrap();
            }
            apps.push(app);
            states.push(state);
        }
        let integration = json!({
            "provider_config_key": KEY, "provider": "fake",
            "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
        });
        ok_json(apps[0].post_json("/config", &integration).await).await;
        FakeService {
            apps,
            states,
            fake,
            db_url: self.db.url().to_owned(),
            _dir: dir,
        }
    }
}
