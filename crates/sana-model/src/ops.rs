//! Custom tensor ops that candle lacks or runs too slowly for Sana.
//!
//! candle's grouped `conv2d` runs one convolution per group (hundreds of ms at Sana size on CPU,
//! tens of thousands of kernel launches on CUDA), and every elementwise op is a separate pass
//! over memory. These ops are one rayon loop over channel planes on CPU and one kernel on CUDA
//! (compiled at run time with NVRTC, which candle's CUDA build links). Sums are f32 for every dtype.
//!
//! * [`depthwise_conv2d`]: stride-1 depthwise convolution (`groups == channels`); the DC-AE's
//!   multiscale attention aggregation (5×5).
//! * [`glu_depthwise_conv2d`]: the middle of a `GLUMBConv` (DC-AE) in one pass: bias + SiLU after
//!   the 1×1 expansion, the 3×3 depthwise conv with its bias, and the GLU gate. NCHW.
//! * [`glu_depthwise_conv2d_nhwc`]: the same on channels-last maps, for the DiT, whose tokens are
//!   `[B, N, C]` rows: the 1×1 convs around it stay plain matmuls with no transposes.
//! * [`linear_attention`]: the ReLU linear attention core on CPU in one pass over q, k, v.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Depthwise 2-D convolution, stride 1, zero padding `padding` on each side.
///
/// `x`: `[B, C, H, W]`, `weight`: `[C, 1, K, K]`, `bias`: `[C]` or none.
/// Output: `[B, C, H + 2p − K + 1, W + 2p − K + 1]`, same dtype as `x`.
/// Equals `x.conv2d(weight, padding, 1, 1, C)` (+ bias), tested against it.
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    check_conv_shapes((c, h, w), x, weight, padding, 1)?;
    let bias = match bias {
        Some(b) => b.clone(),
        None => Tensor::zeros(c, x.dtype(), x.device())?,
    };
    if bias.dims() != [c] {
        candle_core::bail!(
            "depthwise_conv2d: bias {:?} does not fit {c} channels",
            bias.shape()
        )
    }
    let (x, weight, bias) = same_dtype_contiguous(x, weight, &bias)?;
    x.apply_op3_no_bwd(
        &weight,
        &bias,
        &DepthwiseOp {
            padding,
            glu: false,
        },
    )
}

/// The middle of a `GLUMBConv`, fused: with `a = SiLU(pre + pre_bias)` and
/// `z = depthwise(a, weight, padding) + bias`, returns `z[:, :C/2] · SiLU(z[:, C/2:])`.
///
/// `pre`: `[B, C, H, W]` (the 1×1 expansion without its bias), `biases`: `[2, C]` stacking
/// `pre_bias` and the depthwise `bias`, `weight`: `[C, 1, K, K]`. Output `[B, C/2, H', W']`.
pub fn glu_depthwise_conv2d(
    pre: &Tensor,
    weight: &Tensor,
    biases: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, h, w) = pre.dims4()?;
    check_conv_shapes((c, h, w), pre, weight, padding, 2)?;
    if biases.dims() != [2, c] {
        candle_core::bail!(
            "glu_depthwise_conv2d: biases {:?}, want [2, {c}]",
            biases.shape()
        )
    }
    let (pre, weight, biases) = same_dtype_contiguous(pre, weight, biases)?;
    pre.apply_op3_no_bwd(&weight, &biases, &DepthwiseOp { padding, glu: true })
}

/// [`glu_depthwise_conv2d`] on channels-last maps: `pre` `[B, H, W, C]` → `[B, H', W', C/2]`.
pub fn glu_depthwise_conv2d_nhwc(
    pre: &Tensor,
    weight: &Tensor,
    biases: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let (_, h, w, c) = pre.dims4()?;
    check_conv_shapes((c, h, w), pre, weight, padding, 2)?;
    if biases.dims() != [2, c] {
        candle_core::bail!(
            "glu_depthwise_conv2d_nhwc: biases {:?}, want [2, {c}]",
            biases.shape()
        )
    }
    let (pre, weight, biases) = same_dtype_contiguous(pre, weight, biases)?;
    pre.apply_op3_no_bwd(&weight, &biases, &GluNhwcOp { padding })
}

/// Checks a depthwise weight `[C, 1, K, K]` against an input with `c` channels of `h × w`;
/// `multiple`: the channel count must divide by it (2 for the GLU gate).
fn check_conv_shapes(
    (c, h, w): (usize, usize, usize),
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    multiple: usize,
) -> Result<()> {
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 || kh != kw || c % multiple != 0 {
        candle_core::bail!(
            "depthwise conv: weight {:?} does not fit input {:?} (want [C, 1, K, K])",
            weight.shape(),
            x.shape()
        )
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!(
            "depthwise conv: input {:?} smaller than kernel {kh}x{kw} with padding {padding}",
            x.shape()
        )
    }
    Ok(())
}

fn same_dtype_contiguous(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        x.contiguous()?,
        w.to_dtype(x.dtype())?.contiguous()?,
        b.to_dtype(x.dtype())?.contiguous()?,
    ))
}

struct DepthwiseOp {
    padding: usize,
    /// Fused GLUMBConv middle (see [`glu_depthwise_conv2d`]) instead of a plain depthwise conv.
    glu: bool,
}

impl DepthwiseOp {
    fn out_hw(&self, h: usize, w: usize, k: usize) -> (usize, usize) {
        (h + 2 * self.padding + 1 - k, w + 2 * self.padding + 1 - k)
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// One output plane: `out[oy, ox] = bias + Σ_{ky,kx} w[ky,kx] · in[oy+ky−p, ox+kx−p]`.
/// Written as shifted row accumulations so the inner loop is a contiguous, vectorisable axpy.
struct Plane {
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    ow: usize,
}

impl Plane {
    fn conv(&self, input: &[f32], kernel: &[f32], bias: f32, out: &mut [f32]) {
        let (h, w, k, pad, ow) = (self.h, self.w, self.k, self.pad, self.ow);
        out.fill(bias);
        let oh = out.len() / ow;
        for ky in 0..k {
            for kx in 0..k {
                let wv = kernel[ky * k + kx];
                // Output columns whose source column ox + kx − pad lies inside [0, w).
                let ox_lo = pad.saturating_sub(kx);
                let ox_hi = (w + pad).saturating_sub(kx).min(ow);
                if ox_lo >= ox_hi {
                    continue;
                }
                let ix_lo = ox_lo + kx - pad;
                let len = ox_hi - ox_lo;
                for oy in 0..oh {
                    let iy = oy + ky;
                    if iy < pad || iy - pad >= h {
                        continue;
                    }
                    let src = &input[(iy - pad) * w + ix_lo..][..len];
                    let dst = &mut out[oy * ow + ox_lo..][..len];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += wv * s;
                    }
                }
            }
        }
    }
}

fn contiguous_range(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("depthwise conv: non-contiguous input".into()))
}

/// The storage as f32: borrowed for f32, widened for half types.
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    let (start, end) = contiguous_range(l)?;
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("depthwise conv: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp3 for DepthwiseOp {
    fn name(&self) -> &'static str {
        if self.glu {
            "glu-depthwise-conv2d"
        } else {
            "depthwise-conv2d"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let k = wl.shape().dims()[2];
        let (oh, ow) = self.out_hw(h, w, k);
        let input = as_f32(xs, xl)?;
        let weight = as_f32(ws, wl)?;
        let bias = as_f32(bs, bl)?;
        let plane = Plane {
            h,
            w,
            k,
            pad: self.padding,
            ow,
        };
        let kk = k * k;
        let (hw, ohw) = (h * w, oh * ow);
        let out_c = if self.glu { c / 2 } else { c };
        let mut out = vec![0f32; b * out_c * ohw];
        if self.glu {
            // Output plane (n, j) reads input planes j (value) and j + C/2 (gate).
            let half = out_c;
            let (pre_bias, dw_bias) = bias.split_at(c);
            out.par_chunks_mut(ohw).enumerate().for_each_init(
                || (vec![0f32; hw], vec![0f32; ohw]),
                |(act, gate), (i, o)| {
                    let (n, j) = (i / half, i % half);
                    for (ch, dst) in [(j + half, gate.as_mut_slice()), (j, &mut *o)] {
                        let src = &input[(n * c + ch) * hw..][..hw];
                        for (a, x) in act.iter_mut().zip(src) {
                            *a = silu(x + pre_bias[ch]);
                        }
                        plane.conv(act, &weight[ch * kk..][..kk], dw_bias[ch], dst);
                    }
                    for (v, g) in o.iter_mut().zip(gate.iter()) {
                        *v *= silu(*g);
                    }
                },
            );
        } else {
            out.par_chunks_mut(ohw).enumerate().for_each(|(i, o)| {
                let ch = i % c;
                plane.conv(
                    &input[i * hw..][..hw],
                    &weight[ch * kk..][..kk],
                    bias[ch],
                    o,
                )
            });
        }
        Ok((store_like(xs, out)?, Shape::from((b, out_c, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, xs, xl, ws, wl, bs, bl)
    }
}

/// Channels-last fused GLUMBConv middle (see [`glu_depthwise_conv2d_nhwc`]).
struct GluNhwcOp {
    padding: usize,
}

impl CustomOp3 for GluNhwcOp {
    fn name(&self) -> &'static str {
        "glu-depthwise-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = xl.shape().dims4()?;
        let k = wl.shape().dims()[2];
        let pad = self.padding;
        let (oh, ow) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
        let half = c / 2;
        let input = as_f32(xs, xl)?;
        let weight = as_f32(ws, wl)?;
        let bias = as_f32(bs, bl)?;
        let (pre_bias, dw_bias) = bias.split_at(c);
        // 1. a = SiLU(pre + bias), one vectorised pass over rows of C channels.
        let mut act = vec![0f32; input.len()];
        act.par_chunks_mut(c)
            .zip(input.par_chunks(c))
            .for_each(|(a, x)| {
                for ((a, x), pb) in a.iter_mut().zip(x).zip(pre_bias) {
                    *a = silu(x + pb);
                }
            });
        // 2. Taps as [K·K, C] so every tap is a contiguous axpy over channels.
        let taps: Vec<f32> = (0..k * k)
            .flat_map(|t| (0..c).map(move |ch| (t, ch)))
            .map(|(t, ch)| weight[ch * k * k + t])
            .collect();
        // 3. Each output row: z = bias + Σ taps · a, then the GLU gate.
        let mut out = vec![0f32; b * oh * ow * half];
        out.par_chunks_mut(ow * half).enumerate().for_each_init(
            || vec![0f32; c],
            |z, (row, o)| {
                let (n, oy) = (row / oh, row % oh);
                for ox in 0..ow {
                    z.copy_from_slice(dw_bias);
                    for ky in 0..k {
                        let iy = oy + ky;
                        if iy < pad || iy - pad >= h {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = ox + kx;
                            if ix < pad || ix - pad >= w {
                                continue;
                            }
                            let src = &act[((n * h + iy - pad) * w + ix - pad) * c..][..c];
                            let tap = &taps[(ky * k + kx) * c..][..c];
                            for ((z, s), t) in z.iter_mut().zip(src).zip(tap) {
                                *z += t * s;
                            }
                        }
                    }
                    let (value, gate) = z.split_at(half);
                    for ((o, v), g) in o[ox * half..][..half].iter_mut().zip(value).zip(gate) {
                        *o = v * silu(*g);
                    }
                }
            },
        );
        Ok((store_like(xs, out)?, Shape::from((b, oh, ow, half))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::glu_nhwc(self.padding, xs, xl, ws, wl, bs, bl)
    }
}

/// `out` (f32) in the dtype of `like`.
fn store_like(like: &CpuStorage, out: Vec<f32>) -> Result<CpuStorage> {
    Ok(match like.dtype() {
        DType::F32 => CpuStorage::F32(out),
        DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    })
}

/// The ReLU linear attention core of `SanaLinearAttnProcessor2_0`, after the projections and
/// before `to_out`: for each head, `out_i = Σ_n v_n (k_n·q_i) / (Σ_n k_n·q_i + 1e-15)` with
/// `q = ReLU(q)`, `k = ReLU(k)`, all sums in f32.
///
/// `q`, `k`, `v`: `[B, N, D]` (any row strides, e.g. views into a fused qkv projection), `heads`
/// dividing D. Returns `[B, N, D]` in the input dtype, channel = head·(D/heads) + j.
/// On CPU this is one pass (the per-head `[d+1, d]` sums, then every output row); on other devices
/// it is the tensor-op formulation of diffusers (ones row appended to v, two matmuls).
pub fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, d) = q.dims3()?;
    if k.dims() != [b, n, d] || v.dims() != [b, n, d] || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "linear_attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if q.device().is_cpu() {
        let unit_last = |t: &Tensor| -> Result<Tensor> {
            if t.stride()[2] == 1 {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        let (k, v) = (
            unit_last(&k.to_dtype(q.dtype())?)?,
            unit_last(&v.to_dtype(q.dtype())?)?,
        );
        unit_last(q)?.apply_op3_no_bwd(&k, &v, &LinearAttentionOp { heads })
    } else {
        linear_attention_tensor_ops(q, k, v, heads)
    }
}

/// The device-generic formulation (see [`linear_attention`]).
pub fn linear_attention_tensor_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, n, d) = q.dims3()?;
    let hd = d / heads;
    // q as [B, h, d, N]; k as [B, h, N, d]; v as [B, h, d, N], ReLU on q and k, all in f32.
    let q = q.relu()?.to_dtype(DType::F32)?;
    let k = k.relu()?.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let q = q
        .reshape((b, n, heads, hd))?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let k = k
        .reshape((b, n, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let v = v.reshape((b, n, heads, hd))?.permute((0, 2, 3, 1))?;
    // A row of ones appended to v makes one matmul also yield Σ_n k_n (the normaliser).
    let ones = Tensor::ones((b, heads, 1, n), DType::F32, q.device())?;
    let v = Tensor::cat(&[&v, &ones], 2)?.contiguous()?; // [B, h, d+1, N]
    let o = v.matmul(&k)?.matmul(&q)?; // [B, h, d+1, d] · [B, h, d, N] → [B, h, d+1, N]
    let out = o
        .narrow(2, 0, hd)?
        .broadcast_div(&(o.narrow(2, hd, 1)? + 1e-15)?)?;
    // Merge heads: [B, h, d, N] → [B, D, N] → [B, N, D].
    out.reshape((b, d, n))?
        .transpose(1, 2)?
        .to_dtype(dtype)?
        .contiguous()
}

struct LinearAttentionOp {
    heads: usize,
}

impl CustomOp3 for LinearAttentionOp {
    fn name(&self) -> &'static str {
        "linear-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = ql.shape().dims3()?;
        let heads = self.heads;
        let hd = d / heads;
        // Row (batch i, token t) of a [B, N, D] view with unit last stride.
        fn rows<'a>(
            s: &'a CpuStorage,
            l: &Layout,
        ) -> Result<(std::borrow::Cow<'a, [f32]>, usize, usize, usize)> {
            let st = l.stride();
            let whole = match s {
                CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[..]),
                CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
                CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
                other => {
                    candle_core::bail!("linear_attention: unsupported dtype {:?}", other.dtype())
                }
            };
            Ok((whole, l.start_offset(), st[0], st[1]))
        }
        let (q, q0, qb, qn) = rows(qs, ql)?;
        let (k, k0, kb, kn) = rows(ks, kl)?;
        let (v, v0, vb, vn) = rows(vs, vl)?;
        // 1. Per (batch, head): S = Σ_n [v_n; 1] ⊗ ReLU(k_n), a [(d+1) × d] matrix.
        let sums: Vec<Vec<f32>> = (0..b * heads)
            .into_par_iter()
            .map(|task| {
                let (i, h) = (task / heads, task % heads);
                let mut s = vec![0f32; (hd + 1) * hd];
                let mut kr = vec![0f32; hd];
                for t in 0..n {
                    let krow = &k[k0 + i * kb + t * kn + h * hd..][..hd];
                    for (dst, x) in kr.iter_mut().zip(krow) {
                        *dst = x.max(0.0);
                    }
                    let vrow = &v[v0 + i * vb + t * vn + h * hd..][..hd];
                    for (r, vv) in vrow.iter().chain(std::iter::once(&1.0)).enumerate() {
                        for (acc, kk) in s[r * hd..][..hd].iter_mut().zip(&kr) {
                            *acc += vv * kk;
                        }
                    }
                }
                s
            })
            .collect();
        // 2. Each output row: out = S·ReLU(q) / (last row of S · ReLU(q) + 1e-15), per head.
        let mut out = vec![0f32; b * n * d];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || (vec![0f32; hd], vec![0f32; hd + 1]),
            |(qr, num), (row, o)| {
                let (i, t) = (row / n, row % n);
                for h in 0..heads {
                    let qrow = &q[q0 + i * qb + t * qn + h * hd..][..hd];
                    for (dst, x) in qr.iter_mut().zip(qrow) {
                        *dst = x.max(0.0);
                    }
                    let s = &sums[i * heads + h];
                    for (r, acc) in num.iter_mut().enumerate() {
                        *acc = s[r * hd..][..hd]
                            .iter()
                            .zip(qr.iter())
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                    let den = num[hd] + 1e-15;
                    for (dst, x) in o[h * hd..][..hd].iter_mut().zip(num.iter()) {
                        *dst = x / den;
                    }
                }
            },
        );
        Ok((store_like(qs, out)?, Shape::from((b, n, d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! CUDA kernels: one thread per output element, f32 accumulation, compiled once per process
    //! with NVRTC and cached by candle per device.

    use super::{contiguous_range, DepthwiseOp};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
    use std::sync::OnceLock;

    const MODULE: &str = "sana_depthwise";
    const SRC: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// Plain depthwise conv: y[n, c] = b[c] + sum w[c] * x[n, c].
template <typename T>
__device__ void dw(const T* x, const T* w, const T* b, T* y, int nc, int c, int h, int wd,
                   int k, int pad, int oh, int ow) {
  long total = (long)nc * oh * ow;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ox = i % ow; long t = i / ow; int oy = t % oh; long plane = t / oh; int ch = plane % c;
    const T* xp = x + plane * (long)h * wd; const T* wp = w + (long)ch * k * k;
    float acc = (float)b[ch];
    for (int ky = 0; ky < k; ++ky) {
      int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
      for (int kx = 0; kx < k; ++kx) {
        int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
        acc += (float)wp[ky * k + kx] * (float)xp[(long)iy * wd + ix];
      }
    }
    y[i] = (T)acc;
  }
}

// Fused GLUMBConv middle: a = silu(x + b[0]); z = dw(a) + b[1]; y[:, j] = z[:, j] * silu(z[:, j + C/2]).
template <typename T>
__device__ void glu_dw(const T* x, const T* w, const T* b, T* y, int nhalf, int c, int h, int wd,
                       int k, int pad, int oh, int ow) {
  int half = c / 2;
  long total = (long)nhalf * oh * ow;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int ox = i % ow; long t = i / ow; int oy = t % oh; long plane = t / oh;
    int j = plane % half; long n = plane / half;
    float z[2];
    for (int s = 0; s < 2; ++s) {
      int ch = j + s * half;
      const T* xp = x + (n * c + ch) * (long)h * wd; const T* wp = w + (long)ch * k * k;
      float pb = (float)b[ch]; float acc = (float)b[c + ch];
      for (int ky = 0; ky < k; ++ky) {
        int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
          int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
          acc += (float)wp[ky * k + kx] * silu((float)xp[(long)iy * wd + ix] + pb);
        }
      }
      z[s] = acc;
    }
    y[i] = (T)(z[0] * silu(z[1]));
  }
}

// Channels-last fused GLUMBConv middle: x [N, H, W, C] → y [N, H', W', C/2].
template <typename T>
__device__ void glu_dw_nhwc(const T* x, const T* w, const T* b, T* y, int nb, int c, int h, int wd,
                            int k, int pad, int oh, int ow) {
  int half = c / 2;
  long total = (long)nb * oh * ow * half;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
    int j = i % half; long t = i / half; int ox = t % ow; t /= ow; int oy = t % oh; long n = t / oh;
    float z[2];
    for (int s = 0; s < 2; ++s) {
      int ch = j + s * half;
      const T* wp = w + (long)ch * k * k;
      float pb = (float)b[ch]; float acc = (float)b[c + ch];
      for (int ky = 0; ky < k; ++ky) {
        int iy = oy + ky - pad; if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
          int ix = ox + kx - pad; if (ix < 0 || ix >= wd) continue;
          acc += (float)wp[ky * k + kx] * silu((float)x[((n * h + iy) * (long)wd + ix) * c + ch] + pb);
        }
      }
      z[s] = acc;
    }
    y[i] = (T)(z[0] * silu(z[1]));
  }
}

#define KERNELS(SUFFIX, T) \
extern "C" __global__ void dw_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, int wd, \
  int k, int pad, int oh, int ow) { dw<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); } \
extern "C" __global__ void glu_dw_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, int wd, \
  int k, int pad, int oh, int ow) { glu_dw<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); } \
extern "C" __global__ void glu_dw_nhwc_##SUFFIX(const T* x, const T* w, const T* b, T* y, int n, int c, int h, \
  int wd, int k, int pad, int oh, int ow) { glu_dw_nhwc<T>(x, w, b, y, n, c, h, wd, k, pad, oh, ow); }
KERNELS(f32, float)
KERNELS(f16, __half)
KERNELS(bf16, __nv_bfloat16)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SRC)
                .map(|p| p.to_src())
                .map_err(|e| format!("nvrtc: {e}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        dims: [i32; 8],
        total: usize,
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let y = unsafe { dev.alloc::<T>(total)? };
        let threads = 256u32;
        let blocks = total.div_ceil(threads as usize).min(1 << 20) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(x);
        builder.arg(w);
        builder.arg(b);
        builder.arg(&y);
        for d in &dims {
            builder.arg(d);
        }
        // SAFETY: the arguments match the kernel signature above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn forward(
        op: &DepthwiseOp,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let k = wl.shape().dims()[2];
        let (oh, ow) = op.out_hw(h, w, k);
        let (out_c, kernel) = if op.glu { (c / 2, "glu_dw") } else { (c, "dw") };
        let dims = [
            (b * out_c) as i32,
            c as i32,
            h as i32,
            w as i32,
            k as i32,
            op.padding as i32,
            oh as i32,
            ow as i32,
        ];
        let slice = run(kernel, dims, b * out_c * oh * ow, xs, xl, ws, wl, bs, bl)?;
        Ok((slice, Shape::from((b, out_c, oh, ow))))
    }

    pub(super) fn glu_nhwc(
        padding: usize,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, w, c) = xl.shape().dims4()?;
        let k = wl.shape().dims()[2];
        let (oh, ow) = (h + 2 * padding + 1 - k, w + 2 * padding + 1 - k);
        let dims = [
            b as i32,
            c as i32,
            h as i32,
            w as i32,
            k as i32,
            padding as i32,
            oh as i32,
            ow as i32,
        ];
        let slice = run(
            "glu_dw_nhwc",
            dims,
            b * oh * ow * (c / 2),
            xs,
            xl,
            ws,
            wl,
            bs,
            bl,
        )?;
        Ok((slice, Shape::from((b, oh, ow, c / 2))))
    }

    /// Launches `<kernel>_<dtype>` over `total` outputs.
    #[allow(clippy::too_many_arguments)]
    fn run(
        kernel: &str,
        dims: [i32; 8],
        total: usize,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = xs.device.clone();
        let (xr, wr, br) = (
            contiguous_range(xl)?,
            contiguous_range(wl)?,
            contiguous_range(bl)?,
        );
        macro_rules! go {
            ($variant:ident, $suffix:literal, $x:expr, $w:expr, $b:expr) => {
                CudaStorageSlice::$variant(launch(
                    &format!("{kernel}_{}", $suffix),
                    &dev,
                    &$x.slice(xr.0..xr.1),
                    &$w.slice(wr.0..wr.1),
                    &$b.slice(br.0..br.1),
                    dims,
                    total,
                )?)
            };
        }
        let slice = match (&xs.slice, &ws.slice, &bs.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(wt), CudaStorageSlice::F32(bi)) => {
                go!(F32, "f32", x, wt, bi)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(wt), CudaStorageSlice::F16(bi)) => {
                go!(F16, "f16", x, wt, bi)
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(wt), CudaStorageSlice::BF16(bi)) => {
                go!(BF16, "bf16", x, wt, bi)
            }
            _ => candle_core::bail!("depthwise conv: unsupported or mixed dtypes on CUDA"),
        };
        Ok(CudaStorage { slice, device: dev })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Result<Tensor> {
        let c = x.dim(1)?;
        x.conv2d(w, pad, 1, 1, c)?
            .broadcast_add(&b.reshape((1, c, 1, 1))?)
    }

    /// max |a − b| / max(1, max |b|): f32 error relative to the reference's magnitude (the
    /// workspace's comparison: any non-finite value fails).
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (diff, scale) = sana_testing::max_abs_diff(a, b);
        Ok(diff / scale.max(1.0))
    }

    const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
        (2, 6, 7, 9, 3, 1),
        (1, 4, 11, 5, 5, 2),
        (2, 4, 6, 6, 3, 0),
        (1, 6, 9, 13, 5, 1),
        (1, 2, 1, 1, 3, 1),
    ];

    #[test]
    fn equals_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for &(bsz, c, h, w, k, pad) in SHAPES {
            let x = Tensor::randn(0f32, 1., (bsz, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1., c, &dev)?;
            let ours = depthwise_conv2d(&x, &wt, Some(&b), pad)?;
            let diff = max_diff(&ours, &reference(&x, &wt, &b, pad)?)?;
            assert!(
                diff < 1e-5,
                "k={k} pad={pad} {h}x{w}: max diff {diff} (f32 relative tolerance 1e-5)"
            );
        }
        Ok(())
    }

    #[test]
    fn glu_equals_unfused_ops() -> Result<()> {
        let dev = Device::Cpu;
        for &(bsz, c, h, w, k, pad) in SHAPES {
            let pre = Tensor::randn(0f32, 1., (bsz, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let biases = Tensor::randn(0f32, 1., (2, c), &dev)?;
            let a = pre
                .broadcast_add(&biases.i(0)?.reshape((1, c, 1, 1))?)?
                .silu()?;
            let z = reference(&a, &wt, &biases.i(1)?, pad)?;
            let want = (z.narrow(1, 0, c / 2)? * z.narrow(1, c / 2, c / 2)?.silu()?)?;
            let ours = glu_depthwise_conv2d(&pre, &wt, &biases, pad)?;
            assert_eq!(ours.dims(), want.dims());
            let diff = max_diff(&ours, &want)?;
            assert!(
                diff < 1e-5,
                "glu k={k} pad={pad} {h}x{w}: max diff {diff} (f32 relative tolerance 1e-5)"
            );
        }
        Ok(())
    }

    #[test]
    fn glu_nhwc_equals_nchw() -> Result<()> {
        let dev = Device::Cpu;
        for &(bsz, c, h, w, k, pad) in SHAPES {
            let pre = Tensor::randn(0f32, 1., (bsz, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let biases = Tensor::randn(0f32, 1., (2, c), &dev)?;
            let want = glu_depthwise_conv2d(&pre, &wt, &biases, pad)?.permute((0, 2, 3, 1))?;
            let ours = glu_depthwise_conv2d_nhwc(&pre.permute((0, 2, 3, 1))?, &wt, &biases, pad)?;
            let diff = max_diff(&ours, &want)?;
            assert!(
                diff < 1e-5,
                "nhwc k={k} pad={pad} {h}x{w}: max diff {diff} (f32 relative tolerance 1e-5)"
            );
        }
        Ok(())
    }

    #[test]
    fn linear_attention_cpu_kernel_equals_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        // q, k, v as views into one fused projection, like the DiT passes them.
        let qkv = Tensor::randn(0f32, 1., (2, 37, 3 * 24), &dev)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, 24)?,
            qkv.narrow(2, 24, 24)?,
            qkv.narrow(2, 48, 24)?,
        );
        let want = linear_attention_tensor_ops(&q, &k, &v, 3)?;
        let ours = linear_attention(&q, &k, &v, 3)?;
        let diff = max_diff(&ours, &want)?;
        assert!(
            diff < 1e-5,
            "linear attention: max diff {diff} (f32 relative tolerance 1e-5)"
        );
        let ours = linear_attention(&q.to_dtype(DType::BF16)?, &k, &v, 3)?;
        assert_eq!(ours.dtype(), DType::BF16);
        let diff = max_diff(&ours, &want)?;
        assert!(
            diff < 2e-2,
            "bf16 relative diff {diff} (bf16 tolerance 2e-2)"
        );
        Ok(())
    }

    #[test]
    fn bf16_strided_and_no_bias() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 5), &dev)?;
        let wt = Tensor::randn(0f32, 1., (3, 1, 3, 3), &dev)?;
        let zero = Tensor::zeros(3, DType::F32, &dev)?;
        let want = reference(&x, &wt, &zero, 1)?;
        let got = depthwise_conv2d(
            &x.to_dtype(DType::BF16)?,
            &wt.to_dtype(DType::BF16)?,
            None,
            1,
        )?;
        assert_eq!(got.dtype(), DType::BF16);
        let diff = max_diff(&got, &want)?;
        assert!(
            diff <= 2e-2,
            "bf16 relative diff {diff} (bf16 tolerance 2e-2)"
        );
        // A strided (non-contiguous) input is handled.
        let xt = x.transpose(2, 3)?;
        let diff = max_diff(
            &depthwise_conv2d(&xt, &wt, None, 1)?,
            &reference(&xt.contiguous()?, &wt, &zero, 1)?,
        )?;
        assert!(diff < 1e-5, "strided input: {diff}");
        assert!(depthwise_conv2d(&x.i((.., 0..2))?, &wt, None, 1).is_err());
        assert!(
            glu_depthwise_conv2d(&x, &wt, &Tensor::zeros((2, 3), DType::F32, &dev)?, 1).is_err()
        );
        Ok(())
    }
}
