//! `sana-tiny-scenes`: the demo model the `sana` binary carries inside itself, so that `sana
//! generate` and `sana serve` work on a fresh machine with no download, and the pixel checker that
//! measures it.
//!
//! The model is a real Sana pipeline (Gemma-2 text encoder, `SanaTransformer2DModel`,
//! `AutoencoderDC`, flow DPM-Solver) at toy scale, trained by `tools/scenes/train.py` on a
//! synthetic world: a background colour and one or two objects, each with a shape, a colour, a
//! size and a position, all of which [`checker::check`] reads back from pixels.

pub mod checker;
pub mod embedded;

pub use checker::{check, Found, Object, Scene, Tally};
pub use embedded::{materialize, MODEL_ID};

/// One held-out prompt with the scene it describes.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HeldOut {
    pub prompt: String,
    pub scene: Scene,
}

/// The 100 held-out prompts (drawn by `tools/scenes/world.py` with a seed training never used).
pub fn heldout() -> Vec<HeldOut> {
    serde_json::from_str(include_str!("../heldout.json")).expect("heldout.json is valid")
}
