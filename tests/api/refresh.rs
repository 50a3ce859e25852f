//! Fenced refresh on read (DESIGN.md §3) against the fake provider, whose refresh tokens rotate
//! and fail with `invalid_grant` on reuse: one provider refresh per generation however many
//! readers, threads or instances ask; failures classified; orphaned leases recovered.

use std::time::Duration;

use chrono::Utc;
use domain::connection::{ConnectionEvent, ConnectionKey, RefreshTrigger};
use domain::event::DomainEvent;
use domain::store::{Backend, StoreOptions};
use domain::testing::TestDatabase;
use grantline::state::AppState;
use serde_json::json;

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider, TokenMode};
use crate::{TestApp, assert_error, new_key, ok_json, serve_config};

domain::on_both_backends!(
    fifty_concurrent_reads_of_an_expired_token_make_one_provider_refresh,
    a_slow_provider_is_still_refreshed_once,
    invalid_grant_is_permanent_until_forced_or_reauthorized,
    a_transient_failure_is_retried_after_the_backoff,
    a_fresh_token_is_not_refreshed_unless_forced,
);

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_instances_on_one_database_make_one_provider_refresh() {
        let db = domain::testing::TestDatabase::postgres().await;
        super::three_instances_make_one_refresh(&db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fifteen_second_provider_is_refreshed_once() {
        let db = domain::testing::TestDatabase::postgres().await;
        super::slow_provider(&db, Duration::from_secs(15), &["--refresh-lease", "40s"]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphaned_lease_is_retried_and_a_grace_period_saves_the_rotation() {
        let db = domain::testing::TestDatabase::postgres().await;
        super::orphaned_lease(&db, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphaned_lease_against_a_strict_provider_ends_as_a_permanent_failure() {
        let db = domain::testing::TestDatabase::postgres().await;
        super::orphaned_lease(&db, false).await;
    }

    use std::time::Duration;
}

const KEY: &str = "fake";
const ID: &str = "conn-1";
const PATH: &str = "/connection/conn-1?provider_config_key=fake";

/// A service (or several) on one database, a fake provider, an integration and a connection
/// imported with an expired access token and the live refresh token `rt-0`.
struct Env {
    apps: Vec<TestApp>,
    states: Vec<AppState>,
    fake: FakeProvider,
    db_url: String,
    _dir: tempfile::TempDir,
}

async fn env(db: &TestDatabase, instances: usize, extra: &[&str]) -> Env {
    let fake = FakeProvider::start().await;
    let (dir, file) = fake.providers_file("  refresh_params:\n    audience: api\n");
    let key = new_key();
    let mut apps = Vec::new();
    let mut states = Vec::new();
    for _ in 0..instances {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
            "--encryption-key",
            &key,
            "--providers-file",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (app, state) = crate::spawn_with_state(serve_config(&args)).await;
        states.push(state);
        apps.push(app);
    }
    ok_json(
        apps[0]
            .post_json(
                "/config",
                &json!({
                    "provider_config_key": KEY, "provider": "fake",
                    "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
                }),
            )
            .await,
    )
    .await;
    let env = Env {
        apps,
        states,
        fake,
        db_url: db.url().to_owned(),
        _dir: dir,
    };
    env.import("rt-0", -60).await;
    env
}

impl Env {
    /// Imports (re-authorizes) the connection with refresh token `refresh` and an access token
    /// expiring `expires_in` seconds from now (negative: already expired).
    async fn import(&self, refresh: &str, expires_in: i64) {
        self.fake.accept_refresh_token(refresh);
        let expires_at = Utc::now().timestamp() + expires_in;
        let response = self.apps[0]
            .post_json(
                "/connection",
                &json!({
                    "provider_config_key": KEY, "connection_id": ID,
                    "access_token": format!("old-access-{refresh}"), "refresh_token": refresh,
                    "expires_at": expires_at,
                }),
            )
            .await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }

    async fn access_token(&self, app: usize, path: &str) -> String {
        let body = self.apps[app].get_ok(path).await;
        body["credentials"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The event types of the connection's stream.
    async fn events(&self) -> Vec<ConnectionEvent> {
        let backend = Backend::open(&self.db_url, &StoreOptions::default())
            .await
            .unwrap();
        let stream = domain::connection::stream_id(KEY, ID);
        backend
            .events()
            .read_stream(&stream, 0)
            .await
            .unwrap()
            .iter()
            .map(|r| ConnectionEvent::from_recorded(r).unwrap())
            .collect()
    }
}

fn kinds(events: &[ConnectionEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            ConnectionEvent::ConnectionAuthorized(_) => "authorized",
            ConnectionEvent::RefreshLeased(_) => "leased",
            ConnectionEvent::TokensRefreshed(_) => "refreshed",
            ConnectionEvent::RefreshFailed(_) => "failed",
            ConnectionEvent::MetadataSet(_) => "metadata",
            ConnectionEvent::ConnectionDeleted(_) => "deleted",
        })
        .collect()
}

/// `n` concurrent reads spread over the instances; every answer's access token.
async fn concurrent_reads(env: &Env, n: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let app = &env.apps[i % env.apps.len()];
        let (client, url) = (app.client.clone(), app.url(PATH));
        tasks.push(tokio::spawn(async move {
            let response = client.get(url).send().await.unwrap();
            let body = ok_json(response).await;
            body["credentials"]["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.unwrap());
    }
    tokens
}

async fn fifty_concurrent_reads_of_an_expired_token_make_one_provider_refresh(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.fake
        .set_mode(TokenMode::Slow(Duration::from_millis(300)));
    let tokens = concurrent_reads(&env, 50).await;
    let (access, _) = FakeProvider::refreshed_tokens(1);
    assert!(tokens.iter().all(|t| *t == access), "{tokens:?}");
    assert_eq!(env.fake.refresh_requests(), 1);
    // The refresh went by the template: refresh_params, the rotated token kept for next time.
    let call = env.fake.last_token_call();
    assert_eq!(call.params["grant_type"], "refresh_token");
    assert_eq!(call.params["refresh_token"], "rt-0");
    assert_eq!(call.params["audience"], "api");
    let body = env.apps[0]
        .get_ok(&format!("{PATH}&refresh_token=true"))
        .await;
    assert_eq!(body["credentials"]["refresh_token"], "fake-refresh-r1");
    assert_eq!(env.fake.refresh_requests(), 1, "the next read is fresh");
    assert_eq!(
        kinds(&env.events().await),
        ["authorized", "leased", "refreshed"]
    );
}

async fn three_instances_make_one_refresh(db: &TestDatabase) {
    let env = env(db, 3, &[]).await;
    env.fake
        .set_mode(TokenMode::Slow(Duration::from_millis(300)));
    let tokens = concurrent_reads(&env, 60).await;
    let (access, _) = FakeProvider::refreshed_tokens(1);
    assert!(tokens.iter().all(|t| *t == access), "{tokens:?}");
    assert_eq!(env.fake.refresh_requests(), 1);
    assert_eq!(
        kinds(&env.events().await),
        ["authorized", "leased", "refreshed"]
    );
}

async fn a_slow_provider_is_still_refreshed_once(db: &TestDatabase) {
    slow_provider(db, Duration::from_secs(2), &[]).await;
}

async fn slow_provider(db: &TestDatabase, latency: Duration, extra: &[&str]) {
    let env = env(db, 1, extra).await;
    env.fake.set_mode(TokenMode::Slow(latency));
    let tokens = concurrent_reads(&env, 20).await;
    let (access, _) = FakeProvider::refreshed_tokens(1);
    assert!(tokens.iter().all(|t| *t == access), "{tokens:?}");
    assert_eq!(env.fake.refresh_requests(), 1);
}

async fn orphaned_lease(db: &TestDatabase, grace: bool) {
    let env = env(
        db,
        1,
        &["--refresh-lease", "2s", "--provider-timeout", "1s"],
    )
    .await;
    if grace {
        env.fake.set_refresh_grace(Duration::from_secs(60));
    } else {
        env.fake.revoke_family_on_reuse(true);
    }
    // A refresher that leases and hears the provider's answer, then dies before appending.
    let refresh = &env.states[0].refresh;
    let leased = refresh
        .lease(&ConnectionKey::new(KEY, ID), RefreshTrigger::Read)
        .await
        .unwrap();
    let answer = refresh.call_provider(&leased).await.unwrap();
    assert!(answer.is_ok());
    drop((leased, answer));
    assert_eq!(env.fake.refresh_requests(), 1);
    // While the lease lasts, a read waits for it; once it lapses, the read tries again with the
    // refresh token it has, which the provider rotated already.
    let response = env.apps[0].get(PATH).await;
    assert_eq!(env.fake.refresh_requests(), 2);
    let events = env.events().await;
    if grace {
        let body = ok_json(response).await;
        assert_eq!(
            body["credentials"]["access_token"],
            FakeProvider::refreshed_tokens(2).0
        );
        assert_eq!(
            kinds(&events),
            ["authorized", "leased", "leased", "refreshed"]
        );
    } else {
        let error = assert_error(response, 424, "connection_refresh_failed").await;
        assert_eq!(error["payload"]["provider_error"], "invalid_grant");
        assert_eq!(error["payload"]["failure_class"], "permanent");
        assert_eq!(kinds(&events), ["authorized", "leased", "leased", "failed"]);
        // Said so on every later read, without asking the provider again.
        let again = env.apps[0].get(PATH).await;
        assert_error(again, 424, "connection_refresh_failed").await;
        assert_eq!(env.fake.refresh_requests(), 2);
    }
    // The orphaned lease is visible: a lease with no outcome before the next one.
    let (ConnectionEvent::RefreshLeased(first), ConnectionEvent::RefreshLeased(second)) =
        (&events[1], &events[2])
    else {
        panic!("{:?}", kinds(&events));
    };
    assert_ne!(first.lease_id, second.lease_id);
    assert!(second.leased_at >= first.lease_expires_at);
}

async fn invalid_grant_is_permanent_until_forced_or_reauthorized(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.fake.set_mode(TokenMode::InvalidGrant);
    let error = assert_error(
        env.apps[0].get(PATH).await,
        424,
        "connection_refresh_failed",
    )
    .await;
    let payload = &error["payload"];
    assert_eq!(payload["failure_class"], "permanent");
    assert_eq!(payload["provider_error"], "invalid_grant");
    assert_eq!(payload["provider_status"], 400);
    assert!(payload["failed_at"].is_string());
    assert!(!error.to_string().contains("rt-0"), "{error}");
    assert!(!error.to_string().contains(CLIENT_SECRET), "{error}");
    assert_eq!(env.fake.refresh_requests(), 1);
    for _ in 0..3 {
        assert_error(
            env.apps[0].get(PATH).await,
            424,
            "connection_refresh_failed",
        )
        .await;
    }
    assert_eq!(env.fake.refresh_requests(), 1, "no further provider calls");
    // A forced refresh tries again.
    env.fake.set_mode(TokenMode::Json);
    let forced = env
        .access_token(0, &format!("{PATH}&force_refresh=true"))
        .await;
    assert_eq!(forced, FakeProvider::refreshed_tokens(1).0);
    assert_eq!(env.fake.refresh_requests(), 2);

    // A forced refresh that fails permanently blocks reads again; a re-authorization (import)
    // recovers.
    env.fake.set_mode(TokenMode::InvalidGrant);
    let forced = env.apps[0].get(&format!("{PATH}&force_refresh=true")).await;
    assert_error(forced, 424, "connection_refresh_failed").await;
    assert_eq!(env.fake.refresh_requests(), 3);
    env.fake.set_mode(TokenMode::Json);
    env.import("rt-b", -60).await;
    assert_eq!(
        env.access_token(0, PATH).await,
        FakeProvider::refreshed_tokens(2).0
    );
    assert_eq!(env.fake.refresh_requests(), 4);
    assert_eq!(env.fake.last_token_call().params["refresh_token"], "rt-b");
}

async fn a_transient_failure_is_retried_after_the_backoff(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.fake.set_mode(TokenMode::Status(503));
    let error = assert_error(
        env.apps[0].get(PATH).await,
        503,
        "connection_refresh_retrying",
    )
    .await;
    assert_eq!(error["payload"]["failure_class"], "transient");
    assert!(error["payload"]["retry_at"].is_string());
    assert_eq!(env.fake.refresh_requests(), 1);
    // Within the backoff the provider is not asked.
    assert_error(
        env.apps[0].get(PATH).await,
        503,
        "connection_refresh_retrying",
    )
    .await;
    assert_eq!(env.fake.refresh_requests(), 1);
    env.fake.set_mode(TokenMode::Json);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        env.access_token(0, PATH).await,
        FakeProvider::refreshed_tokens(1).0
    );
    assert_eq!(env.fake.refresh_requests(), 2);

    // A token that is due but still valid is answered when the refresh fails transiently.
    env.import("rt-1", 300).await;
    env.fake.set_mode(TokenMode::Status(502));
    assert_eq!(env.access_token(0, PATH).await, "old-access-rt-1");
    assert_eq!(env.fake.refresh_requests(), 3);
    // Stored credentials are never wiped by a failure.
    let events = env.events().await;
    assert_eq!(
        kinds(&events)[kinds(&events).len() - 3..],
        ["authorized", "leased", "failed"]
    );
}

async fn a_fresh_token_is_not_refreshed_unless_forced(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.import("rt-1", 3600).await;
    assert_eq!(env.access_token(0, PATH).await, "old-access-rt-1");
    assert_eq!(env.fake.refresh_requests(), 0);
    let forced = env
        .access_token(0, &format!("{PATH}&force_refresh=true"))
        .await;
    assert_eq!(forced, FakeProvider::refreshed_tokens(1).0);
    assert_eq!(env.fake.refresh_requests(), 1);
    // Within the margin (15 minutes by default): refreshed on read.
    env.import("fake-refresh-r1", 600).await;
    assert_eq!(
        env.access_token(0, PATH).await,
        FakeProvider::refreshed_tokens(2).0
    );
}
