//! The serving engine: admission control, the batching queue and one worker thread per device.
//!
//! ```text
//! Engine::submit ─► validation ─► admission (semaphore, Overloaded past it)
//!        │
//!        ▼
//!   queue actor (owns State) ── next_batch: head + same-key entries under image/token budgets
//!        │  capacity-1 channel: one batch prefetched while the workers run
//!        ▼
//!   worker threads (one per device, each owning a Backend; first free one takes the batch)
//!        │  progress events per step, answers per request    ◄── watchdog: replaces a hung one
//!        ▼
//! GenerationStream (events, then exactly one Done; timeout; dropping it cancels)
//! ```
//!
//! The engine never imports candle: the model lives behind [`sana_backend::Backend`], and the
//! tests drive the engine with `testing::FakeBackend` (feature `test-util`).

#![warn(missing_docs)]

mod config;
mod engine;
mod error;
pub mod metrics;
mod queue;
mod stream;
mod validation;
mod watchdog;
mod worker;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use config::{BatchLimits, EngineConfig};
pub use engine::{Engine, Health, ShutdownReport};
pub use error::{EngineError, StartError, ValidationError};
pub use stream::{Event, Generation, GenerationStream, Timings};
pub use validation::{
    EditRequest, GenerateRequest, ValidRequest, MAX_CONDITIONING_SCALE, MAX_GUIDANCE_SCALE,
    MAX_LORA_SCALE, MAX_PAG_SCALE,
};
pub use worker::{WorkerHealth, WorkerState};

pub use sana_backend;
