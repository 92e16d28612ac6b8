//! The watchdog: answers the requests of a worker that hangs and puts a new worker in its place.
//!
//! A busy worker shows a sign of life at the start of its batch and after every denoising step.
//! When one stays silent for longer than [`EngineConfig::watchdog_timeout`] (a deadlocked driver,
//! a kernel that never returns), the watchdog takes the batch's requests from its slot and
//! answers them `WorkerHung` (HTTP 503 with `Retry-After`), bumps the slot's epoch (so the stuck
//! thread, should it ever return, leaves without touching anything) and starts a replacement
//! worker on the same device with a new backend. The slot reads `restarting` until that worker
//! is warm, so `/ready` says so. A thread cannot be killed: the stuck one is detached, with
//! whatever its backend holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::metrics;
use crate::queue::NextBatch;
use crate::worker::{thread_name, BackendFactory, Board, Worker, WorkerState};

/// Everything the watchdog needs to replace a worker.
pub(crate) struct Watchdog {
    pub timeout: Duration,
    pub board: Arc<Board>,
    pub factory: BackendFactory,
    pub config: EngineConfig,
    /// Weak, so that the queue still sees when every worker has left.
    pub batches: Weak<Mutex<mpsc::Receiver<NextBatch>>>,
    pub cancel: Arc<AtomicBool>,
    pub threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Gone when the engine is dropped: the watchdog then leaves.
    pub engine_alive: Weak<()>,
}

impl Watchdog {
    /// Starts the watchdog's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sana-watchdog".to_owned())
            .spawn(move || self.run())
    }

    fn run(self) {
        let period = (self.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            std::thread::sleep(period);
            if self.engine_alive.upgrade().is_none() || self.cancel.load(Ordering::Acquire) {
                return;
            }
            self.check();
        }
    }

    /// Replaces every busy worker silent for longer than the timeout.
    fn check(&self) {
        for (index, slot) in self.board.slots.iter().enumerate() {
            if slot.state() != WorkerState::Busy {
                continue;
            }
            let silent = self.board.silent_for(index);
            if silent < self.timeout {
                continue;
            }
            // Whoever takes the batch answers it: the worker, had it just finished, or we.
            let Some(entries) = slot.running().take() else {
                continue;
            };
            let old_epoch = slot.epoch.fetch_add(1, Ordering::AcqRel);
            slot.set_state(WorkerState::Restarting);
            slot.count_restart();
            ::metrics::counter!(metrics::WORKER_RESTART).increment(1);
            ::metrics::counter!(metrics::WORKER_HUNG).increment(1);
            error!(
                device = %slot.device,
                silent_s = silent.as_secs_f64(),
                requests = entries.len(),
                "worker hung: no progress within the watchdog timeout; answering its requests \
                 and replacing it"
            );
            for mut entry in entries {
                entry.finish(Err(EngineError::WorkerHung {
                    device: slot.device.clone(),
                    silent: self.timeout,
                }));
            }
            self.replace(index, old_epoch + 1);
        }
    }

    fn replace(&self, index: usize, epoch: u32) {
        let slot = &self.board.slots[index];
        let Some(batches) = self.batches.upgrade() else {
            // Every other worker has left, and so has the queue's channel.
            slot.set_state(WorkerState::Unhealthy);
            return;
        };
        let worker = Worker {
            index,
            device: slot.device.clone(),
            factory: Arc::clone(&self.factory),
            config: self.config.clone(),
            batches,
            board: Arc::clone(&self.board),
            cancel: Arc::clone(&self.cancel),
            epoch,
        };
        // The replacement reports through the board; nobody awaits its start.
        let (ready, _) = oneshot::channel();
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        // Detach the stuck thread: shutdown must not wait for it.
        let stuck = thread_name(index, epoch - 1);
        threads.retain(|thread| thread.thread().name() != Some(stuck.as_str()));
        match worker.spawn(ready) {
            Ok(thread) => threads.push(thread),
            Err(err) => {
                warn!(device = %slot.device, %err, "cannot start the replacement worker");
                slot.set_state(WorkerState::Unhealthy);
            }
        }
    }
}
