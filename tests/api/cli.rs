//! The binary: help text, configuration errors, migrations and clean shutdown.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use domain::testing::TestDatabase;

use crate::new_key;

/// The `grantline` binary, without the developer's own `GRANTLINE_*` settings.
pub(crate) fn grantline() -> Command {
    grantline_at(Path::new(env!("CARGO_BIN_EXE_grantline")))
}

/// The binary at `path`, started as [`grantline`] starts this build's.
pub(crate) fn grantline_at(path: &Path) -> Command {
    let mut command = Command::new(path);
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

/// A database that takes the connection and never answers holds start-up (and `migrate`) for
/// as long as it stays so; SIGTERM still ends them.
#[test]
fn start_up_on_a_silent_database_ends_on_sigterm() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().collect();
        drop(held);
    });
    let dir = tempfile::tempdir().unwrap();
    for command in ["serve", "migrate"] {
        let mut child = grantline()
            .arg(command)
            .env("GRANTLINE_DATA_DIR", dir.path())
            .env(
                "GRANTLINE_DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:{port}/silent?sslmode=disable"),
            )
            .env("GRANTLINE_ENCRYPTION_KEY", new_key())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{command} ended by itself"
        );
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            status.is_some(),
            "{command} ignored SIGTERM during start-up"
        );
    }
}

/// A one-off command does not wait for a database that refuses connections (the service does:
/// `db_outage`), and says why it stopped.
#[test]
fn a_command_fails_at_once_when_the_database_refuses_connections() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = grantline()
        .args(["projections", "status", "--encryption-key", &new_key()])
        .env(
            "GRANTLINE_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/refused?sslmode=disable"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command waited for the database");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot connect to PostgreSQL"), "{stderr}");
}

/// A URL the driver refuses says why, not only that it is invalid.
#[test]
fn an_unusable_database_url_names_the_cause() {
    let key = new_key();
    let output = grantline()
        .args(["migrate", "--encryption-key", &key])
        .env(
            "GRANTLINE_DATABASE_URL",
            "postgres://postgres:pw-SECRET@127.0.0.1/postgres?bogus=1",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("unknown option `bogus`"), "{stderr}");
    assert!(!stderr.contains("pw-SECRET"), "{stderr}");
}

#[test]
fn invalid_configuration_stops_start_up_with_a_message_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("GRANTLINE_LISTEN", "not-an-address"),
        ("GRANTLINE_LISTEN", "0.0.0.0:3003"),
        ("GRANTLINE_DATABASE_URL", "mysql://localhost/x"),
        ("GRANTLINE_DATABASE_URL", "sqlite://"),
        ("GRANTLINE_DATABASE_URL", "sqlite://:memory:"),
        ("GRANTLINE_DATABASE_URL", "sqlite://x.db?mode=ro"),
        ("GRANTLINE_DATABASE_URL", "sqlite:///tmp/"),
        ("GRANTLINE_ENCRYPTION_KEY", "c2hvcnQ="),
        ("GRANTLINE_ENCRYPTION_KEY", "not base64!"),
        ("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", "c2hvcnQ="),
        ("GRANTLINE_DATABASE_POOL_SIZE", "0"),
        ("GRANTLINE_SERVER_URL", "ftp://example.com"),
        ("GRANTLINE_REDIRECT_ALLOWLIST", "example.com"),
        // A multi-byte character where an `https://` prefix would end.
        ("GRANTLINE_REDIRECT_ALLOWLIST", "http://é.example.com/x"),
        (
            "GRANTLINE_REDIRECT_ALLOWLIST",
            "https://app.example.com/callback",
        ),
        ("GRANTLINE_BROWSER_ORIGINS", "app.example.com"),
        ("GRANTLINE_BROWSER_ORIGINS", "https://app.example.com, *"),
        ("GRANTLINE_REFRESH_MARGIN", "soon"),
        ("GRANTLINE_REFRESH_WINDOW", "1m"),
        ("GRANTLINE_REFRESH_SCHEDULE", "every minute"),
        ("GRANTLINE_REFRESH_SCHEDULE", "0 0 0 30 2 *"),
        ("GRANTLINE_REFRESH_ACTIVE_FOR", "10000y"),
        ("GRANTLINE_REFRESH_IDLE_AFTER", "10000y"),
        ("GRANTLINE_REFRESH_LEASE", "100000000y"),
        ("GRANTLINE_REFRESH_CONCURRENCY", "-3"),
        ("GRANTLINE_REFRESH_IDLE_AFTER", "0s"),
        ("GRANTLINE_PROVIDER_TIMEOUT", "2m"),
        ("GRANTLINE_OAUTH_SESSION_LIFETIME", "0s"),
        ("GRANTLINE_ROLES", "api,cache"),
        ("GRANTLINE_HISTORY_RETENTION", "1h"),
        ("GRANTLINE_HISTORY_RETENTION", "soon"),
        ("GRANTLINE_HISTORY_LIFECYCLE_RETENTION", "30d"),
        ("GRANTLINE_LOG_FORMAT", "xml"),
        ("GRANTLINE_PROVIDERS_FILE", "/no/such/file.yaml"),
        ("GRANTLINE_WEBHOOK_URLS", "ftp://hooks.example.com/in"),
        ("GRANTLINE_WEBHOOK_URLS", "http://a/, no url"),
        ("GRANTLINE_WEBHOOK_TIMEOUT", "0s"),
        ("GRANTLINE_WEBHOOK_BACKOFF", "10m"),
        ("GRANTLINE_WEBHOOK_BACKOFF", "soon"),
        ("GRANTLINE_SECRET_KEY", "short-secret"),
        ("GRANTLINE_HEADER_TIMEOUT", "0s"),
        ("GRANTLINE_REQUEST_TIMEOUT", "10s"),
        ("GRANTLINE_IDLE_TIMEOUT", "forever"),
        ("GRANTLINE_MAX_CONNECTIONS", "0"),
        ("GRANTLINE_MAX_WEBSOCKETS", "-1"),
        ("GRANTLINE_MAX_WEBSOCKETS_PER_CLIENT", "many"),
        ("GRANTLINE_WEBSOCKET_IDLE_TIMEOUT", "0s"),
        ("GRANTLINE_WEBSOCKET_IDLE_TIMEOUT", "1ns"),
        ("GRANTLINE_MAX_CONNECTIONS", "18446744073709551615"),
        ("GRANTLINE_CONNECTION_CACHE", "0"),
        ("GRANTLINE_CONNECTION_CACHE", "lots"),
        ("GRANTLINE_CONNECTION_CACHE", "12KiB"),
        ("GRANTLINE_DATA_KEY_CACHE", "-5MiB"),
        ("GRANTLINE_DATA_KEY_CACHE", "16 parsecs"),
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
    // A data directory that is a file, or below one, is named as such.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    for data_dir in [file.clone(), file.join("sub")] {
        let output = grantline()
            .arg("serve")
            .env("GRANTLINE_DATA_DIR", &data_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains("GRANTLINE_DATA_DIR") && stderr.contains("is not a directory"),
            "{stderr}"
        );
    }
    // An empty previous key, as a template leaves it outside a rotation, is no previous key.
    let output = grantline()
        .args(["projections", "status"])
        .env("GRANTLINE_DATA_DIR", dir.path())
        .env("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", "")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
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
    // Webhook URLs need a signing secret; a bad URL is named by position, never echoed (it may
    // carry credentials).
    let output = grantline()
        .arg("serve")
        .env("GRANTLINE_DATA_DIR", dir.path())
        .env("GRANTLINE_WEBHOOK_URLS", "https://hooks.example.com/in")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("GRANTLINE_WEBHOOK_SECRET"));
    let output = grantline()
        .arg("serve")
        .env("GRANTLINE_DATA_DIR", dir.path())
        .env("GRANTLINE_WEBHOOK_SECRET", "whsec")
        .env(
            "GRANTLINE_WEBHOOK_URLS",
            "https://hooks.example.com/in,gopher://user:hunter2@example.com/",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("GRANTLINE_WEBHOOK_URLS") && stderr.contains("entry 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn concurrent_migrate_runs_on_one_database_both_succeed() {
    let db = TestDatabase::postgres().await;
    let key = new_key();
    let run = || {
        grantline_on(&db, &key)
            .arg("migrate")
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
    let client = db.postgres_client().await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied, files as i64, "each migration applied once");
    // The GIN indexes take rows straight in (V12): a pending list left the trigram index ten
    // times the size of a bulk-built one for connections added one at a time.
    let pending: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'gin' \
             AND i.indrelid IN ('connections'::regclass, 'connections_shadow'::regclass) \
             AND NOT coalesce(c.reloptions @> '{fastupdate=off}', false)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pending, Vec::<String>::new());
}

/// The embedded default's key file is created once, for a new database: next to a database
/// that holds sealed data, a missing key file is reported, not replaced by a new key that
/// opens nothing.
#[test]
fn a_missing_key_file_next_to_a_sealed_database_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let status = || {
        grantline()
            .args(["projections", "status"])
            .env("GRANTLINE_DATA_DIR", dir.path())
            .output()
            .unwrap()
    };
    let first = status();
    assert!(first.status.success(), "{first:?}");
    let file = dir.path().join("master.key");
    let key = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();

    let refused = status();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("is missing") && stderr.contains("no new key was written"),
        "{stderr}"
    );
    assert!(!file.exists(), "no new key file");

    std::fs::write(&file, key).unwrap();
    let restored = status();
    assert!(restored.status.success(), "{restored:?}");
}

/// A child process, killed when dropped (a failed test leaves nothing running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `grantline serve` on the SQLite database in `dir`, and its log lines (JSON) as they come.
fn serve_in(dir: &Path) -> (Killed, std::sync::mpsc::Receiver<serde_json::Value>) {
    serve_on(dir, &[])
}

/// [`serve_in`], with these environment variables too.
fn serve_on(
    dir: &Path,
    variables: &[(&str, &str)],
) -> (Killed, std::sync::mpsc::Receiver<serde_json::Value>) {
    let mut command = grantline();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("GRANTLINE_DATA_DIR", dir)
        .envs(variables.iter().copied());
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str(&line) {
                let _ = lines.send(entry);
            }
        }
    });
    (Killed(child), log)
}

/// The first line of `log` whose message contains `text`, within 30 s.
fn logged(log: &std::sync::mpsc::Receiver<serde_json::Value>, text: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let entry = log
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no log line with {text:?}: {e}"));
        if entry["message"].as_str().is_some_and(|m| m.contains(text)) {
            return entry;
        }
    }
}

/// Sends SIGTERM to `child` and waits (20 s at most) for it to exit 0.
fn stop(Killed(child): &mut Killed) {
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

#[test]
fn serve_shuts_down_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // A first start: the data directory does not exist yet.
    let (mut child, log) = serve_in(&dir.path().join("first").join("start"));
    let port = logged(&log, "grantline listening")["port"].as_u64();
    let port = port.expect("the server logged its port");
    let health = std::net::TcpStream::connect(("127.0.0.1", port as u16));
    assert!(health.is_ok(), "the server accepts connections");
    stop(&mut child);
}

/// Every PostgreSQL session `serve` opened (the pool's and the notifier's) ends with a
/// Terminate message when it stops, so the database logs no "connection reset" for it at each
/// deploy, and so does a one-off command's; the sessions pass a relay (TLS off) that keeps what
/// the service sent last on each.
#[tokio::test]
async fn serve_ends_its_database_sessions_properly_when_it_stops() {
    let db = TestDatabase::postgres().await;
    let mut url = url::Url::parse(db.url()).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    url.set_port(Some(relay.local_addr().unwrap().port()))
        .unwrap();
    url.query_pairs_mut().append_pair("sslmode", "disable");
    let endings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = endings.clone();
    std::thread::spawn(move || {
        for inbound in relay.incoming().map_while(Result::ok) {
            let outbound = std::net::TcpStream::connect(&target).unwrap();
            let (mut from_db, mut to_service) =
                (outbound.try_clone().unwrap(), inbound.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut from_db, &mut to_service));
            let (mut from_service, mut to_db) = (inbound, outbound);
            let recorded = recorded.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut last = Vec::new();
                let mut buffer = [0u8; 8192];
                while let Ok(n @ 1..) = from_service.read(&mut buffer) {
                    last.extend_from_slice(&buffer[..n]);
                    last.drain(..last.len().saturating_sub(5));
                    if to_db.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_db.shutdown(std::net::Shutdown::Both);
                recorded.lock().unwrap().push(last);
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let key = new_key();
    let variables = [
        ("GRANTLINE_DATABASE_URL", url.as_str()),
        ("GRANTLINE_ENCRYPTION_KEY", &key),
    ];
    let (mut child, log) = serve_on(dir.path(), &variables);
    let port = logged(&log, "grantline listening")["port"]
        .as_u64()
        .unwrap();
    // A few requests at once, for a few pooled sessions.
    let reads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
                let request =
                    "GET /connections HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                answer
            })
        })
        .collect();
    for read in reads {
        let answer = read.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    stop(&mut child);
    // A one-off command's sessions too.
    let status = grantline()
        .args(["projections", "status"])
        .envs(variables)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(300));
    let endings = endings.lock().unwrap();
    assert!(
        endings.len() >= 4,
        "the pool's sessions and the notifier's: {endings:?}"
    );
    for last in endings.iter() {
        // 'X' and the length 4: PostgreSQL's Terminate message.
        assert_eq!(last.as_slice(), b"X\0\0\0\x04", "{endings:?}");
    }
}

/// Starting with the keys of a rotation swapped makes the retired key active again (a rollback
/// is allowed), and says so.
#[test]
fn swapped_rotation_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let (old, new) = (new_key(), new_key());
    let status = |key: &str, previous: Option<&str>| {
        let mut command = grantline();
        command
            .args(["projections", "status"])
            .env("GRANTLINE_DATABASE_URL", &url)
            .env("GRANTLINE_ENCRYPTION_KEY", key);
        if let Some(previous) = previous {
            command.env("GRANTLINE_ENCRYPTION_KEY_PREVIOUS", previous);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    status(&old, None);
    let rotated = status(&new, Some(&old));
    assert!(!rotated.contains("retired"), "{rotated}");
    let swapped = status(&old, Some(&new));
    assert!(
        swapped.contains("retired by an earlier rotation") && swapped.contains("swapped"),
        "{swapped}"
    );
}

/// SQLite serves one instance: a second `serve` on the same file waits for the first to stop
/// (a restart that overlaps the old process) instead of serving beside it.
#[test]
fn a_second_serve_on_one_sqlite_file_waits_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, first_log) = serve_in(dir.path());
    logged(&first_log, "grantline listening");
    // The second one reaches the file through a symlink.
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(dir.path().join("grantline.db"), &link).unwrap();
    let (mut second, second_log) = serve_on(
        dir.path(),
        &[(
            "GRANTLINE_DATABASE_URL",
            &format!("sqlite://{}", link.display()),
        )],
    );
    let waiting = logged(
        &second_log,
        "another grantline serve uses this SQLite database",
    );
    assert_eq!(waiting["level"], "WARN", "{waiting}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        second_log
            .try_iter()
            .all(|entry| entry["message"] != "grantline listening"),
        "the second one does not serve beside the first"
    );
    stop(&mut first);
    logged(&second_log, "grantline listening");
    stop(&mut second);
}

/// `grantline` on this database with this master key.
pub(crate) fn grantline_on(db: &TestDatabase, key: &str) -> Command {
    let mut command = grantline();
    command
        .env("GRANTLINE_DATABASE_URL", db.url())
        .env("GRANTLINE_ENCRYPTION_KEY", key);
    command
}

/// The client secret of [`CliService`]'s integration.
const CLIENT_SECRET: &str = "cli-client-SECRET-42";

/// A PostgreSQL service with the integration `github` and one connection whose tokens and
/// metadata are marked secrets, for the commands that read the log.
struct CliService {
    // Declared first so that it is dropped before the database.
    app: crate::TestApp,
    key: String,
    db: TestDatabase,
}

impl CliService {
    /// The service with the connection `id` imported with the access token
    /// `{prefix}-access-TOKEN`, the refresh token `{prefix}-refresh-TOKEN` and the metadata
    /// `{"plan": "{prefix}-metadata-VALUE"}`.
    async fn with_connection(id: &str, prefix: &str) -> Self {
        let db = TestDatabase::postgres().await;
        let key = new_key();
        let app = crate::spawn_app(&db, &key).await;
        app.create_github_integration(CLIENT_SECRET).await;
        let import = serde_json::json!({"provider_config_key": "github", "connection_id": id,
            "access_token": format!("{prefix}-access-TOKEN"),
            "refresh_token": format!("{prefix}-refresh-TOKEN"),
            "metadata": { "plan": format!("{prefix}-metadata-VALUE") }});
        assert_eq!(app.post_json("/connection", &import).await.status(), 201);
        Self { app, key, db }
    }

    /// `grantline` on the service's database.
    fn grantline(&self) -> Command {
        grantline_on(&self.db, &self.key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_prints_a_connections_entries_as_json_or_a_table() {
    let service = CliService::with_connection("c-cli", "cli").await;
    let run = |args: &[&str]| {
        service
            .grantline()
            .arg("history")
            .args(args)
            .output()
            .unwrap()
    };
    let output = run(&["c-cli", "--provider-config-key", "github", "--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        crate::strings(&entries, "type"),
        ["connection_authorized", "metadata_set"]
    );
    assert_eq!(entries[0]["secrets"], "sealed");
    assert_eq!(entries[1]["metadata"]["keys"], serde_json::json!(["plan"]));

    let table = run(&["c-cli", "--provider-config-key", "github"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("connection_authorized") && text.contains("secrets sealed"),
        "{text}"
    );
    for leaked in [&stdout, &text] {
        for secret in [
            "cli-access-TOKEN",
            "cli-refresh-TOKEN",
            "cli-metadata-VALUE",
            CLIENT_SECRET,
        ] {
            assert!(!leaked.contains(secret), "{secret} leaked: {leaked}");
        }
    }

    let unknown = run(&["nobody", "--provider-config-key", "github"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("no connection \"nobody\"") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_follows_the_log_redacted() {
    let service = CliService::with_connection("c-tail", "tail").await;
    let mut child = service
        .grantline()
        .args(["events", "tail", "--from-start", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut raw = String::new();
    let mut deleted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let found = |seen: &[serde_json::Value], kind: &str| {
            seen.iter().any(|e| {
                e["type"] == kind
                    && (e["connection_id"] == "c-tail" || kind.starts_with("integration"))
            })
        };
        if !deleted && found(&seen, "metadata_set") {
            // The history so far is out: a new event must follow live.
            crate::ok_json(
                service
                    .app
                    .delete("/connection/c-tail?provider_config_key=github")
                    .await,
            )
            .await;
            deleted = true;
        }
        if found(&seen, "connection_deleted") {
            break;
        }
        let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the tail stopped or stalled ({other:?}); so far: {raw}");
            }
        };
        raw.push_str(&line);
        raw.push('\n');
        seen.push(serde_json::from_str(&line).unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();

    let created = seen
        .iter()
        .find(|e| e["type"] == "integration_created")
        .unwrap();
    assert_eq!(created["provider_config_key"], "github");
    let authorized = seen
        .iter()
        .find(|e| e["type"] == "connection_authorized")
        .unwrap();
    assert_eq!(authorized["provider_config_key"], "github");
    assert_eq!(authorized["generation"], 1);
    assert!(authorized["fingerprints"]["access_token"].is_string());
    assert!(authorized["global_position"].is_i64());
    let deletion = seen
        .iter()
        .find(|e| e["type"] == "connection_deleted")
        .unwrap();
    assert_eq!(deletion["shredded_data_keys"], 1);
    assert_eq!(deletion["generation"], 1);
    for secret in [
        "tail-access-TOKEN",
        "tail-refresh-TOKEN",
        "tail-metadata-VALUE",
        CLIENT_SECRET,
        "ciphertext",
    ] {
        assert!(!raw.contains(secret), "{secret} leaked: {raw}");
    }
}
