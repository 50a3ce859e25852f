//! The scheduler's due-for-refresh queries and their in-memory statement
//! ([`DueQuery::reason`], which the simulated day runs) select the same connections for the same
//! reasons.

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use domain::commands::AuthorizeConnection;
use domain::connection::{ConnectionKey, Flow};
use domain::credentials::Credentials;
use domain::testing::TestDatabase;
use projections::Runner;
use projections::queries::{self, DueFacts, DueQuery, DueReason};

use crate::{fixture, settle};

domain::on_both_backends!(
    the_queries_select_what_the_policy_statement_says,
    a_stored_read_time_moves_only_forward_and_by_more_than_the_step,
);

/// A connection of the test: its id, provider, token expiry and last read (from `now`).
struct Case {
    id: &'static str,
    provider: &'static str,
    expires_in: Option<Duration>,
    read_ago: Option<Duration>,
}

async fn the_queries_select_what_the_policy_statement_says(db: &TestDatabase) {
    let f = fixture(db).await;
    f.integration("gh").await;
    let now = Utc::now();
    let h = Duration::hours;
    let cases = [
        Case {
            id: "in-use-expiring",
            provider: "github",
            expires_in: Some(h(0) + Duration::minutes(20)),
            read_ago: Some(h(2)),
        },
        Case {
            id: "in-use-fresh",
            provider: "github",
            expires_in: Some(h(3)),
            read_ago: Some(h(1)),
        },
        Case {
            id: "unread-expiring",
            provider: "github",
            expires_in: Some(Duration::minutes(10)),
            read_ago: None,
        },
        Case {
            id: "read-long-ago",
            provider: "github",
            expires_in: Some(Duration::minutes(5)),
            read_ago: Some(h(30)),
        },
        Case {
            id: "no-expiry",
            provider: "github",
            expires_in: None,
            read_ago: Some(h(1)),
        },
        Case {
            id: "documented",
            provider: "salesforce",
            expires_in: Some(h(2)),
            read_ago: None,
        },
    ];
    let mut reads = Vec::new();
    for case in &cases {
        let key = ConnectionKey::new("gh", case.id);
        f.commands
            .authorize_connection(AuthorizeConnection {
                only_new: Default::default(),
                only_existing: Default::default(),
                ownership: Default::default(),
                key: key.clone(),
                provider: case.provider.into(),
                flow: Flow::Import,
                credentials: Credentials::OAuth2 {
                    access_token: format!("token-{}", case.id),
                    refresh_token: Some(format!("refresh-{}", case.id)),
                    expires_at: case.expires_in.map(|d| now + d),
                    raw: serde_json::json!({}),
                },
                scopes: vec![],
                connection_config: serde_json::Map::new(),
                now,
                metadata: None,
            })
            .await
            .unwrap();
        if let Some(ago) = case.read_ago {
            reads.push((key.stream_id().as_str().to_owned(), now - ago));
        }
    }
    settle(&Runner::new(&f.backend)).await;
    f.read_models
        .store()
        .note_reads(reads, std::time::Duration::ZERO)
        .await
        .unwrap();

    // Ticks at several times: now, a day on, four days on (past the salesforce-like
    // provider's keep-alive age), eight days on (past everyone's).
    for offset in [h(0), h(25), h(4 * 24 + 1), h(8 * 24)] {
        let tick = now + offset;
        let before = |d: Duration| tick - d;
        let query = DueQuery {
            expiring_before: tick + Duration::minutes(30),
            read_since: before(h(24)),
            keep_alive: vec![(vec!["salesforce".to_owned()], before(h(3 * 24)))],
            renewed_before: before(h(7 * 24)),
        };
        let selected: BTreeSet<(String, DueReason)> =
            queries::due_for_refresh(&f.read_models, &query, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|(key, reason)| (key.connection_id().to_owned(), reason))
                .collect();
        let stated: BTreeSet<(String, DueReason)> = cases
            .iter()
            .filter_map(|case| {
                let facts = DueFacts {
                    provider: case.provider,
                    expires_at: case.expires_in.map(|d| now + d),
                    renewed_at: now,
                    last_read_at: case.read_ago.map(|ago| now - ago),
                };
                query
                    .reason(&facts)
                    .map(|reason| (case.id.to_owned(), reason))
            })
            .collect();
        assert_eq!(selected, stated, "tick at now + {offset}");
        if offset == h(0) {
            assert_eq!(
                stated,
                BTreeSet::from([("in-use-expiring".to_owned(), DueReason::Expiring)])
            );
        }
    }
}

/// A stream's stored read time moves forward only, and only by more than the step the reads
/// are written with (every instance writes them; a connection read all day is written once a
/// step).
async fn a_stored_read_time_moves_only_forward_and_by_more_than_the_step(db: &TestDatabase) {
    let f = fixture(db).await;
    let store = f.read_models.store();
    let step = std::time::Duration::from_secs(600);
    let note = |at, step| store.note_reads(vec![("connection-s".to_owned(), at)], step);
    // Whether the one stored time is `at`, give or take a second.
    let stored_at = |at| async move {
        let since = |t| store.count_reads(t);
        (
            since(at - Duration::seconds(1)).await.unwrap(),
            since(at + Duration::seconds(1)).await.unwrap(),
        ) == (1, 0)
    };
    let t0 = Utc::now();
    note(t0, step).await.unwrap();
    assert!(stored_at(t0).await);
    // Less than a step on: unchanged.
    note(t0 + Duration::minutes(5), step).await.unwrap();
    assert!(stored_at(t0).await);
    // Back in time: unchanged.
    note(t0 - Duration::hours(1), step).await.unwrap();
    assert!(stored_at(t0).await);
    // More than a step on: moved.
    let later = t0 + Duration::minutes(11);
    note(later, step).await.unwrap();
    assert!(stored_at(later).await);
    // Without a step, any move forward is written.
    let soon = later + Duration::seconds(30);
    note(soon, std::time::Duration::ZERO).await.unwrap();
    assert!(stored_at(soon).await);
}
