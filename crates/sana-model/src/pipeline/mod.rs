//! The Sana pipelines: prompts → text embeddings → sampling → decoding → RGB8 images, as diffusers'
//! `SanaPipeline` and `SanaSprintPipeline` (`diffusers/pipelines/sana/`) do it, from a folder in the
//! diffusers layout.
//!
//! Beyond diffusers: several prompts with their own image count, seed, guidance and negative prompt
//! in one batch (noise per image from its own seed, so an image does not depend on its batchmates),
//! a per-step callback with the predicted clean latents and cancellation, text tokens trimmed to
//! the longest prompt, the caption work done once per generation, and tiled decoding switched on
//! when an un-tiled decode would exceed a memory budget.

pub mod adapters;
pub mod control;
mod decode;
pub mod edit;
pub mod sampling;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::autoencoder::AutoencoderDC;
use crate::image::{bin_table, classify_height_width_bin};
use crate::scheduler::{ScheduleOptions, SchedulerConfig};
use crate::text_encoder::{PromptEmbeds, SanaTextEncoder};
use crate::transformer::controlnet::{ConditioningScale, SanaControlNetModel};
use crate::transformer::{LoraAdapter, SanaTransformer2DModel};
use crate::weights::read_config;
use crate::{Error, Result};
pub use adapters::{LoraChoice, PagDefaults};
use edit::{paste_unmasked, EditStart, InitImage};
use sampling::{
    denoise, denoise_sprint, seeded_noise, Control, Flow, PagGuidance, Sampling, StepInfo,
};

/// Which diffusers pipeline a folder holds (`model_index.json` `_class_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `SanaPipeline` and `SanaPAGPipeline`: flow sampling with CFG (and PAG).
    Sana,
    /// `SanaSprintPipeline`: few-step TrigFlow sampling with an embedded guidance.
    Sprint,
}

/// dtypes of the three models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub transformer: DType,
    pub text_encoder: DType,
    pub vae: DType,
}

impl Precision {
    /// The reference policy: f32 on CPU (candle's CPU convolutions have no bf16 path); on CUDA
    /// the transformer in bf16, or f16 for the fp16-trained Sana-1.0 checkpoints (those ship an
    /// `fp16` variant and no `bf16` one; bf16 degrades them), Gemma and the DC-AE in bf16 (never f16:
    /// their activations overflow it).
    pub fn default_for(device: &Device, transformer_dir: &Path) -> Self {
        if device.is_cpu() {
            return Self {
                transformer: DType::F32,
                text_encoder: DType::F32,
                vae: DType::F32,
            };
        }
        let has = |v: &str| {
            transformer_dir
                .join(format!("diffusion_pytorch_model.{v}.safetensors"))
                .is_file()
                || transformer_dir
                    .join(format!(
                        "diffusion_pytorch_model.safetensors.index.{v}.json"
                    ))
                    .is_file()
        };
        let transformer = if has("fp16") && !has("bf16") {
            DType::F16
        } else {
            DType::BF16
        };
        Self {
            transformer,
            text_encoder: DType::BF16,
            vae: DType::BF16,
        }
    }

    /// Refuses f16 for Gemma and the DC-AE (they overflow it); other choices are allowed.
    pub fn validate(&self) -> Result<()> {
        for (field, dtype) in [("text_encoder", self.text_encoder), ("vae", self.vae)] {
            if dtype == DType::F16 {
                return Err(Error::Unsupported {
                    field,
                    value: "f16".into(),
                    reason: "its activations overflow f16; use bf16 or f32".into(),
                });
            }
        }
        Ok(())
    }
}

/// How to load a pipeline folder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// `None`: [`Precision::default_for`].
    pub precision: Option<Precision>,
    /// Weight-file variant to prefer (`fp16`, `bf16`), per model where present.
    pub variant: Option<String>,
    /// Decode in tiles when an un-tiled decode would need more than this many bytes.
    pub decode_budget_bytes: usize,
    /// NVlabs checkpoints: prepend diffusers' default instruction instead of the YAML's
    /// `chi_prompt` (the two references differ: NVlabs' quotes "Enhanced prompt" in double
    /// quotes, and a YAML without one uses none).
    pub diffusers_instruction: bool,
}

impl LoadOptions {
    /// Defaults for a device: precision by policy, 4 GiB decode budget on CPU, 16 GiB on GPUs.
    pub fn new(device: Device) -> Self {
        let decode_budget_bytes = if device.is_cpu() { 4 << 30 } else { 16 << 30 };
        Self {
            device,
            precision: None,
            variant: None,
            decode_budget_bytes,
            diffusers_instruction: false,
        }
    }
}

/// One prompt of a request and its images.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemRequest {
    pub prompt: String,
    /// diffusers' default is the empty string.
    pub negative_prompt: String,
    /// Images for this prompt; image `j` uses seed `seed + j`.
    pub num_images: usize,
    pub seed: u64,
    pub guidance_scale: f32,
    /// Edits: the image to start from (at the request's size) and, for inpainting, its mask.
    /// Every item of an edit has one; a text-to-image request has none.
    pub init_image: Option<InitImage>,
    /// LoRA adapters for this prompt's images (names loaded with [`SanaPipeline::add_lora`]).
    pub lora: Vec<LoraChoice>,
    /// Perturbed-attention guidance scale (0 = off); needs [`GenerateRequest::pag_layers`].
    pub pag_scale: f32,
    /// PAG's adaptive scale: the scale at timestep `t` is `max(0, pag_scale − this·(1000 − t))`.
    pub pag_adaptive_scale: f32,
    /// ControlNet: this prompt's control image at the request's size (no mask); every prompt of
    /// a ControlNet generation has one.
    pub control_image: Option<InitImage>,
    /// ControlNet's conditioning scale (diffusers' `controlnet_conditioning_scale`); 1 when `None`.
    pub controlnet_scale: Option<f32>,
}

/// A generation: prompts that share a size and a step count.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub items: Vec<ItemRequest>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Generate at the model's nearest trained aspect ratio, then resize and crop back.
    pub use_resolution_binning: bool,
    pub max_sequence_length: usize,
    /// Prepend the complex human instruction to the positive prompts.
    pub complex_human_instruction: bool,
    /// The initial noise `[images, C, h/32, w/32]` replacing the seeded draw (parity tests,
    /// replays): text-to-image starts from it; an edit mixes it with the image latents.
    pub latents: Option<Tensor>,
    /// Edits: the share of the schedule that repaints the image, in (0, 1] (see [`edit`]).
    pub strength: Option<f64>,
    /// Custom schedule arguments (sigmas, timesteps, Sprint angles).
    pub schedule: ScheduleOptions,
    /// A sampler other than the folder's `scheduler/scheduler_config.json`.
    pub scheduler: Option<SchedulerConfig>,
    /// PAG: the transformer blocks whose self-attention the perturbed rows replace by the
    /// identity (see [`SanaPipeline::resolve_pag_layers`]); empty = no PAG.
    pub pag_layers: Vec<usize>,
    /// The ControlNet (a name from [`SanaPipeline::add_controlnet`]) the items' control images
    /// drive; may be left out when exactly one is loaded.
    pub controlnet: Option<String>,
}

impl GenerateRequest {
    /// One prompt with diffusers' defaults (1024², 20 steps, guidance 4.5, binning, instruction).
    pub fn new(prompt: &str) -> Self {
        Self {
            items: vec![ItemRequest {
                prompt: prompt.to_string(),
                negative_prompt: String::new(),
                num_images: 1,
                seed: 0,
                guidance_scale: 4.5,
                ..ItemRequest::default()
            }],
            width: 1024,
            height: 1024,
            steps: 20,
            use_resolution_binning: true,
            max_sequence_length: 300,
            complex_human_instruction: true,
            latents: None,
            strength: None,
            schedule: ScheduleOptions::default(),
            scheduler: None,
            pag_layers: Vec::new(),
            controlnet: None,
        }
    }
}

/// What a request that leaves them out gets: diffusers' call defaults unless the folder's optional
/// `sana_defaults.json` (a file of this project, e.g. in the embedded demo model) says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    pub steps: usize,
    pub guidance_scale: f32,
    /// Prepend the complex human instruction (models trained without it set `false`).
    pub complex_human_instruction: bool,
    /// Tokens kept per prompt (diffusers' `max_sequence_length`, NVlabs' `model_max_length`).
    #[serde(default = "default_max_sequence_length")]
    pub max_sequence_length: usize,
}

fn default_max_sequence_length() -> usize {
    300
}

impl GenerationDefaults {
    /// diffusers' defaults: 20 steps (2 for Sprint), guidance 4.5, the instruction on.
    pub fn for_kind(kind: PipelineKind) -> Self {
        Self {
            steps: match kind {
                PipelineKind::Sana => 20,
                PipelineKind::Sprint => 2,
            },
            guidance_scale: 4.5,
            complex_human_instruction: true,
            max_sequence_length: default_max_sequence_length(),
        }
    }

    /// `root/sana_defaults.json` when present (every key required, unknown keys refused), else
    /// [`GenerationDefaults::for_kind`].
    pub fn load(root: &Path, kind: PipelineKind) -> Result<Self> {
        let path = root.join("sana_defaults.json");
        if !path.exists() {
            return Ok(Self::for_kind(kind));
        }
        let defaults: Self = read_config(&path)?;
        if defaults.steps == 0
            || !(defaults.guidance_scale.is_finite())
            || defaults.max_sequence_length == 0
        {
            return Err(Error::Config {
                path,
                message: "`steps` and `max_sequence_length` must be at least 1 and \
                          `guidance_scale` finite"
                    .into(),
            });
        }
        Ok(defaults)
    }
}

/// A generated image, interleaved RGB8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: usize,
    pub height: usize,
    pub rgb8: Vec<u8>,
    /// The seed its noise came from.
    pub seed: u64,
}

/// Where a generation's time went (see [`SanaPipeline::generate_timed`]).
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// Prompt encoding (Gemma), positive and negative.
    pub encode: std::time::Duration,
    /// The caption context, once per generation: caption projection and norm, and every block's
    /// cross-attention keys and values (diffusers recomputes these inside every step).
    pub caption: std::time::Duration,
    /// Edits: the images through the autoencoder's encoder and the masks to the latent grid.
    pub image_encode: std::time::Duration,
    /// Each denoising step (transformer forward, guidance, sampler update).
    pub steps: Vec<std::time::Duration>,
    /// Decoding, resize back to the requested size, RGB8.
    pub decode: std::time::Duration,
}

/// What the per-step callback sees.
pub struct Progress<'a> {
    pub step: usize,
    pub steps: usize,
    /// Predicted clean latents `[images, C, h, w]` of this step (decode with
    /// [`SanaPipeline::decode_latents`] for a preview).
    pub predicted: Option<&'a Tensor>,
}

/// A loaded pipeline.
pub struct SanaPipeline {
    kind: PipelineKind,
    text_encoder: SanaTextEncoder,
    transformer: SanaTransformer2DModel,
    vae: AutoencoderDC,
    scheduler: SchedulerConfig,
    precision: Precision,
    device: Device,
    decode_budget_bytes: usize,
    defaults: GenerationDefaults,
    loras: Vec<Arc<LoraAdapter>>,
    pag_defaults: Option<PagDefaults>,
    controlnets: Vec<(String, Arc<SanaControlNetModel>)>,
}

impl SanaPipeline {
    /// Loads a folder in the diffusers layout (`model_index.json`, `scheduler/`, `text_encoder/`,
    /// `tokenizer/`, `transformer/`, `vae/`).
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Self> {
        let index: serde_json::Value = read_config(&root.join("model_index.json"))?;
        let class = index["_class_name"].as_str();
        let kind = match class {
            Some("SanaPipeline" | "SanaPAGPipeline" | "SanaControlNetPipeline") => {
                PipelineKind::Sana
            }
            Some("SanaSprintPipeline") => PipelineKind::Sprint,
            other => {
                return Err(Error::Unsupported {
                    field: "_class_name",
                    value: format!("{other:?}"),
                    reason: "model_index.json must name SanaPipeline or SanaSprintPipeline".into(),
                })
            }
        };
        let precision = opts
            .precision
            .unwrap_or_else(|| Precision::default_for(&opts.device, &root.join("transformer")));
        precision.validate()?;
        let variant = opts.variant.as_deref();
        let dev = &opts.device;
        let transformer = SanaTransformer2DModel::load(
            &root.join("transformer"),
            variant,
            precision.transformer,
            dev,
        )?;
        let vae = AutoencoderDC::load(&root.join("vae"), variant, precision.vae, dev)?;
        let text_encoder = SanaTextEncoder::load(
            &root.join("text_encoder"),
            &root.join("tokenizer"),
            precision.text_encoder,
            dev,
        )?;
        let scheduler = SchedulerConfig::from_file(root.join("scheduler/scheduler_config.json"))?;
        if kind == PipelineKind::Sprint && !matches!(scheduler, SchedulerConfig::SCMScheduler(_)) {
            return Err(Error::Unsupported {
                field: "scheduler",
                value: "not SCMScheduler".into(),
                reason: "SanaSprintPipeline samples with SCMScheduler".into(),
            });
        }
        let defaults = GenerationDefaults::load(root, kind)?;
        // SanaPAGPipeline's defaults: pag_scale 3.0 (call), transformer_blocks.0 (constructor;
        // not stored in model_index.json).
        let pag_defaults = (class == Some("SanaPAGPipeline"))
            .then(|| -> Result<PagDefaults> {
                Ok(PagDefaults {
                    scale: 3.0,
                    layers: adapters::resolve_pag_layers(
                        transformer.config().num_layers,
                        &["transformer_blocks.0".to_string()],
                    )?,
                })
            })
            .transpose()?;
        let mut pipe = Self {
            kind,
            text_encoder,
            transformer,
            vae,
            scheduler,
            precision,
            device: opts.device.clone(),
            decode_budget_bytes: opts.decode_budget_bytes,
            defaults,
            loras: Vec::new(),
            pag_defaults,
            controlnets: Vec::new(),
        };
        // A SanaControlNetPipeline folder's own ControlNet, under the name `controlnet`.
        if class == Some("SanaControlNetPipeline") {
            pipe.add_controlnet("controlnet", root)?;
        }
        Ok(pipe)
    }

    /// Loads an original NVlabs checkpoint: the transformer from `pth` with its training `yaml`
    /// (see [`crate::nvlabs`]), Gemma and its tokenizer from `text_encoder_dir` (a transformers
    /// folder such as `Efficient-Large-Model/gemma-2-2b-it`: `config.json`, weights and
    /// `tokenizer.json` side by side), the DC-AE from `vae_dir` (a diffusers `AutoencoderDC`
    /// folder), and, as NVlabs' inference does, the YAML's sampler, instruction (`chi_prompt`;
    /// none means plain prompts; `opts.diffusers_instruction` uses diffusers' default instead)
    /// and prompt length (`model_max_length`).
    /// Precision by default: f32 on CPU; on CUDA the transformer in the YAML's `mixed_precision`
    /// (f16 for fp16-trained models, bf16 for bf16 ones, f32 for fp32), Gemma in bf16 and the
    /// DC-AE in `vae.weight_dtype` (bf16 when unset).
    pub fn load_nvlabs(
        pth: &Path,
        yaml: &Path,
        text_encoder_dir: &Path,
        vae_dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let nv = crate::nvlabs::NvlabsConfig::read(yaml)?;
        let kind = if nv.model.cfg_embed {
            PipelineKind::Sprint
        } else {
            PipelineKind::Sana
        };
        let gpu_dtype = |field: &'static str, value: Option<&str>| match value {
            None | Some("bf16" | "bfloat16") => Ok(DType::BF16),
            Some("fp16" | "float16") => Ok(DType::F16),
            Some("fp32" | "float32") => Ok(DType::F32),
            Some(other) => Err(Error::Unsupported {
                field,
                value: other.to_string(),
                reason: "expected fp16, bf16 or fp32".into(),
            }),
        };
        let transformer_dtype =
            gpu_dtype("model.mixed_precision", nv.model.mixed_precision.as_deref())?;
        let vae_dtype = gpu_dtype("vae.weight_dtype", nv.vae.weight_dtype.as_deref())?;
        let precision = match opts.precision {
            Some(p) => p,
            None if opts.device.is_cpu() => Precision::default_for(&opts.device, Path::new("")),
            None => Precision {
                transformer: transformer_dtype,
                text_encoder: DType::BF16,
                vae: vae_dtype,
            },
        };
        precision.validate()?;
        let dev = &opts.device;
        let transformer = crate::nvlabs::load_transformer(pth, yaml, precision.transformer, dev)?;
        let vae = AutoencoderDC::load(vae_dir, opts.variant.as_deref(), precision.vae, dev)?;
        let text_encoder = SanaTextEncoder::load(
            text_encoder_dir,
            text_encoder_dir,
            precision.text_encoder,
            dev,
        )?;
        let instruction = if opts.diffusers_instruction {
            Some(
                crate::text_encoder::DEFAULT_COMPLEX_HUMAN_INSTRUCTION
                    .iter()
                    .map(|l| l.to_string())
                    .collect(),
            )
        } else {
            nv.instruction()
        };
        let lines: Option<Vec<&str>> = instruction
            .as_ref()
            .map(|l| l.iter().map(String::as_str).collect());
        let text_encoder = text_encoder.with_instruction(lines.as_deref());
        let (scheduler, steps) = nv.scheduler_config()?;
        let expected = transformer.config().in_channels;
        if vae.config().latent_channels != expected {
            return Err(Error::Unsupported {
                field: "vae.latent_channels",
                value: vae.config().latent_channels.to_string(),
                reason: format!(
                    "{} has {} latent channels, the transformer of {} expects {expected}",
                    vae_dir.display(),
                    vae.config().latent_channels,
                    pth.display()
                ),
            });
        }
        Ok(Self {
            kind,
            text_encoder,
            transformer,
            vae,
            scheduler,
            precision,
            device: opts.device.clone(),
            decode_budget_bytes: opts.decode_budget_bytes,
            defaults: GenerationDefaults {
                steps,
                guidance_scale: 4.5,
                complex_human_instruction: instruction.is_some(),
                max_sequence_length: nv.text_encoder.model_max_length,
            },
            loras: Vec::new(),
            // The YAML's PAG blocks for requests that ask for PAG without naming blocks; off
            // unless asked.
            pag_defaults: match (&nv.model.pag_applied_layers, kind) {
                (Some(layers), PipelineKind::Sana) if !layers.is_empty() => Some(PagDefaults {
                    scale: 0.0,
                    layers: layers.clone(),
                }),
                _ => None,
            },
            controlnets: Vec::new(),
        })
    }

    /// Assembles a pipeline from loaded parts (e.g. random-weight benchmarks of real configs).
    pub fn from_parts(
        kind: PipelineKind,
        text_encoder: SanaTextEncoder,
        transformer: SanaTransformer2DModel,
        vae: AutoencoderDC,
        scheduler: SchedulerConfig,
        opts: &LoadOptions,
    ) -> Self {
        let precision = Precision {
            transformer: transformer.dtype(),
            text_encoder: text_encoder.model().dtype(),
            vae: vae.dtype(),
        };
        Self {
            kind,
            text_encoder,
            transformer,
            vae,
            scheduler,
            precision,
            device: opts.device.clone(),
            decode_budget_bytes: opts.decode_budget_bytes,
            defaults: GenerationDefaults::for_kind(kind),
            loras: Vec::new(),
            pag_defaults: None,
            controlnets: Vec::new(),
        }
    }

    pub fn kind(&self) -> PipelineKind {
        self.kind
    }

    /// Steps, guidance and instruction for requests that leave them out.
    pub fn defaults(&self) -> GenerationDefaults {
        self.defaults
    }

    /// Replaces the defaults (e.g. a deployment's preset).
    pub fn set_defaults(&mut self, defaults: GenerationDefaults) {
        self.defaults = defaults;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn transformer(&self) -> &SanaTransformer2DModel {
        &self.transformer
    }

    pub fn text_encoder(&self) -> &SanaTextEncoder {
        &self.text_encoder
    }

    pub fn vae(&self) -> &AutoencoderDC {
        &self.vae
    }

    pub fn scheduler(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Pixels per latent cell along each axis (32 for the DC-AE f32c32).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().spatial_compression_ratio()
    }

    /// The size the model actually generates for a requested one (binning, if asked and the
    /// transformer's `sample_size` has a table).
    pub fn generation_size(&self, height: usize, width: usize, binning: bool) -> (usize, usize) {
        match bin_table(self.transformer.config().sample_size) {
            Some(table) if binning => {
                let (h, w) = classify_height_width_bin(height as u32, width as u32, table);
                (h as usize, w as usize)
            }
            _ => (height, width),
        }
    }

    /// Runs a request; `on_step` sees every step and may stop the generation (then `Ok(None)`).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> Flow,
    ) -> Result<Option<Vec<GeneratedImage>>> {
        self.generate_timed(req, on_step, None)
    }

    /// [`Self::generate`], also recording how long each stage took into `times` (the device is
    /// synchronised at each boundary, so GPU work is counted where it happens).
    pub fn generate_timed(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> Flow,
        mut times: Option<&mut StageTimes>,
    ) -> Result<Option<Vec<GeneratedImage>>> {
        let clock = |dev: &Device| -> Result<std::time::Instant> {
            dev.synchronize()?;
            Ok(std::time::Instant::now())
        };
        let mut mark = match times {
            Some(_) => Some(clock(&self.device)?),
            None => None,
        };
        let invalid = |field: &'static str, value: String, reason: String| Error::Unsupported {
            field,
            value,
            reason,
        };
        if req.items.is_empty() || req.items.iter().any(|i| i.num_images == 0) {
            return Err(invalid(
                "items",
                format!("{} items", req.items.len()),
                "need at least one prompt, each with at least one image".into(),
            ));
        }
        if req.steps == 0 {
            return Err(invalid(
                "steps",
                "0".into(),
                "need at least one step".into(),
            ));
        }
        let begin = self.check_edit(req)?;
        self.check_adapters(req)?;
        let controlnet = self.check_control(req)?;
        // 1. Size: binning, then the latent grid.
        let (height, width) =
            self.generation_size(req.height, req.width, req.use_resolution_binning);
        let multiple = self.vae_scale_factor() * self.transformer.config().patch_size;
        if height == 0 || width == 0 || height % multiple != 0 || width % multiple != 0 {
            return Err(invalid(
                "size",
                format!("{width}x{height}"),
                format!("width and height must be positive multiples of {multiple}"),
            ));
        }
        let f = self.vae_scale_factor();
        let (lh, lw) = (height / f, width / f);
        let channels = self.transformer.config().in_channels;
        // 2. One row per image: seeds, guidance, and the prompt rows to repeat.
        let mut seeds = Vec::new();
        let mut guidance = Vec::new();
        let mut rows = Vec::new();
        for (i, item) in req.items.iter().enumerate() {
            for j in 0..item.num_images {
                seeds.push(item.seed.wrapping_add(j as u64));
                guidance.push(item.guidance_scale);
                rows.push(i as u32);
            }
        }
        let images = seeds.len();
        let cfg = self.kind == PipelineKind::Sana && guidance.iter().any(|&g| g > 1.0);
        // PAG: one perturbed row per image when any prompt asks for it (a prompt at scale 0 adds
        // a zero term).
        let pag = (!req.pag_layers.is_empty() && req.items.iter().any(|i| i.pag_scale > 0.0)).then(
            || PagGuidance {
                scales: req
                    .items
                    .iter()
                    .flat_map(|i| std::iter::repeat_n(i.pag_scale, i.num_images))
                    .collect(),
                adaptive: req
                    .items
                    .iter()
                    .flat_map(|i| std::iter::repeat_n(i.pag_adaptive_scale, i.num_images))
                    .collect(),
            },
        );
        // 3. Text: each distinct prompt once, then one row per image ([negative; positive] for CFG).
        let prompts: Vec<&str> = req.items.iter().map(|i| i.prompt.as_str()).collect();
        let positive = self
            .text_encoder
            .encode(
                &prompts,
                req.complex_human_instruction,
                req.max_sequence_length,
            )?
            .select(&rows)?;
        let text = if cfg {
            let negatives: Vec<&str> = req
                .items
                .iter()
                .map(|i| i.negative_prompt.as_str())
                .collect();
            let negative = self
                .text_encoder
                .encode(&negatives, false, req.max_sequence_length)?
                .select(&rows)?;
            PromptEmbeds::cat(&negative, &positive)?
        } else {
            positive.clone()
        };
        // PAG's perturbed rows see the positive prompt.
        let text = if pag.is_some() {
            PromptEmbeds::cat(&text, &positive)?
        } else {
            text
        };
        if let (Some(t), Some(m)) = (times.as_deref_mut(), mark.as_mut()) {
            let now = clock(&self.device)?;
            t.encode = now - *m;
            *m = now;
        }
        let row_opts =
            self.row_options(req, cfg, pag.as_ref().map(|_| req.pag_layers.as_slice()))?;
        let caption =
            self.transformer
                .prepare_caption_rows(&text.embeds, &text.lengths, row_opts)?;
        if let (Some(t), Some(m)) = (times.as_deref_mut(), mark.as_mut()) {
            let now = clock(&self.device)?;
            t.caption = now - *m;
            *m = now;
        }
        // 4. Initial latents: given, or each image's own seeded noise.
        let latents = match &req.latents {
            Some(l) => {
                if l.dims() != [images, channels, lh, lw] {
                    return Err(invalid(
                        "latents",
                        format!("{:?}", l.dims()),
                        format!("expected [{images}, {channels}, {lh}, {lw}]"),
                    ));
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => seeded_noise(&seeds, (channels, lh, lw), 0, &self.device)?,
        };
        // 5. Edits: the images encoded (one row per image) and their masks on the latent grid.
        let edit_inputs = match begin {
            Some(begin) => Some((begin, self.edit_latents(req, (width, height), &rows)?)),
            None => None,
        };
        // ControlNet: the control latents (for CFG's negative rows too), its caption work and
        // scales, once per generation. It runs on the rows before PAG's perturbed ones, whose
        // residuals are the positive rows'.
        let control_inputs = match &controlnet {
            None => None,
            Some(model) => {
                let latents = self.control_latents(req, (width, height), &rows)?;
                let groups = 1 + usize::from(cfg);
                let latents = if cfg {
                    Tensor::cat(&[&latents, &latents], 0)?
                } else {
                    latents
                };
                let f = images * groups;
                let caption = model
                    .prepare_caption_lengths(&text.embeds.narrow(0, 0, f)?, &text.lengths[..f])?;
                let per_image: Vec<f32> = req
                    .items
                    .iter()
                    .flat_map(|i| {
                        std::iter::repeat_n(i.controlnet_scale.unwrap_or(1.0), i.num_images)
                    })
                    .collect();
                let scale = if per_image.iter().all(|&s| s == per_image[0]) {
                    ConditioningScale::All(per_image[0])
                } else {
                    ConditioningScale::Rows(Tensor::from_vec(
                        per_image.repeat(groups),
                        f,
                        &self.device,
                    )?)
                };
                Some((model.clone(), caption, latents, scale))
            }
        };
        if let (Some(t), Some(m)) = (times.as_deref_mut(), mark.as_mut()) {
            let now = clock(&self.device)?;
            t.image_encode = now - *m;
            *m = now;
        }
        // 6. Sample.
        let sampling = Sampling {
            scheduler: req.scheduler.as_ref().unwrap_or(&self.scheduler),
            steps: req.steps,
            schedule: req.schedule.clone(),
            guidance: &guidance,
            cfg,
            control: control_inputs
                .as_ref()
                .map(|(model, caption, latents, scale)| Control {
                    model,
                    caption,
                    latents,
                    scale: scale.clone(),
                }),
            pag,
            edit: edit_inputs
                .as_ref()
                .map(|(begin, (latents, mask))| EditStart {
                    image_latents: latents,
                    mask: mask.as_ref(),
                    begin: *begin,
                    pure_noise: req.strength.is_some_and(|s| s >= 1.0),
                }),
        };
        let device = self.device.clone();
        let mut noise =
            |step: usize| seeded_noise(&seeds, (channels, lh, lw), 1 + step as u64, &device);
        let mut step_times = Vec::with_capacity(req.steps);
        let mut report = |info: StepInfo| {
            if let Some(m) = mark.as_mut() {
                if let Ok(now) = clock(&device) {
                    step_times.push(now - *m);
                    *m = now;
                }
            }
            on_step(Progress {
                step: info.step,
                steps: info.steps,
                predicted: info.predicted,
            })
        };
        let latents = match self.kind {
            PipelineKind::Sana => denoise(
                &self.transformer,
                &caption,
                latents,
                &sampling,
                &mut noise,
                &mut report,
            )?,
            PipelineKind::Sprint => denoise_sprint(
                &self.transformer,
                &caption,
                latents,
                &sampling,
                self.precision.text_encoder,
                &mut noise,
                &mut report,
            )?,
        };
        let Some(latents) = latents else {
            return Ok(None);
        };
        // 6. Decode, resize back to the requested size, RGB8.
        let mut pixels = self.decode_to_rgb8(&latents, req.height, req.width)?;
        let inits = req
            .items
            .iter()
            .flat_map(|item| std::iter::repeat_n(item.init_image.as_ref(), item.num_images));
        for (rgb8, init) in pixels.iter_mut().zip(inits) {
            if let Some(init) = init.filter(|i| i.mask.is_some() && i.preserve_unmasked) {
                paste_unmasked(rgb8, init);
            }
        }
        if let (Some(t), Some(m)) = (times, mark) {
            t.steps = step_times;
            t.decode = clock(&self.device)? - m;
        }
        Ok(Some(
            pixels
                .into_iter()
                .zip(seeds)
                .map(|(rgb8, seed)| GeneratedImage {
                    width: req.width,
                    height: req.height,
                    rgb8,
                    seed,
                })
                .collect(),
        ))
    }
}
