//! Peak memory of DC-AE decoding, measured with a counting global allocator.
//!
//! How: this test binary installs a `#[global_allocator]` that wraps the system allocator and keeps
//! the bytes currently allocated and their high-water mark (atomics, so every rayon thread counts).
//! A measurement resets the mark to the current live bytes, runs the decode, and reads
//! `peak − live at start`: the extra memory the decode needed at its worst moment (CPU tensors are
//! plain heap `Vec`s, so this is all of it). It has its own binary so that no other test's
//! allocations are counted, and the tests in it take a lock so that they do not overlap.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig, Tiling};
use sana_model::image::to_rgb8;
use sana_model::pipeline::{LoadOptions, PipelineKind, SanaPipeline};
use sana_model::scheduler::SchedulerConfig;
use sana_model::text_encoder::SanaTextEncoder;
use sana_model::transformer::SanaTransformer2DModel;
use sana_model::weights::random_var_builder;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

/// Extra bytes `f` needed at its peak.
fn peak_extra(f: impl FnOnce()) -> usize {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed).saturating_sub(start)
}

/// The sana topology with narrow channels, random weights, f32.
fn narrow_model() -> AutoencoderDC {
    let cfg: AutoencoderDCConfig = serde_json::from_value(serde_json::json!({
        "latent_channels": 8,
        "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [4, 8, 8, 8, 8, 8],
        "decoder_block_out_channels": [4, 8, 8, 8, 8, 8],
        "encoder_layers_per_block": [1, 1, 1, 1, 1, 1],
        "decoder_layers_per_block": [1, 1, 1, 1, 1, 1],
        "upsample_block_type": "interpolate",
        "downsample_block_type": "Conv",
    }))
    .unwrap();
    AutoencoderDC::new(&cfg, random_var_builder(0.1, DType::F32, &Device::Cpu)).unwrap()
}

/// Peak extra bytes of a streamed tiled decode of a `side`² image (tiles are consumed and dropped,
/// as a pipeline writing pixels out would).
fn tiled_peak(model: &AutoencoderDC, side: usize) -> usize {
    let z = Tensor::randn(0f32, 1., (1, 8, side / 32, side / 32), &Device::Cpu).unwrap();
    let mut tiles = 0;
    let peak = peak_extra(|| {
        model
            .tiled_decode_each(&z, &Tiling::default(), |_, _, tile| {
                assert_eq!(tile.dim(1).unwrap(), 3);
                tiles += 1;
                Ok(())
            })
            .unwrap()
    });
    let per_side = (side / 32).div_ceil(14);
    assert_eq!(tiles, per_side * per_side);
    peak
}

#[test]
fn tiled_decode_peak_memory_is_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = narrow_model();
    let small = tiled_peak(&model, 1024);
    let large = tiled_peak(&model, 4096);
    eprintln!(
        "tiled decode peak: 1024² {:.1} MB, 4096² {:.1} MB, ratio {:.2}",
        small as f64 / 1e6,
        large as f64 / 1e6,
        large as f64 / small as f64
    );
    assert!(
        large as f64 <= 1.5 * small as f64,
        "4096² tiled decode peaked at {large} bytes, more than 1.5 × the 1024² peak {small}"
    );
}

#[test]
fn decode_peak_estimate_bounds_the_measured_peak() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = narrow_model();
    for (h, w) in [(8, 8), (4, 12)] {
        let z = Tensor::randn(0f32, 1., (1, 8, h, w), &Device::Cpu).unwrap();
        let measured = peak_extra(|| {
            model.decode(&z).unwrap();
        });
        let estimate = model.decode_peak_bytes(1, h, w);
        eprintln!("untiled decode {h}x{w}: measured peak {measured} bytes, estimate {estimate}");
        assert!(
            estimate >= measured && estimate <= 3 * measured,
            "estimate {estimate} should bound the measured peak {measured} within 3×"
        );
        assert!(model.decode_exceeds(1, h, w, measured / 2));
        assert!(!model.decode_exceeds(1, h, w, 3 * measured));
    }
}

/// The released f32c32 DC-AE's block structure (ResBlock ×3 stages then EfficientViT ×3, 3 layers
/// per decoder stage, multiscale 5 attention, interpolate up blocks, RMSNorm, SiLU) at a fraction
/// of its widths, with the 8 latent channels of the pipeline fixture's transformer.
fn reduced_real_vae() -> AutoencoderDC {
    let dir = common::fixtures().join("real-configs/vae");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dc-ae-f32c32-sana-1.0.json")).unwrap(),
    )
    .unwrap();
    cfg["latent_channels"] = 8.into();
    cfg["attention_head_dim"] = 8.into();
    cfg["encoder_block_out_channels"] = serde_json::json!([4, 8, 8, 8, 16, 16]);
    cfg["decoder_block_out_channels"] = serde_json::json!([8, 8, 16, 16, 32, 32]);
    let cfg: AutoencoderDCConfig = serde_json::from_value(cfg).unwrap();
    assert_eq!(
        cfg.decoder_layers_per_block,
        vec![3; 6],
        "the real structure"
    );
    AutoencoderDC::new(&cfg, random_var_builder(0.1, DType::F32, &Device::Cpu)).unwrap()
}

/// A pipeline as generations run it (the fixture's tiny Gemma and DiT, which the decode does not
/// touch) with the reduced DC-AE and a decode budget of zero bytes: every decode larger than one
/// tile is tiled.
fn decode_pipeline() -> SanaPipeline {
    let root = common::fixtures();
    let dev = Device::Cpu;
    let text = SanaTextEncoder::load(
        &root.join("text_encoder/pipeline/text_encoder"),
        &root.join("text_encoder/pipeline/tokenizer"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let transformer = SanaTransformer2DModel::load(
        &root.join("pipeline/sana/transformer"),
        None,
        DType::F32,
        &dev,
    )
    .unwrap();
    let scheduler =
        SchedulerConfig::from_file(root.join("pipeline/sana/scheduler/scheduler_config.json"))
            .unwrap();
    let mut opts = LoadOptions::new(dev);
    opts.decode_budget_bytes = 0;
    SanaPipeline::from_parts(
        PipelineKind::Sana,
        text,
        transformer,
        reduced_real_vae(),
        scheduler,
        &opts,
    )
}

/// The decode a generation runs (`SanaPipeline::decode_to_rgb8`: latents → RGB8 at the requested
/// size), tiling on: decoding a latent of 4× the area needs at most 1.5× the memory at its peak,
/// output bytes included; and the streamed bytes equal converting the whole decoded image.
#[test]
fn pipeline_decode_peak_memory_is_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pipe = decode_pipeline();
    let f = pipe.vae_scale_factor();
    let mut peaks = Vec::new();
    for side in [1024usize, 2048] {
        let latents = Tensor::randn(0f32, 1., (1, 8, side / f, side / f), &Device::Cpu).unwrap();
        let mut images = Vec::new();
        let peak = peak_extra(|| images = pipe.decode_to_rgb8(&latents, side, side).unwrap());
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].len(), side * side * 3);
        let untiled = pipe.vae().decode_peak_bytes(1, side / f, side / f);
        eprintln!(
            "pipeline decode {side}²: peak {:.1} MB (an un-tiled decode: about {:.1} MB)",
            peak as f64 / 1e6,
            untiled as f64 / 1e6
        );
        assert!(
            peak < untiled / 2,
            "{side}²: peak {peak} bytes is not what a tiled decode needs (un-tiled ≈ {untiled})"
        );
        if side == 1024 {
            let whole = to_rgb8(&pipe.decode_latents(&latents).unwrap()).unwrap();
            let c = sana_testing::assert_pixels_close(
                "streamed tiles vs whole",
                &images[0],
                &whole[0],
                0,
            );
            assert_eq!(c.differing, 0);
        }
        peaks.push(peak);
    }
    let ratio = peaks[1] as f64 / peaks[0] as f64;
    eprintln!("pipeline decode peak, 2048² over 1024² (4× the area): {ratio:.2}");
    assert!(
        ratio <= 1.5,
        "decoding 4× the area peaked at {ratio:.2}× the memory (limit 1.5×): {peaks:?} bytes"
    );
}
