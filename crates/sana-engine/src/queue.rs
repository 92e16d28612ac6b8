//! The batching queue: a pure [`State`] and the actor task that owns it.
//!
//! `State::next_batch` serves the head of the queue and gathers the entries behind it that share
//! its [`BatchKey`], first fit in queue order, under an image budget and a latent-token budget.
//! Entries with another key keep their place and order. Since the head always goes, nothing
//! starves; this is the one deliberate change from text-embeddings-inference's strict FIFO.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sana_backend::{BatchItem, BatchKey};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info_span, Span};

use crate::config::BatchLimits;
use crate::error::EngineError;
use crate::metrics;
use crate::stream::{Event, Generation};

/// The engine's end of a request's event channel; answers exactly once.
#[derive(Debug)]
pub(crate) struct Responder {
    tx: UnboundedSender<Event>,
    answered: bool,
}

impl Responder {
    pub(crate) fn new(tx: UnboundedSender<Event>) -> Self {
        Self {
            tx,
            answered: false,
        }
    }

    /// The client dropped its stream (or it timed out).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Marks the request as answered by other means (the caller got an error directly).
    pub(crate) fn disarm(&mut self) {
        self.answered = true;
    }

    /// Sends a progress or preview event; lost silently when the client is gone.
    pub(crate) fn send(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // Every path answers explicitly but one: a prefetched batch still in the channel when
        // the last worker died, which then drops it.
        if !self.answered && !self.tx.is_closed() {
            metrics::failure(EngineError::Unhealthy.error_type());
            let _ = self.tx.send(Event::Done(Err(EngineError::Unhealthy)));
        }
    }
}

/// A request in the queue or in a running batch.
#[derive(Debug)]
pub(crate) struct Entry {
    /// What a batch mate must share.
    pub key: BatchKey,
    /// This request's part of the batch.
    pub item: BatchItem,
    pub responder: Responder,
    /// Admission time.
    pub admitted: Instant,
    /// When the request times out.
    pub deadline: Instant,
    /// The request's span, created in `submit` under the caller's span.
    pub span: Span,
    /// Open while the entry waits in the queue.
    pub queue_span: Span,
    /// The admission slot, given back just before the answer is sent.
    pub permit: Option<OwnedSemaphorePermit>,
}

impl Entry {
    /// The timeout this request was given.
    pub fn timeout(&self) -> Duration {
        self.deadline.saturating_duration_since(self.admitted)
    }

    /// Whether the request is still wanted at `now`. When it is not, it has been accounted for:
    /// a client that went away counts as `cancelled` (or `timeout` past its deadline, since the
    /// stream gives up then), and a client still listening past its deadline is answered
    /// `Timeout`.
    pub fn check_alive(&mut self, now: Instant) -> bool {
        if self.responder.answered {
            return false;
        }
        let expired = now >= self.deadline;
        if self.responder.is_closed() {
            self.responder.answered = true;
            self.permit = None;
            metrics::failure(if expired {
                "timeout"
            } else {
                EngineError::Cancelled.error_type()
            });
            return false;
        }
        if expired {
            self.finish(Err(EngineError::Timeout(self.timeout())));
            return false;
        }
        true
    }

    /// Sends the answer (once) and records it.
    pub fn finish(&mut self, result: Result<Generation, EngineError>) {
        if self.responder.answered {
            return;
        }
        self.responder.answered = true;
        // Free the admission slot first, so a client that reacts to the answer at once is not
        // refused because of its own finished request.
        self.permit = None;
        if self.responder.is_closed() {
            let expired = Instant::now() >= self.deadline;
            metrics::failure(if expired { "timeout" } else { "cancelled" });
            return;
        }
        match &result {
            Ok(generation) => {
                ::metrics::counter!(metrics::REQUEST_SUCCESS).increment(1);
                let t = generation.timings;
                ::metrics::histogram!(metrics::REQUEST_QUEUE_DURATION)
                    .record(t.queue.as_secs_f64());
                ::metrics::histogram!(metrics::REQUEST_INFERENCE_DURATION)
                    .record(t.inference.as_secs_f64());
                ::metrics::histogram!(metrics::REQUEST_DURATION).record(t.total.as_secs_f64());
            }
            Err(err) => metrics::failure(err.error_type()),
        }
        self.responder.send(Event::Done(result));
    }
}

/// A batch taken from the queue, on its way to a worker.
#[derive(Debug)]
pub(crate) struct NextBatch {
    /// What every entry shares.
    pub key: BatchKey,
    /// The requests, in queue order; never empty.
    pub entries: Vec<Entry>,
    /// Span of the batch, linked to each request's span.
    pub span: Span,
}

#[cfg(test)]
impl NextBatch {
    /// Images of the whole batch.
    pub fn num_images(&self) -> usize {
        self.entries.iter().map(|e| e.item.n as usize).sum()
    }
}

/// The queue's contents; plain data, tested without channels.
#[derive(Debug, Default)]
pub(crate) struct State {
    entries: VecDeque<Entry>,
}

impl State {
    /// Adds a request at the back.
    pub fn append(&mut self, mut entry: Entry) {
        entry.queue_span = info_span!(parent: &entry.span, "queue");
        self.entries.push_back(entry);
    }

    /// Requests waiting, including ones whose client may have gone since.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes the next batch: the first live entry, then every live entry behind it with the same
    /// key that still fits both budgets (first fit, queue order). Entries whose client is gone or
    /// whose deadline passed are removed on the way. A head above the budgets goes alone.
    pub fn next_batch(&mut self, limits: &BatchLimits, now: Instant) -> Option<NextBatch> {
        let head = loop {
            let mut entry = self.entries.pop_front()?;
            if entry.check_alive(now) {
                break entry;
            }
        };
        let key = head.key;
        let per_image = key.latent_tokens_per_image();
        let mut images = head.item.n as usize;
        let mut entries = vec![head];
        let mut i = 0;
        while i < self.entries.len() && images < limits.max_images {
            let candidate = &mut self.entries[i];
            if !candidate.check_alive(now) {
                self.entries.remove(i);
                continue;
            }
            let n = candidate.item.n as usize;
            let fits = images + n <= limits.max_images
                && (images + n) * per_image <= limits.max_latent_tokens;
            if candidate.key == key && fits {
                entries.push(
                    self.entries
                        .remove(i)
                        .expect("index is in bounds; this is a bug"),
                );
                images += n;
            } else {
                i += 1;
            }
        }

        let span = info_span!(
            parent: None,
            "batch",
            requests = entries.len(),
            images,
            latent_tokens = images * per_image,
            width = key.width,
            height = key.height,
            steps = key.steps,
            cfg = key.cfg,
        );
        for entry in &mut entries {
            span.follows_from(&entry.span);
            entry.queue_span = Span::none();
        }
        ::metrics::histogram!(metrics::BATCH_SIZE).record(images as f64);
        ::metrics::histogram!(metrics::BATCH_LATENT_TOKENS).record((images * per_image) as f64);
        ::metrics::gauge!(metrics::QUEUE_SIZE).set(self.entries.len() as f64);
        Some(NextBatch { key, entries, span })
    }

    /// Answers every waiting request with `err` and empties the queue.
    pub fn fail_all(&mut self, err: &EngineError) {
        for mut entry in self.entries.drain(..) {
            entry.finish(Err(err.clone()));
        }
        ::metrics::gauge!(metrics::QUEUE_SIZE).set(0.0);
    }
}

/// Commands to the queue actor.
#[derive(Debug)]
pub(crate) enum Command {
    /// A new request.
    Append(Box<Entry>),
    /// Fail every waiting request with `ShuttingDown` (shutdown past its grace period).
    CancelAll,
    /// Fail every waiting request and stop; the workers stop once the batch channel is gone.
    Stop,
}

/// Starts the queue actor. It forms a batch only when the capacity-1 batch channel has room, so
/// exactly one batch is prefetched while the workers are busy, and batches grow from the
/// requests that pile up meanwhile (no timers).
pub(crate) fn spawn(
    limits: BatchLimits,
    batches: mpsc::Sender<NextBatch>,
    waiting: Arc<AtomicUsize>,
) -> UnboundedSender<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(rx, batches, limits, waiting));
    tx
}

async fn run(
    mut commands: UnboundedReceiver<Command>,
    batches: mpsc::Sender<NextBatch>,
    limits: BatchLimits,
    waiting: Arc<AtomicUsize>,
) {
    let mut state = State::default();
    loop {
        tokio::select! {
            // Take in every pending request before forming a batch, so the batch is as full as
            // it can be. Cannot starve the other branch: admission bounds the requests.
            biased;
            command = commands.recv() => match command {
                Some(Command::Append(entry)) => state.append(*entry),
                Some(Command::CancelAll) => state.fail_all(&EngineError::ShuttingDown),
                Some(Command::Stop) | None => {
                    state.fail_all(&EngineError::ShuttingDown);
                    break;
                }
            },
            slot = batches.reserve(), if !state.is_empty() => match slot {
                Ok(slot) => {
                    if let Some(batch) = state.next_batch(&limits, Instant::now()) {
                        slot.send(batch);
                    }
                }
                // Every worker is gone (their backends failed to rebuild).
                Err(_) => state.fail_all(&EngineError::Unhealthy),
            },
        }
        waiting.store(state.len(), Ordering::Release);
        ::metrics::gauge!(metrics::QUEUE_SIZE).set(state.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use sana_backend::Sampler;
    use tokio::sync::Semaphore;

    const LIMITS: BatchLimits = BatchLimits {
        max_images: 8,
        max_latent_tokens: 8 * 256,
    };

    fn key(width: u32) -> BatchKey {
        BatchKey {
            width,
            height: 512,
            steps: 20,
            sampler: Sampler::DpmSolverMultistep,
            cfg: false,
            strength_permille: None,
            pag_layers: None,
            controlnet: None,
        }
    }

    /// An entry and the receiver that keeps it alive (drop the receiver to "disconnect").
    fn entry(key: BatchKey, n: u32, seed: u64) -> (Entry, UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("fresh semaphore");
        let now = Instant::now();
        let entry = Entry {
            key,
            item: BatchItem {
                prompt: format!("prompt {seed}"),
                negative_prompt: None,
                n,
                seed,
                guidance_scale: 1.0,
                previews: 0,
                edit: None,
                ..Default::default()
            },
            responder: Responder::new(tx),
            admitted: now,
            deadline: now + Duration::from_secs(3600),
            span: Span::none(),
            queue_span: Span::none(),
            permit: Some(permit),
        };
        (entry, rx)
    }

    /// Builds a state from `(key, n, seed)` and returns the receivers to keep alive.
    fn state_of(specs: &[(BatchKey, u32, u64)]) -> (State, Vec<UnboundedReceiver<Event>>) {
        let mut state = State::default();
        let mut receivers = Vec::new();
        for &(key, n, seed) in specs {
            let (entry, rx) = entry(key, n, seed);
            state.append(entry);
            receivers.push(rx);
        }
        (state, receivers)
    }

    fn seeds(batch: &NextBatch) -> Vec<u64> {
        batch.entries.iter().map(|e| e.item.seed).collect()
    }

    fn remaining(state: &State) -> Vec<u64> {
        state.entries.iter().map(|e| e.item.seed).collect()
    }

    #[test]
    fn empty_queue_gives_no_batch() {
        let mut state = State::default();
        assert!(state.next_batch(&LIMITS, Instant::now()).is_none());
    }

    #[test]
    fn entries_with_the_head_key_are_grouped() {
        let (mut state, _rx) = state_of(&[(key(512), 1, 0), (key(512), 1, 1), (key(512), 2, 2)]);
        let batch = state.next_batch(&LIMITS, Instant::now()).expect("a batch");
        assert_eq!(seeds(&batch), vec![0, 1, 2]);
        assert_eq!(batch.key, key(512));
        assert_eq!(batch.num_images(), 4);
        assert!(state.is_empty());
    }

    #[test]
    fn other_keys_stay_in_order() {
        let (mut state, _rx) = state_of(&[
            (key(512), 1, 0),
            (key(1024), 1, 1),
            (key(512), 1, 2),
            (key(768), 1, 3),
            (key(1024), 1, 4),
            (key(512), 1, 5),
        ]);
        let now = Instant::now();
        let first = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(seeds(&first), vec![0, 2, 5]);
        assert_eq!(remaining(&state), vec![1, 3, 4]);
        let second = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(second.key, key(1024));
        assert_eq!(seeds(&second), vec![1, 4]);
        let third = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(seeds(&third), vec![3]);
        assert!(state.next_batch(&LIMITS, now).is_none());
    }

    #[test]
    fn image_budget_is_respected_and_n_never_split() {
        // 3 + 3 fit in 8; the next 3 would make 9, so it waits, but the 2 behind it fits.
        let (mut state, _rx) = state_of(&[
            (key(512), 3, 0),
            (key(512), 3, 1),
            (key(512), 3, 2),
            (key(512), 2, 3),
            (key(512), 1, 4),
        ]);
        let now = Instant::now();
        let first = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(seeds(&first), vec![0, 1, 3]);
        assert_eq!(first.num_images(), 8);
        assert_eq!(remaining(&state), vec![2, 4]);
        let second = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(seeds(&second), vec![2, 4]);
        for batch in [&first, &second] {
            for entry in &batch.entries {
                assert!(
                    [1, 2, 3].contains(&entry.item.n),
                    "n changed: {}",
                    entry.item.n
                );
            }
        }
    }

    #[test]
    fn latent_token_budget_is_respected_and_cfg_doubles_it() {
        // 512x512 is 256 tokens per image, 512 with CFG. Budget 1024 tokens, 8 images.
        let limits = BatchLimits {
            max_images: 8,
            max_latent_tokens: 1024,
        };
        let cfg = BatchKey {
            cfg: true,
            ..key(512)
        };
        let (mut state, _rx) = state_of(&[(cfg, 1, 0), (cfg, 1, 1), (cfg, 1, 2)]);
        let now = Instant::now();
        let first = state.next_batch(&limits, now).expect("a batch");
        assert_eq!(seeds(&first), vec![0, 1], "two CFG images fill 1024 tokens");
        assert_eq!(remaining(&state), vec![2]);

        let (mut state, _rx) = state_of(&[(key(512), 1, 0), (key(512), 1, 1), (key(512), 1, 2)]);
        let first = state.next_batch(&limits, now).expect("a batch");
        assert_eq!(seeds(&first), vec![0, 1, 2], "without CFG, three fit");
    }

    #[test]
    fn the_head_is_served_even_above_the_budgets() {
        let limits = BatchLimits {
            max_images: 2,
            max_latent_tokens: 256,
        };
        let (mut state, _rx) = state_of(&[(key(512), 4, 0), (key(512), 1, 1)]);
        let now = Instant::now();
        let first = state.next_batch(&limits, now).expect("a batch");
        assert_eq!(seeds(&first), vec![0]);
        assert_eq!(first.num_images(), 4, "the head is never split");
        let second = state.next_batch(&limits, now).expect("a batch");
        assert_eq!(seeds(&second), vec![1]);
    }

    #[test]
    fn no_entry_starves_behind_a_stream_of_compatible_ones() {
        // A big request behind small ones of its key: every batch is full of small ones, but the
        // big one becomes the head after the ones ahead of it are served, and goes.
        let limits = BatchLimits {
            max_images: 4,
            max_latent_tokens: usize::MAX,
        };
        let (mut state, mut receivers) = state_of(&[
            (key(512), 1, 0),
            (key(512), 1, 1),
            (key(512), 4, 99),
            (key(512), 1, 2),
        ]);
        let now = Instant::now();
        let mut served = Vec::new();
        for round in 0..10 {
            // New small requests keep arriving.
            let (entry, rx) = entry(key(512), 1, 100 + round);
            state.append(entry);
            receivers.push(rx);
            let batch = state.next_batch(&limits, now).expect("a batch");
            served.extend(seeds(&batch));
            if served.contains(&99) {
                break;
            }
        }
        assert!(served.contains(&99), "the n=4 request starved: {served:?}");
    }

    #[test]
    fn dropped_receivers_are_skipped_and_counted_as_answered() {
        let (mut state, mut receivers) = state_of(&[
            (key(512), 1, 0),
            (key(512), 1, 1),
            (key(1024), 1, 2),
            (key(512), 1, 3),
        ]);
        // Clients 0 (the head) and 2 go away.
        drop(receivers.remove(2));
        drop(receivers.remove(0));
        let now = Instant::now();
        let first = state.next_batch(&LIMITS, now).expect("a batch");
        assert_eq!(seeds(&first), vec![1, 3]);
        assert!(state.next_batch(&LIMITS, now).is_none(), "2 was dropped");
        assert!(state.is_empty());
    }

    #[test]
    fn only_dropped_entries_give_no_batch() {
        let (mut state, receivers) = state_of(&[(key(512), 1, 0), (key(512), 1, 1)]);
        drop(receivers);
        assert!(state.next_batch(&LIMITS, Instant::now()).is_none());
        assert!(state.is_empty());
    }

    #[test]
    fn expired_entries_are_answered_with_timeout() {
        let (mut state, mut receivers) = state_of(&[(key(512), 1, 0), (key(512), 1, 1)]);
        let later = Instant::now() + Duration::from_secs(3601);
        assert!(state.next_batch(&LIMITS, later).is_none());
        for rx in &mut receivers {
            match rx.try_recv() {
                Ok(Event::Done(Err(EngineError::Timeout(t)))) => {
                    assert_eq!(t, Duration::from_secs(3600))
                }
                other => panic!("expected a timeout answer, got {other:?}"),
            }
        }
    }

    #[test]
    fn fail_all_answers_everyone_once() {
        let (mut state, mut receivers) = state_of(&[(key(512), 1, 0), (key(1024), 1, 1)]);
        state.fail_all(&EngineError::ShuttingDown);
        assert!(state.is_empty());
        for rx in &mut receivers {
            assert_eq!(
                rx.try_recv().ok(),
                Some(Event::Done(Err(EngineError::ShuttingDown)))
            );
            assert!(rx.try_recv().is_err(), "answered more than once");
        }
    }

    #[test]
    fn an_entry_dropped_unanswered_still_gets_an_answer() {
        let (entry, mut rx) = entry(key(512), 1, 0);
        drop(entry);
        assert_eq!(
            rx.try_recv().ok(),
            Some(Event::Done(Err(EngineError::Unhealthy)))
        );
    }
}
