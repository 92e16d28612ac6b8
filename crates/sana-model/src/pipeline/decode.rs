//! Latents to pixels: the DC-AE decode (tiled when an un-tiled one would exceed the memory budget)
//! and the conversion to 8-bit RGB, streamed tile by tile when no resize is needed.

use candle_core::{DType, Tensor};

use super::SanaPipeline;
use crate::autoencoder::Tiling;
use crate::image::{resize_and_crop, to_rgb8};
use crate::Result;

impl SanaPipeline {
    /// The tiling a decode of `[b, ·, h, w]` latents uses: none while an un-tiled decode fits the
    /// memory budget, else diffusers' tiles (NVlabs' larger ones at 4K).
    fn decode_tiling(&self, b: usize, h: usize, w: usize) -> Option<Tiling> {
        self.vae
            .decode_exceeds(b, h, w, self.decode_budget_bytes)
            .then(|| {
                let f = self.vae_scale_factor();
                if h * f >= 4096 || w * f >= 4096 {
                    Tiling::for_4k()
                } else {
                    Tiling::default()
                }
            })
    }

    /// Latents as the DC-AE takes them: unscaled, in its dtype.
    fn vae_input(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(
            (latents.to_dtype(DType::F32)? / self.vae.config().scaling_factor)?
                .to_dtype(self.vae.dtype())?,
        )
    }

    /// Latents → images in [−1, 1] `[B, 3, H, W]` (f32), tiled when an un-tiled decode would
    /// exceed the memory budget.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        let tiling = self.decode_tiling(b, h, w);
        Ok(self
            .vae
            .decode_with(&self.vae_input(latents)?, tiling.as_ref())?
            .to_dtype(DType::F32)?)
    }

    /// Latents → one interleaved RGB8 buffer per image at `height × width`: the decode every
    /// generation ends with. When the decode is tiled and needs no resize, each finished tile is
    /// converted and written straight into the byte buffers, so no full-size float image is ever
    /// held (a 4096² image is 48 MB of bytes instead of 200 MB of f32 and its copies); the bytes
    /// are the same as converting the whole decoded image. A resize from a binned size needs the
    /// whole image in floats (diffusers' bilinear resize), so that case decodes whole.
    pub fn decode_to_rgb8(
        &self,
        latents: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let (b, _, h, w) = latents.dims4()?;
        let f = self.vae_scale_factor();
        let tiling = self.decode_tiling(b, h, w);
        let tiled = tiling.filter(|t| {
            (h * f, w * f) == (height, width)
                && (h * f > t.tile_sample_min_height || w * f > t.tile_sample_min_width)
        });
        let Some(t) = tiled else {
            let mut decoded = self.decode_latents(latents)?;
            if decoded.dims()[2..] != [height, width] {
                decoded = resize_and_crop(&decoded, height, width)?;
            }
            return to_rgb8(&decoded);
        };
        let mut out = vec![vec![0u8; height * width * 3]; b];
        let row_bytes = width * 3;
        self.vae
            .tiled_decode_each(&self.vae_input(latents)?, &t, |i, j, tile| {
                let tw = tile.dim(3)?;
                let (top, left) = (
                    i * t.tile_sample_stride_height,
                    j * t.tile_sample_stride_width,
                );
                for (image, rgb) in out.iter_mut().zip(to_rgb8(&tile)?) {
                    // [th, tw, 3] bytes into rows top.., columns left.. of the image.
                    for (r, src) in rgb.chunks_exact(tw * 3).enumerate() {
                        let start = (top + r) * row_bytes + left * 3;
                        image[start..start + tw * 3].copy_from_slice(src);
                    }
                }
                Ok(())
            })?;
        Ok(out)
    }
}
