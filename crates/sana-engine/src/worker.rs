//! Device workers: one OS thread per device, each owning its backend.
//!
//! Free workers wait on the shared capacity-1 batch channel, so a batch goes to the first free
//! worker. A backend error fails only its batch. A panic is caught, the batch fails, and the
//! backend is rebuilt by the factory (and warmed up again); if that fails the worker is marked
//! unhealthy and leaves, and the others keep serving. A backend error followed by a failed
//! `health()` check (a lost device context, say) is handled like a panic.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use sana_backend::{
    cfg_enabled, Backend, BackendError, Batch, BatchItem, BatchKey, Control, ModelInfo, Progress,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::{BatchLimits, EngineConfig};
use crate::error::{EngineError, StartError};
use crate::metrics;
use crate::queue::NextBatch;
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
    /// Rebuilding its backend after a panic.
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
    /// How many times its backend was rebuilt after a panic.
    pub restarts: u32,
}

/// Shared, lock-free view of every worker.
#[derive(Debug)]
pub(crate) struct Board {
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    device: String,
    state: AtomicU8,
    restarts: AtomicU32,
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
                })
                .collect(),
        }
    }

    fn set(&self, index: usize, state: WorkerState) {
        self.slots[index]
            .state
            .store(state as u8, Ordering::Release);
    }

    pub fn snapshot(&self) -> Vec<WorkerHealth> {
        self.slots
            .iter()
            .map(|slot| WorkerHealth {
                device: slot.device.clone(),
                state: WorkerState::from_u8(slot.state.load(Ordering::Acquire)),
                restarts: slot.restarts.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn any_serving(&self) -> bool {
        self.slots
            .iter()
            .any(|slot| WorkerState::from_u8(slot.state.load(Ordering::Acquire)).is_serving())
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
}

impl Worker {
    /// Starts the thread; `ready` gets the model info once the backend is built and warm.
    pub fn spawn(
        self,
        ready: oneshot::Sender<Result<ModelInfo, StartError>>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("sana-worker-{}", self.index))
            .spawn(move || self.run(ready))
    }

    fn run(self, ready: oneshot::Sender<Result<ModelInfo, StartError>>) {
        let mut backend = match self.build() {
            Ok((backend, info)) => {
                self.board.set(self.index, WorkerState::Ready);
                let _ = ready.send(Ok(info));
                backend
            }
            Err(err) => {
                self.board.set(self.index, WorkerState::Unhealthy);
                let _ = ready.send(Err(err));
                return;
            }
        };
        loop {
            let next = {
                let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
                batches.blocking_recv()
            };
            let Some(next) = next else { break };
            self.board.set(self.index, WorkerState::Busy);
            if let Err(NeedsRebuild(reason)) = run_batch(&mut backend, next, &self.cancel) {
                self.board.set(self.index, WorkerState::Restarting);
                ::metrics::counter!(metrics::WORKER_RESTART).increment(1);
                self.board.slots[self.index]
                    .restarts
                    .fetch_add(1, Ordering::Relaxed);
                warn!(device = %self.device, %reason, "rebuilding the backend");
                // Dropping a backend that panicked may panic again; contain that too.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(backend)));
                match self.build() {
                    Ok((rebuilt, _)) => backend = rebuilt,
                    Err(err) => {
                        error!(device = %self.device, %err, "backend rebuild failed; worker marked unhealthy");
                        self.board.set(self.index, WorkerState::Unhealthy);
                        return;
                    }
                }
            }
            self.board.set(self.index, WorkerState::Ready);
        }
        self.board.set(self.index, WorkerState::Stopped);
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
        }],
    }
}

/// The backend panicked or failed its health check after an error; the reason is for the log.
#[derive(Debug)]
struct NeedsRebuild(String);

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic".to_owned()
    }
}

/// Runs one batch and answers each of its requests. `Err` when the backend must be rebuilt.
fn run_batch(
    backend: &mut Box<dyn Backend>,
    next: NextBatch,
    cancel: &AtomicBool,
) -> Result<(), NeedsRebuild> {
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
        return Ok(());
    }
    if cancel.load(Ordering::Relaxed) {
        for entry in &mut entries {
            entry.finish(Err(EngineError::ShuttingDown));
        }
        return Ok(());
    }
    let batch = Batch {
        key,
        items: entries.iter().map(|entry| entry.item.clone()).collect(),
    };
    let mut progress = |p: Progress| {
        if cancel.load(Ordering::Relaxed) {
            return Control::Stop;
        }
        let mut open = false;
        for entry in &entries {
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
    let finished = Instant::now();
    let inference = finished - started;
    ::metrics::histogram!(metrics::BATCH_INFERENCE_DURATION).record(inference.as_secs_f64());

    let result = match outcome {
        Ok(Ok(images)) => check_images(&batch, images),
        Ok(Err(err)) => Err(err),
        Err(panic) => {
            let message = panic_message(&*panic);
            error!(panic = %message, "the backend panicked; failing its batch");
            for entry in &mut entries {
                entry.finish(Err(EngineError::Backend(format!(
                    "the backend panicked: {message}"
                ))));
            }
            return Err(NeedsRebuild(format!("it panicked: {message}")));
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
            let lifted = EngineError::from(err.clone());
            for entry in &mut entries {
                entry.finish(Err(lifted.clone()));
            }
            if matches!(err, BackendError::Internal(_)) {
                if let Err(health) = backend.health() {
                    return Err(NeedsRebuild(format!(
                        "it failed its health check ({health}) after an error ({err})"
                    )));
                }
            }
        }
    }
    Ok(())
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
