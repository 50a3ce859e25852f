//! Import from a self-hosted Nango: its integrations (client secrets opened) and its live
//! connections of one environment, each turned into the `POST /connections` body it stands
//! for, so that they pass the same checks and writes as a file of JSON lines.
//!
//! Nango seals each secret with AES-256-GCM under `NANGO_ENCRYPTION_KEY` (base64 of 32 bytes),
//! a random 12-byte IV per value, and keeps the ciphertext, the IV and the 16-byte tag as base64
//! in separate places: a connection's `credentials` is `{"encrypted_credentials": …}` beside
//! `credentials_iv` and `credentials_tag`, and holds the credentials' JSON; an integration's
//! `oauth_client_secret` beside `oauth_client_secret_iv`/`_tag` holds the secret itself. A value
//! whose IV or tag is NULL was stored in plaintext.

use std::collections::VecDeque;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use domain::catalog::Catalog;
use domain::commands::IntegrationConfig;
use domain::credentials::ClientSecret;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::store::{ConnectionRow, IntegrationRow, NangoDatabase};
use super::{LineError, LineFault, Record, Source};

/// The credential types Grantline takes today (Nango's `type`).
const SUPPORTED: [&str; 5] = ["OAUTH2", "OAUTH1", "API_KEY", "BASIC", "OAUTH2_CC"];

/// Connections read from Nango at a time.
const PAGE: i64 = 1000;

/// `NANGO_ENCRYPTION_KEY`, opened.
pub struct NangoKey(Aes256Gcm);

impl std::fmt::Debug for NangoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NangoKey(..)")
    }
}

impl NangoKey {
    /// The key from its base64 form.
    pub fn from_base64(text: &str) -> anyhow::Result<Self> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| anyhow::anyhow!("NANGO_ENCRYPTION_KEY is not base64"))?,
        );
        if bytes.len() != 32 {
            anyhow::bail!(
                "NANGO_ENCRYPTION_KEY must decode to 32 bytes, not {}",
                bytes.len()
            );
        }
        Ok(Self(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes))))
    }

    /// Opens one value stored as base64 ciphertext, IV and tag.
    fn open(&self, ciphertext: &str, iv: &str, tag: &str) -> Result<Zeroizing<Vec<u8>>, LineFault> {
        let undecodable = |what: &str| LineFault {
            code: "cannot_decrypt",
            message: format!("the stored {what} is not base64 of the right length"),
        };
        let decode = |text: &str| STANDARD.decode(text.trim());
        let iv = decode(iv)
            .ok()
            .filter(|iv| iv.len() == 12)
            .ok_or_else(|| undecodable("IV"))?;
        let tag = decode(tag)
            .ok()
            .filter(|tag| tag.len() == 16)
            .ok_or_else(|| undecodable("tag"))?;
        let mut sealed = decode(ciphertext).map_err(|_| undecodable("ciphertext"))?;
        sealed.extend_from_slice(&tag);
        self.0
            .decrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: b"",
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| LineFault {
                code: "cannot_decrypt",
                message: "the secret does not open with this NANGO_ENCRYPTION_KEY (wrong key?)"
                    .into(),
            })
    }
}

/// A Nango integration to create here, or why it cannot be.
#[derive(Debug)]
pub enum PlannedIntegration {
    /// Not here yet: created before the connections are written.
    Create {
        key: String,
        config: IntegrationConfig,
    },
    /// An integration of this key exists here already and is kept as it is.
    Kept { key: String },
}

/// What Nango's integrations become: the plan, and the integrations that cannot come over.
pub fn plan_integrations(
    rows: Vec<IntegrationRow>,
    key: &NangoKey,
    catalog: &Catalog,
    existing: &dyn Fn(&str) -> bool,
) -> (Vec<PlannedIntegration>, Vec<LineError>) {
    let mut planned = Vec::new();
    let mut errors = Vec::new();
    for row in rows {
        let at = format!("Nango integration {:?}", row.unique_key);
        if existing(&row.unique_key) {
            planned.push(PlannedIntegration::Kept {
                key: row.unique_key,
            });
            continue;
        }
        if catalog.get(&row.provider).is_none() {
            errors.push(LineError {
                at,
                fault: LineFault {
                    code: "unknown_provider_template",
                    message: format!(
                        "provider {:?} is not a template here (add it with \
                         GRANTLINE_PROVIDERS_FILE)",
                        row.provider
                    ),
                },
            });
            continue;
        }
        let secret = match (
            &row.client_secret,
            &row.client_secret_iv,
            &row.client_secret_tag,
        ) {
            (None, _, _) => Ok(Zeroizing::new(String::new())),
            (Some(plain), None, _) | (Some(plain), _, None) => Ok(Zeroizing::new(plain.clone())),
            (Some(sealed), Some(iv), Some(tag)) => key.open(sealed, iv, tag).and_then(|bytes| {
                String::from_utf8(bytes.to_vec())
                    .map(Zeroizing::new)
                    .map_err(|_| LineFault {
                        code: "cannot_decrypt",
                        message: "the client secret is not text".into(),
                    })
            }),
        };
        match secret {
            Ok(secret) => planned.push(PlannedIntegration::Create {
                key: row.unique_key,
                config: IntegrationConfig {
                    provider: row.provider,
                    oauth_client_id: row.client_id.unwrap_or_default(),
                    client_secret: ClientSecret::new(secret.as_str()),
                    oauth_scopes: row
                        .scopes
                        .unwrap_or_default()
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    display_name: None,
                },
            }),
            Err(fault) => errors.push(LineError { at, fault }),
        }
    }
    (planned, errors)
}

/// How many connections came with ownership: tags, an end user.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// Connections with tags.
    pub tagged: u64,
    /// Connections linked to an end user.
    pub with_end_user: u64,
}

/// The live connections of one Nango environment, as records.
pub struct NangoConnections<'a> {
    database: &'a NangoDatabase,
    key: &'a NangoKey,
    environment: i64,
    /// Connections of auth modes Grantline does not take yet are left out (and counted)
    /// instead of refused.
    skip_unsupported: bool,
    page: VecDeque<ConnectionRow>,
    after: i64,
    done: bool,
    number: u64,
    pub skipped: u64,
    pub owned: Owned,
}

impl std::fmt::Debug for NangoConnections<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NangoConnections")
            .field("environment", &self.environment)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<'a> NangoConnections<'a> {
    pub fn new(
        database: &'a NangoDatabase,
        key: &'a NangoKey,
        environment: i64,
        skip_unsupported: bool,
    ) -> Self {
        Self {
            database,
            key,
            environment,
            skip_unsupported,
            page: VecDeque::new(),
            after: 0,
            done: false,
            number: 0,
            skipped: 0,
            owned: Owned::default(),
        }
    }

    /// The `POST /connections` body a row stands for.
    fn body(&self, row: &ConnectionRow) -> Result<Option<Value>, LineFault> {
        let credentials = self.credentials(row)?;
        let kind = credentials
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !SUPPORTED.contains(&kind) {
            if self.skip_unsupported {
                return Ok(None);
            }
            return Err(LineFault {
                code: "unsupported_auth_mode",
                message: format!(
                    "credentials of type {kind:?} are not taken yet (only {}); \
                     --skip-unsupported leaves such connections out",
                    SUPPORTED.join(", ")
                ),
            });
        }
        let mut body = Map::new();
        body.insert(
            "provider_config_key".into(),
            Value::String(row.provider_config_key.clone()),
        );
        body.insert(
            "connection_id".into(),
            Value::String(row.connection_id.clone()),
        );
        body.insert("credentials".into(), credentials);
        for (field, text) in [
            ("connection_config", &row.connection_config),
            ("metadata", &row.metadata),
            ("tags", &row.tags),
        ] {
            match text.as_deref().map(serde_json::from_str::<Value>) {
                None | Some(Ok(Value::Null)) => {}
                Some(Ok(value)) => {
                    body.insert(field.into(), value);
                }
                Some(Err(_)) => {
                    return Err(LineFault {
                        code: "invalid_body",
                        message: format!("Nango's {field} is not JSON"),
                    });
                }
            }
        }
        if let Some(user) = &row.end_user {
            let mut end_user = Map::new();
            end_user.insert("id".into(), Value::String(user.id.clone()));
            for (field, value) in [("email", &user.email), ("display_name", &user.display_name)] {
                if let Some(value) = value {
                    end_user.insert(field.into(), Value::String(value.clone()));
                }
            }
            body.insert("end_user".into(), Value::Object(end_user));
            if let Some(id) = &user.organization_id {
                let mut organization = Map::new();
                organization.insert("id".into(), Value::String(id.clone()));
                if let Some(name) = &user.organization_display_name {
                    organization.insert("display_name".into(), Value::String(name.clone()));
                }
                body.insert("organization".into(), Value::Object(organization));
            }
        }
        Ok(Some(Value::Object(body)))
    }

    /// The row's credentials object, opened if sealed.
    fn credentials(&self, row: &ConnectionRow) -> Result<Value, LineFault> {
        let malformed = || LineFault {
            code: "invalid_body",
            message: "Nango's credentials are not a JSON object".into(),
        };
        let stored: Value = serde_json::from_str(&row.credentials).map_err(|_| malformed())?;
        let (Some(iv), Some(tag)) = (&row.credentials_iv, &row.credentials_tag) else {
            return stored.is_object().then_some(stored).ok_or_else(malformed);
        };
        let sealed = stored
            .get("encrypted_credentials")
            .and_then(Value::as_str)
            .ok_or_else(|| LineFault {
                code: "cannot_decrypt",
                message: "the credentials have an IV and tag but no encrypted_credentials".into(),
            })?;
        let plain = self.key.open(sealed, iv, tag)?;
        // Nothing of the plaintext goes into the message.
        serde_json::from_slice::<Value>(&plain)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(malformed)
    }
}

impl Source for NangoConnections<'_> {
    async fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            if self.page.is_empty() && !self.done {
                let page = self
                    .database
                    .connections_after(self.environment, self.after, PAGE)
                    .await?;
                self.done = page.len() < usize::try_from(PAGE).unwrap_or(usize::MAX);
                if let Some(last) = page.last() {
                    self.after = last.id;
                }
                self.page.extend(page);
            }
            let Some(row) = self.page.pop_front() else {
                return Ok(None);
            };
            self.number += 1;
            let body = match self.body(&row) {
                Ok(None) => {
                    self.skipped += 1;
                    continue;
                }
                Ok(Some(body)) => Ok(body),
                Err(fault) => Err(fault),
            };
            if row
                .tags
                .as_deref()
                .is_some_and(|t| !matches!(t, "null" | "{}"))
            {
                self.owned.tagged += 1;
            }
            if row.end_user.is_some() {
                self.owned.with_end_user += 1;
            }
            return Ok(Some(Record {
                at: format!(
                    "Nango connection {:?} of {:?} (row {})",
                    row.connection_id, row.provider_config_key, row.id
                ),
                number: self.number,
                body,
            }));
        }
    }
}
