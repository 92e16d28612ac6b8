//! In-process tests of the whole router (`app(state).oneshot(..)`) against the engine's
//! `FakeBackend`: every field, default and error of the API, with exact statuses and envelopes.
//!
//! Nothing waits on a fixed sleep: batches are held with a `Gate`, time-to-live and rate limits
//! run on a `ManualClock`, and "admitted" is observed through `Engine::in_flight`.

mod adapters;
mod auth;
mod cancel;
mod common;
mod controlnet;
mod edits;
mod errors;
mod faults;
mod images;
mod ops;
mod playground;
mod shutdown;
mod stream;
