//! Images to bytes: PNG, JPEG (quality = `output_compression`) or lossless WebP, resized first
//! when a preview is smaller than the requested size.

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use sana_engine::sana_backend::Image;

use crate::types::OutputFormat;

/// Encodes `image` as `format`; `compression` (0..=100) is the JPEG quality.
pub fn encode(
    image: &Image,
    format: OutputFormat,
    compression: u8,
) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    let (width, height) = (image.width, image.height);
    match format {
        OutputFormat::Png => PngEncoder::new(&mut out).write_image(
            &image.rgb8,
            width,
            height,
            ExtendedColorType::Rgb8,
        )?,
        OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, compression.clamp(1, 100))
            .write_image(&image.rgb8, width, height, ExtendedColorType::Rgb8)?,
        OutputFormat::Webp => WebPEncoder::new_lossless(&mut out).write_image(
            &image.rgb8,
            width,
            height,
            ExtendedColorType::Rgb8,
        )?,
    }
    Ok(out)
}

/// `image` scaled to `width`×`height` (unchanged when it already has that size).
pub fn resize(image: Image, width: u32, height: u32) -> Result<Image, image::ImageError> {
    if image.width == width && image.height == height {
        return Ok(image);
    }
    let buffer = RgbImage::from_raw(image.width, image.height, image.rgb8).ok_or_else(|| {
        image::ImageError::Parameter(image::error::ParameterError::from_kind(
            image::error::ParameterErrorKind::DimensionMismatch,
        ))
    })?;
    let resized = image::imageops::resize(&buffer, width, height, FilterType::Triangle);
    Ok(Image {
        width,
        height,
        rgb8: resized.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> Image {
        let rgb8 = (0..width * height)
            .flat_map(|i| {
                let (x, y) = (i % width, i / width);
                [(x * 255 / width) as u8, (y * 255 / height) as u8, 128]
            })
            .collect();
        Image::new(width, height, rgb8).expect("sized")
    }

    #[test]
    fn every_format_decodes_to_the_same_size() {
        let image = gradient(64, 32);
        for (format, expected) in [
            (OutputFormat::Png, image::ImageFormat::Png),
            (OutputFormat::Jpeg, image::ImageFormat::Jpeg),
            (OutputFormat::Webp, image::ImageFormat::WebP),
        ] {
            let bytes = encode(&image, format, 90).expect("encodes");
            assert_eq!(image::guess_format(&bytes).expect("known"), expected);
            let decoded = image::load_from_memory(&bytes).expect("decodes");
            assert_eq!((decoded.width(), decoded.height()), (64, 32), "{format:?}");
        }
    }

    #[test]
    fn lossless_formats_round_trip_and_jpeg_quality_trades_size() {
        let image = gradient(64, 64);
        for format in [OutputFormat::Png, OutputFormat::Webp] {
            let bytes = encode(&image, format, 0).expect("encodes");
            let decoded = image::load_from_memory(&bytes).expect("decodes").to_rgb8();
            assert_eq!(decoded.into_raw(), image.rgb8, "{format:?} is lossless");
        }
        let small = encode(&image, OutputFormat::Jpeg, 10)
            .expect("encodes")
            .len();
        let large = encode(&image, OutputFormat::Jpeg, 100)
            .expect("encodes")
            .len();
        assert!(
            small < large,
            "quality 10 ({small} B) should be smaller than 100 ({large} B)"
        );
    }

    #[test]
    fn previews_are_scaled_to_the_requested_size() {
        let resized = resize(gradient(2, 2), 64, 32).expect("resizes");
        assert_eq!(
            (resized.width, resized.height, resized.rgb8.len()),
            (64, 32, 64 * 32 * 3)
        );
    }
}
