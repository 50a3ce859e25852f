//! The HTTP request a log line was written for, carried beside the code that handles it.
//!
//! Every line logged while a request is handled names the request (`request_id`, `method`,
//! `route`). A `tracing` span per request would say so too, but opening, entering and closing
//! one costs about a sixth of a cached read's whole CPU time, and almost no request ever logs a
//! line. So the request travels as a task-local value instead: set while the request's future is
//! polled ([`within`]), read only when a line is written (the service's log formatter lists it as
//! the outermost span, `http.request`), and carried into tasks spawned on the request's behalf
//! ([`carried`]), so that a refresh a request started logs under that request.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static REQUEST: Arc<RequestLog>;
}

/// What a log line says of the request it was written for.
#[derive(Debug)]
pub struct RequestLog {
    /// The request id echoed in `x-request-id`.
    pub request_id: Box<str>,
    pub method: Cow<'static, str>,
    /// The route template (`/connection/{connection_id}`), never the raw path or query.
    pub route: Arc<str>,
}

/// The request being handled by the current task, if any.
pub fn current() -> Option<Arc<RequestLog>> {
    REQUEST.try_with(Arc::clone).ok()
}

/// Runs `f` as part of `request`: lines it logs name the request.
pub fn within<R>(request: &Arc<RequestLog>, f: impl FnOnce() -> R) -> R {
    REQUEST.sync_scope(request.clone(), f)
}

/// `future` as part of the current task's request (if any), for spawning: what it logs names
/// the request that started it, wherever it runs.
pub fn carried<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let request = current();
    async move {
        match request {
            Some(request) => REQUEST.scope(request, future).await,
            None => future.await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(id: &str) -> Arc<RequestLog> {
        Arc::new(RequestLog {
            request_id: id.into(),
            method: Cow::Borrowed("GET"),
            route: Arc::from("/r"),
        })
    }

    #[tokio::test]
    async fn a_request_is_current_within_it_nests_and_is_carried_into_spawned_tasks() {
        assert!(current().is_none());
        let outer = request("outer");
        let (inner_id, spawned) = within(&outer, || {
            let inner_id = within(&request("inner"), || current().unwrap().request_id.clone());
            // Spawned inside the request: the task names it although it runs elsewhere.
            let spawned = tokio::spawn(carried(async { current().map(|r| r.request_id.clone()) }));
            assert_eq!(&*current().unwrap().request_id, "outer");
            (inner_id, spawned)
        });
        assert_eq!(&*inner_id, "inner");
        assert_eq!(spawned.await.unwrap().as_deref(), Some("outer"));
        assert!(current().is_none());
        let untouched = tokio::spawn(carried(async { current().is_none() }));
        assert!(untouched.await.unwrap());
    }
}
