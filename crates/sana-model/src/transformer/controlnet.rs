//! diffusers `SanaControlNetModel` (`diffusers/models/controlnets/controlnet_sana.py`): a copy of
//! the DiT's first blocks (7 in the released HED ControlNets) with its own patch, timestep and
//! caption embeddings, fed `patch_embed(x) + input_block(patch_embed(control latents))`; after each
//! block a zero-initialised linear projection (`controlnet_blocks.i`) gives a residual, times the
//! conditioning scale, that the transformer adds to the output of its block `i + 1`
//! ([`SanaTransformer2DModel::forward_controlled`]).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::BlockContext;
use super::{CaptionContext, LoraRows, SanaTransformer2DModel, SanaTransformerConfig};
use crate::nn::{linear, Linear};
use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};

/// diffusers' default block count of a `SanaControlNetModel` (its `num_layers`).
const DEFAULT_LAYERS: usize = 7;

/// A loaded `SanaControlNetModel`.
#[derive(Debug, Clone)]
pub struct SanaControlNetModel {
    /// Patch/timestep/caption embeddings and the blocks (no output layer).
    inner: SanaTransformer2DModel,
    input_block: Linear,
    controlnet_blocks: Vec<Linear>,
}

impl SanaControlNetModel {
    /// Builds the model from diffusers names (`patch_embed`, `time_embed`, `caption_projection`,
    /// `caption_norm`, `transformer_blocks.i`, `input_block`, `controlnet_blocks.i`).
    pub fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.guidance_embeds || cfg.qk_norm.is_some() {
            return Err(Error::Unsupported {
                field: "controlnet",
                value: "guidance_embeds / qk_norm".into(),
                reason: "a SanaControlNetModel has neither".into(),
            });
        }
        let d = cfg.inner_dim();
        let inner = SanaTransformer2DModel::build(cfg, vb.clone(), false)?;
        let controlnet_blocks = (0..cfg.num_layers)
            .map(|i| linear(d, d, vb.pp(format!("controlnet_blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            inner,
            input_block: linear(d, d, vb.pp("input_block"))?,
            controlnet_blocks,
        })
    }

    /// Loads a diffusers `SanaControlNetModel` folder: `config.json` (`_class_name`
    /// `SanaControlNetModel`) and `diffusion_pytorch_model[.<variant>].safetensors`.
    pub fn load(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = read_controlnet_config(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir, "diffusion_pytorch_model", variant)?;
        let model = Self::new(&cfg, ckpt.var_builder(dtype, device))?;
        ckpt.warn_unused("controlnet");
        Ok(model)
    }

    /// The config (as a transformer config: the keys are the same).
    pub fn config(&self) -> &SanaTransformerConfig {
        self.inner.config()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.inner.dtype()
    }

    /// Its caption work for `rows` rows of text (see [`SanaTransformer2DModel::prepare_caption_lengths`]).
    pub fn prepare_caption_lengths(
        &self,
        encoder_hidden_states: &Tensor,
        lengths: &[usize],
    ) -> Result<CaptionContext> {
        self.inner
            .prepare_caption_lengths(encoder_hidden_states, lengths)
    }

    /// The block residuals for the transformer (`controlnet_block_samples`), each `[B, N, D]` in
    /// the model dtype and multiplied by its row's conditioning scale (`scales`, `[B]` f32 on the
    /// device, or one number for every row).
    ///
    /// `hidden_states` `[B, C, H, W]`, `timestep` `[B]` as the transformer sees it,
    /// `control` the control latents `[B, C, H, W]` (the control image through the DC-AE encoder,
    /// times its scaling factor), `caption` from [`Self::prepare_caption_lengths`].
    pub fn residuals(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        control: &Tensor,
        caption: &CaptionContext,
        scales: &ConditioningScale,
    ) -> Result<Vec<Tensor>> {
        let _span = tracing::trace_span!("sana_controlnet").entered();
        let m = &self.inner;
        let rows = caption.tokens.len();
        let none = LoraRows::default();
        if control.dims() != hidden_states.dims() {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "control latents {:?} do not match the latents {:?}",
                control.dims(),
                hidden_states.dims()
            ))));
        }
        // 1. patch_embed(x) + input_block(patch_embed(control)) (position embedding in both).
        let (hs, (h, w)) = m.embed_patches(hidden_states, rows, &none)?;
        let (c, _) = m.embed_patches(control, rows, &none)?;
        let mut hs = (hs + self.input_block.forward(&c)?)?;
        // 2. Timestep embedding and the blocks, a residual after each.
        let (t6, _) = m.time_embed.forward(timestep, None, m.dtype, &none)?;
        let scale = match scales {
            ConditioningScale::All(_) => None,
            ConditioningScale::Rows(t) => Some(t.to_dtype(m.dtype)?.reshape((rows, 1, 1))?),
        };
        let mut out = Vec::with_capacity(m.blocks.len());
        for (i, ((block, items), proj)) in m
            .blocks
            .iter()
            .zip(&caption.blocks)
            .zip(&self.controlnet_blocks)
            .enumerate()
        {
            let ctx = BlockContext {
                block: i,
                lora: &none,
                perturbed_from: None,
            };
            hs = block.forward(&hs, items, &t6, (h, w), &ctx)?;
            let r = proj.forward(&hs)?;
            out.push(match (&scale, scales) {
                (Some(t), _) => r.broadcast_mul(t)?,
                (None, ConditioningScale::All(s)) => (r * f64::from(*s))?,
                (None, ConditioningScale::Rows(_)) => r,
            });
        }
        Ok(out)
    }
}

/// A ControlNet's conditioning scale: one for every row, or per row (`[B]` f32).
#[derive(Debug, Clone)]
pub enum ConditioningScale {
    All(f32),
    Rows(Tensor),
}

/// A ControlNet `config.json` as a transformer config (same keys), with the ControlNet's own
/// default depth (7) when `num_layers` is absent. Refuses a file whose `_class_name` is not
/// `SanaControlNetModel`.
pub fn read_controlnet_config(path: &Path) -> Result<SanaTransformerConfig> {
    let raw: serde_json::Value = read_config(path)?;
    match raw.get("_class_name").and_then(|v| v.as_str()) {
        Some("SanaControlNetModel") | None => {}
        Some(other) => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("`_class_name` is {other}, not SanaControlNetModel"),
            })
        }
    }
    let mut cfg: SanaTransformerConfig =
        serde_json::from_value(raw.clone()).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if raw.get("num_layers").is_none() {
        cfg.num_layers = DEFAULT_LAYERS;
    }
    cfg.validate()?;
    Ok(cfg)
}
