//! Depthwise convolutions: the plain one and the fused GLUMBConv middle (NCHW and channels-last).
//! CPU: one rayon task per channel plane, shifted-row accumulation. CUDA: the kernels of
//! `depthwise.cu`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{as_f32, store_like, vmath};

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
                    vmath::axpy(&mut out[oy * ow + ox_lo..][..len], wv, src);
                }
            }
        }
    }
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
                        vmath::silu_add(act, src, pre_bias[ch]);
                        plane.conv(act, &weight[ch * kk..][..kk], dw_bias[ch], dst);
                    }
                    vmath::mul_silu_in_place(o, gate);
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
            .for_each(|(a, x)| vmath::silu_bias(a, x, pre_bias));
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
                            vmath::mul_add(z, tap, src);
                        }
                    }
                    let (value, gate) = z.split_at(half);
                    vmath::mul_silu(&mut o[ox * half..][..half], value, gate);
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

#[cfg(feature = "cuda")]
mod cuda {
    //! Launches the kernels of `depthwise.cu` (PTX compiled at build time, loaded once per
    //! device by candle): one thread per output element, f32 accumulation.

    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::DepthwiseOp;
    use crate::ops::contiguous_range;
    use crate::ops::cuda::DEPTHWISE_PTX;

    /// The module name candle caches the loaded PTX under, per device.
    const MODULE: &str = "sana_depthwise";

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
        let func = dev.get_or_load_custom_func(name, MODULE, DEPTHWISE_PTX)?;
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
    use candle_core::DType;
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
