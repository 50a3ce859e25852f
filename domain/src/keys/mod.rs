//! Envelope encryption (AES-256-GCM) and crypto-shredding.
//!
//! A master key (from configuration, never stored) wraps data keys; each connection generation
//! and each integration gets its own data key, kept wrapped in the `data_keys` table outside the
//! log. Events carry only [`Sealed`] values: ciphertext, nonce and the data key's id.
//!
//! Guarantees:
//! - The database never holds a plaintext secret or an unwrapped key.
//! - [`Vault::destroy`] shreds an owner's data keys: its sealed values can then not be opened by
//!   anyone, the holder of the master key included, while the events stay.
//! - A wrong master key is refused when the vault opens, by the check value stored with each
//!   master key, not at the first decrypt.
//! - [`Vault::rotate`] re-wraps every data key under the active master key, one key per update,
//!   so it can be stopped and resumed at any point; events are never touched.
//! - [`Vault::fingerprint`] is keyed by one data key with a fixed id, the same for every instance
//!   on a database and across master-key rotations, so a token's fingerprint never changes.
//! - Opened data keys are cached in memory up to a capacity the caller sets
//!   ([`Vault::with_cache_capacity`]); [`Vault::cache_stats`] reports hits, misses, evictions and
//!   size. The cache lives in the room `cache`.

mod cache;

use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::store::{StoreError, StreamId};

use cache::KeyCache;
pub use cache::{CacheBudget, CacheStats, DEFAULT_KEY_CACHE_CAPACITY, KEY_ENTRY_BYTES};

const NONCE_LEN: usize = 12;
const CHECK_PLAINTEXT: &[u8] = b"grantline master key check v1";
/// The owner of the fingerprint key in `data_keys`; no stream is named like this.
const FINGERPRINT_KEY_OWNER: &str = "system-fingerprint";
/// The name the fingerprint key's fixed id is derived from.
const FINGERPRINT_KEY_NAME: &[u8] = b"grantline.fingerprint-key";
/// How many bytes of the HMAC a fingerprint shows.
const FINGERPRINT_BYTES: usize = 8;

/// The id of the fingerprint key: fixed, so every instance on a database finds the same key.
fn fingerprint_key_id() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, FINGERPRINT_KEY_NAME)
}

/// A failure to seal, open or manage keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured master key is not base64 of exactly 32 bytes.
    #[error("a master key must be base64 of exactly 32 bytes ({0})")]
    MasterKeyFormat(String),
    /// The configured master key is not the one the database's data keys are wrapped with.
    #[error(
        "the master key (id {given}) does not match the database's active master key (id \
         {active}): its key check value failed. To rotate keys, configure the old key as the \
         previous key"
    )]
    WrongMasterKey { given: String, active: String },
    /// Data keys are wrapped by a master key that is not configured.
    #[error("{count} data keys are wrapped by master key {key_id}, which is not configured")]
    MissingMasterKey { key_id: String, count: u64 },
    /// The configured previous key is not the one data keys are still wrapped by.
    #[error(
        "data keys are still wrapped by master key {key_id}, neither this key nor the previous \
         one ({given}): finish that rotation first (`grantline keys rotate` with it as previous)"
    )]
    WrongPreviousKey { given: String, key_id: String },
    /// No data key with this id exists.
    #[error("data key {0} does not exist")]
    UnknownDataKey(Uuid),
    /// The data key was destroyed: whatever it sealed is gone for good.
    #[error("data key {0} was destroyed; the secrets it sealed are shredded")]
    Shredded(Uuid),
    /// Authentication of a ciphertext failed: wrong key or tampered data.
    #[error("decryption failed: wrong key or tampered ciphertext")]
    Decrypt,
    /// A sealed value decrypted but is not the expected JSON.
    #[error("sealed value is not the expected data: {0}")]
    Format(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A master key. Its `Debug` shows only its id.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl MasterKey {
    /// Parses base64 of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|e| KeyError::MasterKeyFormat(format!("not base64: {e}")))?,
        );
        if bytes.len() != 32 {
            return Err(KeyError::MasterKeyFormat(format!(
                "{} bytes after decoding",
                bytes.len()
            )));
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// A new random key.
    pub fn generate() -> (Self, Zeroizing<String>) {
        let key = Aes256Gcm::generate_key(OsRng);
        let encoded = Zeroizing::new(BASE64.encode(key.as_slice()));
        (Self::from_bytes(key.as_slice()), encoded)
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"grantline master key id\0");
        hasher.update(bytes);
        let digest = hasher.finalize();
        let id = hex::encode(&digest[..8]);
        Self {
            id,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)),
        }
    }

    /// A short identifier derived from the key; safe to store and print.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A fresh check value: the key-check plaintext sealed under this key.
    pub fn check_value(&self) -> Vec<u8> {
        encrypt(&self.cipher, CHECK_PLAINTEXT, self.id.as_bytes())
    }

    /// Whether `check_value` was made by this key.
    pub fn verifies(&self, check_value: &[u8]) -> bool {
        decrypt(&self.cipher, check_value, self.id.as_bytes())
            .is_ok_and(|plain| plain.as_slice() == CHECK_PLAINTEXT)
    }

    fn wrap(&self, key_id: Uuid, data_key: &Key<Aes256Gcm>) -> Vec<u8> {
        encrypt(&self.cipher, data_key.as_slice(), key_id.as_bytes())
    }

    /// `wrapped`, which [`wrap`](Self::wrap) made, as the repository stores it.
    fn wrapping<'a>(&'a self, wrapped: &'a [u8]) -> Wrapping<'a> {
        Wrapping {
            master_key_id: &self.id,
            wrapped,
        }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

fn encrypt(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce = Aes256Gcm::generate_nonce(OsRng);
    let mut out = nonce.to_vec();
    // Encryption with a valid key and an in-memory buffer cannot fail (aes-gcm only errors on
    // plaintexts beyond 64 GiB).
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default();
    out.extend_from_slice(&sealed);
    out
}

fn decrypt(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if sealed.len() < NONCE_LEN {
        return Err(KeyError::Decrypt);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| KeyError::Decrypt)
}

/// An HMAC-SHA256 keyed with `key`.
fn fingerprint_mac(key: &[u8]) -> Result<Hmac<Sha256>, KeyError> {
    // HMAC takes keys of any length; the error cannot occur.
    <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key).map_err(|_| KeyError::Decrypt)
}

/// A secret sealed under a data key, as it appears in event payloads.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The data key that sealed it.
    pub key_id: Uuid,
    /// Base64 of nonce ‖ ciphertext ‖ tag.
    #[serde(with = "base64_bytes")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed(key {}, {} bytes)",
            self.key_id,
            self.ciphertext.len()
        )
    }
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A master key as recorded in the database.
#[derive(Clone, Debug)]
pub struct MasterKeyRecord {
    pub key_id: String,
    pub check_value: Vec<u8>,
    pub active: bool,
    /// Live data keys wrapped by it.
    pub data_keys: u64,
}

/// A data key row: `wrapped` and `master_key_id` are `None` once destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDataKey {
    pub key_id: Uuid,
    pub owner: String,
    pub master_key_id: Option<String>,
    pub wrapped: Option<Vec<u8>>,
}

/// A live data key as one master key wrapped it: the two columns a rewrap replaces together.
#[derive(Clone, Copy, Debug)]
pub struct Wrapping<'a> {
    /// The master key that wrapped it.
    pub master_key_id: &'a str,
    /// The data key, wrapped.
    pub wrapped: &'a [u8],
}

/// Storage of master-key records and wrapped data keys (each database backend implements it).
#[async_trait]
pub trait KeyRepository: Send + Sync {
    async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, StoreError>;
    /// Whether the database has the record of master key `key_id`.
    async fn knows_master_key(&self, key_id: &str) -> Result<bool, StoreError>;
    /// Records the key if new and makes it the only active one.
    async fn activate_master_key(&self, key_id: &str, check_value: &[u8])
    -> Result<(), StoreError>;
    /// Removes an inactive master key's record once no data key depends on it.
    async fn forget_master_key(&self, key_id: &str) -> Result<(), StoreError>;
    async fn insert_data_key(
        &self,
        key_id: Uuid,
        owner: &str,
        wrapping: Wrapping<'_>,
    ) -> Result<(), StoreError>;
    /// Inserts many data keys in one write, all wrapped by `master_key_id`: each `(key_id,
    /// owner, wrapped)`.
    async fn insert_data_keys(
        &self,
        master_key_id: &str,
        keys: &[(Uuid, &str, Vec<u8>)],
    ) -> Result<(), StoreError>;
    async fn data_key(&self, key_id: Uuid) -> Result<Option<StoredDataKey>, StoreError>;
    /// The ids of `owner`'s live (not yet destroyed) data keys.
    async fn live_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError>;
    /// Destroys every live data key of `owner`; returns their ids.
    async fn destroy_data_keys(&self, owner: &str) -> Result<Vec<Uuid>, StoreError>;
    /// Removes the records of data keys that nothing was sealed with (a batch whose append was
    /// refused): no event names them, so no history is lost.
    async fn discard_data_keys(&self, key_ids: &[Uuid]) -> Result<(), StoreError>;
    /// Live data keys not wrapped by the active master key.
    async fn data_keys_to_rewrap(
        &self,
        active_master_key_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredDataKey>, StoreError>;
    /// Replaces `key`'s wrapping with `to` if the key is still wrapped by the master key it was
    /// read with (`false`, nothing changed, otherwise).
    async fn rewrap_data_key(
        &self,
        key: StoredDataKey,
        to: Wrapping<'_>,
    ) -> Result<bool, StoreError>;
}

/// Seals and opens secrets; creates, caches and destroys data keys.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<VaultInner>,
}

struct VaultInner {
    repository: Arc<dyn KeyRepository>,
    active: MasterKey,
    previous: Option<MasterKey>,
    /// Opened data keys, bounded.
    cache: KeyCache,
    /// The fingerprint HMAC, keyed once per vault (the key never changes).
    fingerprint: tokio::sync::OnceCell<Hmac<Sha256>>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vault(active {})", self.inner.active.id)
    }
}

/// What a rotation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    pub rewrapped: u64,
}

impl Vault {
    /// Opens the vault with the configured `active` key (and the `previous` one during a
    /// rotation), checking them against the database's records.
    ///
    /// A new database records `active`. A database whose active key is `previous` switches to
    /// `active` (new data keys are wrapped with it; [`Vault::rotate`] re-wraps the old ones).
    /// Anything else is [`KeyError::WrongMasterKey`], and data keys wrapped by a key that is not
    /// configured are [`KeyError::MissingMasterKey`].
    pub async fn open(
        repository: Arc<dyn KeyRepository>,
        active: MasterKey,
        previous: Option<MasterKey>,
    ) -> Result<Self, KeyError> {
        let records = repository.master_keys().await?;
        let known = |key: &MasterKey| records.iter().find(|r| r.key_id == key.id);
        if let Some(record) = known(&active)
            && !active.verifies(&record.check_value)
        {
            return Err(KeyError::WrongMasterKey {
                given: active.id.clone(),
                active: record.key_id.clone(),
            });
        }
        let current = records.iter().find(|r| r.active);
        if let Some(current) = current.filter(|c| c.key_id != active.id) {
            let previous_matches = previous
                .as_ref()
                .is_some_and(|p| p.id == current.key_id && p.verifies(&current.check_value));
            if !previous_matches {
                return Err(KeyError::WrongMasterKey {
                    given: active.id.clone(),
                    active: current.key_id.clone(),
                });
            }
        }
        // Before anything changes: a start that fails leaves the active key as it was.
        let configured =
            |id: &str| id == active.id || previous.as_ref().is_some_and(|p| p.id == id);
        if let Some(missing) = records
            .iter()
            .find(|r| r.data_keys > 0 && !configured(&r.key_id))
        {
            let (key_id, count) = (missing.key_id.clone(), missing.data_keys);
            return Err(match &previous {
                Some(p) => KeyError::WrongPreviousKey {
                    given: p.id.clone(),
                    key_id,
                },
                None => KeyError::MissingMasterKey { key_id, count },
            });
        }
        if current.is_none_or(|c| c.key_id != active.id) {
            if let Some(current) = current {
                if known(&active).is_some() {
                    tracing::warn!(
                        key_id = %active.id, replaced = %current.key_id,
                        "the configured master key was retired by an earlier rotation and is \
                         active again (are GRANTLINE_ENCRYPTION_KEY and \
                         GRANTLINE_ENCRYPTION_KEY_PREVIOUS swapped?)"
                    );
                } else {
                    tracing::info!(
                        key_id = %active.id, replaced = %current.key_id,
                        "a new master key is active; `grantline keys rotate` re-wraps the data keys"
                    );
                }
            }
            repository
                .activate_master_key(&active.id, &active.check_value())
                .await?;
        }
        Ok(Self {
            inner: Arc::new(VaultInner {
                repository,
                active,
                previous,
                cache: KeyCache::new(DEFAULT_KEY_CACHE_CAPACITY),
                fingerprint: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The id of the master key new data keys are wrapped with.
    pub fn active_key_id(&self) -> &str {
        &self.inner.active.id
    }

    /// Creates a data key for `owner` (a connection generation or an integration) and stores it
    /// wrapped. Returns its id.
    pub async fn create_data_key(&self, owner: &StreamId) -> Result<Uuid, KeyError> {
        let key_id = Uuid::new_v4();
        let key: cache::KeyBytes = Arc::new(Zeroizing::new(Aes256Gcm::generate_key(OsRng).into()));
        let wrapped = self
            .inner
            .active
            .wrap(key_id, Key::<Aes256Gcm>::from_slice(&key[..]));
        self.inner
            .repository
            .insert_data_key(key_id, owner.as_str(), self.inner.active.wrapping(&wrapped))
            .await?;
        self.inner.cache.insert(key_id, key);
        Ok(key_id)
    }

    /// Creates a data key for each of `owners` in one write (a bulk import); their ids, in order.
    pub async fn create_data_keys(&self, owners: &[StreamId]) -> Result<Vec<Uuid>, KeyError> {
        let mut rows = Vec::with_capacity(owners.len());
        let mut opened = Vec::with_capacity(owners.len());
        for owner in owners {
            let key_id = Uuid::new_v4();
            let key: cache::KeyBytes =
                Arc::new(Zeroizing::new(Aes256Gcm::generate_key(OsRng).into()));
            let wrapped = self
                .inner
                .active
                .wrap(key_id, Key::<Aes256Gcm>::from_slice(&key[..]));
            rows.push((key_id, owner.as_str(), wrapped));
            opened.push((key_id, key));
        }
        self.inner
            .repository
            .insert_data_keys(&self.inner.active.id, &rows)
            .await?;
        Ok(opened
            .into_iter()
            .map(|(key_id, key)| {
                self.inner.cache.insert(key_id, key);
                key_id
            })
            .collect())
    }

    /// Keeps `stored` (as the key store holds it, read with something else in one query) opened
    /// in the cache, so that the next seal or unseal with it asks the store nothing. A key the
    /// cache has, a shredded one or one of a master key this vault does not hold is left alone:
    /// the next use asks the store and answers as it would have.
    pub fn prime(&self, stored: &StoredDataKey) {
        if self.inner.cache.get(&stored.key_id).is_some() {
            return;
        }
        let (Some(master_id), Some(wrapped)) = (&stored.master_key_id, &stored.wrapped) else {
            return;
        };
        if let Ok(raw) = self.unwrap_with(master_id, stored.key_id, wrapped)
            && let Ok(bytes) = <[u8; 32]>::try_from(&raw[..])
        {
            self.inner
                .cache
                .insert(stored.key_id, Arc::new(Zeroizing::new(bytes)));
        }
    }

    /// Seals `plaintext` under the data key `key_id`.
    pub async fn seal(&self, key_id: Uuid, plaintext: &[u8]) -> Result<Sealed, KeyError> {
        let cipher = self.data_key(key_id).await?;
        Ok(Sealed {
            key_id,
            ciphertext: encrypt(&cipher, plaintext, key_id.as_bytes()),
        })
    }

    /// Seals `value` serialized as JSON.
    pub async fn seal_json<T: Serialize>(
        &self,
        key_id: Uuid,
        value: &T,
    ) -> Result<Sealed, KeyError> {
        let plain =
            Zeroizing::new(serde_json::to_vec(value).map_err(|e| KeyError::Format(e.to_string()))?);
        self.seal(key_id, &plain).await
    }

    /// Opens a sealed value. [`KeyError::Shredded`] once its data key is destroyed.
    pub async fn unseal(&self, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let cipher = self.data_key(sealed.key_id).await?;
        decrypt(&cipher, &sealed.ciphertext, sealed.key_id.as_bytes())
    }

    /// Opens a sealed JSON value.
    pub async fn unseal_json<T: DeserializeOwned>(&self, sealed: &Sealed) -> Result<T, KeyError> {
        let plain = self.unseal(sealed).await?;
        // serde's message can quote the plaintext: keep only where it failed.
        serde_json::from_slice(&plain).map_err(|e| {
            KeyError::Format(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }

    /// The ids of `owner`'s data keys that are not destroyed yet: every generation's, and any
    /// created for an append that never landed.
    pub async fn live_keys(&self, owner: &StreamId) -> Result<Vec<Uuid>, KeyError> {
        Ok(self.inner.repository.live_data_keys(owner.as_str()).await?)
    }

    /// Destroys every data key of `owner`: their sealed values become unrecoverable.
    pub async fn destroy(&self, owner: &StreamId) -> Result<u64, KeyError> {
        let destroyed = self
            .inner
            .repository
            .destroy_data_keys(owner.as_str())
            .await?;
        // Drop the cached copies of exactly these keys: the rest of the cache stays warm. A key
        // destroyed earlier, by another instance, is dropped by the log follower.
        self.forget_cached(&destroyed);
        Ok(destroyed.len() as u64)
    }

    /// Removes the data keys `key_ids`, which sealed nothing that was written (a bulk import's
    /// append that another writer beat), so that they do not stay behind as live keys of
    /// connections that never used them.
    pub async fn discard(&self, key_ids: &[Uuid]) -> Result<(), KeyError> {
        self.inner.repository.discard_data_keys(key_ids).await?;
        self.forget_cached(key_ids);
        Ok(())
    }

    /// Drops these data keys from this process's memory. Every instance calls it for the keys a
    /// deletion shredded (seen in the log), so a key destroyed by another instance stops opening
    /// anything here too, not only after an eviction or a restart.
    pub fn forget_cached(&self, key_ids: &[Uuid]) {
        for key_id in key_ids {
            self.inner.cache.remove(key_id);
        }
    }

    /// Drops every cached data key (a later use re-reads it from the database).
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }

    /// The same vault with an empty cache of at most `capacity` opened data keys (at least one;
    /// [`DEFAULT_KEY_CACHE_CAPACITY`] unless set). Past it the least useful keys are evicted one
    /// at a time; an evicted key is read and unwrapped again at its next use. Clones of the vault
    /// made before keep the old cache.
    ///
    /// Evicted keys are wiped once released: see the guarantees of the cache room
    /// (`keys/cache.rs`).
    pub fn with_cache_capacity(self, capacity: usize) -> Self {
        self.with_cache(KeyCache::new(capacity))
    }

    /// [`Vault::with_cache_capacity`], the capacity given as a number of keys or the memory
    /// they may take ([`KEY_ENTRY_BYTES`] each).
    pub fn with_cache_budget(self, budget: CacheBudget) -> Self {
        let mut cache = KeyCache::new(budget.entries(KEY_ENTRY_BYTES));
        if let CacheBudget::Bytes(bytes) = budget {
            cache.budget_bytes = bytes;
        }
        self.with_cache(cache)
    }

    fn with_cache(self, cache: KeyCache) -> Self {
        Self {
            inner: Arc::new(VaultInner {
                repository: self.inner.repository.clone(),
                active: self.inner.active.clone(),
                previous: self.inner.previous.clone(),
                cache,
                fingerprint: self.inner.fingerprint.clone(),
            }),
        }
    }

    /// What the cache of opened data keys has done since the vault was opened (hits, misses,
    /// evictions) and holds now (entries, capacity): for `/metrics`.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The master keys the database knows, with how many live data keys each wraps: a rotation
    /// is complete when only the active one wraps any.
    pub async fn master_keys(&self) -> Result<Vec<MasterKeyRecord>, KeyError> {
        Ok(self.inner.repository.master_keys().await?)
    }

    /// Whether a key rotation (run with another key) retired this instance's active master key:
    /// its record is gone, so no data key can be wrapped with it any more.
    pub async fn active_key_retired(&self) -> Result<bool, KeyError> {
        let known = self.inner.repository.knows_master_key(self.active_key_id());
        Ok(!known.await?)
    }

    /// Re-wraps every data key that is not under the active master key, in batches of `batch`,
    /// calling `progress` with the running count. Safe to interrupt and run again.
    pub async fn rotate(
        &self,
        batch: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<RotationReport, KeyError> {
        let active = &self.inner.active;
        let mut report = RotationReport::default();
        loop {
            let keys = self
                .inner
                .repository
                .data_keys_to_rewrap(&active.id, batch.max(1))
                .await?;
            if keys.is_empty() {
                break;
            }
            for stored in keys {
                let (Some(master_id), Some(wrapped)) = (&stored.master_key_id, &stored.wrapped)
                else {
                    continue;
                };
                let raw = self.unwrap_with(master_id, stored.key_id, wrapped)?;
                let rewrapped = active.wrap(stored.key_id, Key::<Aes256Gcm>::from_slice(&raw));
                if self
                    .inner
                    .repository
                    .rewrap_data_key(stored, active.wrapping(&rewrapped))
                    .await?
                {
                    report.rewrapped += 1;
                    progress(report.rewrapped);
                }
            }
        }
        for record in self.inner.repository.master_keys().await? {
            if !record.active && record.data_keys == 0 {
                self.inner
                    .repository
                    .forget_master_key(&record.key_id)
                    .await?;
            }
        }
        Ok(report)
    }

    /// A short keyed fingerprint of `secret` (`fp_` and 16 hex digits: the first 8 bytes of an
    /// HMAC-SHA256), so that auditors can tell token generations apart without seeing a token.
    ///
    /// The same secret has the same fingerprint on every instance sharing the database and
    /// across master-key rotations: the HMAC key is a data key with a fixed id, created by the
    /// first instance that needs it (when two race, the loser reads the winner's key).
    pub async fn fingerprint(&self, secret: &str) -> Result<String, KeyError> {
        let keyed = self
            .inner
            .fingerprint
            .get_or_try_init(|| self.fingerprint_key())
            .await?;
        let mut mac = keyed.clone();
        Mac::update(&mut mac, secret.as_bytes());
        let tag = mac.finalize().into_bytes();
        Ok(format!("fp_{}", hex::encode(&tag[..FINGERPRINT_BYTES])))
    }

    /// The fingerprint HMAC keyed with the fingerprint data key, which is created if missing.
    async fn fingerprint_key(&self) -> Result<Hmac<Sha256>, KeyError> {
        let key_id = fingerprint_key_id();
        if let Some(raw) = self.raw_data_key(key_id).await? {
            return fingerprint_mac(&raw);
        }
        let key = Zeroizing::new(Aes256Gcm::generate_key(OsRng).to_vec());
        let wrapped = self
            .inner
            .active
            .wrap(key_id, Key::<Aes256Gcm>::from_slice(&key));
        match self
            .inner
            .repository
            .insert_data_key(
                key_id,
                FINGERPRINT_KEY_OWNER,
                self.inner.active.wrapping(&wrapped),
            )
            .await
        {
            Ok(()) => fingerprint_mac(&key),
            // Most likely another instance inserted it first (the repository does not tell a
            // unique violation apart): theirs is the key. If it is still missing, the insert
            // failed for another reason, which is the error to report.
            Err(insert_error) => match self.raw_data_key(key_id).await? {
                Some(raw) => fingerprint_mac(&raw),
                None => Err(insert_error.into()),
            },
        }
    }

    /// The plaintext bytes of a data key, read from the repository and unwrapped; `None` if it
    /// does not exist, [`KeyError::Shredded`] once destroyed.
    async fn raw_data_key(&self, key_id: Uuid) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        let Some(stored) = self.inner.repository.data_key(key_id).await? else {
            return Ok(None);
        };
        let (Some(master_id), Some(wrapped)) = (stored.master_key_id, stored.wrapped) else {
            return Err(KeyError::Shredded(key_id));
        };
        self.unwrap_with(&master_id, key_id, &wrapped).map(Some)
    }

    /// The plaintext bytes of the data key `key_id`, unwrapped by the master key `master_id`.
    fn unwrap_with(
        &self,
        master_id: &str,
        key_id: Uuid,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let master = self
            .master(master_id)
            .ok_or_else(|| KeyError::MissingMasterKey {
                key_id: master_id.to_owned(),
                count: 1,
            })?;
        let bytes = decrypt(&master.cipher, wrapped, key_id.as_bytes())?;
        if bytes.len() != 32 {
            return Err(KeyError::Decrypt);
        }
        Ok(bytes)
    }

    fn master(&self, id: &str) -> Option<&MasterKey> {
        if self.inner.active.id == id {
            return Some(&self.inner.active);
        }
        self.inner.previous.as_ref().filter(|p| p.id == id)
    }

    /// The opened data key `key_id`, from the cache or else unwrapped and cached.
    /// The cache keeps the key's bytes; the cipher is expanded from them for each use.
    async fn data_key(&self, key_id: Uuid) -> Result<Aes256Gcm, KeyError> {
        let key = match self.inner.cache.get(&key_id) {
            Some(key) => key,
            None => {
                let raw = self
                    .raw_data_key(key_id)
                    .await?
                    .ok_or(KeyError::UnknownDataKey(key_id))?;
                let bytes = <[u8; 32]>::try_from(&raw[..]).map_err(|_| KeyError::Decrypt)?;
                let key = Arc::new(Zeroizing::new(bytes));
                self.inner.cache.insert(key_id, key.clone());
                key
            }
        };
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_key_id_is_pinned() {
        // Every database's fingerprint key has this id; changing it changes every fingerprint.
        assert_eq!(
            fingerprint_key_id().to_string(),
            "818e3b46-1c4d-593e-8393-1c2d3bd97082"
        );
    }
}
