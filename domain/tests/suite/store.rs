//! The event-store contract: every backend must pass all of it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use grantline_domain::store::{
    Appended, Backend, EventStore, ExpectedVersion, LogReader, NewEvent, NewStream, Position,
    StoreError, StoreOptions, StreamAppend, StreamCompaction, StreamId,
};
use grantline_domain::testing::TestDatabase;
use serde_json::json;

grantline_domain::on_both_backends!(
    first_append_with_no_stream_starts_the_stream_at_version_one,
    append_with_the_exact_version_extends_the_stream,
    append_with_a_stale_version_is_a_conflict_and_writes_nothing,
    append_with_no_stream_to_an_existing_stream_is_a_conflict,
    append_ahead_of_the_stream_is_a_conflict,
    append_with_any_goes_to_the_end,
    a_multi_event_append_is_all_or_nothing,
    a_repeated_event_id_is_refused_and_nothing_is_written,
    read_stream_returns_the_events_after_a_version_in_order,
    read_all_in_batches_returns_every_event_once_in_order,
    a_listener_wakes_up_on_a_commit_before_its_poll_interval,
    concurrent_appenders_to_one_stream_win_each_version_exactly_once,
    an_unreadable_payload_stops_the_reader_at_its_position,
    an_event_of_an_unknown_type_stops_a_decoding_reader_at_its_position,
    empty_appends_and_exact_zero_are_refused,
    a_reader_started_at_the_last_position_sees_only_what_comes_after,
    new_streams_are_created_all_or_nothing,
    appends_to_several_streams_are_all_or_nothing,
    only_the_compactor_removes_events_and_only_those_it_planned,
    a_database_migrated_by_a_newer_release_still_opens,
);

fn event(n: u64) -> NewEvent {
    NewEvent::new("TestEvent", 1, json!({ "n": n }))
}

fn stream(name: &str) -> StreamId {
    StreamId::new("test", name)
}

/// Appends `events` to `s` at `expected`, which must succeed.
async fn appended(
    store: &dyn EventStore,
    s: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Appended {
    store.append(s, expected, events).await.unwrap()
}

/// Starts the stream `test-a` with its first event; returns its id.
async fn started(store: &dyn EventStore) -> StreamId {
    let a = stream("a");
    appended(store, &a, ExpectedVersion::NoStream, vec![event(1)]).await;
    a
}

/// The versions of the events of `s`, in stream order.
async fn versions(store: &dyn EventStore, s: &StreamId) -> Vec<u32> {
    let events = store.read_stream(s, 0).await.unwrap();
    events.iter().map(|e| e.stream_version).collect()
}

/// Asserts `err` is a version conflict with the stream at `actual`.
fn assert_conflict(err: &StoreError, actual: u32) {
    assert!(
        matches!(err, StoreError::Conflict { actual: a, .. } if *a == actual),
        "{err:?}"
    );
}

/// Appends `events` to `s` at `expected`, which must be refused.
async fn refused(
    store: &dyn EventStore,
    s: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> StoreError {
    store.append(s, expected, events).await.unwrap_err()
}

async fn first_append_with_no_stream_starts_the_stream_at_version_one(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let a = stream("a");
    let appended = appended(store, &a, ExpectedVersion::NoStream, vec![event(1)]).await;
    assert_eq!(appended.stream_version, 1);
    assert_eq!(appended.global_positions.len(), 1);
    let events = store.read_stream(&stream("a"), 0).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].stream_version, 1);
    assert_eq!(events[0].event_type, "TestEvent");
    assert_eq!(events[0].payload.to_value(), json!({ "n": 1 }));
    assert_eq!(events[0].position.global, appended.global_positions[0]);
}

async fn append_with_the_exact_version_extends_the_stream(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = started(store).await;
    let second = appended(store, &s, ExpectedVersion::Exact(1), vec![event(2)]).await;
    let third = appended(store, &s, ExpectedVersion::Exact(2), vec![event(3)]).await;
    assert_eq!((second.stream_version, third.stream_version), (2, 3));
    assert!(second.global_positions[0] < third.global_positions[0]);
}

async fn append_with_a_stale_version_is_a_conflict_and_writes_nothing(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = stream("a");
    appended(
        store,
        &s,
        ExpectedVersion::NoStream,
        vec![event(1), event(2)],
    )
    .await;
    let err = refused(store, &s, ExpectedVersion::Exact(1), vec![event(3)]).await;
    match err {
        StoreError::Conflict {
            actual, expected, ..
        } => {
            assert_eq!(actual, 2);
            assert_eq!(expected, ExpectedVersion::Exact(1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.read_stream(&s, 0).await.unwrap().len(), 2);
}

async fn append_with_no_stream_to_an_existing_stream_is_a_conflict(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = started(store).await;
    let err = refused(store, &s, ExpectedVersion::NoStream, vec![event(2)]).await;
    assert_conflict(&err, 1);
}

async fn append_ahead_of_the_stream_is_a_conflict(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = started(store).await;
    let err = refused(store, &s, ExpectedVersion::Exact(5), vec![event(2)]).await;
    assert_conflict(&err, 1);
    let never = stream("never");
    let missing = refused(store, &never, ExpectedVersion::Exact(1), vec![event(1)]).await;
    assert_conflict(&missing, 0);
    assert!(
        store
            .read_stream(&stream("never"), 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn append_with_any_goes_to_the_end(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = stream("a");
    let first = appended(store, &s, ExpectedVersion::Any, vec![event(1)]).await;
    let second = appended(store, &s, ExpectedVersion::Any, vec![event(2), event(3)]).await;
    assert_eq!((first.stream_version, second.stream_version), (1, 3));
}

async fn a_multi_event_append_is_all_or_nothing(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let s = stream("a");
    let appended = appended(
        store,
        &s,
        ExpectedVersion::NoStream,
        vec![event(1), event(2), event(3)],
    )
    .await;
    assert_eq!(appended.stream_version, 3);
    assert_eq!(appended.global_positions.len(), 3);
    assert!(appended.global_positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(versions(store, &s).await, vec![1, 2, 3]);
    // A conflicting batch leaves no trace.
    refused(
        store,
        &s,
        ExpectedVersion::Exact(2),
        vec![event(4), event(5)],
    )
    .await;
    assert_eq!(store.read_stream(&s, 0).await.unwrap().len(), 3);
}

async fn a_repeated_event_id_is_refused_and_nothing_is_written(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let first = event(1);
    let id = first.event_id;
    let (a, b) = (stream("a"), stream("b"));
    appended(store, &a, ExpectedVersion::NoStream, vec![first.clone()]).await;
    let err = refused(store, &b, ExpectedVersion::NoStream, vec![event(2), first]).await;
    assert!(
        matches!(err, StoreError::DuplicateEvent(d) if d == id),
        "{err:?}"
    );
    assert!(store.read_stream(&stream("b"), 0).await.unwrap().is_empty());
}

async fn read_stream_returns_the_events_after_a_version_in_order(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let (a, b) = (stream("a"), stream("b"));
    for n in 1..=5u32 {
        let expected = if n == 1 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(n - 1)
        };
        appended(store, &a, expected, vec![event(n.into())]).await;
        store.append(&b, expected, vec![event(100)]).await.unwrap();
    }
    let tail = store.read_stream(&a, 3).await.unwrap();
    let ns: Vec<_> = tail
        .iter()
        .map(|e| (e.stream_version, e.payload.to_value()["n"].as_u64()))
        .collect();
    assert_eq!(ns, vec![(4, Some(4)), (5, Some(5))]);
    assert!(tail.iter().all(|e| e.stream_id == a));
}

async fn read_all_in_batches_returns_every_event_once_in_order(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    for n in 0..50u64 {
        appended(
            store,
            &stream(&format!("s{}", n % 7)),
            ExpectedVersion::Any,
            vec![event(n)],
        )
        .await;
    }
    assert!(store.head_position().await.unwrap() >= 50);
    let mut reader = LogReader::new(backend.event_store(), Position::START, 8);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 50 && tokio::time::Instant::now() < deadline {
        let batch = reader.next_batch().await.unwrap();
        assert!(batch.len() <= 8);
        if batch.is_empty() {
            // On PostgreSQL another test's open transaction can hold the horizon back a moment.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.extend(batch);
    }
    assert!(reader.next_batch().await.unwrap().is_empty());
    let ns: Vec<u64> = seen
        .iter()
        .map(|e| e.payload.to_value()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns,
        (0..50).collect::<Vec<_>>(),
        "single appender: log order is append order"
    );
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position));
}

async fn a_listener_wakes_up_on_a_commit_before_its_poll_interval(db: &TestDatabase) {
    let options = StoreOptions {
        poll_interval: Duration::from_secs(600),
        ..StoreOptions::default()
    };
    let writer = db.open_with(&options).await;
    // A second instance on the same database: on PostgreSQL it hears the commit only by NOTIFY.
    let other = db.open_with(&options).await;
    for backend in [&writer, &other] {
        let mut listener = backend.events().listener();
        let waiting = tokio::spawn(async move { listener.wait().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer
            .events()
            .append(&stream("a"), ExpectedVersion::Any, vec![event(1)])
            .await
            .unwrap();
        // Far below the 600 s poll interval: only a wake-up can end the wait in time.
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the listener was woken by the commit")
            .unwrap();
        if matches!(backend, Backend::Sqlite(_)) {
            break; // a second SQLite store in one process has no cross-process channel
        }
    }
}

async fn concurrent_appenders_to_one_stream_win_each_version_exactly_once(db: &TestDatabase) {
    let backend = Arc::new(db.open().await);
    let s = stream("contended");
    let tasks = 16;
    let per_task = 10;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let backend = backend.clone();
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let store = backend.events();
            let mut won = Vec::new();
            let mut conflicts = 0;
            while won.len() < per_task {
                let head = store
                    .read_stream(&s, 0)
                    .await
                    .unwrap()
                    .last()
                    .map_or(0, |e| e.stream_version);
                let expected = if head == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(head)
                };
                match store.append(&s, expected, vec![event(task)]).await {
                    Ok(appended) => {
                        assert_eq!(appended.stream_version, head + 1);
                        won.push(appended.stream_version);
                    }
                    Err(StoreError::Conflict { .. }) => conflicts += 1,
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            (won, conflicts)
        }));
    }
    let mut won = Vec::new();
    for handle in handles {
        let (versions, _conflicts) = handle.await.unwrap();
        won.extend(versions);
    }
    let total = (tasks as usize) * per_task;
    let distinct: BTreeSet<u32> = won.iter().copied().collect();
    assert_eq!(won.len(), total);
    assert_eq!(distinct.len(), total, "a version was won twice");
    assert_eq!(
        versions(backend.events(), &s).await,
        (1..=total as u32).collect::<Vec<_>>(),
        "gaps or duplicates in the stream"
    );
}

async fn an_unreadable_payload_stops_the_reader_at_its_position(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let a = started(store).await;
    let bad_position = insert_raw(&backend, "test-bad", "TestEvent", "{not json").await;
    appended(store, &a, ExpectedVersion::Exact(1), vec![event(3)]).await;

    let mut reader = LogReader::new(backend.event_store(), Position::START, 100);
    match &backend {
        Backend::Sqlite(_) => {
            // SQLite keeps payloads as text, so a damaged row fails the read itself.
            for _ in 0..2 {
                let mut result = reader.next_batch().await;
                while matches!(&result, Ok(batch) if batch.is_empty()) {
                    result = reader.next_batch().await;
                }
                let err = result.unwrap_err();
                assert!(
                    matches!(err, StoreError::Corrupt { global_position, .. } if global_position == bad_position),
                    "{err:?}"
                );
                assert_eq!(
                    reader.position(),
                    Position::START,
                    "the reader did not move past it"
                );
            }
        }
        Backend::Postgres(_) => {
            // jsonb cannot hold invalid JSON: the row was stored as a JSON string instead, which
            // the decoding reader must refuse (see the unknown-type test for the mechanism).
            let err = decode_until_error(&mut reader).await;
            assert!(
                err.to_string()
                    .contains(&format!("global position {bad_position}")),
                "{err}"
            );
        }
    }
}

async fn an_event_of_an_unknown_type_stops_a_decoding_reader_at_its_position(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let a = started(store).await;
    let bad = store
        .append(
            &stream("b"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("FromTheFuture", 9, json!({}))],
        )
        .await
        .unwrap()
        .global_positions[0];
    appended(store, &a, ExpectedVersion::Exact(1), vec![event(3)]).await;

    let mut reader = LogReader::new(backend.event_store(), Position::START, 100);
    for _ in 0..2 {
        let err = decode_until_error(&mut reader).await;
        let message = err.to_string();
        assert!(
            message.contains(&format!("global position {bad}")),
            "{message}"
        );
        assert!(message.contains("FromTheFuture"), "{message}");
    }
    // Everything before the bad event was handed out; the reader waits just before it.
    assert!(reader.position().global < bad && reader.position().global > 0);
}

async fn empty_appends_and_exact_zero_are_refused(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    assert!(matches!(
        store
            .append(&stream("a"), ExpectedVersion::NoStream, vec![])
            .await,
        Err(StoreError::InvalidAppend(_))
    ));
    assert!(matches!(
        store
            .append(&stream("a"), ExpectedVersion::Exact(0), vec![event(1)])
            .await,
        Err(StoreError::InvalidAppend(_))
    ));
}

/// Reads on until the reader stops at an undecodable event (waiting out horizon lag).
async fn decode_until_error(reader: &mut LogReader) -> grantline_domain::store::ReadError {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match reader.next_decoded::<TestEvent>(|_| true).await {
            Err(err) => return err,
            Ok(_) if tokio::time::Instant::now() > deadline => panic!("no error within 30 s"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A minimal event type for the decoding reader.
#[derive(Debug)]
struct TestEvent;

impl grantline_domain::event::DomainEvent for TestEvent {
    fn event_type(&self) -> &'static str {
        "TestEvent"
    }
    fn event_version(&self) -> i16 {
        1
    }
    fn to_payload(&self) -> serde_json::Value {
        json!({})
    }
    fn decode(
        event_type: &str,
        event_version: i16,
        payload: &str,
    ) -> Result<Self, grantline_domain::event::DecodeError> {
        use grantline_domain::event::DecodeError;
        match (event_type, event_version) {
            ("TestEvent", 1) if payload.trim_start().starts_with('{') => Ok(TestEvent),
            ("TestEvent", 1) => Err(DecodeError::Malformed {
                event_type: event_type.into(),
                reason: "payload is not an object".into(),
            }),
            _ => Err(DecodeError::Unknown {
                event_type: event_type.into(),
                event_version,
            }),
        }
    }
}

/// Writes a row behind the store's back, as damage or an old bug might have; returns its position.
pub async fn insert_raw(
    backend: &Backend,
    stream_id: &str,
    event_type: &str,
    payload: &str,
) -> i64 {
    match backend {
        Backend::Postgres(store) => {
            let client = store.pool().get().await.unwrap();
            client
                .query_one(
                    "INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload) \
                     VALUES ($1, 1, gen_random_uuid(), $2, 1, to_jsonb($3::text)) RETURNING global_position",
                    &[&stream_id, &event_type, &payload],
                )
                .await
                .unwrap()
                .get(0)
        }
        Backend::Sqlite(store) => {
            let (stream_id, event_type, payload) = (
                stream_id.to_owned(),
                event_type.to_owned(),
                payload.to_owned(),
            );
            store
                .write(move |conn| {
                    conn.execute(
                        "INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, recorded_at) \
                         VALUES (?1, 1, ?2, ?3, 1, ?4, 0)",
                        rusqlite::params![stream_id, uuid::Uuid::new_v4().to_string(), event_type, payload],
                    )
                    .unwrap();
                    Ok(conn.last_insert_rowid())
                })
                .await
                .unwrap()
        }
    }
}

async fn a_reader_started_at_the_last_position_sees_only_what_comes_after(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    assert_eq!(store.last_position().await.unwrap(), Position::START);
    for n in 0..3 {
        appended(store, &stream("a"), ExpectedVersion::Any, vec![event(n)]).await;
    }
    // Another test's open transaction can hide the newest events for a moment; wait for them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = store.last_position().await.unwrap();
    while last.global < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = store.last_position().await.unwrap();
    }
    let mut reader = LogReader::new(backend.event_store(), last, 10);
    assert!(reader.next_batch().await.unwrap().is_empty());
    appended(store, &stream("a"), ExpectedVersion::Any, vec![event(9)]).await;
    let mut seen = Vec::new();
    while seen.is_empty() && tokio::time::Instant::now() < deadline {
        seen = reader.next_batch().await.unwrap();
    }
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].payload.to_value()["n"], 9);
}

mod tls {
    //! TLS to PostgreSQL against this machine's server (ssl on, with Debian's self-signed
    //! certificate for `localhost`, `/etc/ssl/certs/ssl-cert-snakeoil.pem`).

    use grantline_domain::store::{Backend, StoreOptions};
    use grantline_domain::testing::TestDatabase;

    grantline_domain::on_postgres_only!(
        each_sslmode_encrypts_as_asked_and_a_wrong_root_is_refused_at_start_up
    );

    const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

    /// `url` with `options` added to its query.
    fn with(url: &str, options: &str) -> String {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{options}")
    }

    async fn tls_of(url: &str) -> Result<Option<String>, String> {
        let backend = Backend::open(url, &StoreOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(backend.tls_version().await.unwrap())
    }

    /// A root that signed nothing the server has: a fresh self-signed certificate.
    fn wrong_root(dir: &std::path::Path) -> String {
        let path = dir.join("wrong-root.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=not the server's root"])
            .arg("-keyout")
            .arg(dir.join("wrong-root.key"))
            .arg("-out")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl makes the wrong root");
        assert!(status.success());
        path.display().to_string()
    }

    async fn each_sslmode_encrypts_as_asked_and_a_wrong_root_is_refused_at_start_up(
        db: &TestDatabase,
    ) {
        let url = db.url();
        let server_enabled = tls_of(&with(url, "sslmode=require")).await;
        let Ok(Some(version)) = server_enabled else {
            panic!("this machine's PostgreSQL must have ssl on: {server_enabled:?}");
        };
        assert!(version.starts_with("TLSv1."), "{version}");
        assert_eq!(tls_of(&with(url, "sslmode=disable")).await, Ok(None));
        assert!(matches!(
            tls_of(&with(url, "sslmode=prefer")).await,
            Ok(Some(_))
        ));
        // The chain against the server's own certificate; the host name (127.0.0.1) is not
        // the certificate's (localhost), which only verify-full checks.
        let root = format!("sslrootcert={SERVER_CERT}");
        assert!(matches!(
            tls_of(&with(url, &format!("sslmode=verify-ca&{root}"))).await,
            Ok(Some(_))
        ));
        let by_ip = tls_of(&with(url, &format!("sslmode=verify-full&{root}"))).await;
        let refused = by_ip.unwrap_err();
        assert!(refused.contains("sslmode=verify-full"), "{refused}");
        assert!(refused.to_lowercase().contains("name"), "{refused}");
        let by_name = url.replace("127.0.0.1", "localhost");
        assert!(matches!(
            tls_of(&with(&by_name, &format!("sslmode=verify-full&{root}"))).await,
            Ok(Some(_))
        ));

        let dir = tempfile::tempdir().unwrap();
        let wrong = wrong_root(dir.path());
        for mode in ["verify-full", "verify-ca", "require"] {
            let refused = tls_of(&with(
                &by_name,
                &format!("sslmode={mode}&sslrootcert={wrong}"),
            ))
            .await
            .unwrap_err();
            assert!(refused.contains(&format!("sslmode={mode}")), "{refused}");
            assert!(refused.contains("UnknownIssuer"), "{refused}");
            assert!(
                !refused.contains("postgres@"),
                "no URL in the message: {refused}"
            );
        }
    }
}

/// The whole log once it shows `count` events: on PostgreSQL a reader sees an event once no
/// older transaction of the cluster is open (other tests run beside this one).
async fn read_all_of(
    store: &dyn EventStore,
    count: usize,
) -> Vec<grantline_domain::store::RecordedEvent> {
    for _ in 0..500 {
        let all = store.read_all(Position::START, 100).await.unwrap();
        if all.len() >= count {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the log did not show {count} events");
}

async fn new_streams_are_created_all_or_nothing(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let (a, b, c) = (stream("a"), stream("b"), stream("c"));
    let new = |s: &StreamId, events: Vec<NewEvent>| NewStream {
        stream: s.clone(),
        events,
    };
    let created = store
        .create_streams(vec![
            new(&a, vec![event(1), event(2)]),
            new(&b, vec![event(3)]),
        ])
        .await
        .unwrap();
    assert_eq!(
        created.iter().map(|c| c.stream_version).collect::<Vec<_>>(),
        [2, 1]
    );
    let positions: Vec<i64> = created
        .iter()
        .flat_map(|c| c.global_positions.clone())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(versions(store, &a).await, [1, 2]);
    assert_eq!(
        store
            .stream_versions(&[c.clone(), a.clone(), b.clone()])
            .await
            .unwrap(),
        [0, 2, 1]
    );
    let all = read_all_of(store, 3).await;
    assert_eq!(
        all.iter()
            .map(|e| e.payload.to_value()["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // One existing stream refuses the whole batch, naming it.
    match store
        .create_streams(vec![new(&c, vec![event(4)]), new(&a, vec![event(5)])])
        .await
    {
        Err(StoreError::Conflict { stream, actual, .. }) => {
            assert_eq!((stream, actual), (a.clone(), 2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(versions(store, &c).await, Vec::<u32>::new());
    assert_eq!(versions(store, &a).await, [1, 2]);

    // A stream twice, or one without events, is refused before anything is written.
    for streams in [
        vec![new(&c, vec![event(6)]), new(&c, vec![event(7)])],
        vec![new(&c, vec![])],
    ] {
        assert!(matches!(
            store.create_streams(streams).await,
            Err(StoreError::InvalidAppend(_))
        ));
    }
    assert!(store.create_streams(Vec::new()).await.unwrap().is_empty());
    assert_eq!(store.head_position().await.unwrap(), 3);
}

async fn appends_to_several_streams_are_all_or_nothing(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let (a, b, c) = (stream("a"), stream("b"), stream("c"));
    let new = |s: &StreamId, events: Vec<NewEvent>| NewStream {
        stream: s.clone(),
        events,
    };
    store
        .create_streams(vec![
            new(&a, vec![event(1)]),
            new(&b, vec![event(2), event(3)]),
        ])
        .await
        .unwrap();
    let to = |s: &StreamId, expected: u32, events: Vec<NewEvent>| StreamAppend {
        stream: s.clone(),
        expected,
        events,
    };
    let appended = store
        .append_streams(vec![
            to(&b, 2, vec![event(4)]),
            to(&a, 1, vec![event(5), event(6)]),
        ])
        .await
        .unwrap();
    assert_eq!(
        appended
            .iter()
            .map(|x| x.stream_version)
            .collect::<Vec<_>>(),
        [3, 3]
    );
    assert_eq!(versions(store, &a).await, [1, 2, 3]);
    assert_eq!(versions(store, &b).await, [1, 2, 3]);

    // One stream elsewhere (behind, ahead, missing) refuses the whole write, naming it.
    for (stale, named, actual) in [
        (
            vec![to(&a, 3, vec![event(7)]), to(&b, 2, vec![event(8)])],
            &b,
            3,
        ),
        (
            vec![to(&a, 4, vec![event(7)]), to(&b, 3, vec![event(8)])],
            &a,
            3,
        ),
        (
            vec![to(&a, 3, vec![event(7)]), to(&c, 1, vec![event(8)])],
            &c,
            0,
        ),
    ] {
        match store.append_streams(stale).await {
            Err(StoreError::Conflict {
                stream, actual: at, ..
            }) => {
                assert_eq!((&stream, at), (named, actual));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(versions(store, &a).await, [1, 2, 3]);
    assert_eq!(versions(store, &b).await, [1, 2, 3]);
    assert_eq!(versions(store, &c).await, Vec::<u32>::new());

    // A stream twice, one without events or at version 0 is refused before anything is written.
    for appends in [
        vec![to(&a, 3, vec![event(9)]), to(&a, 3, vec![event(10)])],
        vec![to(&a, 3, vec![])],
        vec![to(&c, 0, vec![event(11)])],
    ] {
        assert!(matches!(
            store.append_streams(appends).await,
            Err(StoreError::InvalidAppend(_))
        ));
    }
    assert!(store.append_streams(Vec::new()).await.unwrap().is_empty());
    assert_eq!(store.head_position().await.unwrap(), 6);
}

/// A `DELETE` of every event behind the store's back, as a client of the database would send
/// it; its error (the log refuses).
async fn delete_behind_the_stores_back(db: &TestDatabase) -> String {
    match db {
        TestDatabase::Postgres { .. } => db
            .postgres_client()
            .await
            .batch_execute("DELETE FROM events")
            .await
            .expect_err("the log refuses a delete")
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default(),
        TestDatabase::Sqlite { .. } => {
            let path = db.url().trim_start_matches("sqlite://").to_owned();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute("DELETE FROM events", [])
                .expect_err("the log refuses a delete")
                .to_string()
        }
    }
}

async fn only_the_compactor_removes_events_and_only_those_it_planned(db: &TestDatabase) {
    let backend = db.open().await;
    let store = backend.events();
    let a = stream("a");
    appended(
        store,
        &a,
        ExpectedVersion::NoStream,
        vec![event(1), event(2), event(3), event(4)],
    )
    .await;
    let all = read_all_of(store, 4).await;
    let compaction = backend.compaction();
    assert_eq!(
        compaction.compaction_cursor().await.unwrap(),
        Position::START
    );
    assert_eq!(compaction.compaction_of(&a).await.unwrap(), None);

    let plan = StreamCompaction {
        stream: a.clone(),
        positions: vec![all[1].position.global, all[2].position.global],
        routine_cycles: 1,
        lifecycle_events: 0,
        through_version: 3,
        first_recorded_at: all[1].recorded_at,
        last_recorded_at: all[2].recorded_at,
    };
    let to = all[3].position;
    let now = chrono::Utc::now();
    // A compactor whose cursor is stale changes nothing.
    assert_eq!(
        compaction
            .compact(std::slice::from_ref(&plan), to, to, now)
            .await
            .unwrap(),
        None
    );
    assert_eq!(versions(store, &a).await, [1, 2, 3, 4]);
    assert_eq!(
        compaction
            .compact(std::slice::from_ref(&plan), Position::START, to, now)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(versions(store, &a).await, [1, 4]);
    assert_eq!(compaction.compaction_cursor().await.unwrap(), to);
    let record = compaction.compaction_of(&a).await.unwrap().unwrap();
    assert_eq!(
        (
            record.routine_cycles,
            record.events_removed,
            record.through_version
        ),
        (1, 2, 3)
    );
    // The stream goes on from its head; the readers see what is left, in order.
    appended(store, &a, ExpectedVersion::Exact(4), vec![event(5)]).await;
    assert_eq!(versions(store, &a).await, [1, 4, 5]);
    let left = read_all_of(store, 3).await;
    assert_eq!(
        left.iter()
            .map(|e| e.payload.to_value()["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 4, 5]
    );
    // Anything else is refused by the database itself, permits or not.
    let refused = delete_behind_the_stores_back(db).await;
    assert!(refused.contains("append-only"), "{refused}");
    assert_eq!(versions(store, &a).await, [1, 4, 5]);
}

/// A rolling upgrade: the new release migrated the database; an instance of this one (the one
/// being replaced, or one restarting meanwhile) still opens it, and sees the schema past its
/// own latest migration.
async fn a_database_migrated_by_a_newer_release_still_opens(db: &TestDatabase) {
    let backend = db.open().await;
    let future = backend.latest_migration() + 1;
    drop(backend);
    let insert = "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
                  VALUES ($1, 'a_later_release', '2026-12-05T00:00:00Z', '1')";
    match db {
        TestDatabase::Postgres { .. } => {
            let version = i32::try_from(future).unwrap();
            db.postgres_client()
                .await
                .execute(insert, &[&version])
                .await
                .unwrap();
        }
        TestDatabase::Sqlite { .. } => {
            let path = db.url().trim_start_matches("sqlite://").to_owned();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute(&insert.replace("$1", "?1"), [future]).unwrap();
        }
    }
    let backend = db.open().await;
    assert_eq!(backend.applied_migration().await.unwrap(), future);
}

/// SQLite goes on writing to a database file removed while it is open, and what it wrote is
/// gone with the process: once the file is removed (or replaced), writes and the readiness
/// check fail instead of acknowledging.
#[tokio::test]
async fn sqlite_refuses_writes_once_its_file_was_removed() {
    let db = TestDatabase::sqlite();
    let backend = db.open().await;
    let store = backend.events();
    started(store).await;
    let path = db.url().trim_start_matches("sqlite://").to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let refused = store
        .append(&stream("b"), ExpectedVersion::NoStream, vec![event(2)])
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Database(m)) if m.contains("removed or replaced")),
        "{refused:?}"
    );
    assert!(backend.applied_migration().await.is_err());
}
