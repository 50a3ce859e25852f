//! Operator surfaces: `/admin/projections`, `grantline projections status|rebuild` against a
//! running service.

use std::time::Duration;

use domain::testing::TestDatabase;
use serde_json::Value;

use crate::{new_key, spawn_app, strings};

domain::on_both_backends!(admin_projections_reports_each_checkpoint_the_head_and_the_lag);

async fn admin_projections_reports_each_checkpoint_the_head_and_the_lag(db: &TestDatabase) {
    let app = spawn_app(db, &new_key()).await;
    app.create_github_integration("secret").await;
    // The runner catches up in the background; wait for it.
    app.projected().await;
    let body = app.get_ok("/admin/projections").await;
    assert_eq!(
        strings(&body["projections"], "name"),
        ["connections", "integrations"]
    );
    for p in body["projections"].as_array().unwrap() {
        assert_eq!(p["lag"], 0, "{body}");
        assert!(p["head_position"].as_i64().unwrap() >= 1);
        assert!(p["last_error"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebuild_command_swaps_in_a_fresh_model_while_the_service_keeps_answering() {
    let db = TestDatabase::postgres().await;
    let key = new_key();
    let app = spawn_app(&db, &key).await;
    app.create_github_integration("secret").await;
    for n in 0..20 {
        app.import_github(&format!("c{n}"), &format!("token-{n}"))
            .await;
    }
    let before = app.get_ok("/connection").await;

    let run = |args: &[&str]| {
        let mut command = crate::cli::grantline();
        command
            .args(args)
            .env("GRANTLINE_DATABASE_URL", db.url())
            .env("GRANTLINE_ENCRYPTION_KEY", &key);
        command
    };
    let mut rebuild = run(&["projections", "rebuild", "connections"])
        .spawn()
        .unwrap();
    // Reads keep succeeding while the rebuild runs.
    let mut reads = 0;
    while rebuild.try_wait().unwrap().is_none() {
        let body = app
            .get_ok("/connection/c7?provider_config_key=github")
            .await;
        assert_eq!(body["credentials"]["access_token"], "token-7");
        reads += 1;
    }
    assert!(rebuild.wait().unwrap().success());
    assert!(reads > 0);
    assert_eq!(app.get_ok("/connection").await, before);

    let status = run(&["projections", "status"]).output().unwrap();
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("connections") && text.contains("integrations"),
        "{text}"
    );

    let unknown = run(&["projections", "rebuild", "nonsense"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown projection"));
}

/// Deleting an integration on one instance drops the data keys another instance holds in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_integration_evicts_its_data_keys_on_every_instance() {
    let db = TestDatabase::postgres().await;
    let key = new_key();
    let a = spawn_app(&db, &key).await;
    let b = spawn_app(&db, &key).await;
    a.create_github_integration("secret").await;
    let data_keys = |text: String| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("grantline_cache_entries{cache=\"data_keys\"} "))
            .unwrap()
            .parse()
            .unwrap()
    };
    // B opens the client secret, keeping its data key.
    let mut revealed = Value::Null;
    for _ in 0..200 {
        let response = b.get("/config/github?include_creds=true").await;
        if response.status() == 200 {
            revealed = response.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(revealed["config"]["oauth_client_secret"], "secret");
    assert!(data_keys(b.get("/metrics").await.text().await.unwrap()) >= 1.0);

    assert_eq!(a.delete("/config/github").await.status(), 200);
    let mut evicted = false;
    for _ in 0..200 {
        if data_keys(b.get("/metrics").await.text().await.unwrap()) == 0.0 {
            evicted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        evicted,
        "instance B still holds the deleted integration's data key"
    );
}

/// Two processes on one SQLite file (an import beside `projections rebuild`, or two imports)
/// must not rebuild at once: their clears, loads and swaps would interleave and swap in a
/// table missing most rows. A rebuild holds a lock on a file beside the database; one that
/// finds it held is refused and leaves the model as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_rebuild_while_another_process_rebuilds_is_refused() {
    let db = TestDatabase::sqlite();
    let key = new_key();
    let app = spawn_app(&db, &key).await;
    app.create_github_integration("secret").await;
    for n in 0..5 {
        app.import_github(&format!("c{n}"), &format!("token-{n}"))
            .await;
    }
    let before = app.get_ok("/connection").await;
    let rebuild = || {
        crate::cli::grantline_on(&db, &key)
            .args(["projections", "rebuild", "connections"])
            .output()
            .unwrap()
    };
    let path = db.url().strip_prefix("sqlite://").unwrap().to_owned();
    let held = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(format!("{path}.rebuild-connections.lock"))
        .unwrap();
    held.try_lock().unwrap();
    let refused = rebuild();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("a rebuild of connections is already running"),
        "{stderr}"
    );
    assert_eq!(app.get_ok("/connection").await, before);
    // Once the other process lets go (as the system does when it ends), a rebuild runs.
    drop(held);
    let output = rebuild();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(app.get_ok("/connection").await, before);
}
