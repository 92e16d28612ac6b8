//! 3×3 stride-1 padding-1 convolutions on CPU in f32 by Winograd's F(2×2, 3×3) (the DC-AE's most
//! common convolution).

use rayon::prelude::*;

/// Values in one of [`winograd_conv3x3`]'s two transformed bands (16 × channels × tiles; 16 MB).
pub(crate) const WINOGRAD_BAND_VALUES: usize = 4 << 20;

/// 3×3 stride-1 convolution with padding 1 by Winograd's F(2×2, 3×3): each 4×4 input patch and
/// each 3×3 filter go to a 4×4 transform domain where the convolution is 16 elementwise products
/// summed over input channels — 16 gemms `U[ξ] [Cout, Cin] · V[ξ] [Cin, tiles]` that do 16
/// multiplies per 2×2 outputs instead of 36 — and each output tile comes back by `Aᵀ M A`.
/// Bands of tile rows (at most `band_values` per transformed buffer, at least one tile row) bound
/// the workspace. Same operands as [`CpuConv`]; x is `[b, cin, h, wd]`.
///
/// 512² decode of the real DC-AE: 8.8 s, the banded im2col + gemm it replaces 12.5–13.0 s, diffusers
/// 12.7 s. F(2×2, 3×3)'s transforms only add, subtract and halve, so f32 parity stays ~1e-6.
pub(crate) fn winograd_conv3x3(
    x: &[f32],
    w: &[f32],
    (b, cin, h, wd): (usize, usize, usize, usize),
    cout: usize,
    kk1: usize,
    band_values: usize,
) -> Vec<f32> {
    let kk = cin * 9;
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let plane = h * wd;
    // U[ξ][co][ci] = (G g Gᵀ)[ξ], G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
    // U as [Cout][16][Cin], written in place per output channel; the gemms see U[ξ] with a row
    // stride of 16·Cin.
    let mut u = vec![0f32; 16 * cout * cin];
    u.par_chunks_mut(16 * cin)
        .enumerate()
        .for_each(|(co, dst)| {
            for ci in 0..cin {
                let g = &w[co * kk1 + ci * 9..co * kk1 + ci * 9 + 9];
                // t = G g (4×3), then t Gᵀ (4×4).
                let mut t = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    t[0][c] = g0;
                    t[1][c] = 0.5 * (g0 + g1 + g2);
                    t[2][c] = 0.5 * (g0 - g1 + g2);
                    t[3][c] = g2;
                }
                for (row, tr) in t.iter().enumerate() {
                    let at = |col: usize| (row * 4 + col) * cin + ci;
                    dst[at(0)] = tr[0];
                    dst[at(1)] = 0.5 * (tr[0] + tr[1] + tr[2]);
                    dst[at(2)] = 0.5 * (tr[0] - tr[1] + tr[2]);
                    dst[at(3)] = tr[2];
                }
            }
        });
    let mut out = vec![0f32; b * cout * plane];
    let band_rows = (band_values / (16 * cin.max(cout) * tw).max(1)).clamp(1, th);
    // V as [Cin][16][tiles] and M as [Cout][16][tiles]: each channel's transform reads or writes
    // one contiguous block, and the gemms see V[ξ] and M[ξ] as matrices with a row stride.
    let mut v = vec![0f32; 16 * cin * band_rows * tw];
    let mut m = vec![0f32; 16 * cout * band_rows * tw];
    let threads = rayon::current_num_threads();
    // A padded input row: index j holds column j − 1; tiles read columns 2·tx − 1 ..= 2·tx + 2.
    let wpad = 2 * tw + 2;
    for bi in 0..b {
        let xb = &x[bi * cin * plane..(bi + 1) * cin * plane];
        let ob = &mut out[bi * cout * plane..(bi + 1) * cout * plane];
        for ty0 in (0..th).step_by(band_rows) {
            let nty = band_rows.min(th - ty0);
            let nt = nty * tw;
            // V = Bᵀ d B, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
            v[..16 * cin * nt]
                .par_chunks_mut(16 * nt)
                .enumerate()
                .for_each(|(ci, dst)| {
                    let src = &xb[ci * plane..(ci + 1) * plane];
                    let mut rows = [0f32; 4].map(|_| vec![0f32; wpad]);
                    let mut q = [0f32; 4].map(|_| vec![0f32; wpad]);
                    for tyl in 0..nty {
                        let ty = ty0 + tyl;
                        for (r, row) in rows.iter_mut().enumerate() {
                            let y = (2 * ty + r) as isize - 1;
                            if y < 0 || y >= h as isize {
                                row.fill(0.0);
                            } else {
                                let y = y as usize;
                                row[1..1 + wd].copy_from_slice(&src[y * wd..(y + 1) * wd]);
                            }
                        }
                        for j in 0..wpad {
                            let (d0, d1, d2, d3) = (rows[0][j], rows[1][j], rows[2][j], rows[3][j]);
                            q[0][j] = d0 - d2;
                            q[1][j] = d1 + d2;
                            q[2][j] = d2 - d1;
                            q[3][j] = d1 - d3;
                        }
                        for (r, qr) in q.iter().enumerate() {
                            let base = tyl * tw;
                            for tx in 0..tw {
                                let a = &qr[2 * tx..2 * tx + 4];
                                dst[(r * 4) * nt + base + tx] = a[0] - a[2];
                                dst[(r * 4 + 1) * nt + base + tx] = a[1] + a[2];
                                dst[(r * 4 + 2) * nt + base + tx] = a[2] - a[1];
                                dst[(r * 4 + 3) * nt + base + tx] = a[1] - a[3];
                            }
                        }
                    }
                });
            for xi in 0..16 {
                // M[ξ] [Cout, nt] = U[ξ] [Cout, Cin] · V[ξ] [Cin, nt].
                // SAFETY: U[ξ] (co, ci) is at co·16·cin + ξ·cin + ci < u.len(); V[ξ] (ci, t) at
                // ci·16·nt + ξ·nt + t < 16·cin·nt ≤ v.len(); M[ξ] (co, t) at co·16·nt + ξ·nt + t
                // < 16·cout·nt ≤ m.len().
                unsafe {
                    gemm::gemm(
                        cout,
                        nt,
                        cin,
                        m.as_mut_ptr().add(xi * nt),
                        1,
                        (16 * nt) as isize,
                        false,
                        u.as_ptr().add(xi * cin),
                        1,
                        (16 * cin) as isize,
                        v.as_ptr().add(xi * nt),
                        1,
                        (16 * nt) as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            }
            // Y = Aᵀ M A + bias, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
            let m = &m[..16 * cout * nt];
            ob.par_chunks_mut(plane)
                .zip(m.par_chunks(16 * nt))
                .enumerate()
                .for_each(|(co, (dst, mb))| {
                    let bias = w[co * kk1 + kk];
                    let s = |xi: usize| &mb[xi * nt..(xi + 1) * nt];
                    for tyl in 0..nty {
                        let ty = ty0 + tyl;
                        for i in 0..2 {
                            let yy = 2 * ty + i;
                            if yy >= h {
                                continue;
                            }
                            let row = &mut dst[yy * wd..(yy + 1) * wd];
                            // Row i of Aᵀ M (ξ = 4·row + column): i = 0 is M rows 0 + 1 + 2,
                            // i = 1 is M rows 1 − 2 − 3.
                            let (ra, rb, rc, sign) = if i == 0 {
                                (0, 4, 8, 1.0)
                            } else {
                                (4, 8, 12, -1.0)
                            };
                            let col = |c: usize, t: usize| {
                                s(ra + c)[t] + sign * (s(rb + c)[t] + s(rc + c)[t])
                            };
                            for tx in 0..tw {
                                let t = tyl * tw + tx;
                                let (r0, r1, r2, r3) = (col(0, t), col(1, t), col(2, t), col(3, t));
                                row[2 * tx] = r0 + r1 + r2 + bias;
                                if 2 * tx + 1 < wd {
                                    row[2 * tx + 1] = r1 - r2 - r3 + bias;
                                }
                            }
                        }
                    }
                });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::winograd_conv3x3;

    /// Winograd against candle's own conv2d: odd sizes (ragged last tiles), a batch, more output
    /// than input channels and the reverse, one band and one tile row per band.
    #[test]
    fn winograd_equals_conv2d() {
        let dev = Device::Cpu;
        for (b, cin, cout, h, w) in [
            (2, 5, 7, 7, 9),
            (1, 8, 3, 1, 1),
            (1, 3, 4, 10, 6),
            (2, 6, 6, 5, 12),
        ] {
            let x = Tensor::randn(0f32, 1., (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., cout, &dev).unwrap();
            let want = x
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let packed = Tensor::cat(
                &[wt.flatten_from(1).unwrap(), bias.unsqueeze(1).unwrap()],
                1,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tw = w.div_ceil(2);
            for band in [usize::MAX / 64, 1] {
                let got = winograd_conv3x3(&xs, &packed, (b, cin, h, w), cout, cin * 9 + 1, band);
                sana_testing::assert_close_f32(
                    &format!("b {b} cin {cin} cout {cout} {h}x{w} band {band} (tile row {tw})"),
                    &got,
                    &want,
                    1e-5,
                    "f32 tolerance 1e-5 × max|ref|",
                );
            }
        }
    }
}
