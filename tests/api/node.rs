//! What the tests that run Node.js scripts against the `grantline` binary share: finding Node.js,
//! installing the locked packages of `tests/node`, a child process that is killed when dropped,
//! a free port and waiting for the server to answer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest Node.js with what the script uses (`fetch`, `Headers.getSetCookie`).
pub const NODE_MAJOR: u32 = 18;

/// A child process, killed and reaped when dropped, so that a failing test leaves nothing
/// running. Its output goes to a file (a pipe nobody reads could fill and block it).
pub struct Running {
    pub child: Child,
    output: PathBuf,
}

impl Running {
    pub fn spawn(mut command: Command, output: PathBuf) -> Self {
        let file = File::create(&output).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Self { child, output }
    }

    /// What it has printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

/// Fails, naming what to install, unless a recent enough `node` is on `PATH`.
pub fn require_node() {
    let advice = format!(
        "the @nangohq/node client test needs Node.js {NODE_MAJOR} or newer and npm on PATH (for \
         example `apt-get install -y nodejs npm`)"
    );
    let output = Command::new("node")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("`node --version`: {e}: {advice}"));
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let major = version
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    assert!(
        output.status.success() && major.is_some_and(|m| m >= NODE_MAJOR),
        "found node {version:?}: {advice}"
    );
}

/// The packages of `tests/node/package.json`; `npm ci` runs when one of them is missing.
const PACKAGES: [&str; 3] = ["@nangohq/node", "@nangohq/frontend", "playwright-core"];

/// Installs the locked packages into `tests/node/node_modules` unless they are there already, so
/// the tests run on a fresh clone. Tests run in parallel: a lock file keeps two `npm ci` apart.
pub fn install_client(dir: &Path) {
    let installed = |dir: &Path| {
        PACKAGES.iter().all(|p| {
            dir.join("node_modules")
                .join(p)
                .join("package.json")
                .is_file()
        })
    };
    if installed(dir) {
        return;
    }
    let lock = File::create(std::env::temp_dir().join("grantline-tests-npm.lock")).unwrap();
    lock.lock().unwrap();
    if installed(dir) {
        return;
    }
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("`npm ci` in {}: {e}: install npm", dir.display()));
    assert!(
        output.status.success(),
        "`npm ci` in {} failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// Debian's Chromium, which the browser tests drive headless through `playwright-core`. Fails,
/// naming what to install, when it is missing.
pub fn require_chromium() -> PathBuf {
    let path = std::env::var_os("GRANTLINE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "the browser tests need Chromium at {} (`apt-get install -y chromium`, or set \
         GRANTLINE_CHROMIUM)",
        path.display()
    );
    path
}

/// A port nothing listens on. The server must know its port before it starts: its OAuth callback
/// URL (`http://LISTEN/oauth/callback`) is what the provider sends the browser back to.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `command` (a `grantline` binary) set to serve on a free loopback port with `secret`, the
/// providers file `providers` and the database at `database_url`, in the API and projections
/// roles only (no scheduler refreshes tokens under a test), with a new encryption key; the
/// command and the server's base URL.
pub fn serve_on_loopback(
    mut command: Command,
    secret: &str,
    providers: &Path,
    database_url: &str,
) -> (Command, String) {
    let port = free_port();
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--secret-key", secret])
        .arg("--providers-file")
        .arg(providers)
        .args(["--roles", "api,projections"])
        .env("GRANTLINE_DATABASE_URL", database_url)
        .env("GRANTLINE_ENCRYPTION_KEY", crate::new_key());
    (command, format!("http://127.0.0.1:{port}"))
}

/// Waits until the server at `base` answers `/health`; fails with its output if it exits first.
pub async fn wait_healthy(server: &mut Running, base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!(
                "grantline exited ({status}) before answering /health:\n{}",
                server.output()
            );
        }
        if let Ok(response) = client.get(format!("{base}/health")).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "grantline did not answer /health in 30 s:\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `command` (a Node.js script) to its end, failing with its output and the server's when it
/// exits unsuccessfully, does not print `all steps passed`, or runs past `timeout`. Returns what
/// it printed.
pub async fn run_script(
    command: Command,
    output: PathBuf,
    timeout: Duration,
    server: &Running,
) -> String {
    run_script_beside(command, output, timeout, || server.output()).await
}

/// [`run_script`] beside a server whose output `server` tells (an in-process server: none).
pub async fn run_script_beside(
    command: Command,
    output: PathBuf,
    timeout: Duration,
    server: impl Fn() -> String,
) -> String {
    let mut script = Running::spawn(command, output);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = script.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            script_failed(
                &format!("the script did not finish in {timeout:?}"),
                &script.output(),
                &server(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let printed = script.output();
    if !status.success() || !printed.contains("all steps passed") {
        script_failed(
            &format!("the script failed ({status})"),
            &printed,
            &server(),
        );
    }
    printed
}

/// Fails the test with the server's output first and the script's last, and without a
/// backtrace: CI keeps only the head and the tail of a long run's output, and the script's
/// lines (which step failed, and why) must be in that tail.
fn script_failed(what: &str, script: &str, server: &str) -> ! {
    if !server.is_empty() {
        println!("--- grantline:\n{server}");
    }
    println!("--- {what}:\n{script}");
    // Unlike `panic!`, this skips the panic hook, which would print a backtrace after the lines.
    std::panic::resume_unwind(Box::new(what.to_owned()))
}
