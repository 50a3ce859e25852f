//! The credential history (audit trail): every event of a connection in order, across
//! generations and after a deletion, with fingerprints, triggers, instances and error codes,
//! paged, and never a secret.

use domain::testing::TestDatabase;
use serde_json::{Value, json};

use crate::fake_provider::{CLIENT_SECRET, FakeProvider, TokenMode};
use crate::fake_service::{CONNECTION, FORCED, FakeService, ID, KEY};
use crate::{TestApp, assert_error, new_key, ok_json, spawn_app};

domain::on_both_backends!(
    the_history_shows_every_event_across_generations_and_never_a_secret,
    paging_returns_every_entry_exactly_once,
    bad_paging_parameters_and_unknown_connections_are_json_errors,
);

const HISTORY: &str = "/connection/conn-1/history?provider_config_key=fake";

/// Imports (authorizes) the connection with these tokens, expiring in an hour.
async fn import(env: &FakeService, access: &str, refresh: &str) {
    env.import(ID, access, refresh, Some(3600)).await;
}

/// The whole history's raw text and its parsed body.
async fn history(app: &TestApp, path: &str) -> (String, Value) {
    let response = app.get(path).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let body = serde_json::from_str(&text).unwrap();
    (text, body)
}

fn field<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().map(|e| &e[name]).collect()
}

async fn the_history_shows_every_event_across_generations_and_never_a_secret(db: &TestDatabase) {
    let env = FakeService::on(db).start().await;
    let app = env.app();
    let secret_metadata = "metadata-value-do-not-show";
    import(&env, "access-first", "rt-first").await;
    // A forced refresh: the provider rotates both tokens.
    let body = app.get_ok(FORCED).await;
    let (refreshed_access, refreshed_refresh) = FakeProvider::refreshed_tokens(1);
    assert_eq!(body["credentials"]["access_token"], refreshed_access);
    // Metadata: only its keys show.
    ok_json(
        app.post_json(
            &format!("/connection/{ID}/metadata?provider_config_key={KEY}"),
            &json!({ "note": secret_metadata }),
        )
        .await,
    )
    .await;
    // A refresh that fails permanently.
    env.fake.set_mode(TokenMode::InvalidGrant);
    let failed = app.get(FORCED).await;
    assert_error(failed, 424, "connection_refresh_failed").await;
    env.fake.set_mode(TokenMode::Json);
    // Deleted, then authorized again.
    ok_json(app.delete(CONNECTION).await).await;
    import(&env, "access-second", "rt-second").await;

    let (text, body) = history(app, HISTORY).await;
    assert_eq!(body["provider_config_key"], KEY);
    assert_eq!(body["connection_id"], ID);
    assert!(body["next_after"].is_null(), "{body}");
    let events = body["events"].as_array().unwrap();
    assert_eq!(
        field(events, "type"),
        [
            "connection_authorized",
            "refresh_leased",
            "tokens_refreshed",
            "metadata_set",
            "refresh_leased",
            "refresh_failed",
            "connection_deleted",
            "connection_authorized",
        ]
    );
    assert_eq!(field(events, "stream_version"), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(field(events, "generation"), [1, 1, 1, 1, 1, 1, 1, 2]);
    for event in events {
        assert!(event["recorded_at"].as_str().unwrap().ends_with('Z'));
        assert!(event["event_id"].is_string());
    }
    let (authorized, lease, refreshed, metadata, lease2, failure, deleted, reauthorized) = (
        &events[0], &events[1], &events[2], &events[3], &events[4], &events[5], &events[6],
        &events[7],
    );

    // One instance name for the events it appended and the leases it held.
    let instance = authorized["instance"].as_str().unwrap();
    assert!(instance.starts_with("grantline-"), "{instance}");
    for event in [
        lease,
        refreshed,
        metadata,
        lease2,
        failure,
        deleted,
        reauthorized,
    ] {
        assert_eq!(event["instance"], instance, "{event}");
    }
    // Refresh outcomes name the trigger and lease of their lease.
    assert_eq!(lease["trigger"], "force");
    assert_eq!(refreshed["trigger"], "force");
    assert_eq!(refreshed["lease_id"], lease["lease_id"]);
    assert_eq!(failure["trigger"], "force");
    assert_eq!(failure["lease_id"], lease2["lease_id"]);
    assert_eq!(
        failure["error"],
        json!({ "class": "permanent", "code": "invalid_grant", "provider_status": 400 })
    );
    assert_eq!(authorized["flow"], "import");
    assert_eq!(authorized["refresh_token_generation"], 1);
    assert_eq!(refreshed["refresh_token_generation"], 2);
    assert_eq!(refreshed["refresh_token_rotated"], true);
    assert_eq!(
        metadata["metadata"],
        json!({ "mode": "replace", "keys": ["note"] })
    );
    assert_eq!(deleted["shredded_data_keys"], 1);

    // Each token generation has its own fingerprint.
    let fingerprints: Vec<(&str, &str)> = [authorized, refreshed, reauthorized]
        .iter()
        .map(|e| {
            let access = e["fingerprints"]["access_token"].as_str().unwrap();
            let refresh = e["fingerprints"]["refresh_token"].as_str().unwrap();
            assert!(access.starts_with("fp_") && refresh.starts_with("fp_"));
            (access, refresh)
        })
        .collect();
    for (i, a) in fingerprints.iter().enumerate() {
        for b in &fingerprints[i + 1..] {
            assert_ne!(a.0, b.0, "access fingerprints differ");
            assert_ne!(a.1, b.1, "refresh fingerprints differ");
        }
    }

    // The first generation's secrets were shredded by the deletion; the second's are sealed.
    assert_eq!(authorized["secrets"], "shredded");
    assert_eq!(refreshed["secrets"], "shredded");
    assert_eq!(reauthorized["secrets"], "sealed");
    for event in [lease, metadata, lease2, failure, deleted] {
        assert!(event.get("secrets").is_none(), "{event}");
    }

    for secret in [
        "access-first",
        "rt-first",
        refreshed_access.as_str(),
        refreshed_refresh.as_str(),
        "access-second",
        "rt-second",
        CLIENT_SECRET,
        "grant revoked",
        secret_metadata,
        "ciphertext",
    ] {
        assert!(!text.contains(secret), "{secret:?} leaked: {text}");
    }

    // Both route families answer the same.
    let (_, plural) = history(app, "/connections/conn-1/history?provider_config_key=fake").await;
    assert_eq!(plural, body);
}

async fn paging_returns_every_entry_exactly_once(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    app.create_github_integration("secret").await;
    let path = "/connection/paged/history?provider_config_key=github";
    app.import_github("paged", "token").await;
    for n in 0..9 {
        let response = app
            .post_json(
                "/connection/paged/metadata?provider_config_key=github",
                &json!({ format!("k{n}"): n }),
            )
            .await;
        assert_eq!(response.status(), 201);
    }
    let (_, whole) = history(&app, path).await;
    let all = whole["events"].as_array().unwrap().clone();
    assert_eq!(all.len(), 10);

    for limit in [1, 3, 4, 10, 1000] {
        let mut seen = Vec::new();
        let mut after = 0;
        let mut pages = 0;
        loop {
            let (_, page) = history(&app, &format!("{path}&after={after}&limit={limit}")).await;
            let events = page["events"].as_array().unwrap();
            assert!(events.len() <= limit);
            seen.extend(events.iter().cloned());
            pages += 1;
            match page["next_after"].as_u64() {
                Some(next) => {
                    assert_eq!(
                        Some(next),
                        events.last().unwrap()["stream_version"].as_u64()
                    );
                    after = next;
                }
                None => break,
            }
            assert!(pages <= 20, "paging does not end");
        }
        assert_eq!(seen, all, "limit {limit}");
        assert_eq!(pages, all.len().div_ceil(limit), "limit {limit}");
    }
    // Past the end: an empty page, and no next one.
    let (_, past) = history(&app, &format!("{path}&after=10")).await;
    assert_eq!(past["events"], json!([]));
    assert!(past["next_after"].is_null());
    // Unknown query parameters are ignored.
    let (_, ignored) = history(&app, &format!("{path}&foo=bar")).await;
    assert_eq!(ignored["events"].as_array().unwrap().len(), 10);
}

async fn bad_paging_parameters_and_unknown_connections_are_json_errors(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    app.create_github_integration("secret").await;
    app.import_github("c1", "token").await;
    let path = "/connection/c1/history?provider_config_key=github";
    for query in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "after=-1",
        "after=1.5",
        "after=99999999999",
    ] {
        let error = assert_error(
            app.get(&format!("{path}&{query}")).await,
            400,
            "invalid_query_params",
        )
        .await;
        let name = query.split('=').next().unwrap();
        assert!(
            error["message"].as_str().unwrap().contains(name),
            "{query}: {error}"
        );
    }
    assert_error(
        app.get("/connection/c1/history").await,
        400,
        "missing_provider_config",
    )
    .await;
    for family in ["/connection", "/connections"] {
        let error = assert_error(
            app.get(&format!(
                "{family}/nobody/history?provider_config_key=github"
            ))
            .await,
            404,
            "unknown_connection",
        )
        .await;
        assert_eq!(error["payload"]["connection_id"], "nobody");
        assert_error(
            app.get(&format!("{family}/c1/history?provider_config_key=gitlab"))
                .await,
            404,
            "unknown_connection",
        )
        .await;
    }
    // After a deletion the history still answers; only a stream with no event is unknown.
    ok_json(
        app.delete("/connection/c1?provider_config_key=github")
            .await,
    )
    .await;
    let (_, body) = history(&app, path).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 2);
    assert_eq!(body["events"][0]["secrets"], "shredded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_behind_the_secret_key() {
    let db = TestDatabase::sqlite();
    let app =
        crate::spawn_app_with_secret(&db, &new_key(), "history-test-secret-key-0123456789").await;
    assert_error(
        app.get("/connection/c1/history?provider_config_key=github")
            .await,
        401,
        "missing_auth_header",
    )
    .await;
    let authorized = app
        .get_with_key(
            "/connections/c1/history?provider_config_key=github",
            "history-test-secret-key-0123456789",
        )
        .await;
    assert_error(authorized, 404, "unknown_connection").await;
}
