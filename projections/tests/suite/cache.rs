//! The in-memory replica of the connections read model, against both backends.

use std::time::Duration;

use domain::connection::ConnectionKey;
use domain::testing::TestDatabase;
use projections::cache::ConnectionCache;
use projections::{Runner, queries};

use crate::{fixture, settle};

domain::on_both_backends!(
    the_replica_stays_within_its_capacity_and_counts_what_it_evicts,
    an_invalidated_or_expired_entry_is_read_again_from_the_read_model,
    an_expired_entry_found_unchanged_keeps_what_was_derived_from_it,
    a_miss_reads_the_credentials_data_key_with_the_row,
    concurrent_misses_each_get_their_own_row_and_key,
);

const LONG: Duration = Duration::from_secs(3600);

async fn the_replica_stays_within_its_capacity_and_counts_what_it_evicts(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    for n in 0..20 {
        f.connection("github", &format!("c{n}")).await;
    }
    settle(&Runner::new(&f.backend)).await;
    let cache: ConnectionCache = ConnectionCache::new(LONG, 4);
    for round in 0..3 {
        for n in 0..20 {
            let key = ConnectionKey::new("github", format!("c{n}"));
            let found = cache.find(&f.read_models, &key).await.unwrap().unwrap();
            assert_eq!(
                found.record.connection.connection_id,
                format!("c{n}"),
                "{round}"
            );
        }
    }
    let stats = cache.stats();
    assert!(stats.entries <= stats.capacity, "{stats:?}");
    assert!(stats.capacity < 20, "{stats:?}");
    assert_eq!(stats.hits + stats.misses, 60, "{stats:?}");
    assert!(stats.evictions >= 40, "{stats:?}");
    // The same connection again: from memory.
    let key = ConnectionKey::new("github", "c19");
    let before = cache.stats();
    cache.find(&f.read_models, &key).await.unwrap().unwrap();
    assert_eq!(cache.stats().hits, before.hits + 1);
    assert_eq!(cache.stats().evictions, before.evictions);
    // Unknown connections are not cached.
    let missing = ConnectionKey::new("github", "nobody");
    assert!(
        cache
            .find(&f.read_models, &missing)
            .await
            .unwrap()
            .is_none()
    );
    assert!(cache.stats().entries <= stats.capacity);
}

async fn an_invalidated_or_expired_entry_is_read_again_from_the_read_model(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "a").await;
    settle(&Runner::new(&f.backend)).await;
    let cache: ConnectionCache = ConnectionCache::new(LONG, 100);
    let key = ConnectionKey::new("github", "a");
    let first = cache.find(&f.read_models, &key).await.unwrap().unwrap();
    assert_eq!(cache.stats().misses, 1);
    // Re-authorized: the log names the stream, and the entry for the key goes.
    f.connection("github", "a").await;
    settle(&Runner::new(&f.backend)).await;
    cache.invalidate(key.stream_id().as_str());
    assert_eq!(cache.stats().entries, 0);
    let second = cache.find(&f.read_models, &key).await.unwrap().unwrap();
    assert_eq!(cache.stats().misses, 2);
    assert!(second.record.version > first.record.version);
    assert_eq!(
        second.record.version,
        queries::find_connection(&f.read_models, &key)
            .await
            .unwrap()
            .unwrap()
            .version
    );
    // Expired: read again, and the reload replaces the entry without counting an eviction.
    let brief: ConnectionCache = ConnectionCache::new(Duration::ZERO, 100);
    brief.find(&f.read_models, &key).await.unwrap();
    brief.find(&f.read_models, &key).await.unwrap();
    let stats = brief.stats();
    assert_eq!((stats.misses, stats.evictions, stats.entries), (2, 0, 1));
    // Cleared: everything goes.
    cache.clear();
    assert_eq!(cache.stats().entries, 0);
}

async fn an_expired_entry_found_unchanged_keeps_what_was_derived_from_it(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "a").await;
    settle(&Runner::new(&f.backend)).await;
    let brief: ConnectionCache<std::sync::OnceLock<u32>> =
        ConnectionCache::new(Duration::ZERO, 100);
    let key = ConnectionKey::new("github", "a");
    let first = brief.find(&f.read_models, &key).await.unwrap().unwrap();
    first.derived.set(7).unwrap();
    // Expired, read again, unchanged: the same entry, with what was derived from it.
    let again = brief.find(&f.read_models, &key).await.unwrap().unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    assert_eq!(again.derived.get(), Some(&7));
    assert_eq!(brief.stats().misses, 2);
    // Changed in the read model (without this cache hearing of it): a new entry, derived anew.
    f.connection("github", "a").await;
    settle(&Runner::new(&f.backend)).await;
    let changed = brief.find(&f.read_models, &key).await.unwrap().unwrap();
    assert!(changed.record.version > first.record.version);
    assert_eq!(changed.derived.get(), None);
    assert_eq!(brief.stats().entries, 1);
}

domain::on_postgres_only!(
    while_the_database_is_away_an_expired_entry_is_still_served,
    a_miss_finds_the_data_key_by_the_rows_column_and_without_it,
);

/// An expired entry whose reload fails because the database cannot be reached is served as it
/// is (nothing can be committed meanwhile); an entry never loaded is still an error.
async fn while_the_database_is_away_an_expired_entry_is_still_served(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "kept").await;
    f.connection("github", "never-read").await;
    settle(&Runner::new(&f.backend)).await;
    let cache: ConnectionCache = ConnectionCache::new(Duration::from_millis(50), 100);
    let kept = ConnectionKey::new("github", "kept");
    cache.find(&f.read_models, &kept).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let TestDatabase::Postgres { name, .. } = db else {
        unreachable!("PostgreSQL only");
    };
    let (admin, connection) =
        tokio_postgres::connect(&domain::testing::admin_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();

    let served = cache.find(&f.read_models, &kept).await.unwrap().unwrap();
    assert_eq!(served.record.connection.connection_id, "kept");
    let never = ConnectionKey::new("github", "never-read");
    assert!(cache.find(&f.read_models, &never).await.is_err());
    // Misses at once (fetched together on PostgreSQL) each get the error; none waits forever.
    let misses = (0..20).map(|_| cache.find(&f.read_models, &never));
    let failed = tokio::time::timeout(LONG, futures_util::future::join_all(misses))
        .await
        .expect("every miss is answered");
    assert!(failed.iter().all(Result::is_err));

    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
}

async fn a_miss_reads_the_credentials_data_key_with_the_row(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "c1").await;
    settle(&Runner::new(&f.backend)).await;
    let cache: ConnectionCache = ConnectionCache::new(LONG, 16);
    let key = ConnectionKey::new("github", "c1");
    let (found, data_key) = cache
        .find_keyed(&f.read_models, &key)
        .await
        .unwrap()
        .unwrap();
    let data_key = data_key.expect("a miss brings the data key");
    let sealed_under = found.record.connection.credentials.key_id;
    assert_eq!(data_key.key_id, sealed_under);
    assert_eq!(
        Some(data_key),
        f.backend.keys().data_key(sealed_under).await.unwrap(),
        "as the key store holds it"
    );
    // A hit brings none: the caller needs none.
    let (_, again) = cache
        .find_keyed(&f.read_models, &key)
        .await
        .unwrap()
        .unwrap();
    assert!(again.is_none());
    // Primed from it, the vault opens the credentials.
    f.commands.vault().clear_cache();
    let (_, stored) = ConnectionCache::<()>::new(LONG, 16)
        .find_keyed(&f.read_models, &key)
        .await
        .unwrap()
        .unwrap();
    f.commands.vault().prime(&stored.unwrap());
    f.commands
        .reveal_credentials(&found.record.connection)
        .await
        .unwrap();
}

/// Many misses at once, some for the same connection and some for none: each gets its own row
/// with its own data key (on PostgreSQL they are fetched together, [`ReadModelStore`]'s
/// `find_connection`).
async fn concurrent_misses_each_get_their_own_row_and_key(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    for n in 0..30 {
        f.connection("github", &format!("c{n}")).await;
    }
    settle(&Runner::new(&f.backend)).await;
    let read_models = &f.read_models;
    let asked: Vec<String> = (0..300).map(|i| format!("c{}", (i * 7) % 40)).collect();
    let misses = asked.iter().map(|id| async move {
        let key = ConnectionKey::new("github", id.as_str());
        queries::find_connection_keyed(read_models, &key.stream_id()).await
    });
    let found = futures_util::future::join_all(misses).await;
    for (id, found) in asked.iter().zip(found) {
        let n: usize = id[1..].parse().unwrap();
        match found.unwrap() {
            Some(queries::KeyedConnection {
                record,
                data_key: key,
                ..
            }) => {
                assert!(n < 30, "{id} was never created");
                assert_eq!(&record.connection.connection_id, id);
                let key = key.expect("its data key comes with it");
                assert_eq!(key.key_id, record.connection.credentials.key_id, "{id}");
            }
            None => assert!(n >= 30, "{id} was created"),
        }
    }
}

/// A live connection's row names the data key of its credentials in a column of its own, which
/// a miss joins on; a row written before that column (NULL there) still brings its key.
async fn a_miss_finds_the_data_key_by_the_rows_column_and_without_it(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("github").await;
    f.connection("github", "c1").await;
    settle(&Runner::new(&f.backend)).await;
    let key = ConnectionKey::new("github", "c1");
    let pg = db.postgres_client().await;
    let column = "SELECT data_key_id FROM connections WHERE stream_id = $1";
    let stream_id = key.stream_id().as_str().to_owned();

    let (sealed_under, brought) = missed_key(&f, &key).await;
    let stored: Option<uuid::Uuid> = pg.query_one(column, &[&stream_id]).await.unwrap().get(0);
    assert_eq!(stored, Some(sealed_under));
    assert_eq!(brought, sealed_under);

    pg.execute("UPDATE connections SET data_key_id = NULL", &[])
        .await
        .unwrap();
    let stored: Option<uuid::Uuid> = pg.query_one(column, &[&stream_id]).await.unwrap().get(0);
    assert_eq!(stored, None);
    let (sealed_under, brought) = missed_key(&f, &key).await;
    assert_eq!(brought, sealed_under, "found through the state");
}

/// What a miss of `key` in a new replica finds: the data key its credentials name, and the data
/// key it brings.
async fn missed_key(f: &crate::Fixture, key: &ConnectionKey) -> (uuid::Uuid, uuid::Uuid) {
    let (found, data_key) = ConnectionCache::<()>::new(LONG, 16)
        .find_keyed(&f.read_models, key)
        .await
        .unwrap()
        .unwrap();
    let brought = data_key.expect("a miss brings the data key").key_id;
    (found.record.connection.credentials.key_id, brought)
}
