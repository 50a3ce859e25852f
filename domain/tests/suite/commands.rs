//! The command service on both backends: load → decide → append, sealing, fingerprints,
//! crypto-shredding on deletion, and conflict retries.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use grantline_domain::commands::{
    AuthorizeConnection, CommandError, Commands, Imported, IntegrationConfig, Loaded,
};
use grantline_domain::connection::{
    self, Connection, ConnectionEvent, ConnectionKey, ConnectionRejected, CredentialsType, Flow,
    MetadataMode,
};
use grantline_domain::credentials::{ClientSecret, Credentials};
use grantline_domain::event::DomainEvent;
use grantline_domain::integration::{self, ActiveIntegration, Integration, IntegrationRejected};
use grantline_domain::keys::{KeyError, MasterKey};
use grantline_domain::store::StreamId;
use grantline_domain::testing::TestDatabase;
use serde_json::{Map, Value, json};

use crate::{new_vault, open_vault, reopen_vault};

grantline_domain::on_both_backends!(
    an_imported_connection_loads_active_with_its_credentials_and_no_plaintext_in_its_events,
    a_bulk_import_creates_new_connections_keeps_live_ones_and_replaces_on_request,
    re_authorization_makes_generation_two_under_a_new_data_key,
    fingerprints_are_stable_per_token_differ_between_tokens_and_survive_another_vault,
    metadata_is_replaced_or_merged_and_must_be_an_object,
    deletion_shreds_every_generation_and_a_second_delete_is_rejected,
    a_reconnect_reauthorizes_only_a_connection_that_is_there,
    twenty_concurrent_metadata_merges_on_one_connection_all_land,
    an_integration_is_created_updated_and_deleted_with_its_client_secret_sealed,
    an_import_with_metadata_is_one_append,
    resuming_from_an_old_snapshot_reaches_the_same_head_as_a_full_load,
    two_imports_of_one_batch_at_once_leave_one_data_key_per_connection,
);

const KEY: &str = "github-prod";
const ID: &str = "user-1";

fn key() -> ConnectionKey {
    ConnectionKey::new(KEY, ID)
}
const ACCESS: &str = "gho_PlaintextAccessTokenGenerationOne0123";
const REFRESH: &str = "ghr_PlaintextRefreshTokenGenerationOne0123";
const RAW_SECRET: &str = "PlaintextIdTokenInTheRawResponse0123";
const ACCESS_2: &str = "gho_PlaintextAccessTokenGenerationTwo0123";
const REFRESH_2: &str = "ghr_PlaintextRefreshTokenGenerationTwo0123";

/// A command service on a freshly opened backend, and the base64 of its master key.
async fn commands(db: &TestDatabase) -> (Commands, String) {
    let backend = db.open().await;
    let (vault, master_b64) = new_vault(&backend).await;
    (Commands::new(backend, vault), master_b64)
}

/// A command service with the connection imported at `at(0)` (version 1).
async fn with_connection(db: &TestDatabase) -> Commands {
    let (commands, _) = commands(db).await;
    commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(0)))
        .await
        .unwrap();
    commands
}

/// 2024-05-01T12:00:00Z plus `minutes`.
fn at(minutes: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_564_800 + minutes * 60, 0).unwrap()
}

fn oauth2(access: &str, refresh: &str) -> Credentials {
    Credentials::OAuth2 {
        access_token: access.to_owned(),
        refresh_token: Some(refresh.to_owned()),
        expires_at: Some(at(60)),
        raw: json!({ "access_token": access, "refresh_token": refresh, "id_token": RAW_SECRET }),
    }
}

fn import(credentials: Credentials, now: DateTime<Utc>) -> AuthorizeConnection {
    let mut connection_config = Map::new();
    connection_config.insert("subdomain".to_owned(), json!("acme"));
    AuthorizeConnection {
        only_new: Default::default(),
        only_existing: Default::default(),
        ownership: Default::default(),
        key: key(),
        provider: "github".to_owned(),
        flow: Flow::Import,
        credentials,
        scopes: vec!["repo".to_owned()],
        connection_config,
        now,
        metadata: None,
    }
}

/// Every recorded event of `stream`, payload and metadata, as one string.
async fn stream_text(commands: &Commands, stream: &StreamId) -> String {
    let events = commands
        .backend()
        .events()
        .read_stream(stream, 0)
        .await
        .unwrap();
    assert!(!events.is_empty());
    events
        .iter()
        .map(|e| format!("{} {} {}", e.event_type, e.payload, e.metadata))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The decoded events of a connection's stream.
async fn connection_events(commands: &Commands) -> Vec<ConnectionEvent> {
    commands
        .backend()
        .events()
        .read_stream(&connection::stream_id(KEY, ID), 0)
        .await
        .unwrap()
        .iter()
        .map(|e| ConnectionEvent::from_recorded(e).unwrap())
        .collect()
}

/// How many live data keys the active master key wraps.
async fn live_data_keys(commands: &Commands) -> u64 {
    let records = commands.backend().keys().master_keys().await.unwrap();
    records.iter().map(|r| r.data_keys).sum()
}

fn active(loaded: &Loaded<Connection>) -> &connection::ActiveConnection {
    loaded.state.active().expect("an active connection")
}

/// The metadata of an active connection, as one JSON object.
fn metadata(loaded: &Loaded<Connection>) -> Value {
    Value::Object(active(loaded).metadata.clone())
}

async fn an_imported_connection_loads_active_with_its_credentials_and_no_plaintext_in_its_events(
    db: &TestDatabase,
) {
    let (commands, _) = commands(db).await;
    let command = import(oauth2(ACCESS, REFRESH), at(0));
    assert!(!format!("{command:?} {commands:?}").contains(ACCESS));

    let authorized = commands.authorize_connection(command).await.unwrap();
    assert_eq!(authorized.version, 1);
    assert_eq!(authorized.stream_id, connection::stream_id(KEY, ID));
    assert_eq!(authorized.events.len(), 1);
    assert_eq!(authorized.events[0].stream_version, 1);
    assert!(authorized.events[0].global_position > 0);
    assert!(matches!(
        authorized.events[0].event,
        ConnectionEvent::ConnectionAuthorized(_)
    ));

    let loaded = commands.load_connection(&key()).await.unwrap();
    assert_eq!(loaded.version, 1);
    assert!(loaded.events.is_empty(), "a load appends nothing");
    assert_eq!(loaded.state, authorized.state);
    let connection = active(&loaded);
    assert_eq!(connection.generation, 1);
    assert_eq!(connection.flow, Flow::Import);
    assert_eq!(connection.credentials_type, CredentialsType::Oauth2);
    assert!(connection.has_refresh_token);
    assert_eq!(connection.expires_at, Some(at(60)));
    assert_eq!(connection.scopes, vec!["repo".to_owned()]);
    assert_eq!(connection.connection_config["subdomain"], json!("acme"));
    assert_eq!(
        commands.vault().live_keys(&loaded.stream_id).await.unwrap(),
        vec![connection.credentials.key_id]
    );
    assert_eq!(
        connection.fingerprints.access_token,
        Some(commands.vault().fingerprint(ACCESS).await.unwrap())
    );
    assert_eq!(
        connection.fingerprints.refresh_token,
        Some(commands.vault().fingerprint(REFRESH).await.unwrap())
    );

    assert_eq!(
        commands.reveal_credentials(connection).await.unwrap(),
        oauth2(ACCESS, REFRESH)
    );

    let stored = stream_text(&commands, &loaded.stream_id).await;
    assert!(stored.contains(ID), "the text holds the events: {stored}");
    for secret in [ACCESS, REFRESH, RAW_SECRET] {
        assert!(!stored.contains(secret), "plaintext {secret} in {stored}");
    }
}

async fn re_authorization_makes_generation_two_under_a_new_data_key(db: &TestDatabase) {
    let (commands, _) = commands(db).await;
    let first = commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(0)))
        .await
        .unwrap();
    let mut again = import(oauth2(ACCESS_2, REFRESH_2), at(5));
    again.flow = Flow::Oauth2;
    let second = commands.authorize_connection(again).await.unwrap();

    assert_eq!(second.version, 2);
    assert_eq!(second.events[0].stream_version, 2);
    let ConnectionEvent::ConnectionAuthorized(event) = &second.events[0].event else {
        panic!("expected ConnectionAuthorized");
    };
    assert_eq!(event.generation, 2);
    let (before, after) = (active(&first), active(&second));
    assert_ne!(after.credentials.key_id, before.credentials.key_id);
    assert_eq!(
        commands.vault().live_keys(&second.stream_id).await.unwrap(),
        vec![before.credentials.key_id, after.credentials.key_id],
        "the superseded key stays live until the connection is deleted"
    );
    assert_eq!(after.flow, Flow::Oauth2);
    assert_eq!(
        after.created_at,
        at(0),
        "created_at survives re-authorization"
    );
    assert_ne!(after.fingerprints, before.fingerprints);

    let loaded = commands.load_connection(&key()).await.unwrap();
    assert_eq!(loaded.state, second.state);
    assert_eq!(
        commands.reveal_credentials(active(&loaded)).await.unwrap(),
        oauth2(ACCESS_2, REFRESH_2)
    );
    // The earlier generation's key lives on until the connection is deleted.
    assert_eq!(
        commands
            .vault()
            .unseal_json::<Credentials>(&before.credentials)
            .await
            .unwrap(),
        oauth2(ACCESS, REFRESH)
    );
}

async fn fingerprints_are_stable_per_token_differ_between_tokens_and_survive_another_vault(
    db: &TestDatabase,
) {
    let backend = db.open().await;
    let (master, master_b64) = MasterKey::generate();
    // Two instances on a database without a fingerprint key fingerprint at once: one creates
    // the key, the other must end up with the same one.
    let first = open_vault(&backend, master.clone(), None).await;
    let second = open_vault(&db.open().await, master, None).await;
    let (a, b) = tokio::join!(first.fingerprint(ACCESS), second.fingerprint(ACCESS));
    let fingerprint = a.unwrap();
    assert_eq!(b.unwrap(), fingerprint);

    let hex = fingerprint.strip_prefix("fp_").expect("an fp_ prefix");
    assert_eq!(hex.len(), 16);
    assert!(
        hex.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert!(!fingerprint.contains(ACCESS));
    assert_eq!(first.fingerprint(ACCESS).await.unwrap(), fingerprint);
    assert_ne!(first.fingerprint(ACCESS_2).await.unwrap(), fingerprint);
    assert_ne!(first.fingerprint("").await.unwrap(), fingerprint);

    // A later instance, with the master key read from configuration.
    let restarted = reopen_vault(db, &master_b64).await;
    assert_eq!(restarted.fingerprint(ACCESS).await.unwrap(), fingerprint);

    // After a master-key rotation.
    let (new_master, _) = MasterKey::generate();
    let rotated = open_vault(
        &db.open().await,
        new_master,
        Some(MasterKey::from_base64(&master_b64).unwrap()),
    )
    .await;
    assert!(rotated.rotate(10, |_| {}).await.unwrap().rewrapped >= 1);
    assert_eq!(rotated.fingerprint(ACCESS).await.unwrap(), fingerprint);

    // Keyed: another database has another key, so the same token looks different there.
    let other_db = match db {
        TestDatabase::Postgres { .. } => TestDatabase::postgres().await,
        TestDatabase::Sqlite { .. } => TestDatabase::sqlite(),
    };
    let other_backend = other_db.open().await;
    let other = open_vault(&other_backend, MasterKey::generate().0, None).await;
    assert_ne!(other.fingerprint(ACCESS).await.unwrap(), fingerprint);
}

async fn metadata_is_replaced_or_merged_and_must_be_an_object(db: &TestDatabase) {
    let (commands, _) = commands(db).await;
    let key = key();
    let set = |metadata: Value, mode: MetadataMode, minute: i64| {
        commands.set_metadata(&key, metadata, mode, at(minute))
    };
    assert!(matches!(
        set(json!({"a": 1}), MetadataMode::Replace, 0).await,
        Err(CommandError::Connection(ConnectionRejected::NotFound))
    ));
    commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(0)))
        .await
        .unwrap();

    let replaced = set(json!({"a": 1, "b": {"x": 1}}), MetadataMode::Replace, 1)
        .await
        .unwrap();
    assert_eq!(replaced.version, 2);
    assert_eq!(metadata(&replaced), json!({"a": 1, "b": {"x": 1}}));

    let merged = set(json!({"b": {"y": 2}, "c": 3}), MetadataMode::Merge, 2)
        .await
        .unwrap();
    assert_eq!(merged.version, 3);
    assert_eq!(metadata(&merged), json!({"a": 1, "b": {"y": 2}, "c": 3}));

    let error = set(json!(["not", "an", "object"]), MetadataMode::Merge, 3)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            CommandError::Connection(ConnectionRejected::MetadataNotObject)
        ),
        "{error:?}"
    );

    let replaced = set(json!({"z": 0}), MetadataMode::Replace, 4)
        .await
        .unwrap();
    let loaded = commands.load_connection(&key).await.unwrap();
    assert_eq!(loaded.version, 4, "the rejection appended nothing");
    assert_eq!(loaded.state, replaced.state);
    assert_eq!(metadata(&loaded), json!({"z": 0}));
}

async fn deletion_shreds_every_generation_and_a_second_delete_is_rejected(db: &TestDatabase) {
    let (commands, master_b64) = commands(db).await;
    assert!(matches!(
        commands.delete_connection(&key(), at(0)).await,
        Err(CommandError::Connection(ConnectionRejected::NotFound))
    ));
    let first = commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(0)))
        .await
        .unwrap();
    let second = commands
        .authorize_connection(import(oauth2(ACCESS_2, REFRESH_2), at(1)))
        .await
        .unwrap();
    let key_ids = vec![
        active(&first).credentials.key_id,
        active(&second).credentials.key_id,
    ];

    let deleted = commands.delete_connection(&key(), at(2)).await.unwrap();
    assert_eq!(deleted.version, 3);
    let ConnectionEvent::ConnectionDeleted(event) = &deleted.events[0].event else {
        panic!("expected ConnectionDeleted");
    };
    assert_eq!(event.shredded_data_keys, key_ids);
    let Connection::Deleted(state) = &deleted.state else {
        panic!("expected a deleted connection, got {:?}", deleted.state);
    };
    assert_eq!(state.generation, 2);

    // The last authorization's secret, read from the log, is gone; so is the first one's, and
    // for another instance with the master key as well.
    let last_sealed = connection_events(&commands)
        .await
        .into_iter()
        .rev()
        .find_map(|event| match event {
            ConnectionEvent::ConnectionAuthorized(authorized) => {
                Some(authorized.authorization.credentials)
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(last_sealed, active(&second).credentials);
    let operator = reopen_vault(db, &master_b64).await;
    for (vault, sealed) in [
        (commands.vault(), &last_sealed),
        (commands.vault(), &active(&first).credentials),
        (&operator, &last_sealed),
    ] {
        let error = vault.unseal(sealed).await.unwrap_err();
        assert!(matches!(error, KeyError::Shredded(_)), "{error:?}");
    }
    let error = commands
        .reveal_credentials(active(&second))
        .await
        .unwrap_err();
    assert!(
        matches!(error, CommandError::Keys(KeyError::Shredded(_))),
        "{error:?}"
    );

    let again = commands.delete_connection(&key(), at(3)).await.unwrap_err();
    assert!(
        matches!(again, CommandError::Connection(ConnectionRejected::Deleted)),
        "{again:?}"
    );
    assert!(matches!(
        commands
            .set_metadata(&key(), json!({}), MetadataMode::Merge, at(3))
            .await,
        Err(CommandError::Connection(ConnectionRejected::Deleted))
    ));
    assert_eq!(connection_events(&commands).await.len(), 3);

    // The history stays, and a later authorization starts generation 3 with a live key.
    let revived = commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(4)))
        .await
        .unwrap();
    assert_eq!(active(&revived).generation, 3);
    assert_eq!(
        commands.reveal_credentials(active(&revived)).await.unwrap(),
        oauth2(ACCESS, REFRESH)
    );
}

/// A reconnect (`only_existing`) re-authorizes the connection; it never creates one, neither
/// where there was none nor over a deletion, and a refusal appends nothing.
async fn a_reconnect_reauthorizes_only_a_connection_that_is_there(db: &TestDatabase) {
    let (commands, _) = commands(db).await;
    let reconnect = |access: &str, refresh: &str, now| AuthorizeConnection {
        only_existing: true,
        ..import(oauth2(access, refresh), now)
    };
    let refused = commands
        .authorize_connection(reconnect(ACCESS, REFRESH, at(0)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            CommandError::Connection(ConnectionRejected::NotFound)
        ),
        "{refused:?}"
    );
    commands
        .authorize_connection(import(oauth2(ACCESS, REFRESH), at(1)))
        .await
        .unwrap();
    let again = commands
        .authorize_connection(reconnect(ACCESS_2, REFRESH_2, at(2)))
        .await
        .unwrap();
    assert_eq!(active(&again).generation, 2);
    commands.delete_connection(&key(), at(3)).await.unwrap();
    let refused = commands
        .authorize_connection(reconnect(ACCESS, REFRESH, at(4)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            CommandError::Connection(ConnectionRejected::Deleted)
        ),
        "{refused:?}"
    );
    assert_eq!(connection_events(&commands).await.len(), 3);
}

async fn twenty_concurrent_metadata_merges_on_one_connection_all_land(db: &TestDatabase) {
    let commands = with_connection(db).await;

    let writers: Vec<_> = (0..20)
        .map(|n| {
            let commands = commands.clone();
            tokio::spawn(async move {
                commands
                    .set_metadata(
                        &key(),
                        json!({ format!("writer-{n}"): n }),
                        MetadataMode::Merge,
                        at(1),
                    )
                    .await
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for writer in writers {
        let loaded = writer.await.unwrap().unwrap();
        assert_eq!(loaded.events.len(), 1);
        assert_eq!(loaded.events[0].stream_version, loaded.version);
        versions.insert(loaded.version);
    }
    assert_eq!(
        versions,
        (2..=21).collect(),
        "each writer got its own version"
    );

    let loaded = commands.load_connection(&key()).await.unwrap();
    assert_eq!(loaded.version, 1 + 20);
    let metadata = &active(&loaded).metadata;
    assert_eq!(metadata.len(), 20);
    for n in 0..20 {
        assert_eq!(metadata[&format!("writer-{n}")], json!(n));
    }
}

/// The integration rejection a command ends in; panics on success or another error.
fn rejection<T: std::fmt::Debug>(result: Result<T, CommandError>) -> IntegrationRejected {
    match result {
        Err(CommandError::Integration(rejected)) => rejected,
        other => panic!("expected an integration rejection, got {other:?}"),
    }
}

/// Asserts that the client secret `integration` holds sealed opens to `secret`.
async fn assert_secret(commands: &Commands, integration: &ActiveIntegration, secret: &str) {
    assert_eq!(
        commands.reveal_client_secret(integration).await.unwrap(),
        ClientSecret::new(secret)
    );
}

async fn an_integration_is_created_updated_and_deleted_with_its_client_secret_sealed(
    db: &TestDatabase,
) {
    let (commands, _) = commands(db).await;
    let config = |client_id: &str, secret: &str| IntegrationConfig {
        provider: "github".to_owned(),
        oauth_client_id: client_id.to_owned(),
        client_secret: ClientSecret::new(secret),
        oauth_scopes: vec!["repo".to_owned()],
        display_name: None,
    };
    const SECRET_1: &str = "client-secret-PlaintextOne0123456789";
    const SECRET_2: &str = "client-secret-PlaintextTwo0123456789";
    assert!(!format!("{:?}", config("c", SECRET_1)).contains(SECRET_1));
    let create = |client_id: &str, secret: &str, minute: i64| {
        commands.create_integration(KEY, config(client_id, secret), at(minute))
    };
    let update = |client_id: &str, secret: &str, minute: i64| {
        commands.update_integration(KEY, config(client_id, secret), at(minute))
    };

    let not_found = update("c", SECRET_1, 0).await;
    assert_eq!(rejection(not_found), IntegrationRejected::NotFound);
    let created = create("client-1", SECRET_1, 0).await.unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(created.stream_id, integration::stream_id(KEY));
    let live = created.state.active().unwrap();
    assert_eq!(live.settings.oauth_client_id, "client-1");
    assert_secret(&commands, live, SECRET_1).await;

    let keys_before = live_data_keys(&commands).await;
    let twice = create("client-x", SECRET_2, 1).await;
    assert_eq!(rejection(twice), IntegrationRejected::AlreadyExists);
    assert_eq!(
        live_data_keys(&commands).await,
        keys_before,
        "a rejected command makes no data key"
    );

    let updated = update("client-2", SECRET_2, 2).await.unwrap();
    assert_eq!(updated.version, 2);
    let loaded = commands.load_integration(KEY).await.unwrap();
    assert_eq!(loaded.state, updated.state);
    let live = loaded.state.active().unwrap();
    assert_eq!(live.settings.oauth_client_id, "client-2");
    assert_eq!(live.updated_at, Some(at(2)));
    assert_secret(&commands, live, SECRET_2).await;
    let stored = stream_text(&commands, &loaded.stream_id).await;
    assert!(stored.contains("client-2"), "{stored}");
    assert!(
        !stored.contains(SECRET_1) && !stored.contains(SECRET_2),
        "{stored}"
    );

    let deleted = commands.delete_integration(KEY, at(3)).await.unwrap();
    assert_eq!(deleted.version, 3);
    assert!(matches!(deleted.state, Integration::Deleted(_)));
    for sealed in [
        &created.state.active().unwrap().settings.client_secret,
        &live.settings.client_secret,
    ] {
        let error = commands.vault().unseal(sealed).await.unwrap_err();
        assert!(matches!(error, KeyError::Shredded(_)), "{error:?}");
    }
    let delete = commands.delete_integration(KEY, at(4));
    assert_eq!(rejection(delete.await), IntegrationRejected::Deleted);
    let after_deletion = update("c", SECRET_1, 4).await;
    assert_eq!(rejection(after_deletion), IntegrationRejected::Deleted);

    let recreated = create("client-3", SECRET_1, 5).await.unwrap();
    assert_eq!(recreated.version, 4);
    assert_secret(&commands, recreated.state.active().unwrap(), SECRET_1).await;
}

/// An import that carries metadata appends the authorization and the metadata together: one
/// append, so it is recorded whole or not at all.
async fn an_import_with_metadata_is_one_append(db: &TestDatabase) {
    let (commands, _) = commands(db).await;
    let mut metadata = Map::new();
    metadata.insert("team".to_owned(), json!("core"));
    let mut command = import(oauth2(ACCESS, REFRESH), at(0));
    command.metadata = Some(metadata.clone());
    let loaded = commands.authorize_connection(command).await.unwrap();
    assert_eq!(loaded.version, 2);
    let Connection::Active(active) = &loaded.state else {
        panic!("not active: {:?}", loaded.state);
    };
    assert_eq!(active.metadata, metadata);

    let recorded = commands
        .backend()
        .events()
        .read_stream(&connection::stream_id(KEY, ID), 0)
        .await
        .unwrap();
    let types: Vec<&str> = recorded.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["ConnectionAuthorized", "MetadataSet"]);
    // Consecutive positions of one append (PostgreSQL: also one transaction).
    assert_eq!(recorded[1].position.global, recorded[0].position.global + 1);
    assert_eq!(recorded[1].position.commit, recorded[0].position.commit);
}

/// Snapshots that offer one state for one stream: the state after its first event.
#[derive(Debug)]
struct FirstEventSnapshot {
    stream: StreamId,
    state: Value,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl grantline_domain::commands::Snapshots for FirstEventSnapshot {
    async fn snapshot(&self, stream: &StreamId) -> Option<(u32, Value)> {
        self.asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (stream == &self.stream).then(|| (1, self.state.clone()))
    }
}

/// Loading from a snapshot of an old version folds only the events after it, and reaches the
/// state a fold of the whole stream gives; commands decided on it append at the right version.
async fn resuming_from_an_old_snapshot_reaches_the_same_head_as_a_full_load(db: &TestDatabase) {
    let commands = with_connection(db).await;
    let first = commands.load_connection(&key()).await.unwrap();
    assert_eq!(first.version, 1);
    for n in 0..5 {
        commands
            .set_metadata(&key(), json!({ "n": n }), MetadataMode::Merge, at(n + 1))
            .await
            .unwrap();
    }
    let snapshots = Arc::new(FirstEventSnapshot {
        stream: connection::stream_id(KEY, ID),
        state: serde_json::to_value(&first.state).unwrap(),
        asked: std::sync::atomic::AtomicUsize::new(0),
    });
    let from_snapshots = commands.clone().with_snapshots(snapshots.clone());
    let full = commands.load_connection(&key()).await.unwrap();
    let resumed = from_snapshots.load_connection(&key()).await.unwrap();
    assert_eq!(
        snapshots.asked.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(resumed.version, 6);
    assert_eq!(resumed.state, full.state);
    // A command decided on it appends at the head.
    let written = from_snapshots
        .set_metadata(&key(), json!({ "last": true }), MetadataMode::Merge, at(9))
        .await
        .unwrap();
    assert_eq!(written.version, 7);
    let Connection::Active(active) = written.state else {
        panic!("not active");
    };
    assert_eq!(active.metadata["n"], 4);
    assert_eq!(active.metadata["last"], true);
}

async fn a_bulk_import_creates_new_connections_keeps_live_ones_and_replaces_on_request(
    db: &TestDatabase,
) {
    let commands = with_connection(db).await;
    let of = |id: &str, credentials: Credentials| AuthorizeConnection {
        key: ConnectionKey::new(KEY, id),
        ..import(credentials, at(1))
    };
    let mut with_metadata = of("user-2", oauth2(ACCESS_2, REFRESH_2));
    with_metadata.metadata = Some(json!({"plan": "pro"}).as_object().unwrap().clone());
    let api_key = Credentials::ApiKey {
        api_key: "PlaintextApiKey0123".to_owned(),
    };
    let outcomes = commands
        .import_connections(
            vec![
                of(ID, oauth2(ACCESS_2, REFRESH_2)),
                with_metadata,
                of("user-3", api_key.clone()),
            ],
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [Imported::Kept, Imported::Created, Imported::Created]
    );
    // The live connection keeps its credentials: a re-run never rolls tokens back.
    let kept = commands.load_connection(&key()).await.unwrap();
    assert_eq!(kept.version, 1);
    assert_eq!(
        commands.reveal_credentials(active(&kept)).await.unwrap(),
        oauth2(ACCESS, REFRESH)
    );
    let created = commands
        .load_connection(&ConnectionKey::new(KEY, "user-2"))
        .await
        .unwrap();
    assert_eq!(created.version, 2, "authorized, then its metadata");
    assert_eq!(metadata(&created), json!({"plan": "pro"}));
    assert_eq!(active(&created).flow, Flow::Import);
    assert_eq!(
        commands.reveal_credentials(active(&created)).await.unwrap(),
        oauth2(ACCESS_2, REFRESH_2)
    );
    let text = stream_text(&commands, &connection::stream_id(KEY, "user-2")).await;
    assert!(
        !text.contains(ACCESS_2) && !text.contains(REFRESH_2),
        "{text}"
    );
    let user_3 = ConnectionKey::new(KEY, "user-3");
    let loaded = commands.load_connection(&user_3).await.unwrap();
    assert_eq!(
        commands.reveal_credentials(active(&loaded)).await.unwrap(),
        api_key
    );
    // One data key per connection.
    assert_eq!(
        live_data_keys(&commands).await,
        3 + 1,
        "and the fingerprint key"
    );

    // A deleted connection is imported anew; with `replace`, a live one gets the file's
    // credentials as its next generation.
    commands.delete_connection(&user_3, at(2)).await.unwrap();
    let outcomes = commands
        .import_connections(
            vec![of(ID, oauth2(ACCESS_2, REFRESH_2)), of("user-3", api_key)],
            true,
        )
        .await
        .unwrap();
    assert_eq!(outcomes, [Imported::Replaced, Imported::Created]);
    let replaced = commands.load_connection(&key()).await.unwrap();
    assert_eq!(active(&replaced).generation, 2);
    assert_eq!(
        commands
            .reveal_credentials(active(&replaced))
            .await
            .unwrap(),
        oauth2(ACCESS_2, REFRESH_2)
    );
    assert!(
        commands
            .load_connection(&user_3)
            .await
            .unwrap()
            .state
            .active()
            .is_some()
    );

    // One command out of bounds and nothing of the batch is written.
    let far = Credentials::OAuth2 {
        access_token: ACCESS.to_owned(),
        refresh_token: None,
        expires_at: DateTime::from_timestamp(-10, 0),
        raw: json!({}),
    };
    let refused = commands
        .import_connections(
            vec![of("user-4", oauth2(ACCESS, REFRESH)), of("user-5", far)],
            false,
        )
        .await;
    assert!(
        matches!(refused, Err(CommandError::Connection(_))),
        "{refused:?}"
    );
    for id in ["user-4", "user-5"] {
        let loaded = commands
            .load_connection(&ConnectionKey::new(KEY, id))
            .await
            .unwrap();
        assert_eq!(loaded.version, 0, "{id} was written");
    }
}

/// Two imports of the same new connections at once: one batch is appended, the other is
/// refused as a whole (another writer created its streams) and falls back to the connection
/// path, which keeps them. The refused batch's data keys sealed nothing that was written; they
/// are removed rather than left live under connections that never used them.
async fn two_imports_of_one_batch_at_once_leave_one_data_key_per_connection(db: &TestDatabase) {
    let (commands, _) = commands(db).await;
    let batch = || {
        (0..200)
            .map(|n| AuthorizeConnection {
                key: ConnectionKey::new(KEY, format!("bulk-{n}")),
                ..import(oauth2(ACCESS, REFRESH), at(1))
            })
            .collect::<Vec<_>>()
    };
    let (first, second) = tokio::join!(
        commands.import_connections(batch(), false),
        commands.import_connections(batch(), false)
    );
    let mut outcomes = [first.unwrap(), second.unwrap()];
    outcomes.sort_by_key(|o| o.contains(&Imported::Kept));
    assert!(outcomes[0].iter().all(|o| *o == Imported::Created));
    assert!(outcomes[1].iter().all(|o| *o == Imported::Kept));
    assert_eq!(
        live_data_keys(&commands).await,
        200 + 1,
        "one per connection, and the fingerprint key"
    );
}
