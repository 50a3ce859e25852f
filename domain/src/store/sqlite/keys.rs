//! The SQLite [`KeyRepository`]: master-key records and wrapped data keys.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::{SqliteStore, db_error, now_micros};
use crate::keys::{KeyRepository, MasterKeyRecord, StoredDataKey, Wrapping};
use crate::store::StoreError;

/// `wrapping`'s columns, owned for the writer connection.
fn owned(wrapping: Wrapping<'_>) -> (String, Vec<u8>) {
    (wrapping.master_key_id.to_owned(), wrapping.wrapped.to_vec())
}

fn stored_data_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDataKey> {
    let key_id: String = row.get(0)?;
    Ok(StoredDataKey {
        key_id: Uuid::parse_str(&key_id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })?,
        owner: row.get(1)?,
        master_key_id: row.get(2)?,
        wrapped: row.get(3)?,
    })
}

#[async_trait]
impl KeyRepository for SqliteStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare(
                    "SELECT m.key_id, m.check_value, m.active, \
                            (SELECT count(*) FROM data_keys d WHERE d.master_key_id = m.key_id) \
                     FROM master_keys m ORDER BY m.created_at",
                )
                .map_err(db_error)?;
            let rows = statement
                .query_map([], |r| {
                    Ok(MasterKeyRecord {
                        key_id: r.get(0)?,
                        check_value: r.get(1)?,
                        active: r.get(2)?,
                        data_keys: r.get::<_, i64>(3)?.unsigned_abs(),
                    })
                })
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn knows_master_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let key_id = key_id.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM master_keys WHERE key_id = ?1)",
                [&key_id],
                |r| r.get(0),
            )
            .map_err(db_error)
        })
        .await
    }

    async fn activate_master_key(
        &self,
        key_id: &str,
        check_value: &[u8],
    ) -> Result<(), StoreError> {
        let (key_id, check_value) = (key_id.to_owned(), check_value.to_vec());
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            tx.execute(
                "UPDATE master_keys SET active = 0 WHERE active = 1 AND key_id <> ?1",
                [&key_id],
            )
            .map_err(db_error)?;
            tx.execute(
                "INSERT INTO master_keys (key_id, check_value, active, created_at) \
                 VALUES (?1, ?2, 1, ?3) ON CONFLICT (key_id) DO UPDATE SET active = 1",
                params![key_id, check_value, now_micros()],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)
        })
        .await
    }

    async fn forget_master_key(&self, key_id: &str) -> Result<(), StoreError> {
        let key_id = key_id.to_owned();
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM master_keys WHERE key_id = ?1 AND active = 0 \
                 AND NOT EXISTS (SELECT 1 FROM data_keys WHERE master_key_id = ?1)",
                [&key_id],
            )
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn insert_data_key(
        &self,
        key_id: Uuid,
        owner: &str,
        wrapping: Wrapping<'_>,
    ) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        let (master_key_id, wrapped) = owned(wrapping);
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key_id.to_string(),
                    owner,
                    master_key_id,
                    wrapped,
                    now_micros()
                ])
            })
            .map(|_| ())
            .map_err(db_error)
        })
        .await
    }

    async fn insert_data_keys(
        &self,
        master_key_id: &str,
        keys: &[(Uuid, &str, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let master_key_id = master_key_id.to_owned();
        let keys: Vec<(String, String, Vec<u8>)> = keys
            .iter()
            .map(|(id, owner, wrapped)| (id.to_string(), (*owner).to_owned(), wrapped.clone()))
            .collect();
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped, created_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(db_error)?;
                let now = now_micros();
                for (key_id, owner, wrapped) in &keys {
                    insert
                        .execute(params![key_id, owner, master_key_id, wrapped, now])
                        .map_err(db_error)?;
                }
            }
            tx.commit().map_err(db_error)
        })
        .await
    }

    async fn data_key(&self, key_id: Uuid) -> Result<Option<StoredDataKey>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys WHERE key_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([key_id.to_string()], stored_data_key)
                    .optional()
            })
            .map_err(db_error)
        })
        .await
    }

    async fn live_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        let owner = owner.to_owned();
        self.read(move |conn| {
            let ids = conn
                .prepare_cached(
                    "SELECT key_id FROM data_keys WHERE owner = ?1 AND wrapped IS NOT NULL \
                     ORDER BY created_at, key_id",
                )
                .and_then(|mut s| {
                    s.query_map([owner], |row| row.get::<_, String>(0))?
                        .collect::<Result<Vec<String>, _>>()
                })
                .map_err(db_error)?;
            parse_ids(&ids)
        })
        .await
    }

    async fn discard_data_keys(&self, key_ids: &[Uuid]) -> Result<(), StoreError> {
        if key_ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = key_ids.iter().map(Uuid::to_string).collect();
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            {
                let mut delete = tx
                    .prepare_cached("DELETE FROM data_keys WHERE key_id = ?1")
                    .map_err(db_error)?;
                for id in &ids {
                    delete.execute([id]).map_err(db_error)?;
                }
            }
            tx.commit().map_err(db_error)
        })
        .await
    }

    async fn destroy_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            let mut statement = conn
                .prepare(
                    "UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = ?2 \
                     WHERE owner = ?1 AND wrapped IS NOT NULL RETURNING key_id",
                )
                .map_err(db_error)?;
            let ids = statement
                .query_map(params![owner, now_micros()], |row| row.get::<_, String>(0))
                .map_err(db_error)?
                .collect::<Result<Vec<String>, _>>()
                .map_err(db_error)?;
            drop(statement);
            if !ids.is_empty() {
                // The wrapped keys may still stand in the write-ahead log's older frames: copy
                // the log into the file (whose freed bytes secure_delete zeroes) and empty it.
                // Best effort: a reader mid-snapshot leaves the rest to the next checkpoint.
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .map_err(db_error)?;
            }
            parse_ids(&ids)
        })
        .await
    }

    async fn data_keys_to_rewrap(
        &self,
        active_master_key_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredDataKey>, StoreError> {
        let active = active_master_key_id.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut statement = conn
                .prepare(
                    "SELECT key_id, owner, master_key_id, wrapped FROM data_keys \
                     WHERE master_key_id IS NOT NULL AND master_key_id <> ?1 \
                     ORDER BY key_id LIMIT ?2",
                )
                .map_err(db_error)?;
            let rows = statement
                .query_map(params![active, limit], stored_data_key)
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn rewrap_data_key(
        &self,
        key: StoredDataKey,
        to: Wrapping<'_>,
    ) -> Result<bool, StoreError> {
        let (key_id, from) = (key.key_id, key.master_key_id);
        let (to, wrapped) = owned(to);
        self.write(move |conn| {
            conn.execute(
                "UPDATE data_keys SET master_key_id = ?3, wrapped = ?4 \
                 WHERE key_id = ?1 AND master_key_id = ?2",
                params![key_id.to_string(), from, to, wrapped],
            )
            .map(|n| n == 1)
            .map_err(db_error)
        })
        .await
    }
}

/// Key ids as SQLite stores them (text), parsed.
fn parse_ids(ids: &[String]) -> Result<Vec<Uuid>, StoreError> {
    ids.iter()
        .map(|id| {
            Uuid::parse_str(id)
                .map_err(|e| StoreError::Database(format!("data key id {id:?}: {e}")))
        })
        .collect()
}
