//! Bulk import: many connections recorded in a few writes. New connections get their data keys
//! in one insert and their streams in one atomic append; the rest (a connection that exists,
//! or one that appeared while the batch was being sealed) takes the single-connection path, so
//! the guarantees of [`crate::commands`] hold for every connection either way.

use futures_util::{StreamExt, TryStreamExt};

use super::{AuthorizeConnection, CommandError, Commands};
use crate::connection::Connection;
use crate::event::DomainEvent;
use crate::store::{NewStream, StoreError};

/// How many existing connections a batch checks at once.
const CONCURRENT_CHECKS: usize = 8;

/// What importing one connection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// The connection did not exist (or was deleted) and now holds the imported credentials.
    Created,
    /// The connection exists and was left as it is: an import never replaces live credentials
    /// unless asked to, so running the same import again changes nothing (and never rolls a
    /// rotated refresh token back to the one in the file).
    Kept,
    /// The connection existed and the imported credentials are its next generation.
    Replaced,
}

impl Commands {
    /// Imports `commands`, each for a different connection: new connections in one write of
    /// data keys and one atomic append of their streams, existing ones kept (or, with
    /// `replace`, re-authorized one by one). One outcome per command, in order.
    ///
    /// Every command is checked first; if one is out of bounds nothing is written.
    #[tracing::instrument(name = "commands.import", skip_all, fields(connections = commands.len()))]
    pub async fn import_connections(
        &self,
        commands: Vec<AuthorizeConnection>,
        replace: bool,
    ) -> Result<Vec<Imported>, CommandError> {
        for command in &commands {
            command.credentials.check_bounds()?;
        }
        let streams: Vec<_> = commands.iter().map(|c| c.key.stream_id()).collect();
        let versions = self.backend.events().stream_versions(&streams).await?;
        let (fresh, existing): (Vec<_>, Vec<_>) = commands
            .into_iter()
            .enumerate()
            .partition(|(i, _)| versions.get(*i).is_none_or(|v| *v == 0));
        let mut outcomes = vec![Imported::Created; versions.len()];
        let fresh_indexes: Vec<usize> = fresh.iter().map(|(i, _)| *i).collect();
        let fresh: Vec<_> = fresh.into_iter().map(|(_, c)| c).collect();
        let mut one_by_one = existing;
        if let Err(error) = self.create_connections(&fresh).await {
            match error {
                // Another writer created one of them meanwhile: nothing of the batch was
                // appended, so each takes the single-connection path.
                CommandError::Store(StoreError::Conflict { .. }) => {
                    one_by_one.extend(fresh_indexes.into_iter().zip(fresh));
                }
                other => return Err(other),
            }
        }
        let decided: Vec<(usize, Imported)> = futures_util::stream::iter(one_by_one)
            .map(|(i, command)| async move {
                self.import_one(command, replace)
                    .await
                    .map(|outcome| (i, outcome))
            })
            .buffer_unordered(CONCURRENT_CHECKS)
            .try_collect()
            .await?;
        for (i, outcome) in decided {
            if let Some(slot) = outcomes.get_mut(i) {
                *slot = outcome;
            }
        }
        Ok(outcomes)
    }

    /// Creates the connections of `commands`, none of which exists: their data keys in one
    /// insert, their streams in one append. A conflict means nothing was appended.
    async fn create_connections(
        &self,
        commands: &[AuthorizeConnection],
    ) -> Result<(), CommandError> {
        if commands.is_empty() {
            return Ok(());
        }
        let streams: Vec<_> = commands.iter().map(|c| c.key.stream_id()).collect();
        let key_ids = self.vault.create_data_keys(&streams).await?;
        let appended = self.append_created(commands, streams, &key_ids).await;
        // Refused as a whole (or never sent): the keys sealed nothing that was written, and the
        // single-connection path makes its own. An append that may have gone through (a lost
        // connection) keeps them: its events would name them.
        if let Err(
            CommandError::Store(StoreError::Conflict { .. })
            | CommandError::Connection(_)
            | CommandError::Keys(_),
        ) = &appended
        {
            self.vault.discard(&key_ids).await?;
        }
        appended
    }

    /// Seals each of `commands`' credentials with its key and appends their streams at once.
    async fn append_created(
        &self,
        commands: &[AuthorizeConnection],
        streams: Vec<crate::store::StreamId>,
        key_ids: &[uuid::Uuid],
    ) -> Result<(), CommandError> {
        let empty = Connection::default();
        let mut new_streams = Vec::with_capacity(commands.len());
        for ((command, stream), &key_id) in commands.iter().zip(streams).zip(key_ids) {
            let sealed = self.vault.seal_json(key_id, &command.credentials).await?;
            let fingerprints = self.fingerprints(&command.credentials).await?;
            let events = command.decide(&empty, key_id, &sealed, &fingerprints)?;
            new_streams.push(NewStream {
                stream,
                events: events
                    .iter()
                    .map(|e| e.to_new_event().with_metadata(self.event_metadata.clone()))
                    .collect(),
            });
        }
        self.backend.events().create_streams(new_streams).await?;
        Ok(())
    }

    /// Imports one connection that may exist: kept when it is live (unless `replace`), else
    /// authorized through the single-connection path.
    async fn import_one(
        &self,
        command: AuthorizeConnection,
        replace: bool,
    ) -> Result<Imported, CommandError> {
        let loaded = self.load_connection(&command.key).await?;
        let live = loaded.state.active().is_some();
        if live && !replace {
            return Ok(Imported::Kept);
        }
        self.authorize_connection(command).await?;
        Ok(if live {
            Imported::Replaced
        } else {
            Imported::Created
        })
    }
}
