//! Ordering proofs: a reader following the log never skips an event, even when transactions
//! commit out of position order.

use std::collections::BTreeSet;
use std::time::Duration;

use grantline_domain::store::{
    EventStore, ExpectedVersion, LogReader, NewEvent, Position, StreamId,
};
use grantline_domain::testing::TestDatabase;
use serde_json::json;
use tokio_postgres::NoTls;

fn event(n: u64) -> NewEvent {
    NewEvent::new("TestEvent", 1, json!({ "n": n }))
}

/// Starts the stream `test-{n}` with the event `n`.
async fn start_stream(store: &dyn EventStore, n: u64) {
    let stream = StreamId::new("test", n);
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(n)])
        .await
        .unwrap();
}

async fn read_to_end(reader: &mut LogReader) -> Vec<i64> {
    let mut seen = Vec::new();
    loop {
        let batch = reader.next_batch().await.unwrap();
        if batch.is_empty() {
            return seen;
        }
        seen.extend(batch.iter().map(|e| e.position.global));
    }
}

const HELD_INSERT: &str = "INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload) \
     VALUES ($1, 1, gen_random_uuid(), 'TestEvent', 1, '{\"n\": 0}') RETURNING global_position";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_skips_an_append_that_commits_after_later_positions() {
    let db = TestDatabase::postgres().await;
    let backend = db.open().await;
    let store = backend.events();

    // An append that takes the first position and then stays open.
    let mut client = db.postgres_client().await;
    let held = client.transaction().await.unwrap();
    let held_position: i64 = held
        .query_one(HELD_INSERT, &[&"test-held"])
        .await
        .unwrap()
        .get(0);

    // Twenty later appends commit first, with higher positions.
    for n in 1..=20u64 {
        start_stream(store, n).await;
    }

    // A naive reader that follows global_position alone sees the twenty and moves past the hole.
    let naive_seen = naive_positions_after(&db, 0).await;
    assert_eq!(naive_seen.len(), 20);
    let naive_checkpoint = *naive_seen.iter().max().unwrap();

    // The store's reader does not pass the open transaction.
    let mut reader = LogReader::new(backend.event_store(), Position::START, 7);
    assert!(
        read_to_end(&mut reader).await.is_empty(),
        "read past an open transaction"
    );

    held.commit().await.unwrap();

    // Other tests' transactions on this server can hold the horizon back for a moment: the reader
    // may lag, but it must not skip.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 21 && tokio::time::Instant::now() < deadline {
        seen.extend(read_to_end(&mut reader).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.len(), 21, "every event exactly once");
    assert_eq!(
        seen[0], held_position,
        "the late commit comes first in commit order"
    );
    assert_eq!(seen.iter().copied().collect::<BTreeSet<_>>().len(), 21);
    // The naive reader, resuming from its checkpoint, would never see the held event.
    assert!(
        naive_positions_after(&db, naive_checkpoint)
            .await
            .is_empty()
    );
}

/// Two batches written at once, as an import writes them: the first transaction takes a
/// position, the second commits one after it, then the first takes another. In commit order
/// the second transaction's event comes last, below the highest position: a reader that has
/// read everything stops below the head, and only `committed_after` says it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_event_in_commit_order_may_sit_below_the_head_and_a_reader_there_is_done() {
    let db = TestDatabase::postgres().await;
    let backend = db.open().await;
    let store = backend.events();

    let mut client = db.postgres_client().await;
    let first = client.transaction().await.unwrap();
    first
        .query_one(HELD_INSERT, &[&"test-first-a"])
        .await
        .unwrap();
    start_stream(store, 1).await;
    let head: i64 = first
        .query_one(HELD_INSERT, &[&"test-first-b"])
        .await
        .unwrap()
        .get(0);
    // The append in between is committed; the open transaction's rows are not.
    assert!(store.committed_after(Position::START, head).await.unwrap());
    first.commit().await.unwrap();

    let mut reader = LogReader::new(backend.event_store(), Position::START, 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen.len() < 3 && tokio::time::Instant::now() < deadline {
        seen.extend(read_to_end(&mut reader).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let end = reader.position();
    assert!(
        end.global < head,
        "the last in commit order is {end}, the head {head}"
    );
    assert_eq!(store.head_position().await.unwrap(), head);
    assert!(!store.committed_after(end, head).await.unwrap());
    // After the first transaction's two events, the committed append is still ahead.
    let mut short = LogReader::new(backend.event_store(), Position::START, 2);
    short.next_batch().await.unwrap();
    assert!(store.committed_after(short.position(), head).await.unwrap());
}

async fn naive_positions_after(db: &TestDatabase, after: i64) -> Vec<i64> {
    db.postgres_client()
        .await
        .query(
            "SELECT global_position FROM events WHERE global_position > $1 ORDER BY 1",
            &[&after],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_every_event_while_writers_commit_in_random_order() {
    let db = TestDatabase::postgres().await;
    let backend = db.open().await;
    let writers = 8;
    let per_writer = 15;

    let mut handles = Vec::new();
    for w in 0..writers {
        let url = db.url().to_owned();
        handles.push(tokio::spawn(async move {
            let (mut client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(connection);
            for i in 0..per_writer {
                let tx = client.transaction().await.unwrap();
                tx.query_one(HELD_INSERT, &[&format!("test-{w}-{i}")])
                    .await
                    .unwrap();
                // Hold each transaction a different while, so commits overtake each other.
                let pause = ((w * 7 + i * 13) % 23) as f64 / 1000.0;
                tx.execute("SELECT pg_sleep($1)", &[&pause]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }

    let mut reader = LogReader::new(backend.event_store(), Position::START, 5);
    let mut seen = Vec::new();
    let total = writers * per_writer;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < total && tokio::time::Instant::now() < deadline {
        seen.extend(read_to_end(&mut reader).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for handle in handles {
        handle.await.unwrap();
    }
    seen.extend(read_to_end(&mut reader).await);

    let all = naive_positions_after(&db, 0).await;
    assert_eq!(all.len(), total);
    let distinct: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "an event was read twice");
    assert_eq!(
        distinct,
        all.into_iter().collect::<BTreeSet<_>>(),
        "an event was skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_held_write_transaction_holds_back_later_appends_and_nothing_is_skipped() {
    let db = TestDatabase::sqlite();
    let backend = db.open().await;
    let store = backend.events();
    start_stream(store, 0).await;

    let path = db.url().trim_start_matches("sqlite://").to_owned();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut conn = rusqlite::Connection::open(path).unwrap();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, event_version, payload, recorded_at) \
             VALUES ('test-held', 1, ?1, 'TestEvent', 1, '{}', 0)",
            [uuid::Uuid::new_v4().to_string()],
        )
        .unwrap();
        let position = tx.last_insert_rowid();
        locked_tx.send(position).unwrap();
        release_rx.recv().unwrap();
        tx.commit().unwrap();
    });
    let held_position = locked_rx.recv().unwrap();

    let writer = backend.clone();
    let later = tokio::spawn(async move {
        for n in 1..=5u64 {
            start_stream(writer.events(), n).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reader = LogReader::new(backend.event_store(), Position::START, 3);
    let before = read_to_end(&mut reader).await;
    assert_eq!(
        before.len(),
        1,
        "only the event committed before the held transaction"
    );
    assert!(
        !later.is_finished(),
        "later appends wait for the held transaction"
    );

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    later.await.unwrap();
    let after = read_to_end(&mut reader).await;
    assert_eq!(
        after.len(),
        6,
        "the held event and the five that waited for it"
    );
    assert_eq!(after[0], held_position);
}
