//! The Linear DiT: diffusers `SanaTransformer2DModel`
//! (`diffusers/models/transformers/sana_transformer.py`, attention processors
//! `SanaLinearAttnProcessor2_0` and `SanaAttnProcessor2_0`).
//!
//! ReLU linear self-attention (sums in f32), softmax cross-attention over the projected caption
//! (f32 logits), a Mix-FFN with a 3×3 depthwise conv ([`crate::ops::depthwise_conv2d`]) and
//! adaLN-single modulation. Optional parts, driven by `config.json`: 2-D sin-cos position embedding
//! (`interpolation_scale`, 2K/4K), RMS q/k norms across heads (`qk_norm`, SANA-1.5 and Sprint) and a
//! guidance embedding (`guidance_embeds`, Sprint). Tokens are row-major: token `n` is `(n / W, n % W)`.

//!
//! Files: `config` (the `config.json` keys), `embeddings` (timestep/guidance and position), `blocks`
//! (norms, attention, Mix-FFN, the transformer block) and this file (the model and its caption
//! context).

mod blocks;
mod config;
pub mod controlnet;
mod embeddings;
pub mod lora;

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::SanaTransformerConfig;
pub use embeddings::sincos_pos_embed;

use crate::nn::{linear, Linear};
use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};
use blocks::{layer_norm_no_affine, BlockContext, ItemCaption, RmsNorm, SanaTransformerBlock};
use embeddings::TimeEmbed;
use lora::site;
pub use lora::{LoraAdapter, LoraRows};

/// Which caption tokens an item attends to.
#[derive(Debug, Clone)]
enum Kept {
    /// The first n (right padding); 0 = none unmasked.
    Prefix(usize),
    /// These positions.
    Tokens(Vec<u32>),
}

impl Kept {
    fn is_empty(&self) -> bool {
        match self {
            Self::Prefix(n) => *n == 0,
            Self::Tokens(t) => t.is_empty(),
        }
    }
}

/// The text-dependent part of a forward (see [`SanaTransformer2DModel::prepare_caption`]), and
/// what else is fixed per row for a whole generation: adapters and PAG's perturbed rows.
#[derive(Debug, Clone)]
pub struct CaptionContext {
    /// `[block][item]`.
    blocks: Vec<Vec<ItemCaption>>,
    /// Tokens each item attends to.
    tokens: Vec<usize>,
    lora: LoraRows,
    perturbed: Option<Perturbed>,
}

/// Perturbed-attention guidance: the rows from `first_row` on are the perturbed copies, whose
/// self-attention in `blocks` is the identity (diffusers' PAG processors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perturbed {
    pub first_row: usize,
    /// Block indices, each `< num_layers`.
    pub blocks: Vec<usize>,
    /// `Some(s)`: the caller guarantees that the perturbed rows are copies of rows `s..` (the
    /// same latents, text, timestep, guidance and adapter scales), so they are computed only from
    /// the first perturbed block on.
    pub copy_of: Option<usize>,
}

/// Per-row settings of a generation's forwards (see [`SanaTransformer2DModel::prepare_caption_rows`]).
#[derive(Debug, Clone, Default)]
pub struct RowOptions {
    /// LoRA adapters and their scales per row.
    pub lora: LoraRows,
    /// PAG's perturbed rows, if any.
    pub perturbed: Option<Perturbed>,
}

impl CaptionContext {
    /// How many text tokens each item attends to (its unmasked tokens).
    pub fn tokens(&self) -> &[usize] {
        &self.tokens
    }
}

/// Inputs of one transformer forward.
#[derive(Debug, Clone, Copy)]
pub struct TransformerInput<'a> {
    /// Latents `[B, C, H, W]` (H, W multiples of the patch size).
    pub hidden_states: &'a Tensor,
    /// Text-encoder states `[B, L, caption_channels]`.
    pub encoder_hidden_states: &'a Tensor,
    /// `[B, L]`, 1 = keep, 0 = padding (any float or int dtype); `None` attends to every token.
    pub encoder_attention_mask: Option<&'a Tensor>,
    /// `[B]` timesteps as the model sees them (already multiplied by `timestep_scale`).
    pub timestep: &'a Tensor,
    /// `[B]` guidance values for guidance-embedding (Sprint) models, else `None`.
    pub guidance: Option<&'a Tensor>,
}

/// diffusers `SanaTransformer2DModel`: predicts the flow velocity for latents.
#[derive(Debug, Clone)]
pub struct SanaTransformer2DModel {
    cfg: SanaTransformerConfig,
    patch_w: Tensor, // [D, C·p·p]
    patch_b: Tensor, // [D]
    time_embed: TimeEmbed,
    caption_1: Linear,
    caption_2: Linear,
    /// `None` for NVlabs models trained without it (`y_norm: false`).
    caption_norm: Option<RmsNorm>,
    blocks: Vec<SanaTransformerBlock>,
    /// The output layer: `scale_shift_table` `[2, D]` and `proj_out`; `None` in a ControlNet,
    /// which has none.
    head: Option<(Tensor, Linear)>,
    dtype: DType,
    /// Position embeddings (2K/4K models) on the device by token grid `(h, w)`, computed on the
    /// host once per grid size rather than in every forward (up to 147 MB at 4K); the last few
    /// sizes are kept. Clones share it.
    pos_embed: Arc<Mutex<Vec<PosEmbedEntry>>>,
}

/// A cached position embedding: the token grid `(h, w)` and its `[1, h·w, D]` f32 tensor.
type PosEmbedEntry = ((usize, usize), Tensor);

/// Grid sizes whose position embedding [`SanaTransformer2DModel`] keeps on the device.
const POS_EMBED_CACHE: usize = 2;

impl SanaTransformer2DModel {
    /// Builds the model from a `VarBuilder` whose keys are the diffusers names.
    pub fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb, true)
    }

    /// The model, with its output layer when `head` (a ControlNet's copy has none).
    fn build(cfg: &SanaTransformerConfig, vb: VarBuilder, head: bool) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        let pe = vb.pp("patch_embed.proj");
        let blocks = (0..cfg.num_layers)
            .map(|i| SanaTransformerBlock::new(cfg, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            patch_w: pe
                .get((d, cfg.in_channels, p, p), "weight")?
                .reshape((d, cfg.in_channels * p * p))?,
            patch_b: pe.get(d, "bias")?,
            time_embed: TimeEmbed::new(cfg, vb.pp("time_embed"))?,
            caption_1: linear(
                cfg.caption_channels,
                d,
                vb.pp("caption_projection.linear_1"),
            )?,
            caption_2: linear(d, d, vb.pp("caption_projection.linear_2"))?,
            caption_norm: cfg
                .caption_norm
                .then(|| RmsNorm::new(d, 1e-5, vb.pp("caption_norm")))
                .transpose()?,
            blocks,
            head: if head {
                Some((
                    vb.get((2, d), "scale_shift_table")?,
                    linear(d, p * p * cfg.out_channels(), vb.pp("proj_out"))?,
                ))
            } else {
                None
            },
            dtype: vb.dtype(),
            cfg: cfg.clone(),
            pos_embed: Arc::default(),
        })
    }

    /// Loads `config.json` and the weights of a diffusers `transformer/` folder.
    ///
    /// `variant` (e.g. `"bf16"`) prefers `diffusion_pytorch_model.<variant>.safetensors` when present.
    pub fn load(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: SanaTransformerConfig = read_config(&dir.join("config.json"))?;
        cfg.validate()?;
        let ckpt = Checkpoint::open_dir(dir, "diffusion_pytorch_model", variant)?;
        let model = Self::new(&cfg, ckpt.var_builder(dtype, device))?;
        ckpt.warn_unused("transformer");
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &SanaTransformerConfig {
        &self.cfg
    }

    /// The dtype the weights were loaded in (activations run in it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One forward pass → velocity `[B, out_channels, H, W]` in the model dtype.
    ///
    /// Equals [`Self::prepare_caption`] followed by [`Self::forward_with_caption`]; a sampling loop
    /// should call those two instead, so the caption work is done once per generation.
    pub fn forward(&self, input: &TransformerInput) -> Result<Tensor> {
        let caption =
            self.prepare_caption(input.encoder_hidden_states, input.encoder_attention_mask)?;
        self.forward_with_caption(
            input.hidden_states,
            input.timestep,
            input.guidance,
            &caption,
        )
    }

    /// Everything of a forward that depends only on the text: the caption projection and norm
    /// and each block's cross-attention keys and values, per item over its unmasked tokens only.
    ///
    /// `encoder_hidden_states`: `[B, L, caption_channels]`; `mask`: `[B, L]`, 1 = keep, 0 = padding.
    /// Dropping masked tokens is exact (a masked key has weight e^−10000 = 0 next to any unmasked
    /// one), makes a short prompt pay for its own length rather than the padded one, and makes an
    /// item's result independent of its batchmates. An item with no unmasked token keeps every
    /// position under the mask bias, as diffusers computes it.
    ///
    /// Reading the mask is a device → host copy; callers that know their prompts' lengths (the
    /// pipelines) use [`Self::prepare_caption_lengths`], which reads nothing back.
    pub fn prepare_caption(
        &self,
        encoder_hidden_states: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<CaptionContext> {
        let (b, l, _) = encoder_hidden_states.dims3()?;
        let kept: Vec<Kept> = match mask {
            Some(m) if m.dims() != [b, l] => {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "encoder_attention_mask {:?} does not fit encoder_hidden_states {:?}",
                    m.dims(),
                    encoder_hidden_states.dims()
                ))))
            }
            Some(m) => m
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(|row| {
                    let keep: Vec<u32> = (0..l as u32).filter(|&j| row[j as usize] > 0.0).collect();
                    if keep.iter().enumerate().all(|(i, &j)| i as u32 == j) {
                        Kept::Prefix(keep.len())
                    } else {
                        Kept::Tokens(keep)
                    }
                })
                .collect(),
            None => vec![Kept::Prefix(l); b],
        };
        self.caption_context(encoder_hidden_states, &kept, &LoraRows::default())
    }

    /// [`Self::prepare_caption`] for right-padded text: item `i` keeps its first `lengths[i]`
    /// tokens (a length of 0 keeps every position under the mask bias, as diffusers does for an
    /// all-padding row). Nothing is read back from the device.
    pub fn prepare_caption_lengths(
        &self,
        encoder_hidden_states: &Tensor,
        lengths: &[usize],
    ) -> Result<CaptionContext> {
        self.prepare_caption_rows(encoder_hidden_states, lengths, RowOptions::default())
    }

    /// [`Self::prepare_caption_lengths`] with adapters and PAG rows (`opts`) for the rows of
    /// `encoder_hidden_states`; the forwards of [`Self::forward_with_caption`] then apply them.
    pub fn prepare_caption_rows(
        &self,
        encoder_hidden_states: &Tensor,
        lengths: &[usize],
        opts: RowOptions,
    ) -> Result<CaptionContext> {
        let (b, l, _) = encoder_hidden_states.dims3()?;
        if lengths.len() != b || lengths.iter().any(|&n| n > l) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "caption lengths {lengths:?} do not fit encoder_hidden_states {:?}",
                encoder_hidden_states.dims()
            ))));
        }
        opts.lora.check_rows(b)?;
        if let Some(p) = &opts.perturbed {
            if p.first_row == 0 || p.first_row > b {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "PAG's perturbed rows start at {} of {b} rows",
                    p.first_row
                ))));
            }
            if p.copy_of
                .is_some_and(|s| s + (b - p.first_row) > p.first_row)
            {
                return Err(Error::Candle(candle_core::Error::Msg(format!(
                    "PAG's perturbed rows {}.. must copy rows before them, not from {:?}",
                    p.first_row, p.copy_of
                ))));
            }
            if let Some(&bad) = p.blocks.iter().find(|&&i| i >= self.blocks.len()) {
                return Err(Error::Unsupported {
                    field: "pag_applied_layers",
                    value: bad.to_string(),
                    reason: format!("the transformer has {} blocks", self.blocks.len()),
                });
            }
        }
        let kept: Vec<Kept> = lengths.iter().map(|&n| Kept::Prefix(n)).collect();
        let mut ctx = self.caption_context(encoder_hidden_states, &kept, &opts.lora)?;
        ctx.lora = opts.lora;
        ctx.perturbed = opts.perturbed;
        Ok(ctx)
    }

    /// Loads LoRA adapter `name` from `path` (see [`lora`]) for this model, on its device and in
    /// its dtype.
    pub fn load_lora(&self, name: &str, path: &Path) -> Result<LoraAdapter> {
        LoraAdapter::load(name, path, &self.cfg, self.dtype, self.patch_w.device())
    }

    fn caption_context(
        &self,
        encoder_hidden_states: &Tensor,
        kept: &[Kept],
        lora: &LoraRows,
    ) -> Result<CaptionContext> {
        let _span = tracing::trace_span!("sana_caption").entered();
        let (b, l, _) = encoder_hidden_states.dims3()?;
        let device = encoder_hidden_states.device();
        let mut blocks: Vec<Vec<ItemCaption>> = vec![Vec::with_capacity(b); self.blocks.len()];
        let mut tokens = Vec::with_capacity(b);
        for (i, keep) in kept.iter().enumerate() {
            let item = encoder_hidden_states.narrow(0, i, 1)?;
            // [1, L_i, caption_channels]: the kept tokens (a prefix is a view, no index upload).
            let (y, bias) = match keep {
                _ if keep.is_empty() => {
                    // Every position, each biased by (1 − 0)·(−10000) in the model dtype.
                    let bias = (Tensor::ones((1, 1, 1, l), self.dtype, device)? * -10000.0)?
                        .to_dtype(DType::F32)?;
                    tokens.push(l);
                    (item, Some(bias))
                }
                Kept::Prefix(n) => {
                    tokens.push(*n);
                    (item.narrow(1, 0, *n)?, None)
                }
                Kept::Tokens(idx) => {
                    tokens.push(idx.len());
                    let idx = Tensor::new(idx.as_slice(), device)?;
                    (item.index_select(&idx, 1)?, None)
                }
            };
            // Projection and norm → [1, L_i, D].
            let y = y.to_dtype(self.dtype)?;
            let y = lora
                .apply_row(site::CAPTION_1, i, &y, self.caption_1.forward(&y)?)?
                .apply(&crate::ops::gelu_tanh)?;
            let y = lora.apply_row(site::CAPTION_2, i, &y, self.caption_2.forward(&y)?)?;
            let y = match &self.caption_norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            };
            for (j, (blk, out)) in self.blocks.iter().zip(blocks.iter_mut()).enumerate() {
                let (k, v) = blk.attn2.caption_kv(&y, lora, j, i)?;
                out.push(ItemCaption {
                    k,
                    v,
                    bias: bias.clone(),
                });
            }
        }
        Ok(CaptionContext {
            blocks,
            tokens,
            lora: LoraRows::default(),
            perturbed: None,
        })
    }

    /// The `[1, h·w, D]` f32 position embedding of a token grid, from the cache or made once.
    fn position_embedding(
        &self,
        h: usize,
        w: usize,
        scale: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let mut cache = self
            .pos_embed
            .lock()
            .expect("position-embedding cache poisoned; this is a bug");
        if let Some(i) = cache.iter().position(|(k, _)| *k == (h, w)) {
            let entry = cache.remove(i);
            let pe = entry.1.clone();
            cache.push(entry);
            return Ok(pe);
        }
        let d = self.cfg.inner_dim();
        let base = self.cfg.sample_size / self.cfg.patch_size;
        let pe = Tensor::from_vec(
            sincos_pos_embed(d, h, w, base, scale),
            (1, h * w, d),
            device,
        )?;
        if cache.len() == POS_EMBED_CACHE {
            cache.remove(0);
        }
        cache.push(((h, w), pe.clone()));
        Ok(pe)
    }

    /// Steps 1–2 of a forward: latents `[B, C, H, W]` (B = `rows`) → tokens `[B, N, D]` with the
    /// position embedding of 2K/4K models (added in f32, cast back), and the token grid.
    fn embed_patches(
        &self,
        latents: &Tensor,
        rows: usize,
        lora: &LoraRows,
    ) -> Result<(Tensor, (usize, usize))> {
        let x = latents.to_dtype(self.dtype)?;
        let (b, c, hh, ww) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || hh % p != 0 || ww % p != 0 || b != rows {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "latents {:?} do not fit the model: want [{rows}, {}, H, W] with H and W multiples of {p}",
                x.dims(),
                self.cfg.in_channels
            ))));
        }
        let (h, w) = (hh / p, ww / p);
        let n = h * w;
        // 1. Patch embed: [B, C, h·p, w·p] → [B, h, w, C, p, p] → [B, N, C·p·p] → [B, N, D].
        let patches = x
            .reshape((b, c, h, p, w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, n, c * p * p))?;
        let mut hs = lora.apply(
            site::PATCH_EMBED,
            &patches,
            crate::ops::matmul_nt(&patches.reshape((b * n, c * p * p))?, &self.patch_w)?
                .reshape((b, n, ()))?
                .broadcast_add(&self.patch_b)?,
        )?;
        // 2. Position embedding (2K/4K models), added in f32 then cast back.
        if let Some(scale) = self.cfg.interpolation_scale {
            let pe = self.position_embedding(h, w, scale, x.device())?;
            hs = hs
                .to_dtype(DType::F32)?
                .broadcast_add(&pe)?
                .to_dtype(self.dtype)?;
        }
        Ok((hs, (h, w)))
    }

    /// A forward pass with the caption work already done → velocity `[B, out_channels, H, W]`.
    ///
    /// `hidden_states` `[B, C, H, W]`, `timestep` `[B]` (× `timestep_scale` already), `guidance`
    /// `[B]` for guidance-embedding models; `caption` from [`Self::prepare_caption`] for the same B.
    pub fn forward_with_caption(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        caption: &CaptionContext,
    ) -> Result<Tensor> {
        self.forward_controlled(hidden_states, timestep, guidance, caption, &[])
    }

    /// [`Self::forward_with_caption`] with a ControlNet's block residuals
    /// ([`controlnet::SanaControlNetModel::residuals`]): residual `i` is added to the output of
    /// block `i + 1`, as diffusers' `controlnet_block_samples` are.
    pub fn forward_controlled(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        caption: &CaptionContext,
        residuals: &[Tensor],
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("sana_transformer").entered();
        let Some((scale_shift_table, proj_out)) = &self.head else {
            return Err(Error::Candle(candle_core::Error::Msg(
                "a ControlNet's transformer copy has no output layer".into(),
            )));
        };
        if residuals.len() >= self.blocks.len() {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "{} ControlNet residuals for a transformer of {} blocks",
                residuals.len(),
                self.blocks.len()
            ))));
        }
        let lora = &caption.lora;
        let (mut hs, (h, w)) = self.embed_patches(hidden_states, caption.tokens.len(), lora)?;
        let (b, hh, ww) = (hs.dim(0)?, h * self.cfg.patch_size, w * self.cfg.patch_size);
        let p = self.cfg.patch_size;
        // 3. Timestep (and guidance) embedding.
        let (t6, embedded) = self
            .time_embed
            .forward(timestep, guidance, self.dtype, lora)?;
        // 4. Blocks. PAG's perturbed rows that copy earlier rows (same latents, text, timestep and
        //    adapters) equal them up to the first perturbed block, so they join there as copies
        //    instead of being computed twice.
        let join = caption.perturbed.as_ref().and_then(|p| {
            let first_block = p.blocks.iter().copied().min()?;
            p.copy_of.map(|src| (p.first_row, src, first_block))
        });
        let rows = hs.dim(0)?;
        if let Some((first_row, _, _)) = join {
            hs = hs.narrow(0, 0, first_row)?;
        }
        for (i, (block, items)) in self.blocks.iter().zip(&caption.blocks).enumerate() {
            if let Some((first_row, src, first_block)) = join {
                if i == first_block {
                    let copies = hs.narrow(0, src, rows - first_row)?;
                    hs = Tensor::cat(&[&hs, &copies], 0)?;
                }
            }
            let live = hs.dim(0)?;
            let (items, t6) = (&items[..live], t6.narrow(0, 0, live)?);
            let ctx = BlockContext {
                block: i,
                lora,
                perturbed_from: caption
                    .perturbed
                    .as_ref()
                    .filter(|p| p.blocks.contains(&i))
                    .map(|p| p.first_row),
            };
            hs = block.forward(&hs, items, &t6, (h, w), &ctx)?;
            if i >= 1 {
                if let Some(r) = residuals.get(i - 1) {
                    hs = (hs + r.narrow(0, 0, live)?.to_dtype(self.dtype)?)?;
                }
            }
        }
        // 5. Final layer: shift first, then scale, from the un-projected timestep embedding.
        let m = scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&embedded.unsqueeze(1)?)?; // [B, 2, D]
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        let hs = layer_norm_no_affine(&hs, 1e-6)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        // 6. Project and unpatchify: [B, N, p·p·C] → [B, h, w, p, p, C] → [B, C, h, p, w, p].
        let out = lora.apply(site::PROJ_OUT, &hs, proj_out.forward(&hs)?)?;
        let co = self.cfg.out_channels();
        Ok(out
            .reshape((b, h, w, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, co, hh, ww))?)
    }
}
