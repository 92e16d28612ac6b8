//! Sana in candle: the Linear DiT, DC-AE, Gemma-2 text encoder, samplers and weight loading.
//!
//! Ground truth is diffusers/transformers; every numeric module is tested for parity against
//! reference tensors from `tools/gen_fixtures.py` (see `tests/fixtures/`).

pub mod autoencoder;
pub mod backend;
mod error;
pub mod image;
mod nn;
pub mod nvlabs;
pub mod ops;
pub mod pipeline;
pub mod scheduler;
pub mod source;
pub mod text_encoder;
pub mod transformer;
pub mod weights;

pub use error::{Error, Result};
