//! The webhook tables (`webhook_targets`, `webhook_deliveries`): each target's checkpoint, its
//! lease and every delivery attempt, behind the narrow [`WebhookStore`] trait with one
//! implementation per backend, picked once by [`open`]. The drivers' errors never leave this
//! module: they become [`StoreError::Database`].

mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::store::{Backend, Position, StoreError};
use futures_util::future::BoxFuture;
use uuid::Uuid;

use super::DeliveryStatus;
use super::delivery::Failed;

/// What every [`WebhookStore`] method returns: a boxed future, so the trait can be a `dyn`.
pub(crate) type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// The webhook tables of one database.
///
/// Guarantees every implementation keeps (the contract tests below hold both to them):
/// - A method runs one or two short statements, each committed on its own: no transaction is
///   ever held open across a caller's HTTP call (on PostgreSQL it would hold back the xid8
///   horizon that every log reader waits behind).
/// - Lease-checked writes ([`advance`](Self::advance), [`start_attempt`](Self::start_attempt),
///   [`release`](Self::release)) change nothing unless `target.holder` holds the lease, and
///   say so; [`claim`](Self::claim) takes the lease only when it is free, expired or already
///   this holder's.
/// - A checkpoint moves only through [`advance`](Self::advance): [`register`](Self::register)
///   never moves an existing one.
/// - Lease times are the database's clock on PostgreSQL (instances with skewed clocks agree)
///   and this instance's on SQLite (one process owns the file).
pub(crate) trait WebhookStore: Send + Sync + 'static {
    /// Adds `target` (shown as `url`) with its checkpoint at `start`, unless it exists: then its
    /// checkpoint stays where it is. A new target counts as followed from now; after that, only
    /// a lease (taken by an instance that delivers) renews it.
    fn register<'a>(
        &'a self,
        target: &'a Target,
        url: &'a str,
        start: Position,
    ) -> StoreFuture<'a, ()>;

    /// The checkpoint and URL of the target furthest behind among those an instance registered
    /// or leased within `within`; `None` when there is none.
    fn slowest_followed(&self, within: Duration) -> StoreFuture<'_, Option<(Position, String)>>;

    /// Takes or renews the lease for `target.holder`; the checkpoint, or `None` while another
    /// holder's lease runs.
    fn claim<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, Option<Position>>;

    /// Moves the checkpoint to `position`, clears the last error and renews the lease, if
    /// `target.holder` still holds it (`false`: it was lost, nothing changed).
    fn advance<'a>(&'a self, target: &'a Target, position: Position) -> StoreFuture<'a, bool>;

    /// Hands the lease back if `target.holder` holds it, so that another instance takes over
    /// at once.
    fn release<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, ()>;

    /// Notes `message` as the target's last error (cleared by the next advance).
    fn record_error<'a>(&'a self, target: &'a Target, message: &'a str) -> StoreFuture<'a, ()>;

    /// What became of earlier attempts to deliver `event_id`; `None` if there were none.
    fn delivery_state<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
    ) -> StoreFuture<'a, Option<DeliveryState>>;

    /// Renews the lease and counts a new attempt at `event` (`pending` until its outcome is
    /// recorded); the attempt's number from 1, or `None` if the lease was lost (then no attempt
    /// is counted).
    fn start_attempt<'a>(
        &'a self,
        target: &'a Target,
        event: Outgoing<'a>,
    ) -> StoreFuture<'a, Option<u32>>;

    /// Records the attempt at `event_id` as answered 2xx with `status`.
    fn delivered<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        status: u16,
    ) -> StoreFuture<'a, ()>;

    /// Records the attempt at `event_id` as failed: the HTTP status (if an answer came), the
    /// error, and when the next attempt is due.
    fn failed<'a>(
        &'a self,
        target: &'a Target,
        event_id: Uuid,
        failure: &'a Failed,
    ) -> StoreFuture<'a, ()>;

    /// Deletes the target's deliveries delivered before `before`.
    fn prune<'a>(&'a self, target: &'a Target, before: DateTime<Utc>) -> StoreFuture<'a, ()>;

    /// The target's row and its `recent` latest deliveries, most recent attempt first.
    fn status<'a>(
        &'a self,
        target: &'a Target,
        recent: usize,
    ) -> StoreFuture<'a, (TargetRow, Vec<DeliveryStatus>)>;

    /// Makes the target's deliveries that wait for a retry due now; how many there were.
    fn retry_now<'a>(&'a self, target: &'a Target) -> StoreFuture<'a, u64>;

    /// The target's deliveries of the events `event_ids` (by its key: no scan), most recent
    /// attempt first.
    fn deliveries_of<'a>(
        &'a self,
        target: &'a Target,
        event_ids: &'a [Uuid],
    ) -> StoreFuture<'a, Vec<DeliveryStatus>>;
}

/// The columns of a delivery, in the order both backends read them.
const DELIVERY_COLUMNS: &str = "event_id, event, global_position, status, attempts, last_status, \
     last_error, first_attempt_at, last_attempt_at, next_attempt_at, delivered_at";

/// The webhook tables of `backend`: the one place that tells the backends apart.
pub(crate) fn open(backend: &Backend) -> Arc<dyn WebhookStore> {
    match backend {
        Backend::Postgres(store) => Arc::new(postgres::PostgresWebhooks::new(store.clone())),
        Backend::Sqlite(store) => Arc::new(sqlite::SqliteWebhooks::new(store.clone())),
    }
}

/// A target's rows, as this instance touches them.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// SHA-256 hex of the full URL: the rows' key (the URL itself may carry credentials).
    pub key: String,
    /// This instance's name in the leases it takes.
    pub holder: String,
    /// How long a claim or a renewal holds the lease.
    pub lease: Duration,
}

/// The event a delivery carries, as its `webhook_deliveries` row records it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outgoing<'a> {
    /// The event's id: with the target, the row's key.
    pub id: Uuid,
    /// The webhook event's name (`connection.created`, …).
    pub name: &'a str,
    /// The event's global position in the log.
    pub global_position: i64,
}

/// A target's row, as status shows it.
#[derive(Debug)]
pub(crate) struct TargetRow {
    pub position: Position,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// What became of the earlier attempts at one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeliveryState {
    /// Answered 2xx.
    Delivered,
    /// Failed; the next attempt is due at this time.
    Retrying(DateTime<Utc>),
    /// An attempt without a recorded outcome (in flight, or cut short by a crash): the next
    /// one is due now.
    Pending,
}

impl DeliveryState {
    /// The state of a `webhook_deliveries` row from its `status` and `next_attempt_at`.
    fn from_row(status: &str, next_attempt_at: Option<DateTime<Utc>>) -> Self {
        match (status, next_attempt_at) {
            ("delivered", _) => Self::Delivered,
            ("retrying", Some(next)) => Self::Retrying(next),
            _ => Self::Pending,
        }
    }
}

/// A count of rows for `LIMIT`.
fn limit_of(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    //! The contract every implementation keeps, run on both backends.
    #![allow(clippy::unwrap_used)]

    use chrono::{SubsecRound, TimeZone};
    use domain::testing::TestDatabase;

    use super::*;

    domain::on_both_backends!(
        one_holder_has_a_target_until_it_hands_the_lease_back,
        an_expired_lease_is_taken_over_at_the_checkpoint,
        attempts_are_counted_and_their_outcomes_kept_until_pruned,
        the_slowest_target_is_the_one_furthest_behind_among_those_followed_lately,
    );

    const START: Position = Position {
        commit: 3,
        global: 7,
    };
    const URL: &str = "https://hooks.example/in";

    /// The event `id` named `name`, at global position 8.
    fn outgoing(id: Uuid, name: &str) -> Outgoing<'_> {
        Outgoing {
            id,
            name,
            global_position: 8,
        }
    }

    /// The store of `db` with one target registered at [`START`], as two instances see it: `a`,
    /// whose leases last `lease`, and `b`, whose leases last a minute.
    async fn registered(
        db: &TestDatabase,
        lease: Duration,
    ) -> (Arc<dyn WebhookStore>, [Target; 2]) {
        let store = open(&db.open().await);
        let target = |holder: &str, lease| Target {
            key: "target-1".to_owned(),
            holder: holder.to_owned(),
            lease,
        };
        let a = target("a", lease);
        store.register(&a, URL, START).await.unwrap();
        (store, [a, target("b", Duration::from_secs(60))])
    }

    async fn one_holder_has_a_target_until_it_hands_the_lease_back(db: &TestDatabase) {
        let (store, [a, b]) = registered(db, Duration::from_secs(60)).await;
        assert_eq!(store.claim(&a).await.unwrap(), Some(START));
        assert_eq!(store.claim(&a).await.unwrap(), Some(START), "renewed");
        assert_eq!(store.claim(&b).await.unwrap(), None);

        let next = Position {
            commit: 4,
            global: 9,
        };
        assert!(!store.advance(&b, next).await.unwrap(), "b holds no lease");
        store.release(&b).await.unwrap();
        assert_eq!(
            store.claim(&b).await.unwrap(),
            None,
            "b cannot release a's lease"
        );
        store
            .record_error(&a, "the receiver answered HTTP 500")
            .await
            .unwrap();
        let (row, _) = store.status(&a, 10).await.unwrap();
        assert_eq!(
            row.last_error.as_deref(),
            Some("the receiver answered HTTP 500")
        );
        assert!(store.advance(&a, next).await.unwrap());

        let (row, deliveries) = store.status(&a, 10).await.unwrap();
        assert_eq!(row.position, next);
        assert_eq!(row.lease_holder.as_deref(), Some("a"));
        assert!(row.lease_expires_at.is_some_and(|at| at > Utc::now()));
        assert_eq!(row.last_error, None, "an advance clears the last error");
        assert!(deliveries.is_empty());

        store.release(&a).await.unwrap();
        let (row, _) = store.status(&a, 10).await.unwrap();
        assert_eq!((row.lease_holder, row.lease_expires_at), (None, None));
        // Registering again (a restart) keeps the checkpoint.
        store.register(&b, URL, START).await.unwrap();
        assert_eq!(store.claim(&b).await.unwrap(), Some(next));
    }

    async fn an_expired_lease_is_taken_over_at_the_checkpoint(db: &TestDatabase) {
        let (store, [a, b]) = registered(db, Duration::ZERO).await;
        assert_eq!(store.claim(&a).await.unwrap(), Some(START));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.claim(&b).await.unwrap(), Some(START));
        assert!(
            !store.advance(&a, Position::START).await.unwrap(),
            "a lost it"
        );
        assert_eq!(
            store
                .start_attempt(&a, outgoing(Uuid::nil(), "connection.created"))
                .await
                .unwrap(),
            None,
            "no attempt without the lease"
        );
        assert_eq!(store.delivery_state(&a, Uuid::nil()).await.unwrap(), None);
    }

    async fn the_slowest_target_is_the_one_furthest_behind_among_those_followed_lately(
        db: &TestDatabase,
    ) {
        let (store, [a, _]) = registered(db, Duration::from_secs(60)).await;
        let hour = Duration::from_secs(3600);
        let slowest = store.slowest_followed(hour).await.unwrap();
        assert_eq!(slowest, Some((START, URL.to_owned())));
        // Another target, further ahead: the first one is still the slowest.
        let other = Target {
            key: "target-2".to_owned(),
            ..a.clone()
        };
        let ahead = Position {
            commit: 9,
            global: 20,
        };
        store
            .register(&other, "https://other.example/in", ahead)
            .await
            .unwrap();
        assert_eq!(
            store.slowest_followed(hour).await.unwrap(),
            Some((START, URL.to_owned()))
        );
        // Once the first one moves past the other, the other is.
        assert_eq!(store.claim(&a).await.unwrap(), Some(START));
        let past = Position {
            commit: 10,
            global: 21,
        };
        assert!(store.advance(&a, past).await.unwrap());
        let slowest = store.slowest_followed(hour).await.unwrap();
        assert_eq!(
            slowest,
            Some((ahead, "https://other.example/in".to_owned()))
        );
        // A target nobody registered or leased within the time asked about holds nothing back.
        let lately = Duration::from_secs(2);
        tokio::time::sleep(lately + Duration::from_millis(100)).await;
        assert_eq!(store.slowest_followed(lately).await.unwrap(), None);
        // Registering it again (an instance that may not deliver) does not; a lease does.
        store.register(&a, URL, START).await.unwrap();
        assert_eq!(store.slowest_followed(lately).await.unwrap(), None);
        assert_eq!(store.claim(&a).await.unwrap(), Some(past));
        assert_eq!(
            store.slowest_followed(lately).await.unwrap(),
            Some((past, URL.to_owned()))
        );
    }

    async fn attempts_are_counted_and_their_outcomes_kept_until_pruned(db: &TestDatabase) {
        let (store, [a, _]) = registered(db, Duration::from_secs(60)).await;
        let event = Uuid::from_u128(42);
        store.claim(&a).await.unwrap();
        assert_eq!(store.delivery_state(&a, event).await.unwrap(), None);

        let first = store
            .start_attempt(&a, outgoing(event, "refresh.failed"))
            .await
            .unwrap();
        assert_eq!(first, Some(1));
        assert_eq!(
            store.delivery_state(&a, event).await.unwrap(),
            Some(DeliveryState::Pending)
        );
        let next = Utc::now().trunc_subsecs(3) + chrono::Duration::seconds(30);
        let failed = Failed {
            status: Some(500),
            error: "the receiver answered HTTP 500".to_owned(),
            next,
        };
        store.failed(&a, event, &failed).await.unwrap();
        assert_eq!(
            store.delivery_state(&a, event).await.unwrap(),
            Some(DeliveryState::Retrying(next))
        );

        let second = store
            .start_attempt(&a, outgoing(event, "refresh.failed"))
            .await
            .unwrap();
        assert_eq!(second, Some(2));
        store.delivered(&a, event, 204).await.unwrap();
        assert_eq!(
            store.delivery_state(&a, event).await.unwrap(),
            Some(DeliveryState::Delivered)
        );
        let (_, deliveries) = store.status(&a, 10).await.unwrap();
        let [delivery] = deliveries.as_slice() else {
            panic!("one delivery: {deliveries:?}");
        };
        assert_eq!(delivery.event_id, event);
        assert_eq!(delivery.event, "refresh.failed");
        assert_eq!(delivery.global_position, 8);
        assert_eq!(delivery.status, "delivered");
        assert_eq!(delivery.attempts, 2);
        assert_eq!(delivery.last_status, Some(204));
        assert_eq!(
            delivery.last_error.as_deref(),
            Some("the receiver answered HTTP 500")
        );
        assert_eq!(delivery.next_attempt_at, None);
        assert!(delivery.delivered_at.is_some());
        assert!(delivery.first_attempt_at <= delivery.last_attempt_at);

        // Only deliveries delivered before the cut are pruned.
        let long_ago = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        store.prune(&a, long_ago).await.unwrap();
        assert_eq!(store.status(&a, 10).await.unwrap().1.len(), 1);
        store
            .prune(&a, Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap();
        assert!(store.status(&a, 10).await.unwrap().1.is_empty());
        assert_eq!(store.delivery_state(&a, event).await.unwrap(), None);
    }
}
