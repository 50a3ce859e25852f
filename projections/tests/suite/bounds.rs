//! Whatever the commands accept, every reader reads back: random JSON (deep, wide, extreme
//! numbers, any Unicode) set as a connection's config and metadata is either refused by the
//! bounds, writing nothing, or read back equal from the log, from the read model and after a
//! rebuild, on both backends.

use chrono::Utc;
use domain::bounds::JsonBounds;
use domain::commands::{AuthorizeConnection, CommandError};
use domain::connection::{ConnectionKey, ConnectionRejected, Flow};
use domain::credentials::Credentials;
use domain::testing::TestDatabase;
use projections::Runner;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};

use crate::{fixture, settle};

domain::on_both_backends!(
    every_accepted_value_reads_back_equal_and_every_refused_one_writes_nothing
);

/// How many random values each backend tries.
const CASES: usize = 48;

/// Any JSON value, up to 40 levels deep (the bounds allow 32).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![
            Just(0.0),
            Just(-0.0),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(5e-324)
        ]
        .prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(40, 256, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Equal as JSON: numbers by value (PostgreSQL's `jsonb` keeps a number's value, not whether
/// it was written as an integer or a float).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), ..) => x == y,
                (.., Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn object(value: &Value) -> Map<String, Value> {
    let mut members = Map::new();
    members.insert("v".to_owned(), value.clone());
    members
}

async fn every_accepted_value_reads_back_equal_and_every_refused_one_writes_nothing(
    db: &TestDatabase,
) {
    let f = fixture(db).await;
    f.integration("gh").await;
    let runner = Runner::new(&f.backend);
    let mut random = TestRunner::default();
    let strategy = any_json();
    let mut accepted = Vec::new();
    for case in 0..CASES {
        let value = strategy.new_tree(&mut random).unwrap().current();
        let members = object(&value);
        let key = ConnectionKey::new("gh", format!("c{case}"));
        let outcome = f
            .commands
            .authorize_connection(AuthorizeConnection {
                only_new: Default::default(),
                only_existing: Default::default(),
                ownership: Default::default(),
                key: key.clone(),
                provider: "github".into(),
                flow: Flow::Import,
                credentials: Credentials::OAuth2 {
                    access_token: "token".into(),
                    refresh_token: None,
                    expires_at: None,
                    raw: Value::Object(members.clone()),
                },
                scopes: vec![],
                connection_config: members.clone(),
                now: Utc::now(),
                metadata: Some(members.clone()),
            })
            .await;
        match JsonBounds::CLIENT.check_object(&members) {
            Ok(()) => {
                let loaded = outcome.unwrap_or_else(|e| panic!("{e}: refused {value}"));
                let active = loaded.state.active().unwrap();
                assert!(
                    same(
                        &Value::Object(active.metadata.clone()),
                        &Value::Object(members.clone())
                    ),
                    "{value}"
                );
                accepted.push((key, members));
            }
            Err(reason) => {
                match outcome {
                    Err(CommandError::Connection(ConnectionRejected::OutOfBounds {
                        reason: r,
                        ..
                    })) => {
                        assert_eq!(r, reason, "{value}")
                    }
                    other => panic!("{value}: expected {reason}, got {other:?}"),
                }
                assert!(
                    f.commands
                        .load_connection(&key)
                        .await
                        .unwrap()
                        .state
                        .active()
                        .is_none()
                );
            }
        }
    }
    assert!(!accepted.is_empty(), "no random value was within bounds");

    // From the log, from the read model, and from a rebuilt read model.
    settle(&runner).await;
    for rebuilt in [false, true] {
        if rebuilt {
            runner.rebuild("connections", |_| {}).await.unwrap();
        }
        for (key, members) in &accepted {
            let expected = Value::Object(members.clone());
            let logged = f.commands.load_connection(key).await.unwrap();
            let logged = logged.state.active().unwrap();
            let record = f.find("gh", key.connection_id()).await.unwrap().connection;
            for (from, active) in [("log", logged), ("read model", &record)] {
                assert!(
                    same(&Value::Object(active.metadata.clone()), &expected),
                    "{from}: {expected}"
                );
                assert!(
                    same(&Value::Object(active.connection_config.clone()), &expected),
                    "{from}: {expected}"
                );
            }
        }
    }
}
