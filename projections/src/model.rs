//! The read models: how an aggregate's state becomes a row.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::commands::Aggregate;
use domain::connection::{self, Connection};
use domain::event::DomainEvent;
use domain::integration::{self, Integration};
use domain::store::{Position, RecordedEvent};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::ProjectionError;
use crate::store::{Batch, ReadModels, Snapshot};

/// A read model of aggregate snapshots: one row per stream of `CATEGORY`.
pub trait StateModel: Send + Sync + 'static {
    /// The aggregate whose snapshots the rows keep; its events fold onto them with its own
    /// [`Aggregate::apply`].
    type State: Aggregate<Event: 'static> + Serialize + 'static;
    /// The projection's name, which is also its table's.
    const NAME: &'static str;
    /// The shadow table a rebuild fills.
    const SHADOW: &'static str;
    /// The stream category it reads.
    const CATEGORY: &'static str;

    /// The row for `state`, or `None` while the stream has not yet created anything.
    fn row(stream_id: &str, version: u32, state: &Self::State) -> Option<Row>;
}

/// The events of `M`'s aggregate.
pub(crate) type EventOf<M> = <<M as StateModel>::State as Aggregate>::Event;

/// One stored snapshot.
#[derive(Clone, Debug)]
pub struct Row {
    pub stream_id: String,
    pub version: u32,
    /// A stable number for the stream (Nango's numeric `id`), the same on every rebuild.
    pub id: i64,
    pub provider_config_key: String,
    pub connection_id: String,
    pub provider: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub refresh_state: &'static str,
    /// The state as JSON text, serialized once straight from the aggregate (no JSON tree).
    pub state: Box<RawValue>,
    /// When the connection's tokens were last issued (its last refresh, else its
    /// authorization): what a keep-alive refresh is due by. `None` for everything else.
    pub renewed_at: Option<DateTime<Utc>>,
    /// What the connection list filters on (README, "Listing connections"): the end user's id
    /// and organization, the tags (none elsewhere), and the lower-cased text `search` matches.
    pub end_user_id: Option<String>,
    pub end_user_org_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub search: Option<String>,
    /// The data key the current credentials are sealed under, so that a cache miss finds the
    /// key without reading inside the state. `None` for everything else.
    pub data_key_id: Option<uuid::Uuid>,
}

impl Row {
    /// The row of `state` with blank keys, created and updated `at`, live and with no expiry:
    /// a deleted aggregate's row as it stands (the upsert keeps the stored keys and creation
    /// time for blanks), the rest overridden by a live one.
    fn keyless<S: Serialize>(stream_id: &str, version: u32, state: &S, at: DateTime<Utc>) -> Self {
        Self {
            stream_id: stream_id.to_owned(),
            version,
            id: stable_id(stream_id),
            provider_config_key: String::new(),
            connection_id: String::new(),
            provider: String::new(),
            created_at: at,
            updated_at: at,
            deleted_at: None,
            expires_at: None,
            refresh_state: "",
            state: state_json(state),
            renewed_at: None,
            end_user_id: None,
            end_user_org_id: None,
            tags: BTreeMap::new(),
            search: None,
            data_key_id: None,
        }
    }
}

/// A stable, JSON-safe (53-bit) number for a stream: the top bits of its UUID.
pub fn stable_id(stream_id: &str) -> i64 {
    let uuid = stream_id
        .split_once('-')
        .and_then(|(_, id)| uuid::Uuid::parse_str(id).ok())
        .unwrap_or_else(|| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, stream_id.as_bytes()));
    let top = (uuid.as_u128() >> 75) as i64; // 53 bits
    top.max(1)
}

fn state_json<S: Serialize>(state: &S) -> Box<RawValue> {
    // The states hold strings, numbers, timestamps, uuids and JSON objects: serializing them
    // cannot fail (the aggregate tests serialize every variant).
    serde_json::value::to_raw_value(state).unwrap_or_default()
}

/// The `connections` read model.
#[derive(Debug)]
pub struct ConnectionsModel;

impl StateModel for ConnectionsModel {
    type State = Connection;
    const NAME: &'static str = "connections";
    const SHADOW: &'static str = "connections_shadow";
    const CATEGORY: &'static str = connection::CATEGORY;

    fn row(stream_id: &str, version: u32, state: &Connection) -> Option<Row> {
        match state {
            Connection::NeverAuthorized => None,
            Connection::Active(active) => {
                let end_user = active.ownership.end_user.as_ref();
                Some(Row {
                    provider_config_key: active.provider_config_key.clone(),
                    connection_id: active.connection_id.clone(),
                    provider: active.provider.clone(),
                    updated_at: active.updated_at,
                    expires_at: active.expires_at,
                    refresh_state: refresh_state(active),
                    renewed_at: Some(active.last_refreshed_at.unwrap_or(active.authorized_at)),
                    end_user_id: end_user.map(|u| u.id.clone()),
                    end_user_org_id: end_user
                        .and_then(|u| u.organization.as_ref())
                        .map(|o| o.id.clone()),
                    tags: active.ownership.tags.clone(),
                    search: Some(search_text(active)),
                    data_key_id: Some(active.credentials.key_id),
                    ..Row::keyless(stream_id, version, state, active.created_at)
                })
            }
            // A deleted connection's row keeps the keys and creation time it had: the state
            // carries them, and where an older state lacks them the upsert keeps the row's.
            Connection::Deleted(deleted) => Some(Row {
                provider_config_key: deleted.provider_config_key.clone(),
                connection_id: deleted.connection_id.clone(),
                provider: deleted.provider.clone(),
                created_at: deleted.created_at.unwrap_or(deleted.deleted_at),
                deleted_at: Some(deleted.deleted_at),
                refresh_state: "deleted",
                ..Row::keyless(stream_id, version, state, deleted.deleted_at)
            }),
        }
    }
}

/// What a list's `search` looks in, lower-cased: the connection id and the end user's display
/// name and e-mail, one per line (a search holds no line break, so it never matches across
/// two of them).
pub fn search_text(active: &connection::ActiveConnection) -> String {
    let mut text = active.connection_id.to_lowercase();
    if let Some(user) = &active.ownership.end_user {
        for part in [&user.display_name, &user.email].into_iter().flatten() {
            text.push('\n');
            text.push_str(&part.to_lowercase());
        }
    }
    text
}

/// A one-word summary of where a connection's refresh stands.
fn refresh_state(active: &connection::ActiveConnection) -> &'static str {
    if active.blocking_failure.is_some() {
        "failed"
    } else if active.lease.is_some() {
        "leased"
    } else if active.consecutive_transient_failures > 0 {
        "retrying"
    } else if !active.renewable() {
        "no_refresh_token"
    } else if active.expires_at.is_none() {
        "no_expiry"
    } else {
        "ok"
    }
}

/// The `integrations` read model.
#[derive(Debug)]
pub struct IntegrationsModel;

impl StateModel for IntegrationsModel {
    type State = Integration;
    const NAME: &'static str = "integrations";
    const SHADOW: &'static str = "integrations_shadow";
    const CATEGORY: &'static str = integration::CATEGORY;

    fn row(stream_id: &str, version: u32, state: &Integration) -> Option<Row> {
        match state {
            Integration::NeverCreated => None,
            Integration::Active(active) => Some(Row {
                provider_config_key: active.provider_config_key.clone(),
                provider: active.settings.provider.clone(),
                updated_at: active.updated_at.unwrap_or(active.created_at),
                ..Row::keyless(stream_id, version, state, active.created_at)
            }),
            Integration::Deleted(deleted) => Some(Row {
                deleted_at: Some(deleted.deleted_at),
                ..Row::keyless(stream_id, version, state, deleted.deleted_at)
            }),
        }
    }
}

/// Decodes the events of `M`'s category in `events` (stopping at the first unreadable one).
pub(crate) fn decode<M: StateModel>(
    events: &[RecordedEvent],
) -> Result<Vec<(String, u32, EventOf<M>)>, ProjectionError> {
    events
        .iter()
        .filter(|e| e.stream_id.category() == M::CATEGORY)
        .map(|e| {
            Ok((
                e.stream_id.to_string(),
                e.stream_version,
                EventOf::<M>::from_recorded(e)?,
            ))
        })
        .collect()
}

/// Folds decoded events onto the stored snapshots and returns the rows to write. Events at or
/// below a snapshot's version were applied already and are skipped.
pub(crate) fn fold<M: StateModel>(
    table: &'static str,
    snapshots: HashMap<String, Snapshot>,
    events: Vec<(String, u32, EventOf<M>)>,
) -> Result<Vec<Row>, ProjectionError> {
    let folded = fold_states::<M>(table, snapshots, events)?;
    Ok(folded.iter().filter_map(Folded::row::<M>).collect())
}

/// A stream's state after a batch's events.
pub(crate) struct Folded<S> {
    pub(crate) stream_id: String,
    pub(crate) version: u32,
    pub(crate) state: S,
    /// The batch moved it past its snapshot: its row must be written.
    pub(crate) changed: bool,
}

impl<S> Folded<S> {
    /// The row to write, if the batch changed the state.
    pub(crate) fn row<M: StateModel<State = S>>(&self) -> Option<Row> {
        self.changed
            .then(|| M::row(&self.stream_id, self.version, &self.state))
            .flatten()
    }
}

/// Folds decoded events onto the stored snapshots: every touched stream's state, in the order
/// the batch first touched them.
pub(crate) fn fold_states<M: StateModel>(
    table: &'static str,
    snapshots: HashMap<String, Snapshot>,
    events: Vec<(String, u32, EventOf<M>)>,
) -> Result<Vec<Folded<M::State>>, ProjectionError> {
    let mut states: HashMap<String, (u32, M::State)> = HashMap::new();
    let mut order = Vec::new();
    for (stream_id, version, event) in events {
        if !states.contains_key(&stream_id) {
            let (v, state) = match snapshots.get(&stream_id) {
                Some(snapshot) => (
                    snapshot.version,
                    serde_json::from_str(&snapshot.state).map_err(|e| {
                        ProjectionError::CorruptRow {
                            table,
                            stream_id: stream_id.clone(),
                            reason: e.to_string(),
                        }
                    })?,
                ),
                None => (0, M::State::default()),
            };
            states.insert(stream_id.clone(), (v, state));
            order.push(stream_id.clone());
        }
        if let Some((v, state)) = states.get_mut(&stream_id)
            && version > *v
        {
            state.apply(&event);
            *v = version;
        }
    }
    let mut folded = Vec::with_capacity(order.len());
    for stream_id in order {
        let Some((version, state)) = states.remove(&stream_id) else {
            continue;
        };
        let changed = snapshots
            .get(&stream_id)
            .is_none_or(|previous| previous.version < version);
        folded.push(Folded {
            stream_id,
            version,
            state,
            changed,
        });
    }
    Ok(folded)
}

/// The batch that folds `events` (of any category; those of `M`'s are decoded) into `table`.
pub(crate) fn plan<M: StateModel>(
    table: &'static str,
    events: &[RecordedEvent],
) -> Result<Batch, ProjectionError> {
    let decoded = decode::<M>(events)?;
    Ok(batch::<M>(
        table,
        decoded,
        events.last().map_or(Position::START, |e| e.position),
    ))
}

/// The batch that folds decoded events into `table`, ending at `to`.
pub(crate) fn batch<M: StateModel>(
    table: &'static str,
    events: Vec<(String, u32, EventOf<M>)>,
    to: Position,
) -> Batch {
    let stream_ids = events
        .iter()
        .map(|(id, ..)| id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Batch {
        stream_ids,
        fold: Box::new(move |snapshots| fold::<M>(table, snapshots, events)),
        to,
        fresh: false,
    }
}

/// Writes the state a command just produced, so the next read sees it at once
/// (read-your-writes). Skipped if the row is already at or past `version`.
pub async fn upsert_state<M: StateModel>(
    read_models: &ReadModels,
    stream_id: &str,
    version: u32,
    state: &M::State,
) -> Result<(), ProjectionError> {
    let Some(row) = M::row(stream_id, version, state) else {
        return Ok(());
    };
    read_models.store().upsert(M::NAME, row).await
}
