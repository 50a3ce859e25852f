//! The database goes away in the middle of a refresh: between the provider's answer (which
//! rotated the refresh token) and the append of the outcome. The outcome is recorded once the
//! database is back, within the lease, so the next refresh spends the new refresh token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::testing::TestDatabase;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::fake_provider::{CLIENT_ID, CLIENT_SECRET, FakeProvider, TokenMode};
use crate::{config_on, new_key, ok_json, spawn_config};

domain::on_postgres_only!(
    a_rotated_refresh_token_survives_the_database_going_away_before_it_is_recorded,
);

/// A TCP relay to the database that can cut every connection and refuse new ones.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (flag, held) = (down.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            down,
            links,
            accept,
        }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn a_rotated_refresh_token_survives_the_database_going_away_before_it_is_recorded(
    db: &TestDatabase,
) {
    let mut url = url::Url::parse(db.url()).unwrap();
    let target: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap();
    let relay = Relay::start(target).await;
    url.set_port(Some(relay.port)).unwrap();
    let relayed = TestDatabase::Postgres {
        name: String::new(),
        url: url.to_string(),
    };
    let fake = FakeProvider::start().await;
    let (_dir, file) = fake.providers_file("");
    let key = new_key();
    let args = [
        "--providers-file",
        file.to_str().unwrap(),
        "--database-pool-wait",
        "1s",
        "--refresh-lease",
        "30s",
        "--provider-timeout",
        "10s",
    ];
    let app = spawn_config(config_on(&relayed, &key, &args)).await;
    std::mem::forget(relayed); // Not ours to drop: `db` is the same database.
    let integration = json!({
        "provider_config_key": "fake", "provider": "fake",
        "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET,
    });
    ok_json(app.post_json("/config", &integration).await).await;
    fake.accept_refresh_token("rt-0");
    let import = json!({
        "provider_config_key": "fake", "connection_id": "c1",
        "access_token": "old", "refresh_token": "rt-0",
    });
    assert_eq!(app.post_json("/connection", &import).await.status(), 201);

    // The provider answers after 2 s; the database is gone from 1 s to 4 s.
    fake.set_mode(TokenMode::Slow(Duration::from_secs(2)));
    let forced = "/connection/c1?provider_config_key=fake&force_refresh=true";
    let read = app.get(forced);
    let outage = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        relay.cut();
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.restore();
    };
    let (answer, ()) = tokio::join!(read, outage);
    assert!(
        answer.status() == 200 || answer.status() == 503,
        "{}",
        answer.status()
    );
    assert_eq!(fake.refresh_requests(), 1);

    // Once the outcome is in, the next refresh spends the rotated token, which the fake
    // accepts (the spent rt-0 it would refuse with invalid_grant).
    fake.set_mode(TokenMode::Json);
    let mut body = serde_json::Value::Null;
    for _ in 0..100 {
        let answer = app.get(forced).await;
        if answer.status() == 200 {
            body = answer.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (access, _) = FakeProvider::refreshed_tokens(2);
    assert_eq!(
        body["credentials"]["access_token"],
        access.as_str(),
        "{body}"
    );
    assert_eq!(fake.refresh_requests(), 2);
}
