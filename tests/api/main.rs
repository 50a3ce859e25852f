//! End-to-end tests of the `grantline` service and binary, against real PostgreSQL and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod serve;

use clap::Parser;
use domain::testing::TestDatabase;
use grantline::config::{Cli, Command, Config};
use grantline::startup::Application;
use tokio::sync::oneshot;

/// A running service on a random port, stopped when dropped.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

/// Parses `grantline serve` arguments as the binary would.
pub fn serve_config(args: &[&str]) -> Config {
    let mut argv = vec!["grantline", "serve"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Serve(args) => args.validate().unwrap(),
        _ => unreachable!(),
    }
}

/// A fresh master key, base64.
pub fn new_key() -> String {
    domain::keys::MasterKey::generate().1.as_str().to_owned()
}

pub async fn spawn_app(db: &TestDatabase, key: &str) -> TestApp {
    let config = serve_config(&[
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db.url(),
        "--encryption-key",
        key,
    ]);
    spawn_config(config).await
}

pub async fn spawn_config(config: Config) -> TestApp {
    let app = Application::build(config).await.unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

impl TestApp {
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }
}
