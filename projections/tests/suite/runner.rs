//! The projection runner against both backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use domain::connection::{Connection, ConnectionKey, MetadataMode};
use domain::store::{ExpectedVersion, NewEvent, StreamId};
use domain::testing::TestDatabase;
use projections::model::upsert_state;
use projections::queries::{self, ConnectionFilter};
use projections::runner::Step;
use projections::{ConnectionsModel, IntegrationsModel, ReadModels, Runner};
use serde_json::json;

use crate::{fixture, settle};

domain::on_both_backends!(
    catching_up_builds_the_read_models_and_moves_the_checkpoint_to_the_head,
    an_event_written_early_by_its_command_is_not_applied_twice,
    an_unreadable_event_stops_the_projection_right_before_it_and_is_reported,
    a_rebuild_under_concurrent_reads_fails_no_read_and_ends_identical_to_the_live_model,
    deleted_connections_and_connections_of_deleted_integrations_are_hidden,
);

async fn catching_up_builds_the_read_models_and_moves_the_checkpoint_to_the_head(
    db: &TestDatabase,
) {
    let f = fixture(db).await;
    f.integration("github").await;
    for id in ["a", "b", "c"] {
        f.connection("github", id).await;
    }
    let runner = Runner::new(&f.backend).with_batch_size(2);
    settle(&runner).await;

    let listed = queries::list_connections(&f.read_models, &ConnectionFilter::default())
        .await
        .unwrap();
    // Newest first.
    let ids: Vec<_> = listed.iter().map(|c| c.connection_id.as_str()).collect();
    assert_eq!(ids, ["c", "b", "a"]);
    let found = f.find("github", "b").await.unwrap();
    assert_eq!(found.connection.connection_id, "b");
    assert_eq!(found.version, 1);
    let integration = f.find_integration("github").await.unwrap();
    assert_eq!(integration.integration.settings.oauth_client_id, "client");

    let status = runner.status().await.unwrap();
    assert_eq!(status.len(), 2);
    for s in &status {
        assert_eq!(s.checkpoint_position, s.head_position, "{s:?}");
        assert_eq!(s.lag, 0);
        assert!(s.caught_up, "{s:?}");
        assert!(s.last_error.is_none());
    }
    // Nothing more to do.
    assert_eq!(runner.run_once().await.unwrap(), 0);
}

async fn an_event_written_early_by_its_command_is_not_applied_twice(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "a").await;
    let runner = Runner::new(&f.backend);
    settle(&runner).await;

    // A merge applied by the command itself (read-your-writes) and later by the runner: applying
    // it twice would not show here, so use a merge whose second application is visible: the
    // version number must stay the stream's.
    let loaded = f
        .commands
        .set_metadata(
            &ConnectionKey::new("github", "a"),
            json!({"n": 1}),
            MetadataMode::Merge,
            Utc::now(),
        )
        .await
        .unwrap();
    upsert_state::<ConnectionsModel>(
        &f.read_models,
        loaded.stream_id.as_str(),
        loaded.version,
        &loaded.state,
    )
    .await
    .unwrap();
    let early = f.find("github", "a").await.unwrap();
    assert_eq!(early.version, 2);
    assert_eq!(early.connection.metadata.get("n"), Some(&json!(1)));

    // An older state arriving late (a slow request) does not move the row back.
    let Connection::Active(_) = &loaded.state else {
        panic!("active")
    };
    let stale = f
        .commands
        .load_connection(&ConnectionKey::new("github", "a"))
        .await
        .unwrap();
    let mut older = stale.state.clone();
    if let Connection::Active(active) = &mut older {
        active.metadata.clear();
    }
    upsert_state::<ConnectionsModel>(&f.read_models, stale.stream_id.as_str(), 1, &older)
        .await
        .unwrap();

    settle(&runner).await;
    let after = f.find("github", "a").await.unwrap();
    assert_eq!(after.version, 2);
    assert_eq!(after.connection, early.connection);
}

async fn an_unreadable_event_stops_the_projection_right_before_it_and_is_reported(
    db: &TestDatabase,
) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "a").await;
    let store = f.backend.events();
    let bad_stream = StreamId::new("connection", uuid::Uuid::new_v4());
    let bad = store
        .append(
            &bad_stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("FromTheFuture", 7, json!({}))],
        )
        .await
        .unwrap()
        .global_positions[0];
    f.connection("github", "b").await;

    let runner = Runner::new(&f.backend);
    let mut error = None;
    for _ in 0..300 {
        match runner.step::<ConnectionsModel>().await {
            Ok(Step::Idle | Step::Busy) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(Step::Applied(_)) => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("the projection stopped at the unreadable event");
    assert!(
        error
            .to_string()
            .contains(&format!("global position {bad}")),
        "{error}"
    );
    // Again and again at the same place: never skipped.
    assert!(runner.step::<ConnectionsModel>().await.is_err());

    let status = runner.status().await.unwrap();
    let connections = status.iter().find(|s| s.name == "connections").unwrap();
    assert!(connections.checkpoint_position < bad, "{connections:?}");
    assert!(
        connections
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("FromTheFuture")
    );
    // What came before is there, what comes after is not (the runner did not skip ahead).
    assert!(f.find("github", "a").await.is_some());
    assert!(f.find("github", "b").await.is_none());
    // The integrations projection does not read connection events and is not held up.
    for _ in 0..300 {
        if runner.step::<IntegrationsModel>().await.unwrap() == Step::Idle {
            break;
        }
    }
    assert!(f.find_integration("github").await.is_some());
}

async fn a_rebuild_under_concurrent_reads_fails_no_read_and_ends_identical_to_the_live_model(
    db: &TestDatabase,
) {
    let f = fixture(db).await;
    f.integration("github").await;
    let count = 60;
    for n in 0..count {
        f.connection("github", &format!("c{n}")).await;
        if n % 3 == 0 {
            let (id, metadata) = (format!("c{n}"), json!({"n": n}));
            f.metadata("github", &id, metadata, MetadataMode::Replace)
                .await;
        }
    }
    f.commands
        .delete_connection(&ConnectionKey::new("github", "c1"), Utc::now())
        .await
        .unwrap();
    // Streams touched again long after they began: the rebuild, holding 8 states at most, has
    // written them out by then, folds these onto their rows and takes their states back in; the
    // new connections between the rounds give the writer time to hand them back.
    let mut created = count;
    for round in 0..4 {
        for n in (2..count).step_by(5) {
            let (id, metadata) = (format!("c{n}"), json!({"round": round}));
            f.metadata("github", &id, metadata, MetadataMode::Merge)
                .await;
        }
        for n in 0..15 {
            f.connection("github", &format!("r{round}-{n}")).await;
            created += 1;
        }
    }
    // Created and deleted while the rebuild still holds its state.
    f.connection("github", "brief").await;
    f.commands
        .delete_connection(&ConnectionKey::new("github", "brief"), Utc::now())
        .await
        .unwrap();
    let runner = Runner::new(&f.backend)
        .with_batch_size(7)
        .with_resident_states(8);
    settle(&runner).await;
    let before = snapshot(&f.read_models).await;
    assert_eq!(before.len(), created - 1);
    let deleted_before = deleted_rows(db).await;
    let mut ids: Vec<&str> = deleted_before.iter().map(|row| row.1.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["brief", "c1"]);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (read_models, stop, reads) = (f.read_models.clone(), stop.clone(), reads.clone());
        readers.push(tokio::spawn(async move {
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c{}", (n % (count - 2)) + 2);
                let found =
                    queries::find_connection(&read_models, &ConnectionKey::new("github", &id))
                        .await;
                assert!(
                    matches!(found, Ok(Some(_))),
                    "read of {id} failed during the rebuild: {found:?}"
                );
                let listed = queries::list_connections(&read_models, &ConnectionFilter::default())
                    .await
                    .unwrap();
                assert_eq!(listed.len(), created - 1);
                reads.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    // The live runner keeps running beside the rebuild.
    let live = {
        let runner = runner.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                runner.run_once().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut progress = Vec::new();
    let replayed = runner
        .rebuild("connections", |n| progress.push(n))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    live.await.unwrap();

    assert!(replayed as usize >= count, "replayed {replayed}");
    assert!(!progress.is_empty());
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(
        snapshot(&f.read_models).await,
        before,
        "the rebuilt model equals the live one"
    );
    assert_eq!(deleted_rows(db).await, deleted_before, "deleted rows too");
    settle(&runner).await;
    // The rebuilt model keeps following the log.
    f.connection("github", "late").await;
    settle(&runner).await;
    assert!(f.find("github", "late").await.is_some());
    assert!(matches!(
        runner.rebuild("nonsense", |_| {}).await,
        Err(projections::ProjectionError::UnknownProjection(_))
    ));
}

/// A rebuild does not swap in a table missing events that were committed before it started but
/// that a long-running transaction elsewhere keeps below PostgreSQL's horizon: it waits for
/// them (a table swapped in without them would answer 404 for live connections).
#[tokio::test]
async fn a_rebuild_waits_for_committed_events_held_behind_an_open_transaction() {
    let db = TestDatabase::postgres().await;
    let f = fixture(&db).await;
    f.integration("github").await;
    f.connection("github", "early").await;
    let runner = Runner::new(&f.backend);
    settle(&runner).await;

    // An open transaction with an xid: events committed after it are not readable yet.
    let blocker = db.hold_horizon().await;
    for id in ["held1", "held2"] {
        f.connection("github", id).await;
    }

    let rebuilding = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.rebuild("connections", |_| {}).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let replayed = rebuilding.await.unwrap().unwrap();

    assert!(replayed >= 4, "replayed {replayed}");
    let listed = queries::list_connections(&f.read_models, &ConnectionFilter::default())
        .await
        .unwrap();
    let mut ids: Vec<_> = listed.iter().map(|c| c.connection_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["early", "held1", "held2"]);
}

/// On PostgreSQL the shadow loads without its secondary indexes and builds them before the
/// swap. The live table keeps the same indexes under the same names across rebuilds, including
/// after a rebuild that stopped half way and left indexes of its own on the shadow; between
/// rebuilds the shadow has the same indexes (so an earlier build's rebuild, which fills the
/// shadow as it is, still swaps in an indexed table).
#[tokio::test]
async fn on_postgres_a_rebuild_keeps_the_live_tables_indexes_and_their_names() {
    let db = TestDatabase::postgres().await;
    let f = fixture(&db).await;
    f.integration("github").await;
    for n in 0..5 {
        f.connection("github", &format!("c{n}")).await;
    }
    let runner = Runner::new(&f.backend);
    settle(&runner).await;
    let client = db.postgres_client().await;
    let indexes = |table: &'static str| {
        let client = &client;
        async move {
            let mut found: Vec<(String, String)> = client
                .query(
                    "SELECT indexname::text, indexdef FROM pg_indexes WHERE tablename = $1",
                    &[&table],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get::<_, String>(1)
                            .replace(&format!(" ON public.{table} "), " ON t "),
                    )
                })
                .filter(|(name, _): &(String, String)| !name.ends_with("_pkey"))
                .collect();
            found.sort();
            found
        }
    };
    let live = indexes("connections").await;
    assert!(live.len() >= 5, "{live:?}");
    let mut copies: Vec<(String, String)> = live
        .iter()
        .map(|(name, definition)| {
            (
                format!("{name}_rebuilt"),
                definition.replacen(
                    &format!("INDEX {name} "),
                    &format!("INDEX {name}_rebuilt "),
                    1,
                ),
            )
        })
        .collect();
    copies.sort();
    let before = snapshot(&f.read_models).await;

    runner.rebuild("connections", |_| {}).await.unwrap();
    assert_eq!(indexes("connections").await, live);
    assert_eq!(indexes("connections_shadow").await, copies);

    // What a rebuild that stopped while building indexes leaves behind: some, and others.
    client
        .batch_execute(
            "DROP INDEX connections_by_search_rebuilt; \
             CREATE INDEX stray ON connections_shadow (connection_id)",
        )
        .await
        .unwrap();
    runner.rebuild("connections", |_| {}).await.unwrap();
    assert_eq!(indexes("connections").await, live);
    assert_eq!(indexes("connections_shadow").await, copies);
    assert_eq!(snapshot(&f.read_models).await, before);
}

/// Every live connection's (id, version, state), sorted.
/// The deleted connections' rows: key, id, provider and creation time, as the table has them.
async fn deleted_rows(db: &TestDatabase) -> Vec<(String, String, String, String)> {
    let sql = "SELECT provider_config_key, connection_id, provider, CAST(created_at AS TEXT) \
               FROM connections WHERE deleted_at IS NOT NULL ORDER BY stream_id";
    match db {
        TestDatabase::Postgres { .. } => db
            .postgres_client()
            .await
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect(),
        TestDatabase::Sqlite { .. } => {
            let path = db.url().trim_start_matches("sqlite://").to_owned();
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut statement = conn.prepare(sql).unwrap();
            statement
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        }
    }
}

async fn snapshot(read_models: &ReadModels) -> Vec<(String, u32, String)> {
    let mut rows = Vec::new();
    for summary in queries::list_connections(read_models, &ConnectionFilter::default())
        .await
        .unwrap()
    {
        let record = queries::find_connection(
            read_models,
            &ConnectionKey::new(&summary.provider_config_key, &summary.connection_id),
        )
        .await
        .unwrap()
        .unwrap();
        rows.push((
            summary.connection_id,
            record.version,
            serde_json::to_string(&record.connection).unwrap(),
        ));
    }
    rows.sort();
    rows
}

async fn deleted_connections_and_connections_of_deleted_integrations_are_hidden(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.integration("gitlab").await;
    f.connection("github", "a").await;
    f.connection("github", "b").await;
    f.connection("gitlab", "a").await;
    f.commands
        .delete_connection(&ConnectionKey::new("github", "b"), Utc::now())
        .await
        .unwrap();
    f.commands
        .delete_integration("gitlab", Utc::now())
        .await
        .unwrap();
    let runner = Runner::new(&f.backend);
    settle(&runner).await;
    let listed = queries::list_connections(&f.read_models, &ConnectionFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].provider_config_key.as_str(),
            listed[0].connection_id.as_str()
        ),
        ("github", "a")
    );
    assert!(f.find("github", "b").await.is_none());
    assert!(f.find_integration("gitlab").await.is_none());
    assert_eq!(
        queries::list_connections(
            &f.read_models,
            &ConnectionFilter {
                connection_id: Some("a".into()),
                ..ConnectionFilter::default()
            }
        )
        .await
        .unwrap()
        .len(),
        1
    );
    assert_eq!(
        queries::list_connections_of(&f.read_models, "github")
            .await
            .unwrap(),
        vec!["a".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_checkpoint_claimed_by_another_runner_is_skipped_not_waited_for() {
    let db = TestDatabase::postgres().await;
    let f = fixture(&db).await;
    f.integration("github").await;
    f.connection("github", "a").await;
    // Another instance's runner in the middle of a batch holds the checkpoint row.
    let mut client = db.postgres_client().await;
    let other = client.transaction().await.unwrap();
    other
        .query_one(
            "SELECT global_position FROM projection_checkpoints WHERE name = 'connections' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let runner = Runner::new(&f.backend);
    // Idle while another test's open transaction hides the events (the xid8 horizon is the
    // whole cluster's); once they show, the claimed checkpoint makes the step busy at once.
    let step = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match runner.step::<ConnectionsModel>().await.unwrap() {
                Step::Idle => tokio::time::sleep(Duration::from_millis(20)).await,
                other => return other,
            }
        }
    })
    .await
    .expect("the runner does not block on a claimed checkpoint");
    assert_eq!(step, Step::Busy);
    other.rollback().await.unwrap();
    settle(&runner).await;
    assert!(f.find("github", "a").await.is_some());
}

/// Two writers at once, as `grantline import` writes its batches: the last event in commit
/// order sits below the highest position, so the checkpoint never reaches the head. The status
/// still says when everything is applied (an import that waited for checkpoint = head waited
/// forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_is_caught_up_when_the_last_event_in_commit_order_is_below_the_head() {
    let db = TestDatabase::postgres().await;
    let f = fixture(&db).await;
    f.integration("github").await;
    let mut client = db.postgres_client().await;
    let first = client.transaction().await.unwrap();
    let insert = "INSERT INTO events (stream_id, stream_version, event_id, event_type, \
                  event_version, payload) VALUES ($1, 1, gen_random_uuid(), 'TestEvent', 1, '{}')";
    first.execute(insert, &[&"test-a"]).await.unwrap();
    f.connection("github", "between").await;
    first.execute(insert, &[&"test-b"]).await.unwrap();
    first.commit().await.unwrap();

    let runner = Runner::new(&f.backend);
    settle(&runner).await;
    let status = runner.status().await.unwrap();
    for s in &status {
        assert!(s.caught_up, "{s:?}");
        assert!(s.checkpoint_position < s.head_position, "{s:?}");
    }
    assert!(f.find("github", "between").await.is_some());
}
