//! Reading a self-hosted Nango's PostgreSQL database: its schema checked against the columns
//! this import reads, then its integrations and its connections, a page at a time. Secrets
//! come out as Nango stored them; `nango.rs` opens them. Nothing here writes to Nango.

use anyhow::{Context, bail};
use tokio_postgres::{Client, Row};

/// Column `i` as text; a NULL where Nango keeps none reads as empty (and the record then fails
/// its checks by name, never a panic).
fn text(row: &Row, i: usize) -> String {
    row.get::<_, Option<String>>(i).unwrap_or_default()
}

/// The newest Nango migration whose schema this import was written against.
pub const KNOWN_MIGRATION: &str = "20260715120000";

/// Columns the import reads, by table; any missing means a schema it does not know.
const REQUIRED: [(&str, &[&str]); 4] = [
    (
        "_nango_connections",
        &[
            "id",
            "connection_id",
            "provider_config_key",
            "credentials",
            "credentials_iv",
            "credentials_tag",
            "connection_config",
            "metadata",
            "environment_id",
            "deleted",
        ],
    ),
    (
        "_nango_configs",
        &[
            "unique_key",
            "provider",
            "oauth_client_id",
            "oauth_client_secret",
            "oauth_client_secret_iv",
            "oauth_client_secret_tag",
            "oauth_scopes",
            "environment_id",
            "deleted",
        ],
    ),
    ("_nango_environments", &["id", "name"]),
    ("_nango_auth_migrations", &["name"]),
];

/// An integration row (`_nango_configs`), its secret as stored.
#[derive(Debug)]
pub struct IntegrationRow {
    pub unique_key: String,
    pub provider: String,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_iv: Option<String>,
    pub client_secret_tag: Option<String>,
    /// Comma-separated.
    pub scopes: Option<String>,
}

/// A connection row (`_nango_connections`), its credentials as stored.
pub struct ConnectionRow {
    /// Nango's row id (pages follow it).
    pub id: i64,
    pub connection_id: String,
    pub provider_config_key: String,
    /// The `credentials` JSON text: `{"encrypted_credentials": …}` or plaintext.
    pub credentials: String,
    pub credentials_iv: Option<String>,
    pub credentials_tag: Option<String>,
    pub connection_config: Option<String>,
    pub metadata: Option<String>,
    /// The tags JSON text, when the schema has tags.
    pub tags: Option<String>,
    /// The linked end user, when the schema has end users.
    pub end_user: Option<EndUserRow>,
}

/// The end user a connection is linked to (`end_users`); a column this schema lacks reads as
/// `None`.
#[derive(Debug)]
pub struct EndUserRow {
    pub id: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub organization_id: Option<String>,
    pub organization_display_name: Option<String>,
}

impl std::fmt::Debug for ConnectionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRow")
            .field("id", &self.id)
            .field("connection_id", &self.connection_id)
            .field("provider_config_key", &self.provider_config_key)
            .finish_non_exhaustive()
    }
}

/// A Nango database, its schema checked.
pub struct NangoDatabase {
    client: Client,
    /// The quoted schema name.
    schema: String,
    has_tags: bool,
    has_end_users: bool,
    /// The optional columns of `end_users` this schema has, as select expressions (`NULL`
    /// where it has not): email, display name, organization id and name.
    end_user_columns: [String; 4],
    /// The newest migration applied.
    pub newest_migration: Option<String>,
}

impl std::fmt::Debug for NangoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NangoDatabase")
            .field("schema", &self.schema)
            .field("newest_migration", &self.newest_migration)
            .finish_non_exhaustive()
    }
}

impl NangoDatabase {
    /// Connects (with the TLS options the URL names) and checks that `schema` holds the tables
    /// and columns this import reads.
    pub async fn open(url: &str, schema: &str) -> anyhow::Result<Self> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || schema.starts_with(|c: char| c.is_ascii_digit())
        {
            bail!("the Nango schema name {schema:?} is not a plain identifier");
        }
        let client = domain::store::connect_other_postgres(url)
            .await
            .context("cannot connect to the Nango database")?;
        let rows = client
            .query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = $1",
                &[&schema],
            )
            .await
            .context("cannot read the Nango database's schema")?;
        let has = |table: &str, column: &str| {
            rows.iter()
                .any(|r| r.get::<_, &str>(0) == table && r.get::<_, &str>(1) == column)
        };
        for (table, columns) in REQUIRED {
            for column in columns {
                if !has(table, column) {
                    bail!(
                        "unknown Nango schema: {schema}.{table}.{column} is missing (this import \
                         reads the schema of Nango's migrations up to {KNOWN_MIGRATION}; is this \
                         a Nango database, and is --nango-schema right?)"
                    );
                }
            }
        }
        let quoted = format!("\"{schema}\"");
        let newest_migration = client
            .query_one(
                &format!("SELECT max(name)::text FROM {quoted}._nango_auth_migrations"),
                &[],
            )
            .await
            .context("cannot read Nango's migrations")?
            .get(0);
        let end_user_columns = [
            "email",
            "display_name",
            "organization_id",
            "organization_display_name",
        ]
        .map(|column| match has("end_users", column) {
            true => format!("eu.{column}::text"),
            false => "NULL::text".to_owned(),
        });
        Ok(Self {
            client,
            end_user_columns,
            has_tags: has("_nango_connections", "tags"),
            has_end_users: has("_nango_connections", "end_user_id")
                && has("end_users", "end_user_id"),
            schema: quoted,
            newest_migration,
        })
    }

    /// The id of the environment `name`; the names there are when it is not one.
    pub async fn environment(&self, name: &str) -> anyhow::Result<i64> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT id::int8, name::text FROM {}._nango_environments ORDER BY id",
                    self.schema
                ),
                &[],
            )
            .await
            .context("cannot read Nango's environments")?;
        if let Some(row) = rows.iter().find(|r| text(r, 1) == name) {
            return Ok(row.get(0));
        }
        let names: Vec<String> = rows.iter().map(|r| text(r, 1)).collect();
        bail!("Nango has no environment {name:?}; it has {names:?} (--nango-environment)")
    }

    /// The live integrations of environment `environment`, by key.
    pub async fn integrations(&self, environment: i64) -> anyhow::Result<Vec<IntegrationRow>> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT unique_key::text, provider::text, oauth_client_id::text, \
                     oauth_client_secret::text, oauth_client_secret_iv::text, \
                     oauth_client_secret_tag::text, oauth_scopes::text \
                     FROM {}._nango_configs \
                     WHERE environment_id = $1::int8 AND deleted IS NOT TRUE ORDER BY unique_key",
                    self.schema
                ),
                &[&environment],
            )
            .await
            .context("cannot read Nango's integrations")?;
        Ok(rows
            .iter()
            .map(|r| IntegrationRow {
                unique_key: text(r, 0),
                provider: text(r, 1),
                client_id: r.get(2),
                client_secret: r.get(3),
                client_secret_iv: r.get(4),
                client_secret_tag: r.get(5),
                scopes: r.get(6),
            })
            .collect())
    }

    /// Up to `limit` live connections of `environment` with a row id above `after`, in id
    /// order.
    pub async fn connections_after(
        &self,
        environment: i64,
        after: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<ConnectionRow>> {
        let tags = if self.has_tags {
            "c.tags::text"
        } else {
            "NULL::text"
        };
        let (end_user, join) = if self.has_end_users {
            (
                format!("eu.end_user_id::text, {}", self.end_user_columns.join(", ")),
                format!(
                    "LEFT JOIN {}.end_users eu ON eu.id = c.end_user_id",
                    self.schema
                ),
            )
        } else {
            (
                "NULL::text, NULL::text, NULL::text, NULL::text, NULL::text".to_owned(),
                String::new(),
            )
        };
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT c.id::int8, c.connection_id::text, c.provider_config_key::text, \
                     c.credentials::text, c.credentials_iv::text, c.credentials_tag::text, \
                     c.connection_config::text, c.metadata::text, {tags}, {end_user} \
                     FROM {}._nango_connections c {join} \
                     WHERE c.environment_id = $1::int8 AND c.deleted IS NOT TRUE AND c.id > $2::int8 \
                     ORDER BY c.id LIMIT $3",
                    self.schema
                ),
                &[&environment, &after, &limit],
            )
            .await
            .context("cannot read Nango's connections")?;
        Ok(rows
            .iter()
            .map(|r| ConnectionRow {
                id: r.get(0),
                connection_id: text(r, 1),
                provider_config_key: text(r, 2),
                credentials: text(r, 3),
                credentials_iv: r.get(4),
                credentials_tag: r.get(5),
                connection_config: r.get(6),
                metadata: r.get(7),
                tags: r.get(8),
                end_user: r.get::<_, Option<String>>(9).map(|id| EndUserRow {
                    id,
                    email: r.get(10),
                    display_name: r.get(11),
                    organization_id: r.get(12),
                    organization_display_name: r.get(13),
                }),
            })
            .collect())
    }
}
