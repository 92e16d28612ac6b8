//! Stride-1 convolutions on CPU in f32 for the DC-AE: banded im2col + one gemm per band, with 3×3
//! padding-1 convolutions handed to [`super::winograd`]. candle's CPU conv builds its im2col one
//! value at a time; this one copies rows.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

use super::winograd::{winograd_conv3x3, WINOGRAD_BAND_VALUES};

/// Values in one band of [`CpuConv`]'s im2col (16 M f32 = 64 MB; at least one output row), the path
/// of every stride-1 conv but 3×3 with padding 1 (those go to [`winograd_conv3x3`]). Fewer, larger
/// bands are faster (the weights are packed once per band): measured when 3×3 convs still took this
/// path, the 512² decode took 15.0 s at 4 MB bands, 13.5 s at 16 MB, 12.8 s at 64 MB and 256 MB.
const CONV_BAND_VALUES: usize = 16 << 20;

/// Stride-1 k×k convolution with zero padding on CPU in f32: for bands of output rows, an im2col
/// matrix `[Cin·k·k, rows·W]` built from shifted row copies, then one gemm per band that writes
/// the NCHW output in place on top of the bias.
///
/// Operands: x `[B, Cin, H, W]` contiguous, `packed` `[Cout, Cin·k·k + 1]`: the weight rows with
/// the bias as the last column.
pub(crate) struct CpuConv {
    pub k: usize,
    pub padding: usize,
}

impl CustomOp2 for CpuConv {
    fn name(&self) -> &'static str {
        "dcae-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("dcae-conv2d: f32 only")
        };
        if !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("dcae-conv2d: operands must be contiguous")
        }
        let x = &x[xl.start_offset()..];
        let w = &w[wl.start_offset()..];
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, kk1) = wl.shape().dims2()?;
        let (k, p) = (self.k, self.padding);
        let kk = cin * k * k;
        if kk1 != kk + 1 || h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!(
                "dcae-conv2d: weight {:?} does not fit input {:?}",
                wl.shape(),
                xl.shape()
            )
        }
        let (oh, ow) = (h + 2 * p + 1 - k, wd + 2 * p + 1 - k);
        if k == 3 && p == 1 {
            let out = winograd_conv3x3(x, w, (b, cin, h, wd), cout, kk1, WINOGRAD_BAND_VALUES);
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
        }
        let plane = oh * ow;
        let mut out = vec![0f32; b * cout * plane];
        // Bands of at most CONV_BAND_VALUES (64 MB) of im2col, at least one output row.
        let rows = (CONV_BAND_VALUES / (kk * ow).max(1)).clamp(1, oh);
        let mut col = vec![0f32; kk * rows * ow];
        let threads = rayon::current_num_threads();
        for bi in 0..b {
            let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
            let ob = &mut out[bi * cout * plane..(bi + 1) * cout * plane];
            // The bias under every output value; the gemm adds onto it.
            ob.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(co, dst)| dst.fill(w[co * kk1 + kk]));
            for y0 in (0..oh).step_by(rows) {
                let nr = rows.min(oh - y0);
                let ncols = nr * ow;
                // Row r = (ci, ky, kx) of the im2col band: input plane ci shifted by (ky, kx).
                col[..kk * ncols]
                    .par_chunks_mut(ncols)
                    .enumerate()
                    .for_each(|(r, dst)| {
                        let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                        let src = &xb[ci * h * wd..(ci + 1) * h * wd];
                        // Valid output columns: 0 ≤ ox + kx − p < W.
                        let lo = p.saturating_sub(kx).min(ow);
                        let hi = (wd + p).saturating_sub(kx).min(ow).max(lo);
                        for yy in 0..nr {
                            let d = &mut dst[yy * ow..(yy + 1) * ow];
                            let iy = (y0 + yy + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                d.fill(0.0);
                                continue;
                            }
                            let s = &src[iy as usize * wd..(iy as usize + 1) * wd];
                            d[..lo].fill(0.0);
                            d[hi..].fill(0.0);
                            d[lo..hi].copy_from_slice(&s[lo + kx - p..hi + kx - p]);
                        }
                    });
                // out[:, y0·W ..][Cout, ncols] += W [Cout, kk] · col [kk, ncols].
                // SAFETY: every pointer/stride pair addresses memory inside its slice: dst rows
                // start at co·plane + y0·ow and span ncols ≤ plane − y0·ow; lhs rows have stride
                // kk1 ≥ kk; rhs is the first kk·ncols values of `col`.
                unsafe {
                    gemm::gemm(
                        cout,
                        ncols,
                        kk,
                        ob.as_mut_ptr().add(y0 * ow),
                        1,
                        plane as isize,
                        true,
                        w.as_ptr(),
                        1,
                        kk1 as isize,
                        col.as_ptr(),
                        1,
                        ncols as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}
