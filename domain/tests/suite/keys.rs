//! Envelope encryption on both backends: no plaintext at rest, crypto-shredding, key checks,
//! rotation.

use grantline_domain::keys::{KeyError, MasterKey, Vault};
use grantline_domain::store::{Backend, ExpectedVersion, NewEvent, StreamId};
use grantline_domain::testing::TestDatabase;
use serde_json::json;

use crate::{new_vault, open_vault, reopen_vault};

grantline_domain::on_both_backends!(
    no_plaintext_token_is_stored_anywhere_in_the_database,
    a_destroyed_data_key_leaves_the_sealed_secret_unrecoverable_even_with_the_master_key,
    a_wrong_master_key_is_refused_when_the_vault_opens,
    rotation_rewraps_data_keys_and_old_events_still_decrypt,
    data_keys_under_an_unconfigured_master_key_stop_the_vault_from_opening,
    a_small_key_cache_stays_within_its_capacity_and_every_secret_still_opens,
);

const TOKEN: &str = "gho_ThisIsAPlaintextAccessToken0123456789";

async fn store_token(
    backend: &Backend,
    vault: &Vault,
    owner: &StreamId,
) -> grantline_domain::keys::Sealed {
    let key_id = vault.create_data_key(owner).await.unwrap();
    let sealed = vault
        .seal_json(key_id, &json!({ "access_token": TOKEN }))
        .await
        .unwrap();
    backend
        .events()
        .append(
            owner,
            ExpectedVersion::Any,
            vec![NewEvent::new(
                "TestSealed",
                1,
                serde_json::to_value(&sealed).unwrap(),
            )],
        )
        .await
        .unwrap();
    sealed
}

async fn no_plaintext_token_is_stored_anywhere_in_the_database(db: &TestDatabase) {
    let backend = db.open().await;
    let (vault, master_b64) = new_vault(&backend).await;
    let sealed = store_token(&backend, &vault, &StreamId::new("connection", "x")).await;
    let opened: serde_json::Value = vault.unseal_json(&sealed).await.unwrap();
    assert_eq!(opened["access_token"], TOKEN);

    let dump = dump_database(db, &backend).await;
    assert!(dump.len() > 1000, "the dump has the database's content");
    assert!(
        dump.contains("TestSealed"),
        "the dump reaches the event rows"
    );
    assert!(!dump.contains(TOKEN), "plaintext token at rest");
    assert!(!dump.contains(master_b64.as_str()), "master key at rest");
}

/// Everything the database holds, as text: every row of every table on PostgreSQL; the raw bytes
/// of the database file and its WAL on SQLite.
async fn dump_database(db: &TestDatabase, backend: &Backend) -> String {
    match backend {
        Backend::Postgres(_) => {
            let client = db.postgres_client().await;
            let tables = client
                .query(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                    &[],
                )
                .await
                .unwrap();
            let mut dump = String::new();
            for table in tables {
                let name: String = table.get(0);
                for row in client
                    .query(&format!("SELECT row_to_json(t)::text FROM {name} t"), &[])
                    .await
                    .unwrap()
                {
                    dump.push_str(&row.get::<_, String>(0));
                    dump.push('\n');
                }
            }
            dump
        }
        Backend::Sqlite(_) => {
            let path = db.url().trim_start_matches("sqlite://");
            let mut bytes = std::fs::read(path).unwrap();
            bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

async fn a_destroyed_data_key_leaves_the_sealed_secret_unrecoverable_even_with_the_master_key(
    db: &TestDatabase,
) {
    let backend = db.open().await;
    let (vault, master_b64) = new_vault(&backend).await;
    let owner = StreamId::new("connection", "doomed");
    let keep = StreamId::new("connection", "kept");
    let sealed = store_token(&backend, &vault, &owner).await;
    let kept = store_token(&backend, &vault, &keep).await;

    assert_eq!(vault.destroy(&owner).await.unwrap(), 1);
    assert!(matches!(
        vault.unseal(&sealed).await,
        Err(KeyError::Shredded(_))
    ));

    // An operator with the database and the master key, in a fresh process: still nothing.
    let operator = reopen_vault(db, &master_b64).await;
    assert!(matches!(
        operator.unseal(&sealed).await,
        Err(KeyError::Shredded(_))
    ));
    assert!(
        operator.unseal(&kept).await.is_ok(),
        "other owners are untouched"
    );
    // The event that carried it is still in the log.
    assert_eq!(
        backend.events().read_stream(&owner, 0).await.unwrap().len(),
        1
    );
}

async fn a_wrong_master_key_is_refused_when_the_vault_opens(db: &TestDatabase) {
    let backend = db.open().await;
    let (right, _) = MasterKey::generate();
    let right_id = right.id().to_owned();
    open_vault(&backend, right, None).await;
    let (wrong, _) = MasterKey::generate();
    let err = Vault::open(backend.key_repository(), wrong, None)
        .await
        .unwrap_err();
    match err {
        KeyError::WrongMasterKey { active, .. } => assert_eq!(active, right_id),
        other => panic!("expected WrongMasterKey, got {other:?}"),
    }
}

async fn rotation_rewraps_data_keys_and_old_events_still_decrypt(db: &TestDatabase) {
    let backend = db.open().await;
    let (old, old_b64) = MasterKey::generate();
    let vault = open_vault(&backend, old.clone(), None).await;
    let mut sealed = Vec::new();
    for n in 0..5 {
        sealed.push(store_token(&backend, &vault, &StreamId::new("connection", n)).await);
    }
    let shredded = StreamId::new("connection", 0);
    vault.destroy(&shredded).await.unwrap();
    let events_before = dump_events(&backend).await;

    let (new, _) = MasterKey::generate();
    let rotating = open_vault(&backend, new.clone(), Some(old)).await;
    assert_eq!(rotating.active_key_id(), new.id());
    let mut progress = Vec::new();
    let report = rotating.rotate(2, |n| progress.push(n)).await.unwrap();
    assert_eq!(
        report.rewrapped, 4,
        "every live data key, not the destroyed one"
    );
    assert_eq!(progress, vec![1, 2, 3, 4]);
    assert_eq!(
        rotating.rotate(2, |_| {}).await.unwrap().rewrapped,
        0,
        "resuming finds nothing left"
    );

    // A fresh vault with only the new key opens every live secret.
    let after = open_vault(&db.open().await, new, None).await;
    for s in &sealed[1..] {
        let opened: serde_json::Value = after.unseal_json(s).await.unwrap();
        assert_eq!(opened["access_token"], TOKEN);
    }
    assert!(matches!(
        after.unseal(&sealed[0]).await,
        Err(KeyError::Shredded(_))
    ));
    assert_eq!(
        dump_events(&backend).await,
        events_before,
        "events are never touched"
    );
    // The old key is no longer accepted on its own.
    let old_again = MasterKey::from_base64(&old_b64).unwrap();
    assert!(matches!(
        Vault::open(backend.key_repository(), old_again, None).await,
        Err(KeyError::WrongMasterKey { .. })
    ));
}

async fn data_keys_under_an_unconfigured_master_key_stop_the_vault_from_opening(db: &TestDatabase) {
    let backend = db.open().await;
    let (old, _) = MasterKey::generate();
    let old_id = old.id().to_owned();
    let vault = open_vault(&backend, old.clone(), None).await;
    store_token(&backend, &vault, &StreamId::new("connection", "a")).await;
    let (new, _) = MasterKey::generate();
    // Switch to the new key (rotation started) but do not rotate...
    open_vault(&backend, new.clone(), Some(old.clone())).await;
    // ...then start without the previous key: its data keys would be unreadable.
    let err = Vault::open(backend.key_repository(), new.clone(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, KeyError::MissingMasterKey { count: 1, .. }),
        "{err:?}"
    );
    // With another key as the previous one, the error says which one is given and which needed.
    let (other, _) = MasterKey::generate();
    let err = Vault::open(backend.key_repository(), new.clone(), Some(other.clone()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, KeyError::WrongPreviousKey { .. })
            && text.contains(other.id())
            && text.contains(old_id.as_str()),
        "{text}"
    );
    // A further key on top of an unfinished rotation is refused before it becomes active: the
    // configuration that worked still does.
    let (further, _) = MasterKey::generate();
    let err = Vault::open(backend.key_repository(), further, Some(new.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, KeyError::WrongPreviousKey { .. }), "{err:?}");
    open_vault(&backend, new, Some(old)).await;
}

async fn a_small_key_cache_stays_within_its_capacity_and_every_secret_still_opens(
    db: &TestDatabase,
) {
    let backend = db.open().await;
    let vault = new_vault(&backend).await.0.with_cache_capacity(40);
    let mut sealed = Vec::new();
    for n in 0..100 {
        let key_id = vault
            .create_data_key(&StreamId::new("connection", n))
            .await
            .unwrap();
        sealed.push(
            vault
                .seal(key_id, format!("secret-{n}").as_bytes())
                .await
                .unwrap(),
        );
    }
    let filled = vault.cache_stats();
    assert_eq!(filled.capacity, 40);
    assert!(filled.entries <= 40, "{filled:?}");
    assert_eq!(filled.evictions, 100 - filled.entries, "{filled:?}");
    assert_eq!(filled.hits + filled.misses, 100, "one lookup per seal");

    for (n, s) in sealed.iter().enumerate() {
        let opened = vault.unseal(s).await.unwrap();
        assert_eq!(opened.as_slice(), format!("secret-{n}").as_bytes());
    }
    let reopened = vault.cache_stats();
    assert!(reopened.entries <= 40, "{reopened:?}");
    assert_eq!(
        reopened.hits + reopened.misses,
        200,
        "one lookup per unseal"
    );
    assert!(
        reopened.misses >= filled.misses + 60,
        "evicted keys are read from the database again: {reopened:?}"
    );

    // Forgetting a key still drops it: its next use is a miss, not a hit.
    let last = sealed.last().unwrap();
    vault.unseal(last).await.unwrap();
    let before = vault.cache_stats();
    vault.forget_cached(&[last.key_id]);
    vault.unseal(last).await.unwrap();
    let after = vault.cache_stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses + 1));
    vault.clear_cache();
    assert_eq!(vault.cache_stats().entries, 0);
}

/// The events of the rotation test's five streams (read per stream: a whole-log read can lag
/// behind another test's open transaction on PostgreSQL).
async fn dump_events(backend: &Backend) -> Vec<(i64, String)> {
    let mut events = Vec::new();
    for n in 0..5 {
        for e in backend
            .events()
            .read_stream(&StreamId::new("connection", n), 0)
            .await
            .unwrap()
        {
            events.push((e.position.global, e.payload.to_string()));
        }
    }
    assert_eq!(events.len(), 5);
    events
}

/// On SQLite a shredded key is gone from the files themselves: `secure_delete` zeroes what the
/// update frees, and the write-ahead log, whose older frames held the key, is checkpointed and
/// emptied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_data_key_is_not_left_in_the_sqlite_files() {
    let db = TestDatabase::sqlite();
    let backend = db.open().await;
    let (vault, _) = new_vault(&backend).await;
    let owner = StreamId::new("connection", "shredded");
    let key_id = vault.create_data_key(&owner).await.unwrap();
    let wrapped = backend
        .key_repository()
        .data_key(key_id)
        .await
        .unwrap()
        .and_then(|stored| stored.wrapped)
        .unwrap();
    let path = db.url().strip_prefix("sqlite://").unwrap().to_owned();
    let files = || {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
        bytes
    };
    let holds = |bytes: &[u8]| {
        bytes
            .windows(wrapped.len())
            .any(|w| w == wrapped.as_slice())
    };
    // The wrapped key is in the files (the log, at least) before it is shredded.
    assert!(holds(&files()));
    vault.destroy(&owner).await.unwrap();
    assert!(
        !holds(&files()),
        "the wrapped key is still in the database files"
    );
}
