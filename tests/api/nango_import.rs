//! `grantline import --from-nango`: a database shaped as self-hosted Nango keeps it (schema
//! `nango`, its tables and columns, secrets sealed with AES-256-GCM under a base64 key, IV and
//! tag beside the ciphertext), built here from those facts; its live integrations and
//! connections of one environment come over, refused whole on a wrong key, an unknown auth mode
//! or an unknown schema.

use std::process::Output;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use domain::testing::TestDatabase;
use serde_json::{Value, json};

use crate::cli::grantline_on;
use crate::{TestApp, new_key, spawn_app};

domain::on_postgres_only!(a_nango_database_comes_over_with_its_secrets_opened_and_nothing_else,);

/// Nango's encryption key in the test database (base64 of 32 bytes).
fn nango_key() -> String {
    STANDARD.encode([7u8; 32])
}

/// `plain` sealed as Nango seals a value: base64 ciphertext, IV and tag.
fn seal(key: &str, plain: &[u8], iv: [u8; 12]) -> (String, String, String) {
    let key = STANDARD.decode(key).unwrap();
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
    let mut sealed = cipher.encrypt(Nonce::from_slice(&iv), plain).unwrap();
    let tag = sealed.split_off(sealed.len() - 16);
    (
        STANDARD.encode(sealed),
        STANDARD.encode(iv),
        STANDARD.encode(tag),
    )
}

const SCHEMA: &str = "
CREATE SCHEMA nango;
CREATE TABLE nango._nango_auth_migrations (
    id serial PRIMARY KEY, name varchar(255), batch integer, migration_time timestamptz);
INSERT INTO nango._nango_auth_migrations (name, batch) VALUES
    ('20241024094439_connections_end_user.cjs', 1),
    ('20260128120000_backfill_connection_tags.cjs', 2);
CREATE TABLE nango._nango_environments (
    id serial PRIMARY KEY, name varchar(255) NOT NULL, account_id integer,
    secret_key varchar(255), deleted boolean DEFAULT false, deleted_at timestamptz);
INSERT INTO nango._nango_environments (name) VALUES ('dev'), ('prod');
CREATE TABLE nango._nango_configs (
    id serial PRIMARY KEY, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
    unique_key varchar(255) NOT NULL, provider varchar(255) NOT NULL,
    oauth_client_id varchar(255), oauth_client_secret text,
    oauth_client_secret_iv varchar(255), oauth_client_secret_tag varchar(255),
    oauth_scopes text, environment_id integer NOT NULL, deleted boolean DEFAULT false,
    deleted_at timestamp, app_link varchar(255), custom json, display_name varchar(255),
    forward_webhooks boolean DEFAULT true, missing_fields text[] NOT NULL DEFAULT '{}');
CREATE TABLE nango.end_users (
    id serial PRIMARY KEY, end_user_id varchar(255) NOT NULL, account_id integer,
    environment_id integer, email varchar(255), display_name varchar(255),
    organization_id varchar(255), organization_display_name varchar(255), tags json,
    metadata json, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
CREATE TABLE nango._nango_connections (
    id serial PRIMARY KEY, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
    provider_config_key varchar(255) NOT NULL, connection_id varchar(255) NOT NULL,
    credentials json NOT NULL, credentials_iv varchar(255), credentials_tag varchar(255),
    connection_config jsonb, metadata jsonb, environment_id integer NOT NULL, config_id integer,
    deleted boolean DEFAULT false, deleted_at timestamp, last_fetched_at timestamptz,
    credentials_expires_at timestamptz, last_refresh_success timestamptz,
    last_refresh_failure timestamptz, refresh_attempts smallint, refresh_exhausted boolean DEFAULT false,
    end_user_id integer REFERENCES nango.end_users (id) ON DELETE SET NULL, tags jsonb);
";

/// A client-credentials template that the built-in catalog lacks, as an operator adds one.
const PROVIDERS: &str =
    "acme-cc:\n  auth_mode: OAUTH2_CC\n  token_url: https://auth.acme.example/token\n";

/// Builds the Nango database: `github` in both environments and `acme-cc` (client credentials),
/// `openai` (API key) and `jira` (Basic) in `prod`; in `prod` an OAuth 2 connection (sealed, with config, metadata, tags and an end
/// user of an organization), an API-key one (sealed), a Basic one stored before encryption was
/// turned on (plaintext), a deleted one, a client-credentials one and a GitHub App one (an auth
/// mode Grantline does not take); in `dev` one more.
async fn nango_database(db: &TestDatabase) {
    let client = db.postgres_client().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let key = nango_key();
    let (secret, secret_iv, secret_tag) = seal(&key, b"gh-client-SECRET", [1; 12]);
    let (dev_secret, dev_iv, dev_tag) = seal(&key, b"gh-dev-SECRET", [2; 12]);
    client
        .execute(
            "INSERT INTO nango._nango_configs (unique_key, provider, oauth_client_id, \
             oauth_client_secret, oauth_client_secret_iv, oauth_client_secret_tag, oauth_scopes, \
             environment_id) VALUES ('github', 'github', 'gh-client', $1, $2, $3, 'repo,user', 2), \
             ('github', 'github', 'gh-dev-client', $4, $5, $6, 'repo', 1), \
             ('acme-cc', 'acme-cc', NULL, NULL, NULL, NULL, NULL, 2), \
             ('openai', 'openai', NULL, NULL, NULL, NULL, NULL, 2), \
             ('jira', 'jira-basic', NULL, NULL, NULL, NULL, NULL, 2)",
            &[
                &secret,
                &secret_iv,
                &secret_tag,
                &dev_secret,
                &dev_iv,
                &dev_tag,
            ],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO nango.end_users (end_user_id, environment_id, email, display_name, \
             organization_id, organization_display_name) \
             VALUES ('u1', 2, 'u1@example.com', 'Ann', 'org-1', 'Acme')",
        )
        .await
        .unwrap();
    let sealed_row = |id: &str, credentials: Value, iv: u8, extra: &str| {
        let (ciphertext, iv, tag) = seal(&key, credentials.to_string().as_bytes(), [iv; 12]);
        (
            id.to_owned(),
            json!({ "encrypted_credentials": ciphertext }).to_string(),
            Some(iv),
            Some(tag),
            extra.to_owned(),
        )
    };
    let rows = [
        sealed_row(
            "c-oauth2",
            json!({"type": "OAUTH2", "access_token": "gho_nangoACCESS",
                   "refresh_token": "ghr_nangoREFRESH", "expires_at": "2031-01-01T00:00:00.000Z",
                   "raw": {"access_token": "gho_nangoACCESS", "token_type": "bearer"}}),
            3,
            "prod",
        ),
        sealed_row(
            "c-apikey",
            json!({"type": "API_KEY", "apiKey": "nangoAPIKEY"}),
            4,
            "prod",
        ),
        (
            "c-basic".to_owned(),
            json!({"type": "BASIC", "username": "ann", "password": "nangoPASSWORD"}).to_string(),
            None,
            None,
            "prod".to_owned(),
        ),
        sealed_row(
            "c-deleted",
            json!({"type": "API_KEY", "apiKey": "deletedAPIKEY"}),
            5,
            "deleted",
        ),
        sealed_row(
            "c-cc",
            json!({"type": "OAUTH2_CC", "token": "ccTOKEN", "client_id": "x",
                   "client_secret": "ccSECRET", "expires_at": "2031-01-01T00:00:00.000Z",
                   "raw": {"access_token": "ccTOKEN", "expires_in": 3600}}),
            6,
            "prod",
        ),
        sealed_row(
            "c-app",
            json!({"type": "APP", "access_token": "appTOKEN", "jwtToken": "appJWT"}),
            8,
            "prod",
        ),
        sealed_row(
            "c-dev",
            json!({"type": "API_KEY", "apiKey": "devAPIKEY"}),
            7,
            "dev",
        ),
    ];
    for (id, credentials, iv, tag, kind) in rows {
        let environment: i32 = if kind == "dev" { 1 } else { 2 };
        let deleted = kind == "deleted";
        client
            .execute(
                "INSERT INTO nango._nango_connections (provider_config_key, connection_id, \
                 credentials, credentials_iv, credentials_tag, environment_id, deleted) \
                 VALUES ('github', $1, $2::text::json, $3, $4, $5, $6)",
                &[&id, &credentials, &iv, &tag, &environment, &deleted],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "UPDATE nango._nango_connections SET connection_config = '{\"subdomain\": \"acme\"}', \
             metadata = '{\"plan\": \"pro\"}', tags = '{\"end_user_id\": \"u1\"}', \
             end_user_id = (SELECT id FROM nango.end_users) WHERE connection_id = 'c-oauth2'; \
             UPDATE nango._nango_connections SET provider_config_key = 'acme-cc' \
             WHERE connection_id = 'c-cc'; \
             UPDATE nango._nango_connections SET provider_config_key = 'openai' \
             WHERE connection_id = 'c-apikey'; \
             UPDATE nango._nango_connections SET provider_config_key = 'jira' \
             WHERE connection_id = 'c-basic'",
        )
        .await
        .unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `grantline import --from-nango` of `nango` into `db`, with `args`, Nango's key `key` and the
/// templates of [`PROVIDERS`].
fn import(
    db: &TestDatabase,
    master: &str,
    nango: &TestDatabase,
    key: &str,
    args: &[&str],
) -> Output {
    let providers =
        std::env::temp_dir().join(format!("nango-import-{}.yaml", uuid::Uuid::new_v4()));
    std::fs::write(&providers, PROVIDERS).unwrap();
    let output = grantline_on(db, master)
        .args(["import", "--from-nango", nango.url()])
        .args(args)
        .env("NANGO_ENCRYPTION_KEY", key)
        .env("GRANTLINE_PROVIDERS_FILE", &providers)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(providers);
    output
}

/// Nothing was written: no integration, no connection.
async fn nothing_written(app: &TestApp) {
    assert_eq!(app.get_ok("/config").await, json!({ "configs": [] }));
    assert_eq!(app.get_ok("/connection").await["connections"], json!([]));
}

async fn a_nango_database_comes_over_with_its_secrets_opened_and_nothing_else(db: &TestDatabase) {
    let nango = TestDatabase::postgres().await;
    nango_database(&nango).await;
    let master = new_key();
    let app = spawn_app(db, &master).await;

    // A wrong key opens nothing; nothing is written.
    let wrong = import(db, &master, &nango, &STANDARD.encode([9u8; 32]), &[]);
    let stderr = text(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(
        stderr.contains("Nango integration \"github\": the secret does not open")
            && stderr.contains("(cannot_decrypt)")
            && stderr.contains("nothing was written"),
        "{stderr}"
    );
    // The GitHub App connection is an auth mode Grantline does not take yet.
    let unsupported = import(db, &master, &nango, &nango_key(), &[]);
    let stderr = text(&unsupported.stderr);
    assert!(!unsupported.status.success());
    assert!(
        stderr.contains("Nango connection \"c-app\" of \"github\"")
            && stderr.contains("(unsupported_auth_mode)")
            && !stderr.contains("c-cc"),
        "{stderr}"
    );
    for leaked in [
        "ccSECRET",
        "ccTOKEN",
        "appJWT",
        "gh-client-SECRET",
        "gho_nangoACCESS",
    ] {
        assert!(!stderr.contains(leaked), "{leaked} in {stderr}");
    }
    let dry = import(
        db,
        &master,
        &nango,
        &nango_key(),
        &["--skip-unsupported", "--dry-run"],
    );
    let stdout = text(&dry.stdout);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        stdout.contains("4 connections checked")
            && stdout.contains("4 integrations to create")
            && stdout.contains("1 connections come with tags and 1 with an end user (kept)")
            && stdout.contains("newest migration 20260128120000_backfill_connection_tags.cjs"),
        "{stdout}"
    );
    nothing_written(&app).await;

    let done = import(db, &master, &nango, &nango_key(), &["--skip-unsupported"]);
    let stdout = text(&done.stdout);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(
        stdout.contains("4 created, 0 kept, 0 replaced")
            && stdout.contains("1 connections of auth modes Grantline does not take yet"),
        "{stdout}"
    );
    app.projected().await;
    let config = app.get_ok("/config/github?include_creds=true").await;
    assert_eq!(config["config"]["oauth_client_secret"], "gh-client-SECRET");
    assert_eq!(config["config"]["oauth_client_id"], "gh-client");
    let connection = |id: &str| format!("/connection/{id}?provider_config_key=github");
    let oauth2 = app.get_ok(&connection("c-oauth2")).await;
    assert_eq!(oauth2["credentials"]["access_token"], "gho_nangoACCESS");
    assert_eq!(oauth2["credentials"]["refresh_token"], "ghr_nangoREFRESH");
    assert_eq!(oauth2["connection_config"]["subdomain"], "acme");
    assert_eq!(oauth2["metadata"], json!({"plan": "pro"}));
    assert_eq!(
        app.get_ok("/connection/c-apikey?provider_config_key=openai")
            .await["credentials"]["apiKey"],
        "nangoAPIKEY"
    );
    assert_eq!(
        app.get_ok("/connection/c-basic?provider_config_key=jira")
            .await["credentials"]["password"],
        "nangoPASSWORD"
    );
    // The end user, its organization and their tags, under Nango's own.
    let current = app
        .get_ok("/connections/c-oauth2?provider_config_key=github")
        .await;
    assert_eq!(
        current["end_user"],
        json!({"id": "u1", "email": "u1@example.com", "display_name": "Ann", "tags": null,
               "organization": {"id": "org-1", "display_name": "Acme"}}),
        "{current}"
    );
    for (tag, value) in [
        ("end_user_id", "u1"),
        ("end_user_email", "u1@example.com"),
        ("organization_id", "org-1"),
    ] {
        assert_eq!(current["tags"][tag], value, "{current}");
    }
    let listed = app.get_ok("/connections?endUserId=u1").await;
    assert_eq!(
        listed["connections"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    // The client-credentials connection, with its token and client.
    let cc = app
        .get_ok("/connections/c-cc?provider_config_key=acme-cc")
        .await;
    assert_eq!(cc["credentials"]["token"], "ccTOKEN", "{cc}");
    assert_eq!(cc["credentials"]["client_id"], "x", "{cc}");
    for absent in ["c-deleted", "c-app", "c-dev"] {
        assert_eq!(app.get(&connection(absent)).await.status(), 404, "{absent}");
    }
    let history = app
        .get_ok("/connection/c-oauth2/history?provider_config_key=github")
        .await;
    assert_eq!(history["events"][0]["origin"], "nango", "{history}");
    assert_eq!(history["events"][0]["flow"], "import");

    // Again: everything is there and kept.
    let again = import(db, &master, &nango, &nango_key(), &["--skip-unsupported"]);
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        stdout.contains("0 created, 4 kept, 0 replaced")
            && stdout.contains("4 of Nango's integrations exist here"),
        "{stdout}"
    );

    // A wrong environment names the ones there are.
    let environment = import(
        db,
        &master,
        &nango,
        &nango_key(),
        &["--nango-environment", "staging"],
    );
    let stderr = text(&environment.stderr);
    assert!(!environment.status.success());
    assert!(stderr.contains("[\"dev\", \"prod\"]"), "{stderr}");

    // A schema without a column the import reads is refused, naming it.
    nango
        .postgres_client()
        .await
        .batch_execute("ALTER TABLE nango._nango_connections DROP COLUMN credentials_tag")
        .await
        .unwrap();
    let unknown = import(db, &master, &nango, &nango_key(), &["--skip-unsupported"]);
    let stderr = text(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(
        stderr
            .contains("unknown Nango schema: nango._nango_connections.credentials_tag is missing"),
        "{stderr}"
    );
}
