//! Bounded history: the compactor removes routine refresh cycles past retention once a later
//! event replaces them; the state, rebuilds, the refresh fence, crypto-shredding and the
//! history keep working across it.

use chrono::{TimeDelta, Utc};
use domain::connection::ConnectionKey;
use domain::testing::TestDatabase;
use serde_json::Value;
use workers::compactor::PassReport;

use crate::fake_provider::FakeProvider;
use crate::fake_service::{CONNECTION, FORCED, FakeService, ID, KEY};
use crate::{assert_error, ok_json};

domain::on_both_backends!(
    old_refresh_cycles_are_removed_and_everything_else_keeps_working,
    log_compact_runs_one_pass_and_refuses_a_retention_under_a_day,
);

const HISTORY: &str = "/connection/conn-1/history?provider_config_key=fake";

/// A compaction pass as if it ran `days` from now (the default retention is 90 days).
async fn compact_at(env: &FakeService, days: i64) -> PassReport {
    env.state()
        .compactor
        .pass(Utc::now() + TimeDelta::days(days), |_| {})
        .await
        .unwrap()
}

async fn history(env: &FakeService) -> Value {
    ok_json(env.app().get(HISTORY).await).await
}

fn types(history: &Value) -> Vec<&str> {
    crate::strings(&history["events"], "type")
}

/// The connection's read-model record, as the projection left it.
async fn read_model(env: &FakeService) -> Value {
    let record = projections::queries::find_connection(
        &env.state().read_models,
        &ConnectionKey::new(KEY, ID),
    )
    .await
    .unwrap()
    .expect("the connection is in the read model");
    serde_json::to_value(&record.connection).unwrap()
}

async fn old_refresh_cycles_are_removed_and_everything_else_keeps_working(db: &TestDatabase) {
    let env = FakeService::on(db).start().await;
    let app = env.app();
    env.import(ID, "access-0", "refresh-0", Some(3600)).await;
    for n in 1..=5 {
        let body = app.get_ok(FORCED).await;
        assert_eq!(
            body["credentials"]["access_token"],
            FakeProvider::refreshed_tokens(n).0
        );
    }
    let before = history(&env).await;
    assert_eq!(before["events"].as_array().unwrap().len(), 11);
    assert!(before["compacted"].is_null(), "{before}");

    // Nothing is past retention today.
    assert_eq!(compact_at(&env, 0).await.events_removed, 0);
    // In 91 days: four cycles are replaced by a later refresh; the last one stays.
    app.projected().await;
    let report = compact_at(&env, 91).await;
    assert_eq!(
        (report.routine_cycles, report.events_removed, report.streams),
        (4, 8, 1),
        "{report:?}"
    );
    let after = history(&env).await;
    assert_eq!(
        types(&after),
        [
            "connection_authorized",
            "refresh_leased",
            "tokens_refreshed"
        ]
    );
    let compacted = &after["compacted"];
    assert_eq!(compacted["routine_cycles"], 4, "{after}");
    assert_eq!(compacted["events_removed"], 8);
    assert_eq!(compacted["through_version"], 9);
    assert_eq!(after["events"][2]["refresh_token_generation"], 6);

    // The read model rebuilt from what is left is the same.
    let projected = read_model(&env).await;
    let runner = projections::Runner::new(&env.state().backend);
    runner.rebuild("connections", |_| {}).await.unwrap();
    assert_eq!(read_model(&env).await, projected);

    // The fence works on the compacted stream: a refresh leases at its head.
    let body = app.get_ok(FORCED).await;
    let (access, refresh) = FakeProvider::refreshed_tokens(6);
    assert_eq!(body["credentials"]["access_token"], access);
    assert_eq!(body["credentials"]["refresh_token"], refresh);
    // The cycle that refresh replaced goes in the next pass (once the log shows the refresh to
    // readers); the record adds up.
    app.projected().await;
    let report = compact_at(&env, 91).await;
    assert_eq!((report.routine_cycles, report.events_removed), (1, 2));
    let after = history(&env).await;
    assert_eq!(after["compacted"]["routine_cycles"], 5);
    assert_eq!(after["events"].as_array().unwrap().len(), 3);

    // Crypto-shredding: the deletion shreds the keys; the last cycle then goes too.
    assert_eq!(app.delete(CONNECTION).await.status(), 200);
    assert_error(app.get(CONNECTION).await, 404, "unknown_connection").await;
    app.projected().await;
    let report = compact_at(&env, 91).await;
    assert_eq!(report.routine_cycles, 1);
    let after = history(&env).await;
    assert_eq!(
        types(&after),
        ["connection_authorized", "connection_deleted"]
    );
    assert_eq!(after["events"][0]["secrets"], "shredded");
    assert_eq!(after["compacted"]["routine_cycles"], 6);
    let text = after.to_string();
    for n in 0..=6 {
        let (access, refresh) = FakeProvider::refreshed_tokens(n);
        assert!(
            !text.contains(&access) && !text.contains(&refresh),
            "{text}"
        );
    }
    runner.rebuild("connections", |_| {}).await.unwrap();
    assert_error(app.get(CONNECTION).await, 404, "unknown_connection").await;

    // A new generation after all this is a normal connection.
    env.import(ID, "access-new", "refresh-new", Some(3600))
        .await;
    let body = app.get_ok(CONNECTION).await;
    assert_eq!(body["credentials"]["access_token"], "access-new");
    let after = history(&env).await;
    assert_eq!(after["events"][2]["generation"], 2);
}

async fn log_compact_runs_one_pass_and_refuses_a_retention_under_a_day(db: &TestDatabase) {
    let key = crate::new_key();
    let app = crate::spawn_app(db, &key).await;
    app.create_github_integration("compact-client-SECRET").await;
    app.import_github("c1", "gho_compactACCESS").await;
    let run = |args: &[&str]| {
        crate::cli::grantline_on(db, &key)
            .args(args)
            .output()
            .unwrap()
    };
    let output = run(&["log", "compact"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("looked at 0 events past retention; removed 0 events"),
        "{stdout}"
    );
    // A retention shorter than a day is refused, naming the variable.
    let refused = run(&["log", "compact", "--history-retention", "1h"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("GRANTLINE_HISTORY_RETENTION") && !stderr.contains("panicked"),
        "{stderr}"
    );
    // Nothing compacted: the history command prints no summary line.
    let table = run(&["history", "c1", "--provider-config-key", "github"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success() && !text.contains("compacted:"),
        "{text}"
    );
}
