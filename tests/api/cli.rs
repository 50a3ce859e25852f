//! The binary: help text, configuration errors, migrations and clean shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use domain::testing::TestDatabase;

use crate::new_key;

fn grantline() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grantline"));
    // Start from a clean environment so the developer's own GRANTLINE_* settings do not leak in.
    for (name, _) in std::env::vars() {
        if name.starts_with("GRANTLINE_") {
            command.env_remove(name);
        }
    }
    command
}

#[test]
fn help_documents_every_environment_variable() {
    let mut documented = String::new();
    for args in [
        &["serve", "--help"][..],
        &["migrate", "--help"],
        &["--help"],
    ] {
        let output = grantline().args(args).output().unwrap();
        assert!(output.status.success());
        documented.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    for variable in grantline::config::variables() {
        assert!(documented.contains(variable), "{variable} is not in --help");
    }
    assert!(documented.contains("serve") && documented.contains("migrate"));
}

#[test]
fn invalid_configuration_stops_start_up_with_a_message_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("GRANTLINE_LISTEN", "not-an-address"),
        ("GRANTLINE_LISTEN", "0.0.0.0:3003"),
        ("GRANTLINE_DATABASE_URL", "mysql://localhost/x"),
        ("GRANTLINE_ENCRYPTION_KEY", "c2hvcnQ="),
        ("GRANTLINE_ENCRYPTION_KEY", "not base64!"),
        ("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", "c2hvcnQ="),
        ("GRANTLINE_DATABASE_POOL_SIZE", "0"),
        ("GRANTLINE_SERVER_URL", "ftp://example.com"),
        ("GRANTLINE_REDIRECT_ALLOWLIST", "example.com"),
        ("GRANTLINE_REFRESH_MARGIN", "soon"),
        ("GRANTLINE_REFRESH_WINDOW", "1m"),
        ("GRANTLINE_REFRESH_SCHEDULE", "every minute"),
        ("GRANTLINE_REFRESH_CONCURRENCY", "-3"),
        ("GRANTLINE_REFRESH_IDLE_AFTER", "0s"),
        ("GRANTLINE_PROVIDER_TIMEOUT", "2m"),
        ("GRANTLINE_OAUTH_SESSION_LIFETIME", "0s"),
        ("GRANTLINE_ROLES", "api,cache"),
        ("GRANTLINE_LOG_FORMAT", "xml"),
        ("GRANTLINE_PROVIDERS_FILE", "/no/such/file.yaml"),
    ];
    for (variable, value) in cases {
        let output = grantline()
            .arg("serve")
            .env("GRANTLINE_DATA_DIR", dir.path())
            .env(variable, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{variable}={value} was accepted");
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // PostgreSQL without a master key is refused (instances must share one).
    let output = grantline()
        .arg("serve")
        .env(
            "GRANTLINE_DATABASE_URL",
            "postgres://postgres@127.0.0.1/postgres",
        )
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("GRANTLINE_ENCRYPTION_KEY"));
}

#[tokio::test]
async fn concurrent_migrate_runs_on_one_database_both_succeed() {
    let db = TestDatabase::postgres().await;
    let key = new_key();
    let run = || {
        grantline()
            .arg("migrate")
            .env("GRANTLINE_DATABASE_URL", db.url())
            .env("GRANTLINE_ENCRYPTION_KEY", &key)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (run(), run());
    for child in [a, b] {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let applied: i64 = client
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied, files as i64, "each migration applied once");
}

#[test]
fn serve_shuts_down_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = grantline()
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("GRANTLINE_DATA_DIR", dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut port = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
            && entry["message"] == "grantline listening"
        {
            port = entry["port"].as_u64();
            break;
        }
    }
    let port = port.expect("the server logged its port");
    let health = std::net::TcpStream::connect(("127.0.0.1", port as u16));
    assert!(health.is_ok(), "the server accepts connections");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
