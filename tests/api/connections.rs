//! The Connections API and `/config` end to end, on PostgreSQL and SQLite: the seed's Connection
//! object, imports of every credential shape, the list, metadata, deletion and read-your-writes.

use chrono::{DateTime, Utc};
use domain::testing::TestDatabase;
use serde_json::{Value, json};

use crate::{TestApp, assert_error, new_key, ok_json, spawn_app, spawn_app_with};

domain::on_both_backends!(
    an_imported_connection_reads_back_as_exactly_the_seeds_connection_object,
    the_nested_credentials_form_on_the_plural_route_imports_too,
    oauth1_api_key_and_basic_imports_come_back_in_their_own_shapes,
    every_write_is_visible_to_the_very_next_read,
    the_list_shows_connections_without_credentials_and_filters_by_connection_id,
    metadata_post_replaces_and_patch_merges,
    bulk_metadata_sets_every_listed_connection_or_none,
    a_deleted_connection_is_gone_from_reads_and_from_the_list,
    a_deletion_whose_shredding_failed_is_finished_by_the_retry,
    config_crud_hides_the_client_secret_unless_asked,
    deleting_a_config_deletes_its_connections,
    connections_imported_while_their_config_is_deleted_do_not_come_back,
    a_reimport_replaces_the_credentials_and_keeps_the_identity,
    connection_ids_with_reserved_characters_round_trip,
    a_connection_named_metadata_is_readable_and_deletable,
    concurrent_writes_to_one_connection_all_land,
    a_replica_smaller_than_the_working_set_evicts_and_still_serves_every_read,
    a_replica_bounded_by_memory_stays_within_it_and_still_serves_every_read,
);

const SECRET: &str = "client-secret-9f8e7d";

/// `POST /config` for `key`, expecting success.
async fn create_config(app: &TestApp, key: &str) -> Value {
    ok_json(
        app.post_json(
            "/config",
            &json!({
                "provider_config_key": key,
                "provider": "github",
                "oauth_client_id": format!("client-id-of-{key}"),
                "oauth_client_secret": SECRET,
                "oauth_scopes": "repo,user",
            }),
        )
        .await,
    )
    .await
}

/// `POST path` with `body`, expecting 201 and the connection object.
async fn import(app: &TestApp, path: &str, body: Value) -> Value {
    let response = app.post_json(path, &body).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A service with the integration `key` (see [`create_config`]).
async fn app_with_config(db: &TestDatabase, key: &str) -> TestApp {
    let app = spawn_app(db, &new_key()).await;
    create_config(&app, key).await;
    app
}

/// A flat OAuth2 import of `connection_id` into `key`.
async fn import_oauth2(app: &TestApp, key: &str, connection_id: &str, token: &str) -> Value {
    import(
        app,
        "/connection",
        json!({
            "provider_config_key": key,
            "connection_id": connection_id,
            "access_token": token,
            "refresh_token": format!("refresh-{token}"),
            "expires_at": "2030-01-02T03:04:05Z",
            "raw": { "access_token": token, "refresh_token": format!("refresh-{token}"), "token_type": "bearer" },
        }),
    )
    .await
}

fn sorted_keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// A timestamp as the seed shows it: RFC 3339, in UTC, ending in `Z`.
fn seed_timestamp(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    assert!(text.ends_with('Z'), "{text} does not end in Z");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

async fn an_imported_connection_reads_back_as_exactly_the_seeds_connection_object(
    db: &TestDatabase,
) {
    let app = app_with_config(db, "github-prod").await;
    let created = import(
        &app,
        "/connection",
        json!({
            "provider_config_key": "github-prod",
            "connection_id": "user-1",
            "access_token": "gho_access_1",
            "refresh_token": "gho_refresh_1",
            "expires_at": "2030-01-02T03:04:05.678Z",
            "raw": {
                "access_token": "gho_access_1",
                "refresh_token": "gho_refresh_1",
                "token_type": "bearer",
                "scope": "public_repo,user",
            },
        }),
    )
    .await;

    let path = "/connection/user-1?provider_config_key=github-prod";
    let body = app.get_ok(path).await;
    assert_eq!(
        sorted_keys(&body),
        [
            "account_id",
            "connection_config",
            "connection_id",
            "created_at",
            "credentials",
            "id",
            "metadata",
            "provider",
            "provider_config_key",
            "updated_at",
        ]
    );
    assert!(body["id"].is_i64(), "{body}");
    assert_eq!(body["id"], created["id"], "the import answers the same id");
    let created_at = seed_timestamp(&body["created_at"]);
    let updated_at = seed_timestamp(&body["updated_at"]);
    assert!(updated_at >= created_at);
    assert!(
        (Utc::now() - created_at).num_minutes().abs() < 5,
        "{created_at}"
    );
    assert_eq!(body["provider_config_key"], "github-prod");
    assert_eq!(body["connection_id"], "user-1");
    assert_eq!(body["provider"], "github");
    assert_eq!(body["account_id"], 0);
    assert!(body["account_id"].is_u64());
    assert_eq!(body["connection_config"], json!({}));
    assert_eq!(body["metadata"], json!({}));

    let credentials = &body["credentials"];
    assert_eq!(
        sorted_keys(credentials),
        ["access_token", "expires_at", "raw", "refresh_token", "type"]
    );
    assert_eq!(credentials["type"], "OAUTH2");
    assert_eq!(credentials["access_token"], "gho_access_1");
    assert_eq!(credentials["refresh_token"], "gho_refresh_1");
    assert_eq!(
        seed_timestamp(&credentials["expires_at"]),
        "2030-01-02T03:04:05.678Z".parse::<DateTime<Utc>>().unwrap()
    );
    assert_eq!(
        credentials["raw"],
        json!({
            "access_token": "gho_access_1",
            "refresh_token": "gho_refresh_1",
            "token_type": "bearer",
            "scope": "public_repo,user",
        })
    );

    // `refresh_token=false` strips the refresh token everywhere, including from `raw`.
    let stripped = app.get_ok(&format!("{path}&refresh_token=false")).await;
    assert_eq!(stripped["credentials"].get("refresh_token"), None);
    assert_eq!(stripped["credentials"]["raw"].get("refresh_token"), None);
    assert_eq!(stripped["credentials"]["raw"]["token_type"], "bearer");
    assert_eq!(stripped["credentials"]["access_token"], "gho_access_1");
    assert!(
        !stripped.to_string().contains("gho_refresh_1"),
        "{stripped}"
    );
    let kept = app.get_ok(&format!("{path}&refresh_token=true")).await;
    assert_eq!(kept, body);

    // The plural family answers today's Nango object: the same credentials and keys, its
    // own extra fields, and the refresh token only when asked for. Unknown query parameters
    // and `Nango-*` headers change nothing.
    let current = app
        .get_ok("/connections/user-1?provider_config_key=github-prod")
        .await;
    assert_eq!(current["credentials"], stripped["credentials"]);
    assert!(!current.to_string().contains("gho_refresh_1"), "{current}");
    let current = app
        .get_ok("/connections/user-1?provider_config_key=github-prod&refresh_token=true")
        .await;
    assert_eq!(current["credentials"], body["credentials"]);
    assert_eq!(current["id"], body["id"]);
    assert_eq!(
        sorted_keys(&current),
        [
            "connection_config",
            "connection_id",
            "created_at",
            "credentials",
            "end_user",
            "errors",
            "id",
            "last_fetched_at",
            "metadata",
            "provider",
            "provider_config_key",
            "tags",
            "updated_at",
            "webhook_url_override"
        ]
    );
    assert_eq!(current["metadata"], Value::Null);
    assert_eq!(current["errors"], json!([]));
    assert_eq!(
        app.get_ok(&format!(
            "{path}&foo=bar&refresh_github_app_jwt_token=true&force_refresh=false"
        ))
        .await,
        body
    );
    let with_headers = app
        .client
        .get(app.url(path))
        .header("Nango-Is-Sync", "true")
        .header("Nango-Is-Dry-Run", "false")
        .header("Nango-Activity-Log-Id", "42")
        .send()
        .await
        .unwrap();
    assert_eq!(ok_json(with_headers).await, body);

    // The import answers the same object it stores.
    assert_eq!(created["credentials"], body["credentials"]);
    assert_eq!(created["connection_id"], body["connection_id"]);
    assert_eq!(created["created_at"], body["created_at"]);
}

async fn the_nested_credentials_form_on_the_plural_route_imports_too(db: &TestDatabase) {
    let app = app_with_config(db, "gh").await;
    let created = import(
        &app,
        "/connections",
        json!({
            "provider_config_key": "gh",
            "connection_id": "nested-1",
            "credentials": {
                "type": "OAUTH2",
                "access_token": "nested_access",
                "refresh_token": "nested_refresh",
                "expires_at": "2031-06-07T08:09:10Z",
                "raw": { "access_token": "nested_access", "extra": [1, 2] },
            },
            "connection_config": { "subdomain": "acme" },
            "metadata": { "team": "blue" },
        }),
    )
    .await;
    let body = app
        .get_ok("/connection/nested-1?provider_config_key=gh")
        .await;
    assert_eq!(body["id"], created["id"]);
    assert_eq!(
        body["credentials"],
        json!({
            "type": "OAUTH2",
            "access_token": "nested_access",
            "refresh_token": "nested_refresh",
            "expires_at": "2031-06-07T08:09:10.000Z",
            "raw": { "access_token": "nested_access", "extra": [1, 2] },
        })
    );
    assert_eq!(body["connection_config"], json!({ "subdomain": "acme" }));
    assert_eq!(body["metadata"], json!({ "team": "blue" }));

    // Without refresh token and expiry, neither key appears (the seed: "otherwise missing").
    import(
        &app,
        "/connections",
        json!({
            "provider_config_key": "gh",
            "connection_id": "nested-2",
            "credentials": { "type": "OAUTH2", "access_token": "only_access" },
        }),
    )
    .await;
    let body = app
        .get_ok("/connections/nested-2?provider_config_key=gh")
        .await;
    assert_eq!(
        body["credentials"],
        json!({ "type": "OAUTH2", "access_token": "only_access", "raw": {} })
    );

    // Today's route: the server picks the id when none is given, and answers today's object.
    let created = app
        .post_json(
            "/connections",
            &json!({
                "provider_config_key": "gh",
                "credentials": { "type": "OAUTH2", "access_token": "generated_access" },
                "webhook_url_override": "",
            }),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let id = created["connection_id"].as_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 4),
        "{created}"
    );
    assert_eq!(created["credentials"]["access_token"], "generated_access");
    assert_eq!(created["errors"], json!([]));
    assert_eq!(created["end_user"], Value::Null);
    let read = app
        .get_ok(&format!("/connections/{id}?provider_config_key=gh"))
        .await;
    assert_eq!(read["id"], created["id"]);
    // An integration that does not exist is not found, as today's Nango says it.
    let unknown = app
        .post_json(
            "/connections",
            &json!({
                "provider_config_key": "nope",
                "credentials": { "type": "OAUTH2", "access_token": "a" },
            }),
        )
        .await;
    assert_error(unknown, 404, "not_found").await;

    // Flat expiry as UNIX seconds.
    import(
        &app,
        "/connection",
        json!({
            "provider_config_key": "gh",
            "connection_id": "unix-expiry",
            "access_token": "a",
            "refresh_token": "r",
            "expires_at": 1_900_000_000,
        }),
    )
    .await;
    let body = app
        .get_ok("/connection/unix-expiry?provider_config_key=gh")
        .await;
    assert_eq!(
        body["credentials"]["expires_at"],
        "2030-03-17T17:46:40.000Z"
    );
}

async fn oauth1_api_key_and_basic_imports_come_back_in_their_own_shapes(db: &TestDatabase) {
    let app = app_with_config(db, "k").await;
    // Each kind under a template of its kind.
    for (key, provider) in [("k1", "twitter"), ("kk", "openai"), ("kb", "jira-basic")] {
        app.create_integration_of(key, provider).await;
    }
    let cases = [
        (
            "/connection",
            json!({ "connection_id": "oauth1-flat", "oauth_token": "ot", "oauth_token_secret": "ots",
                    "raw": { "oauth_token": "ot", "user_id": "7" } }),
            json!({ "type": "OAUTH1", "oauth_token": "ot", "oauth_token_secret": "ots",
                    "raw": { "oauth_token": "ot", "user_id": "7" } }),
        ),
        (
            "/connections",
            json!({ "connection_id": "oauth1-nested",
                    "credentials": { "type": "OAUTH1", "oauth_token": "ot2", "oauth_token_secret": "ots2" } }),
            json!({ "type": "OAUTH1", "oauth_token": "ot2", "oauth_token_secret": "ots2", "raw": {} }),
        ),
        (
            "/connection",
            json!({ "connection_id": "api-key-flat", "api_key": "sk_live_1" }),
            json!({ "type": "API_KEY", "apiKey": "sk_live_1" }),
        ),
        (
            "/connections",
            json!({ "connection_id": "api-key-nested",
                    "credentials": { "type": "API_KEY", "apiKey": "sk_live_2" } }),
            json!({ "type": "API_KEY", "apiKey": "sk_live_2" }),
        ),
        (
            "/connection",
            json!({ "connection_id": "basic-flat", "username": "ann", "password": "pw1" }),
            json!({ "type": "BASIC", "username": "ann", "password": "pw1" }),
        ),
        (
            "/connections",
            json!({ "connection_id": "basic-nested",
                    "credentials": { "type": "BASIC", "username": "bob", "password": "pw2" } }),
            json!({ "type": "BASIC", "username": "bob", "password": "pw2" }),
        ),
    ];
    for (path, mut body, expected) in cases {
        let key = match expected["type"].as_str() {
            Some("OAUTH1") => "k1",
            Some("API_KEY") => "kk",
            _ => "kb",
        };
        body["provider_config_key"] = json!(key);
        let id = body["connection_id"].as_str().unwrap().to_owned();
        // Not under the OAuth 2 template of `k`: no request it makes would carry them.
        let mut elsewhere = body.clone();
        elsewhere["provider_config_key"] = json!("k");
        assert_error(app.post_json(path, &elsewhere).await, 400, "invalid_body").await;
        let created = import(&app, path, body).await;
        assert_eq!(created["credentials"], expected, "import of {id}");
        for family in ["/connection", "/connections"] {
            let read = app
                .get_ok(&format!("{family}/{id}?provider_config_key={key}"))
                .await;
            assert_eq!(read["credentials"], expected, "{family}/{id}");
            assert_eq!(read["id"], created["id"], "{family}/{id}");
        }
        // `refresh_token=false` only concerns OAuth2: these shapes are unchanged.
        let read = app
            .get_ok(&format!(
                "/connection/{id}?provider_config_key={key}&refresh_token=false"
            ))
            .await;
        assert_eq!(read["credentials"], expected, "{id} without refresh token");
    }
}

async fn every_write_is_visible_to_the_very_next_read(db: &TestDatabase) {
    let app = app_with_config(db, "ryw").await;
    let path = "/connection/c?provider_config_key=ryw";
    for round in 0..5 {
        let token = format!("token-{round}");
        import_oauth2(&app, "ryw", "c", &token).await;
        let read = app.get_ok(path).await;
        assert_eq!(read["credentials"]["access_token"], token, "round {round}");
        assert_eq!(
            app.get_ok("/connection?connectionId=c").await["connections"]
                .as_array()
                .unwrap()
                .len(),
            1,
            "round {round}"
        );

        let metadata = json!({ "round": round });
        let response = app
            .post_json("/connection/c/metadata?provider_config_key=ryw", &metadata)
            .await;
        assert_eq!(response.status(), 201);
        assert_eq!(
            app.get_ok(path).await["metadata"],
            metadata,
            "round {round}"
        );

        let response = app.delete(path).await;
        assert_eq!(ok_json(response).await, json!({ "success": true }));
        assert_error(app.get(path).await, 404, "unknown_connection").await;
        assert_eq!(
            app.get_ok("/connection").await,
            json!({ "connections": [] }),
            "round {round}"
        );
    }
}

async fn the_list_shows_connections_without_credentials_and_filters_by_connection_id(
    db: &TestDatabase,
) {
    let app = app_with_config(db, "alpha").await;
    create_config(&app, "beta").await;
    assert_eq!(
        app.get_ok("/connection").await,
        json!({ "connections": [] })
    );
    let a = import_oauth2(&app, "alpha", "shared-id", "secret_access_alpha").await;
    let b = import_oauth2(&app, "beta", "shared-id", "secret_access_beta").await;
    let c = import_oauth2(&app, "alpha", "other-id", "secret_access_other").await;

    for family in ["/connection", "/connections"] {
        let list = app.get_ok(family).await;
        assert_eq!(sorted_keys(&list), ["connections"]);
        let items = list["connections"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{list}");
        for item in items {
            assert_eq!(
                sorted_keys(item),
                [
                    "connection_id",
                    "created",
                    "end_user",
                    "errors",
                    "id",
                    "metadata",
                    "provider",
                    "provider_config_key",
                    "tags"
                ]
            );
            assert!(item["id"].is_i64());
            seed_timestamp(&item["created"]);
            assert_eq!(item["errors"], json!([]));
            assert_eq!(item["end_user"], Value::Null);
            assert_eq!(item["tags"], json!({}));
            assert_eq!(item["metadata"], Value::Null);
            if family == "/connection" {
                // The seed's quirk: `provider` holds the config key.
                assert_eq!(item["provider"], item["provider_config_key"]);
            } else {
                assert_eq!(item["provider"], "github");
            }
        }
        // Newest first.
        let ids: Vec<i64> = items.iter().map(|i| i["id"].as_i64().unwrap()).collect();
        assert_eq!(
            ids,
            [
                c["id"].as_i64().unwrap(),
                b["id"].as_i64().unwrap(),
                a["id"].as_i64().unwrap()
            ]
        );
        let mut seen: Vec<(String, String, i64)> = items
            .iter()
            .map(|i| {
                (
                    i["provider_config_key"].as_str().unwrap().to_owned(),
                    i["connection_id"].as_str().unwrap().to_owned(),
                    i["id"].as_i64().unwrap(),
                )
            })
            .collect();
        seen.sort();
        let mut expected = vec![
            (
                "alpha".to_owned(),
                "other-id".to_owned(),
                c["id"].as_i64().unwrap(),
            ),
            (
                "alpha".to_owned(),
                "shared-id".to_owned(),
                a["id"].as_i64().unwrap(),
            ),
            (
                "beta".to_owned(),
                "shared-id".to_owned(),
                b["id"].as_i64().unwrap(),
            ),
        ];
        expected.sort();
        assert_eq!(seen, expected);
        let text = list.to_string();
        for secret in ["secret_access", "refresh-", "credentials"] {
            assert!(!text.contains(secret), "{secret} in the list: {text}");
        }

        let filtered = app
            .get_ok(&format!("{family}?connectionId=shared-id"))
            .await;
        let items = filtered["connections"].as_array().unwrap();
        assert_eq!(items.len(), 2, "{filtered}");
        assert!(items.iter().all(|i| i["connection_id"] == "shared-id"));
        let none = app.get_ok(&format!("{family}?connectionId=nobody")).await;
        assert_eq!(none, json!({ "connections": [] }));
        // An empty filter is no filter (the filters themselves: `connection_lists.rs`).
        let all = app
            .get_ok(&format!("{family}?connectionId=&search=&endUserId="))
            .await;
        assert_eq!(all["connections"].as_array().unwrap().len(), 3);
    }
}

async fn metadata_post_replaces_and_patch_merges(db: &TestDatabase) {
    let app = app_with_config(db, "m").await;
    import_oauth2(&app, "m", "u", "t").await;
    let read = "/connection/u?provider_config_key=m";
    for family in ["/connection", "/connections"] {
        let path = format!("{family}/u/metadata?provider_config_key=m");
        let response = app
            .post_json(&path, &json!({ "a": 1, "nested": { "x": 1, "y": 2 } }))
            .await;
        assert_eq!(response.status(), 201, "{family}");
        assert_eq!(
            app.get_ok(read).await["metadata"],
            json!({ "a": 1, "nested": { "x": 1, "y": 2 } })
        );

        let response = app
            .patch_json(&path, &json!({ "b": 2, "nested": { "z": 3 } }))
            .await;
        assert_eq!(response.status(), 200, "{family}");
        // A shallow merge: top-level keys are replaced, others kept.
        assert_eq!(
            app.get_ok(read).await["metadata"],
            json!({ "a": 1, "b": 2, "nested": { "z": 3 } })
        );

        let response = app.post_json(&path, &json!({ "only": true })).await;
        assert_eq!(response.status(), 201);
        assert_eq!(app.get_ok(read).await["metadata"], json!({ "only": true }));

        let response = app.post_json(&path, &json!({})).await;
        assert_eq!(response.status(), 201);
        assert_eq!(app.get_ok(read).await["metadata"], json!({}));
    }
    // Metadata leaves the credentials and the creation time alone.
    let body = app.get_ok(read).await;
    assert_eq!(body["credentials"]["access_token"], "t");
    assert!(seed_timestamp(&body["updated_at"]) >= seed_timestamp(&body["created_at"]));
}

async fn bulk_metadata_sets_every_listed_connection_or_none(db: &TestDatabase) {
    let app = app_with_config(db, "bulk").await;
    import_oauth2(&app, "bulk", "a", "ta").await;
    import_oauth2(&app, "bulk", "b", "tb").await;
    let metadata_of = |id: &'static str| {
        let app = &app;
        async move {
            app.get_ok(&format!("/connection/{id}?provider_config_key=bulk"))
                .await["metadata"]
                .clone()
        }
    };

    let body = json!({
        "connection_id": ["a", "b"],
        "provider_config_key": "bulk",
        "metadata": { "plan": "pro", "seats": 3 },
    });
    let response = app.post_json("/connections/metadata", &body).await;
    assert_eq!(response.status(), 201);
    assert_eq!(ok_json(response).await, body, "POST echoes the body");
    assert_eq!(metadata_of("a").await, json!({ "plan": "pro", "seats": 3 }));
    assert_eq!(metadata_of("b").await, json!({ "plan": "pro", "seats": 3 }));

    let response = app
        .patch_json(
            "/connection/metadata",
            &json!({ "connection_id": "a", "provider_config_key": "bulk", "metadata": { "seats": 4 } }),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(metadata_of("a").await, json!({ "plan": "pro", "seats": 4 }));
    assert_eq!(metadata_of("b").await, json!({ "plan": "pro", "seats": 3 }));

    // One unknown id: 404 and nothing is written, whatever the position of the unknown id.
    for ids in [
        json!(["a", "ghost", "b"]),
        json!(["ghost", "a"]),
        json!(["b", "ghost"]),
    ] {
        for method in [reqwest::Method::POST, reqwest::Method::PATCH] {
            let response = app
                .send_json(
                    method.clone(),
                    "/connections/metadata",
                    &json!({ "connection_id": ids, "provider_config_key": "bulk", "metadata": { "plan": "free" } }),
                )
                .await;
            let error = assert_error(response, 404, "unknown_connection").await;
            assert_eq!(error["payload"]["connection_id"], "ghost", "{method} {ids}");
        }
    }
    assert_eq!(metadata_of("a").await, json!({ "plan": "pro", "seats": 4 }));
    assert_eq!(metadata_of("b").await, json!({ "plan": "pro", "seats": 3 }));

    // An id named twice is written once; a list of more than 1,000 is refused whole.
    let twice = json!({ "connection_id": ["a", "b", "a"], "provider_config_key": "bulk", "metadata": { "n": 1 } });
    let response = app.patch_json("/connections/metadata", &twice).await;
    assert_eq!(response.status(), 200);
    let history = app
        .get_ok("/connection/a/history?provider_config_key=bulk")
        .await;
    let merges = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metadata_set")
        .count();
    assert_eq!(merges, 3, "{history}");
    let many: Vec<String> = (0..1001).map(|_| "a".to_owned()).collect();
    let response = app
        .patch_json(
            "/connections/metadata",
            &json!({ "connection_id": many, "provider_config_key": "bulk", "metadata": { "n": 2 } }),
        )
        .await;
    assert_error(response, 400, "invalid_body").await;
    assert_eq!(
        metadata_of("b").await,
        json!({ "plan": "pro", "seats": 3, "n": 1 })
    );
}

/// The database went away between a deletion's append and its shredding: a data key of the
/// deleted stream is still live. The client's retry is refused as before, and shreds it.
async fn a_deletion_whose_shredding_failed_is_finished_by_the_retry(db: &TestDatabase) {
    use domain::keys::Wrapping;
    let app = app_with_config(db, "d").await;
    import_oauth2(&app, "d", "c1", "t1").await;
    ok_json(app.delete("/connection/c1?provider_config_key=d").await).await;
    let backend = db.open().await;
    let keys = backend.keys();
    let owner = domain::connection::stream_id("d", "c1");
    let master = keys.master_keys().await.unwrap();
    let master = master.iter().find(|m| m.active).unwrap();
    let wrapping = Wrapping {
        master_key_id: &master.key_id,
        wrapped: &[7; 40],
    };
    keys.insert_data_key(uuid::Uuid::new_v4(), owner.as_str(), wrapping)
        .await
        .unwrap();
    assert_eq!(keys.live_data_keys(owner.as_str()).await.unwrap().len(), 1);
    let again = app.delete("/connection/c1?provider_config_key=d").await;
    assert_error(again, 400, "unknown_connection").await;
    assert!(
        keys.live_data_keys(owner.as_str())
            .await
            .unwrap()
            .is_empty()
    );
    // Never authorized: refused, and nothing else.
    let never = app.delete("/connection/never?provider_config_key=d").await;
    assert_error(never, 400, "unknown_connection").await;
}

async fn a_deleted_connection_is_gone_from_reads_and_from_the_list(db: &TestDatabase) {
    let app = app_with_config(db, "d").await;
    import_oauth2(&app, "d", "keep", "tk").await;
    import_oauth2(&app, "d", "drop", "td").await;
    import_oauth2(&app, "d", "plural", "tp").await;

    let response = app.delete("/connection/drop?provider_config_key=d").await;
    assert_eq!(response.status(), 200);
    assert_eq!(ok_json(response).await, json!({ "success": true }));
    let response = app
        .delete("/connections/plural?provider_config_key=d")
        .await;
    assert_eq!(response.status(), 200);

    for gone in ["drop", "plural"] {
        for family in ["/connection", "/connections"] {
            let path = format!("{family}/{gone}?provider_config_key=d");
            let error = assert_error(app.get(&path).await, 404, "unknown_connection").await;
            assert_eq!(error["payload"]["connection_id"], gone);
            assert_eq!(error["payload"]["provider_config_key"], "d");
            // Deleting again is Nango's 400; setting metadata the same 404.
            let again = assert_error(app.delete(&path).await, 400, "unknown_connection").await;
            assert_eq!(again["payload"]["connection_id"], gone);
            let metadata = format!("{family}/{gone}/metadata?provider_config_key=d");
            assert_error(
                app.post_json(&metadata, &json!({})).await,
                404,
                "unknown_connection",
            )
            .await;
        }
    }
    assert_eq!(app.listed("connection_id").await, ["keep"]);
    assert_eq!(
        app.access_token("/connection/keep?provider_config_key=d")
            .await,
        "tk"
    );

    // A deleted connection can be imported again; it is live and readable once more.
    import_oauth2(&app, "d", "drop", "td2").await;
    assert_eq!(
        app.access_token("/connection/drop?provider_config_key=d")
            .await,
        "td2"
    );
}

async fn config_crud_hides_the_client_secret_unless_asked(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    assert_eq!(app.get_ok("/config").await, json!({ "configs": [] }));
    let created = create_config(&app, "crm").await;
    assert!(created["config_id"].is_i64(), "{created}");
    create_config(&app, "other").await;

    let list = app.get_ok("/config").await;
    let configs = list["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2, "{list}");
    assert!(!list.to_string().contains(SECRET), "{list}");
    assert!(
        configs
            .iter()
            .all(|c| c.get("oauth_client_secret").is_none())
    );
    let crm = configs
        .iter()
        .find(|c| c["unique_key"] == "crm")
        .unwrap_or_else(|| panic!("crm is listed: {list}"));
    assert_eq!(crm["provider"], "github");

    let config = app.get_ok("/config/crm").await;
    assert!(!config.to_string().contains(SECRET), "{config}");
    assert_eq!(config["config"]["oauth_client_id"], "client-id-of-crm");
    assert_eq!(config["config"]["oauth_scopes"], "repo,user");
    assert_eq!(config["config"]["provider"], "github");
    assert_eq!(config["config"]["id"], created["config_id"]);
    seed_timestamp(&config["config"]["created_at"]);
    for query in ["", "?include_creds=false", "?include_creds=0"] {
        let config = app.get_ok(&format!("/config/crm{query}")).await;
        assert_eq!(config["config"].get("oauth_client_secret"), None, "{query}");
    }
    let with_creds = app.get_ok("/config/crm?include_creds=true").await;
    assert_eq!(with_creds["config"]["oauth_client_secret"], SECRET);

    // PUT replaces everything, scopes normalised from spaces.
    let response = app
        .put_json(
            "/config",
            &json!({
                "provider_config_key": "crm",
                "provider": "salesforce",
                "oauth_client_id": "new-id",
                "oauth_client_secret": "new-secret",
                "oauth_scopes": "api refresh_token",
            }),
        )
        .await;
    ok_json(response).await;
    let replaced = app.get_ok("/config/crm?include_creds=true").await["config"].clone();
    assert_eq!(replaced["provider"], "salesforce");
    assert_eq!(replaced["oauth_client_id"], "new-id");
    assert_eq!(replaced["oauth_client_secret"], "new-secret");
    assert_eq!(replaced["oauth_scopes"], "api,refresh_token");
    assert!(seed_timestamp(&replaced["updated_at"]) >= seed_timestamp(&replaced["created_at"]));
    let other = app.get_ok("/config/other?include_creds=true").await;
    assert_eq!(
        other["config"]["oauth_client_secret"], SECRET,
        "other configs are untouched"
    );

    // POST of an existing key is a conflict and changes nothing.
    let response = app
        .post_json(
            "/config",
            &json!({
                "provider_config_key": "crm",
                "provider": "github",
                "oauth_client_id": "dup",
                "oauth_client_secret": "dup",
            }),
        )
        .await;
    let error = assert_error(response, 409, "duplicate_provider_config").await;
    assert_eq!(error["payload"]["provider_config_key"], "crm");
    assert_eq!(
        app.get_ok("/config/crm").await["config"]["oauth_client_id"],
        "new-id"
    );

    // DELETE, then the key is unknown everywhere, and it can be created again.
    ok_json(app.delete("/config/crm").await).await;
    assert_error(app.get("/config/crm").await, 404, "unknown_provider_config").await;
    assert_error(
        app.delete("/config/crm").await,
        404,
        "unknown_provider_config",
    )
    .await;
    let list = app.get_ok("/config").await;
    assert_eq!(list["configs"].as_array().unwrap().len(), 1, "{list}");
    create_config(&app, "crm").await;
    assert_eq!(
        app.get_ok("/config/crm").await["config"]["oauth_client_id"],
        "client-id-of-crm"
    );
}

/// Imports racing the deletion of their config: each one either fails or is deleted with it,
/// so none reappears (with its old credentials) when the key is configured again.
async fn connections_imported_while_their_config_is_deleted_do_not_come_back(db: &TestDatabase) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let app = spawn_app(db, &new_key()).await;
    for round in 0..3 {
        create_config(&app, "race").await;
        for i in 0..60 {
            import_oauth2(&app, "race", &format!("pre-{round}-{i}"), "t").await;
        }
        let deleted = AtomicBool::new(false);
        let importer = |worker: usize| {
            let (app, deleted) = (&app, &deleted);
            async move {
                let mut i = 0;
                while !deleted.load(Ordering::SeqCst) {
                    let body = json!({
                        "provider_config_key": "race",
                        "connection_id": format!("racing-{round}-{worker}-{i}"),
                        "access_token": "racing-token",
                    });
                    let answer = app.post_json("/connection", &body).await;
                    if answer.status() != 201 {
                        assert_error(answer, 400, "unknown_provider_config").await;
                    }
                    i += 1;
                }
            }
        };
        let delete = async {
            ok_json(app.delete("/config/race").await).await;
            deleted.store(true, Ordering::SeqCst);
        };
        tokio::join!(delete, importer(0), importer(1), importer(2), importer(3));
        create_config(&app, "race").await;
        let left = app.get_ok("/connection?integrationId=race").await;
        assert_eq!(left["connections"], json!([]), "round {round}");
        ok_json(app.delete("/config/race").await).await;
    }
}

async fn deleting_a_config_deletes_its_connections(db: &TestDatabase) {
    let app = app_with_config(db, "doomed").await;
    create_config(&app, "kept").await;
    import_oauth2(&app, "doomed", "one", "t1").await;
    import_oauth2(&app, "doomed", "two", "t2").await;
    import_oauth2(&app, "kept", "one", "t3").await;

    ok_json(app.delete("/config/doomed").await).await;

    for id in ["one", "two"] {
        let response = app
            .get(&format!("/connection/{id}?provider_config_key=doomed"))
            .await;
        let status = response.status();
        assert!(status.is_client_error(), "{id}: {status}");
        let body: Value = response.json().await.unwrap();
        crate::assert_error_shape(&body);
    }
    assert_eq!(app.listed("provider").await, ["kept"]);
    assert_eq!(
        app.access_token("/connection/one?provider_config_key=kept")
            .await,
        "t3"
    );

    // A config created again under the same key starts without the old connections.
    create_config(&app, "doomed").await;
    assert_error(
        app.get("/connection/one?provider_config_key=doomed").await,
        404,
        "unknown_connection",
    )
    .await;
    assert_eq!(app.listed("connection_id").await.len(), 1);

    // Once the last config is gone, the list is empty.
    ok_json(app.delete("/config/kept").await).await;
    ok_json(app.delete("/config/doomed").await).await;
    assert_eq!(
        app.get_ok("/connection").await,
        json!({ "connections": [] })
    );
}

async fn a_reimport_replaces_the_credentials_and_keeps_the_identity(db: &TestDatabase) {
    let app = app_with_config(db, "re").await;
    let path = "/connection/u?provider_config_key=re";
    import_oauth2(&app, "re", "u", "first").await;
    let first = app.get_ok(path).await;
    let listed = app.get_ok("/connection").await;
    assert_eq!(listed["connections"][0]["created"], first["created_at"]);
    assert_eq!(listed["connections"][0]["id"], first["id"]);

    // Metadata survives a re-import that does not mention it; the credentials are replaced
    // whole (the new import has no refresh token, so none is shown).
    let response = app
        .post_json(
            &format!("{}/metadata?provider_config_key=re", "/connection/u"),
            &json!({ "m": 1 }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let second = import(
        &app,
        "/connection",
        json!({
            "provider_config_key": "re",
            "connection_id": "u",
            "access_token": "second",
            "expires_at": "2030-01-01T01:00:00+01:00",
        }),
    )
    .await;
    let read = app.get_ok(path).await;
    assert_eq!(read, second);
    assert_eq!(read["id"], first["id"]);
    assert_eq!(read["created_at"], first["created_at"]);
    assert!(seed_timestamp(&read["updated_at"]) >= seed_timestamp(&first["updated_at"]));
    assert_eq!(read["metadata"], json!({ "m": 1 }));
    assert_eq!(
        read["credentials"],
        json!({
            "type": "OAUTH2",
            "access_token": "second",
            "expires_at": "2030-01-01T00:00:00.000Z",
            "raw": {},
        })
    );
    assert_eq!(app.listed("connection_id").await.len(), 1);
}

async fn connection_ids_with_reserved_characters_round_trip(db: &TestDatabase) {
    let app = app_with_config(db, "chars").await;
    let ids = [
        "a/b c?d&e=f#g",
        "%41",
        "ünïcødé-日本",
        "dots.and:colons",
        "+plus+",
    ];
    for id in ids {
        import_oauth2(&app, "chars", id, &format!("token for {id}")).await;
    }
    for id in ids {
        let mut url = reqwest::Url::parse(&app.url("/connection/")).unwrap();
        url.path_segments_mut().unwrap().pop().push(id);
        url.query_pairs_mut()
            .append_pair("provider_config_key", "chars");
        let read = ok_json(app.client.get(url.clone()).send().await.unwrap()).await;
        assert_eq!(read["connection_id"], id, "{url}");
        assert_eq!(
            read["credentials"]["access_token"],
            format!("token for {id}")
        );

        let mut url = reqwest::Url::parse(&app.url("/connection")).unwrap();
        url.query_pairs_mut().append_pair("connectionId", id);
        let list = ok_json(app.client.get(url).send().await.unwrap()).await;
        let items = list["connections"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{id}: {list}");
        assert_eq!(items[0]["connection_id"], id);
    }
    // Deleting one leaves the others.
    let mut url = reqwest::Url::parse(&app.url("/connections/")).unwrap();
    url.path_segments_mut().unwrap().pop().push(ids[0]);
    url.query_pairs_mut()
        .append_pair("provider_config_key", "chars");
    ok_json(app.client.delete(url).send().await.unwrap()).await;
    assert_eq!(app.listed("connection_id").await.len(), ids.len() - 1);
}

async fn a_connection_named_metadata_is_readable_and_deletable(db: &TestDatabase) {
    let app = app_with_config(db, "md").await;
    import_oauth2(&app, "md", "metadata", "tm").await;
    for family in ["/connection", "/connections"] {
        let read = app
            .get_ok(&format!("{family}/metadata?provider_config_key=md"))
            .await;
        assert_eq!(read["connection_id"], "metadata", "{family}");
        assert_eq!(read["credentials"]["access_token"], "tm");
    }
    let response = app
        .post_json(
            "/connection/metadata/metadata?provider_config_key=md",
            &json!({ "x": 1 }),
        )
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        app.get_ok("/connection/metadata?provider_config_key=md")
            .await["metadata"],
        json!({ "x": 1 })
    );
    ok_json(
        app.delete("/connections/metadata?provider_config_key=md")
            .await,
    )
    .await;
    assert_error(
        app.get("/connection/metadata?provider_config_key=md").await,
        404,
        "unknown_connection",
    )
    .await;
    // The route keeps its own meaning for the other methods.
    assert_error(
        app.post_json(
            "/connection/metadata",
            &json!({ "connection_id": "metadata", "provider_config_key": "md", "metadata": {} }),
        )
        .await,
        404,
        "unknown_connection",
    )
    .await;
}

async fn concurrent_writes_to_one_connection_all_land(db: &TestDatabase) {
    let app = app_with_config(db, "busy").await;
    import_oauth2(&app, "busy", "c", "t0").await;
    let path = "/connection/c/metadata?provider_config_key=busy";

    // Each request on its own task, so they really run at once.
    let mut merges = tokio::task::JoinSet::new();
    for i in 0..8 {
        let request = app
            .client
            .patch(app.url(path))
            .json(&json!({ format!("k{i}"): i }));
        merges.spawn(async move { request.send().await.unwrap() });
    }
    while let Some(response) = merges.join_next().await {
        let response = response.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let expected: serde_json::Map<String, Value> =
        (0..8).map(|i| (format!("k{i}"), json!(i))).collect();
    let read = app.get_ok("/connection/c?provider_config_key=busy").await;
    assert_eq!(
        read["metadata"],
        Value::Object(expected),
        "every merge is in the read model"
    );

    let mut imports = tokio::task::JoinSet::new();
    for i in 1..=6 {
        let request = app.client.post(app.url("/connection")).json(&json!({
            "provider_config_key": "busy", "connection_id": "c", "access_token": format!("t{i}"),
        }));
        imports.spawn(async move { request.send().await.unwrap() });
    }
    while let Some(response) = imports.join_next().await {
        let response = response.unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
    let read = app.get_ok("/connection/c?provider_config_key=busy").await;
    let token = read["credentials"]["access_token"].as_str().unwrap();
    assert!((1..=6).any(|i| token == format!("t{i}")), "{token}");
    assert_eq!(read["metadata"]["k7"], 7, "imports keep the metadata");
    assert_eq!(app.listed("connection_id").await.len(), 1);
}

/// Crypto-shredding holds across instances: once instance B deletes a connection, instance A,
/// which had opened its credentials (and so holds the data key in memory), can no longer open
/// them either, as soon as it hears of the deletion through the log.
#[tokio::test]
async fn a_deletion_on_one_instance_shreds_the_keys_cached_by_another() {
    use domain::connection::ConnectionEvent;
    use domain::event::DomainEvent;

    let db = TestDatabase::postgres().await;
    let key = new_key();
    let (a, state_a) = crate::spawn_with_state(crate::config_on(&db, &key, &[])).await;
    let b = spawn_app(&db, &key).await;
    create_config(&a, "s").await;
    import_oauth2(&a, "s", "c", "token-to-shred").await;
    let read = a.get_ok("/connection/c?provider_config_key=s").await;
    assert_eq!(read["credentials"]["access_token"], "token-to-shred");

    let stream = domain::connection::stream_id("s", "c");
    let events = state_a
        .backend
        .events()
        .read_stream(&stream, 0)
        .await
        .unwrap();
    let sealed = events
        .iter()
        .find_map(|e| match ConnectionEvent::from_recorded(e) {
            Ok(ConnectionEvent::ConnectionAuthorized(authorized)) => {
                Some(authorized.authorization.credentials)
            }
            _ => None,
        })
        .unwrap();
    let vault = state_a.commands.vault();
    assert!(vault.unseal(&sealed).await.is_ok(), "A can open it before");

    assert_eq!(
        b.delete("/connection/c?provider_config_key=s")
            .await
            .status(),
        200
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match vault.unseal(&sealed).await {
            Err(domain::keys::KeyError::Shredded(_)) => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "instance A still opens the shredded secret: {:?}",
                    other.map(|_| "plaintext")
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The `value` of the `/metrics` sample `series`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

async fn a_replica_smaller_than_the_working_set_evicts_and_still_serves_every_read(
    db: &TestDatabase,
) {
    let app = spawn_app_with(
        db,
        &new_key(),
        &["--connection-cache", "2", "--data-key-cache", "2"],
    )
    .await;
    create_config(&app, "github").await;
    for n in 0..6 {
        import_oauth2(&app, "github", &format!("c{n}"), &format!("token-{n}")).await;
    }
    for round in 0..3 {
        for n in 0..6 {
            let connection = app
                .get_ok(&format!("/connection/c{n}?provider_config_key=github"))
                .await;
            assert_eq!(
                connection["credentials"]["access_token"],
                format!("token-{n}"),
                "round {round}"
            );
        }
    }
    // The same connection again and again: answered from memory once the log follower has
    // heard of the imports (each event it reads drops its stream's entry).
    for _ in 0..5 {
        app.get_ok("/connection/c0?provider_config_key=github")
            .await;
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    // Both caches: the replica of the read model and the opened data keys (one per connection,
    // besides the integration's and the fingerprint key).
    for cache in ["connections", "data_keys"] {
        let series = |name: &str| metric(&text, &format!("{name}{{cache=\"{cache}\"}}"));
        assert!(series("grantline_cache_capacity") >= 2.0, "{cache}: {text}");
        assert!(series("grantline_cache_capacity") <= 4.0, "{cache}: {text}");
        assert!(
            series("grantline_cache_entries") <= series("grantline_cache_capacity"),
            "{cache}: {text}"
        );
        assert!(
            series("grantline_cache_evictions_total") >= 1.0,
            "{cache}: {text}"
        );
        assert!(
            series("grantline_cache_misses_total") >= 6.0,
            "{cache}: {text}"
        );
        assert!(
            series("grantline_cache_hits_total") >= 1.0,
            "{cache}: {text}"
        );
    }
}

async fn a_replica_bounded_by_memory_stays_within_it_and_still_serves_every_read(
    db: &TestDatabase,
) {
    let app = spawn_app_with(
        db,
        &new_key(),
        &["--connection-cache", "64KiB", "--data-key-cache", "1MiB"],
    )
    .await;
    create_config(&app, "github").await;
    // Each with some metadata, so that an entry weighs a few KiB: 40 of them outgrow 64 KiB.
    let filler = "x".repeat(1000);
    for n in 0..40 {
        import(
            &app,
            "/connection",
            json!({
                "provider_config_key": "github", "connection_id": format!("c{n}"),
                "access_token": format!("token-{n}"), "metadata": {"filler": filler},
            }),
        )
        .await;
    }
    for round in 0..2 {
        for n in 0..40 {
            let connection = app
                .get_ok(&format!("/connection/c{n}?provider_config_key=github"))
                .await;
            assert_eq!(
                connection["credentials"]["access_token"],
                format!("token-{n}"),
                "round {round}"
            );
        }
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    let series = |name: &str, cache: &str| metric(&text, &format!("{name}{{cache=\"{cache}\"}}"));
    assert_eq!(
        series("grantline_cache_budget_bytes", "connections"),
        65_536.0
    );
    assert_eq!(series("grantline_cache_capacity", "connections"), 0.0);
    let held = series("grantline_cache_bytes", "connections");
    assert!(held > 0.0 && held <= 65_536.0, "{text}");
    assert!(
        series("grantline_cache_entries", "connections") < 40.0,
        "{text}"
    );
    assert!(
        series("grantline_cache_evictions_total", "connections") >= 1.0,
        "{text}"
    );
    // Keys are counted at a fixed size: 1 MiB holds 8,192 of them.
    assert_eq!(
        series("grantline_cache_budget_bytes", "data_keys"),
        1_048_576.0
    );
    assert_eq!(series("grantline_cache_capacity", "data_keys"), 8_192.0);
    assert_eq!(
        series("grantline_cache_bytes", "data_keys"),
        series("grantline_cache_entries", "data_keys") * 128.0
    );
}
