//! Resolution binning and image postprocessing, as diffusers' Sana pipelines do them
//! (`diffusers/image_processor.py`: `classify_height_width_bin`, `resize_and_crop_tensor`,
//! `denormalize`, `numpy_to_pil`; the bin tables of `pipeline_pixart_alpha/sigma.py` and
//! `pipeline_sana.py`).

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// diffusers `ASPECT_RATIO_512_BIN`: (ratio key, height, width), in the reference's order.
pub const ASPECT_RATIO_512_BIN: &[(&str, u32, u32)] = &[
    ("0.25", 256, 1024),
    ("0.28", 256, 928),
    ("0.32", 288, 896),
    ("0.33", 288, 864),
    ("0.35", 288, 832),
    ("0.4", 320, 800),
    ("0.42", 320, 768),
    ("0.48", 352, 736),
    ("0.5", 352, 704),
    ("0.52", 352, 672),
    ("0.57", 384, 672),
    ("0.6", 384, 640),
    ("0.68", 416, 608),
    ("0.72", 416, 576),
    ("0.78", 448, 576),
    ("0.82", 448, 544),
    ("0.88", 480, 544),
    ("0.94", 480, 512),
    ("1.0", 512, 512),
    ("1.07", 512, 480),
    ("1.13", 544, 480),
    ("1.21", 544, 448),
    ("1.29", 576, 448),
    ("1.38", 576, 416),
    ("1.46", 608, 416),
    ("1.67", 640, 384),
    ("1.75", 672, 384),
    ("2.0", 704, 352),
    ("2.09", 736, 352),
    ("2.4", 768, 320),
    ("2.5", 800, 320),
    ("3.0", 864, 288),
    ("4.0", 1024, 256),
];

/// diffusers `ASPECT_RATIO_1024_BIN`: (ratio key, height, width), in the reference's order.
pub const ASPECT_RATIO_1024_BIN: &[(&str, u32, u32)] = &[
    ("0.25", 512, 2048),
    ("0.28", 512, 1856),
    ("0.32", 576, 1792),
    ("0.33", 576, 1728),
    ("0.35", 576, 1664),
    ("0.4", 640, 1600),
    ("0.42", 640, 1536),
    ("0.48", 704, 1472),
    ("0.5", 704, 1408),
    ("0.52", 704, 1344),
    ("0.57", 768, 1344),
    ("0.6", 768, 1280),
    ("0.68", 832, 1216),
    ("0.72", 832, 1152),
    ("0.78", 896, 1152),
    ("0.82", 896, 1088),
    ("0.88", 960, 1088),
    ("0.94", 960, 1024),
    ("1.0", 1024, 1024),
    ("1.07", 1024, 960),
    ("1.13", 1088, 960),
    ("1.21", 1088, 896),
    ("1.29", 1152, 896),
    ("1.38", 1152, 832),
    ("1.46", 1216, 832),
    ("1.67", 1280, 768),
    ("1.75", 1344, 768),
    ("2.0", 1408, 704),
    ("2.09", 1472, 704),
    ("2.4", 1536, 640),
    ("2.5", 1600, 640),
    ("3.0", 1728, 576),
    ("4.0", 2048, 512),
];

/// diffusers `ASPECT_RATIO_2048_BIN`: (ratio key, height, width), in the reference's order.
pub const ASPECT_RATIO_2048_BIN: &[(&str, u32, u32)] = &[
    ("0.25", 1024, 4096),
    ("0.26", 1024, 3968),
    ("0.27", 1024, 3840),
    ("0.28", 1024, 3712),
    ("0.32", 1152, 3584),
    ("0.33", 1152, 3456),
    ("0.35", 1152, 3328),
    ("0.4", 1280, 3200),
    ("0.42", 1280, 3072),
    ("0.48", 1408, 2944),
    ("0.5", 1408, 2816),
    ("0.52", 1408, 2688),
    ("0.57", 1536, 2688),
    ("0.6", 1536, 2560),
    ("0.68", 1664, 2432),
    ("0.72", 1664, 2304),
    ("0.78", 1792, 2304),
    ("0.82", 1792, 2176),
    ("0.88", 1920, 2176),
    ("0.94", 1920, 2048),
    ("1.0", 2048, 2048),
    ("1.07", 2048, 1920),
    ("1.13", 2176, 1920),
    ("1.21", 2176, 1792),
    ("1.29", 2304, 1792),
    ("1.38", 2304, 1664),
    ("1.46", 2432, 1664),
    ("1.67", 2560, 1536),
    ("1.75", 2688, 1536),
    ("2.0", 2816, 1408),
    ("2.09", 2944, 1408),
    ("2.4", 3072, 1280),
    ("2.5", 3200, 1280),
    ("2.89", 3328, 1152),
    ("3.0", 3456, 1152),
    ("3.11", 3584, 1152),
    ("3.62", 3712, 1024),
    ("3.75", 3840, 1024),
    ("3.88", 3968, 1024),
    ("4.0", 4096, 1024),
];

/// diffusers `ASPECT_RATIO_4096_BIN`: (ratio key, height, width), in the reference's order.
pub const ASPECT_RATIO_4096_BIN: &[(&str, u32, u32)] = &[
    ("0.25", 2048, 8192),
    ("0.26", 2048, 7936),
    ("0.27", 2048, 7680),
    ("0.28", 2048, 7424),
    ("0.32", 2304, 7168),
    ("0.33", 2304, 6912),
    ("0.35", 2304, 6656),
    ("0.4", 2560, 6400),
    ("0.42", 2560, 6144),
    ("0.48", 2816, 5888),
    ("0.5", 2816, 5632),
    ("0.52", 2816, 5376),
    ("0.57", 3072, 5376),
    ("0.6", 3072, 5120),
    ("0.68", 3328, 4864),
    ("0.72", 3328, 4608),
    ("0.78", 3584, 4608),
    ("0.82", 3584, 4352),
    ("0.88", 3840, 4352),
    ("0.94", 3840, 4096),
    ("1.0", 4096, 4096),
    ("1.07", 4096, 3840),
    ("1.13", 4352, 3840),
    ("1.21", 4352, 3584),
    ("1.29", 4608, 3584),
    ("1.38", 4608, 3328),
    ("1.46", 4864, 3328),
    ("1.67", 5120, 3072),
    ("1.75", 5376, 3072),
    ("2.0", 5632, 2816),
    ("2.09", 5888, 2816),
    ("2.4", 6144, 2560),
    ("2.5", 6400, 2560),
    ("2.89", 6656, 2304),
    ("3.0", 6912, 2304),
    ("3.11", 7168, 2304),
    ("3.62", 7424, 2048),
    ("3.75", 7680, 2048),
    ("3.88", 7936, 2048),
    ("4.0", 8192, 2048),
];

/// The bin table a transformer's `sample_size` selects (128 → 4096 px, 64 → 2048, 32 → 1024,
/// 16 → 512), or `None` for a model without one (which then does not bin).
pub fn bin_table(sample_size: usize) -> Option<&'static [(&'static str, u32, u32)]> {
    match sample_size {
        128 => Some(ASPECT_RATIO_4096_BIN),
        64 => Some(ASPECT_RATIO_2048_BIN),
        32 => Some(ASPECT_RATIO_1024_BIN),
        16 => Some(ASPECT_RATIO_512_BIN),
        _ => None,
    }
}

/// The binned `(height, width)` for a requested size: the entry whose ratio key is closest to
/// `height / width` (the first one on ties, as Python's `min`).
pub fn classify_height_width_bin(
    height: u32,
    width: u32,
    table: &[(&str, u32, u32)],
) -> (u32, u32) {
    let ar = height as f64 / width as f64;
    let mut best = (f64::INFINITY, table[0].1, table[0].2);
    for &(key, h, w) in table {
        let ratio: f64 = key
            .parse()
            .expect("bin table keys are numbers; this is a bug");
        let d = (ratio - ar).abs();
        if d < best.0 {
            best = (d, h, w);
        }
    }
    (best.1, best.2)
}

/// Resizes images `[B, C, H, W]` so they cover `new_height × new_width` (bilinear,
/// `align_corners=False`, no antialias), then crops the centre: `resize_and_crop_tensor`.
pub fn resize_and_crop(images: &Tensor, new_height: usize, new_width: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    if (h, w) == (new_height, new_width) {
        return Ok(images.clone());
    }
    let ratio = (new_height as f64 / h as f64).max(new_width as f64 / w as f64);
    let (rh, rw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
    let resized = images.upsample_bilinear2d(rh, rw, false)?;
    let (top, left) = ((rh - new_height) / 2, (rw - new_width) / 2);
    Ok(resized
        .narrow(2, top, new_height)?
        .narrow(3, left, new_width)?)
}

/// Decoder output in [−1, 1] `[B, 3, H, W]` → one interleaved RGB8 buffer per image:
/// `clamp(x/2 + 0.5, 0, 1) · 255`, rounded half to even (numpy's `round`).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, c, _, _) = images.dims4()?;
    if c != 3 {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "expected RGB images [B, 3, H, W], got {:?}",
            images.dims()
        ))));
    }
    // x/2 + 0.5 on the device, the clamp on the host (no scalar uploads), one read per image.
    let hwc = images
        .to_dtype(DType::F32)?
        .affine(0.5, 0.5)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    (0..b)
        .map(|i| {
            let v: Vec<f32> = hwc.get(i)?.flatten_all()?.to_vec1()?;
            Ok(v.into_iter()
                .map(|x| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
                .collect())
        })
        .collect()
}
