//! What the HTTP benchmarks share: starting and stopping a real `grantline serve` (this build's
//! binary, or a baseline binary named by `BENCH_BASELINE_BIN` to measure side by side), its JSON
//! log, its peak memory, and waiting for its projections.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use serde_json::Value;

/// This build's `grantline` binary.
pub fn grantline() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_grantline"))
}

/// The binary to compare with, from `BENCH_BASELINE_BIN` (e.g. a release build of an earlier
/// commit), when set.
pub fn baseline() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("BENCH_BASELINE_BIN")?);
    assert!(
        path.is_file(),
        "BENCH_BASELINE_BIN={} is not a file",
        path.display()
    );
    Some(path)
}

/// `name` from the environment, parsed, or `default`.
pub fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A running `grantline serve`, stopped (SIGTERM) by [`Server::stop`] or when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Every JSON line it logged after start-up.
    pub log: Receiver<Value>,
}

impl Server {
    /// Starts `binary serve` on a free port with the database `url`, master key `key`, the
    /// extra flags `args` and `RUST_LOG=rust_log`; returns once it listens.
    pub fn start(binary: &Path, url: &str, key: &str, args: &[&str], rust_log: &str) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("GRANTLINE_DATABASE_URL", url)
            .env("GRANTLINE_ENCRYPTION_KEY", key)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("the server starts")
                .expect("a log line");
            if let Ok(entry) = serde_json::from_str::<Value>(&line)
                && entry["message"] == "grantline listening"
            {
                break entry["port"].as_u64().expect("the port is logged");
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        let (send, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                    let _ = send.send(entry);
                }
            }
        });
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's peak resident memory so far, in MB.
    pub fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    /// The next logged line whose message is `message`, within `timeout`.
    pub fn logged(&self, message: &str, timeout: Duration) -> Option<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let entry = self.log.recv_timeout(left).ok()?;
            if entry["message"] == message {
                return Some(entry);
            }
        }
    }

    /// Stops it and waits for it to exit.
    pub fn stop(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The CPU time (user and system) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start with the state, field 3;
    // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Waits until every projection of the server at `base` has caught up with the event log.
pub async fn caught_up(client: &reqwest::Client, base: &str, bearer: Option<&str>) {
    for _ in 0..30_000 {
        let mut request = client.get(format!("{base}/admin/projections"));
        if let Some(secret) = bearer {
            request = request.bearer_auth(secret);
        }
        let status: Value = request
            .send()
            .await
            .expect("the server answers")
            .json()
            .await
            .expect("a JSON answer");
        let projections = status["projections"]
            .as_array()
            .expect("a list of projections");
        if projections.iter().all(|p| p["lag"] == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the projections did not catch up");
}
