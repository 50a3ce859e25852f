//! Fenced refresh on read (DESIGN.md §3) against the fake provider, whose refresh tokens rotate
//! and fail with `invalid_grant` on reuse: one provider refresh per generation however many
//! readers, threads or instances ask; failures classified; orphaned leases recovered.

use std::time::Duration;

use domain::connection::{ConnectionEvent, ConnectionKey, RefreshTrigger};
use domain::testing::TestDatabase;

use crate::fake_provider::{CLIENT_SECRET, FakeProvider, TokenMode};
use crate::fake_service::{CONNECTION, FORCED, FakeService, ID, KEY};
use crate::{assert_error, ok_json};

domain::on_both_backends!(
    fifty_concurrent_reads_of_an_expired_token_make_one_provider_refresh,
    a_slow_provider_is_still_refreshed_once,
    invalid_grant_is_permanent_until_forced_or_reauthorized,
    a_transient_failure_is_retried_after_the_backoff,
    a_fresh_token_is_not_refreshed_unless_forced,
    an_answer_too_large_beside_the_old_raw_is_kept_alone,
);

domain::on_postgres_only!(
    three_instances_on_one_database_make_one_provider_refresh(4),
    a_fifteen_second_provider_is_refreshed_once,
    an_orphaned_lease_is_retried_and_a_grace_period_saves_the_rotation,
    an_orphaned_lease_against_a_strict_provider_ends_as_a_permanent_failure,
);

/// A service (or several) on one database with the fake provider as the integration `fake`,
/// whose template adds `refresh_params`, and the connection `conn-1` imported with an expired
/// access token and the live refresh token `rt-0`.
struct Env(FakeService);

impl std::ops::Deref for Env {
    type Target = FakeService;

    fn deref(&self) -> &FakeService {
        &self.0
    }
}

async fn env(db: &TestDatabase, instances: usize, extra: &[&str]) -> Env {
    let service = FakeService::on(db)
        .template("  refresh_params:\n    audience: api\n")
        .instances(instances)
        .args(extra)
        .start()
        .await;
    let env = Env(service);
    env.import("rt-0", -60).await;
    env
}

impl Env {
    /// Imports (re-authorizes) the connection with refresh token `refresh` and an access token
    /// expiring `expires_in` seconds from now (negative: already expired).
    async fn import(&self, refresh: &str, expires_in: i64) {
        let access = format!("old-access-{refresh}");
        self.0.import(ID, &access, refresh, Some(expires_in)).await;
    }

    /// The connection's events.
    async fn events(&self) -> Vec<ConnectionEvent> {
        self.0.events(ID).await
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
            ConnectionEvent::OwnershipSet(_) => "ownership",
            ConnectionEvent::ConnectionDeleted(_) => "deleted",
        })
        .collect()
}

/// With the provider answering after `latency`, `n` concurrent reads of the expired token spread
/// over the instances all get the first refreshed token, from one provider refresh.
async fn assert_reads_share_one_refresh(env: &Env, n: usize, latency: Duration) {
    env.fake.set_mode(TokenMode::Slow(latency));
    let mut tasks = Vec::new();
    for i in 0..n {
        let app = &env.apps[i % env.apps.len()];
        let (client, url) = (app.client.clone(), app.url(CONNECTION));
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
    let (access, _) = FakeProvider::refreshed_tokens(1);
    assert!(tokens.iter().all(|t| *t == access), "{tokens:?}");
    assert_eq!(env.fake.refresh_requests(), 1);
}

async fn fifty_concurrent_reads_of_an_expired_token_make_one_provider_refresh(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    assert_reads_share_one_refresh(&env, 50, Duration::from_millis(300)).await;
    // The refresh went by the template: refresh_params, the rotated token kept for next time.
    let call = env.fake.last_token_call();
    assert_eq!(call.params["grant_type"], "refresh_token");
    assert_eq!(call.params["refresh_token"], "rt-0");
    assert_eq!(call.params["audience"], "api");
    let body = env.apps[0]
        .get_ok(&format!("{CONNECTION}&refresh_token=true"))
        .await;
    assert_eq!(body["credentials"]["refresh_token"], "fake-refresh-r1");
    assert_eq!(env.fake.refresh_requests(), 1, "the next read is fresh");
    assert_eq!(
        kinds(&env.events().await),
        ["authorized", "leased", "refreshed"]
    );
}

async fn three_instances_on_one_database_make_one_provider_refresh(db: &TestDatabase) {
    let env = env(db, 3, &[]).await;
    assert_reads_share_one_refresh(&env, 60, Duration::from_millis(300)).await;
    assert_eq!(
        kinds(&env.events().await),
        ["authorized", "leased", "refreshed"]
    );
}

async fn a_slow_provider_is_still_refreshed_once(db: &TestDatabase) {
    slow_provider(db, Duration::from_secs(2), &[]).await;
}

async fn a_fifteen_second_provider_is_refreshed_once(db: &TestDatabase) {
    slow_provider(db, Duration::from_secs(15), &["--refresh-lease", "40s"]).await;
}

async fn slow_provider(db: &TestDatabase, latency: Duration, extra: &[&str]) {
    let env = env(db, 1, extra).await;
    assert_reads_share_one_refresh(&env, 20, latency).await;
}

async fn an_orphaned_lease_is_retried_and_a_grace_period_saves_the_rotation(db: &TestDatabase) {
    orphaned_lease(db, true).await;
}

async fn an_orphaned_lease_against_a_strict_provider_ends_as_a_permanent_failure(
    db: &TestDatabase,
) {
    orphaned_lease(db, false).await;
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
    let response = env.apps[0].get(CONNECTION).await;
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
        let again = env.apps[0].get(CONNECTION).await;
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
        env.apps[0].get(CONNECTION).await,
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
            env.apps[0].get(CONNECTION).await,
            424,
            "connection_refresh_failed",
        )
        .await;
    }
    // Today's route says it as today's Nango does: `invalid_credentials`, with the connection
    // (never its credentials) beside the failure.
    let current = assert_error(
        env.apps[0]
            .get("/connections/conn-1?provider_config_key=fake")
            .await,
        424,
        "invalid_credentials",
    )
    .await;
    assert_eq!(current["payload"]["failure_class"], "permanent");
    let connection = &current["payload"]["connection"];
    assert_eq!(connection["connection_id"], "conn-1", "{current}");
    assert_eq!(connection["provider_config_key"], "fake");
    assert_eq!(connection["errors"][0]["type"], "auth", "{current}");
    assert!(connection.get("credentials").is_none(), "{current}");
    assert!(!current.to_string().contains("rt-0"), "{current}");
    assert_eq!(env.fake.refresh_requests(), 1, "no further provider calls");
    // A forced refresh tries again.
    env.fake.set_mode(TokenMode::Json);
    let forced = env.app().access_token(FORCED).await;
    assert_eq!(forced, FakeProvider::refreshed_tokens(1).0);
    assert_eq!(env.fake.refresh_requests(), 2);

    // A forced refresh that fails permanently blocks reads again; a re-authorization (import)
    // recovers.
    env.fake.set_mode(TokenMode::InvalidGrant);
    let forced = env.apps[0].get(FORCED).await;
    assert_error(forced, 424, "connection_refresh_failed").await;
    assert_eq!(env.fake.refresh_requests(), 3);
    env.fake.set_mode(TokenMode::Json);
    env.import("rt-b", -60).await;
    assert_eq!(
        env.app().access_token(CONNECTION).await,
        FakeProvider::refreshed_tokens(2).0
    );
    assert_eq!(env.fake.refresh_requests(), 4);
    assert_eq!(env.fake.last_token_call().params["refresh_token"], "rt-b");
}

async fn a_transient_failure_is_retried_after_the_backoff(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.fake.set_mode(TokenMode::Status(503));
    let error = assert_error(
        env.apps[0].get(CONNECTION).await,
        503,
        "connection_refresh_retrying",
    )
    .await;
    assert_eq!(error["payload"]["failure_class"], "transient");
    assert!(error["payload"]["retry_at"].is_string());
    assert_eq!(env.fake.refresh_requests(), 1);
    // Within the backoff the provider is not asked.
    assert_error(
        env.apps[0].get(CONNECTION).await,
        503,
        "connection_refresh_retrying",
    )
    .await;
    let current = env.apps[0]
        .get("/connections/conn-1?provider_config_key=fake")
        .await;
    assert!(current.headers().contains_key("retry-after"));
    let current = assert_error(current, 503, "invalid_credentials").await;
    assert_eq!(current["payload"]["failure_class"], "transient");
    assert_eq!(current["payload"]["connection"]["connection_id"], "conn-1");
    assert_eq!(env.fake.refresh_requests(), 1);
    env.fake.set_mode(TokenMode::Json);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        env.app().access_token(CONNECTION).await,
        FakeProvider::refreshed_tokens(1).0
    );
    assert_eq!(env.fake.refresh_requests(), 2);

    // A token that is due but still valid is answered when the refresh fails transiently.
    env.import("rt-1", 300).await;
    env.fake.set_mode(TokenMode::Status(502));
    assert_eq!(env.app().access_token(CONNECTION).await, "old-access-rt-1");
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
    assert_eq!(env.app().access_token(CONNECTION).await, "old-access-rt-1");
    assert_eq!(env.fake.refresh_requests(), 0);
    let forced = env.app().access_token(FORCED).await;
    assert_eq!(forced, FakeProvider::refreshed_tokens(1).0);
    assert_eq!(env.fake.refresh_requests(), 1);
    // Within the margin (15 minutes by default): refreshed on read.
    env.import("fake-refresh-r1", 600).await;
    assert_eq!(
        env.app().access_token(CONNECTION).await,
        FakeProvider::refreshed_tokens(2).0
    );
}

/// A refresh answer within the bounds whose union with the stored `raw` is not: the provider
/// has rotated the refresh token by then, so the answer is kept (alone) rather than lost, and
/// the next refresh spends the new refresh token.
async fn an_answer_too_large_beside_the_old_raw_is_kept_alone(db: &TestDatabase) {
    let env = env(db, 1, &[]).await;
    env.fake.accept_refresh_token("rt-big");
    let imported = env
        .app()
        .post_json(
            "/connection",
            &serde_json::json!({
                "provider_config_key": KEY, "connection_id": ID,
                "access_token": "old-access", "refresh_token": "rt-big",
                "expires_at": chrono::Utc::now().timestamp() - 60,
                "raw": {"imported": "i".repeat(40_000), "id_token": "kept"},
            }),
        )
        .await;
    assert_eq!(imported.status(), 201);
    env.fake.set_mode(TokenMode::Padded(30_000));
    let body = env.app().get_ok(CONNECTION).await;
    let (access, refresh) = FakeProvider::refreshed_tokens(1);
    let credentials = &body["credentials"];
    assert_eq!(credentials["access_token"], access.as_str());
    assert_eq!(credentials["refresh_token"], refresh.as_str());
    let raw = credentials["raw"].as_object().unwrap();
    assert_eq!(raw["padding"].as_str().unwrap().len(), 30_000);
    assert!(raw.get("imported").is_none() && raw.get("id_token").is_none());
    assert_eq!(raw["refresh_token"], refresh.as_str());
    // Within the bounds again, the old fields come back beside the new answer's, and the
    // previous answer's tokens are not among them.
    env.fake.set_mode(TokenMode::Json);
    let body = env.app().get_ok(FORCED).await;
    let (access, refresh) = FakeProvider::refreshed_tokens(2);
    assert_eq!(body["credentials"]["access_token"], access.as_str());
    let raw = body["credentials"]["raw"].as_object().unwrap();
    assert_eq!(raw["access_token"], access.as_str());
    assert_eq!(raw["refresh_token"], refresh.as_str());
    assert_eq!(raw["padding"].as_str().unwrap().len(), 30_000);
    assert_eq!(env.fake.refresh_requests(), 2);
    assert_eq!(
        kinds(&env.events().await)[2..],
        ["leased", "refreshed", "leased", "refreshed"]
    );
}
