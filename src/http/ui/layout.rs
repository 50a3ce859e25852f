//! The frame every dashboard page shares: head, navigation, sign-out, main.

use axum::response::Html;
use maud::{DOCTYPE, Markup, html};

use super::session::Viewer;

/// Which section a page belongs to (highlighted in the navigation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// Sign-in and error pages: no navigation.
    None,
    Overview,
    Connections,
    Integrations,
    Operations,
}

const SECTIONS: [(Nav, &str, &str); 4] = [
    (Nav::Overview, "/ui/", "Overview"),
    (Nav::Connections, "/ui/connections", "Connections"),
    (Nav::Integrations, "/ui/integrations", "Integrations"),
    (Nav::Operations, "/ui/operations", "Operations"),
];

/// A whole page titled `title`.
pub fn page(title: &str, nav: Nav, viewer: Option<&Viewer>, body: Markup) -> Html<String> {
    page_with(title, nav, viewer, None, body)
}

/// A whole page that reloads itself every `refresh` seconds (live progress without JavaScript).
pub fn page_with(
    title: &str,
    nav: Nav,
    viewer: Option<&Viewer>,
    refresh: Option<u32>,
    body: Markup,
) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · Grantline" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Grantline" }
                    @if nav != Nav::None {
                        nav aria-label="Sections" {
                            ul {
                                @for (section, href, name) in SECTIONS {
                                    li {
                                        @if section == nav {
                                            a href=(href) aria-current="page" { (name) }
                                        } @else {
                                            a href=(href) { (name) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if let Some(viewer) = viewer.filter(|v| v.signed_in) {
                        form.signout method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(markup.into_string())
}

/// A hidden CSRF field for a form of `viewer`'s.
pub fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(viewer.csrf); }
}

/// A moment as pages show it: `2026-12-03 09:14:05 UTC`.
pub fn moment(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How far `at` is from now, in words: `in 42 min`, `3 h ago`.
pub fn relative(at: chrono::DateTime<chrono::Utc>) -> String {
    let seconds = (at - chrono::Utc::now()).num_seconds();
    let (amount, future) = (seconds.unsigned_abs(), seconds >= 0);
    if amount < 5 {
        return "just now".to_owned();
    }
    let text = match amount {
        0..60 => format!("{amount} s"),
        60..7200 => format!("{} min", amount / 60),
        7200..172_800 => format!("{} h", amount / 3600),
        _ => format!("{} days", amount / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}
