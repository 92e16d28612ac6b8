//! Custom tensor ops that candle lacks or runs too slowly for Sana.
//!
//! * [`depthwise_conv2d`]: a stride-1 depthwise convolution (`groups == channels`), used by the
//!   DiT's Mix-FFN (3×3) and the DC-AE's multiscale attention (5×5). candle's grouped `conv2d`
//!   runs one convolution per group (hundreds of ms at Sana size on CPU, tens of thousands of kernel
//!   launches on CUDA); this op is one rayon loop over channel planes on CPU and one kernel on CUDA
//!   (compiled at run time with NVRTC). Sums are in f32 for every dtype.

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
    let (_b, c, h, w) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 || kh != kw {
        candle_core::bail!(
            "depthwise_conv2d: weight {:?} does not fit input {:?} (want [C, 1, K, K])",
            weight.shape(),
            x.shape()
        )
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        candle_core::bail!(
            "depthwise_conv2d: input {:?} smaller than kernel {kh}x{kw} with padding {padding}",
            x.shape()
        )
    }
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
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(&weight, &bias, &DepthwiseConv2d { padding })
}

struct DepthwiseConv2d {
    padding: usize,
}

impl DepthwiseConv2d {
    fn out_hw(&self, h: usize, w: usize, k: usize) -> (usize, usize) {
        (h + 2 * self.padding + 1 - k, w + 2 * self.padding + 1 - k)
    }
}

/// One output plane: `out[oy, ox] = bias + Σ_{ky,kx} w[ky,kx] · in[oy+ky−p, ox+kx−p]`.
/// Written as shifted row accumulations so the inner loop is a contiguous, vectorisable axpy.
#[allow(clippy::too_many_arguments)]
fn conv_plane(
    input: &[f32],
    h: usize,
    w: usize,
    kernel: &[f32],
    k: usize,
    pad: usize,
    bias: f32,
    out: &mut [f32],
    ow: usize,
) {
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

fn to_f32_vec(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("depthwise_conv2d: non-contiguous input".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("depthwise_conv2d: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp3 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
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
        let weight = to_f32_vec(ws, wl)?;
        let bias = to_f32_vec(bs, bl)?;
        let pad = self.padding;
        let plane = |input: &[f32], ch: usize, out: &mut [f32]| {
            conv_plane(
                input,
                h,
                w,
                &weight[ch * k * k..(ch + 1) * k * k],
                k,
                pad,
                bias[ch],
                out,
                ow,
            )
        };
        let shape = Shape::from((b, c, oh, ow));
        let storage = match xs {
            CpuStorage::F32(v) => {
                let (start, _) = xl.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("depthwise_conv2d: non-contiguous input".into())
                })?;
                let input = &v[start..];
                let mut out = vec![0f32; b * c * oh * ow];
                out.par_chunks_mut(oh * ow)
                    .enumerate()
                    .for_each(|(i, o)| plane(&input[i * h * w..(i + 1) * h * w], i % c, o));
                CpuStorage::F32(out)
            }
            CpuStorage::BF16(_) | CpuStorage::F16(_) => {
                // Half inputs: widen each plane to f32, convolve, narrow back (f32 sums).
                let input = to_f32_vec(xs, xl)?;
                let mut out = vec![0f32; b * c * oh * ow];
                out.par_chunks_mut(oh * ow)
                    .enumerate()
                    .for_each(|(i, o)| plane(&input[i * h * w..(i + 1) * h * w], i % c, o));
                match xs.dtype() {
                    DType::BF16 => {
                        CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
                    }
                    _ => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
                }
            }
            other => candle_core::bail!("depthwise_conv2d: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
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
        cuda::depthwise_fwd(self, xs, xl, ws, wl, bs, bl)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA kernel: one thread per output element, f32 accumulation, compiled once per process
    //! with NVRTC (candle's CUDA build links it already), cached by candle per device.

    use super::DepthwiseConv2d;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape};
    use std::sync::OnceLock;

    const MODULE: &str = "sana_depthwise_conv2d";
    const SRC: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
template <typename T>
__device__ void dw(const T* x, const T* w, const T* b, T* y, int bc, int c, int h, int wd,
                   int k, int pad, int oh, int ow) {
  long total = (long)bc * oh * ow;
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
#define DW(NAME, T) extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* y, \
  int bc, int c, int h, int wd, int k, int pad, int oh, int ow) { dw<T>(x, w, b, y, bc, c, h, wd, k, pad, oh, ow); }
DW(dw_f32, float)
DW(dw_f16, __half)
DW(dw_bf16, __nv_bfloat16)
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

    fn launch<T: DeviceRepr>(
        name: &str,
        dev: &candle_core::CudaDevice,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        b: &CudaSlice<T>,
        dims: [i32; 8],
        total: usize,
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(total)? };
        let threads = 256u32;
        let blocks = total.div_ceil(threads as usize).min(65_535 * 8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
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
        // SAFETY: argument list matches the kernel signature above.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn depthwise_fwd(
        op: &DepthwiseConv2d,
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
        let total = b * c * oh * ow;
        let dims = [
            (b * c) as i32,
            c as i32,
            h as i32,
            w as i32,
            k as i32,
            op.padding as i32,
            oh as i32,
            ow as i32,
        ];
        let dev = xs.device().clone();
        let range = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("depthwise_conv2d: non-contiguous input".into())
            })
        };
        let (xr, wr, br) = (range(xl)?, range(wl)?, range(bl)?);
        let slice = match (&xs.slice, &ws.slice, &bs.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(wt), CudaStorageSlice::F32(bi)) => {
                CudaStorageSlice::F32(launch(
                    "dw_f32",
                    &dev,
                    &x.slice(xr.0..xr.1),
                    &wt.slice(wr.0..wr.1),
                    &bi.slice(br.0..br.1),
                    dims,
                    total,
                )?)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(wt), CudaStorageSlice::F16(bi)) => {
                CudaStorageSlice::F16(launch(
                    "dw_f16",
                    &dev,
                    &x.slice(xr.0..xr.1),
                    &wt.slice(wr.0..wr.1),
                    &bi.slice(br.0..br.1),
                    dims,
                    total,
                )?)
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(wt), CudaStorageSlice::BF16(bi)) => {
                CudaStorageSlice::BF16(launch(
                    "dw_bf16",
                    &dev,
                    &x.slice(xr.0..xr.1),
                    &wt.slice(wr.0..wr.1),
                    &bi.slice(br.0..br.1),
                    dims,
                    total,
                )?)
            }
            _ => candle_core::bail!("depthwise_conv2d: unsupported or mixed dtypes on CUDA"),
        };
        Ok((
            CudaStorage { slice, device: dev },
            Shape::from((b, c, oh, ow)),
        ))
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

    #[test]
    fn equals_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for &(bsz, c, h, w, k, pad) in &[
            (2, 5, 7, 9, 3, 1),
            (1, 4, 11, 5, 5, 2),
            (2, 3, 6, 6, 3, 0),
            (1, 6, 9, 13, 5, 1),
            (1, 2, 1, 1, 3, 1),
        ] {
            let x = Tensor::randn(0f32, 1., (bsz, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1., c, &dev)?;
            let ours = depthwise_conv2d(&x, &wt, Some(&b), pad)?;
            let theirs = reference(&x, &wt, &b, pad)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "k={k} pad={pad} {h}x{w}: max diff {diff} (f32 tolerance 1e-5)"
            );
        }
        Ok(())
    }

    #[test]
    fn bf16_and_no_bias() -> Result<()> {
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
        let got = got.to_dtype(DType::F32)?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = (got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff <= 2e-2 * scale,
            "bf16 diff {diff} vs scale {scale} (bf16 tolerance 2e-2)"
        );
        // A strided (non-contiguous) input is handled.
        let xt = x.transpose(2, 3)?;
        let got = depthwise_conv2d(&xt, &wt, None, 1)?;
        let want = reference(&xt.contiguous()?, &wt, &zero, 1)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "strided input: {diff}");
        assert!(depthwise_conv2d(&x.i((.., 0..2))?, &wt, None, 1).is_err());
        Ok(())
    }
}
