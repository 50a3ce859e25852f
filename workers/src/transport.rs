//! How a failed HTTP exchange is told in errors and logs: the transport error with its chain of
//! causes, without the request's URL (a URL may carry credentials in its userinfo or query). A
//! transport error never holds the request body, where secrets travel.

/// `e` and each of its causes, joined by `: `, without the URL.
pub(crate) fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
