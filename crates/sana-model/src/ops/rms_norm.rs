//! The DC-AE's channel RMSNorm on CPU in f32, fused with its residual add.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// Channel RMSNorm (eps 1e-5) with weight and bias, plus an optional residual, on CPU in f32:
/// one pass for the per-pixel sums of squares, one writing every channel plane.
/// Operands: x `[B, C, H, W]`, params `[2C]` (weight then bias), residual shaped as x.
pub(crate) struct CpuRmsNorm {
    pub residual: bool,
}

impl CustomOp3 for CpuRmsNorm {
    fn name(&self) -> &'static str {
        "dcae-channel-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(p), CpuStorage::F32(r)) = (xs, ps, rs) else {
            candle_core::bail!("dcae-channel-rms-norm: f32 only")
        };
        if !xl.is_contiguous()
            || !pl.is_contiguous()
            || !rl.is_contiguous()
            || rl.shape() != xl.shape()
        {
            candle_core::bail!("dcae-channel-rms-norm: contiguous operands of one shape needed")
        }
        let (b, c, h, w) = xl.shape().dims4()?;
        let x = &x[xl.start_offset()..][..b * c * h * w];
        let r = &r[rl.start_offset()..][..b * c * h * w];
        let (wt, bs) = p[pl.start_offset()..][..2 * c].split_at(c);
        let plane = h * w;
        let mut out = vec![0f32; b * c * plane];
        const CHUNK: usize = 4096;
        for bi in 0..b {
            let xb = &x[bi * c * plane..(bi + 1) * c * plane];
            // 1. inv[px] = 1 / √(mean_c x² + eps), pixel chunks in parallel.
            let mut inv = vec![0f32; plane];
            inv.par_chunks_mut(CHUNK).enumerate().for_each(|(k, acc)| {
                let start = k * CHUNK;
                for ci in 0..c {
                    let src = &xb[ci * plane + start..ci * plane + start + acc.len()];
                    for (a, v) in acc.iter_mut().zip(src) {
                        *a += v * v;
                    }
                }
                for a in acc.iter_mut() {
                    *a = 1.0 / (*a / c as f32 + 1e-5).sqrt();
                }
            });
            // 2. out = x · inv · w + b (+ residual), channel planes in parallel.
            let ob = &mut out[bi * c * plane..(bi + 1) * c * plane];
            ob.par_chunks_mut(plane).enumerate().for_each(|(ci, dst)| {
                let src = &xb[ci * plane..(ci + 1) * plane];
                let (wc, bc) = (wt[ci], bs[ci]);
                for ((d, v), s) in dst.iter_mut().zip(src).zip(&inv) {
                    *d = v * s * wc + bc;
                }
                if self.residual {
                    let res = &r[(bi * c + ci) * plane..(bi * c + ci + 1) * plane];
                    for (d, v) in dst.iter_mut().zip(res) {
                        *d += v;
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
