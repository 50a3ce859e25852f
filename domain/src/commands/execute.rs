//! The machinery every command shares: load a stream (from a snapshot where there is one),
//! decide on it, append at the loaded version, and on a conflict catch up and decide again with
//! a jittered backoff; seal a secret under a new data key (again if a deletion shredded it);
//! delete and then shred; fingerprint and reveal secrets. The guarantees are those of the module
//! docs of [`crate::commands`].

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::{Aggregate, AppendedEvent, CommandError, Commands, Loaded, MAX_ATTEMPTS};
use crate::connection::TokenFingerprints;
use crate::credentials::Credentials;
use crate::event::DomainEvent;
use crate::keys::{KeyError, Sealed};
use crate::store::{Appended, ExpectedVersion, RecordedEvent, StoreError, StreamAppend, StreamId};

/// How many times a new data key is made when concurrent deletions keep shredding it.
const MAX_RESEALS: u32 = 3;

/// A command's decision on a state: the events to append, or why it is refused. Called again
/// on the caught-up state after every conflict.
pub(super) trait Decide<S: Aggregate>:
    FnMut(&S) -> Result<Vec<S::Event>, CommandError> + Send
{
}

impl<S, F> Decide<S> for F
where
    S: Aggregate,
    F: FnMut(&S) -> Result<Vec<S::Event>, CommandError> + Send,
{
}

/// The first conflict backoff's upper bound; it doubles with each attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(2);

/// The largest conflict backoff.
const BACKOFF_CAP: Duration = Duration::from_millis(200);

impl Commands {
    /// The stream's state from its first event.
    pub(super) async fn load<S: Aggregate>(
        &self,
        stream_id: StreamId,
    ) -> Result<Loaded<S>, CommandError> {
        let mut loaded = Loaded::empty(stream_id);
        if let Some(snapshots) = &self.snapshots
            && let Some((version, state)) = snapshots.snapshot(&loaded.stream_id).await
        {
            match S::deserialize(state) {
                Ok(state) => {
                    loaded.version = version;
                    loaded.state = state;
                }
                Err(error) => tracing::warn!(
                    error.message = %error,
                    "commands.load cannot read the snapshot; folding the whole stream"
                ),
            }
        }
        self.catch_up(&mut loaded).await?;
        Ok(loaded)
    }

    /// The events appended after `loaded.version`, undecoded.
    async fn recorded_since<S: Aggregate>(
        &self,
        loaded: &Loaded<S>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.backend
            .events()
            .read_stream(&loaded.stream_id, loaded.version)
            .await
    }

    /// Folds the events appended after `loaded.version` into `loaded`.
    async fn catch_up<S: Aggregate>(&self, loaded: &mut Loaded<S>) -> Result<(), CommandError> {
        for record in &self.recorded_since(loaded).await? {
            let event = S::Event::from_recorded(record)?;
            loaded.state.apply(&event);
            loaded.version = record.stream_version;
        }
        Ok(())
    }

    /// Loads the stream and runs [`Commands::execute_from`].
    pub(super) async fn execute<S: Aggregate>(
        &self,
        stream_id: StreamId,
        decide: impl Decide<S>,
    ) -> Result<Loaded<S>, CommandError> {
        let loaded = self.load(stream_id).await?;
        self.execute_from(loaded, decide).await
    }

    /// [`Commands::execute_from`] with up to `max_attempts` attempts.
    pub(super) async fn execute_from<S: Aggregate>(
        &self,
        loaded: Loaded<S>,
        decide: impl Decide<S>,
    ) -> Result<Loaded<S>, CommandError> {
        self.execute_at_most(loaded, decide, MAX_ATTEMPTS).await
    }

    /// Decides on `loaded` and appends at its version; on a conflict, catches up and decides
    /// again (a rejection ends it), at most `max_attempts` times in all. With one attempt, a
    /// conflict is returned as [`StoreError::Conflict`].
    pub(super) async fn execute_at_most<S: Aggregate>(
        &self,
        mut loaded: Loaded<S>,
        mut decide: impl Decide<S>,
        max_attempts: u32,
    ) -> Result<Loaded<S>, CommandError> {
        let mut attempt = 1;
        loop {
            let events = decide(&loaded.state)?;
            let expected = match loaded.version {
                0 => ExpectedVersion::NoStream,
                version => ExpectedVersion::Exact(version),
            };
            let new_events = events
                .iter()
                .map(|event| {
                    event
                        .to_new_event()
                        .with_metadata(self.event_metadata.clone())
                })
                .collect();
            match self
                .backend
                .events()
                .append(&loaded.stream_id, expected, new_events)
                .await
            {
                Ok(appended) => {
                    absorb(&mut loaded, events, appended);
                    return Ok(loaded);
                }
                Err(conflict @ StoreError::Conflict { .. }) if max_attempts <= 1 => {
                    return Err(conflict.into());
                }
                Err(StoreError::Conflict { actual, .. }) => {
                    if attempt >= max_attempts {
                        tracing::warn!(
                            attempts = attempt,
                            stream_version = actual,
                            "every attempt conflicted; giving up"
                        );
                        return Err(CommandError::Conflict);
                    }
                    tracing::debug!(
                        attempt,
                        stream_version = actual,
                        "another writer appended first; deciding again"
                    );
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    self.catch_up(&mut loaded).await?;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// [`Commands::execute_at_most`] on several streams at once: decides on each of `loaded`
    /// and appends to all of them in one atomic write ([`EventStore::append_streams`]), so the
    /// change lands on every stream or on none; a rejection on any one refuses it for all.
    /// Every stream must exist.
    ///
    /// [`EventStore::append_streams`]: crate::store::EventStore::append_streams
    pub(super) async fn execute_on_all<S: Aggregate>(
        &self,
        mut loaded: Vec<Loaded<S>>,
        mut decide: impl Decide<S>,
    ) -> Result<Vec<Loaded<S>>, CommandError> {
        let mut attempt = 1;
        loop {
            let decided = loaded
                .iter()
                .map(|l| decide(&l.state))
                .collect::<Result<Vec<_>, _>>()?;
            let appends = loaded
                .iter()
                .zip(&decided)
                .map(|(l, events)| StreamAppend {
                    stream: l.stream_id.clone(),
                    expected: l.version,
                    events: events
                        .iter()
                        .map(|e| e.to_new_event().with_metadata(self.event_metadata.clone()))
                        .collect(),
                })
                .collect();
            match self.backend.events().append_streams(appends).await {
                Ok(appended) => {
                    for ((l, events), appended) in loaded.iter_mut().zip(decided).zip(appended) {
                        absorb(l, events, appended);
                    }
                    return Ok(loaded);
                }
                Err(StoreError::Conflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    for l in &mut loaded {
                        self.catch_up(l).await?;
                    }
                }
                Err(StoreError::Conflict { .. }) => return Err(CommandError::Conflict),
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs a command that stores `secret` sealed: `decide` gets the state, the new data key's
    /// id, the sealed secret, and whether this call's own event is already in the log with a
    /// shredded key. The key is created once the command is not rejected on the loaded state,
    /// and again if a concurrent deletion shredded it (see the module docs).
    pub(super) async fn execute_sealed<S, T, F>(
        &self,
        stream_id: StreamId,
        secret: &T,
        mut decide: F,
    ) -> Result<Loaded<S>, CommandError>
    where
        S: Aggregate,
        T: Serialize + Sync,
        F: FnMut(&S, Uuid, &Sealed, bool) -> Result<Vec<S::Event>, CommandError> + Send,
    {
        let mut loaded = self.load::<S>(stream_id).await?;
        // Refuse before making a key: a placeholder stands for the sealed secret.
        let placeholder = Sealed {
            key_id: Uuid::nil(),
            ciphertext: Vec::new(),
        };
        decide(&loaded.state, Uuid::nil(), &placeholder, false)?;
        // Every event this call appends, also those whose key was shredded under them.
        let mut appended = Vec::new();
        for reseal in 0..MAX_RESEALS {
            // If the append below fails, this key stays unused: harmless garbage, shredded with
            // the stream's other keys when it is deleted.
            let data_key_id = self.vault.create_data_key(&loaded.stream_id).await?;
            let sealed = self.vault.seal_json(data_key_id, secret).await?;
            loaded = self
                .execute_from(loaded, |state| {
                    decide(state, data_key_id, &sealed, reseal > 0)
                })
                .await?;
            appended.append(&mut loaded.events);
            // A deletion after this event may have shredded the key, as it should.
            if self.data_key_is_live(data_key_id).await? || self.deleted_since(&loaded).await? {
                loaded.events = appended;
                return Ok(loaded);
            }
            tracing::warn!(
                stream_version = loaded.version,
                "a deletion that precedes this event shredded its new data key; sealing again"
            );
        }
        Err(CommandError::Conflict)
    }

    /// Appends the deletion `decide` makes, then destroys every data key of the stream: only
    /// once the deletion is in the log, since had the append failed the aggregate would still
    /// need its keys. A stream deleted already is rejected, after destroying whatever key of it
    /// is still live: a deletion whose shredding failed after its append is finished by the
    /// retry.
    pub(super) async fn delete_and_shred<S: Aggregate>(
        &self,
        stream_id: StreamId,
        decide: impl Decide<S>,
    ) -> Result<Loaded<S>, CommandError> {
        match self.execute(stream_id.clone(), decide).await {
            Ok(loaded) => {
                let loaded = loaded.traced();
                let destroyed = self.vault.destroy(&stream_id).await?;
                tracing::info!(
                    destroyed,
                    "{} deleted, its data keys shredded",
                    stream_id.category()
                );
                Ok(loaded)
            }
            Err(rejected) if rejected.is_deleted_rejection() => {
                self.vault.destroy(&stream_id).await?;
                Err(rejected)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether the data key still exists unshredded, asked of the database: another instance's
    /// deletion does not clear this vault's cache.
    async fn data_key_is_live(&self, key_id: Uuid) -> Result<bool, CommandError> {
        let stored = self.backend.keys().data_key(key_id).await?;
        Ok(stored.is_some_and(|key| key.wrapped.is_some()))
    }

    /// Whether an event after `loaded.version` deleted the aggregate.
    async fn deleted_since<S: Aggregate>(&self, loaded: &Loaded<S>) -> Result<bool, CommandError> {
        for record in &self.recorded_since(loaded).await? {
            if S::deletes(&S::Event::from_recorded(record)?) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Fingerprints of the tokens of `credentials` (none for an API key or basic credentials).
    pub(super) async fn fingerprints(
        &self,
        credentials: &Credentials,
    ) -> Result<TokenFingerprints, CommandError> {
        let mut fingerprints = TokenFingerprints::default();
        if let Some(token) = credentials.access_token() {
            fingerprints.access_token = Some(self.vault.fingerprint(token).await?);
        }
        if let Some(token) = credentials.refresh_token() {
            fingerprints.refresh_token = Some(self.vault.fingerprint(token).await?);
        }
        Ok(fingerprints)
    }

    /// Opens a sealed JSON secret. A malformed one is reported by position only: a parser's
    /// message could quote the secret.
    pub(super) async fn reveal<T: DeserializeOwned>(
        &self,
        sealed: &Sealed,
    ) -> Result<T, CommandError> {
        let plain = self.vault.unseal(sealed).await?;
        serde_json::from_slice(&plain).map_err(|error| {
            KeyError::Format(format!(
                "{:?} error at line {} column {} of the sealed value of key {}",
                error.classify(),
                error.line(),
                error.column(),
                sealed.key_id
            ))
            .into()
        })
    }
}

/// A random wait before attempt `attempt + 1`: up to twice as long as the previous bound, capped
/// ("full jitter"), so that writers who conflicted do not meet again in lockstep.
/// `events`, just appended as `appended`, applied to `loaded` and kept as its new events.
fn absorb<S: Aggregate>(loaded: &mut Loaded<S>, events: Vec<S::Event>, appended: Appended) {
    let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let first = appended.stream_version.saturating_sub(count) + 1;
    loaded.events = Vec::with_capacity(events.len());
    for ((stream_version, global_position), event) in
        (first..).zip(appended.global_positions).zip(events)
    {
        loaded.state.apply(&event);
        loaded.events.push(AppendedEvent {
            stream_version,
            global_position,
            event,
        });
    }
    loaded.version = appended.stream_version;
}

fn backoff(attempt: u32) -> Duration {
    let bound = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_CAP);
    let bound_micros = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX).max(1);
    // A v4 uuid is 122 random bits: randomness without another dependency.
    let random = u64::try_from(Uuid::new_v4().as_u128() >> 64).unwrap_or(0);
    Duration::from_micros(random % bound_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_a_bound_that_doubles_up_to_the_cap() {
        for attempt in 1..20 {
            let bound = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_CAP);
            for _ in 0..50 {
                assert!(backoff(attempt) < bound);
            }
        }
        assert!(
            (0..200).any(|_| backoff(10) > Duration::from_millis(5)),
            "it spreads over the bound"
        );
    }
}
