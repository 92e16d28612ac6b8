//! The DiT's layers: norms, the ReLU linear self-attention, the softmax cross-attention, the Mix-FFN
//! and `SanaTransformerBlock`.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::config::SanaTransformerConfig;
use super::lora::{site, LoraRows};
use crate::nn::{linear, linear_no_bias, GluConvWeights, Linear};
use crate::ops::{glu_depthwise_conv2d_nhwc, linear_attention, matmul_nt};

/// Normalises the last dim in f32 (no affine), cast back: `nn.LayerNorm(elementwise_affine=False)`.
pub(super) fn layer_norm_no_affine(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let d = xf.dim(D::Minus1)?;
    let ones = Tensor::ones(d, DType::F32, x.device())?;
    let zeros = Tensor::zeros(d, DType::F32, x.device())?;
    candle_nn::ops::layer_norm(&xf, &ones, &zeros, eps as f32)?.to_dtype(dtype)
}

/// diffusers `RMSNorm` with a weight: variance in f32, scaled in f32, cast, times the weight.
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    pub(super) fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
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

/// Self-attention with a ReLU kernel and no softmax (`SanaLinearAttnProcessor2_0`).
#[derive(Debug, Clone)]
pub(super) struct LinearAttention {
    /// `to_q`, `to_k`, `to_v` fused into one `[3D, D]` projection.
    pub(super) to_qkv: Linear,
    pub(super) to_out: Linear,
    pub(super) norm_q: Option<RmsNorm>,
    pub(super) norm_k: Option<RmsNorm>,
    pub(super) heads: usize,
    /// f16 models: ±65504 as `[1]` f16 tensors on the device, for diffusers' overflow clamp.
    pub(super) f16_bounds: Option<(Tensor, Tensor)>,
}

impl LinearAttention {
    pub(super) fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
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

    /// `x`: `[B, N, D]` → `[B, N, D]`. Rows from `perturbed_from` on take PAG's identity
    /// attention instead (`to_out(to_v(x))`, diffusers' `PAGIdentitySanaLinearAttnProcessor2_0`).
    pub(super) fn forward(&self, x: &Tensor, ctx: &BlockContext) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (rows, _, d) = x.dims3()?;
        let lora = ctx.lora;
        let at = |part| site::block(ctx.block, part);
        let qkv = self.to_qkv.forward(x)?; // [B, N, 3D]
        let mut q = lora.apply(at(site::ATTN1_Q), x, qkv.narrow(2, 0, d)?)?;
        let mut k = lora.apply(at(site::ATTN1_K), x, qkv.narrow(2, d, d)?)?;
        let v = lora.apply(at(site::ATTN1_V), x, qkv.narrow(2, 2 * d, d)?)?;
        if let (Some(nq), Some(nk)) = (&self.norm_q, &self.norm_k) {
            q = nq.forward(&q)?;
            k = nk.forward(&k)?;
        }
        // ReLU kernel, sums in f32 over all N tokens, heads merged back to [B, N, D].
        let out = match ctx.perturbed_from {
            Some(p) if p < rows => {
                let attended = linear_attention(
                    &q.narrow(0, 0, p)?,
                    &k.narrow(0, 0, p)?,
                    &v.narrow(0, 0, p)?,
                    self.heads,
                )?;
                Tensor::cat(&[&attended, &v.narrow(0, p, rows - p)?], 0)?
            }
            _ => linear_attention(&q, &k, &v, self.heads)?,
        };
        let out = lora.apply(at(site::ATTN1_OUT), &out, self.to_out.forward(&out)?)?;
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
pub(super) struct CrossAttention {
    pub(super) to_q: Linear,
    /// `to_k` and `to_v` fused into one `[2·inner, D]` projection.
    pub(super) to_kv: Linear,
    pub(super) to_out: Linear,
    pub(super) norm_q: Option<RmsNorm>,
    pub(super) norm_k: Option<RmsNorm>,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
}

impl CrossAttention {
    pub(super) fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
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
    /// `row`: the item's row, for its adapters' scales.
    pub(super) fn caption_kv(
        &self,
        y: &Tensor,
        lora: &LoraRows,
        block: usize,
        row: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, l, _) = y.dims3()?;
        let inner = self.heads * self.head_dim;
        let kv = self.to_kv.forward(y)?; // [B, L, 2·inner]
        let at = |part| site::block(block, part);
        let mut k = lora.apply_row(at(site::ATTN2_K), row, y, kv.narrow(2, 0, inner)?)?;
        let v = lora.apply_row(at(site::ATTN2_V), row, y, kv.narrow(2, inner, inner)?)?;
        if let Some(nk) = &self.norm_k {
            k = nk.forward(&k)?;
        }
        Ok((self.split_heads(&k, b, l)?, self.split_heads(&v, b, l)?))
    }

    /// `[B, len, h·hd]` → `[B, h, len, hd]` in f32 (logits and softmax run in f32).
    pub(super) fn split_heads(
        &self,
        t: &Tensor,
        b: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        t.reshape((b, len, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    /// `x`: `[B, N, D]`; item `i` attends to its own caption keys/values `items[i]` (see
    /// [`SanaTransformer2DModel::prepare_caption`]) → `[B, N, D]`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        items: &[ItemCaption],
        ctx: &BlockContext,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (b, n, _) = x.dims3()?;
        let at = |part| site::block(ctx.block, part);
        let mut q = ctx
            .lora
            .apply(at(site::ATTN2_Q), x, self.to_q.forward(x)?)?;
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
                crate::ops::softmax_last_dim(&logits)?.matmul(&item.v) // [1, h, N, hd]
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = Tensor::cat(&outs, 0)? // [B, h, N, hd]
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?
            .to_dtype(dtype)?;
        ctx.lora
            .apply(at(site::ATTN2_OUT), &out, self.to_out.forward(&out)?)
    }
}

/// Mix-FFN: 1×1 expand, SiLU, 3×3 depthwise, GLU gate, 1×1 project (`GLUMBConv`, no norm/residual).
#[derive(Debug, Clone)]
pub(super) struct GluMbConv {
    pub(super) w: GluConvWeights,
    pub(super) hidden: usize,
}

impl GluMbConv {
    pub(super) fn new(d: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w: GluConvWeights::load(d, hidden, vb)?,
            hidden,
        })
    }

    /// `x`: `[B, N, D]` tokens of an `h × w` grid → `[B, N, D]`. Channels stay last throughout, so
    /// both 1×1 convs are plain matmuls over all B·N tokens.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        ctx: &BlockContext,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let at = |part| site::block(ctx.block, part);
        // 1. 1×1 expansion without its bias: [B·N, D] · [D, 2Hf] → [B, h, w, 2Hf].
        let pre = matmul_nt(&x.reshape((b * n, d))?, &self.w.inverted_w)?.reshape((
            b,
            n,
            2 * self.hidden,
        ))?;
        let pre =
            ctx.lora
                .apply(at(site::FF_INVERTED), x, pre)?
                .reshape((b, h, w, 2 * self.hidden))?;
        // 2. Bias, SiLU, depthwise 3×3 with bias, GLU gate — one fused pass → [B, h, w, Hf].
        let gated = glu_depthwise_conv2d_nhwc(&pre, &self.w.depth_w, &self.w.biases, 1)?
            .reshape((b, n, self.hidden))?;
        // 3. 1×1 projection back to D: [B·N, Hf] · [Hf, D] → [B, N, D].
        let out = matmul_nt(&gated.reshape((b * n, self.hidden))?, &self.w.point_w)?
            .reshape((b, n, d))?;
        ctx.lora.apply(at(site::FF_POINT), &gated, out)
    }
}

/// `SanaTransformerBlock`.
#[derive(Debug, Clone)]
pub(super) struct SanaTransformerBlock {
    pub(super) scale_shift_table: Tensor, // [6, D]
    pub(super) attn1: LinearAttention,
    pub(super) attn2: CrossAttention,
    pub(super) norm2_affine: Option<(Tensor, Tensor)>,
    pub(super) ff: GluMbConv,
    pub(super) eps: f64,
}

impl SanaTransformerBlock {
    pub(super) fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
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

    pub(super) fn forward(
        &self,
        x: &Tensor,
        caption: &[ItemCaption],
        t6: &Tensor,
        (h, w): (usize, usize),
        ctx: &BlockContext,
    ) -> candle_core::Result<Tensor> {
        // CPU bf16: the blocks' matmuls take the blocks' path (see `ops::in_dit_blocks`).
        crate::ops::in_dit_blocks(|| self.forward_in_scope(x, caption, t6, (h, w), ctx))
    }

    fn forward_in_scope(
        &self,
        x: &Tensor,
        caption: &[ItemCaption],
        t6: &Tensor,
        (h, w): (usize, usize),
        ctx: &BlockContext,
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
        let x = (x + self.attn1.forward(&n, ctx)?.broadcast_mul(&gate_msa)?)?;
        // 3. Cross-attention: no norm, no modulation, no gate.
        let x = (&x + self.attn2.forward(&x, caption, ctx)?)?;
        // 4. Mix-FFN on the modulated norm2.
        let mut n = layer_norm_no_affine(&x, self.eps)?;
        if let Some((wt, bi)) = &self.norm2_affine {
            n = n.broadcast_mul(wt)?.broadcast_add(bi)?;
        }
        let n = n
            .broadcast_mul(&(scale_mlp + 1.0)?)?
            .broadcast_add(&shift_mlp)?;
        &x + self.ff.forward(&n, h, w, ctx)?.broadcast_mul(&gate_mlp)?
    }
}

/// What a block's forward needs beyond its input: its index, the generation's adapters, and the
/// first row of PAG's perturbed rows when this block is one of its layers.
pub(super) struct BlockContext<'a> {
    pub(super) block: usize,
    pub(super) lora: &'a LoraRows,
    pub(super) perturbed_from: Option<usize>,
}

/// One item's caption keys and values for one block.
#[derive(Debug, Clone)]
pub(super) struct ItemCaption {
    /// `[1, heads, L_i, head_dim]`, f32: the item's unmasked tokens only.
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    /// `[1, 1, 1, L]` additive bias, only for an item with no unmasked token: it then attends to
    /// every (masked) position, as diffusers does.
    pub(super) bias: Option<Tensor>,
}
