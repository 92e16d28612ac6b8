//! A fake [`Backend`] for engine and server tests (feature `test-util`).
//!
//! Every image is a pure function of `(prompt, seed, size)` ([`FakeBackend::image_for`]), so a
//! test can check that each answer is the right image for its request. The fake records every
//! batch it sees in a shared [`BatchLog`], can take time (per batch, per image, per step), can
//! wait on a [`Gate`] the test opens, fails or panics on chosen prompts, reports every step and
//! stops when told to.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use sana_backend::{
    edit_first_step, Backend, BackendError, Batch, BatchItem, BatchKey, Control, Image, ModelInfo,
    Preview, Progress, Sampler,
};

/// Simulated cost of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Paid once per batch (kernel launches, text encoding overhead).
    pub per_batch: Duration,
    /// Paid once per image of the batch.
    pub per_image: Duration,
    /// Paid before every step.
    pub per_step: Duration,
}

/// What to do when a batch contains a chosen prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Return `BackendError::Internal`.
    Error,
    /// Panic.
    Panic,
    /// Return `BackendError::Internal` and fail every `health()` check afterwards, like a lost
    /// device context; only a rebuild helps.
    Fatal,
    /// Return `BackendError::OutOfMemory`.
    OutOfMemory,
    /// Hang after the first step, never returning (a deadlocked device), until
    /// [`FakeBackend::with_release`]'s gate opens; then the batch completes.
    Hang,
}

/// How a recorded batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running.
    Running,
    /// All images returned.
    Completed,
    /// Stopped by the progress callback.
    Cancelled,
    /// Injected error.
    Failed,
    /// Injected panic.
    Panicked,
    /// Hung by an injected [`Failure::Hang`] (until released).
    Hung,
}

/// One batch as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedBatch {
    /// The device of the backend that ran it.
    pub device: String,
    /// Its key.
    pub key: BatchKey,
    /// Its items, in order.
    pub items: Vec<BatchItem>,
    /// Steps run before it ended.
    pub steps_run: u32,
    /// How it ended.
    pub outcome: Outcome,
}

impl RecordedBatch {
    /// Images in the batch.
    pub fn num_images(&self) -> usize {
        self.items.iter().map(|item| item.n as usize).sum()
    }

    /// Whether this is a warm-up batch of the engine.
    pub fn is_warmup(&self) -> bool {
        self.items.iter().any(|item| item.prompt == "warm-up")
    }
}

/// Every batch the fakes sharing it have seen, and when they went idle; survives backend rebuilds.
#[derive(Debug, Clone, Default)]
pub struct BatchLog {
    batches: Arc<Mutex<Vec<RecordedBatch>>>,
    idles: Arc<Mutex<Vec<usize>>>,
}

impl BatchLog {
    /// For each [`Backend::idle`] call so far, how many batches had started before it.
    pub fn idles(&self) -> Vec<usize> {
        self.idles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn idle(&self) {
        let started = self.lock().len();
        self.idles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(started);
    }

    /// A copy of every batch so far, in the order they started.
    pub fn batches(&self) -> Vec<RecordedBatch> {
        self.lock().clone()
    }

    /// The batches other than warm-ups.
    pub fn served(&self) -> Vec<RecordedBatch> {
        self.batches()
            .into_iter()
            .filter(|b| !b.is_warmup())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedBatch>> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, device: &str, batch: &Batch) -> usize {
        let mut log = self.lock();
        log.push(RecordedBatch {
            device: device.to_owned(),
            key: batch.key,
            items: batch.items.clone(),
            steps_run: 0,
            outcome: Outcome::Running,
        });
        log.len() - 1
    }

    fn update(&self, index: usize, steps_run: u32, outcome: Outcome) {
        let mut log = self.lock();
        log[index].steps_run = steps_run;
        log[index].outcome = outcome;
    }
}

/// A latch the fake waits on before running a batch; the test opens it.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Self::default()
    }

    /// Opens it for good, waking every waiting batch.
    pub fn open(&self) {
        let (open, condvar) = &*self.0;
        *open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        condvar.notify_all();
    }

    /// Blocks until the gate is open.
    pub fn wait(&self) {
        let (open, condvar) = &*self.0;
        let mut guard = open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*guard {
            guard = condvar.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A deterministic stand-in for the model; see the module docs.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    info: ModelInfo,
    latency: Latency,
    failures: Vec<(String, Failure)>,
    gate: Option<Gate>,
    release: Gate,
    log: BatchLog,
    broken: bool,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBackend {
    /// A fake with [`FakeBackend::default_info`], no latency, no failures, no gate.
    pub fn new() -> Self {
        Self {
            info: Self::default_info(),
            latency: Latency::default(),
            failures: Vec::new(),
            gate: None,
            release: Gate::closed(),
            log: BatchLog::default(),
            broken: false,
        }
    }

    /// Sizes 32..=2048 in multiples of 32, 1024² by default, 20 steps, guidance 4.5, both
    /// samplers, 16 images per batch.
    pub fn default_info() -> ModelInfo {
        ModelInfo {
            model_id: "fake/sana".to_owned(),
            dtype: "f32".to_owned(),
            device: "cpu".to_owned(),
            min_width: 32,
            min_height: 32,
            max_width: 2048,
            max_height: 2048,
            size_multiple: 32,
            default_width: 1024,
            default_height: 1024,
            default_steps: 20,
            default_guidance_scale: 4.5,
            default_sampler: Sampler::DpmSolverMultistep,
            samplers: Sampler::ALL.to_vec(),
            max_batch_images: 16,
            loras: Vec::new(),
            transformer_layers: 20,
            pag_supported: true,
            default_pag_scale: 0.0,
            default_pag_layers: vec![0],
            controlnets: Vec::new(),
        }
    }

    /// Replaces the model info.
    pub fn with_info(mut self, info: ModelInfo) -> Self {
        self.info = info;
        self
    }

    /// Sets the device reported in the info and the log.
    pub fn with_device(mut self, device: &str) -> Self {
        device.clone_into(&mut self.info.device);
        self
    }

    /// Sets the simulated cost.
    pub fn with_latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// Fails (or panics on) every batch that contains `prompt`.
    pub fn fail_on(mut self, prompt: &str, failure: Failure) -> Self {
        self.failures.push((prompt.to_owned(), failure));
        self
    }

    /// Makes every batch wait for `gate` to open before its first step.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The gate that ends a [`Failure::Hang`] (closed by default: the hang lasts for ever).
    pub fn with_release(mut self, release: Gate) -> Self {
        self.release = release;
        self
    }

    /// The log this fake (and its clones) record into.
    pub fn log(&self) -> BatchLog {
        self.log.clone()
    }

    /// A factory for `Engine::start` that clones this fake for each device (sharing the log).
    pub fn factory(
        self,
    ) -> impl Fn(&str) -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static {
        move |device| Ok(Box::new(self.clone().with_device(device)) as Box<dyn Backend>)
    }

    /// The image the fake makes for `prompt` and `seed` at a size: every pixel byte comes from a
    /// 64-bit hash of `(seed, prompt)`, repeated.
    pub fn image_for(prompt: &str, seed: u64, width: u32, height: u32) -> Image {
        let mut hasher = DefaultHasher::new();
        seed.hash(&mut hasher);
        prompt.hash(&mut hasher);
        let pattern = hasher.finish().to_le_bytes();
        let len = width as usize * height as usize * 3;
        let rgb8 = pattern.iter().copied().cycle().take(len).collect();
        Image {
            width,
            height,
            rgb8,
        }
    }

    /// The preview the fake makes of image `seed` after `step`, at latent resolution (size/32).
    pub fn preview_for(prompt: &str, seed: u64, step: u32, key: &BatchKey) -> Image {
        Self::image_for(
            &format!("{prompt}#step{step}"),
            seed,
            (key.width / 32).max(1),
            (key.height / 32).max(1),
        )
    }

    fn failure_for(&self, batch: &Batch) -> Option<(Failure, String)> {
        batch.items.iter().find_map(|item| {
            self.failures
                .iter()
                .find(|(prompt, _)| *prompt == item.prompt)
                .map(|(prompt, failure)| (*failure, prompt.clone()))
        })
    }
}

fn pause(duration: Duration) {
    if !duration.is_zero() {
        std::thread::sleep(duration);
    }
}

impl Backend for FakeBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn health(&self) -> Result<(), BackendError> {
        if self.broken {
            return Err(BackendError::Internal("the device is lost".into()));
        }
        Ok(())
    }

    fn idle(&mut self) {
        self.log.idle();
    }

    fn generate(
        &mut self,
        batch: &Batch,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Image>, BackendError> {
        let index = self.log.start(&self.info.device, batch);
        if let Some(gate) = &self.gate {
            gate.wait();
        }
        match self.failure_for(batch) {
            Some((failure @ (Failure::Error | Failure::Fatal), prompt)) => {
                self.log.update(index, 0, Outcome::Failed);
                self.broken |= failure == Failure::Fatal;
                return Err(BackendError::Internal(format!(
                    "injected failure on prompt `{prompt}`"
                )));
            }
            Some((Failure::OutOfMemory, prompt)) => {
                self.log.update(index, 0, Outcome::Failed);
                return Err(BackendError::OutOfMemory(format!(
                    "injected out-of-memory on prompt `{prompt}`"
                )));
            }
            Some((Failure::Panic, prompt)) => {
                self.log.update(index, 0, Outcome::Panicked);
                panic!("injected panic on prompt `{prompt}`");
            }
            Some((Failure::Hang, _)) | None => {}
        }
        let hangs = matches!(self.failure_for(batch), Some((Failure::Hang, _)));
        let images = u32::try_from(batch.num_images()).unwrap_or(u32::MAX);
        pause(self.latency.per_batch + self.latency.per_image * images);
        // An edit runs the last `steps − first step` steps of its schedule, as the model does.
        let steps = match batch.key.strength_permille {
            Some(permille) => {
                let first = edit_first_step(batch.key.steps, f64::from(permille) / 1000.0);
                batch.key.steps - first.unwrap_or(0)
            }
            None => batch.key.steps,
        };
        for step in 1..=steps {
            pause(self.latency.per_step);
            let mut previews = Vec::new();
            for (item_index, item) in batch.items.iter().enumerate() {
                if item.wants_preview(step, steps) {
                    for image_index in 0..item.n {
                        previews.push(Preview {
                            item: item_index,
                            image_index,
                            image: Self::preview_for(
                                &item.prompt,
                                item.image_seed(image_index),
                                step,
                                &batch.key,
                            ),
                        });
                    }
                }
            }
            self.log.update(index, step, Outcome::Running);
            if progress(Progress {
                step,
                steps,
                previews,
            }) == Control::Stop
            {
                self.log.update(index, step, Outcome::Cancelled);
                return Err(BackendError::Cancelled);
            }
            if hangs && step == 1 {
                self.log.update(index, step, Outcome::Hung);
                self.release.wait();
            }
        }
        let images = batch
            .items
            .iter()
            .flat_map(|item| {
                (0..item.n).map(|i| {
                    Self::image_for(
                        &item.prompt,
                        item.image_seed(i),
                        batch.key.width,
                        batch.key.height,
                    )
                })
            })
            .collect();
        self.log.update(index, steps, Outcome::Completed);
        Ok(images)
    }
}
