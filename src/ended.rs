//! An answer body that says once how it ended: read whole, or broken off by an error.
//! Dropped unread, it says nothing, but what its callback owns is dropped with it.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

pin_project_lite::pin_project! {
    /// `body`, calling `on_end` with `None` at its end or with the error that broke it off.
    pub struct OnEnd<F> {
        #[pin]
        body: Body,
        on_end: Option<F>,
    }
}

impl<F: FnOnce(Option<&axum::Error>)> OnEnd<F> {
    pub fn new(body: Body, on_end: F) -> Self {
        Self {
            body,
            on_end: Some(on_end),
        }
    }
}

impl<F: FnOnce(Option<&axum::Error>)> hyper::body::Body for OnEnd<F> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => Some(None),
            Poll::Ready(Some(Err(e))) => Some(Some(e)),
            _ => None,
        };
        if let Some(error) = ended
            && let Some(on_end) = this.on_end.take()
        {
            on_end(error);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
