//! What a caller gets back: a stream of [`Event`]s ending in exactly one [`Event::Done`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use sana_backend::Image;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Sleep;

use crate::error::EngineError;

/// Where the time of a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// From admission to the start of its batch on a worker.
    pub queue: Duration,
    /// The batch's time in the backend.
    pub inference: Duration,
    /// From admission to the answer.
    pub total: Duration,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `n` images in order, image `i` drawn from `seeds[i]`.
    pub images: Vec<Image>,
    /// The seed of each image (`seed + i`; useful when the seed was drawn at random).
    pub seeds: Vec<u64>,
    /// Images in the batch this request ran in (its own and its batch mates').
    pub batch_images: usize,
    /// Where the time went.
    pub timings: Timings,
}

/// One event of a request, in order: progress and previews while it runs, then one `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A denoising step finished.
    Progress {
        /// Steps done, `1..=steps`.
        step: u32,
        /// Total steps.
        steps: u32,
    },
    /// A preview of one of the request's images (only when previews were asked for).
    Preview {
        /// Which image of the request, `0..n`.
        image_index: u32,
        /// The step after which it was taken.
        step: u32,
        /// The preview.
        image: Image,
    },
    /// The answer; always the last event.
    Done(Result<Generation, EngineError>),
}

/// The caller's end of a request. Poll it as a [`Stream`] of [`Event`]s (for server-sent events)
/// or await [`GenerationStream::result`].
///
/// Dropping it cancels the request: a queued request is dropped before batching, and a running
/// batch stops between steps once all of its requests are gone. The per-request timeout is
/// enforced here too: when it passes, the stream yields `Done(Err(Timeout))` and lets go of the
/// request, which cancels it in the engine the same way.
#[derive(Debug)]
pub struct GenerationStream {
    rx: Option<UnboundedReceiver<Event>>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl GenerationStream {
    pub(crate) fn new(rx: UnboundedReceiver<Event>, timeout: Duration) -> Self {
        Self {
            rx: Some(rx),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }

    /// The next event; `None` after `Done`.
    pub async fn next_event(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Waits for the answer, skipping progress and previews.
    pub async fn result(mut self) -> Result<Generation, EngineError> {
        while let Some(event) = self.next_event().await {
            if let Event::Done(result) = event {
                return result;
            }
        }
        Err(EngineError::Backend(
            "the request stream was polled after its answer; this is a bug".into(),
        ))
    }
}

impl Stream for GenerationStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = &mut *self;
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                if matches!(event, Event::Done(_)) {
                    this.rx = None;
                }
                return Poll::Ready(Some(event));
            }
            Poll::Ready(None) => {
                // The engine answers every request before dropping it (see `Responder`).
                this.rx = None;
                return Poll::Ready(Some(Event::Done(Err(EngineError::Backend(
                    "the engine dropped the request without an answer; this is a bug".into(),
                )))));
            }
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            // Dropping the receiver is what tells the engine to stop working on it.
            this.rx = None;
            return Poll::Ready(Some(Event::Done(Err(EngineError::Timeout(this.timeout)))));
        }
        Poll::Pending
    }
}
