//! The operator dashboard (`/ui/`): in headless Chromium (`tests/node/dashboard.mjs`: sign in,
//! find a connection by tag, its history, a forced refresh, a rebuild, integrations, sign out,
//! screenshots of every page), and what it refuses over plain HTTP on both backends: no session,
//! forged and expired cookies, a wrong key, actions without their CSRF token or from another
//! site, actions on deleted connections; and that no page shows a token or a secret.

use std::process::Command;
use std::time::Duration;

use domain::testing::TestDatabase;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use serde_json::json;
use sha2::Sha256;

use crate::fake_service::{FakeService, KEY};
use crate::node::{install_client, node_dir, require_chromium, require_node, run_script_beside};

/// The server's secret key.
const SECRET: &str = "dashboard-test-secret-0123456789abcdef";

/// The browser script signs in, refreshes and rebuilds in a few seconds.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

domain::on_both_backends!(the_dashboard_refuses_what_it_must_and_never_shows_a_secret,);

/// The service (`instances` of it) with the fake provider, a secret key, and connections `alpha`
/// (tag team=core), `beta` (team=growth) and `gamma` (no tag) of `fake`, refreshable at the
/// provider.
async fn service(db: &TestDatabase, instances: usize) -> FakeService {
    let service = FakeService::on(db)
        .instances(instances)
        .args(&["--secret-key", SECRET])
        .start()
        .await;
    for (n, (id, tags)) in [
        ("alpha", json!({"team": "core"})),
        ("beta", json!({"team": "growth"})),
        ("gamma", json!({})),
    ]
    .into_iter()
    .enumerate()
    {
        let refresh = format!("dashboard-refresh-{n}");
        service.fake.accept_refresh_token(&refresh);
        let body = json!({
            "provider_config_key": KEY, "connection_id": id,
            "access_token": format!("dashboard-access-{n}"), "refresh_token": refresh,
            "expires_at": chrono::Utc::now().timestamp() + 3600,
            "tags": tags, "end_user": {"id": format!("user-{n}"), "display_name": format!("User {n}")},
        });
        let response = service.app().post_json("/connections", &body).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_finds_a_connection_refreshes_it_and_rebuilds_in_a_browser() {
    require_node();
    let chromium = require_chromium();
    let node_dir = node_dir();
    install_client(&node_dir);
    let db = TestDatabase::postgres().await;
    let service = service(&db, 1).await;
    let shots = tempfile::Builder::new()
        .prefix("grantline-dashboard-")
        .tempdir()
        .unwrap();
    // GRANTLINE_KEEP_SCREENSHOTS=1 keeps them (also when the test fails) to look at.
    let (shots, _removed_when_done) = match std::env::var_os("GRANTLINE_KEEP_SCREENSHOTS") {
        Some(_) => (shots.keep(), None),
        None => (shots.path().to_owned(), Some(shots)),
    };

    let mut command = Command::new("node");
    command
        .arg("dashboard.mjs")
        .current_dir(&node_dir)
        .env("GRANTLINE_URL", &service.app().address)
        .env("GRANTLINE_SECRET", SECRET)
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .env("CONNECTION_ID", "beta")
        .env("TAG", "team=growth");
    let printed = run_script_beside(
        command,
        shots.join("dashboard.log"),
        SCRIPT_TIMEOUT,
        String::new,
    )
    .await;
    println!("{printed}\nscreenshots in {}", shots.display());

    // The forced refresh is in the connection's history, and the read model was rebuilt.
    let history = service
        .app()
        .get_ok(&format!(
            "/connections/beta/history?provider_config_key={KEY}"
        ))
        .await;
    let entries = history["events"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["type"] == "tokens_refreshed" && e["trigger"] == "force"),
        "{history}"
    );
    let pngs = std::fs::read_dir(&shots)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, 10, "a screenshot of every page");
}

/// The session key the dashboard derives from `secret`, and a cookie it would sign.
fn cookie_signed_with(secret: &str, expires: i64, id: &str) -> String {
    let mac = |key: &[u8], message: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    };
    let key = mac(secret.as_bytes(), b"grantline dashboard sessions v1");
    let signature = hex::encode(mac(&key, format!("session|{expires}|{id}").as_bytes()));
    format!("grantline_ui={expires}.{id}.{signature}")
}

async fn the_dashboard_refuses_what_it_must_and_never_shows_a_secret(db: &TestDatabase) {
    let service = service(db, 2).await;
    let app = service.app();
    // A browser without the API's key and without redirects: what the dashboard answers is seen.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str, cookie: Option<&str>| {
        let mut request = browser.get(app.url(path));
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, cookie);
        }
        request.send()
    };

    // No session, a forged one, an expired one: sent to sign in, nothing shown.
    let now = chrono::Utc::now().timestamp();
    for cookie in [
        None,
        Some("grantline_ui=garbage".to_owned()),
        Some(cookie_signed_with("another secret", now + 3600, "abc")),
        Some(cookie_signed_with(SECRET, now - 1, "abc")),
    ] {
        let response = get("/ui/connections", cookie.as_deref()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{cookie:?}");
        assert_eq!(
            response.headers()[LOCATION],
            "/ui/login?next=%2Fui%2Fconnections"
        );
    }
    // A cookie signed with the secret key is what signing in gives.
    let good = cookie_signed_with(SECRET, now + 3600, "abc");
    assert_eq!(get("/ui/", Some(&good)).await.unwrap().status(), 200);

    // A wrong key gets the form again, without a cookie; the right one a strict cookie.
    let sign_in = |key: &str| {
        browser
            .post(app.url("/ui/login"))
            .form(&[("secret_key", key), ("next", "//evil.example/")])
            .send()
    };
    let refused = sign_in("not the key").await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get(SET_COOKIE).is_none());
    let signed_in = sign_in(SECRET).await.unwrap();
    assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
    assert_eq!(signed_in.headers()[LOCATION], "/ui/", "never off-site");
    let set_cookie = signed_in.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    // A way back that no Location header can hold is dropped too, not a 500.
    for next in ["/ui/\u{7f}x", "/ui/a\r\nb", "/ui/é", "/ui/a b"] {
        let signed_in = browser
            .post(app.url("/ui/login"))
            .form(&[("secret_key", SECRET), ("next", next)])
            .send()
            .await
            .unwrap();
        assert_eq!(signed_in.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(signed_in.headers()[LOCATION], "/ui/", "{next:?}");
    }

    // Pages carry a strict policy and never a token or a secret.
    let page = get("/ui/connections/fake/alpha", Some(&cookie))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains("team=core"), "tags are shown");
    for secret in [
        "dashboard-access-0",
        "dashboard-refresh-0",
        crate::fake_provider::CLIENT_SECRET,
        SECRET,
    ] {
        assert!(!html.contains(secret), "the page shows {secret}");
    }
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    for path in [
        "/ui/integrations/fake",
        "/ui/integrations",
        "/ui/",
        "/ui/operations",
    ] {
        let html = get(path, Some(&cookie))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !html.contains(crate::fake_provider::CLIENT_SECRET),
            "{path} shows the client secret"
        );
    }

    // Actions without the CSRF token, with a wrong one, or from another site: refused, not done.
    let history_length = || async {
        app.get_ok(&format!(
            "/connections/alpha/history?provider_config_key={KEY}"
        ))
        .await["events"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = history_length().await;
    let refresh = "/ui/connections/fake/alpha/refresh";
    let post = |form: &[(&str, &str)], origin: Option<&str>| {
        let mut request = browser
            .post(app.url(refresh))
            .header(COOKIE, &cookie)
            .form(form);
        if let Some(origin) = origin {
            request = request.header(ORIGIN, origin);
        }
        request.send()
    };
    assert_eq!(
        post(&[], None).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(&[("csrf", "0123")], None).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let cross_site = post(&[("csrf", &csrf)], Some("https://evil.example"))
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    assert!(cross_site.text().await.unwrap().contains("another site"));
    assert_eq!(history_length().await, before, "no refusal refreshed");
    // Signed out: the action is refused.
    let signed_out = browser
        .post(app.url(refresh))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), StatusCode::UNAUTHORIZED);
    // A client secret the API would refuse (a line break) is refused by the form too.
    let form = browser
        .post(app.url("/ui/integrations"))
        .header(COOKIE, &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("key", "ctl"),
            ("provider", "github"),
            ("client_id", "abc"),
            ("client_secret", "ab\r\nX-Injected: 1"),
            ("scopes", "repo"),
        ])
        .send()
        .await
        .unwrap();
    assert!(
        form.text().await.unwrap().contains("control characters"),
        "the form says why"
    );
    assert_eq!(app.get("/config/ctl").await.status(), 404, "nothing stored");
    // The real thing refreshes, once.
    let done = post(&[("csrf", &csrf)], Some(&app.address)).await.unwrap();
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        history_length().await,
        before + 2,
        "a lease and its refresh"
    );

    // Actions on a deleted connection: a clear page, nothing done.
    let response = app
        .delete(&format!("/connections/gamma?provider_config_key={KEY}"))
        .await;
    assert!(response.status().is_success());
    for path in [
        "/ui/connections/fake/gamma/refresh",
        "/ui/connections/fake/gamma/delete",
    ] {
        let response = browser
            .post(app.url(path))
            .header(COOKIE, &cookie)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_client_error(),
            "{path}: {}",
            response.status()
        );
        let html = response.text().await.unwrap();
        assert!(html.contains("<h1>"), "a page, not a stack trace: {html}");
    }
    // Its page says it is deleted and still shows the history.
    let html = get("/ui/connections/fake/gamma", Some(&cookie))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("deleted"), "{html}");
    assert!(html.contains("connection_deleted"), "{html}");
    // An unknown connection: 404, a page.
    let unknown = get("/ui/connections/fake/nobody", Some(&cookie))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // A long history pages newest first, and a page seen before shows what was appended since.
    for n in 0..260 {
        let body =
            json!({"connection_id": "beta", "provider_config_key": KEY, "metadata": {"n": n}});
        assert!(
            app.post_json("/connection/metadata", &body)
                .await
                .status()
                .is_success()
        );
    }
    let page = |path: String| {
        let cookie = cookie.clone();
        let browser = browser.clone();
        let url = app.url(&path);
        async move {
            browser
                .get(url)
                .header(COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let newest = page("/ui/connections/fake/beta".to_owned()).await;
    assert!(newest.contains("261 events, newest first"), "{newest}");
    assert!(newest.contains("#261 "), "the newest entry first");
    let body =
        json!({"connection_id": "beta", "provider_config_key": KEY, "metadata": {"n": "last"}});
    assert!(
        app.post_json("/connection/metadata", &body)
            .await
            .status()
            .is_success()
    );
    let newest = page("/ui/connections/fake/beta".to_owned()).await;
    assert!(
        newest.contains("262 events, newest first") && newest.contains("#262 "),
        "{newest}"
    );
    assert_eq!(
        newest.matches("<li class=").count(),
        100,
        "a page holds 100 entries"
    );
    let oldest = page("/ui/connections/fake/beta?before=63".to_owned()).await;
    assert!(
        oldest.contains("#1 ") && oldest.contains("connection_authorized"),
        "{oldest}"
    );
    assert!(
        !oldest.contains("rel=\"next\""),
        "no page after the first event"
    );

    // Filters that are not filters: the list says so, nothing breaks.
    for query in [
        "tag=novalue",
        "health=purple",
        "page=abc",
        &format!("q={}", "x".repeat(300)),
        // PostgreSQL refuses a NUL in a query: refused here, not taken for an outage.
        "q=%00",
        "tag=a%3D%00",
        "tag=%00%3Da",
        "end_user=%00",
        "integration=%00",
    ] {
        let response = get(&format!("/ui/connections?{query}"), Some(&cookie))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{query}");
        assert!(
            response.text().await.unwrap().contains("role=\"alert\""),
            "{query}"
        );
    }

    // Signing out ends the session on every instance, not only on the one that served it.
    let other = &service.apps[1];
    let on_other = |cookie: String| browser.get(other.url("/ui/")).header(COOKIE, cookie).send();
    assert_eq!(on_other(cookie.clone()).await.unwrap().status(), 200);
    let out = browser
        .post(app.url("/ui/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = get("/ui/", Some(&cookie)).await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    let elsewhere = on_other(cookie.clone()).await.unwrap();
    assert_eq!(elsewhere.status(), StatusCode::SEE_OTHER);
    // An action with the signed-out cookie is refused everywhere, and does nothing.
    let refused = browser
        .post(other.url("/ui/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}
