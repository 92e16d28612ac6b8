//! `SanaTransformer2DModel` parity with diffusers on the committed random-weight fixtures
//! (`tools/gen_fixtures.py transformer`), loading, and batch invariance.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, fixtures, load};
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig, TransformerInput};
use sana_model::weights::read_config;

const PARITY_CASES: &[&str] = &[
    "square_p1",
    "nonsquare_p2",
    "pe_2k_nonsquare",
    "pe_4k_p2",
    "qknorm",
    "sprint_guidance",
];

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("transformer").join(case)
}

fn run(model: &SanaTransformer2DModel, io: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&TransformerInput {
            hidden_states: &io["hidden_states"],
            encoder_hidden_states: &io["encoder_hidden_states"],
            encoder_attention_mask: Some(&io["encoder_attention_mask"]),
            timestep: &io["timestep"],
            guidance: io.get("guidance"),
        })
        .expect("forward")
}

fn check_case(case: &str, variant: Option<&str>, dtype: DType, rel: f32, what: &str) {
    let dir = case_dir(case);
    let io = load(&dir.join("io.safetensors"));
    let model = SanaTransformer2DModel::load(&dir, variant, dtype, &common::device())
        .unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    let out = run(&model, &io);
    assert_eq!(out.dtype(), common::activation_dtype(dtype));
    assert_close(case, &out, &io["output"], rel, what);
}

#[test]
fn parity_f32() {
    for case in PARITY_CASES {
        check_case(
            case,
            None,
            DType::F32,
            1e-4,
            "f32 tolerance 1e-4 × max|ref|",
        );
    }
}

#[test]
fn parity_bf16_on_cpu() {
    for case in PARITY_CASES {
        check_case(
            case,
            None,
            DType::BF16,
            3e-2,
            "bf16 tolerance 3e-2 × max|ref|",
        );
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let dir = case_dir("sharded");
    let shards = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("diffusion_pytorch_model-") && name.ends_with(".safetensors")
        })
        .count();
    assert!(
        shards >= 2,
        "the sharded fixture must have at least two shards, has {shards}"
    );
    assert!(!dir.join("diffusion_pytorch_model.safetensors").exists());
    check_case(
        "sharded",
        None,
        DType::F32,
        1e-4,
        "f32 tolerance, sharded load",
    );
}

#[test]
fn variant_checkpoint_loads() {
    let dir = case_dir("variant_bf16");
    assert!(dir
        .join("diffusion_pytorch_model.bf16.safetensors")
        .is_file());
    check_case(
        "variant_bf16",
        Some("bf16"),
        DType::F32,
        1e-4,
        "f32 tolerance, bf16 variant file",
    );
    // Asking for a variant that has no file fails clearly rather than loading something else.
    let err =
        SanaTransformer2DModel::load(&dir, Some("fp16"), DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("diffusion_pytorch_model"), "{err}");
}

/// Writes a copy of `square_p1` whose weights pass through `edit`, returns its folder.
fn edited_copy(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = case_dir("square_p1");
    let dir = std::env::temp_dir().join(format!("sana-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = load(&src.join("diffusion_pytorch_model.safetensors"));
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match SanaTransformer2DModel::load(dir, None, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named_at_load() {
    let key = "transformer_blocks.1.attn2.to_k.weight";
    let dir = edited_copy("missing", |t| {
        t.remove(key).expect("fixture has the key");
    });
    let err = load_err(&dir);
    assert!(err.contains(key) && err.contains("missing"), "{err}");
}

#[test]
fn wrong_shape_is_named_at_load() {
    let key = "transformer_blocks.0.ff.conv_depth.weight";
    let dir = edited_copy("shape", |t| {
        let w = &t[key];
        let (c, one, kh, kw) = w.dims4().unwrap();
        let bad = Tensor::zeros((c, one, kh + 2, kw + 2), DType::F32, &Device::Cpu).unwrap();
        t.insert(key.to_string(), bad);
    });
    let err = load_err(&dir);
    assert!(err.contains(key), "{err}");
    assert!(
        err.contains("[") && err.contains("5, 5") && err.contains("3, 3"),
        "both shapes in: {err}"
    );
}

#[test]
fn batch_invariance() {
    // Each item's output in a batch equals its output alone (different mask lengths per item).
    for case in ["square_p1", "qknorm", "sprint_guidance", "pe_2k_nonsquare"] {
        let dir = case_dir(case);
        let io = load(&dir.join("io.safetensors"));
        let model = SanaTransformer2DModel::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
        let batched = run(&model, &io);
        let b = io["hidden_states"].dim(0).unwrap();
        for i in 0..b {
            let one: HashMap<String, Tensor> = io
                .iter()
                .map(|(k, v)| (k.clone(), v.i(i..i + 1).unwrap()))
                .collect();
            let alone = run(&model, &one);
            let (diff, _) = common::max_abs_diff(&alone, &batched.i(i..i + 1).unwrap());
            assert_eq!(
                diff, 0.0,
                "{case} item {i}: alone vs in batch differ by {diff:e}"
            );
        }
    }
}

#[test]
fn padded_text_is_ignored() {
    // Values at masked positions must not change the output.
    let dir = case_dir("square_p1");
    let io = load(&dir.join("io.safetensors"));
    let model = SanaTransformer2DModel::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let base = run(&model, &io);
    let mask = io["encoder_attention_mask"].unsqueeze(2).unwrap();
    let noise = io["encoder_hidden_states"].affine(3.0, 1.0).unwrap();
    let keep = io["encoder_hidden_states"].broadcast_mul(&mask).unwrap();
    let pad = noise
        .broadcast_mul(&mask.affine(-1.0, 1.0).unwrap())
        .unwrap();
    let mut io2 = io.clone();
    io2.insert("encoder_hidden_states".into(), (keep + pad).unwrap());
    let (diff, _) = common::max_abs_diff(&run(&model, &io2), &base);
    assert!(
        diff <= 1e-5,
        "padding values leaked into the output: {diff:e}"
    );
}

#[test]
fn real_configs_parse_with_spec_parameter_counts() {
    let dir = fixtures().join("real-configs/transformer");
    let counts: HashMap<String, usize> = read_config(&dir.join("param_counts.json")).unwrap();
    assert!(
        counts.len() >= 10,
        "expected ten released configs, found {}",
        counts.len()
    );
    // The spec's figures (sana-spec.md §1), independent of the generator.
    let spec = [
        ("Sana_600M_1024px", 591_747_872usize),
        ("Sana_1600M_1024px", 1_604_462_752),
        ("SANA1.5_4.8B_1024px", 4_721_825_952),
        ("Sana_Sprint_1.6B_1024px", 1_610_237_472),
    ];
    for (name, n) in spec {
        assert_eq!(
            counts[name], n,
            "{name}: generator count disagrees with the spec"
        );
    }
    for (name, expected) in &counts {
        let cfg: SanaTransformerConfig = read_config(&dir.join(format!("{name}.json"))).unwrap();
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.parameter_count(), *expected, "{name}: parameter count");
    }
}

#[test]
fn unsupported_config_names_the_field() {
    let base: serde_json::Value =
        read_config(&fixtures().join("real-configs/transformer/Sana_600M_512px.json")).unwrap();
    for (field, value) in [
        ("qk_norm", serde_json::json!("layer_norm")),
        ("cross_attention_dim", serde_json::json!(777)),
        ("patch_size", serde_json::json!(0)),
    ] {
        let mut v = base.clone();
        v[field] = value;
        let cfg: SanaTransformerConfig = serde_json::from_value(v).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains(field),
            "error for {field} should name it: {err}"
        );
    }
    // Unknown keys (old conversions) are ignored.
    let mut v = base;
    v["use_pe"] = serde_json::json!(false);
    v["caption_norm_scale_factor"] = serde_json::json!(0.1);
    let cfg: SanaTransformerConfig = serde_json::from_value(v).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.interpolation_scale, None);
}

#[test]
fn trimmed_text_equals_the_reference() {
    // Masked tokens are dropped before the cross-attention, per item: appending masked columns (with
    // random values) must leave the output at the diffusers reference, and each item keeps its own.
    for case in ["square_p1", "qknorm", "sprint_guidance"] {
        let dir = case_dir(case);
        let io = load(&dir.join("io.safetensors"));
        let model = SanaTransformer2DModel::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
        let (b, l, c) = io["encoder_hidden_states"].dims3().unwrap();
        let extra = 7;
        let junk = Tensor::randn(0f32, 3., (b, extra, c), &Device::Cpu).unwrap();
        let y = Tensor::cat(&[&io["encoder_hidden_states"], &junk], 1).unwrap();
        let m = Tensor::cat(
            &[
                &io["encoder_attention_mask"],
                &Tensor::zeros((b, extra), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let caption = model.prepare_caption(&y, Some(&m)).unwrap();
        let lengths: Vec<usize> = io["encoder_attention_mask"]
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        assert!(lengths.iter().all(|&n| n <= l));
        assert_eq!(
            caption.tokens(),
            lengths,
            "{case}: each item keeps exactly its own tokens"
        );
        let out = model
            .forward_with_caption(
                &io["hidden_states"],
                &io["timestep"],
                io.get("guidance"),
                &caption,
            )
            .unwrap();
        assert_close(
            case,
            &out,
            &io["output"],
            1e-4,
            "f32 tolerance, trimmed text",
        );
        // The pipelines' form: host-side lengths instead of a mask read back from the device.
        let by_length = model.prepare_caption_lengths(&y, &lengths).unwrap();
        assert_eq!(by_length.tokens(), lengths);
        let again = model
            .forward_with_caption(
                &io["hidden_states"],
                &io["timestep"],
                io.get("guidance"),
                &by_length,
            )
            .unwrap();
        assert_eq!(
            common::max_abs_diff(&again, &out).0,
            0.0,
            "{case}: lengths and mask give the same caption context"
        );
        assert!(model.prepare_caption_lengths(&y, &lengths[1..]).is_err());
        assert!(model
            .prepare_caption_lengths(&y, &vec![l + extra + 1; b])
            .is_err());
    }
}

#[test]
fn caption_context_is_reusable_across_steps() {
    let dir = case_dir("qknorm");
    let io = load(&dir.join("io.safetensors"));
    let model = SanaTransformer2DModel::load(&dir, None, DType::F32, &Device::Cpu).unwrap();
    let caption = model
        .prepare_caption(
            &io["encoder_hidden_states"],
            Some(&io["encoder_attention_mask"]),
        )
        .unwrap();
    for t in [999f32, 500., 3.] {
        let ts = Tensor::full(t, io["timestep"].dims(), &Device::Cpu).unwrap();
        let reused = model
            .forward_with_caption(&io["hidden_states"], &ts, None, &caption)
            .unwrap();
        let full = model
            .forward(&TransformerInput {
                hidden_states: &io["hidden_states"],
                encoder_hidden_states: &io["encoder_hidden_states"],
                encoder_attention_mask: Some(&io["encoder_attention_mask"]),
                timestep: &ts,
                guidance: None,
            })
            .unwrap();
        let (diff, _) = common::max_abs_diff(&reused, &full);
        assert_eq!(diff, 0.0, "t={t}: reused caption context differs");
    }
}
