//! diffusers' tiled decoding of `AutoencoderDC` (`enable_tiling`, `tiled_decode`, `blend_v/h`),
//! streamed tile by tile, and the peak-memory estimate that turns tiling on.

use candle_core::Tensor;

use super::AutoencoderDC;
use crate::ops::WINOGRAD_BAND_VALUES;
use crate::{Error, Result};

/// Tiled decoding settings, in image pixels (diffusers `enable_tiling`; defaults as diffusers).
///
/// A latent is cut into tiles of `tile_sample_min / 32` latent pixels every `tile_sample_stride / 32`,
/// each tile is decoded alone, and neighbours are blended over `min − stride` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Self {
            tile_sample_min_height: 512,
            tile_sample_min_width: 512,
            tile_sample_stride_height: 448,
            tile_sample_stride_width: 448,
        }
    }
}

impl Tiling {
    /// 1024-pixel tiles every 896 (the NVlabs setting for 4K; 512 tiles show seams in flat areas).
    pub fn for_4k() -> Self {
        Self {
            tile_sample_min_height: 1024,
            tile_sample_min_width: 1024,
            tile_sample_stride_height: 896,
            tile_sample_stride_width: 896,
        }
    }

    fn check(&self, ratio: usize) -> Result<()> {
        for (field, min, stride) in [
            (
                "tile_sample_min_height",
                self.tile_sample_min_height,
                self.tile_sample_stride_height,
            ),
            (
                "tile_sample_min_width",
                self.tile_sample_min_width,
                self.tile_sample_stride_width,
            ),
        ] {
            if stride < ratio
                || stride > min
                || !min.is_multiple_of(ratio)
                || !stride.is_multiple_of(ratio)
            {
                return Err(Error::Unsupported {
                    field,
                    value: format!("{min} (stride {stride})"),
                    reason: format!(
                        "tile size and stride must be multiples of {ratio} with 0 < stride ≤ size"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Linear blend ramp of diffusers' `blend_v` / `blend_h` along `dim` (2 = rows, 3 = columns):
/// the first `e` lines of `b` become `a_tail[y]·(1 − y/e) + b[y]·(y/e)`, where `a_tail` holds the
/// last `e` lines of the neighbour.
fn blend(a_tail: &Tensor, b: &Tensor, dim: usize, extent: usize) -> candle_core::Result<Tensor> {
    let e = extent.min(a_tail.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let a = a_tail.narrow(dim, a_tail.dim(dim)? - e, e)?;
    let head = b.narrow(dim, 0, e)?;
    // Weights y/e for y in 0..e, as torch computes `y / blend_extent` in double then the product
    // in the tensor dtype.
    let ramp: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let inv: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let wb = Tensor::from_vec(ramp, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let wa = Tensor::from_vec(inv, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let mixed = (a.broadcast_mul(&wa)? + head.broadcast_mul(&wb)?)?;
    let rest = b.narrow(dim, e, b.dim(dim)? - e)?;
    Tensor::cat(&[&mixed, &rest], dim)
}

impl AutoencoderDC {
    /// diffusers `_decode` with tiling enabled: tiles only when the latent exceeds one tile.
    pub fn decode_with(&self, z: &Tensor, tiling: Option<&Tiling>) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let ratio = self.cfg.spatial_compression_ratio();
        match tiling {
            Some(t)
                if h > t.tile_sample_min_height / ratio || w > t.tile_sample_min_width / ratio =>
            {
                self.tiled_decode(z, t)
            }
            _ => self.decode(z),
        }
    }

    /// diffusers `tiled_decode`: the whole image, assembled from blended tiles.
    pub fn tiled_decode(&self, z: &Tensor, tiling: &Tiling) -> Result<Tensor> {
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        self.tiled_decode_each(z, tiling, |ti, _tj, tile| {
            if rows.len() <= ti {
                rows.push(Vec::new());
            }
            rows[ti].push(tile);
            Ok(())
        })?;
        let rows = rows
            .iter()
            .map(|r| Tensor::cat(r, 3))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 2)?)
    }

    /// diffusers `tiled_decode`, streamed: hands each finished (blended and cropped) tile to
    /// `sink(row, column, tile)` in raster order; tile (i, j) covers image rows from
    /// `i · stride_h` and columns from `j · stride_w`.
    ///
    /// Memory stays bounded by one tile's decode plus the blend margins: diffusers keeps every
    /// decoded tile until the end, but a tile's blend only reads the last `min − stride` rows of
    /// the (already blended) tile above and the last columns of the one to its left, so only those
    /// are kept. The result is the same values.
    pub fn tiled_decode_each(
        &self,
        z: &Tensor,
        tiling: &Tiling,
        mut sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let _span = tracing::trace_span!("dcae_tiled_decode").entered();
        let ratio = self.cfg.spatial_compression_ratio();
        tiling.check(ratio)?;
        self.check_input(z, self.cfg.latent_channels, 1, "latent")?;
        let (_, _, h, w) = z.dims4()?;
        let (min_h, min_w) = (
            tiling.tile_sample_min_height / ratio,
            tiling.tile_sample_min_width / ratio,
        );
        let (stride_h, stride_w) = (
            tiling.tile_sample_stride_height / ratio,
            tiling.tile_sample_stride_width / ratio,
        );
        let blend_h = tiling.tile_sample_min_height - tiling.tile_sample_stride_height;
        let blend_w = tiling.tile_sample_min_width - tiling.tile_sample_stride_width;
        // The last `blend_h` rows of each blended tile of the previous tile row, by column.
        let mut above: Vec<Tensor> = Vec::new();
        for (ti, i) in (0..h).step_by(stride_h).enumerate() {
            let mut current: Vec<Tensor> = Vec::new();
            // The last `blend_w` columns of the blended tile to the left.
            let mut left: Option<Tensor> = None;
            for (tj, j) in (0..w).step_by(stride_w).enumerate() {
                let latent = z
                    .narrow(2, i, min_h.min(h - i))?
                    .narrow(3, j, min_w.min(w - j))?;
                let mut tile = self.decode(&latent)?;
                if ti > 0 {
                    tile = blend(&above[tj], &tile, 2, blend_h)?;
                }
                if let Some(l) = &left {
                    tile = blend(l, &tile, 3, blend_w)?;
                }
                let (th, tw) = (tile.dim(2)?, tile.dim(3)?);
                // Own storage for the kept margins (a view would keep the whole tile alive).
                let own = |t: Tensor| {
                    if t.is_contiguous() {
                        t.copy()
                    } else {
                        t.contiguous()
                    }
                };
                current.push(own(tile.narrow(
                    2,
                    th - blend_h.min(th),
                    blend_h.min(th),
                )?)?);
                left = Some(own(tile.narrow(
                    3,
                    tw - blend_w.min(tw),
                    blend_w.min(tw),
                )?)?);
                let crop = tile
                    .narrow(2, 0, tiling.tile_sample_stride_height.min(th))?
                    .narrow(3, 0, tiling.tile_sample_stride_width.min(tw))?;
                sink(ti, tj, crop)?;
            }
            above = current;
        }
        Ok(())
    }

    /// Estimated peak bytes of activations for an un-tiled decode of a `[batch, latent, h, w]`
    /// latent (weights not included): the largest working set of any block, counted as the maps
    /// alive at once — input, its f32 copy (bf16 on CPU), conv output and im2col, norm
    /// temporaries, shortcut and residual sum — at 4 bytes a value whatever the
    /// dtype (bf16 widens to f32 for norms and CPU convs; an overestimate on GPU errs towards
    /// tiling). The memory test checks it against a measured peak. The pipeline compares it with
    /// its budget to turn tiling on.
    pub fn decode_peak_bytes(&self, batch: usize, h: usize, w: usize) -> usize {
        let cfg = &self.cfg;
        let ch = &cfg.decoder_block_out_channels;
        let n = ch.len();
        // A 3×3 conv's workspace: on CPU the Winograd filters and its two transformed bands (16
        // values per 2×2 tile and channel, at least one tile row: width ≤ px / h), on GPU the
        // im2col matrix of candle's conv.
        let workspace = |cin: usize, px: usize| {
            if self.device.is_cpu() {
                let band = (4 * cin * px).min(WINOGRAD_BAND_VALUES.max(8 * cin * px / h.max(1)));
                16 * cin * cin + 2 * band
            } else {
                9 * cin * px * batch
            }
        };
        let mut peak = 0usize;
        for i in 0..n {
            let scale = 1usize << (n - 1 - i);
            let px = h * w * scale * scale; // per image
            let c = ch[i];
            let layers = cfg.decoder_layers_per_block[i];
            let block = match (layers, cfg.decoder_block_types.get(i)) {
                (0, _) => 0,
                (_, "ResBlock") => batch * px * 8 * c + workspace(c, px),
                // GLUMBConv: the 8C expansion, the 4C gate output, projection, norm, residual.
                _ => batch * px * 16 * c,
            };
            let up = if i + 1 < n && layers > 0 {
                // input (¼ size), upsampled input and its f32 copy, conv output, bias sum,
                // repeated and shuffled shortcut, sum.
                let cin = ch[i + 1];
                batch * px * (cin / 4 + 2 * cin + 5 * c) + workspace(cin, px)
            } else {
                0
            };
            peak = peak.max(block.max(up));
        }
        // Head at full resolution: norm temporaries, activation, conv copy and output.
        let head = if cfg.decoder_layers_per_block[0] > 0 {
            ch[0]
        } else {
            ch[1]
        };
        let full = h * w * (1 << (2 * (n - 1)));
        4 * peak.max(batch * full * (6 * head + 2 * cfg.in_channels) + workspace(head, full))
    }

    /// Whether an un-tiled decode of `[batch, ·, h, w]` is estimated to need more than
    /// `budget_bytes` of activations (see [`Self::decode_peak_bytes`]).
    pub fn decode_exceeds(&self, batch: usize, h: usize, w: usize, budget_bytes: usize) -> bool {
        self.decode_peak_bytes(batch, h, w) > budget_bytes
    }
}
