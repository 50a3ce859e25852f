//! The database goes away, or stops answering, behind a TCP relay.
//!
//! - In the middle of a refresh, between the provider's answer (which rotated the refresh token)
//!   and the append of the outcome: the outcome is recorded once the database is back, within
//!   the lease, so the next refresh spends the new refresh token.
//! - A peer that keeps the connections open and stops answering on them (a hung pooler): once
//!   new connections are answered again, requests succeed again; the pool does not keep handing
//!   out the connections whose queries nobody will answer.
//! - Stopping to answer while a refresh is between the provider's answer and recording it: the
//!   refresh is given up after twice the lease, so later reads of the connection are not kept
//!   waiting behind it for good.
//! - Refusing connections when the service starts (PostgreSQL still starting, a container
//!   started first): the service waits for it and then serves.

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
    requests_succeed_again_after_the_database_stopped_answering_on_open_connections,
    the_service_waits_at_start_up_for_a_database_that_refuses_connections,
    a_refresh_whose_query_is_never_answered_is_given_up,
    a_scheduler_tick_whose_query_is_never_answered_is_given_up,
    a_webhook_step_whose_query_is_never_answered_is_given_up,
);

/// A TCP relay to the database that can cut every connection and refuse new ones, or freeze:
/// keep every open connection open and never pass anything on them again (new ones are held
/// unanswered while frozen).
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    frozen: tokio::sync::watch::Sender<bool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        Self::on(target, TcpListener::bind(("127.0.0.1", 0)).await.unwrap())
    }

    /// A relay taking connections from `listener`.
    fn on(target: SocketAddr, listener: TcpListener) -> Self {
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let frozen = tokio::sync::watch::Sender::new(false);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (flag, freezes, held) = (down.clone(), frozen.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let mut freeze = freezes.subscribe();
                let link = tokio::spawn(async move {
                    if *freeze.borrow_and_update() {
                        return std::future::pending::<()>().await;
                    }
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = async { drop(freeze.wait_for(|frozen| *frozen).await) } => {
                                // Both sockets stay open; nothing passes any more.
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            down,
            frozen,
            links,
            accept,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// New connections are passed on again; those open while frozen stay frozen.
    fn thaw(&self) {
        self.frozen.send_replace(false);
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

/// `db` behind a new relay, as a database to configure the service with (not to be dropped:
/// `db` is the same database).
async fn relayed(db: &TestDatabase) -> (Relay, std::mem::ManuallyDrop<TestDatabase>) {
    let relay = Relay::start(address_of(db)).await;
    let relayed = on_port(db, relay.port);
    (relay, relayed)
}

/// Where `db`'s server listens.
fn address_of(db: &TestDatabase) -> SocketAddr {
    let url = url::Url::parse(db.url()).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// `db` as reached through `port` on this host (not to be dropped: `db` is the same database).
fn on_port(db: &TestDatabase, port: u16) -> std::mem::ManuallyDrop<TestDatabase> {
    let mut url = url::Url::parse(db.url()).unwrap();
    url.set_port(Some(port)).unwrap();
    std::mem::ManuallyDrop::new(TestDatabase::Postgres {
        name: String::new(),
        url: url.to_string(),
    })
}

async fn the_service_waits_at_start_up_for_a_database_that_refuses_connections(db: &TestDatabase) {
    // A port nobody listens on, yet: bound, so that no other test's server can take it before
    // the relay does, but not listening, so that connections to it are refused.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let config = config_on(&on_port(db, port), &new_key(), &[]);
    let starting = tokio::spawn(spawn_config(config));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !starting.is_finished(),
        "the service waits while connections are refused"
    );

    let _relay = Relay::on(address_of(db), reserved.listen(64).unwrap());
    let app = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the service starts once the database takes connections")
        .unwrap();
    let list = app.get("/connections").await;
    assert_eq!(list.status(), 200);
}

/// Waits short enough that a test sees each one given up.
const QUICK_TO_GIVE_UP: [&str; 6] = [
    "--database-pool-wait",
    "1s",
    "--provider-timeout",
    "1s",
    "--request-timeout",
    "2s",
];

async fn requests_succeed_again_after_the_database_stopped_answering_on_open_connections(
    db: &TestDatabase,
) {
    let (relay, relayed) = relayed(db).await;
    let args = QUICK_TO_GIVE_UP;
    let app = spawn_config(config_on(&relayed, &new_key(), &args)).await;
    let list = "/connections";
    // Several pooled connections, all open when the relay freezes.
    let lists = futures_util::future::join_all((0..6).map(|_| app.get(list))).await;
    assert!(lists.iter().all(|answer| answer.status() == 200));

    relay.freeze();
    let answer = tokio::time::timeout(Duration::from_secs(10), app.get(list))
        .await
        .expect("a request gives up at its timeout");
    assert_eq!(answer.status(), 408);

    // The database answers new connections again; the ones open before never will.
    relay.thaw();
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let status = tokio::time::timeout(Duration::from_secs(10), app.get(list))
            .await
            .expect("a request gives up at its timeout")
            .status();
        statuses.push(status.as_u16());
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");

    // The projections take in what is written now: the runner is not left waiting on a
    // frozen connection either.
    let integration = json!({
        "provider_config_key": "after", "provider": "github",
        "oauth_client_id": "id", "oauth_client_secret": "secret",
    });
    ok_json(app.post_json("/config", &integration).await).await;
    let mut lags = Vec::new();
    for _ in 0..120 {
        let status = app.get("/admin/projections").await;
        if status.status() == 200 {
            let status: serde_json::Value = status.json().await.unwrap();
            let projections = status["projections"].as_array().unwrap();
            if projections.iter().all(|p| p["caught_up"] == true) {
                return;
            }
            lags.push(status["projections"].clone());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the projections stayed behind: {lags:?}");
}

/// The `fake` integration on `app`, and its connection `c1` with refresh token `rt-0` (which
/// the fake provider accepts once).
async fn connect_c1(app: &crate::TestApp, fake: &FakeProvider) {
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
}

async fn a_rotated_refresh_token_survives_the_database_going_away_before_it_is_recorded(
    db: &TestDatabase,
) {
    let (relay, relayed) = relayed(db).await;
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
    connect_c1(&app, &fake).await;

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

async fn a_refresh_whose_query_is_never_answered_is_given_up(db: &TestDatabase) {
    let (relay, relayed) = relayed(db).await;
    let fake = FakeProvider::start().await;
    let (_dir, file) = fake.providers_file("");
    let args = [
        "--providers-file",
        file.to_str().unwrap(),
        "--database-pool-wait",
        "1s",
        "--refresh-lease",
        "3s",
        "--provider-timeout",
        "1s",
        "--request-timeout",
        "2s",
    ];
    let app = spawn_config(config_on(&relayed, &new_key(), &args)).await;
    connect_c1(&app, &fake).await;

    // The provider answers after 300 ms; the relay freezes as soon as it is asked, so the
    // outcome's append goes out on a connection (the lease's, used a moment ago) that never
    // answers.
    fake.set_mode(TokenMode::Slow(Duration::from_millis(300)));
    let forced = "/connection/c1?provider_config_key=fake&force_refresh=true";
    let freeze = async {
        while fake.refresh_requests() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.freeze();
    };
    let (answer, ()) = tokio::join!(app.get(forced), freeze);
    assert_eq!(answer.status(), 408, "the request gives up at its timeout");
    relay.thaw();

    // New connections are answered again. The first attempt is given up after twice the
    // lease (6 s); a read after that is answered (whatever the provider then says of the
    // refresh token the lost outcome rotated), not held behind the lost attempt.
    fake.set_mode(TokenMode::Json);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.get(forced).await.status();
        if status != 408 {
            assert_ne!(status, 500);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reads of the connection stayed behind the lost refresh"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn a_scheduler_tick_whose_query_is_never_answered_is_given_up(db: &TestDatabase) {
    let (relay, relayed) = relayed(db).await;
    let args = QUICK_TO_GIVE_UP;
    let (app, state) = crate::spawn_with_state(config_on(&relayed, &new_key(), &args)).await;
    assert!(state.scheduler.tick_once(chrono::Utc::now()).await.is_ok());
    assert_eq!(app.get("/connections").await.status(), 200);
    // The tick's query goes out on the connection just used, which never answers now.
    relay.freeze();
    let tick = tokio::time::timeout(
        Duration::from_secs(30),
        state.scheduler.tick_once(chrono::Utc::now()),
    )
    .await
    .expect("the tick gives up (after 10 s, the least limit)");
    assert!(
        matches!(tick, Err(workers::scheduler::TickError::Unanswered(_))),
        "{tick:?}"
    );
    relay.thaw();
    assert!(state.scheduler.tick_once(chrono::Utc::now()).await.is_ok());
}

async fn a_webhook_step_whose_query_is_never_answered_is_given_up(db: &TestDatabase) {
    let (relay, relayed) = relayed(db).await;
    // Delivered by hand below (no webhooks role); a 1 s timeout makes the lease 15 s.
    let args = [
        "--webhook-urls",
        "http://127.0.0.1:9/in",
        "--webhook-secret",
        "whsec-outage",
        "--webhook-timeout",
        "1s",
        "--database-pool-wait",
        "1s",
    ];
    let (_app, state) = crate::spawn_with_state(config_on(&relayed, &new_key(), &args)).await;
    let webhooks = state.webhooks.clone().expect("a target is configured");
    let subscriber = &webhooks.subscribers()[0];
    assert!(subscriber.step_once(chrono::Utc::now()).await.is_ok());
    // The step's first query goes out on the connection just used, which never answers now.
    relay.freeze();
    let step = tokio::time::timeout(
        Duration::from_secs(40),
        subscriber.step_once(chrono::Utc::now()),
    )
    .await
    .expect("the step gives up after the lease");
    assert!(step.is_err(), "{step:?}");
    relay.thaw();
    assert!(subscriber.step_once(chrono::Utc::now()).await.is_ok());
}
