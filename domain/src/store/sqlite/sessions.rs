//! The SQLite [`SessionRepository`]: OAuth flow sessions, each taken at most once (the one
//! writer connection serializes the takes).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use uuid::Uuid;

use super::{SqliteStore, db_error};
use crate::connect_session::{ConnectSession, ConnectSessionRepository};
use crate::keys::Sealed;
use crate::oauth_session::{FlowSession, SessionRepository};
use crate::sign_out::SignOutRepository;
use crate::store::{SESSION_COLUMNS, StoreError, unreadable_session};

#[async_trait]
impl SessionRepository for SqliteStore {
    async fn create_session(&self, session: &FlowSession) -> Result<(), StoreError> {
        let config = serde_json::Value::Object(session.connection_config.clone()).to_string();
        let scopes = serde_json::Value::from(session.scopes.clone()).to_string();
        let ownership = session
            .ownership
            .as_ref()
            .map(|o| serde_json::to_string(o).unwrap_or_default());
        let session = session.clone();
        self.write(move |conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO oauth_sessions ({SESSION_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    session.state,
                    session.provider_config_key,
                    session.provider,
                    session.connection_id,
                    session.callback_url,
                    config,
                    scopes,
                    session.api_redirect_url,
                    session.ws_client_id,
                    session.secrets.as_ref().map(|s| s.key_id.to_string()),
                    session.secrets.as_ref().map(|s| s.ciphertext.as_slice()),
                    session.created_at.timestamp_micros(),
                    session.expires_at.timestamp_micros(),
                    ownership,
                    session.only_new,
                    session.only_existing,
                ])
            })
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn find_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let state = state.to_owned();
        self.read(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM oauth_sessions WHERE state = ?1"
                ))
                .and_then(|mut s| s.query_row([&state], session_row).optional())
                .map_err(db_error)?;
            row.map(flow_session).transpose()
        })
        .await
    }

    async fn take_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let state = state.to_owned();
        // The one writer connection serializes this with every other take.
        self.write(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "DELETE FROM oauth_sessions WHERE state = ?1 RETURNING {SESSION_COLUMNS}"
                ))
                .and_then(|mut s| s.query_row([&state], session_row).optional())
                .map_err(db_error)?;
            row.map(flow_session).transpose()
        })
        .await
    }

    async fn sweep_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = now.timestamp_micros();
        self.write(move |conn| {
            conn.execute("DELETE FROM oauth_sessions WHERE expires_at <= ?1", [now])
                .map(|n| n as u64)
                .map_err(db_error)
        })
        .await
    }

    async fn open_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = now.timestamp_micros();
        self.read(move |conn| {
            conn.query_row(
                "SELECT count(*) FROM oauth_sessions WHERE expires_at > ?1",
                [now],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(db_error)
        })
        .await
    }
}

/// A session row as SQLite stores it, before its JSON and times are decoded.
struct SessionRow {
    state: String,
    provider_config_key: String,
    provider: String,
    connection_id: String,
    callback_url: String,
    connection_config: String,
    scopes: String,
    api_redirect_url: Option<String>,
    ws_client_id: Option<String>,
    secrets_key_id: Option<String>,
    secrets: Option<Vec<u8>>,
    created_at: i64,
    expires_at: i64,
    ownership: Option<String>,
    only_new: bool,
    only_existing: bool,
}

#[async_trait]
impl SignOutRepository for SqliteStore {
    async fn sign_out(&self, id: &str, expires_at: DateTime<Utc>) -> Result<(), StoreError> {
        let (id, expires_at) = (id.to_owned(), expires_at.timestamp_micros());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO dashboard_sign_outs (session_id, expires_at) VALUES (?1, ?2) \
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![id, expires_at]))
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn signed_out(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT 1 FROM dashboard_sign_outs WHERE session_id = ?1")
                .and_then(|mut s| s.exists([&id]))
                .map_err(db_error)
        })
        .await
    }

    async fn sweep_sign_outs(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = now.timestamp_micros();
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM dashboard_sign_outs WHERE expires_at <= ?1",
                [now],
            )
            .map(|n| n as u64)
            .map_err(db_error)
        })
        .await
    }
}

fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        state: row.get(0)?,
        provider_config_key: row.get(1)?,
        provider: row.get(2)?,
        connection_id: row.get(3)?,
        callback_url: row.get(4)?,
        connection_config: row.get(5)?,
        scopes: row.get(6)?,
        api_redirect_url: row.get(7)?,
        ws_client_id: row.get(8)?,
        secrets_key_id: row.get(9)?,
        secrets: row.get(10)?,
        created_at: row.get(11)?,
        expires_at: row.get(12)?,
        ownership: row.get(13)?,
        only_new: row.get(14)?,
        only_existing: row.get(15)?,
    })
}

fn flow_session(row: SessionRow) -> Result<FlowSession, StoreError> {
    let connection_config = match serde_json::from_str(&row.connection_config) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(other) => return Err(unreadable_session(format!("connection_config is {other}"))),
        Err(e) => return Err(unreadable_session(e.to_string())),
    };
    let scopes =
        serde_json::from_str(&row.scopes).map_err(|e| unreadable_session(e.to_string()))?;
    let secrets = match (row.secrets_key_id, row.secrets) {
        (Some(key_id), Some(ciphertext)) => Some(Sealed {
            key_id: Uuid::parse_str(&key_id).map_err(|e| unreadable_session(e.to_string()))?,
            ciphertext,
        }),
        _ => None,
    };
    let time = |micros: i64| {
        DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| unreadable_session(format!("time {micros}")))
    };
    Ok(FlowSession {
        state: row.state,
        provider_config_key: row.provider_config_key,
        provider: row.provider,
        connection_id: row.connection_id,
        callback_url: row.callback_url,
        connection_config,
        scopes,
        api_redirect_url: row.api_redirect_url,
        ws_client_id: row.ws_client_id,
        secrets,
        created_at: time(row.created_at)?,
        expires_at: time(row.expires_at)?,
        ownership: row
            .ownership
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(|e| unreadable_session(e.to_string()))?,
        only_new: row.only_new,
        only_existing: row.only_existing,
    })
}

#[async_trait]
impl ConnectSessionRepository for SqliteStore {
    async fn create_connect_session(
        &self,
        token_hash: &[u8],
        session: &ConnectSession,
    ) -> Result<(), StoreError> {
        let document =
            serde_json::to_string(session).map_err(|e| unreadable_session(e.to_string()))?;
        let (hash, id) = (token_hash.to_vec(), session.id.to_string());
        let (created, expires) = (
            session.created_at.timestamp_micros(),
            session.expires_at.timestamp_micros(),
        );
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO connect_sessions (token_hash, id, session, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, id, document, created, expires],
            )
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn connect_session(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<ConnectSession>, StoreError> {
        let (hash, now) = (token_hash.to_vec(), now.timestamp_micros());
        let document: Option<String> = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT session FROM connect_sessions WHERE token_hash = ?1 AND expires_at > ?2",
                )
                .and_then(|mut s| s.query_row(params![hash, now], |r| r.get(0)).optional())
                .map_err(db_error)
            })
            .await?;
        document
            .map(|d| serde_json::from_str(&d).map_err(|e| unreadable_session(e.to_string())))
            .transpose()
    }

    async fn delete_connect_session(&self, token_hash: &[u8]) -> Result<bool, StoreError> {
        let hash = token_hash.to_vec();
        self.write(move |conn| {
            conn.execute("DELETE FROM connect_sessions WHERE token_hash = ?1", [hash])
                .map(|n| n > 0)
                .map_err(db_error)
        })
        .await
    }

    async fn sweep_connect_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let now = now.timestamp_micros();
        self.write(move |conn| {
            conn.execute("DELETE FROM connect_sessions WHERE expires_at <= ?1", [now])
                .map(|n| n as u64)
                .map_err(db_error)
        })
        .await
    }
}
