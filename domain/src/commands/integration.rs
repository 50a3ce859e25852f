//! The integration's commands: create, update and delete, each decided by
//! [`crate::integration::decide`], the client secret sealed under a new data key each time.

use chrono::{DateTime, Utc};
use tracing::field::Empty;

use super::{CommandError, Commands, Loaded};
use crate::credentials::ClientSecret;
use crate::integration::{
    self, ActiveIntegration, Integration, IntegrationCommand, IntegrationSettings,
};
use crate::keys::Sealed;

/// An integration's configuration, as created or replaced.
#[derive(Clone, Debug)]
pub struct IntegrationConfig {
    /// The provider template's name.
    pub provider: String,
    /// The OAuth client id.
    pub oauth_client_id: String,
    /// The OAuth client secret; only its sealed form is stored. Its `Debug` redacts it.
    pub client_secret: ClientSecret,
    /// The scopes to request.
    pub oauth_scopes: Vec<String>,
    /// The name it is shown by; on an update, `None` keeps the one the log has then.
    pub display_name: Option<String>,
}

impl IntegrationConfig {
    /// The command that creates `provider_config_key` with this configuration, the client
    /// secret as `sealed`.
    fn create(
        &self,
        provider_config_key: &str,
        sealed: &Sealed,
        now: DateTime<Utc>,
    ) -> IntegrationCommand {
        IntegrationCommand::Create {
            provider_config_key: provider_config_key.to_owned(),
            settings: self.sealed(sealed),
            now,
        }
    }

    /// The command that replaces the configuration with this one, the client secret as `sealed`.
    fn update(&self, sealed: &Sealed, now: DateTime<Utc>) -> IntegrationCommand {
        IntegrationCommand::Update {
            settings: self.sealed(sealed),
            now,
        }
    }

    /// This configuration as the events carry it, the client secret as `sealed`.
    fn sealed(&self, sealed: &Sealed) -> IntegrationSettings {
        IntegrationSettings {
            provider: self.provider.clone(),
            oauth_client_id: self.oauth_client_id.clone(),
            client_secret: sealed.clone(),
            oauth_scopes: self.oauth_scopes.clone(),
            display_name: self.display_name.clone(),
        }
    }
}

impl Commands {
    /// The integration as its stream leaves it.
    #[tracing::instrument(
        name = "commands.load_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key)
    )]
    pub async fn load_integration(
        &self,
        provider_config_key: &str,
    ) -> Result<Loaded<Integration>, CommandError> {
        self.load(integration::stream_id(provider_config_key)).await
    }

    /// Creates the integration (again, after a deletion), its client secret sealed under a new
    /// data key. Rejected while a live integration has this key.
    #[tracing::instrument(
        name = "commands.create_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn create_integration(
        &self,
        provider_config_key: &str,
        config: IntegrationConfig,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        self.seal_integration(provider_config_key, &config, |sealed, again| {
            // Sealing again means this creation is in the log with a shredded key: what fixes
            // it is an update.
            if again {
                config.update(sealed, now)
            } else {
                config.create(provider_config_key, sealed, now)
            }
        })
        .await
    }

    /// Replaces the live integration's configuration; the client secret is sealed under a new
    /// data key (the previous ones are shredded when the integration is deleted).
    #[tracing::instrument(
        name = "commands.update_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn update_integration(
        &self,
        provider_config_key: &str,
        config: IntegrationConfig,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        self.seal_integration(provider_config_key, &config, |sealed, _| {
            config.update(sealed, now)
        })
        .await
    }

    /// Gives the live integration a new name; its client secret stays sealed as it is.
    #[tracing::instrument(
        name = "commands.rename_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn rename_integration(
        &self,
        provider_config_key: &str,
        display_name: &str,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        let loaded = self
            .execute(
                integration::stream_id(provider_config_key),
                |state: &Integration| {
                    Ok(integration::decide(
                        state,
                        IntegrationCommand::Rename {
                            display_name: display_name.to_owned(),
                            now,
                        },
                    )?)
                },
            )
            .await?;
        Ok(loaded.traced())
    }

    /// Deletes the integration, then destroys the data keys of its client secrets.
    ///
    /// Deleting a deleted integration is rejected, after destroying whatever key of its stream
    /// is still live (see [`Commands::delete_connection`]).
    #[tracing::instrument(
        name = "commands.delete_integration",
        skip_all,
        fields(provider_config_key = %provider_config_key, stream_version = Empty)
    )]
    pub async fn delete_integration(
        &self,
        provider_config_key: &str,
        now: DateTime<Utc>,
    ) -> Result<Loaded<Integration>, CommandError> {
        self.delete_and_shred(
            integration::stream_id(provider_config_key),
            |state: &Integration| {
                Ok(integration::decide(
                    state,
                    IntegrationCommand::Delete { now },
                )?)
            },
        )
        .await
    }

    /// The plaintext client secret of the live integration.
    #[tracing::instrument(
        name = "commands.reveal_client_secret",
        skip_all,
        fields(provider_config_key = %integration.provider_config_key)
    )]
    pub async fn reveal_client_secret(
        &self,
        integration: &ActiveIntegration,
    ) -> Result<ClientSecret, CommandError> {
        self.reveal(&integration.settings.client_secret).await
    }

    /// Runs the command `command` makes of the sealed client secret (and of whether it is sealed
    /// again, see [`Commands::execute_sealed`]), the secret sealed under a new data key.
    async fn seal_integration(
        &self,
        provider_config_key: &str,
        config: &IntegrationConfig,
        mut command: impl FnMut(&Sealed, bool) -> IntegrationCommand + Send,
    ) -> Result<Loaded<Integration>, CommandError> {
        let loaded = self
            .execute_sealed(
                integration::stream_id(provider_config_key),
                &config.client_secret,
                |state, _, sealed, again| Ok(integration::decide(state, command(sealed, again))?),
            )
            .await?;
        Ok(loaded.traced())
    }
}
