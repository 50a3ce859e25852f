//! The PostgreSQL [`SessionRepository`]: OAuth flow sessions, each taken at most once.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{PostgresStore, db_error};
use crate::connect_session::{ConnectSession, ConnectSessionRepository};
use crate::keys::Sealed;
use crate::oauth_session::{FlowSession, SessionRepository};
use crate::sign_out::SignOutRepository;
use crate::store::{SESSION_COLUMNS, StoreError, unreadable_session};

impl PostgresStore {
    /// The session `sql` (with the state as `$1`) answers, if any.
    async fn session_by(&self, sql: &str, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let (client, statement) = self.prepared(sql).await?;
        let row = client
            .query_opt(&statement, &[&state])
            .await
            .map_err(db_error)?;
        row.as_ref().map(flow_session).transpose()
    }
}

#[async_trait]
impl SessionRepository for PostgresStore {
    async fn create_session(&self, session: &FlowSession) -> Result<(), StoreError> {
        let (client, statement) = self
            .prepared(&format!(
                "INSERT INTO oauth_sessions ({SESSION_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            ))
            .await?;
        let config = Value::Object(session.connection_config.clone());
        let scopes = Value::from(session.scopes.clone());
        let secrets_key_id = session.secrets.as_ref().map(|s| s.key_id);
        let secrets = session.secrets.as_ref().map(|s| s.ciphertext.as_slice());
        let ownership = session
            .ownership
            .as_ref()
            .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
        client
            .execute(
                &statement,
                &[
                    &session.state,
                    &session.provider_config_key,
                    &session.provider,
                    &session.connection_id,
                    &session.callback_url,
                    &config,
                    &scopes,
                    &session.api_redirect_url,
                    &session.ws_client_id,
                    &secrets_key_id,
                    &secrets,
                    &session.created_at,
                    &session.expires_at,
                    &ownership,
                    &session.only_new,
                    &session.only_existing,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn find_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM oauth_sessions WHERE state = $1");
        self.session_by(&sql, state).await
    }

    async fn take_session(&self, state: &str) -> Result<Option<FlowSession>, StoreError> {
        let sql =
            format!("DELETE FROM oauth_sessions WHERE state = $1 RETURNING {SESSION_COLUMNS}");
        self.session_by(&sql, state).await
    }

    async fn sweep_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM oauth_sessions WHERE expires_at <= $1", &[&now])
            .await
            .map_err(db_error)
    }

    async fn open_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM oauth_sessions WHERE expires_at > $1",
                &[&now],
            )
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}

#[async_trait]
impl SignOutRepository for PostgresStore {
    async fn sign_out(&self, id: &str, expires_at: DateTime<Utc>) -> Result<(), StoreError> {
        let (client, statement) = self
            .prepared(
                "INSERT INTO dashboard_sign_outs (session_id, expires_at) VALUES ($1, $2) \
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .await?;
        client
            .execute(&statement, &[&id, &expires_at])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn signed_out(&self, id: &str) -> Result<bool, StoreError> {
        let (client, statement) = self
            .prepared("SELECT 1 FROM dashboard_sign_outs WHERE session_id = $1")
            .await?;
        let row = client
            .query_opt(&statement, &[&id])
            .await
            .map_err(db_error)?;
        Ok(row.is_some())
    }

    async fn sweep_sign_outs(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM dashboard_sign_outs WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(db_error)
    }
}

fn flow_session(row: &Row) -> Result<FlowSession, StoreError> {
    let connection_config = match row.get::<_, Value>(5) {
        Value::Object(map) => map,
        other => return Err(unreadable_session(format!("connection_config is {other}"))),
    };
    let scopes: Vec<String> = serde_json::from_value(row.get::<_, Value>(6))
        .map_err(|e| unreadable_session(e.to_string()))?;
    let secrets = match (
        row.get::<_, Option<Uuid>>(9),
        row.get::<_, Option<Vec<u8>>>(10),
    ) {
        (Some(key_id), Some(ciphertext)) => Some(Sealed { key_id, ciphertext }),
        _ => None,
    };
    Ok(FlowSession {
        state: row.get(0),
        provider_config_key: row.get(1),
        provider: row.get(2),
        connection_id: row.get(3),
        callback_url: row.get(4),
        connection_config,
        scopes,
        api_redirect_url: row.get(7),
        ws_client_id: row.get(8),
        secrets,
        created_at: row.get(11),
        expires_at: row.get(12),
        ownership: row
            .get::<_, Option<Value>>(13)
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| unreadable_session(e.to_string()))?,
        only_new: row.get(14),
        only_existing: row.get(15),
    })
}

#[async_trait]
impl ConnectSessionRepository for PostgresStore {
    async fn create_connect_session(
        &self,
        token_hash: &[u8],
        session: &ConnectSession,
    ) -> Result<(), StoreError> {
        let document =
            serde_json::to_value(session).map_err(|e| unreadable_session(e.to_string()))?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO connect_sessions (token_hash, id, session, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &token_hash,
                    &session.id,
                    &document,
                    &session.created_at,
                    &session.expires_at,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn connect_session(
        &self,
        token_hash: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Option<ConnectSession>, StoreError> {
        let (client, statement) = self
            .prepared(
                "SELECT session FROM connect_sessions WHERE token_hash = $1 AND expires_at > $2",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&token_hash, &now])
            .await
            .map_err(db_error)?;
        row.map(|r| {
            serde_json::from_value(r.get::<_, Value>(0))
                .map_err(|e| unreadable_session(e.to_string()))
        })
        .transpose()
    }

    async fn delete_connect_session(&self, token_hash: &[u8]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM connect_sessions WHERE token_hash = $1",
                &[&token_hash],
            )
            .await
            .map_err(db_error)?;
        Ok(n > 0)
    }

    async fn sweep_connect_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM connect_sessions WHERE expires_at <= $1",
                &[&now],
            )
            .await
            .map_err(db_error)
    }
}
