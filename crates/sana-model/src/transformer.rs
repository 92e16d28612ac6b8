//! The Linear DiT: diffusers `SanaTransformer2DModel`
//! (`diffusers/models/transformers/sana_transformer.py`, attention processors
//! `SanaLinearAttnProcessor2_0` and `SanaAttnProcessor2_0`).
//!
//! ReLU linear self-attention (sums in f32), softmax cross-attention over the projected caption
//! (f32 logits), a Mix-FFN with a 3×3 depthwise conv ([`crate::ops::depthwise_conv2d`]) and
//! adaLN-single modulation. Optional parts, driven by `config.json`: 2-D sin-cos position embedding
//! (`interpolation_scale`, 2K/4K), RMS q/k norms across heads (`qk_norm`, SANA-1.5 and Sprint) and a
//! guidance embedding (`guidance_embeds`, Sprint). Tokens are row-major: token `n` is `(n / W, n % W)`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{linear, linear_no_bias, GluConvWeights, Linear};
use serde::Deserialize;

use crate::ops::{glu_depthwise_conv2d_nhwc, linear_attention};
use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};

fn default_in_channels() -> usize {
    32
}
fn default_heads() -> usize {
    70
}
fn default_head_dim() -> usize {
    32
}
fn default_layers() -> usize {
    20
}
fn default_cross_heads() -> Option<usize> {
    Some(20)
}
fn default_cross_head_dim() -> Option<usize> {
    Some(112)
}
fn default_cross_dim() -> Option<usize> {
    Some(2240)
}
fn default_caption_channels() -> usize {
    2304
}
fn default_mlp_ratio() -> f64 {
    2.5
}
fn default_sample_size() -> usize {
    32
}
fn default_patch_size() -> usize {
    1
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn default_guidance_scale() -> f64 {
    0.1
}
fn default_one() -> f64 {
    1.0
}

/// `transformer/config.json`. Field names are the diffusers keys; defaults are diffusers'
/// constructor defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SanaTransformerConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "out_channels_default")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_cross_heads")]
    pub num_cross_attention_heads: Option<usize>,
    #[serde(default = "default_cross_head_dim")]
    pub cross_attention_head_dim: Option<usize>,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_caption_channels")]
    pub caption_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// `None` (or absent) ⇒ no position embedding; a number ⇒ 2-D sin-cos embedding.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Not used inside the model: the Sprint pipeline multiplies the guidance by it.
    #[serde(default = "default_guidance_scale")]
    pub guidance_embeds_scale: f64,
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// Not used inside the model: `SanaPipeline` multiplies timesteps by it.
    #[serde(default = "default_one")]
    pub timestep_scale: f64,
}

fn out_channels_default() -> Option<usize> {
    Some(32)
}

impl SanaTransformerConfig {
    /// Inner width D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels or in_channels`, as diffusers).
    pub fn out_channels(&self) -> usize {
        match self.out_channels {
            Some(0) | None => self.in_channels,
            Some(c) => c,
        }
    }

    /// Mix-FFN hidden width, `int(mlp_ratio · D)` as Python truncates it.
    pub fn ffn_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }

    fn cross(&self) -> (usize, usize) {
        // Validated to be Some in `validate`.
        (
            self.num_cross_attention_heads.unwrap_or(0),
            self.cross_attention_head_dim.unwrap_or(0),
        )
    }

    /// Refuses configs this implementation cannot serve, naming the field.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |field: &'static str, value: String, reason: &str| {
            Err(Error::Unsupported {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        let d = self.inner_dim();
        if d == 0 {
            return unsupported(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "the model width num_attention_heads × attention_head_dim must be positive",
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(other) => {
                return unsupported(
                    "qk_norm",
                    format!("{other:?}"),
                    "only null and \"rms_norm_across_heads\" are supported",
                )
            }
        }
        match self.cross_attention_dim {
            Some(c) if c == d => {}
            other => {
                return unsupported(
                    "cross_attention_dim",
                    format!("{other:?}"),
                    &format!("must equal the model width {d}: captions are projected to it"),
                )
            }
        }
        match (
            self.num_cross_attention_heads,
            self.cross_attention_head_dim,
        ) {
            (Some(h), Some(hd)) if h > 0 && hd > 0 => {}
            (h, hd) => {
                return unsupported(
                    "num_cross_attention_heads",
                    format!("{h:?} (cross_attention_head_dim {hd:?})"),
                    "cross-attention needs positive head count and head dim",
                )
            }
        }
        if self.patch_size == 0 {
            return unsupported("patch_size", "0".into(), "must be at least 1");
        }
        if self.ffn_hidden() == 0 {
            return unsupported(
                "mlp_ratio",
                self.mlp_ratio.to_string(),
                "gives an empty Mix-FFN",
            );
        }
        if let Some(s) = self.interpolation_scale {
            if !(s.is_finite() && s > 0.0) {
                return unsupported("interpolation_scale", s.to_string(), "must be positive");
            }
            if !d.is_multiple_of(4) {
                return unsupported(
                    "interpolation_scale",
                    s.to_string(),
                    &format!("a 2-D sin-cos embedding needs the width {d} to be a multiple of 4"),
                );
            }
            if self.sample_size / self.patch_size == 0 {
                return unsupported(
                    "sample_size",
                    self.sample_size.to_string(),
                    "position embedding needs sample_size ≥ patch_size",
                );
            }
        }
        Ok(())
    }

    /// Number of parameters the model has for this config (what the checkpoint must contain).
    pub fn parameter_count(&self) -> usize {
        let d = self.inner_dim();
        let (ch, chd) = self.cross();
        let cross = ch * chd;
        let hf = self.ffn_hidden();
        let p = self.patch_size;
        let lin = |i: usize, o: usize, bias: bool| i * o + if bias { o } else { 0 };
        let mut n = self.in_channels * p * p * d + d; // patch_embed
        let t_mlp = lin(256, d, true) + lin(d, d, true);
        n += t_mlp * if self.guidance_embeds { 2 } else { 1 } + lin(d, 6 * d, true);
        n += lin(self.caption_channels, d, true) + lin(d, d, true) + d; // caption proj + norm
        let mut block = 6 * d;
        block += 3 * lin(d, d, self.attention_bias) + lin(d, d, true);
        block += lin(d, cross, true) + 2 * lin(d, cross, true) + lin(cross, d, true);
        block += lin(d, 2 * hf, true) + 2 * hf * 9 + 2 * hf + lin(hf, d, false);
        if self.qk_norm.is_some() {
            block += 2 * d + 2 * cross;
        }
        if self.norm_elementwise_affine {
            block += 2 * d;
        }
        n += self.num_layers * block;
        n + 2 * d + lin(d, p * p * self.out_channels(), true)
    }
}

/// Normalises the last dim in f32 (no affine), cast back: `nn.LayerNorm(elementwise_affine=False)`.
fn layer_norm_no_affine(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let d = xf.dim(D::Minus1)?;
    let ones = Tensor::ones(d, DType::F32, x.device())?;
    let zeros = Tensor::zeros(d, DType::F32, x.device())?;
    candle_nn::ops::layer_norm(&xf, &ones, &zeros, eps as f32)?.to_dtype(dtype)
}

/// diffusers `RMSNorm` with a weight: variance in f32, scaled in f32, cast, times the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// The frequencies of the sinusoidal timestep features (`Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`): `f_k = exp(−ln(10000)·k/128)` in f32, `[1, 128]`, made once at load.
fn timestep_freqs(device: &Device) -> candle_core::Result<Tensor> {
    const HALF: usize = 128;
    let freqs: Vec<f32> = (0..HALF)
        .map(|k| (-(10000f32.ln()) * k as f32 / HALF as f32).exp())
        .collect();
    Tensor::from_vec(freqs, (1, HALF), device)
}

/// Sinusoidal timestep features `[cos(t·f) ++ sin(t·f)]` in f32, `[B, 256]`.
fn timestep_features(t: &Tensor, freqs: &Tensor) -> candle_core::Result<Tensor> {
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(freqs)?; // [B, 128]
    Tensor::cat(&[args.cos()?, args.sin()?], 1) // [B, 256]
}

/// `TimestepEmbedding`: linear_1 → SiLU → linear_2.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    /// [`timestep_freqs`] on the model's device.
    freqs: Tensor,
}

impl TimestepEmbedding {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(256, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
            freqs: timestep_freqs(vb.device())?,
        })
    }

    /// `t`: `[B]` float values → `[B, D]` in `dtype`.
    fn forward(&self, t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let feat = timestep_features(t, &self.freqs)?.to_dtype(dtype)?;
        self.linear_2
            .forward(&self.linear_1.forward(&feat)?.silu()?)
    }
}

/// `AdaLayerNormSingle` (plain models) or `SanaCombinedTimestepGuidanceEmbeddings` (Sprint).
#[derive(Debug, Clone)]
struct TimeEmbed {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    linear: Linear,
}

impl TimeEmbed {
    fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let (timestep_embedder, guidance_embedder) = if cfg.guidance_embeds {
            (
                TimestepEmbedding::new(d, vb.pp("timestep_embedder"))?,
                Some(TimestepEmbedding::new(d, vb.pp("guidance_embedder"))?),
            )
        } else {
            (
                TimestepEmbedding::new(d, vb.pp("emb.timestep_embedder"))?,
                None,
            )
        };
        Ok(Self {
            timestep_embedder,
            guidance_embedder,
            linear: linear(d, 6 * d, vb.pp("linear"))?,
        })
    }

    /// Returns (`t6` `[B, 6D]` for the blocks, `embedded_timestep` `[B, D]` for the final layer).
    ///
    /// Row by row: a matmul's result for a row may depend on how many rows it is given (the
    /// kernels differ for tiny ones), and a row's embedding must not depend on its batchmates.
    fn forward(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rows = (0..t.dim(0)?)
            .map(|i| {
                self.forward_rows(
                    &t.narrow(0, i, 1)?,
                    guidance.map(|g| g.narrow(0, i, 1)).transpose()?.as_ref(),
                    dtype,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (t6, e): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().unzip();
        Ok((Tensor::cat(&t6, 0)?, Tensor::cat(&e, 0)?))
    }

    fn forward_rows(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut e = self.timestep_embedder.forward(t, dtype)?;
        match (&self.guidance_embedder, guidance) {
            (Some(g_emb), Some(g)) => e = (e + g_emb.forward(g, dtype)?)?,
            (Some(_), None) => {
                candle_core::bail!("this model has a guidance embedding: pass a guidance value")
            }
            (None, Some(_)) => {
                candle_core::bail!("this model has no guidance embedding: guidance must be None")
            }
            (None, None) => {}
        }
        Ok((self.linear.forward(&e.silu()?)?, e))
    }
}

/// 2-D sin-cos position embedding, diffusers `get_2d_sincos_pos_embed`, `[h·w, dim]` in f32.
///
/// Grid coordinates are f32 as torch computes them (`arange / (n / base) / scale`), the
/// frequencies and products f64. The first half of each vector encodes the column, the second
/// half the row.
pub fn sincos_pos_embed(dim: usize, h: usize, w: usize, base: usize, scale: f64) -> Vec<f32> {
    let coords = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| (i as f32 / (n as f64 / base as f64) as f32 / scale as f32) as f64)
            .collect()
    };
    let (rows, cols) = (coords(h), coords(w));
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(h * w * dim);
    for &r in &rows {
        for &c in &cols {
            for pos in [c, r] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}

/// Self-attention with a ReLU kernel and no softmax (`SanaLinearAttnProcessor2_0`).
#[derive(Debug, Clone)]
struct LinearAttention {
    /// `to_q`, `to_k`, `to_v` fused into one `[3D, D]` projection.
    to_qkv: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    heads: usize,
    /// f16 models: ±65504 as `[1]` f16 tensors on the device, for diffusers' overflow clamp.
    f16_bounds: Option<(Tensor, Tensor)>,
}

impl LinearAttention {
    fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let lin = |name: &str| {
            if cfg.attention_bias {
                linear(d, d, vb.pp(name))
            } else {
                linear_no_bias(d, d, vb.pp(name))
            }
        };
        let (norm_q, norm_k) = if cfg.qk_norm.is_some() {
            (
                Some(RmsNorm::new(d, 1e-5, vb.pp("norm_q"))?),
                Some(RmsNorm::new(d, 1e-5, vb.pp("norm_k"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_qkv: Linear::fuse(&[lin("to_q")?, lin("to_k")?, lin("to_v")?])?,
            to_out: linear(d, d, vb.pp("to_out.0"))?,
            norm_q,
            norm_k,
            heads: cfg.num_attention_heads,
            f16_bounds: (vb.dtype() == DType::F16)
                .then(|| -> candle_core::Result<(Tensor, Tensor)> {
                    let bound = |v: f32| Tensor::new(&[v], vb.device())?.to_dtype(DType::F16);
                    Ok((bound(-65504.0)?, bound(65504.0)?))
                })
                .transpose()?,
        })
    }

    /// `x`: `[B, N, D]` → `[B, N, D]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let d = x.dim(2)?;
        let qkv = self.to_qkv.forward(x)?; // [B, N, 3D]
        let mut q = qkv.narrow(2, 0, d)?;
        let mut k = qkv.narrow(2, d, d)?;
        let v = qkv.narrow(2, 2 * d, d)?;
        if let (Some(nq), Some(nk)) = (&self.norm_q, &self.norm_k) {
            q = nq.forward(&q)?;
            k = nk.forward(&k)?;
        }
        // ReLU kernel, sums in f32 over all N tokens, heads merged back to [B, N, D].
        let out = linear_attention(&q, &k, &v, self.heads)?;
        let out = self.to_out.forward(&out)?;
        match &self.f16_bounds {
            Some((lo, hi)) if dtype == DType::F16 => {
                out.broadcast_maximum(lo)?.broadcast_minimum(hi)
            }
            _ => Ok(out),
        }
    }
}

/// Softmax cross-attention from image tokens to caption tokens (`SanaAttnProcessor2_0`).
#[derive(Debug, Clone)]
struct CrossAttention {
    to_q: Linear,
    /// `to_k` and `to_v` fused into one `[2·inner, D]` projection.
    to_kv: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let (heads, head_dim) = cfg.cross();
        let inner = heads * head_dim;
        let (norm_q, norm_k) = if cfg.qk_norm.is_some() {
            (
                Some(RmsNorm::new(inner, 1e-5, vb.pp("norm_q"))?),
                Some(RmsNorm::new(inner, 1e-5, vb.pp("norm_k"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: linear(d, inner, vb.pp("to_q"))?,
            to_kv: Linear::fuse(&[
                linear(d, inner, vb.pp("to_k"))?,
                linear(d, inner, vb.pp("to_v"))?,
            ])?,
            to_out: linear(inner, d, vb.pp("to_out.0"))?,
            norm_q,
            norm_k,
            heads,
            head_dim,
        })
    }

    /// Keys and values of one item's caption `y` `[1, L, D]` → `[1, h, L, hd]` each, in f32.
    /// They depend only on the text, so a generation computes them once for all its steps.
    fn caption_kv(&self, y: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, l, _) = y.dims3()?;
        let inner = self.heads * self.head_dim;
        let kv = self.to_kv.forward(y)?; // [B, L, 2·inner]
        let mut k = kv.narrow(2, 0, inner)?;
        let v = kv.narrow(2, inner, inner)?;
        if let Some(nk) = &self.norm_k {
            k = nk.forward(&k)?;
        }
        Ok((self.split_heads(&k, b, l)?, self.split_heads(&v, b, l)?))
    }

    /// `[B, len, h·hd]` → `[B, h, len, hd]` in f32 (logits and softmax run in f32).
    fn split_heads(&self, t: &Tensor, b: usize, len: usize) -> candle_core::Result<Tensor> {
        t.reshape((b, len, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    /// `x`: `[B, N, D]`; item `i` attends to its own caption keys/values `items[i]` (see
    /// [`SanaTransformer2DModel::prepare_caption`]) → `[B, N, D]`.
    fn forward(&self, x: &Tensor, items: &[ItemCaption]) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (b, n, _) = x.dims3()?;
        let mut q = self.to_q.forward(x)?;
        if let Some(nq) = &self.norm_q {
            q = nq.forward(&q)?;
        }
        // The 1/√hd scale is applied to q, which is smaller than the logits.
        let q = (self.split_heads(&q, b, n)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        // Per item, over its own tokens: the shapes, hence the results, are the same whatever the
        // batchmates are.
        let outs = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let mut logits = q.narrow(0, i, 1)?.matmul(&item.k.t()?)?; // [1, h, N, L_i]
                if let Some(bias) = &item.bias {
                    logits = logits.broadcast_add(bias)?;
                }
                candle_nn::ops::softmax_last_dim(&logits)?.matmul(&item.v) // [1, h, N, hd]
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = Tensor::cat(&outs, 0)? // [B, h, N, hd]
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?
            .to_dtype(dtype)?;
        self.to_out.forward(&out)
    }
}

/// Mix-FFN: 1×1 expand, SiLU, 3×3 depthwise, GLU gate, 1×1 project (`GLUMBConv`, no norm/residual).
#[derive(Debug, Clone)]
struct GluMbConv {
    w: GluConvWeights,
    hidden: usize,
}

impl GluMbConv {
    fn new(d: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w: GluConvWeights::load(d, hidden, vb)?,
            hidden,
        })
    }

    /// `x`: `[B, N, D]` tokens of an `h × w` grid → `[B, N, D]`. Channels stay last throughout, so
    /// both 1×1 convs are plain matmuls over all B·N tokens.
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        // 1. 1×1 expansion without its bias: [B·N, D] · [D, 2Hf] → [B, h, w, 2Hf].
        let pre = x
            .reshape((b * n, d))?
            .matmul(&self.w.inverted_w.t()?)?
            .reshape((b, h, w, 2 * self.hidden))?;
        // 2. Bias, SiLU, depthwise 3×3 with bias, GLU gate — one fused pass → [B, h, w, Hf].
        let gated = glu_depthwise_conv2d_nhwc(&pre, &self.w.depth_w, &self.w.biases, 1)?;
        // 3. 1×1 projection back to D: [B·N, Hf] · [Hf, D] → [B, N, D].
        gated
            .reshape((b * n, self.hidden))?
            .matmul(&self.w.point_w.t()?)?
            .reshape((b, n, d))
    }
}

/// `SanaTransformerBlock`.
#[derive(Debug, Clone)]
struct SanaTransformerBlock {
    scale_shift_table: Tensor, // [6, D]
    attn1: LinearAttention,
    attn2: CrossAttention,
    norm2_affine: Option<(Tensor, Tensor)>,
    ff: GluMbConv,
    eps: f64,
}

impl SanaTransformerBlock {
    fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let norm2_affine = if cfg.norm_elementwise_affine {
            Some((vb.get(d, "norm2.weight")?, vb.get(d, "norm2.bias")?))
        } else {
            None
        };
        Ok(Self {
            scale_shift_table: vb.get((6, d), "scale_shift_table")?,
            attn1: LinearAttention::new(cfg, vb.pp("attn1"))?,
            attn2: CrossAttention::new(cfg, vb.pp("attn2"))?,
            norm2_affine,
            ff: GluMbConv::new(d, cfg.ffn_hidden(), vb.pp("ff"))?,
            eps: cfg.norm_eps,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        caption: &[ItemCaption],
        t6: &Tensor,
        h: usize,
        w: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        // 1. Modulation: table + t6 → shift/scale/gate for attention and FFN, each [B, 1, D].
        let m = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&t6.reshape((b, 6, d))?)?;
        let part = |i: usize| m.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (part(0)?, part(1)?, part(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (part(3)?, part(4)?, part(5)?);
        // 2. Self-attention on the modulated LayerNorm.
        let n = layer_norm_no_affine(x, self.eps)?
            .broadcast_mul(&(scale_msa + 1.0)?)?
            .broadcast_add(&shift_msa)?;
        let x = (x + self.attn1.forward(&n)?.broadcast_mul(&gate_msa)?)?;
        // 3. Cross-attention: no norm, no modulation, no gate.
        let x = (&x + self.attn2.forward(&x, caption)?)?;
        // 4. Mix-FFN on the modulated norm2.
        let mut n = layer_norm_no_affine(&x, self.eps)?;
        if let Some((wt, bi)) = &self.norm2_affine {
            n = n.broadcast_mul(wt)?.broadcast_add(bi)?;
        }
        let n = n
            .broadcast_mul(&(scale_mlp + 1.0)?)?
            .broadcast_add(&shift_mlp)?;
        &x + self.ff.forward(&n, h, w)?.broadcast_mul(&gate_mlp)?
    }
}

/// One item's caption keys and values for one block.
#[derive(Debug, Clone)]
struct ItemCaption {
    /// `[1, heads, L_i, head_dim]`, f32: the item's unmasked tokens only.
    k: Tensor,
    v: Tensor,
    /// `[1, 1, 1, L]` additive bias, only for an item with no unmasked token: it then attends to
    /// every (masked) position, as diffusers does.
    bias: Option<Tensor>,
}

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

/// The text-dependent part of a forward (see [`SanaTransformer2DModel::prepare_caption`]).
#[derive(Debug, Clone)]
pub struct CaptionContext {
    /// `[block][item]`.
    blocks: Vec<Vec<ItemCaption>>,
    /// Tokens each item attends to.
    tokens: Vec<usize>,
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
    caption_norm: RmsNorm,
    blocks: Vec<SanaTransformerBlock>,
    scale_shift_table: Tensor, // [2, D]
    proj_out: Linear,
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
            caption_norm: RmsNorm::new(d, 1e-5, vb.pp("caption_norm"))?,
            blocks,
            scale_shift_table: vb.get((2, d), "scale_shift_table")?,
            proj_out: linear(d, p * p * cfg.out_channels(), vb.pp("proj_out"))?,
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
        self.caption_context(encoder_hidden_states, &kept)
    }

    /// [`Self::prepare_caption`] for right-padded text: item `i` keeps its first `lengths[i]`
    /// tokens (a length of 0 keeps every position under the mask bias, as diffusers does for an
    /// all-padding row). Nothing is read back from the device.
    pub fn prepare_caption_lengths(
        &self,
        encoder_hidden_states: &Tensor,
        lengths: &[usize],
    ) -> Result<CaptionContext> {
        let (b, l, _) = encoder_hidden_states.dims3()?;
        if lengths.len() != b || lengths.iter().any(|&n| n > l) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "caption lengths {lengths:?} do not fit encoder_hidden_states {:?}",
                encoder_hidden_states.dims()
            ))));
        }
        let kept: Vec<Kept> = lengths.iter().map(|&n| Kept::Prefix(n)).collect();
        self.caption_context(encoder_hidden_states, &kept)
    }

    fn caption_context(
        &self,
        encoder_hidden_states: &Tensor,
        kept: &[Kept],
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
            let y = self
                .caption_2
                .forward(&self.caption_1.forward(&y)?.gelu()?)?;
            let y = self.caption_norm.forward(&y)?;
            for (blk, out) in self.blocks.iter().zip(blocks.iter_mut()) {
                let (k, v) = blk.attn2.caption_kv(&y)?;
                out.push(ItemCaption {
                    k,
                    v,
                    bias: bias.clone(),
                });
            }
        }
        Ok(CaptionContext { blocks, tokens })
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
        let _span = tracing::trace_span!("sana_transformer").entered();
        let x = hidden_states.to_dtype(self.dtype)?;
        let (b, c, hh, ww) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || hh % p != 0 || ww % p != 0 || b != caption.tokens.len() {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "latents {:?} do not fit the model: want [{}, {}, H, W] with H and W multiples of {p}",
                x.dims(),
                caption.tokens.len(),
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
        let mut hs = patches
            .broadcast_matmul(&self.patch_w.t()?)?
            .broadcast_add(&self.patch_b)?;
        // 2. Position embedding (2K/4K models), added in f32 then cast back.
        if let Some(scale) = self.cfg.interpolation_scale {
            let pe = self.position_embedding(h, w, scale, x.device())?;
            hs = hs
                .to_dtype(DType::F32)?
                .broadcast_add(&pe)?
                .to_dtype(self.dtype)?;
        }
        // 3. Timestep (and guidance) embedding.
        let (t6, embedded) = self.time_embed.forward(timestep, guidance, self.dtype)?;
        // 4. Blocks.
        for (block, items) in self.blocks.iter().zip(&caption.blocks) {
            hs = block.forward(&hs, items, &t6, h, w)?;
        }
        // 5. Final layer: shift first, then scale, from the un-projected timestep embedding.
        let m = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&embedded.unsqueeze(1)?)?; // [B, 2, D]
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        let hs = layer_norm_no_affine(&hs, 1e-6)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        // 6. Project and unpatchify: [B, N, p·p·C] → [B, h, w, p, p, C] → [B, C, h, p, w, p].
        let out = self.proj_out.forward(&hs)?;
        let co = self.cfg.out_channels();
        Ok(out
            .reshape((b, h, w, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, co, hh, ww))?)
    }
}
