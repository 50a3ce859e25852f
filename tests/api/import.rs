//! `grantline import`: JSON lines of `POST /connections` bodies, checked whole, written in
//! batches, safe to run again; the running service serves what it wrote.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use domain::testing::TestDatabase;
use serde_json::{Value, json};

use crate::cli::grantline_on;
use crate::{TestApp, new_key, spawn_app};

domain::on_both_backends!(
    an_import_file_of_every_credential_type_is_served_and_a_second_run_keeps_it,
    a_file_with_bad_lines_is_refused_whole_with_their_numbers,
    two_imports_of_one_file_at_once_both_succeed,
    connections_imported_while_their_integration_is_deleted_do_not_come_back,
);

/// `command` with `input` on its standard input.
fn run_with_input(command: Command, input: &[u8]) -> Output {
    spawn_with_input(command, input).wait_with_output().unwrap()
}

/// `command` started with `input` on its standard input, its output captured.
fn spawn_with_input(mut command: Command, input: &[u8]) -> std::process::Child {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The lines as one JSON-lines text.
fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

async fn connection(app: &TestApp, id: &str) -> Value {
    connection_in(app, "github", id).await
}

async fn connection_in(app: &TestApp, key: &str, id: &str) -> Value {
    app.get_ok(&format!("/connection/{id}?provider_config_key={key}"))
        .await
}

async fn an_import_file_of_every_credential_type_is_served_and_a_second_run_keeps_it(
    db: &TestDatabase,
) {
    let key = new_key();
    let app = spawn_app(db, &key).await;
    app.create_github_integration("import-client-SECRET").await;
    for (key, provider) in [
        ("twitter", "twitter"),
        ("openai", "openai"),
        ("jira", "jira-basic"),
    ] {
        app.create_integration_of(key, provider).await;
    }
    let lines = [
        json!({"provider_config_key": "github", "connection_id": "flat",
               "access_token": "gho_flatACCESS", "refresh_token": "ghr_flatREFRESH",
               "expires_at": "2031-01-01T00:00:00Z", "metadata": {"plan": "pro"}}),
        json!({"provider_config_key": "github", "connection_id": "nested",
               "credentials": {"type": "OAUTH2", "access_token": "gho_nestedACCESS",
                               "expires_at": 1_924_992_000}}),
        json!({"provider_config_key": "twitter", "connection_id": "oauth1",
               "credentials": {"type": "OAUTH1", "oauth_token": "tokenONE",
                               "oauth_token_secret": "tokenSECRET"}}),
        json!({"provider_config_key": "openai", "connection_id": "key",
               "credentials": {"type": "API_KEY", "apiKey": "apiKEY"}}),
        json!({"provider_config_key": "jira", "connection_id": "basic",
               "credentials": {"type": "BASIC", "username": "ann", "password": "basicPASSWORD"}}),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connections.jsonl");
    // Blank lines are skipped.
    std::fs::write(&file, format!("{}\n\n", jsonl(&lines))).unwrap();
    let output = grantline_on(db, &key)
        .args(["import", "--batch", "2"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        stdout.contains("5 connections checked")
            && stdout.contains("5 created, 0 kept, 0 replaced"),
        "{stdout}"
    );

    let flat = connection(&app, "flat").await;
    assert_eq!(flat["credentials"]["access_token"], "gho_flatACCESS");
    assert_eq!(flat["credentials"]["refresh_token"], "ghr_flatREFRESH");
    assert_eq!(flat["metadata"], json!({"plan": "pro"}));
    let nested = connection(&app, "nested").await;
    assert_eq!(
        nested["credentials"]["expires_at"],
        "2031-01-01T00:00:00.000Z"
    );
    assert_eq!(
        connection_in(&app, "twitter", "oauth1").await["credentials"]["oauth_token_secret"],
        "tokenSECRET"
    );
    assert_eq!(
        connection_in(&app, "openai", "key").await["credentials"]["apiKey"],
        "apiKEY"
    );
    assert_eq!(
        connection_in(&app, "jira", "basic").await["credentials"]["password"],
        "basicPASSWORD"
    );
    let history = app
        .get("/connection/flat/history?provider_config_key=github")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        history.contains("grantline-import-")
            && history.contains("\"origin\":\"file\"")
            && !history.contains("gho_flatACCESS"),
        "{history}"
    );

    // Again, from standard input: nothing changes.
    let again = run_with_input(
        {
            let mut c = grantline_on(db, &key);
            c.args(["import", "-"]);
            c
        },
        jsonl(&lines).as_bytes(),
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("0 created, 5 kept, 0 replaced"),
        "{}",
        text(&again.stdout)
    );
    assert_eq!(
        connection(&app, "flat").await["credentials"]["access_token"],
        "gho_flatACCESS"
    );

    // With --replace the file's credentials become the next generation.
    let newer = json!({"provider_config_key": "github", "connection_id": "flat",
                       "access_token": "gho_newerACCESS"});
    let replaced = run_with_input(
        {
            let mut c = grantline_on(db, &key);
            c.args(["import", "--replace", "-"]);
            c
        },
        jsonl(&[newer]).as_bytes(),
    );
    assert!(replaced.status.success(), "{}", text(&replaced.stderr));
    assert!(
        text(&replaced.stdout).contains("0 created, 0 kept, 1 replaced"),
        "{}",
        text(&replaced.stdout)
    );
    let mut served = Value::Null;
    for _ in 0..100 {
        served = connection(&app, "flat").await;
        if served["credentials"]["access_token"] == "gho_newerACCESS" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(served["credentials"]["access_token"], "gho_newerACCESS");
    assert_eq!(served["metadata"], json!({"plan": "pro"}), "metadata stays");
}

async fn a_file_with_bad_lines_is_refused_whole_with_their_numbers(db: &TestDatabase) {
    let key = new_key();
    let app = spawn_app(db, &key).await;
    app.create_github_integration("import-client-SECRET").await;
    let good = |id: &str| {
        json!({"provider_config_key": "github", "connection_id": id, "access_token": "gho_GOOD"})
            .to_string()
    };
    let deep = (0..40).fold(json!(1), |inner, _| json!({ "a": inner }));
    let mut file = [
        good("one"),
        "{not json".to_owned(),
        json!({"provider_config_key": "gitlab", "connection_id": "x", "access_token": "t"})
            .to_string(),
        good("one"),
        json!({"provider_config_key": "github", "connection_id": "no-token"}).to_string(),
        json!({"provider_config_key": "github", "connection_id": "deep", "access_token": "t",
               "raw": deep})
        .to_string(),
        json!({"provider_config_key": "github", "connection_id": "far", "access_token": "t",
               "expires_at": "10000-01-01T00:00:00Z"})
        .to_string(),
        "[1, 2]".to_owned(),
        "x".repeat(1024 * 1024 + 1),
        good("two"),
        // A key that could never go into a header.
        json!({"provider_config_key": "github", "connection_id": "ctl",
               "credentials": {"type": "API_KEY", "apiKey": "k\nX-Evil: 1"}})
        .to_string(),
        // A key no request of the OAuth 2 template would carry.
        json!({"provider_config_key": "github", "connection_id": "unfit",
               "credentials": {"type": "API_KEY", "apiKey": "k"}})
        .to_string(),
    ]
    .join("\n");
    file.push('\n');
    let output = run_with_input(
        {
            let mut c = grantline_on(db, &key);
            c.args(["import", "-"]);
            c
        },
        file.as_bytes(),
    );
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{}", text(&output.stdout));
    for expected in [
        "line 2: not valid JSON",
        "line 3: unknown provider config key \"gitlab\" (unknown_provider_config)",
        "line 4: connection \"one\" of \"github\" is already on line 1 (duplicate_connection)",
        "line 5: missing access_token (missing_access_token)",
        "line 6: raw is out of bounds",
        "line 7: ",
        "line 8: ",
        "line 9: longer than 1048576 bytes",
        "line 11: invalid body: apiKey contains control characters (invalid_body)",
        "line 12: provider \"github\" does not take API_KEY credentials (invalid_body)",
        "10 lines cannot be imported; nothing was written",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    assert!(
        !stderr.contains("line 1:") && !stderr.contains("line 10:") && !stderr.contains("X-Evil"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("gho_GOOD"),
        "{stderr}"
    );
    // Nothing was written, not even the good lines.
    let listed = app.get_ok("/connection").await;
    assert_eq!(listed["connections"], json!([]), "{listed}");
    for id in ["one", "two"] {
        let response = app
            .get(&format!("/connection/{id}?provider_config_key=github"))
            .await;
        assert_eq!(response.status(), 404);
    }
    // A dry run of the good lines writes nothing either.
    let dry = run_with_input(
        {
            let mut c = grantline_on(db, &key);
            c.args(["import", "--dry-run", "-"]);
            c
        },
        format!("{}\n{}\n", good("one"), good("two")).as_bytes(),
    );
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("2 connections checked"),
        "{}",
        text(&dry.stdout)
    );
    assert_eq!(app.get_ok("/connection").await["connections"], json!([]));
}

/// Two runs of one file at once (an operator's retry while the first still runs): the batches
/// of one are refused as wholes where the other got there first and fall back to keeping those
/// connections. Both finish with status 0 (on SQLite the second no longer fails "database is
/// locked" while catching the read models up), and every connection is served once.
async fn two_imports_of_one_file_at_once_both_succeed(db: &TestDatabase) {
    let key = new_key();
    let app = spawn_app(db, &key).await;
    app.create_github_integration("import-client-SECRET").await;
    let lines: Vec<Value> = (0..3000)
        .map(|n| {
            json!({"provider_config_key": "github", "connection_id": format!("twice-{n}"),
                   "access_token": format!("gho_TWICE_{n}")})
        })
        .collect();
    let file = jsonl(&lines);
    let start = || {
        let mut command = grantline_on(db, &key);
        command.args(["import", "-"]);
        spawn_with_input(command, file.as_bytes())
    };
    let (first, second) = (start(), start());
    let mut created = 0;
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        let stdout = text(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            text(&output.stderr)
        );
        let summary = stdout
            .lines()
            .find(|l| l.starts_with("imported 3000 connections"))
            .unwrap_or_else(|| panic!("{stdout}"));
        let count = summary
            .split(": ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{summary}"));
        created += count;
    }
    assert_eq!(created, 3000, "each connection created by one of the runs");
    app.projected().await;
    for n in [0, 1499, 2999] {
        let body = connection(&app, &format!("twice-{n}")).await;
        assert_eq!(
            body["credentials"]["access_token"],
            format!("gho_TWICE_{n}")
        );
    }
}

/// An integration deleted while `grantline import` writes its connections: whether the
/// deletion lands before, between or after the import's batches, none of the imported
/// connections is left to come back when an integration of that key is created again.
async fn connections_imported_while_their_integration_is_deleted_do_not_come_back(
    db: &TestDatabase,
) {
    let key = new_key();
    let app = spawn_app(db, &key).await;
    app.create_github_integration("import-client-SECRET").await;
    let lines: Vec<Value> = (0..1000)
        .map(|n| {
            json!({"provider_config_key": "github", "connection_id": format!("orphan-{n}"),
                   "access_token": format!("gho_ORPHAN_{n}")})
        })
        .collect();
    let file = jsonl(&lines);
    let head = |status: Value| status["projections"][0]["head_position"].as_i64().unwrap();
    let before = head(app.get_ok("/admin/projections").await);
    let mut command = grantline_on(db, &key);
    command.args(["import", "-", "--batch", "50"]);
    let mut child = spawn_with_input(command, file.as_bytes());
    // Delete once the first batches are in the log (or the import has ended).
    while head(app.get_ok("/admin/projections").await) == before
        && child.try_wait().unwrap().is_none()
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(app.delete("/config/github").await.status().is_success());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    if !output.status.success() {
        assert!(
            stderr.contains("were deleted while the import ran"),
            "{}\n{stderr}",
            text(&output.stdout)
        );
    }

    app.create_github_integration("another-SECRET").await;
    app.projected().await;
    let listed = app.get_ok("/connections?integrationId=github").await;
    let left = listed["connections"].as_array().unwrap().len();
    assert_eq!(left, 0, "{stderr}");
    for n in [0, 499, 999] {
        let answer = app
            .get(&format!(
                "/connection/orphan-{n}?provider_config_key=github"
            ))
            .await;
        assert_eq!(answer.status(), 404);
    }
}
