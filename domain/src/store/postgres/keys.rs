//! The PostgreSQL [`KeyRepository`]: master-key records and wrapped data keys.

use async_trait::async_trait;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{PostgresStore, db_error};
use crate::keys::{KeyRepository, MasterKeyRecord, StoredDataKey, Wrapping};
use crate::store::StoreError;

/// Key of the transaction advisory lock that serializes master-key activation.
const MASTER_KEY_LOCK: i64 = 0x6772_616e_746b_6579; // "grantkey"

#[async_trait]
impl KeyRepository for PostgresStore {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT m.key_id, m.check_value, m.active, \
                        (SELECT count(*) FROM data_keys d WHERE d.master_key_id = m.key_id) \
                 FROM master_keys m ORDER BY m.created_at",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| MasterKeyRecord {
                key_id: r.get(0),
                check_value: r.get(1),
                active: r.get(2),
                data_keys: r.get::<_, i64>(3).unsigned_abs(),
            })
            .collect())
    }

    async fn knows_master_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM master_keys WHERE key_id = $1)",
                &[&key_id],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }

    async fn activate_master_key(
        &self,
        key_id: &str,
        check_value: &[u8],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_error)?;
        // Instances starting together would otherwise race on the one-active-key index, which
        // ON CONFLICT (key_id) does not arbitrate.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MASTER_KEY_LOCK])
            .await
            .map_err(db_error)?;
        tx.execute(
            "UPDATE master_keys SET active = false WHERE active AND key_id <> $1",
            &[&key_id],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO master_keys (key_id, check_value, active) VALUES ($1, $2, true) \
             ON CONFLICT (key_id) DO UPDATE SET active = true",
            &[&key_id, &check_value],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn forget_master_key(&self, key_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM master_keys WHERE key_id = $1 AND NOT active \
                 AND NOT EXISTS (SELECT 1 FROM data_keys WHERE master_key_id = $1)",
                &[&key_id],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn insert_data_key(
        &self,
        key_id: Uuid,
        owner: &str,
        wrapping: Wrapping<'_>,
    ) -> Result<(), StoreError> {
        let (client, statement) = self
            .prepared(
                "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped) VALUES ($1, $2, $3, $4)",
            )
            .await?;
        client
            .execute(
                &statement,
                &[&key_id, &owner, &wrapping.master_key_id, &wrapping.wrapped],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn insert_data_keys(
        &self,
        master_key_id: &str,
        keys: &[(Uuid, &str, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let ids: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let owners: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let wrapped: Vec<&[u8]> = keys.iter().map(|k| k.2.as_slice()).collect();
        let (client, statement) = self
            .prepared(
                "INSERT INTO data_keys (key_id, owner, master_key_id, wrapped) \
                 SELECT k.id, k.owner, $3, k.wrapped \
                 FROM unnest($1::uuid[], $2::text[], $4::bytea[]) AS k(id, owner, wrapped)",
            )
            .await?;
        client
            .execute(&statement, &[&ids, &owners, &master_key_id, &wrapped])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn data_key(&self, key_id: Uuid) -> Result<Option<StoredDataKey>, StoreError> {
        let (client, statement) = self
            .prepared(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys WHERE key_id = $1",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&key_id])
            .await
            .map_err(db_error)?;
        Ok(row.as_ref().map(stored_data_key))
    }

    async fn live_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        self.owner_key_ids(
            "SELECT key_id FROM data_keys WHERE owner = $1 AND wrapped IS NOT NULL \
             ORDER BY created_at, key_id",
            owner,
        )
        .await
    }

    async fn destroy_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        self.owner_key_ids(
            "UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = now() \
             WHERE owner = $1 AND wrapped IS NOT NULL RETURNING key_id",
            owner,
        )
        .await
    }

    async fn discard_data_keys(&self, key_ids: &[Uuid]) -> Result<(), StoreError> {
        if key_ids.is_empty() {
            return Ok(());
        }
        let (client, statement) = self
            .prepared("DELETE FROM data_keys WHERE key_id = ANY($1::uuid[])")
            .await?;
        client
            .execute(&statement, &[&key_ids])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn data_keys_to_rewrap(
        &self,
        active_master_key_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredDataKey>, StoreError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT key_id, owner, master_key_id, wrapped FROM data_keys \
                 WHERE master_key_id IS NOT NULL AND master_key_id <> $1 ORDER BY key_id LIMIT $2",
                &[&active_master_key_id, &limit],
            )
            .await
            .map_err(db_error)?;
        Ok(rows.iter().map(stored_data_key).collect())
    }

    async fn rewrap_data_key(
        &self,
        key: StoredDataKey,
        to: Wrapping<'_>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE data_keys SET master_key_id = $3, wrapped = $4 \
                 WHERE key_id = $1 AND master_key_id = $2",
                &[
                    &key.key_id,
                    &key.master_key_id,
                    &to.master_key_id,
                    &to.wrapped,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(n == 1)
    }
}

impl PostgresStore {
    /// The key ids `sql` answers for `owner` (its `$1`), in the order it answers them.
    async fn owner_key_ids(&self, sql: &str, owner: &str) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(sql, &[&owner])
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}

fn stored_data_key(row: &Row) -> StoredDataKey {
    StoredDataKey {
        key_id: row.get(0),
        owner: row.get(1),
        master_key_id: row.get(2),
        wrapped: row.get(3),
    }
}
