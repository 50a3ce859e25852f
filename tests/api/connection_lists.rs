//! `GET /connections` filtered and paged as Nango's list is: connection id, search, end user,
//! organization, integrations, tags, limit and page, newest first; on both backends, before and
//! after a rebuild of the read model.

use domain::testing::TestDatabase;
use serde_json::{Value, json};

use crate::{TestApp, assert_error, new_key, ok_json, spawn_app, strings};

domain::on_both_backends!(
    the_list_filters_by_end_user_organization_integration_tags_and_search_and_pages,
    bad_list_parameters_get_invalid_query_params,
);

async fn integration(app: &TestApp, key: &str) {
    let body = json!({
        "provider_config_key": key, "provider": "github",
        "oauth_client_id": "id", "oauth_client_secret": "secret",
    });
    ok_json(app.post_json("/config", &body).await).await;
}

async fn import(app: &TestApp, key: &str, id: &str, owner: Value) {
    let mut body = json!({
        "provider_config_key": key, "connection_id": id,
        "credentials": {"type": "OAUTH2", "access_token": format!("token-{id}")},
    });
    if let (Some(body), Some(owner)) = (body.as_object_mut(), owner.as_object()) {
        body.extend(owner.clone());
    }
    let response = app.post_json("/connections", &body).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
}

/// The connection ids `GET /connections?query` lists, in order.
async fn ids(app: &TestApp, query: &str) -> Vec<String> {
    let list = app.get_ok(&format!("/connections?{query}")).await;
    strings(&list["connections"], "connection_id")
        .into_iter()
        .map(str::to_owned)
        .collect()
}

async fn the_list_filters_by_end_user_organization_integration_tags_and_search_and_pages(
    db: &TestDatabase,
) {
    let app = spawn_app(db, &new_key()).await;
    integration(&app, "alpha").await;
    integration(&app, "beta").await;
    import(
        &app,
        "alpha",
        "c1",
        json!({
            "end_user": {"id": "u1", "email": "Ann@Example.com", "display_name": "Ann Lee"},
            "tags": {"Team": "core"},
            "metadata": {"plan": "pro"},
        }),
    )
    .await;
    import(
        &app,
        "alpha",
        "c2",
        json!({"end_user": {"id": "u2", "display_name": "Bob"}, "tags": {"team": "edge"}}),
    )
    .await;
    import(
        &app,
        "beta",
        "c3",
        json!({"end_user": {"id": "u1"}, "tags": {"team": "core", "region": "eu"}}),
    )
    .await;
    import(&app, "beta", "c4_%", json!({})).await;

    let check = || async {
        assert_eq!(ids(&app, "").await, ["c4_%", "c3", "c2", "c1"]);
        assert_eq!(ids(&app, "connectionId=c2").await, ["c2"]);
        assert_eq!(ids(&app, "endUserId=u1").await, ["c3", "c1"]);
        assert_eq!(ids(&app, "endUserId=nobody").await, Vec::<String>::new());
        assert_eq!(ids(&app, "integrationId=beta").await, ["c4_%", "c3"]);
        assert_eq!(ids(&app, "integrationId=alpha,beta").await.len(), 4);
        assert_eq!(ids(&app, "integrationId=gamma").await, Vec::<String>::new());
        assert_eq!(ids(&app, "tags[team]=core").await, ["c3", "c1"]);
        assert_eq!(ids(&app, "tags[TEAM]=core&tags[region]=eu").await, ["c3"]);
        assert_eq!(ids(&app, "tags[end_user_id]=u2").await, ["c2"]);
        assert_eq!(ids(&app, "tags[team]=nobody").await, Vec::<String>::new());
        // Search: case-insensitive, in the id, the end user's name and e-mail; `%` and `_` are
        // characters, not wildcards.
        assert_eq!(ids(&app, "search=ANN").await, ["c1"]);
        assert_eq!(ids(&app, "search=example.com").await, ["c1"]);
        // An e-mail is looked up by its part up to the `@`, and then matched whole.
        assert_eq!(ids(&app, "search=ann@EXAMPLE.c").await, ["c1"]);
        assert_eq!(
            ids(&app, "search=ann@example.org").await,
            Vec::<String>::new()
        );
        assert_eq!(ids(&app, "search=@example").await, ["c1"]);
        assert_eq!(ids(&app, "search=bo").await, ["c2"]);
        assert_eq!(ids(&app, "search=c").await.len(), 4);
        assert_eq!(ids(&app, "search=%25").await, ["c4_%"]);
        assert_eq!(ids(&app, "search=4_").await, ["c4_%"]);
        assert_eq!(ids(&app, "search=c_").await, Vec::<String>::new());
        // Filters combine.
        assert_eq!(
            ids(&app, "integrationId=alpha&tags[team]=core").await,
            ["c1"]
        );
        assert_eq!(ids(&app, "endUserId=u1&search=ann").await, ["c1"]);
        // Pages of `limit`, newest first.
        assert_eq!(ids(&app, "limit=3").await, ["c4_%", "c3", "c2"]);
        assert_eq!(ids(&app, "limit=3&page=1").await, ["c1"]);
        assert_eq!(ids(&app, "limit=2&page=1").await, ["c2", "c1"]);
        assert_eq!(ids(&app, "limit=2&page=2").await, Vec::<String>::new());
        assert_eq!(
            ids(&app, "limit=1&page=18446744073709551615").await,
            Vec::<String>::new()
        );

        // The item shape.
        let list = app.get_ok("/connections?connectionId=c1").await;
        let item = &list["connections"][0];
        assert_eq!(item["provider"], "github");
        assert_eq!(item["provider_config_key"], "alpha");
        assert_eq!(item["metadata"], json!({"plan": "pro"}));
        assert_eq!(item["errors"], json!([]));
        assert_eq!(
            item["end_user"],
            json!({"id": "u1", "display_name": "Ann Lee", "email": "Ann@Example.com",
                   "tags": null, "organization": null})
        );
        assert_eq!(
            item["tags"],
            json!({"team": "core", "end_user_id": "u1", "end_user_email": "Ann@Example.com",
                   "end_user_display_name": "Ann Lee"})
        );
        let seed = app.get_ok("/connection?connectionId=c1").await;
        assert_eq!(seed["connections"][0]["provider"], "alpha");
    };
    check().await;

    // A rebuilt read model answers the same.
    let backend = db.open().await;
    projections::Runner::new(&backend)
        .rebuild("connections", |_| {})
        .await
        .unwrap();
    check().await;

    // Patching tags and deleting a connection show in the next list.
    let patched = app
        .patch_json(
            "/connections/c2?provider_config_key=alpha",
            &json!({"tags": {"team": "core"}}),
        )
        .await;
    assert_eq!(ok_json(patched).await, json!({"success": true}));
    assert_eq!(ids(&app, "tags[team]=core").await, ["c3", "c2", "c1"]);
    assert_eq!(ids(&app, "endUserId=u2").await, ["c2"]);
    assert_eq!(
        ids(&app, "tags[end_user_id]=u2").await,
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&app, "endUserOrganizationId=o1").await,
        Vec::<String>::new()
    );
    let patched = app
        .patch_json(
            "/connections/c3?provider_config_key=beta",
            &json!({"end_user": {"id": "u1"}, "organization": {"id": "o1", "display_name": "Org"}}),
        )
        .await;
    ok_json(patched).await;
    assert_eq!(ids(&app, "endUserOrganizationId=o1").await, ["c3"]);
    let list = app.get_ok("/connections?endUserOrganizationId=o1").await;
    assert_eq!(
        list["connections"][0]["end_user"]["organization"],
        json!({"id": "o1", "display_name": "Org"})
    );
    let deleted = app
        .delete("/connections/c1?provider_config_key=alpha")
        .await;
    assert!(deleted.status().is_success());
    assert_eq!(ids(&app, "endUserId=u1").await, ["c3"]);
    // (c3's tags were replaced by those of its new end user and organization.)
    assert_eq!(ids(&app, "tags[team]=core").await, ["c2"]);
    assert_eq!(ids(&app, "tags[organization_id]=o1").await, ["c3"]);
    assert_eq!(ids(&app, "search=ann").await, Vec::<String>::new());
}

async fn bad_list_parameters_get_invalid_query_params(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    integration(&app, "alpha").await;
    import(&app, "alpha", "c1", json!({})).await;
    for query in [
        "limit=0",
        "limit=5000",
        "limit=x",
        "page=-1",
        "unknown=1",
        "limit=1&limit=2",
        "tags[bad%20key]=x",
        "tags[end_user_email]=nope",
        "tags[a]=1&tags[A]=2",
        "search=a%0Ab",
        "endUserId=%00",
        "tags[a]=%00",
        "tags[a]=x%0Ay",
    ] {
        for family in ["/connection", "/connections"] {
            let response = app.get(&format!("{family}?{query}")).await;
            let body = assert_error(response, 400, "invalid_query_params").await;
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{query}: {body}"
            );
        }
    }
    // Bad imports of owners are refused whole.
    for owner in [
        json!({"tags": {"1bad": "x"}}),
        json!({"tags": {"a": 1}}),
        json!({"end_user": {"id": ""}}),
        json!({"end_user": {"id": "u", "email": "not-an-email"}}),
        json!({"end_user": {"id": "u", "unknown": 1}}),
    ] {
        let mut body = json!({
            "provider_config_key": "alpha", "connection_id": "c2",
            "credentials": {"type": "OAUTH2", "access_token": "t"},
        });
        body.as_object_mut()
            .unwrap()
            .extend(owner.as_object().unwrap().clone());
        let response = app.post_json("/connections", &body).await;
        assert_error(response, 400, "invalid_body").await;
    }
    assert_eq!(ids(&app, "").await, ["c1"]);
}
