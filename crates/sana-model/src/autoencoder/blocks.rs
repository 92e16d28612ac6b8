//! The DC-AE's layers and blocks: `nn.Conv2d`, 1×1 convs as matmuls, channel RMSNorm, BatchNorm,
//! `ResBlock`, `SanaMultiscaleLinearAttention`, `GLUMBConv` and `EfficientViTBlock`, NCHW.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, StageCfg};
use crate::nn::GluConvWeights;
use crate::ops::{depthwise_conv2d, glu_depthwise_conv2d, CpuConv, CpuRmsNorm};

/// Whether `x` must be widened to f32 for a matmul or conv: candle's CPU matmul has no bf16.
pub(super) fn needs_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() != DType::F32
}

/// `a · b` for contiguous operands; bf16 on CPU runs in f32 and rounds once (as torch accumulates).
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if a.dtype() != b.dtype() {
        // CPU mixed precision: a bf16 weight with f32 activations is widened for the call.
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?);
    }
    if needs_f32(&a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(a.dtype())
    } else {
        a.matmul(&b)
    }
}

/// `nn.Conv2d` (groups 1, dilation 1): weight `[out, in, k, k]`, optional bias.
#[derive(Debug, Clone)]
pub(super) struct Conv2d {
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl Conv2d {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: if bias {
                Some(vb.get(cout, "bias")?)
            } else {
                None
            },
            stride,
            padding: k / 2,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let wide = needs_f32(x);
        let (x, w) = if wide {
            (x.to_dtype(DType::F32)?, self.weight.to_dtype(DType::F32)?)
        } else {
            // (a CPU mixed-precision bf16 weight is widened to the activations' dtype)
            (x.clone(), self.weight.to_dtype(dtype)?)
        };
        let y = if x.device().is_cpu() && self.stride == 1 && x.dtype() == DType::F32 {
            // candle's CPU conv builds its im2col one value at a time; this one copies rows.
            let bias = match &self.bias {
                Some(b) => b.to_dtype(DType::F32)?,
                None => Tensor::zeros(w.dim(0)?, DType::F32, x.device())?,
            };
            let packed = Tensor::cat(&[w.flatten_from(1)?, bias.unsqueeze(1)?], 1)?;
            x.contiguous()?.apply_op2_no_bwd(
                &packed,
                &CpuConv {
                    k: w.dim(2)?,
                    padding: self.padding,
                },
            )?
        } else {
            let y = x.conv2d(&w, self.padding, self.stride, 1, 1)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?)?,
                None => y,
            }
        };
        if wide {
            y.to_dtype(dtype)
        } else {
            Ok(y)
        }
    }
}

/// A 1×1 conv without bias as a matmul per image: weight `[out, in]`, x `[B, in, H, W]`.
pub(super) fn pointwise(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let cout = w.dim(0)?;
    // [B, in, H·W] per image: [out, in] · [in, H·W] → [out, H·W].
    let x = x.contiguous()?.reshape((b, c, h * wd))?;
    if b == 1 {
        return matmul(w, &x.get(0)?)?.reshape((1, cout, h, wd));
    }
    let outs = (0..b)
        .map(|i| matmul(w, &x.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&outs, 0)?.reshape((b, cout, h, wd))
}

/// [`pointwise`] plus a bias `[1, out, 1, 1]` added before rounding to the input dtype (as a
/// torch conv with bias does).
pub(super) fn pointwise_bias(w: &Tensor, bias: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let wide = |t: &Tensor| t.to_dtype(DType::F32);
    pointwise(&wide(w)?, &wide(x)?)?
        .broadcast_add(&wide(bias)?)?
        .to_dtype(dtype)
}

/// Channel RMSNorm with weight and bias (diffusers `RMSNorm(C, 1e-5, bias=True)` applied over
/// `movedim(1, -1)`): the normalisation in f32, cast back, then `· w + b` in the model dtype.
#[derive(Debug, Clone)]
pub(super) struct ChannelRmsNorm {
    pub(super) weight: Tensor, // [1, C, 1, 1]
    pub(super) bias: Tensor,   // [1, C, 1, 1]
}

impl ChannelRmsNorm {
    pub(super) fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?.reshape((1, c, 1, 1))?,
            bias: vb.get(c, "bias")?.reshape((1, c, 1, 1))?,
        })
    }
}

impl ChannelRmsNorm {
    /// `norm(x) + residual`. f32 on CPU is one fused pass ([`CpuRmsNorm`]); other cases are
    /// tensor ops with the reference's rounding points.
    pub(super) fn forward_add(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let c = x.dim(1)?;
            let params = Tensor::cat(&[self.weight.reshape(c)?, self.bias.reshape(c)?], 0)?
                .to_dtype(DType::F32)?;
            let x = x.contiguous()?;
            return match residual {
                Some(r) => {
                    x.apply_op3_no_bwd(&params, &r.contiguous()?, &CpuRmsNorm { residual: true })
                }
                None => x.apply_op3_no_bwd(&params, &x, &CpuRmsNorm { residual: false }),
            };
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?.recip()?; // [B, 1, H, W]
        let y = xf
            .broadcast_mul(&inv)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for ChannelRmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_add(x, None)
    }
}

/// `nn.BatchNorm2d` in eval mode (eps 1e-5): the stored running statistics, computed in f32.
#[derive(Debug, Clone)]
pub(super) struct BatchNorm2d {
    pub(super) scale: Tensor, // [1, C, 1, 1] f32: w / √(var + eps)
    pub(super) shift: Tensor, // [1, C, 1, 1] f32: b − mean · scale
}

impl BatchNorm2d {
    pub(super) fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let get = |n: &str| -> candle_core::Result<Tensor> { vb.get(c, n)?.to_dtype(DType::F32) };
        let (w, b, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let scale = (w / (var + 1e-5)?.sqrt()?)?;
        let shift = (b - (mean * &scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(DType::F32)?
            .broadcast_mul(&self.scale)?
            .broadcast_add(&self.shift)?
            .to_dtype(x.dtype())
    }
}

/// `get_normalization(norm_type, C)` as the DC-AE blocks apply it to NCHW maps.
#[derive(Debug, Clone)]
pub(super) enum Norm {
    Rms(ChannelRmsNorm),
    Batch(BatchNorm2d),
}

impl Norm {
    pub(super) fn new(kind: &str, c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match kind {
            "batch_norm" => Self::Batch(BatchNorm2d::new(c, vb)?),
            _ => Self::Rms(ChannelRmsNorm::new(c, vb)?),
        })
    }
}

impl Norm {
    /// `norm(x) + residual`.
    pub(super) fn forward_add(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward_add(x, Some(residual)),
            Self::Batch(n) => n.forward(x)? + residual,
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward(x),
            Self::Batch(n) => n.forward(x),
        }
    }
}

/// `ResBlock`: conv3×3 (bias) → act → conv3×3 (no bias) → norm → + input.
#[derive(Debug, Clone)]
pub(super) struct ResBlock {
    pub(super) conv1: Conv2d,
    pub(super) conv2: Conv2d,
    pub(super) norm: Norm,
    pub(super) act: Activation,
}

impl ResBlock {
    pub(super) fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = s.channels;
        Ok(Self {
            conv1: Conv2d::new(c, c, 3, 1, true, vb.pp("conv1"))?,
            conv2: Conv2d::new(c, c, 3, 1, false, vb.pp("conv2"))?,
            norm: Norm::new(s.norm, c, vb.pp("norm"))?,
            act: Activation::parse(s.act).expect("validated; this is a bug"),
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.conv1.forward(x)?)?;
        self.norm.forward_add(&self.conv2.forward(&h)?, x)
    }
}

/// `SanaMultiscaleAttentionProjection`: depthwise k×k then a grouped 1×1 (groups of `head_dim`).
#[derive(Debug, Clone)]
pub(super) struct MultiscaleProjection {
    pub(super) proj_in: Tensor,  // [3I, 1, k, k]
    pub(super) proj_out: Tensor, // [3·heads, d, d]: one d×d matrix per group
    pub(super) kernel: usize,
}

impl MultiscaleProjection {
    pub(super) fn new(
        inner: usize,
        heads: usize,
        d: usize,
        kernel: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: vb.get((3 * inner, 1, kernel, kernel), "proj_in.weight")?,
            proj_out: vb.get((3 * inner, d, 1, 1), "proj_out.weight")?.reshape((
                3 * heads,
                d,
                d,
            ))?,
            kernel,
        })
    }

    /// `qkv` `[B, 3I, H, W]` → `[B, 3I, H, W]`.
    pub(super) fn forward(&self, qkv: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = qkv.dims4()?;
        let (g, d, _) = self.proj_out.dims3()?;
        let agg = depthwise_conv2d(qkv, &self.proj_in, None, self.kernel / 2)?;
        // Grouped 1×1 as a batched matmul: [B, G, d, d] · [B, G, d, H·W].
        let wts = self
            .proj_out
            .unsqueeze(0)?
            .broadcast_as((b, g, d, d))?
            .contiguous()?;
        matmul(&wts, &agg.reshape((b, g, d, h * w))?)?.reshape((b, c, h, w))
    }
}

/// `SanaMultiscaleLinearAttention` with `SanaMultiscaleAttnProcessor2_0` (residual on).
#[derive(Debug, Clone)]
pub(super) struct SanaMultiscaleLinearAttention {
    /// `to_q`, `to_k`, `to_v` stacked: `[3I, C]` (q rows, then k, then v, as the reference concatenates).
    pub(super) to_qkv: Tensor,
    pub(super) multiscale: Vec<MultiscaleProjection>,
    pub(super) to_out: Tensor, // [C, I·(1 + scales)]
    pub(super) norm_out: Norm,
    pub(super) head_dim: usize,
}

impl SanaMultiscaleLinearAttention {
    pub(super) fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = s.channels;
        let d = s.head_dim;
        let heads = c / d;
        let inner = heads * d;
        let to_qkv = Tensor::cat(
            &[
                vb.get((inner, c), "to_q.weight")?,
                vb.get((inner, c), "to_k.weight")?,
                vb.get((inner, c), "to_v.weight")?,
            ],
            0,
        )?;
        let multiscale = s
            .multiscales
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                MultiscaleProjection::new(
                    inner,
                    heads,
                    d,
                    k,
                    vb.pp(format!("to_qkv_multiscale.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            to_qkv,
            to_out: vb.get((c, inner * (1 + s.multiscales.len())), "to_out.weight")?,
            multiscale,
            norm_out: Norm::new(s.norm, c, vb.pp("norm_out"))?,
            head_dim: d,
        })
    }

    /// Linear branch, all f32: `q, k, v` `[B, G, d, N]` → `[B, G, d, N]`.
    pub(super) fn linear(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (b, g, d, n) = v.dims4()?;
        // A row of ones under v makes the same matmul yield Σ_n k_n, the normaliser.
        let ones = Tensor::ones((b, g, 1, n), DType::F32, v.device())?;
        let v1 = Tensor::cat(&[v, &ones], 2)?; // [B, G, d+1, N]
        let kt = k.transpose(2, 3)?.contiguous()?; // [B, G, N, d]
        let scores = matmul(&v1, &kt)?; // [B, G, d+1, d]
        let o = matmul(&scores, q)?; // [B, G, d+1, N]
        o.narrow(2, 0, d)?
            .broadcast_div(&(o.narrow(2, d, 1)? + 1e-15)?)
    }

    /// Quadratic branch (≤ d tokens): scores in the input dtype, normalised over keys in f32.
    pub(super) fn quadratic(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let kt = k.transpose(2, 3)?.contiguous()?; // [B, G, N_key, d]
        let scores = matmul(&kt, q)?.to_dtype(DType::F32)?; // [B, G, N_key, N_query]
        let scores = scores.broadcast_div(&(scores.sum_keepdim(2)? + 1e-15)?)?;
        matmul(v, &scores.to_dtype(v.dtype())?) // [B, G, d, N_query]
    }
}

impl Module for SanaMultiscaleLinearAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (b, _, h, w) = x.dims4()?;
        let n = h * w;
        let d = self.head_dim;
        // 1. q, k, v as one 1×1 conv: [B, 3I, H, W].
        let qkv = pointwise(&self.to_qkv, x)?;
        // 2. Multiscale aggregation, concatenated after the plain qkv: [B, 3I·(1 + scales), H, W].
        let mut parts = vec![qkv.clone()];
        for m in &self.multiscale {
            parts.push(m.forward(&qkv)?);
        }
        let z = Tensor::cat(&parts, 1)?;
        let linear = n > d;
        let z = if linear { z.to_dtype(DType::F32)? } else { z };
        // 3. Consecutive chunks of 3d channels: [B, G, 3d, N]; each is (q | k | v) of d rows.
        let g = z.dim(1)? / (3 * d);
        let z = z.reshape((b, g, 3 * d, n))?;
        let q = z.narrow(2, 0, d)?.relu()?;
        let k = z.narrow(2, d, d)?.relu()?;
        let v = z.narrow(2, 2 * d, d)?.contiguous()?;
        let out = if linear {
            Self::linear(&q, &k, &v)?.to_dtype(dtype)?
        } else {
            Self::quadratic(&q, &k, &v)?
        };
        // 4. [B, G·d, H, W] → to_out (1×1) → norm → + input.
        let out = pointwise(&self.to_out, &out.reshape((b, g * d, h, w))?)?;
        self.norm_out.forward_add(&out, x)
    }
}

/// `GLUMBConv` with `norm_type="rms_norm"` and the residual: 1×1 expand (bias), SiLU, depthwise
/// 3×3 (bias), GLU gate, 1×1 project (no bias), channel RMSNorm, + input.
#[derive(Debug, Clone)]
pub(super) struct GluMbConv {
    pub(super) w: GluConvWeights,
    pub(super) norm: ChannelRmsNorm,
}

impl GluMbConv {
    pub(super) fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w: GluConvWeights::load(c, 4 * c, vb.clone())?,
            norm: ChannelRmsNorm::new(c, vb.pp("norm"))?,
        })
    }
}

impl Module for GluMbConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gated = if x.dtype() == DType::F32 {
            // 1. 1×1 expansion without its bias: [B, 2Hf, H, W].
            let pre = pointwise(&self.w.inverted_w, x)?;
            // 2. Bias, SiLU, depthwise 3×3 with bias, GLU gate, one fused pass: [B, Hf, H, W].
            glu_depthwise_conv2d(&pre, &self.w.depth_w, &self.w.biases, 1)?
        } else {
            // Half precision rounds after every op, as the reference does (the fused pass rounds
            // once; more precise, but not the reference's numbers).
            let (c2, hidden) = (self.w.biases.dim(1)?, self.w.biases.dim(1)? / 2);
            let bias = |i: usize| self.w.biases.get(i)?.reshape((1, c2, 1, 1));
            let pre = pointwise_bias(&self.w.inverted_w, &bias(0)?, x)?.silu()?;
            let z = depthwise_conv2d(&pre, &self.w.depth_w, Some(&self.w.biases.get(1)?), 1)?;
            // [B, Hf, H, W] value half · SiLU(gate half).
            (z.narrow(1, 0, hidden)? * z.narrow(1, hidden, hidden)?.silu()?)?
        };
        // 3. 1×1 projection, norm, residual.
        let out = pointwise(&self.w.point_w, &gated)?;
        self.norm.forward_add(&out, Some(x))
    }
}

/// `EfficientViTBlock`: multiscale linear attention, then GLUMBConv, each with its residual.
#[derive(Debug, Clone)]
pub(super) struct EfficientViTBlock {
    pub(super) attn: SanaMultiscaleLinearAttention,
    pub(super) conv_out: GluMbConv,
}

impl EfficientViTBlock {
    pub(super) fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            attn: SanaMultiscaleLinearAttention::new(s, vb.pp("attn"))?,
            conv_out: GluMbConv::new(s.channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for EfficientViTBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_out.forward(&self.attn.forward(x)?)
    }
}
