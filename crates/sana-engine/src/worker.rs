//! Device workers: one OS thread per device, each owning its backend.
//!
//! Free workers wait on the shared capacity-1 batch channel, so a batch goes to the first free
//! worker. A backend error fails only its batch. A panic is caught, the batch fails, and the
//! backend is rebuilt by the factory (and warmed up again); if that fails the worker is marked
//! unhealthy and leaves, and the others keep serving. A backend error followed by a failed
//! `health()` check (a lost device context, say) is handled like a panic.
//!
//! A worker shows a sign of life at the start of a batch and after every step (its heartbeat),
//! and keeps the requests of its running batch in its [`Slot`], not on its stack: the watchdog
//! (`watchdog.rs`) can then answer them and replace a worker that hangs. A thread that comes back
//! from a batch the watchdog took leaves at once, touching nothing (its slot has a new epoch).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sana_backend::{
    cfg_enabled, Backend, BackendError, Batch, BatchItem, BatchKey, Control, ModelInfo, Progress,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::{BatchLimits, EngineConfig};
use crate::error::{EngineError, StartError};
use crate::metrics;
use crate::queue::{Entry, NextBatch};
use crate::stream::{Event, Generation, Timings};

/// Builds a backend for a device (`cuda:0`, `cpu`, …). Called at start and again after a panic.
pub(crate) type BackendFactory =
    Arc<dyn Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static>;

/// The state of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WorkerState {
    /// Building and warming up its backend.
    Starting = 0,
    /// Waiting for a batch.
    Ready = 1,
    /// Running a batch.
    Busy = 2,
    /// Rebuilding its backend after a panic, or being replaced after a hang.
    Restarting = 3,
    /// Its backend could not be built; it takes no work.
    Unhealthy = 4,
    /// Stopped by shutdown.
    Stopped = 5,
}

impl WorkerState {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => WorkerState::Starting,
            1 => WorkerState::Ready,
            2 => WorkerState::Busy,
            3 => WorkerState::Restarting,
            4 => WorkerState::Unhealthy,
            _ => WorkerState::Stopped,
        }
    }

    /// Whether a worker in this state serves or will serve batches.
    pub fn is_serving(self) -> bool {
        matches!(
            self,
            WorkerState::Starting
                | WorkerState::Ready
                | WorkerState::Busy
                | WorkerState::Restarting
        )
    }

    /// The stable name used in health reports.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Restarting => "restarting",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// What one worker looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHealth {
    /// Its device.
    pub device: String,
    /// What it is doing.
    pub state: WorkerState,
    /// How many times its backend was rebuilt after a panic or replaced after a hang.
    pub restarts: u32,
}

/// How long a worker's queue stays empty before its backend hears it is idle
/// ([`Backend::idle`]): long enough that back-to-back requests (a client sending its next one, a
/// burst arriving) never pay for the backend handing memory back, short enough that an idle
/// server soon holds only what it needs idle.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Shared view of every worker: lock-free state, plus each one's running batch for the watchdog.
#[derive(Debug)]
pub(crate) struct Board {
    pub(crate) slots: Vec<Slot>,
    /// Requests in the queue not yet formed into a batch (kept by the queue task).
    pub(crate) waiting: Arc<AtomicUsize>,
    /// The engine's runtime, for the workers' timed waits (`None` outside one: no grace before
    /// [`Backend::idle`]).
    pub(crate) runtime: Option<tokio::runtime::Handle>,
    /// The origin of heartbeats.
    started: Instant,
}

/// One device's worker, as the engine and the watchdog see it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) device: String,
    state: AtomicU8,
    restarts: AtomicU32,
    /// Bumped when the watchdog replaces the worker: only the thread of the current epoch may
    /// change the state.
    pub(crate) epoch: AtomicU32,
    /// Milliseconds from `Board::started` to the worker's last sign of life while busy.
    heartbeat: AtomicU64,
    /// The requests of the running batch; whoever takes them answers them.
    pub(crate) running: Mutex<Option<Vec<Entry>>>,
}

impl Slot {
    pub(crate) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub(crate) fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn running(&self) -> std::sync::MutexGuard<'_, Option<Vec<Entry>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Board {
    pub fn new(devices: &[String]) -> Self {
        Self {
            slots: devices
                .iter()
                .map(|device| Slot {
                    device: device.clone(),
                    state: AtomicU8::new(WorkerState::Starting as u8),
                    restarts: AtomicU32::new(0),
                    epoch: AtomicU32::new(0),
                    heartbeat: AtomicU64::new(0),
                    running: Mutex::new(None),
                })
                .collect(),
            waiting: Arc::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records a sign of life of worker `index`.
    fn beat(&self, index: usize) {
        self.slots[index]
            .heartbeat
            .store(self.now_ms(), Ordering::Release);
    }

    /// How long worker `index` has shown no sign of life.
    pub(crate) fn silent_for(&self, index: usize) -> Duration {
        let last = self.slots[index].heartbeat.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    pub fn snapshot(&self) -> Vec<WorkerHealth> {
        self.slots
            .iter()
            .map(|slot| WorkerHealth {
                device: slot.device.clone(),
                state: slot.state(),
                restarts: slot.restarts.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn any_serving(&self) -> bool {
        self.slots.iter().any(|slot| slot.state().is_serving())
    }
}

/// Where free workers take batches from.
pub(crate) type SharedBatches = Arc<Mutex<mpsc::Receiver<NextBatch>>>;

/// Everything a worker thread needs.
pub(crate) struct Worker {
    pub index: usize,
    pub device: String,
    pub factory: BackendFactory,
    pub config: EngineConfig,
    pub batches: SharedBatches,
    pub board: Arc<Board>,
    /// Set by shutdown past its grace period: running batches stop at the next step.
    pub cancel: Arc<AtomicBool>,
    /// The slot's epoch this worker belongs to (0 for the first; the watchdog's replacements
    /// count up).
    pub epoch: u32,
}

impl Worker {
    /// Starts the thread; `ready` gets the model info once the backend is built and warm.
    pub fn spawn(
        self,
        ready: oneshot::Sender<Result<ModelInfo, StartError>>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(thread_name(self.index, self.epoch))
            .spawn(move || self.run(ready))
    }

    /// Sets this worker's state, unless the watchdog has replaced it.
    fn set(&self, state: WorkerState) {
        let slot = &self.board.slots[self.index];
        if slot.epoch.load(Ordering::Acquire) == self.epoch {
            slot.set_state(state);
        }
    }

    fn run(self, ready: oneshot::Sender<Result<ModelInfo, StartError>>) {
        let mut backend = match self.build() {
            Ok((backend, info)) => {
                self.set(WorkerState::Ready);
                let _ = ready.send(Ok(info));
                backend
            }
            Err(err) => {
                if self.epoch > 0 {
                    error!(device = %self.device, %err, "the replacement of a hung worker could not build its backend; worker marked unhealthy");
                }
                self.set(WorkerState::Unhealthy);
                let _ = ready.send(Err(err));
                return;
            }
        };
        // Whether the backend was told it is idle since its last batch.
        let mut idle = false;
        loop {
            let next = {
                let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
                let waited = match (&self.board.runtime, idle) {
                    // The timer is made inside the runtime's context, not on this thread. A
                    // runtime shut down under the wait fails its timers by panicking: the
                    // engine is gone with it, so the worker leaves as if the queue had closed.
                    (Some(runtime), false) => catch_unwind(AssertUnwindSafe(|| {
                        runtime.block_on(async {
                            tokio::time::timeout(IDLE_AFTER, batches.recv()).await
                        })
                    }))
                    .map_or(Some(None), Result::ok),
                    (None, false) => None,
                    (_, true) => Some(batches.blocking_recv()),
                };
                match waited {
                    Some(next) => next,
                    None => {
                        // Nothing came for IDLE_AFTER (after the warm-up, after a batch): let
                        // the backend hand back memory it kept for the next batch, while
                        // another worker may take what comes. Contained like a batch: a panic
                        // here costs the trim, not the worker.
                        drop(batches);
                        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| backend.idle())) {
                            warn!(device = %self.device, panic = %panic_message(&*panic), "the backend panicked going idle");
                        }
                        idle = true;
                        continue;
                    }
                }
            };
            let Some(next) = next else { break };
            idle = false;
            self.board.beat(self.index);
            self.set(WorkerState::Busy);
            match run_batch(&mut backend, next, &self.board, self.index, &self.cancel) {
                After::Done => {}
                After::Abandoned => {
                    warn!(
                        device = %self.device,
                        "a batch came back after the watchdog had answered its requests and \
                         replaced this worker; its thread leaves"
                    );
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(backend)));
                    return;
                }
                After::Rebuild(reason) => {
                    ::metrics::counter!(metrics::WORKER_RESTART).increment(1);
                    warn!(device = %self.device, %reason, "rebuilding the backend");
                    // Dropping a backend that panicked may panic again; contain that too.
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(backend)));
                    match self.build() {
                        Ok((rebuilt, _)) => backend = rebuilt,
                        Err(err) => {
                            error!(device = %self.device, %err, "backend rebuild failed; worker marked unhealthy");
                            self.set(WorkerState::Unhealthy);
                            return;
                        }
                    }
                }
            }
            self.set(WorkerState::Ready);
        }
        self.set(WorkerState::Stopped);
    }

    /// Builds the backend, checks the configuration against it and warms it up.
    fn build(&self) -> Result<(Box<dyn Backend>, ModelInfo), StartError> {
        let worker_err = |source| StartError::Worker {
            device: self.device.clone(),
            source,
        };
        let mut backend = catch_unwind(AssertUnwindSafe(|| (self.factory)(&self.device)))
            .map_err(|panic| {
                BackendError::Internal(format!("building panicked: {}", panic_message(&*panic)))
            })
            .and_then(|built| built)
            .map_err(worker_err)?;
        let info = backend.info();
        let limits = BatchLimits::new(&self.config, &info)?;
        if self.config.warmup_steps > 0 {
            let batch = warmup_batch(&info, &limits, self.config.warmup_steps);
            let started = Instant::now();
            let images = catch_unwind(AssertUnwindSafe(|| {
                backend.generate(&batch, &mut |_| Control::Continue)
            }))
            .map_err(|panic| {
                BackendError::Internal(format!("warm-up panicked: {}", panic_message(&*panic)))
            })
            .and_then(|result| result)
            .map_err(worker_err)?;
            if images.len() != batch.num_images() {
                return Err(worker_err(BackendError::Internal(format!(
                    "warm-up returned {} images for a batch of {}",
                    images.len(),
                    batch.num_images()
                ))));
            }
            info!(
                device = %self.device,
                images = batch.num_images(),
                width = batch.key.width,
                height = batch.key.height,
                elapsed_s = started.elapsed().as_secs_f64(),
                "warm-up done"
            );
        }
        backend.health().map_err(worker_err)?;
        Ok((backend, info))
    }
}

/// The largest batch the engine may form: the largest size, with CFG when the default guidance
/// uses it, as many images as both budgets allow.
pub(crate) fn warmup_batch(info: &ModelInfo, limits: &BatchLimits, steps: u32) -> Batch {
    let key = BatchKey {
        width: info.max_width,
        height: info.max_height,
        steps,
        sampler: info.default_sampler,
        cfg: cfg_enabled(info.default_guidance_scale),
        strength_permille: None,
        pag_layers: None,
        controlnet: None,
    };
    let by_tokens = limits.max_latent_tokens / key.latent_tokens_per_image().max(1);
    let n = limits.max_images.min(by_tokens).max(1);
    Batch {
        key,
        items: vec![BatchItem {
            prompt: "warm-up".to_owned(),
            negative_prompt: None,
            n: u32::try_from(n).unwrap_or(u32::MAX),
            seed: 0,
            guidance_scale: info.default_guidance_scale,
            previews: 0,
            edit: None,
            ..Default::default()
        }],
    }
}

/// The name of worker `index`'s thread in `epoch`.
pub(crate) fn thread_name(index: usize, epoch: u32) -> String {
    if epoch == 0 {
        format!("sana-worker-{index}")
    } else {
        format!("sana-worker-{index}.{epoch}")
    }
}

/// How a batch left its worker.
#[derive(Debug)]
enum After {
    /// Its requests were answered; the backend serves on.
    Done,
    /// The backend panicked or failed its health check after an error (the reason, for the
    /// log): rebuild it.
    Rebuild(String),
    /// The watchdog took the batch (and answered its requests) while the backend hung: this
    /// thread is no longer the slot's worker.
    Abandoned,
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic".to_owned()
    }
}

/// Runs one batch and answers each of its requests.
fn run_batch(
    backend: &mut Box<dyn Backend>,
    next: NextBatch,
    board: &Board,
    index: usize,
    cancel: &AtomicBool,
) -> After {
    let NextBatch {
        key,
        mut entries,
        span,
    } = next;
    let _enter = span.enter();
    let started = Instant::now();
    // The batch may have waited in the prefetch slot: leave out whoever left meanwhile.
    entries.retain_mut(|entry| entry.check_alive(started));
    if entries.is_empty() {
        return After::Done;
    }
    if cancel.load(Ordering::Relaxed) {
        for entry in &mut entries {
            entry.finish(Err(EngineError::ShuttingDown));
        }
        return After::Done;
    }
    let batch = Batch {
        key,
        items: entries.iter().map(|entry| entry.item.clone()).collect(),
    };
    let slot = &board.slots[index];
    *slot.running() = Some(entries);
    let mut progress = |p: Progress| {
        board.beat(index);
        if cancel.load(Ordering::Relaxed) {
            return Control::Stop;
        }
        let running = slot.running();
        // Taken by the watchdog: nobody waits for this batch any more.
        let Some(entries) = running.as_ref() else {
            return Control::Stop;
        };
        let mut open = false;
        for entry in entries {
            if !entry.responder.is_closed() {
                open = true;
                entry.responder.send(Event::Progress {
                    step: p.step,
                    steps: p.steps,
                });
            }
        }
        for preview in p.previews {
            if let Some(entry) = entries.get(preview.item) {
                entry.responder.send(Event::Preview {
                    image_index: preview.image_index,
                    step: p.step,
                    image: preview.image,
                });
            }
        }
        if open {
            Control::Continue
        } else {
            Control::Stop
        }
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| backend.generate(&batch, &mut progress)));
    let Some(mut entries) = slot.running().take() else {
        return After::Abandoned;
    };
    let finished = Instant::now();
    let inference = finished - started;
    ::metrics::histogram!(metrics::BATCH_INFERENCE_DURATION).record(inference.as_secs_f64());

    let result = match outcome {
        Ok(Ok(images)) => check_images(&batch, images),
        Ok(Err(err)) => Err(err),
        Err(panic) => {
            let message = panic_message(&*panic);
            error!(panic = %message, "the backend panicked; failing its batch");
            // Restarting before the answers go out, so that a client reacting to its 500 finds
            // the worker so marked.
            slot.set_state(WorkerState::Restarting);
            slot.count_restart();
            for entry in &mut entries {
                entry.finish(Err(EngineError::Backend(format!(
                    "the backend panicked: {message}"
                ))));
            }
            return After::Rebuild(format!("it panicked: {message}"));
        }
    };
    match result {
        Ok(images) => {
            let batch_images = images.len();
            let mut images = images.into_iter();
            for entry in &mut entries {
                let n = entry.item.n;
                let generation = Generation {
                    images: images.by_ref().take(n as usize).collect(),
                    seeds: (0..n).map(|i| entry.item.image_seed(i)).collect(),
                    batch_images,
                    timings: Timings {
                        queue: started.saturating_duration_since(entry.admitted),
                        inference,
                        total: finished.saturating_duration_since(entry.admitted),
                    },
                };
                entry.finish(Ok(generation));
            }
        }
        Err(BackendError::Cancelled) => {
            let err = if cancel.load(Ordering::Relaxed) {
                EngineError::ShuttingDown
            } else {
                EngineError::Cancelled
            };
            for entry in &mut entries {
                entry.finish(Err(err.clone()));
            }
        }
        Err(err) => {
            error!(%err, "the backend failed a batch");
            let rebuild = match &err {
                BackendError::Internal(_) => backend.health().err().map(|health| {
                    format!("it failed its health check ({health}) after an error ({err})")
                }),
                _ => None,
            };
            if rebuild.is_some() {
                slot.set_state(WorkerState::Restarting);
                slot.count_restart();
            }
            let lifted = EngineError::from(err);
            for entry in &mut entries {
                entry.finish(Err(lifted.clone()));
            }
            if let Some(reason) = rebuild {
                return After::Rebuild(reason);
            }
        }
    }
    After::Done
}

/// The backend kept its side of the contract: `Σn` images of the key's size.
fn check_images(
    batch: &Batch,
    images: Vec<sana_backend::Image>,
) -> Result<Vec<sana_backend::Image>, BackendError> {
    if images.len() != batch.num_images() {
        return Err(BackendError::Internal(format!(
            "the backend returned {} images for a batch of {}",
            images.len(),
            batch.num_images()
        )));
    }
    if let Some(bad) = images
        .iter()
        .find(|image| image.width != batch.key.width || image.height != batch.key.height)
    {
        return Err(BackendError::Internal(format!(
            "the backend returned a {}x{} image for a {}x{} batch",
            bad.width, bad.height, batch.key.width, batch.key.height
        )));
    }
    Ok(images)
}
