//! Image-to-image and inpainting on the DC-AE encoder, as diffusers' flow-matching pipelines do them
//! (Sana has no inpainting checkpoint):
//!
//! - **image-to-image** (`StableDiffusion3Img2ImgPipeline`/`FluxImg2ImgPipeline` convention, and
//!   `SanaSprintImg2ImgPipeline` for SANA-Sprint): the image is encoded, the sampler starts at step
//!   `t_start = int(steps − min(steps·strength, steps))` ([`first_step`]) and the image latents are
//!   noised to that step's level with the sampler's forward process
//!   ([`crate::scheduler::Scheduler::noise_to`]). With `strength == 1` a flow sampler starts from the
//!   pure noise, as `StableDiffusion3InpaintPipeline` does, so strength 1 is text-to-image.
//! - **inpainting** (`StableDiffusion3InpaintPipeline`/`FluxInpaintPipeline`): the mask is binarised
//!   at one half and brought to the latent grid by nearest sampling (the top-left pixel of each
//!   32×32 block); after every step the kept region is replaced by the image latents noised to the
//!   next step's level with the same noise (the clean latents after the last step).
//!
//! Beyond diffusers: the output keeps the original's unmasked pixels, blended in over a short
//! feather ([`paste_unmasked`]), unless the request turns that off.

use candle_core::{DType, Device, Tensor};

use super::{GenerateRequest, SanaPipeline};
use crate::{Error, Result};

/// Width in pixels of the blend between generated and original pixels around an inpainted area.
pub const FEATHER_PX: usize = 8;

/// An image to start from and, for inpainting, which pixels to repaint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitImage {
    pub width: usize,
    pub height: usize,
    /// Interleaved RGB8, `width · height · 3` bytes.
    pub rgb8: Vec<u8>,
    /// Inpainting: one byte per pixel, 255 = repaint, 0 = keep (values are split at one half, as
    /// diffusers binarises); `None` for image-to-image.
    pub mask: Option<Vec<u8>>,
    /// Inpainting: keep the original's unmasked pixels in the output ([`paste_unmasked`]).
    pub preserve_unmasked: bool,
}

impl InitImage {
    /// Checks the buffers against the size.
    pub fn validate(&self) -> Result<()> {
        let px = self.width * self.height;
        if px == 0 || self.rgb8.len() != 3 * px {
            return Err(Error::Unsupported {
                field: "image",
                value: format!(
                    "{} bytes for {}x{}",
                    self.rgb8.len(),
                    self.width,
                    self.height
                ),
                reason: "an RGB8 image needs width · height · 3 bytes".into(),
            });
        }
        if let Some(mask) = &self.mask {
            if mask.len() != px {
                return Err(Error::Unsupported {
                    field: "mask",
                    value: format!("{} bytes for {}x{}", mask.len(), self.width, self.height),
                    reason: "a mask needs one byte per pixel of the image".into(),
                });
            }
        }
        Ok(())
    }

    /// Whether pixel `i` is repainted.
    fn repaint(mask: &[u8], i: usize) -> bool {
        mask[i] >= 128
    }
}

/// diffusers' `get_timesteps`: the index of the first step an edit of `strength` runs, computed in
/// f64 as Python does (`init = min(steps·strength, steps)`, `int(max(steps − init, 0))`; the
/// truncation means any positive strength runs at least the last step). Refused when the strength
/// is not in (0, 1].
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::Unsupported {
            field: "strength",
            value: strength.to_string(),
            reason: "must be in (0, 1]: the share of the schedule that repaints the image".into(),
        });
    }
    let n = steps as f64;
    let start = (n - (n * strength).min(n)).max(0.0) as usize;
    if start >= steps {
        return Err(Error::Unsupported {
            field: "strength",
            value: strength.to_string(),
            reason: format!(
                "with {steps} steps it leaves no step to run; raise it to at least {:.3} or use \
                 more steps",
                1.0 / n
            ),
        });
    }
    Ok(start)
}

/// Resizes interleaved 8-bit pixels with `channels` per pixel to `(w, h)` with a Lanczos-3 filter
/// (diffusers resizes with PIL's Lanczos); the same buffer when the size already fits.
fn resize(
    data: &[u8],
    channels: usize,
    (w0, h0): (usize, usize),
    (w, h): (usize, usize),
) -> Vec<u8> {
    if (w0, h0) == (w, h) {
        return data.to_vec();
    }
    let filter = image::imageops::FilterType::Lanczos3;
    if channels == 3 {
        let img = image::RgbImage::from_raw(w0 as u32, h0 as u32, data.to_vec())
            .expect("checked by InitImage::validate; this is a bug");
        image::imageops::resize(&img, w as u32, h as u32, filter).into_raw()
    } else {
        let img = image::GrayImage::from_raw(w0 as u32, h0 as u32, data.to_vec())
            .expect("checked by InitImage::validate; this is a bug");
        image::imageops::resize(&img, w as u32, h as u32, filter).into_raw()
    }
}

/// The image at the generation size `(w, h)` as the autoencoder takes it: `[1, 3, h, w]` f32,
/// `2·(u8/255) − 1` (diffusers' `VaeImageProcessor.preprocess`).
pub fn image_tensor(init: &InitImage, (w, h): (usize, usize), device: &Device) -> Result<Tensor> {
    let rgb = resize(&init.rgb8, 3, (init.width, init.height), (w, h));
    let pixels: Vec<f32> = rgb
        .iter()
        .map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0)
        .collect();
    // [h, w, 3] → [1, 3, h, w]
    Ok(Tensor::from_vec(pixels, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// The repaint mask on the latent grid, `[1, 1, h/f, w/f]` f32 (1 = repaint): resized to the
/// generation size, binarised at one half, then the pixel at `(f·i, f·j)` of each block, as
/// torch's nearest interpolation picks it. All ones for image-to-image.
pub fn latent_mask(
    init: &InitImage,
    (w, h): (usize, usize),
    factor: usize,
    device: &Device,
) -> Result<Tensor> {
    let (lh, lw) = (h / factor, w / factor);
    let values = match &init.mask {
        None => vec![1f32; lh * lw],
        Some(mask) => {
            let m = resize(mask, 1, (init.width, init.height), (w, h));
            (0..lh)
                .flat_map(|i| (0..lw).map(move |j| (i, j)))
                .map(|(i, j)| {
                    f32::from(u8::from(InitImage::repaint(
                        &m,
                        i * factor * w + j * factor,
                    )))
                })
                .collect()
        }
    };
    Ok(Tensor::from_vec(values, (1, 1, lh, lw), device)?)
}

/// Puts the original's unmasked pixels back over a generated image of the same size: every
/// repainted pixel stays generated, pixels farther than [`FEATHER_PX`] (chessboard distance) from
/// the repainted area are the original's exactly, and between them the weight of the generated
/// pixel falls linearly with the distance.
pub fn paste_unmasked(generated: &mut [u8], init: &InitImage) {
    let Some(mask) = &init.mask else { return };
    let (w, h) = (init.width, init.height);
    // Chessboard distance to the nearest repainted pixel, by two chamfer passes (capped).
    let cap = FEATHER_PX as u16 + 1;
    let mut d: Vec<u16> = (0..w * h)
        .map(|i| if InitImage::repaint(mask, i) { 0 } else { cap })
        .collect();
    let at = |d: &[u16], y: isize, x: isize| -> u16 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            cap
        } else {
            d[y as usize * w + x as usize]
        }
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let best = [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
                .iter()
                .map(|(dy, dx)| at(&d, y + dy, x + dx).saturating_add(1))
                .min()
                .unwrap_or(cap);
            let i = y as usize * w + x as usize;
            d[i] = d[i].min(best);
        }
    }
    for y in (0..h as isize).rev() {
        for x in (0..w as isize).rev() {
            let best = [(1, 1), (1, 0), (1, -1), (0, 1)]
                .iter()
                .map(|(dy, dx)| at(&d, y + dy, x + dx).saturating_add(1))
                .min()
                .unwrap_or(cap);
            let i = y as usize * w + x as usize;
            d[i] = d[i].min(best);
        }
    }
    for (i, &dist) in d.iter().enumerate() {
        let weight = 1.0 - (f32::from(dist) / FEATHER_PX as f32).min(1.0);
        for c in 0..3 {
            let k = 3 * i + c;
            let (g, o) = (f32::from(generated[k]), f32::from(init.rgb8[k]));
            generated[k] = (g * weight + o * (1.0 - weight)).round() as u8;
        }
    }
}

/// What the sampling loops need for an edit.
#[derive(Debug, Clone)]
pub struct EditStart<'a> {
    /// The encoded images × `scaling_factor`, one row per image, f32 `[B, C, h, w]`.
    pub image_latents: &'a Tensor,
    /// `[B, 1, h, w]` f32, 1 = repaint (all ones for an image-to-image row); `None` when no row
    /// is inpainted.
    pub mask: Option<&'a Tensor>,
    /// The first step to run ([`first_step`]).
    pub begin: usize,
    /// Start from the noise alone (a flow sampler at strength 1).
    pub pure_noise: bool,
}

/// The inpainting blend `(1 − m)·kept + m·x` (f32; `m` `[B, 1, h, w]`, 1 = repaint).
pub(crate) fn blend(kept: &Tensor, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let inv = mask.affine(-1.0, 1.0)?;
    Ok((kept.broadcast_mul(&inv)? + x.broadcast_mul(mask)?)?)
}

impl SanaPipeline {
    /// Checks an edit's images against the request; the first step it runs, `None` for
    /// text-to-image.
    pub(super) fn check_edit(&self, req: &GenerateRequest) -> Result<Option<usize>> {
        let with_image = req.items.iter().filter(|i| i.init_image.is_some()).count();
        let Some(strength) = req.strength else {
            if with_image > 0 {
                return Err(Error::Unsupported {
                    field: "strength",
                    value: "none".into(),
                    reason: "an edit (an item with an image) needs a strength".into(),
                });
            }
            return Ok(None);
        };
        if with_image != req.items.len() {
            return Err(Error::Unsupported {
                field: "image",
                value: format!("{with_image} of {} items", req.items.len()),
                reason: "every item of an edit needs its image".into(),
            });
        }
        for init in req.items.iter().filter_map(|i| i.init_image.as_ref()) {
            init.validate()?;
            if (init.width, init.height) != (req.width, req.height) {
                return Err(Error::Unsupported {
                    field: "image",
                    value: format!("{}x{}", init.width, init.height),
                    reason: format!(
                        "the image must have the request's size, {}x{} (resize it first)",
                        req.width, req.height
                    ),
                });
            }
        }
        Ok(Some(first_step(req.steps, strength)?))
    }

    /// The edit images at the generation size through the encoder (× scaling factor, f32), one
    /// row per image, and the repaint masks on the latent grid (`None` when no item inpaints).
    pub(super) fn edit_latents(
        &self,
        req: &GenerateRequest,
        size: (usize, usize),
        rows: &[u32],
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rows = Tensor::new(rows, &self.device)?;
        let inits: Vec<&InitImage> = req
            .items
            .iter()
            .map(|i| {
                i.init_image
                    .as_ref()
                    .expect("checked by check_edit; this is a bug")
            })
            .collect();
        let images = inits
            .iter()
            .map(|i| image_tensor(i, size, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let encoded = self
            .vae
            .encode(&Tensor::cat(&images, 0)?.to_dtype(self.vae.dtype())?)?;
        let latents = (encoded.to_dtype(DType::F32)? * self.vae.config().scaling_factor)?
            .index_select(&rows, 0)?;
        let mask = if inits.iter().any(|i| i.mask.is_some()) {
            let masks = inits
                .iter()
                .map(|i| latent_mask(i, size, self.vae_scale_factor(), &self.device))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&masks, 0)?.index_select(&rows, 0)?)
        } else {
            None
        };
        Ok((latents, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_is_diffusers_get_timesteps() {
        // (steps, strength) → t_start, as Python computes it in f64.
        for (n, s, want) in [
            (20, 1.0, 0),
            (20, 0.6, 8),
            (4, 0.7, 1), // 4 − 2.8 = 1.2000000000000002 → 1
            (2, 0.5, 1),
            (2, 0.51, 0),
            (10, 0.15, 8), // 10 − 1.5 → 8
            (3, 0.34, 1),  // 3 − 1.02 → 1
        ] {
            assert_eq!(first_step(n, s).unwrap(), want, "{n} steps, strength {s}");
        }
        // Truncation toward zero: any positive strength runs at least the last step.
        for (n, s, want) in [(2, 0.4, 1), (20, 0.04, 19), (50, 0.001, 49)] {
            assert_eq!(first_step(n, s).unwrap(), want, "{n} steps, strength {s}");
        }
        for (n, s) in [
            (5, 0.0),
            (5, -0.1),
            (5, 1.01),
            (5, f64::NAN),
            (5, f64::INFINITY),
        ] {
            assert!(first_step(n, s).is_err(), "{n} steps, strength {s}");
        }
    }

    fn init(w: usize, h: usize, mask: Vec<u8>) -> InitImage {
        InitImage {
            width: w,
            height: h,
            rgb8: vec![10; w * h * 3],
            mask: Some(mask),
            preserve_unmasked: true,
        }
    }

    #[test]
    fn paste_keeps_far_pixels_and_the_repainted_area() {
        let (w, h) = (40, 6);
        // Repaint columns 20.. (the right half).
        let mask: Vec<u8> = (0..w * h)
            .map(|i| if i % w >= 20 { 255 } else { 0 })
            .collect();
        let im = init(w, h, mask);
        let mut gen = vec![250u8; w * h * 3];
        paste_unmasked(&mut gen, &im);
        for y in 0..h {
            for x in 0..w {
                let v = gen[3 * (y * w + x)];
                if x >= 20 {
                    assert_eq!(v, 250, "repainted pixel ({x}, {y}) stays generated");
                } else if x + FEATHER_PX <= 20 {
                    assert_eq!(v, 10, "pixel ({x}, {y}) beyond the feather is the original");
                } else {
                    assert!(v > 10 && v < 250, "({x}, {y}) is blended: {v}");
                }
            }
        }
        // Monotone across the feather.
        let row: Vec<u8> = (0..w).map(|x| gen[3 * x]).collect();
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
    }

    #[test]
    fn latent_mask_samples_the_top_left_pixel_of_each_block() {
        let (w, h, f) = (8, 4, 4);
        // Repaint only pixel (x=4, y=0), the top-left of block (0, 1), and pixel (1, 1), inside
        // block (0, 0) but not its top-left.
        let mut mask = vec![0u8; w * h];
        mask[4] = 200;
        mask[w + 1] = 255;
        let m = latent_mask(&init(w, h, mask), (w, h), f, &Device::Cpu).unwrap();
        assert_eq!(
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0]
        );
    }
}
