//! The proxy to a provider API over TLS, as every real provider is: the `grantline` binary calls
//! the fake provider's API through a TLS front whose certificate is signed by a root the test
//! makes (given to the binary as `SSL_CERT_FILE`), directly and through an egress proxy
//! (`HTTPS_PROXY`, the two clients the proxy has for a template's own host). A root that did
//! not sign it is refused with `upstream_unreachable`, and the credential never leaves.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use domain::testing::TestDatabase;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::TestApp;
use crate::cli::grantline;
use crate::fake_provider::FakeProvider;
use crate::node::{Running, serve_on_loopback, wait_healthy};

const SECRET: &str = "proxy-tls-test-secret-0123456789abcdef";

/// Runs `openssl` in `dir` with the words of `command` (none has a space in it).
fn openssl(dir: &Path, command: &str) {
    let status = Command::new("openssl")
        .args(command.split_whitespace())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {command}");
}

/// A new P-256 key, and the options that make it.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A root `name` (`name.pem`, `name.key`) in `dir`.
fn root(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 {NEW_KEY} -days 1 -subj /CN=test-root-{name} -keyout {name}.key -out \
             {name}.pem"
        ),
    );
}

/// A certificate for 127.0.0.1 (`server.pem`, `server.key`) signed by the root `ca`.
fn server_certificate(dir: &Path, ca: &str) {
    openssl(
        dir,
        &format!("req {NEW_KEY} -subj /CN=127.0.0.1 -keyout server.key -out server.csr"),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in server.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 1 \
             -extfile server.ext -out server.pem"
        ),
    );
}

/// A TLS front on loopback for the plain HTTP server at `backend` (`host:port`), with the
/// certificate in `dir`; its port. Each connection is decrypted and copied both ways.
async fn tls_front(dir: &Path, backend: String) -> u16 {
    let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to copy.
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut plain = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// An egress proxy on loopback that tunnels `CONNECT host:port` requests; its URL and the
/// number of tunnels it opened.
async fn egress_proxy() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tunnels = Arc::new(AtomicUsize::new(0));
    let counted = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(socket);
                let mut line = String::new();
                client.read_line(&mut line).await.unwrap();
                let target = match line.split_whitespace().collect::<Vec<_>>()[..] {
                    ["CONNECT", target, _] => target.to_owned(),
                    _ => return,
                };
                // The rest of the request's head.
                while line != "\r\n" {
                    line.clear();
                    if client.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                }
                let mut upstream = TcpStream::connect(target).await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let mut client = client.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (url, tunnels)
}

/// `grantline serve` on `db` with the template `fake-tls` at `https://127.0.0.1:{tls_port}`,
/// trusting the roots in `roots`, through the egress proxy `egress` if given; the server and a
/// client of it.
async fn serve(
    db: &TestDatabase,
    fake: &FakeProvider,
    tls_port: u16,
    roots: &Path,
    egress: Option<&str>,
) -> (tempfile::TempDir, Running, TestApp) {
    let (dir, providers) = fake.providers_file(&format!(
        "fake-tls:\n  auth_mode: API_KEY\n  proxy:\n    base_url: https://127.0.0.1:{tls_port}\n    \
         headers:\n      authorization: Bearer ${{apiKey}}\n"
    ));
    let (mut command, base) = serve_on_loopback(grantline(), SECRET, &providers, db.url());
    command
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR");
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"] {
        command.env_remove(name).env_remove(name.to_lowercase());
    }
    if let Some(egress) = egress {
        command.env("HTTPS_PROXY", egress);
    }
    let mut server = Running::spawn(command, dir.path().join("grantline.log"));
    wait_healthy(&mut server, &base).await;
    let app = TestApp::client_of(&base);
    (dir, server, app)
}

/// Sets up the integration and an API-key connection `c1` on `app`.
async fn connect(app: &TestApp) {
    let bearer = format!("Bearer {SECRET}");
    let post = |path: &'static str, body: Value| {
        app.client
            .post(app.url(path))
            .header("authorization", bearer.clone())
            .json(&body)
            .send()
    };
    let integration = post(
        "/integrations",
        json!({"provider": "fake-tls", "unique_key": "tls"}),
    )
    .await
    .unwrap();
    assert_eq!(
        integration.status(),
        200,
        "{}",
        integration.text().await.unwrap()
    );
    let import = json!({
        "provider_config_key": "tls", "connection_id": "c1", "api_key": FakeProvider::API_KEY,
    });
    let imported = post("/connection", import).await.unwrap();
    assert_eq!(imported.status(), 201, "{}", imported.text().await.unwrap());
}

/// The proxied `GET /api/echo` of `c1`.
async fn echo(app: &TestApp) -> reqwest::Response {
    app.client
        .get(app.url("/proxy/api/echo"))
        .header("authorization", format!("Bearer {SECRET}"))
        .header("Connection-Id", "c1")
        .header("Provider-Config-Key", "tls")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_api_over_tls_is_reached_only_with_a_certificate_the_roots_vouch_for() {
    let certificates = tempfile::tempdir().unwrap();
    root(certificates.path(), "ca");
    root(certificates.path(), "other");
    server_certificate(certificates.path(), "ca");
    let fake = FakeProvider::start().await;
    let backend = fake.base.trim_start_matches("http://").to_owned();
    let tls_port = tls_front(certificates.path(), backend).await;

    // Trusting the root that signed the certificate: the call goes through with the key.
    let db = TestDatabase::postgres().await;
    let (_dir, server, app) = serve(
        &db,
        &fake,
        tls_port,
        &certificates.path().join("ca.pem"),
        None,
    )
    .await;
    connect(&app).await;
    let response = echo(&app).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}\n--- grantline:\n{}", server.output());
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["path"], "/api/echo");
    drop(server);

    // The same through an egress proxy: the TLS goes through its tunnel, checked the same way.
    let (egress, tunnels) = egress_proxy().await;
    let ca = certificates.path().join("ca.pem");
    let db = TestDatabase::postgres().await;
    let (_dir, server, app) = serve(&db, &fake, tls_port, &ca, Some(&egress)).await;
    connect(&app).await;
    let response = echo(&app).await;
    assert_eq!(response.status(), 200, "{}", server.output());
    assert_eq!(
        tunnels.load(Ordering::SeqCst),
        1,
        "one tunnel, kept for the call"
    );
    drop(server);
    let other = certificates.path().join("other.pem");
    let db = TestDatabase::postgres().await;
    let (_dir, server, app) = serve(&db, &fake, tls_port, &other, Some(&egress)).await;
    connect(&app).await;
    let calls = fake.api.calls.load(Ordering::SeqCst);
    let response = echo(&app).await;
    assert_eq!(response.status(), 502, "{}", server.output());
    assert_eq!(tunnels.load(Ordering::SeqCst), 2);
    assert_eq!(fake.api.calls.load(Ordering::SeqCst), calls);
    drop(server);

    // Trusting another root only: refused before anything is sent.
    let db = TestDatabase::postgres().await;
    let (_dir, server, app) = serve(
        &db,
        &fake,
        tls_port,
        &certificates.path().join("other.pem"),
        None,
    )
    .await;
    connect(&app).await;
    let calls = fake.api.calls.load(Ordering::SeqCst);
    let response = echo(&app).await;
    assert_eq!(response.status(), 502, "{}", server.output());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert_eq!(
        fake.api.calls.load(Ordering::SeqCst),
        calls,
        "nothing reached the API"
    );
    assert!(!server.output().contains(FakeProvider::API_KEY));
}
