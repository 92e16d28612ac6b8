//! `AutoencoderDC` parity with diffusers on the committed random-weight fixtures
//! (`tools/gen_fixtures.py autoencoder`): decode, encode and tiled decode, f32 and bf16 on CPU, plus
//! the real sana-1.0 config and config validation.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::{assert_close, fixtures, load};
use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig, Tiling};
use sana_model::weights::read_config;
use sana_model::Error;

/// sana_small: the sana-1.0 topology; pixel_shuffle: pixel-(un)shuffle blocks; quadratic: the
/// deepest stage has ≤ attention_head_dim tokens; batch_norm: the f32c32-in/mix shape.
const CASES: &[&str] = &["sana_small", "pixel_shuffle", "quadratic", "batch_norm"];

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("autoencoder").join(case)
}

fn model(case: &str, dtype: DType) -> (AutoencoderDC, HashMap<String, Tensor>) {
    let dir = case_dir(case);
    let io = load(&dir.join("io.safetensors"));
    let model = AutoencoderDC::load(&dir, None, dtype, &common::device())
        .unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    (model, io)
}

/// Decode and encode of `cases` against the reference outputs `decoded{suffix}` /
/// `encoded{suffix}` (suffix `_bf16`: diffusers run in bf16, see `tools/fixtures/autoencoder.py`).
fn check(cases: &[&str], dtype: DType, suffix: &str, rel: f32, what: &str, decode: bool) {
    for case in cases {
        let (model, io) = model(case, dtype);
        if decode {
            let decoded = model.decode(&io["latent"]).expect("decode");
            assert_eq!(decoded.dtype(), common::activation_dtype(dtype));
            assert_close(
                &format!("{case} decode"),
                &decoded,
                &io[&format!("decoded{suffix}")],
                rel,
                what,
            );
        }
        let encoded = model.encode(&io["image"]).expect("encode");
        assert_close(
            &format!("{case} encode"),
            &encoded,
            &io[&format!("encoded{suffix}")],
            rel,
            what,
        );
    }
}

#[test]
fn parity_f32() {
    check(
        CASES,
        DType::F32,
        "",
        1e-4,
        "f32 tolerance 1e-4 × max|ref|",
        true,
    );
}

const BF16: &str = "bf16 tolerance 3e-2 × max|ref| of diffusers in bf16";
const BF16_VS_F32: &str = "bf16 tolerance 3e-2 × max|ref| of diffusers in f32";

/// Decode and encode in bf16 on CPU, against diffusers run in bf16 and against diffusers in f32.
/// The random decoders are conditioned for bf16 (`condition_decoder` in
/// `tools/fixtures/autoencoder.py`): at the plain random init diffusers' own bf16 decode was 6–9%
/// of max|ref| away from its f32 one, so no bf16 implementation could have met 3e-2.
#[test]
fn parity_bf16_on_cpu() {
    check(CASES, DType::BF16, "_bf16", 3e-2, BF16, true);
    check(CASES, DType::BF16, "", 3e-2, BF16_VS_F32, true);
}

/// The trained DC-AE of the embedded model (`tools/scenes/reference.py`): a well-conditioned
/// decoder, on which bf16 decode, encode and tiled decode all hold 3e-2 — against diffusers in
/// bf16 and against diffusers in f32.
#[test]
fn trained_parity() {
    check(
        &["tiny_scenes"],
        DType::F32,
        "",
        1e-4,
        "f32 tolerance 1e-4 × max|ref|",
        true,
    );
    check(&["tiny_scenes"], DType::BF16, "_bf16", 3e-2, BF16, true);
    check(
        &["tiny_scenes"],
        DType::BF16,
        "",
        3e-2,
        "bf16 tolerance 3e-2 × max|ref| of diffusers in f32",
        true,
    );
    for (dtype, key, rel) in [
        (DType::F32, "tiled_decoded", 1e-4),
        (DType::BF16, "tiled_decoded_bf16", 3e-2),
        (DType::BF16, "tiled_decoded", 3e-2),
    ] {
        let (model, io) = model("tiny_scenes", dtype);
        let tiled = model
            .decode_with(&io["tiled_latent"], Some(&fixture_tiling(&io)))
            .unwrap();
        assert_close(
            &format!("tiny_scenes tiled decode {dtype:?} vs {key}"),
            &tiled,
            &io[key],
            rel,
            "tolerance × max|ref|",
        );
    }
}

fn fixture_tiling(io: &HashMap<String, Tensor>) -> Tiling {
    let t = io["tiling"].to_vec1::<i64>().unwrap();
    Tiling {
        tile_sample_min_height: t[0] as usize,
        tile_sample_min_width: t[1] as usize,
        tile_sample_stride_height: t[2] as usize,
        tile_sample_stride_width: t[3] as usize,
    }
}

#[test]
fn tiled_decode_matches_diffusers() {
    let (model, io) = model("sana_small", DType::F32);
    let tiling = fixture_tiling(&io);
    let z = &io["tiled_latent"];
    let tiled = model.decode_with(z, Some(&tiling)).expect("tiled decode");
    assert_close(
        "sana_small tiled decode",
        &tiled,
        &io["tiled_decoded"],
        1e-4,
        "f32 tolerance 1e-4 × max|ref|",
    );
    // The reference really differs from an un-tiled decode, so the blend is being checked.
    let plain = model.decode(z).unwrap();
    let (diff, _) = common::max_abs_diff(&plain, &io["tiled_decoded"]);
    assert!(diff > 1e-2, "tiling changed nothing (diff {diff})");
    // The streamed form hands over the same tiles in raster order.
    let mut last = None;
    model
        .tiled_decode_each(z, &tiling, |i, j, _| {
            assert!(last < Some((i, j)), "tiles out of order");
            last = Some((i, j));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        last,
        Some((1, 1)),
        "a 4×4 latent in 3-tiles every 2 gives 2×2 tiles"
    );
}

/// The tiling defaults are diffusers' (`AutoencoderDC.__init__`: 512-pixel tiles every 448), and the
/// 4K setting NVlabs uses; `decode_with` tiles exactly when diffusers' `_decode` does (a latent
/// larger than one tile in either direction, not one that fits it exactly); sizes and strides that
/// diffusers would mis-handle are refused by name.
#[test]
fn tiling_defaults_are_diffusers() {
    let t = Tiling::default();
    assert_eq!(
        (
            t.tile_sample_min_height,
            t.tile_sample_min_width,
            t.tile_sample_stride_height,
            t.tile_sample_stride_width
        ),
        (512, 512, 448, 448),
        "diffusers AutoencoderDC defaults"
    );
    let k = Tiling::for_4k();
    assert_eq!(
        (
            k.tile_sample_min_height,
            k.tile_sample_min_width,
            k.tile_sample_stride_height,
            k.tile_sample_stride_width
        ),
        (1024, 1024, 896, 896)
    );
    let (model, io) = model("sana_small", DType::F32);
    // Within one default tile (2×3 latent, 64×96 pixels): no tiling, bit-identical.
    let z = &io["latent"];
    let plain = model.decode(z).unwrap();
    assert_eq!(
        common::max_abs_diff(&model.decode_with(z, Some(&t)).unwrap(), &plain).0,
        0.0,
        "a latent within one tile is decoded whole"
    );
    // The fixture's 96-pixel tiles (3 latent pixels): a 3×3 latent fits one tile exactly and is
    // not tiled; the 4×4 one is, and equals the explicit tiled decode.
    let tiling = fixture_tiling(&io);
    let big = &io["tiled_latent"];
    let fits = big.narrow(2, 0, 3).unwrap().narrow(3, 0, 3).unwrap();
    assert_eq!(
        common::max_abs_diff(
            &model.decode_with(&fits, Some(&tiling)).unwrap(),
            &model.decode(&fits).unwrap()
        )
        .0,
        0.0,
        "a latent exactly one tile large is decoded whole (diffusers tiles only beyond it)"
    );
    for (h, w) in [(4, 3), (3, 4), (4, 4)] {
        let z = big.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
        let via = model.decode_with(&z, Some(&tiling)).unwrap();
        assert_eq!(
            common::max_abs_diff(&via, &model.tiled_decode(&z, &tiling).unwrap()).0,
            0.0,
            "{h}×{w}: decode_with tiles beyond one tile"
        );
        assert!(
            common::max_abs_diff(&via, &model.decode(&z).unwrap()).0 > 1e-3,
            "{h}×{w}: the tiled decode must differ from the whole one (the blend is real)"
        );
    }
    for (bad, field) in [
        (
            Tiling {
                tile_sample_stride_width: 600,
                ..t
            },
            "tile_sample_min_width",
        ),
        (
            Tiling {
                tile_sample_stride_height: 0,
                ..t
            },
            "tile_sample_min_height",
        ),
        (
            Tiling {
                tile_sample_min_height: 500,
                ..t
            },
            "tile_sample_min_height",
        ),
        (
            Tiling {
                tile_sample_stride_width: 440,
                ..t
            },
            "tile_sample_min_width",
        ),
    ] {
        let err = model.tiled_decode(big, &bad).unwrap_err();
        assert!(
            matches!(err, Error::Unsupported { field: f, .. } if f == field),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn tiled_decode_bf16() {
    let (model, io) = model("sana_small", DType::BF16);
    let tiled = model
        .decode_with(&io["tiled_latent"], Some(&fixture_tiling(&io)))
        .unwrap();
    for (key, what) in [("tiled_decoded_bf16", BF16), ("tiled_decoded", BF16_VS_F32)] {
        assert_close("sana_small tiled decode", &tiled, &io[key], 3e-2, what);
    }
}

/// Counts the parameters a model asks for without holding them (zeros, any dtype).
struct CountingBackend(std::sync::Mutex<usize>);

impl SimpleBackend for CountingBackend {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        *self.0.lock().unwrap() += s.elem_count();
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn real_sana_config_builds_with_the_spec_parameter_count() {
    let dir = fixtures().join("real-configs/vae");
    let cfg: AutoencoderDCConfig = read_config(&dir.join("dc-ae-f32c32-sana-1.0.json")).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.spatial_compression_ratio(), 32);
    assert_eq!(cfg.scaling_factor, 0.41407);
    assert_eq!(cfg.upsample_block_type, "interpolate");
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("param_count.json")).unwrap())
            .unwrap();
    assert_eq!(counts["dc-ae-f32c32-sana-1.0"], 312_250_275);
    assert_eq!(
        cfg.parameter_count(),
        312_250_275,
        "spec §1 parameter count"
    );

    // Building asks for exactly those parameters (BatchNorm statistics aside; there are none here).
    let backend = std::sync::Arc::new(CountingBackend(std::sync::Mutex::new(0)));
    struct Shared(std::sync::Arc<CountingBackend>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            i: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, i, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::BF16, Device::Cpu);
    AutoencoderDC::new(&cfg, vb).expect("real config builds");
    assert_eq!(*backend.0.lock().unwrap(), 312_250_275);
}

#[test]
fn fixture_configs_count_their_checkpoints() {
    for case in CASES {
        let dir = case_dir(case);
        let cfg: AutoencoderDCConfig = read_config(&dir.join("config.json")).unwrap();
        let weights = load(&dir.join("diffusion_pytorch_model.safetensors"));
        let params: usize = weights
            .iter()
            .filter(|(k, _)| {
                !k.ends_with("running_mean")
                    && !k.ends_with("running_var")
                    && !k.ends_with("num_batches_tracked")
            })
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(cfg.parameter_count(), params, "{case}");
    }
}

#[test]
fn fp16_and_unknown_options_are_refused() {
    let dir = case_dir("sana_small");
    let err = AutoencoderDC::load(&dir, None, DType::F16, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { field: "dtype", .. }),
        "{err}"
    );

    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (key, value, field) in [
        (
            "decoder_norm_types",
            serde_json::json!("layer_norm"),
            "decoder_norm_types",
        ),
        (
            "decoder_act_fns",
            serde_json::json!("relu6"),
            "decoder_act_fns",
        ),
        (
            "decoder_conv_act_fn",
            serde_json::json!("mish"),
            "decoder_conv_act_fn",
        ),
        (
            "encoder_block_types",
            serde_json::json!("Transformer"),
            "encoder_block_types",
        ),
        (
            "decoder_layers_per_block",
            serde_json::json!([1, 1, 0, 1, 1, 1]),
            "decoder_layers_per_block",
        ),
        (
            "encoder_qkv_multiscales",
            serde_json::json!([[], [], []]),
            "encoder_qkv_multiscales",
        ),
    ] {
        let mut v = base.clone();
        v[key] = value;
        let cfg: AutoencoderDCConfig = serde_json::from_value(v).unwrap();
        match cfg.validate() {
            Err(Error::Unsupported { field: f, .. }) => assert_eq!(f, field, "{key}"),
            other => panic!("{key}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn defaults_and_unknown_keys_follow_diffusers() {
    let cfg: AutoencoderDCConfig =
        serde_json::from_str(r#"{"_class_name": "AutoencoderDC", "something_new": 1}"#).unwrap();
    assert_eq!(cfg, AutoencoderDCConfig::default());
    assert_eq!(cfg.upsample_block_type, "pixel_shuffle");
    assert_eq!(cfg.downsample_block_type, "pixel_unshuffle");
    assert_eq!(cfg.encoder_layers_per_block, vec![2, 2, 2, 3, 3, 3]);
    assert_eq!(cfg.decoder_layers_per_block, vec![3, 3, 3, 3, 3, 3]);
    assert_eq!(cfg.scaling_factor, 1.0);
    assert_eq!(cfg.decoder_block_types.get(4), "ResBlock");
}

#[test]
fn wrong_input_shapes_are_errors() {
    let (model, io) = model("sana_small", DType::F32);
    let z = &io["latent"];
    assert!(model.decode(&z.narrow(1, 0, 3).unwrap()).is_err());
    let img = &io["image"];
    assert!(model.encode(&img.narrow(2, 0, 40).unwrap()).is_err());
}

/// The fixtures' down-scaled branches still matter (the generator asserts the same on diffusers,
/// `assert_scaled_branches_matter` in `tools/fixtures/autoencoder.py`): the attention output norms
/// (×0.1, and ×0.2 more in the conditioned decoders) and the conditioned decoders' residual branch
/// norms (×0.2). Removing any one of them (its norm zeroed, so the block passes its input through)
/// must move the reference output by at least 20× the f32 tolerance of `parity_f32`, so a bug in
/// such a branch cannot sit under that tolerance. Checked here with our model, whose f32 decode
/// and encode equal diffusers' within that tolerance.
#[test]
fn conditioned_branches_stay_visible_to_parity() {
    const F32_TOLERANCE: f32 = 1e-4;
    const MARGIN: f32 = 20.0;
    let dev = Device::Cpu;
    for case in CASES {
        let dir = case_dir(case);
        let cfg: AutoencoderDCConfig = read_config(&dir.join("config.json")).unwrap();
        let weights =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
                .unwrap();
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
        let mut modules: Vec<String> = weights
            .keys()
            .filter_map(|k| k.rsplit_once('.').map(|(m, _)| m.to_string()))
            .filter(|m| {
                m.ends_with("attn.norm_out")
                    || (m.starts_with("decoder.up_blocks.") && m.ends_with(".norm"))
            })
            .collect();
        modules.sort();
        modules.dedup();
        let attention = modules.iter().filter(|m| m.ends_with("norm_out")).count();
        assert!(
            attention >= 3 && modules.len() > attention,
            "{case}: expected scaled attention and residual norms, found {modules:?}"
        );
        let mut weakest = (f32::INFINITY, String::new());
        for module in &modules {
            let mut w = weights.clone();
            for (k, v) in w.iter_mut() {
                if k == &format!("{module}.weight") || k == &format!("{module}.bias") {
                    *v = v.zeros_like().unwrap();
                }
            }
            let model =
                AutoencoderDC::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &dev)).unwrap();
            let (got, reference) = if module.starts_with("decoder.") {
                (model.decode(&io["latent"]).unwrap(), &io["decoded"])
            } else {
                (model.encode(&io["image"]).unwrap(), &io["encoded"])
            };
            let (moved, scale) = common::max_abs_diff(&got, reference);
            let rel = moved / scale;
            assert!(
                rel >= MARGIN * F32_TOLERANCE,
                "{case}: without {module} the output moves by only {rel:.2e} × max|ref|, under \
                 {MARGIN} × the f32 tolerance {F32_TOLERANCE:e}: a bug there could hide"
            );
            if rel < weakest.0 {
                weakest = (rel, module.clone());
            }
        }
        eprintln!(
            "{case}: {} scaled branches; the least visible ({}) moves the output by {:.2e} × max|ref| \
             = {:.0}× the f32 tolerance",
            modules.len(),
            weakest.1,
            weakest.0,
            weakest.0 / F32_TOLERANCE
        );
    }
}
