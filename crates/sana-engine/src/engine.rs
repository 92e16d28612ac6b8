//! The engine handle: admission, submission, health and shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sana_backend::{Backend, BackendError, ModelInfo};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, info_span, warn, Span};

use crate::config::{BatchLimits, EngineConfig};
use crate::error::{EngineError, StartError};
use crate::metrics;
use crate::queue::{self, Command, Entry, Responder};
use crate::stream::GenerationStream;
use crate::validation::{validate, GenerateRequest, ValidRequest};
use crate::watchdog::Watchdog;
use crate::worker::{BackendFactory, Board, Worker, WorkerHealth};

/// The health of the engine as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// One entry per worker, in device order.
    pub workers: Vec<WorkerHealth>,
    /// Shutdown has begun.
    pub shutting_down: bool,
}

impl Health {
    /// Whether the engine takes requests: not shutting down, and at least one worker ready or
    /// busy.
    pub fn is_ready(&self) -> bool {
        !self.shutting_down
            && self.workers.iter().any(|w| {
                matches!(
                    w.state,
                    crate::WorkerState::Ready | crate::WorkerState::Busy
                )
            })
    }
}

/// What [`Engine::shutdown`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every in-flight request finished within the grace period.
    pub drained: bool,
    /// Requests still in flight when the grace period ended (then cancelled).
    pub cancelled: usize,
    /// Every worker thread ended.
    pub workers_stopped: bool,
}

/// The serving engine. A cheap `Clone` handle; see the crate docs.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    info: ModelInfo,
    config: EngineConfig,
    limits: BatchLimits,
    permits: Arc<Semaphore>,
    queue: mpsc::UnboundedSender<Command>,
    board: Arc<Board>,
    cancel: Arc<AtomicBool>,
    shutting_down: AtomicBool,
    /// Worker threads (the watchdog swaps a stuck one for its replacement).
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Dropped with the engine, which stops the watchdog.
    _alive: Arc<()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.inner.info.model_id)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts one worker per device, each building its backend with `factory` and warming it up
    /// at the largest batch, then the queue. Returns once every worker is ready. Must be called
    /// within a tokio runtime.
    pub async fn start<F>(config: EngineConfig, factory: F) -> Result<Self, StartError>
    where
        F: Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static,
    {
        metrics::describe();
        if config.devices.is_empty() {
            return Err(StartError::InvalidConfig(
                "no device given; pass at least one, e.g. `--devices cuda:0`".into(),
            ));
        }
        if config.max_concurrent_requests > u32::MAX as usize {
            return Err(StartError::InvalidConfig(format!(
                "--max-concurrent-requests is {}, above the limit of {}",
                config.max_concurrent_requests,
                u32::MAX
            )));
        }
        let factory: BackendFactory = Arc::new(factory);
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let batches = Arc::new(Mutex::new(batch_rx));
        let board = Arc::new(Board::new(&config.devices));
        let cancel = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut readies = Vec::new();
        for (index, device) in config.devices.iter().enumerate() {
            let (ready_tx, ready_rx) = oneshot::channel();
            let worker = Worker {
                index,
                device: device.clone(),
                factory: Arc::clone(&factory),
                config: config.clone(),
                batches: Arc::clone(&batches),
                board: Arc::clone(&board),
                cancel: Arc::clone(&cancel),
                epoch: 0,
            };
            let thread = worker.spawn(ready_tx).map_err(|err| StartError::Worker {
                device: device.clone(),
                source: BackendError::Internal(format!("cannot spawn the worker thread: {err}")),
            })?;
            threads.push(thread);
            readies.push((device.clone(), ready_rx));
        }
        let threads = Arc::new(Mutex::new(threads));
        let alive = Arc::new(());
        if let Some(timeout) = config.watchdog_timeout {
            Watchdog {
                timeout,
                board: Arc::clone(&board),
                factory: Arc::clone(&factory),
                config: config.clone(),
                batches: Arc::downgrade(&batches),
                cancel: Arc::clone(&cancel),
                threads: Arc::clone(&threads),
                engine_alive: Arc::downgrade(&alive),
            }
            .spawn()
            .map_err(|err| {
                StartError::InvalidConfig(format!("cannot spawn the watchdog thread: {err}"))
            })?;
        }
        // Workers hold the only receivers now: when they all leave, the queue sees it.
        drop(batches);

        let mut info = None;
        for (device, ready) in readies {
            let reported = ready.await.unwrap_or_else(|_| {
                Err(StartError::Worker {
                    device: device.clone(),
                    source: BackendError::Internal("the worker thread died".into()),
                })
            })?;
            info!(%device, model = %reported.model_id, dtype = %reported.dtype, "worker ready");
            info.get_or_insert(reported);
        }
        let info = info.expect("at least one device; checked above");
        let limits = BatchLimits::new(&config, &info)?;
        let queue = queue::spawn(limits, batch_tx, Arc::clone(&board.waiting));
        Ok(Self {
            inner: Arc::new(Inner {
                info,
                permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                config,
                limits,
                queue,
                board,
                cancel,
                shutting_down: AtomicBool::new(false),
                threads,
                _alive: alive,
            }),
        })
    }

    /// What the model is and accepts (from the first worker).
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The budget of one batch.
    pub fn limits(&self) -> BatchLimits {
        self.inner.limits
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inner.config.max_concurrent_requests - self.inner.permits.available_permits()
    }

    /// Requests waiting in the queue for a batch to be formed from them (not counting a batch
    /// already formed for the next free worker, nor running ones).
    pub fn waiting(&self) -> usize {
        self.inner.board.waiting.load(Ordering::Acquire)
    }

    /// The state of every worker.
    pub fn health(&self) -> Health {
        Health {
            workers: self.inner.board.snapshot(),
            shutting_down: self.inner.shutting_down.load(Ordering::Acquire),
        }
    }

    /// Checks a request and fills in defaults without submitting it.
    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest, EngineError> {
        validate(
            request,
            &self.inner.info,
            &self.inner.config,
            &self.inner.limits,
        )
        .map_err(EngineError::from)
    }

    /// Admits a request and queues it; returns at once. Fails with `Validation`, `Overloaded`
    /// (too many in flight), `Unhealthy` or `ShuttingDown`. Must be called within a tokio
    /// runtime (the stream's timeout uses its timer).
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream, EngineError> {
        let result = self.try_submit(request);
        if let Err(err) = &result {
            metrics::failure(err.error_type());
        }
        result
    }

    fn try_submit(&self, request: GenerateRequest) -> Result<GenerationStream, EngineError> {
        let inner = &*self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        if !inner.board.any_serving() {
            return Err(EngineError::Unhealthy);
        }
        let ValidRequest { key, item } = self.validate(request)?;
        let permit = Arc::clone(&inner.permits)
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded {
                max_concurrent_requests: inner.config.max_concurrent_requests,
            })?;
        ::metrics::counter!(metrics::REQUEST_COUNT).increment(1);
        let span = info_span!(
            "generate",
            n = item.n,
            width = key.width,
            height = key.height,
            steps = key.steps,
            seed = item.seed,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let admitted = Instant::now();
        let timeout = inner.config.request_timeout;
        let entry = Entry {
            key,
            item,
            responder: Responder::new(tx),
            admitted,
            // A timeout too large for the clock means none.
            deadline: admitted
                .checked_add(timeout)
                .unwrap_or_else(|| admitted + Duration::from_secs(100 * 365 * 86_400)),
            span,
            queue_span: Span::none(),
            permit: Some(permit),
        };
        inner.queue.send(Command::Append(Box::new(entry))).map_err(
            |mpsc::error::SendError(command)| {
                // The queue has stopped; the caller gets the error here, not through the entry.
                if let Command::Append(mut entry) = command {
                    entry.responder.disarm();
                }
                EngineError::ShuttingDown
            },
        )?;
        Ok(GenerationStream::new(rx, timeout))
    }

    /// Generates and waits for the answer: `submit` then `result`.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<crate::Generation, EngineError> {
        self.submit(request)?.result().await
    }

    /// Stops admitting, lets in-flight requests finish for up to `grace`, then cancels the rest
    /// (queued ones are answered `ShuttingDown`, running batches stop at their next step) and
    /// waits up to `grace` again for that, and finally stops the workers, waiting up to `grace`
    /// for their threads.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let inner = &*self.inner;
        inner.shutting_down.store(true, Ordering::Release);
        let all = u32::try_from(inner.config.max_concurrent_requests).unwrap_or(u32::MAX);
        info!(in_flight = self.in_flight(), "shutting down");
        let drained = tokio::time::timeout(grace, inner.permits.acquire_many(all))
            .await
            .is_ok();
        let mut cancelled = 0;
        if !drained {
            cancelled = self.in_flight();
            warn!(
                cancelled,
                "grace period over; cancelling in-flight requests"
            );
            inner.cancel.store(true, Ordering::Release);
            let _ = inner.queue.send(Command::CancelAll);
            if tokio::time::timeout(grace, inner.permits.acquire_many(all))
                .await
                .is_err()
            {
                warn!(
                    in_flight = self.in_flight(),
                    "requests still running after cancellation"
                );
            }
        }
        let _ = inner.queue.send(Command::Stop);
        let threads: Vec<_> =
            std::mem::take(&mut *inner.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let join = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let workers_stopped = matches!(tokio::time::timeout(grace, join).await, Ok(Ok(())));
        info!(drained, cancelled, workers_stopped, "shut down");
        ShutdownReport {
            drained,
            cancelled,
            workers_stopped,
        }
    }
}
