//! The service starts on each backend, answers health checks and JSON errors, and guards keys.

use domain::testing::TestDatabase;
use grantline::startup::Application;
use serde_json::Value;

use crate::{config_on, new_key, serve_config, spawn_app, spawn_config};

#[tokio::test]
async fn health_answers_ok_on_postgres() {
    let db = TestDatabase::postgres().await;
    let app = spawn_app(&db, &new_key()).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["result"], "ok");
}

#[tokio::test]
async fn health_answers_ok_on_sqlite() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db, &new_key()).await;
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db, &new_key()).await;
    let response = app.get("/no/such/route").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let response = app.delete("/health").await;
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn a_wrong_master_key_stops_start_up_before_serving() {
    let db = TestDatabase::postgres().await;
    drop(spawn_app(&db, &new_key()).await);
    let config = config_on(&db, &new_key(), &[]);
    let error = Application::build(config).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("GRANTLINE_ENCRYPTION_KEY"), "{message}");
    assert!(message.contains("key check value failed"), "{message}");
}

#[tokio::test]
async fn the_embedded_default_creates_a_private_key_file_once_and_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let config = || serve_config(&["--listen", "127.0.0.1:0", "--data-dir", data_dir]);

    let first = spawn_config(config()).await;
    assert_eq!(first.get("/health").await.status(), 200);
    let key_file = dir.path().join("data/master.key");
    let written = std::fs::read_to_string(&key_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is private");
    }
    assert!(dir.path().join("data/grantline.db").exists());
    drop(first);

    // A second start reads the same key; the key check against the database passes.
    let second = spawn_config(config()).await;
    assert_eq!(second.get("/health").await.status(), 200);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), written);
}

#[tokio::test]
async fn in_open_mode_only_loopback_hosts_are_served_and_no_answer_is_cached() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db, &new_key()).await;
    let config_as = |host: &'static str| {
        app.client
            .get(app.url("/config"))
            .header("Host", host)
            .send()
    };
    // A page on another site whose name was rebound to 127.0.0.1 (DNS rebinding).
    for host in ["evil.example", "evil.example:3003", "10.0.0.1"] {
        let response = config_as(host).await.unwrap();
        assert_eq!(response.status(), 421, "{host}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "non_loopback_host");
    }
    for host in ["localhost", "127.0.0.1:3003", "[::1]:3003"] {
        let response = config_as(host).await.unwrap();
        assert_eq!(response.status(), 200, "{host}");
        assert_eq!(response.headers()["cache-control"], "no-store");
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("grantline_http_refused_total{limit=\"host\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn with_a_secret_key_any_host_is_served() {
    let db = TestDatabase::sqlite();
    let secret = "serve-test-secret-key-0123456789abcdef";
    let app = crate::spawn_app_with_secret(&db, &new_key(), secret).await;
    let response = app
        .client
        .get(app.url("/config"))
        .header("Host", "grantline.example.com")
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
}

/// Every pooled connection stuck behind a lock: requests that cannot get one are answered 503
/// with `Retry-After` after the pool wait, never left hanging, and all is well once it lifts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_get_a_database_connection_fails_fast_with_retry_after() {
    let db = TestDatabase::postgres().await;
    let app = crate::spawn_app_with(
        &db,
        &new_key(),
        &["--database-pool-size", "1", "--database-pool-wait", "1s"],
    )
    .await;
    let integration = serde_json::json!({ "provider_config_key": "gh", "provider": "github",
        "oauth_client_id": "id", "oauth_client_secret": "secret" });
    assert_eq!(app.post_json("/config", &integration).await.status(), 200);
    let mut locker = db.postgres_client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let import = |id: &str| {
        let body = serde_json::json!({ "provider_config_key": "gh", "connection_id": id,
            "access_token": "t" });
        let app = &app;
        async move {
            let started = std::time::Instant::now();
            let response = app.post_json("/connection", &body).await;
            (response, started.elapsed())
        }
    };
    // One request holds the only connection, blocked by the lock; the others wait for it.
    let ((a, _), (b, b_took), (c, c_took)) = tokio::join!(
        import("a"),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            import("b").await
        },
        async {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            lock.commit().await.unwrap();
            import("c").await
        },
    );
    assert_eq!(b.status(), 503, "{b_took:?}");
    assert_eq!(b.headers()["retry-after"], "1");
    assert!(b_took < std::time::Duration::from_secs(3), "{b_took:?}");
    let body: Value = b.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");
    // Once the lock lifts, everything works again without a restart.
    assert!(a.status() == 201 || a.status() == 503, "{}", a.status());
    assert_eq!(c.status(), 201, "{c_took:?}");
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("grantline_database_connections{state=\"max\"} 1"),
        "{text}"
    );
}
