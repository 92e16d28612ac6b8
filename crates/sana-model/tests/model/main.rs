//! The model crate's integration tests, one module per part, in one test binary: one link instead
//! of eight, and one binary for `scripts/gpu-check.sh` to carry to a GPU machine. (The memory tests
//! have their own binary, `autoencoder_memory`, for their counting allocator.)

#[path = "../common/mod.rs"]
mod common;

mod adapters;
mod autoencoder;
mod controlnet;
mod edits;
mod image;
mod nvlabs;
mod pipeline;
mod sampling;
mod scheduler;
mod text_encoder;
mod transformer;
