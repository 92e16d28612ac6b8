//! The seam between the serving engine and a Sana model.
//!
//! The engine (`sana-engine`) forms [`Batch`]es of compatible requests and hands them to a
//! [`Backend`] that runs on its own OS thread, one per device. The model crate (`sana-model`)
//! implements [`Backend`] for the real candle pipeline; the engine's tests implement it with a fake.
//! This crate depends on neither tokio nor candle, so both sides build without the other.
//!
//! Contract, in short:
//! - every item of a batch shares the [`BatchKey`] (latent shape, step count, sampler, CFG on/off),
//!   so the whole batch can go through one forward per step;
//! - an item asks for `n` images; image `i` of an item is drawn from [`BatchItem::image_seed`]`(i)`
//!   alone, so an image never depends on its batchmates;
//! - [`Backend::generate`] returns exactly [`Batch::num_images`] images, items in order and each
//!   item's `n` images in order, and calls its progress callback after every denoising step,
//!   stopping with [`BackendError::Cancelled`] when the callback answers [`Control::Stop`].

#![warn(missing_docs)]

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Spatial compression of Sana's DC-AE (`AutoencoderDC`, f32c32) times the transformer's patch size
/// (1): one latent token per 32×32 block of pixels.
pub const LATENT_PIXELS_PER_TOKEN_SIDE: u32 = 32;

/// The noise sampler (diffusers "scheduler") used to integrate the flow.
///
/// Part of the [`BatchKey`]: samplers keep per-batch state, so a batch uses one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Sampler {
    /// DPM-Solver++ (2nd order, multistep) on the flow-matching objective; the default scheduler of
    /// diffusers' `SanaPipeline` (`DPMSolverMultistepScheduler` with `prediction_type="flow_prediction"`).
    DpmSolverMultistep,
    /// First-order Euler on the flow ODE (`FlowMatchEulerDiscreteScheduler`).
    FlowMatchEuler,
    /// SANA-Sprint's few-step TrigFlow consistency sampler (`SCMScheduler`).
    Scm,
}

impl Sampler {
    /// The stable name used in configuration, the HTTP API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Sampler::DpmSolverMultistep => "dpm_solver_multistep",
            Sampler::FlowMatchEuler => "flow_match_euler",
            Sampler::Scm => "scm",
        }
    }

    /// Every sampler this crate knows, in declaration order.
    pub const ALL: [Sampler; 3] = [
        Sampler::DpmSolverMultistep,
        Sampler::FlowMatchEuler,
        Sampler::Scm,
    ];
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`Sampler`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sampler `{0}`; expected one of: dpm_solver_multistep, flow_match_euler, scm")]
pub struct UnknownSampler(pub String);

impl FromStr for Sampler {
    type Err = UnknownSampler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Sampler::ALL
            .into_iter()
            .find(|sampler| sampler.as_str() == s)
            .ok_or_else(|| UnknownSampler(s.to_owned()))
    }
}

/// What a loaded model is and what it accepts. Reported once by a backend after loading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model id as given at load time, e.g. `Efficient-Large-Model/Sana_1600M_1024px_diffusers`.
    pub model_id: String,
    /// Compute dtype of the transformer, e.g. `bf16`.
    pub dtype: String,
    /// Device the backend runs on, e.g. `cuda:0` or `cpu`.
    pub device: String,
    /// Smallest accepted image width in pixels.
    pub min_width: u32,
    /// Smallest accepted image height in pixels.
    pub min_height: u32,
    /// Largest accepted image width in pixels.
    pub max_width: u32,
    /// Largest accepted image height in pixels.
    pub max_height: u32,
    /// Width and height must be multiples of this (32 for DC-AE f32c32 with patch size 1).
    pub size_multiple: u32,
    /// Width used when a request does not say (the checkpoint's native resolution).
    pub default_width: u32,
    /// Height used when a request does not say.
    pub default_height: u32,
    /// Denoising steps used when a request does not say (diffusers: 20).
    pub default_steps: u32,
    /// Classifier-free guidance scale used when a request does not say (diffusers: 4.5).
    pub default_guidance_scale: f32,
    /// Sampler used when a request does not say.
    pub default_sampler: Sampler,
    /// Samplers this backend implements.
    pub samplers: Vec<Sampler>,
    /// Most images one [`Backend::generate`] call may be given (before CFG doubles the rows).
    pub max_batch_images: usize,
    /// LoRA adapters loaded at start-up, which requests choose by name ([`BatchItem::lora`]).
    #[serde(default)]
    pub loras: Vec<LoraInfo>,
    /// Transformer blocks, for PAG's [`BatchKey::pag_layers`].
    #[serde(default)]
    pub transformer_layers: u32,
    /// Whether perturbed-attention guidance is available (not for SANA-Sprint).
    #[serde(default)]
    pub pag_supported: bool,
    /// PAG scale when a request does not say: 3.0 for `SanaPAGPipeline` folders, 0 (off) else.
    #[serde(default)]
    pub default_pag_scale: f32,
    /// PAG's blocks when a request names none (diffusers: block 0; an NVlabs YAML's
    /// `pag_applied_layers`); empty means block 0.
    #[serde(default)]
    pub default_pag_layers: Vec<u32>,
    /// ControlNets loaded at start-up, by name; [`BatchKey::controlnet`] indexes this list.
    #[serde(default)]
    pub controlnets: Vec<String>,
}

/// A loaded LoRA adapter as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraInfo {
    /// The name requests use.
    pub name: String,
    /// Where it was loaded from (a path or a Hub id).
    pub source: String,
    /// Modules it changes.
    pub modules: u32,
    /// Its distinct ranks, ascending.
    pub ranks: Vec<u32>,
}

/// One adapter a request applies, with its scale (multiplying the adapter's own `alpha / r`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraChoice {
    /// A name from [`ModelInfo::loras`].
    pub name: String,
    /// Finite; 1 is the adapter as trained, 0 switches it off.
    pub scale: f32,
}

/// A set of transformer blocks (PAG's applied layers): bit `i` is block `i`, up to
/// [`LayerSet::MAX_LAYERS`] blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LayerSet(u128);

impl LayerSet {
    /// The most blocks a set can name (Sana's largest transformer has 60).
    pub const MAX_LAYERS: u32 = 128;

    /// The set of `indices` (each below [`Self::MAX_LAYERS`]).
    pub fn from_indices(indices: impl IntoIterator<Item = u32>) -> Result<Self, String> {
        let mut bits = 0u128;
        for i in indices {
            if i >= Self::MAX_LAYERS {
                return Err(format!("block index {i} is above {}", Self::MAX_LAYERS - 1));
            }
            bits |= 1u128 << i;
        }
        Ok(Self(bits))
    }

    /// Block indices, ascending.
    pub fn indices(self) -> impl Iterator<Item = u32> {
        (0..Self::MAX_LAYERS).filter(move |&i| self.0 & (1u128 << i) != 0)
    }

    /// Whether no block is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// diffusers' `pag_applied_layers` resolved for a transformer of `num_layers` blocks: an entry
/// that is an integer selects that block; any other entry is a regular expression searched in each
/// block's self-attention name `transformer_blocks.<i>.attn1`, as diffusers' `SanaPAGPipeline`
/// matches them (so `transformer_blocks.1` also selects blocks 10–19; `transformer_blocks\.1\.`
/// or `1` select block 1 alone). Every entry must select at least one block.
pub fn resolve_pag_layers(num_layers: u32, specs: &[String]) -> Result<LayerSet, String> {
    let mut out = Vec::new();
    for spec in specs {
        let spec = spec.trim();
        let found: Vec<u32> = if let Ok(i) = spec.parse::<u32>() {
            (i < num_layers).then_some(i).into_iter().collect()
        } else {
            let re = regex::Regex::new(spec).map_err(|e| {
                format!("`{spec}` is neither a block index nor a regular expression: {e}")
            })?;
            (0..num_layers)
                .filter(|i| re.is_match(&format!("transformer_blocks.{i}.attn1")))
                .collect()
        };
        if found.is_empty() {
            let last = num_layers.saturating_sub(1);
            return Err(format!(
                "`{spec}` selects none of the transformer's {num_layers} blocks (give an index \
                 0–{last}, or a name such as `transformer_blocks.{last}`)"
            ));
        }
        out.extend(found);
    }
    LayerSet::from_indices(out)
}

/// Everything that must be equal for requests to share one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Number of denoising steps.
    pub steps: u32,
    /// Sampler used for every item.
    pub sampler: Sampler,
    /// Whether classifier-free guidance runs, i.e. every item has `guidance_scale > 1`. With CFG
    /// each image takes two rows (negative and positive prompt) in every transformer forward, so
    /// a batch is either all-CFG or CFG-free and the model never wastes rows.
    pub cfg: bool,
    /// Edits (image-to-image, inpainting): the strength in thousandths, `1..=1000`; `None` for
    /// text-to-image. Every item of an edit batch carries an [`Edit`], and they all start at the
    /// same step ([`edit_first_step`]) because the sampler's state is per batch.
    pub strength_permille: Option<u16>,
    /// Perturbed-attention guidance on these blocks (every item has a PAG scale > 0): each image
    /// takes one more row, whose self-attention in these blocks is the identity.
    pub pag_layers: Option<LayerSet>,
    /// The ControlNet every item's [`BatchItem::control`] drives, as an index into
    /// [`ModelInfo::controlnets`]; `Some` exactly when the items have control images.
    pub controlnet: Option<u16>,
}

impl BatchKey {
    /// Latent tokens one image of this key costs in a transformer forward:
    /// `(height/32)·(width/32)` per row: one row, a second with CFG, another with PAG.
    pub fn latent_tokens_per_image(&self) -> usize {
        let side = LATENT_PIXELS_PER_TOKEN_SIDE;
        let tokens = (self.height / side) as usize * (self.width / side) as usize;
        tokens * (1 + usize::from(self.cfg) + usize::from(self.pag_layers.is_some()))
    }
}

/// The first step an edit of `strength` runs out of `steps` (diffusers' `get_timesteps`, in f64
/// as Python computes it: `int(max(steps − min(steps·strength, steps), 0))`), or `None` when the
/// strength is outside (0, 1] or leaves no step to run.
pub fn edit_first_step(steps: u32, strength: f64) -> Option<u32> {
    if !(strength > 0.0 && strength <= 1.0) {
        return None;
    }
    let n = f64::from(steps);
    let start = (n - (n * strength).min(n)).max(0.0) as u32;
    (start < steps).then_some(start)
}

/// Whether classifier-free guidance is on for a guidance scale (diffusers: `guidance_scale > 1`).
pub fn cfg_enabled(guidance_scale: f32) -> bool {
    guidance_scale > 1.0
}

/// One request's share of a batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchItem {
    /// The prompt as the user wrote it; the model applies its prompt template (Sana's "complex
    /// human instruction" prefix), tokenizes and truncates.
    pub prompt: String,
    /// Prompt for the unconditional branch of CFG; the empty prompt when `None`.
    pub negative_prompt: Option<String>,
    /// Number of images for this prompt, at least 1. Never split across batches.
    pub n: u32,
    /// Base seed: image `i` of this item is drawn from [`BatchItem::image_seed`]`(i)`.
    pub seed: u64,
    /// Classifier-free guidance scale; per item, since the CFG combine is per row.
    pub guidance_scale: f32,
    /// How many preview images to emit while denoising, per image of the item (0 = none); the
    /// steps at which they are due come from [`preview_steps`].
    pub previews: u32,
    /// An edit's image and mask; `Some` exactly when the batch key has a strength.
    pub edit: Option<Edit>,
    /// LoRA adapters for this item's images (names from [`ModelInfo::loras`], each once).
    /// Batchmates may choose different ones: the backend applies them per row, unmerged.
    pub lora: Vec<LoraChoice>,
    /// PAG scale (> 0 exactly when the key has `pag_layers`).
    pub pag_scale: f32,
    /// PAG's adaptive scale: at timestep `t` the scale is `max(0, pag_scale − this·(1000 − t))`.
    pub pag_adaptive_scale: f32,
    /// ControlNet: this item's control image (at the key's size) and conditioning scale.
    pub control: Option<ControlInput>,
}

/// A control image and its conditioning scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlInput {
    /// The control image, `width × height` of the batch (e.g. white HED edges on black).
    pub image: Image,
    /// diffusers' `controlnet_conditioning_scale` (finite).
    pub scale: f32,
}

/// What an edit starts from: the image and, for inpainting, the area to repaint.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// The image to edit, at the batch's `width × height`.
    pub image: Image,
    /// Inpainting: one byte per pixel of `image`, 255 = repaint, 0 = keep; `None` repaints the
    /// whole image (image-to-image).
    pub mask: Option<Vec<u8>>,
    /// Inpainting: keep the original's unmasked pixels in the output (blended over a short
    /// feather at the mask's edge) instead of the decoded ones.
    pub preserve_unmasked: bool,
}

impl BatchItem {
    /// The seed of image `index` of this item: `seed + index` (wrapping). A request for `n` images
    /// with seed `s` therefore returns the same images as `n` requests for one image with seeds
    /// `s, s+1, …`.
    pub fn image_seed(&self, index: u32) -> u64 {
        self.seed.wrapping_add(u64::from(index))
    }

    /// Whether this item wants a preview after `step` (1-based) of `steps`.
    pub fn wants_preview(&self, step: u32, steps: u32) -> bool {
        preview_steps(steps, self.previews).any(|s| s == step)
    }
}

/// The steps (1-based) after which previews are due when `previews` are asked for over `steps`
/// steps: evenly spaced, strictly before the last step (the final image is not a preview),
/// increasing and without repeats. Fewer than `previews` when there are too few steps.
pub fn preview_steps(steps: u32, previews: u32) -> impl Iterator<Item = u32> {
    let mut last = 0;
    (1..=previews).filter_map(move |k| {
        // Round-to-nearest of k·steps/(previews+1), in integers.
        let step = (2 * u64::from(k) * u64::from(steps) + u64::from(previews) + 1)
            / (2 * (u64::from(previews) + 1));
        let step = u32::try_from(step).unwrap_or(u32::MAX).max(1);
        (step > last && step < steps).then(|| {
            last = step;
            step
        })
    })
}

/// A group of compatible requests that run through the pipeline together.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// What every item shares.
    pub key: BatchKey,
    /// The items, in queue order; at least one.
    pub items: Vec<BatchItem>,
}

impl Batch {
    /// Total images this batch produces: `Σ items[i].n`.
    pub fn num_images(&self) -> usize {
        self.items.iter().map(|item| item.n as usize).sum()
    }

    /// Latent tokens of the whole batch in one transformer forward.
    pub fn latent_tokens(&self) -> usize {
        self.num_images() * self.key.latent_tokens_per_image()
    }
}

/// A decoded image, 8-bit RGB, row-major, no padding. Encoding (PNG, JPEG…) happens elsewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width·height·3` bytes.
    pub rgb8: Vec<u8>,
}

impl Image {
    /// Wraps raw pixels, checking the length matches the size.
    pub fn new(width: u32, height: u32, rgb8: Vec<u8>) -> Result<Self, BackendError> {
        let expected = width as usize * height as usize * 3;
        if rgb8.len() != expected {
            return Err(BackendError::Internal(format!(
                "image of {width}x{height} needs {expected} RGB bytes, got {}",
                rgb8.len()
            )));
        }
        Ok(Self {
            width,
            height,
            rgb8,
        })
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pixels would flood logs and test failures.
        f.debug_struct("Image")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("rgb8_len", &self.rgb8.len())
            .finish()
    }
}

/// A preview of one image while it is being denoised (decoded from the sampler's predicted
/// clean latent).
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// Index of the item in [`Batch::items`].
    pub item: usize,
    /// Index of the image within the item, `0..n`.
    pub image_index: u32,
    /// The preview; its size is the backend's choice (it may be smaller than the final image).
    pub image: Image,
}

/// Reported to the progress callback after each denoising step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done so far, `1..=steps`.
    pub step: u32,
    /// Steps the batch runs: its key's `steps`, or for an edit the last `steps −`
    /// [`edit_first_step`] of them.
    pub steps: u32,
    /// Previews due at this step (see [`BatchItem::wants_preview`]); usually empty.
    pub previews: Vec<Preview>,
}

/// The answer of the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on with the next step.
    Continue,
    /// Stop as soon as possible and return [`BackendError::Cancelled`].
    Stop,
}

/// Why a backend could not produce a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The input cannot be served by this model (e.g. an unsupported sampler or size); the
    /// client's fault, not the server's.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The progress callback asked to stop.
    #[error("generation cancelled")]
    Cancelled,
    /// The device ran out of memory for this batch. Not a device fault: the same batch fails the
    /// same way again, a smaller one may fit.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The model as loaded cannot run this batch: its config or weights disagree with the code
    /// (a shape or dtype mismatch, a missing tensor). Every such batch fails the same way.
    #[error("the model cannot run this batch: {0}")]
    Model(String),
    /// Anything else: device errors, loading failures.
    #[error("backend failure: {0}")]
    Internal(String),
}

/// A loaded model on one device. Runs on exactly one worker thread, so it need not be `Sync`.
pub trait Backend: Send {
    /// What the model is and accepts. Cheap; called at start-up and after a rebuild.
    fn info(&self) -> ModelInfo;

    /// A cheap liveness check of the device (no full generation).
    fn health(&self) -> Result<(), BackendError>;

    /// Generates every image of `batch`.
    ///
    /// Returns exactly `batch.num_images()` images, items in order and each item's images in
    /// order, each `key.width × key.height`. The images of an item must not depend on the other
    /// items. `progress` is called after every denoising step with the previews due at that step;
    /// when it answers [`Control::Stop`] the backend returns [`BackendError::Cancelled`] without
    /// running further steps.
    fn generate(
        &mut self,
        batch: &Batch,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Image>, BackendError>;

    /// Called by the worker once its queue has stayed empty for a moment (a second) after the
    /// warm-up or a batch: the moment to hand memory kept for the next batch back to the
    /// system, so that an idle server holds what it needs idle rather than its last batch's
    /// peak. Must not fail; the default does nothing.
    fn idle(&mut self) {}
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn info(&self) -> ModelInfo {
        (**self).info()
    }

    fn health(&self) -> Result<(), BackendError> {
        (**self).health()
    }

    fn generate(
        &mut self,
        batch: &Batch,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<Vec<Image>, BackendError> {
        (**self).generate(batch, progress)
    }

    fn idle(&mut self) {
        (**self).idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(width: u32, height: u32, cfg: bool) -> BatchKey {
        BatchKey {
            width,
            height,
            steps: 20,
            sampler: Sampler::DpmSolverMultistep,
            cfg,
            strength_permille: None,
            pag_layers: None,
            controlnet: None,
        }
    }

    #[test]
    fn latent_tokens_follow_dc_ae_f32_and_double_with_cfg() {
        assert_eq!(key(1024, 1024, false).latent_tokens_per_image(), 32 * 32);
        assert_eq!(key(1024, 1024, true).latent_tokens_per_image(), 2 * 32 * 32);
        assert_eq!(key(512, 1024, false).latent_tokens_per_image(), 16 * 32);
    }

    #[test]
    fn pag_adds_a_row_per_image() {
        let mut k = key(1024, 1024, true);
        k.pag_layers = Some(LayerSet::from_indices([8]).expect("a block"));
        assert_eq!(k.latent_tokens_per_image(), 3 * 32 * 32);
        k.cfg = false;
        assert_eq!(k.latent_tokens_per_image(), 2 * 32 * 32);
    }

    #[test]
    fn pag_layers_resolve_as_diffusers_matches_them() {
        let r = |n: u32, specs: &[&str]| {
            let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
            resolve_pag_layers(n, &specs).map(|set| set.indices().collect::<Vec<_>>())
        };
        assert_eq!(r(28, &["transformer_blocks.8"]), Ok(vec![8]));
        assert_eq!(r(28, &["14", "3", "3"]), Ok(vec![3, 14]));
        // diffusers searches the name as a regular expression: blocks.1 also hits 10–19.
        assert_eq!(
            r(28, &["transformer_blocks.1"]),
            Ok(vec![1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
        );
        assert_eq!(r(28, &[r"blocks\.1\."]), Ok(vec![1]));
        assert_eq!(r(20, &["blocks.(2|5)"]), Ok(vec![2, 5]));
        assert_eq!(r(4, &["attn1"]), Ok(vec![0, 1, 2, 3]));
        assert_eq!(r(60, &["59"]), Ok(vec![59]));
        for bad in [
            &["transformer_blocks.40"][..],
            &["28"],
            &["attn2"],
            &["("],
            &["-1"],
        ] {
            let err = r(28, bad).expect_err("selects nothing");
            assert!(err.contains('`'), "{err}");
        }
    }

    #[test]
    fn cfg_is_on_above_one() {
        assert!(!cfg_enabled(1.0));
        assert!(!cfg_enabled(0.0));
        assert!(cfg_enabled(1.01));
        assert!(cfg_enabled(4.5));
    }

    #[test]
    fn image_seeds_count_up_from_the_item_seed() {
        let item = BatchItem {
            prompt: "a cat".into(),
            negative_prompt: None,
            n: 3,
            seed: u64::MAX,
            guidance_scale: 4.5,
            previews: 0,
            edit: None,
            lora: Vec::new(),
            pag_scale: 0.0,
            pag_adaptive_scale: 0.0,
            control: None,
        };
        assert_eq!(item.image_seed(0), u64::MAX);
        assert_eq!(item.image_seed(1), 0, "seed derivation wraps");
        assert_eq!(item.image_seed(2), 1);
    }

    #[test]
    fn batch_counts_images_and_tokens() {
        let item = |n| BatchItem {
            prompt: "p".into(),
            negative_prompt: None,
            n,
            seed: 0,
            guidance_scale: 4.5,
            previews: 0,
            edit: None,
            lora: Vec::new(),
            pag_scale: 0.0,
            pag_adaptive_scale: 0.0,
            control: None,
        };
        let batch = Batch {
            key: key(512, 512, true),
            items: vec![item(1), item(3)],
        };
        assert_eq!(batch.num_images(), 4);
        assert_eq!(batch.latent_tokens(), 4 * 2 * 16 * 16);
    }

    #[test]
    fn preview_steps_are_spread_and_exclude_the_last_step() {
        assert_eq!(preview_steps(20, 0).count(), 0);
        assert_eq!(preview_steps(20, 1).collect::<Vec<_>>(), vec![10]);
        assert_eq!(preview_steps(20, 3).collect::<Vec<_>>(), vec![5, 10, 15]);
        assert_eq!(preview_steps(4, 3).collect::<Vec<_>>(), vec![1, 2, 3]);
        // Too few steps: fewer previews, never the final step, never step 0.
        assert_eq!(preview_steps(2, 3).collect::<Vec<_>>(), vec![1]);
        assert_eq!(preview_steps(1, 3).count(), 0);
    }

    #[test]
    fn sampler_names_round_trip() {
        for sampler in Sampler::ALL {
            assert_eq!(sampler.as_str().parse::<Sampler>(), Ok(sampler));
            let json = serde_json::to_string(&sampler).expect("a unit variant serializes");
            assert_eq!(json, format!("\"{}\"", sampler.as_str()));
        }
        assert!("euler".parse::<Sampler>().is_err());
    }
}
