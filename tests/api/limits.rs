//! The server's limits, tried as a hostile client would over raw sockets: headers trickled,
//! sockets left idle, more connections than the cap, a huge announced body, a body that never
//! comes, WebSockets past their caps, from a foreign origin, or gone silent. Each is refused or
//! closed within its bound and counted in `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use domain::testing::TestDatabase;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{TestApp, new_key, spawn_app_with};

/// A service with short limits: 1 s header and idle timeouts, 3 s per request, 4 connections,
/// 3 WebSockets (2 per client), idle after 1 s.
async fn limited(db: &TestDatabase) -> TestApp {
    spawn_app_with(
        db,
        &new_key(),
        &[
            "--header-timeout",
            "1s",
            "--idle-timeout",
            "1s",
            "--request-timeout",
            "3s",
            "--provider-timeout",
            "2s",
            "--max-connections",
            "4",
            "--max-websockets",
            "3",
            "--max-websockets-per-client",
            "2",
            "--websocket-idle-timeout",
            "1s",
        ],
    )
    .await
}

fn address(app: &TestApp) -> SocketAddr {
    app.address.trim_start_matches("http://").parse().unwrap()
}

/// Reads until the server closes the socket (or 10 s pass); what it sent, and how long it took.
async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the server kept the socket open for 10 s"),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
    )
}

/// Connects to `address` and sends `bytes`: the stream, and when it connected.
async fn connect_and_send(address: SocketAddr, bytes: &[u8]) -> (TcpStream, Instant) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let started = Instant::now();
    stream.write_all(bytes).await.unwrap();
    (stream, started)
}

/// The first bytes the server answers on `stream`, which must come within `limit`.
async fn first_answer(stream: &mut TcpStream, limit: Duration) -> String {
    let mut buffer = [0u8; 4096];
    let n = tokio::time::timeout(limit, stream.read(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("no answer within {limit:?}"))
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

/// The value of `grantline_http_refused_total{limit="limit"}`.
async fn refused(app: &TestApp, limit: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    let prefix = format!("grantline_http_refused_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn trickled_headers_and_idle_sockets_are_closed_within_their_timeouts() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let address = address(&app);

    // A head that never ends: closed after the header timeout, whatever keeps trickling.
    let (mut trickling, started) = connect_and_send(address, b"GET /health HTTP/1.1\r\n").await;
    for _ in 0..30 {
        if trickling.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (answer, _) = until_closed(&mut trickling).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A connection that says nothing at all, and one that goes quiet after a request.
    let mut silent = TcpStream::connect(address).await.unwrap();
    let (mut quiet, _) =
        connect_and_send(address, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let (answer, waited) = until_closed(&mut quiet).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    let (answer, waited) = until_closed(&mut silent).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");

    assert!(refused(&app, "header_timeout").await >= 2.0);
    assert!(refused(&app, "idle_timeout").await >= 1.0);
    assert_eq!(app.get("/health").await.status(), 200);
}

/// A request the HTTP parser cannot read is answered with a JSON error with a code, like every
/// other bad request, and the connection is closed.
#[tokio::test]
async fn a_request_that_cannot_be_parsed_gets_a_json_error() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let address = address(&app);
    let many_headers: String = (0..200).map(|i| format!("X-{i}: a\r\n")).collect();
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "a".repeat(70_000)
    );
    let cases = [
        (
            format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{many_headers}\r\n"),
            "431",
            "headers_too_large",
        ),
        (long_uri, "414", "uri_too_long"),
        (
            "NOT HTTP AT ALL\r\n\r\n".to_owned(),
            "400",
            "invalid_request",
        ),
        (
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n".to_owned(),
            "400",
            "invalid_request",
        ),
    ];
    for (request, status, code) in cases {
        let (mut stream, _) = connect_and_send(address, request.as_bytes()).await;
        let (answer, _) = until_closed(&mut stream).await;
        assert_json_error(&answer, status, code);
    }
    // After an answered request, on the same connection.
    let (mut stream, _) =
        connect_and_send(address, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let first = first_answer(&mut stream, Duration::from_secs(5)).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
    let (answer, _) = until_closed(&mut stream).await;
    assert_json_error(&answer, "400", "invalid_request");
    // Behind answered requests in the same segment (pipelined), and after HTTP/1.0.
    for (requests, version) in [
        (
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "HTTP/1.1",
        ),
        (
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n",
            "HTTP/1.0",
        ),
    ] {
        let pipelined = format!("{requests}{requests}NOT HTTP\r\n\r\n");
        let (mut stream, _) = connect_and_send(address, pipelined.as_bytes()).await;
        let (answer, _) = until_closed(&mut stream).await;
        let last = answer.rfind(&format!("{version} 400 ")).unwrap_or(0);
        assert_eq!(
            answer.matches(&format!("{version} 200 ")).count(),
            2,
            "{answer}"
        );
        assert_json_error(
            &answer[last..].replace(version, "HTTP/1.1"),
            "400",
            "invalid_request",
        );
    }
    assert_eq!(app.get("/health").await.status(), 200);
}

/// `answer` is a `status` answer whose body, as long as it says, is a JSON error with `code`.
fn assert_json_error(answer: &str, status: &str, code: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "{answer}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("content-type: application/json"), "{answer}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", body.len())),
        "{answer}"
    );
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], code, "{answer}");
}

#[tokio::test]
async fn past_the_connection_cap_a_connection_gets_503_and_the_cap_frees_up() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let address = address(&app);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        // A request in flight keeps its connection: the body is announced, never sent.
        stream
            .write_all(b"POST /config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{")
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused_one = TcpStream::connect(address).await.unwrap();
    let (answer, waited) = until_closed(&mut refused_one).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.ends_with(r#""code":"service_unavailable","message":"the server has too many open connections; try again"}}"#), "{answer}");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    // One still sending its request when refused is not reset: what it sends is read, and it
    // gets the whole answer.
    let (mut eager, _) = connect_and_send(address, b"GET /health HTT").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest = eager.write_all(b"P/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert!(rest.is_ok(), "{rest:?}");
    let (answer, _) = until_closed(&mut eager).await;
    assert!(
        answer.contains(r#""code":"service_unavailable""#),
        "{answer}"
    );
    drop(held);
    // The cap frees up as the held connections close.
    let mut served = false;
    for _ in 0..50 {
        if let Ok(response) = app.client.get(app.url("/health")).send().await
            && response.status() == 200
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served);
    assert!(refused(&app, "connections").await >= 1.0);
}

/// A request that announces a 10 GiB body.
const HUGE_BODY: &[u8] = b"POST /connection HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10737418240\r\n\r\n";

/// A request that announces 100 bytes of body and sends 5 of them.
const BODY_THAT_NEVER_COMES: &[u8] = b"POST /config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":";

/// Clients that pipeline requests for a large answer and never read: once the sockets'
/// buffers are full, nothing of the answers moves. Each connection is closed after the idle
/// timeout, so that such clients cannot hold every place under the connection cap (4 here)
/// for as long as they like.
#[tokio::test]
async fn clients_that_never_read_their_answers_are_closed_after_the_idle_timeout() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let request = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(300);
    let mut hoarders = Vec::new();
    for _ in 0..4 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut hoarding = socket.connect(address(&app)).await.unwrap();
        // The server stops reading once its answers back up, so the requests may not all go.
        let _ = tokio::time::timeout(Duration::from_secs(1), hoarding.write_all(&request)).await;
        hoarders.push(hoarding);
    }
    // Past the idle timeout (1 s) and the watchdog's tick, without reading a byte.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.get("/health").await.status(), 200, "a place is free");
    assert!(refused(&app, "idle_timeout").await >= 4.0);
    drop(hoarders);
}

#[tokio::test]
async fn a_huge_announced_body_is_refused_at_once_and_a_body_that_never_comes_times_out() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let address = address(&app);

    let (mut huge, started) = connect_and_send(address, HUGE_BODY).await;
    // Answered at once.
    let answer = first_answer(&mut huge, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let (mut never, started) = connect_and_send(address, BODY_THAT_NEVER_COMES).await;
    // Answered within the request timeout.
    let answer = first_answer(&mut never, Duration::from_secs(6)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_secs(3));

    assert!(refused(&app, "body_too_large").await >= 1.0);
    assert!(refused(&app, "request_timeout").await >= 1.0);
}

/// Opens a WebSocket to `app` from the local address `from`, with `origin` if given; the
/// stream, or the HTTP status it was refused with.
async fn websocket(
    app: &TestApp,
    from: &str,
    origin: Option<&str>,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(address(app)).await.unwrap();
    let mut request = app
        .url("/")
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((stream, _)) => Ok(stream),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn websockets_are_capped_in_all_and_per_client_and_foreign_origins_are_refused() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let own_origin = app.address.clone();
    let a1 = websocket(&app, "127.0.0.1", Some(&own_origin))
        .await
        .unwrap();
    let _a2 = websocket(&app, "127.0.0.1", None).await.unwrap();
    assert_eq!(websocket(&app, "127.0.0.1", None).await.unwrap_err(), 503);
    let _b1 = websocket(&app, "127.0.0.2", None).await.unwrap();
    assert_eq!(websocket(&app, "127.0.0.3", None).await.unwrap_err(), 503);
    assert_eq!(
        websocket(&app, "127.0.0.3", Some("https://evil.example"))
            .await
            .unwrap_err(),
        403
    );
    drop(a1);
    // The place frees up once the server sees the socket closed.
    let mut admitted = false;
    for _ in 0..50 {
        if websocket(&app, "127.0.0.3", None).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted);
    assert!(refused(&app, "websockets").await >= 1.0);
    assert!(refused(&app, "websockets_per_client").await >= 1.0);
    assert_eq!(refused(&app, "websocket_origin").await, 1.0);
}

#[tokio::test]
async fn a_websocket_that_answers_pings_stays_and_a_silent_one_is_closed() {
    let db = TestDatabase::sqlite();
    let app = limited(&db).await;
    let mut listening = websocket(&app, "127.0.0.1", None).await.unwrap();
    let mut silent = websocket(&app, "127.0.0.1", None).await.unwrap();
    // Reading answers the server's pings; for 2.5 s (past the 1 s idle timeout) only pings come.
    let deadline = Instant::now() + Duration::from_millis(2500);
    while let Ok(message) = tokio::time::timeout_at(deadline.into(), listening.next()).await {
        match message {
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the listening socket was closed: {other:?}"),
        }
    }
    // The silent one never read, so never answered a ping: the server has closed it.
    let mut closed = false;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), silent.next()).await
    {
        if matches!(message, Ok(Message::Close(_)) | Err(_)) {
            closed = true;
            break;
        }
    }
    assert!(closed || silent.next().await.is_none());
    assert!(refused(&app, "websocket_idle").await >= 1.0);
}
