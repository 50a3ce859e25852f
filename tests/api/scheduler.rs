//! The proactive refresh scheduler against the fake provider (rotating refresh tokens that fail
//! on reuse): connections in use refreshed ahead of expiry, once however many schedulers tick at
//! once, unread ones left to their next read, permanently failed ones skipped, idle ones kept
//! alive (after their template's keep-alive age where it has one), calls paced per integration;
//! and `/metrics`.

use std::time::Duration;

use chrono::Utc;
use domain::connection::ConnectionEvent;
use domain::testing::TestDatabase;
use futures_util::StreamExt;
use workers::scheduler::TickReport;

use crate::assert_error;
use crate::fake_provider::TokenMode;
use crate::fake_service::FakeService;

domain::on_both_backends!(
    a_tick_refreshes_due_connections_skips_failed_ones_and_keeps_idle_ones_alive,
    only_connections_in_use_are_refreshed_ahead_of_expiry,
    a_template_with_a_documented_refresh_token_lifetime_is_kept_alive_sooner,
    the_budget_paces_scheduled_refreshes_per_integration,
    metrics_show_the_refresh_counters_after_a_refresh,
    an_instance_with_the_scheduler_role_refreshes_due_connections_on_its_schedule,
);

domain::on_postgres_only!(three_schedulers_refresh_a_thousand_due_connections_exactly_once(4));

/// Instances on one database with the fake provider as the integration `fake`.
struct Env(FakeService);

impl std::ops::Deref for Env {
    type Target = FakeService;

    fn deref(&self) -> &FakeService {
        &self.0
    }
}

async fn env(db: &TestDatabase, instances: usize) -> Env {
    env_with(db, instances, &[]).await
}

async fn env_with(db: &TestDatabase, instances: usize, extra: &[&str]) -> Env {
    let service = FakeService::on(db)
        .instances(instances)
        .args(&["--refresh-concurrency", "16"])
        .args(extra)
        .start()
        .await;
    Env(service)
}

impl Env {
    /// Imports connection `id` with refresh token `rt-{id}` and an access token expiring
    /// `expires_in` seconds from now (none: no known expiry).
    async fn import(&self, id: &str, expires_in: Option<i64>) {
        let (access, refresh) = (format!("old-access-{id}"), format!("rt-{id}"));
        self.0.import(id, &access, &refresh, expires_in).await;
    }

    /// Imports `id` expired, and makes its refresh fail permanently on a read.
    async fn import_broken(&self, id: &str) {
        self.import(id, Some(-60)).await;
        self.fake.set_mode(TokenMode::InvalidGrant);
        let read = self
            .app()
            .get(&format!("/connection/{id}?provider_config_key=fake"))
            .await;
        assert_error(read, 424, "connection_refresh_failed").await;
        self.fake.set_mode(TokenMode::Json);
    }

    /// Waits until the read models have everything committed so far (schedulers read them).
    /// The instances' own runners may hold the checkpoints, so this waits for the lag to go.
    async fn catch_up(&self) {
        let runner = &self.states[0].runner;
        for _ in 0..500 {
            runner.catch_up().await.unwrap();
            // `caught_up` also counts what PostgreSQL's horizon still hides (another test's
            // open transaction can hide this test's newest events).
            if runner.status().await.unwrap().iter().all(|s| s.caught_up) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the projections did not catch up");
    }

    /// Reads connection `id` (expects 200) and writes the read where the scheduler sees it.
    async fn read(&self, id: &str) {
        self.app()
            .get_ok(&format!("/connection/{id}?provider_config_key=fake"))
            .await;
        self.flush_reads().await;
    }

    /// Writes every instance's noted reads.
    async fn flush_reads(&self) {
        for state in &self.states {
            state.activity.flush_once(&state.read_models).await.unwrap();
        }
    }

    /// Whether connection `id`'s stream has a `TokensRefreshed`, and how many.
    async fn refreshes_of(&self, id: &str) -> usize {
        self.events(id)
            .await
            .iter()
            .filter(|e| matches!(e, ConnectionEvent::TokensRefreshed(_)))
            .count()
    }
}

async fn a_tick_refreshes_due_connections_skips_failed_ones_and_keeps_idle_ones_alive(
    db: &TestDatabase,
) {
    let env = env(db, 1).await;
    // Outside the read margin (15 minutes), inside the scheduler's window (20 minutes).
    env.import("due", Some(18 * 60)).await;
    env.import("fresh", Some(2 * 3600)).await;
    env.import("idle", None).await;
    // `broken` fails permanently on read.
    env.import_broken("broken").await;
    assert_eq!(env.fake.refresh_requests(), 1);
    // All in use (read), none of them refreshed by the read.
    for id in ["due", "fresh", "idle"] {
        env.read(id).await;
    }
    assert_eq!(env.fake.refresh_requests(), 1);
    env.catch_up().await;

    let scheduler = &env.states[0].scheduler;
    let report = scheduler.tick_once(Utc::now()).await.unwrap();
    assert_eq!(
        report,
        TickReport {
            due: 1,
            refreshed: 1,
            failed: 0,
            skipped: 0
        }
    );
    assert_eq!(env.fake.refresh_requests(), 2);
    assert_eq!(env.refreshes_of("due").await, 1);
    // Nothing is due any more: the tick does nothing.
    env.catch_up().await;
    let report = scheduler.tick_once(Utc::now()).await.unwrap();
    assert_eq!(report, TickReport::default());
    assert_eq!(env.fake.refresh_requests(), 2);

    // A week and an hour later (the default idle age is 7 days) none is in use any more, and
    // every live one is refreshed to keep its refresh token alive, `idle` (no known expiry)
    // too; `broken` stays skipped.
    let later = Utc::now() + chrono::Duration::days(7) + chrono::Duration::hours(1);
    let report = scheduler.tick_once(later).await.unwrap();
    assert_eq!(report.due, 3, "{report:?}");
    assert_eq!(report.refreshed, 3, "{report:?}");
    assert_eq!(env.fake.refresh_requests(), 5);
    assert_eq!(env.refreshes_of("idle").await, 1);
    assert_eq!(env.refreshes_of("broken").await, 0);
}

async fn metrics_show_the_refresh_counters_after_a_refresh(db: &TestDatabase) {
    let env = env(db, 1).await;
    env.import("expired", Some(-60)).await;
    env.import("soon", Some(18 * 60)).await;
    env.apps[0]
        .get_ok("/connection/expired?provider_config_key=fake")
        .await;
    env.read("soon").await;
    env.catch_up().await;
    env.states[0].scheduler.tick_once(Utc::now()).await.unwrap();
    let response = env.apps[0].get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    for line in [
        "# TYPE grantline_refresh_provider_calls_total counter",
        "grantline_refresh_provider_calls_total{trigger=\"read\"} 1",
        "grantline_refresh_provider_calls_total{trigger=\"schedule\"} 1",
        "grantline_refresh_outcomes_total{trigger=\"read\",outcome=\"refreshed\"} 1",
        "grantline_refresh_outcomes_total{trigger=\"schedule\",outcome=\"refreshed\"} 1",
        "grantline_refresh_outcomes_total{trigger=\"read\",outcome=\"failed_permanent\"} 0",
        "grantline_refresh_provider_duration_seconds_count 2",
        "grantline_refresh_lease_waits_total 0",
        "grantline_scheduler_ticks_total 1",
        "grantline_scheduler_connections_total{result=\"refreshed\"} 1",
        "grantline_scheduler_due_total{reason=\"in_use_expiring\"} 1",
        "grantline_scheduler_due_total{reason=\"keep_alive\"} 0",
        "grantline_refresh_policy_seconds{setting=\"active_for\"} 86400",
        "grantline_refresh_policy_seconds{setting=\"idle_after\"} 604800",
        "grantline_refresh_budget_per_second 50",
        "grantline_read_activity_total{result=\"noted\"} 2",
        "grantline_read_activity_total{result=\"written\"} 2",
        "grantline_read_activity_pending 0",
        "grantline_connections_in_use 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Every sample line is `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

async fn three_schedulers_refresh_a_thousand_due_connections_exactly_once(db: &TestDatabase) {
    let n = 1000;
    // Unpaced: the budget is not what this test is about.
    let env = &env_with(db, 3, &["--refresh-rate", "0"]).await;
    let ids: Vec<String> = (0..n).map(|i| format!("c-{i:04}")).collect();
    futures_util::stream::iter(ids.iter())
        .map(|id| async move {
            env.import(id, Some(18 * 60)).await;
            env.app()
                .get_ok(&format!("/connection/{id}?provider_config_key=fake"))
                .await;
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    env.flush_reads().await;
    env.import_broken("broken").await;
    env.catch_up().await;
    assert_eq!(env.fake.refresh_requests(), 1);

    let now = Utc::now();
    let (a, b, c) = tokio::join!(
        env.states[0].scheduler.tick_once(now),
        env.states[1].scheduler.tick_once(now),
        env.states[2].scheduler.tick_once(now),
    );
    let reports = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(env.fake.refresh_requests(), 1 + n, "{reports:?}");
    assert_eq!(
        reports.iter().map(|r| r.refreshed).sum::<usize>(),
        n,
        "{reports:?}"
    );
    // A scheduler that lists a connection another one refreshed meanwhile skips it.
    assert!(
        reports.iter().all(|r| r.failed == 0 && r.due <= n),
        "{reports:?}"
    );

    // Exactly one TokensRefreshed per connection, none for the failed one.
    let rows = db
        .postgres_client()
        .await
        .query(
            "SELECT stream_id, count(*) FROM events WHERE event_type = 'TokensRefreshed' \
             GROUP BY stream_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| r.get::<_, i64>(1) == 1));
    assert_eq!(env.refreshes_of("broken").await, 0);
    for id in ids.iter().step_by(97) {
        assert_eq!(env.refreshes_of(id).await, 1, "{id}");
    }

    // Once the read model has the refreshes, nothing is due.
    env.catch_up().await;
    let report = env.states[1].scheduler.tick_once(Utc::now()).await.unwrap();
    assert_eq!(report, TickReport::default());
    assert_eq!(env.fake.refresh_requests(), 1 + n);
}

async fn an_instance_with_the_scheduler_role_refreshes_due_connections_on_its_schedule(
    db: &TestDatabase,
) {
    let env = env_with(
        db,
        1,
        &[
            "--roles",
            "api,projections,scheduler",
            "--refresh-schedule",
            "* * * * * *",
        ],
    )
    .await;
    env.import("due", Some(18 * 60)).await;
    // Read: in use. The instance writes its reads every 5 seconds.
    env.app()
        .get_ok("/connection/due?provider_config_key=fake")
        .await;
    for _ in 0..300 {
        if env.refreshes_of("due").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.refreshes_of("due").await, 1);
    assert_eq!(env.fake.refresh_requests(), 1);
}

async fn only_connections_in_use_are_refreshed_ahead_of_expiry(db: &TestDatabase) {
    let env = env(db, 1).await;
    // Both expire in 18 minutes (inside the window, outside the read margin); only `used` is
    // read.
    env.import("used", Some(18 * 60)).await;
    env.import("unused", Some(18 * 60)).await;
    env.read("used").await;
    env.catch_up().await;
    let scheduler = &env.states[0].scheduler;
    let report = scheduler.tick_once(Utc::now()).await.unwrap();
    assert_eq!(report.due, 1, "{report:?}");
    assert_eq!(report.refreshed, 1, "{report:?}");
    assert_eq!(env.refreshes_of("used").await, 1);
    assert_eq!(env.refreshes_of("unused").await, 0);
    assert_eq!(env.fake.refresh_requests(), 1);

    // A read more than GRANTLINE_REFRESH_ACTIVE_FOR (24 h) ago does not count: a tick a day
    // and a bit later, when both tokens have long expired, refreshes neither.
    env.catch_up().await;
    let later = Utc::now() + chrono::Duration::hours(25);
    let report = scheduler.tick_once(later).await.unwrap();
    assert_eq!(report, TickReport::default());

    // A read of the unused connection makes it in use from then on; the read itself is no
    // event (the stream holds only what happened to the credentials).
    let state = env.state();
    assert_eq!(state.activity.stats().written, 1);
    let events = env.events("unused").await.len();
    env.read("unused").await;
    assert_eq!(state.activity.stats().written, 2);
    assert_eq!(env.events("unused").await.len(), events);
    let text = env.app().get("/metrics").await.text().await.unwrap();
    assert!(
        text.lines().any(|l| l == "grantline_connections_in_use 2"),
        "{text}"
    );
    env.catch_up().await;
    let report = scheduler.tick_once(Utc::now()).await.unwrap();
    assert_eq!(report.refreshed, 1, "{report:?}");
    assert_eq!(env.refreshes_of("unused").await, 1);
}

async fn a_template_with_a_documented_refresh_token_lifetime_is_kept_alive_sooner(
    db: &TestDatabase,
) {
    // The provider documents that an unused refresh token lives 2 days: kept alive after 1.
    let env = Env(FakeService::on(db)
        .template("  refresh_token_idle_days: 2\n")
        .start()
        .await);
    env.import("quiet", Some(3600)).await;
    env.catch_up().await;
    let scheduler = &env.states[0].scheduler;
    assert_eq!(
        scheduler.policy().keep_alive.get("fake"),
        Some(&Duration::from_secs(86_400))
    );
    // Never read. Twenty hours on, not yet; a day and an hour on, once.
    let report = scheduler
        .tick_once(Utc::now() + chrono::Duration::hours(20))
        .await
        .unwrap();
    assert_eq!(report, TickReport::default());
    let report = scheduler
        .tick_once(Utc::now() + chrono::Duration::hours(25))
        .await
        .unwrap();
    assert_eq!(report.due, 1, "{report:?}");
    assert_eq!(report.refreshed, 1, "{report:?}");
    assert_eq!(env.refreshes_of("quiet").await, 1);
    // Renewed now: not due again for another day.
    env.catch_up().await;
    let report = scheduler
        .tick_once(Utc::now() + chrono::Duration::hours(20))
        .await
        .unwrap();
    assert_eq!(report, TickReport::default(), "renewed: not due again");
    let text = env.app().get("/metrics").await.text().await.unwrap();
    for line in [
        "grantline_refresh_keep_alive_seconds{provider=\"fake\"} 86400",
        "grantline_scheduler_due_total{reason=\"keep_alive\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

async fn the_budget_paces_scheduled_refreshes_per_integration(db: &TestDatabase) {
    // Two refreshes a second for the integration: six due connections take two seconds or
    // more, whatever the concurrency (16).
    let env = env_with(db, 1, &["--refresh-rate", "2"]).await;
    for i in 0..6 {
        env.import(&format!("c{i}"), Some(18 * 60)).await;
        env.app()
            .get_ok(&format!("/connection/c{i}?provider_config_key=fake"))
            .await;
    }
    env.flush_reads().await;
    env.catch_up().await;
    let scheduler = &env.states[0].scheduler;
    let started = std::time::Instant::now();
    let report = scheduler.tick_once(Utc::now()).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.refreshed, 6, "{report:?}");
    assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
    let counters = scheduler.counters();
    assert_eq!(
        counters
            .budget_waits
            .load(std::sync::atomic::Ordering::Relaxed),
        4,
        "two go at once (the burst), four wait"
    );
}
