//! Gemma-2 encoder parity with transformers' `Gemma2Model`, Sana prompt encoding parity with
//! diffusers' `SanaPipeline.encode_prompt` (fixtures from `tools/gen_fixtures.py text_encoder`), the
//! real gemma-2-2b-it config, and proofs that the shortcuts change nothing the DiT can see.

use crate::common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::{assert_close, fixtures, load, max_abs_diff};
use sana_model::text_encoder::{
    preprocess, EncodeOptions, Gemma2Config, Gemma2Model, PromptEmbeds, SanaTextEncoder,
    DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
};
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig, TransformerInput};
use sana_model::weights::{random_var_builder, read_config};
use serde_json::Value;

const F32_TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    fixtures().join("text_encoder").join(name)
}

fn gemma_case(case: &str, dtype: DType, rel: f32, what: &str) {
    let d = dir(case);
    let io = load(&d.join("io.safetensors"));
    let model = Gemma2Model::load(&d, None, dtype, &common::device())
        .unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
    let out = model
        .forward(&io["input_ids"], Some(&io["attention_mask"]))
        .unwrap();
    assert_eq!(out.dtype(), common::activation_dtype(dtype));
    // Every row, padded ones included: the full forward computes them as transformers does.
    assert_close(case, &out, &io["last_hidden_state"], rel, what);
}

const GEMMA_CASES: &[&str] = &["gemma_tiny", "gemma_sliding", "gemma_sharded_causal_lm"];

#[test]
fn gemma_hidden_state_parity_f32() {
    for case in GEMMA_CASES {
        gemma_case(case, DType::F32, F32_TOL, "f32 tolerance 1e-4 × max|ref|");
    }
}

#[test]
fn gemma_hidden_state_parity_bf16() {
    for case in GEMMA_CASES {
        gemma_case(case, DType::BF16, 3e-2, "bf16 tolerance 3e-2 × max|ref|");
    }
}

#[test]
fn fixtures_cover_what_they_claim() {
    let sliding: Gemma2Config = read_config(&dir("gemma_sliding").join("config.json")).unwrap();
    let io = load(&dir("gemma_sliding").join("io.safetensors"));
    let t = io["input_ids"].dim(1).unwrap();
    assert!(
        sliding.sliding_window.unwrap() < t,
        "window shorter than the sequence"
    );
    assert!((0..sliding.num_hidden_layers).any(|i| sliding.is_sliding(i)));
    assert!(!sliding.is_sliding(0), "explicit layer_types are honoured");
    assert_eq!(
        sliding.rope_theta(),
        500.0,
        "rope_parameters.rope_theta is read"
    );
    let lengths: Vec<f32> = io["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(lengths.windows(2).any(|w| w[0] != w[1]), "{lengths:?}");
    let sharded = dir("gemma_sharded_causal_lm");
    let shards = std::fs::read_dir(&sharded)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.starts_with("model-") && n.ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 2, "sharded fixture has {shards} shards");
    let index = std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap();
    assert!(index.contains("\"model.embed_tokens.weight\""));
}

#[test]
fn f16_is_refused_with_a_clear_error() {
    let err = Gemma2Model::load(&dir("gemma_tiny"), None, DType::F16, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("dtype") && msg.contains("bf16"), "{msg}");
}

#[test]
fn cached_continuation_equals_full_forward() {
    // Windowed layers, a continuation starting at several split points.
    let d = dir("gemma_sliding");
    let io = load(&d.join("io.safetensors"));
    let model = Gemma2Model::load(&d, None, DType::F32, &Device::Cpu).unwrap();
    let ids = io["input_ids"].i(0).unwrap().to_dtype(DType::U32).unwrap();
    let ids: Vec<u32> = ids.to_vec1().unwrap();
    let full = io["last_hidden_state"].i(0).unwrap();
    let prefix = model.prefill(&ids[..9]).unwrap();
    assert_close(
        "prefill",
        prefix.hidden(),
        &full.narrow(0, 0, 9).unwrap(),
        F32_TOL,
        "f32",
    );
    for split in [1, 4, 9] {
        let rest = Tensor::new(&ids[split..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = model
            .forward_cached(&rest, &[ids.len() - split], &prefix, split)
            .unwrap();
        assert_close(
            &format!("continuation after {split}"),
            &out.i(0).unwrap(),
            &full.narrow(0, split, ids.len() - split).unwrap(),
            F32_TOL,
            "f32 tolerance 1e-4 × max|ref|",
        );
    }
}

/// The `input_ids` and `attention_mask` of one text-encoder call.
type Call = (Vec<Vec<u32>>, Vec<Vec<u8>>);

/// One `SanaPipeline.encode_prompt` case of `pipeline/cases.json`.
struct Case {
    name: String,
    prompts: Vec<String>,
    negatives: Vec<String>,
    n: usize,
    max: usize,
    chi: Option<Vec<String>>,
    n_chi: Option<usize>,
    calls: Vec<Call>,
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        other => panic!("not a prompt: {other}"),
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(dir("pipeline").join("cases.json")).unwrap();
    let all: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    all.into_iter()
        .map(|(name, c)| Case {
            name,
            prompts: strings(&c["prompt"]),
            negatives: strings(&c["negative_prompt"]),
            n: c["num_images_per_prompt"].as_u64().unwrap() as usize,
            max: c["max_sequence_length"].as_u64().unwrap() as usize,
            chi: c["complex_human_instruction"]
                .as_array()
                .map(|_| strings(&c["complex_human_instruction"])),
            n_chi: c["n_chi"].as_u64().map(|n| n as usize),
            calls: c["text_encoder_calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|call| {
                    let rows = |key: &str| -> Vec<Vec<u64>> {
                        serde_json::from_value(call[key].clone()).unwrap()
                    };
                    (
                        rows("input_ids")
                            .into_iter()
                            .map(|r| r.into_iter().map(|v| v as u32).collect())
                            .collect(),
                        rows("attention_mask")
                            .into_iter()
                            .map(|r| r.into_iter().map(|v| v as u8).collect())
                            .collect(),
                    )
                })
                .collect(),
        })
        .collect()
}

fn pipeline_encoder(chi: Option<&[String]>, shortcuts: bool) -> SanaTextEncoder {
    let d = dir("pipeline");
    let enc = SanaTextEncoder::load(
        &d.join("text_encoder"),
        &d.join("tokenizer"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let lines: Option<Vec<&str>> = chi.map(|c| c.iter().map(String::as_str).collect());
    enc.with_instruction(lines.as_deref())
        .with_shortcuts(shortcuts)
}

fn encode_case(enc: &SanaTextEncoder, case: &Case) -> PromptEmbeds {
    let prompts: Vec<&str> = case.prompts.iter().map(String::as_str).collect();
    let negatives: Vec<&str> = case.negatives.iter().map(String::as_str).collect();
    enc.encode_prompt(
        &prompts,
        &negatives,
        &EncodeOptions {
            max_sequence_length: case.max,
            num_images_per_prompt: case.n,
            do_classifier_free_guidance: true,
        },
    )
    .unwrap()
}

fn mask_rows(mask: &Tensor) -> Vec<Vec<u8>> {
    mask.to_dtype(DType::U8).unwrap().to_vec2().unwrap()
}

#[test]
fn token_ids_equal_diffusers() {
    for case in cases() {
        let enc = pipeline_encoder(case.chi.as_deref(), true);
        if let (Some(chi), Some(n_chi)) = (&case.chi, case.n_chi) {
            assert_eq!(
                enc.tokenizer().encode(&chi.join("\n")).unwrap().len(),
                n_chi,
                "{}: N_chi",
                case.name
            );
        }
        // diffusers calls Gemma once for the positive prompts, once for the negative ones.
        let (pos_ids, pos_mask) = &case.calls[0];
        let (neg_ids, neg_mask) = &case.calls[1];
        let negatives = if case.negatives.len() == 1 {
            vec![case.negatives[0].clone(); case.prompts.len()]
        } else {
            case.negatives.clone()
        };
        for (texts, instruction, ids, mask) in [
            (&case.prompts, true, pos_ids, pos_mask),
            (&negatives, false, neg_ids, neg_mask),
        ] {
            for (i, text) in texts.iter().enumerate() {
                let (got_ids, got_mask) = enc.token_ids(text, instruction, case.max).unwrap();
                assert_eq!(&got_ids, &ids[i], "{} {text:?}: token ids", case.name);
                assert_eq!(&got_mask, &mask[i], "{} {text:?}: mask", case.name);
            }
        }
    }
}

#[test]
fn fixture_prompts_cover_the_edge_cases() {
    let cases = cases();
    let chi = cases.iter().find(|c| c.name == "chi").unwrap();
    let (ids, mask) = &chi.calls[0];
    let real: Vec<usize> = mask
        .iter()
        .map(|m| m.iter().filter(|&&v| v == 1).count())
        .collect();
    assert!(real.contains(&ids[0].len()), "one prompt is truncated");
    assert!(chi.prompts.iter().any(|p| p.is_empty()), "an empty prompt");
    assert!(
        chi.prompts.iter().any(|p| p != p.trim()),
        "surrounding spaces"
    );
    assert!(chi
        .prompts
        .iter()
        .any(|p| p.chars().any(char::is_uppercase)));
    assert!(
        chi.prompts
            .iter()
            .any(|p| p.chars().any(|c| c as u32 > 0x1F000)),
        "emoji"
    );
    assert!(
        cases.iter().any(|c| c.chi.is_none()),
        "a case without instruction"
    );
    assert!(cases.iter().any(|c| c.n > 1), "several images per prompt");
    assert_eq!(
        chi.chi.as_deref().unwrap(),
        DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
        "the default instruction is diffusers' list verbatim"
    );
}

/// Compares ours with diffusers' `[negative; positive]`: masks exactly, embeddings within f32
/// tolerance at unmasked rows; with shortcuts the padded rows must be zero, without them every
/// row must match.
fn check_against_diffusers(case: &Case, ours: &PromptEmbeds, shortcuts: bool) {
    let t = load(&dir("pipeline").join("cases.safetensors"));
    let key = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let want = Tensor::cat(&[key("negative_prompt_embeds"), key("prompt_embeds")], 0).unwrap();
    let want_mask = Tensor::cat(
        &[
            key("negative_prompt_attention_mask"),
            key("prompt_attention_mask"),
        ],
        0,
    )
    .unwrap();
    assert_eq!(
        mask_rows(&ours.mask),
        mask_rows(&want_mask),
        "{}: masks",
        case.name
    );
    let label = format!("{} (shortcuts {shortcuts})", case.name);
    if shortcuts {
        let m = want_mask
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let ours_kept = ours.embeds.broadcast_mul(&m).unwrap();
        assert_close(
            &label,
            &ours_kept,
            &want.broadcast_mul(&m).unwrap(),
            F32_TOL,
            "f32 tolerance 1e-4 × max|ref| at unmasked rows",
        );
        let (pad, _) = max_abs_diff(&ours.embeds, &ours_kept);
        assert_eq!(pad, 0.0, "{label}: padded rows are zero by design");
    } else {
        assert_close(
            &label,
            &ours.embeds,
            &want,
            F32_TOL,
            "f32 tolerance 1e-4 × max|ref|, every row",
        );
    }
}

#[test]
fn encode_prompt_parity_with_diffusers() {
    for case in cases() {
        for shortcuts in [false, true] {
            let enc = pipeline_encoder(case.chi.as_deref(), shortcuts);
            let ours = encode_case(&enc, &case);
            check_against_diffusers(&case, &ours, shortcuts);
            if shortcuts {
                // Second time from the embedding cache: the same.
                assert!(enc.cached_prompts() > 0);
                let again = encode_case(&enc, &case);
                let (d, _) = max_abs_diff(&again.embeds, &ours.embeds);
                assert_eq!(d, 0.0, "{}: cached embeddings differ", case.name);
            }
        }
    }
}

fn tiny_dit(caption_channels: usize) -> SanaTransformer2DModel {
    let cfg: SanaTransformerConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16,
        "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
        "cross_attention_dim": 32, "caption_channels": caption_channels, "sample_size": 8
    }))
    .unwrap();
    SanaTransformer2DModel::new(&cfg, random_var_builder(0.3, DType::F32, &Device::Cpu)).unwrap()
}

fn dit(model: &SanaTransformer2DModel, e: &PromptEmbeds, x: &Tensor) -> Tensor {
    let b = e.embeds.dim(0).unwrap();
    let t = Tensor::full(500f32, b, &Device::Cpu).unwrap();
    model
        .forward(&TransformerInput {
            hidden_states: x,
            encoder_hidden_states: &e.embeds,
            encoder_attention_mask: Some(&e.mask),
            timestep: &t,
            guidance: None,
        })
        .unwrap()
}

#[test]
fn shortcuts_change_nothing_the_dit_sees() {
    let prompts = [
        "a red apple",
        "A Cat Sleeping on a WARM Windowsill, surrounded by pots of blooming red flowers",
        "",
        "🌃 starry night",
        "mountains covered in snow under a clear blue sky, reflected in a calm lake, with a small \
         house in the forest and smoke rising from the chimney, children playing in a park",
    ];
    let hidden = pipeline_encoder(None, true).hidden_size();
    let model = tiny_dit(hidden);
    let default_chi: Vec<String> = DEFAULT_COMPLEX_HUMAN_INSTRUCTION
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (chi, max) in [(Some(default_chi), 24), (None, 24), (None, 300)] {
        let full = pipeline_encoder(chi.as_deref(), false);
        let short = pipeline_encoder(chi.as_deref(), true);
        let opts = EncodeOptions {
            max_sequence_length: max,
            num_images_per_prompt: 2,
            do_classifier_free_guidance: true,
        };
        let a = full.encode_prompt(&prompts, &["", "blurry"], &opts);
        assert!(a.is_err(), "two negatives for five prompts are refused");
        let a = full.encode_prompt(&prompts, &[""], &opts).unwrap();
        let b = short.encode_prompt(&prompts, &[""], &opts).unwrap();
        let label = format!("instruction {} max {max}", chi.is_some());
        assert_eq!(mask_rows(&a.mask), mask_rows(&b.mask), "{label}: masks");
        // The full path's padded rows are not zero: the DiT must be what ignores them.
        let m = a.mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let (pad_diff, _) = max_abs_diff(&a.embeds, &a.embeds.broadcast_mul(&m).unwrap());
        assert!(
            pad_diff > 0.1,
            "{label}: padded rows of the full encode are nonzero"
        );
        let x = Tensor::randn(0f32, 1., (a.embeds.dim(0).unwrap(), 8, 8, 8), &Device::Cpu).unwrap();
        let out_full = dit(&model, &a, &x);
        let out_short = dit(&model, &b, &x);
        assert_close(
            &format!("DiT output, {label}"),
            &out_short,
            &out_full,
            F32_TOL,
            "f32 tolerance 1e-4 × max|ref|",
        );
        // Rows repeat per prompt consecutively, masks included: row 2i and 2i+1 are prompt i.
        let rows = mask_rows(&b.mask);
        let half = rows.len() / 2;
        for i in 0..prompts.len() {
            let r = half + 2 * i;
            assert_eq!(rows[r], rows[r + 1], "{label}: mask rows of prompt {i}");
            let (d, _) = max_abs_diff(&b.embeds.i(r).unwrap(), &b.embeds.i(r + 1).unwrap());
            assert_eq!(d, 0.0);
        }
        assert!(
            rows[half..]
                .windows(2)
                .any(|w| w[0].iter().sum::<u8>() != w[1].iter().sum::<u8>()),
            "{label}: prompts of several lengths"
        );
    }
}

#[test]
fn embedding_cache_is_bounded() {
    let enc = pipeline_encoder(None, true).with_cache_capacity(2);
    for p in ["one", "two", "three", "two"] {
        enc.encode(&[p], true, 16).unwrap();
    }
    assert_eq!(enc.cached_prompts(), 2);
    let off = pipeline_encoder(None, true).with_cache_capacity(0);
    off.encode(&["one"], true, 16).unwrap();
    assert_eq!(off.cached_prompts(), 0);
}

#[test]
fn encoder_is_shareable_and_refuses_bad_requests() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SanaTextEncoder>();
    let enc = pipeline_encoder(None, true);
    assert!(enc.encode(&[], true, 16).is_err(), "no prompts");
    assert!(
        enc.encode(&["a"], true, 0).is_err(),
        "max_sequence_length 0"
    );
    let opts = EncodeOptions {
        num_images_per_prompt: 0,
        ..EncodeOptions::default()
    };
    assert!(enc.encode_prompt(&["a"], &[""], &opts).is_err());
}

#[test]
fn preprocessing_is_pythons_lower_strip() {
    assert_eq!(preprocess("  A Cat\t\n"), "a cat");
    // Python's str.isspace also counts the information separators U+001C‥U+001F.
    assert_eq!(preprocess("\u{1c}\u{85}ÉTÉ\u{3000}\u{1f}"), "été");
    assert_eq!(
        preprocess("ΟΔΟΣ"),
        "οδος",
        "final sigma as Python lowercases it"
    );
    assert_eq!(
        preprocess(" \u{200b}x"),
        "\u{200b}x",
        "zero-width space is not whitespace"
    );
}

/// A `VarBuilder` backend that hands out zero-stride tensors and counts their elements, to build
/// a real-size model without its memory.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl SimpleBackend for Counting {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch_add(s.elem_count(), Ordering::Relaxed);
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn real_gemma_2_2b_it_config_builds_with_the_spec_parameter_count() {
    let d = fixtures().join("real-configs/text_encoder");
    let cfg: Gemma2Config = read_config(&d.join("gemma-2-2b-it.json")).unwrap();
    cfg.validate().unwrap();
    let counts: std::collections::HashMap<String, usize> =
        read_config(&d.join("param_count.json")).unwrap();
    assert_eq!(counts["gemma-2-2b-it"], 2_614_341_888, "spec §1");
    assert_eq!(cfg.parameter_count(), 2_614_341_888);
    let defaults = Gemma2Config {
        rope_theta: None,
        ..cfg.clone()
    };
    assert_eq!(
        defaults,
        Gemma2Config::default(),
        "transformers' defaults are gemma-2-2b's"
    );
    assert_eq!(Gemma2Config::default().rope_theta(), 10000.0);
    let counter = Counting::default();
    let vb = VarBuilder::from_backend(Box::new(counter.clone()), DType::BF16, Device::Cpu);
    let model = Gemma2Model::new(&cfg, vb).unwrap();
    assert_eq!(counter.0.load(Ordering::Relaxed), 2_614_341_888);
    assert_eq!(model.config().head_dim(), 256);
    assert_eq!(
        (0..26).filter(|&i| cfg.is_sliding(i)).count(),
        13,
        "alternating, sliding first"
    );
    assert!(cfg.is_sliding(0) && !cfg.is_sliding(1));
}

#[test]
fn unsupported_configs_name_the_field() {
    for (json, field) in [
        (r#"{"hidden_activation": "silu"}"#, "hidden_activation"),
        (r#"{"num_key_value_heads": 3}"#, "num_key_value_heads"),
        (
            r#"{"rope_parameters": {"rope_type": "yarn"}}"#,
            "rope_parameters",
        ),
        (
            r#"{"use_bidirectional_attention": true}"#,
            "use_bidirectional_attention",
        ),
        (r#"{"attention_bias": true}"#, "attention_bias"),
    ] {
        let cfg: Gemma2Config = serde_json::from_str(json).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
}
