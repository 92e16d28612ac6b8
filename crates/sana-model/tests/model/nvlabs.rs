//! Original NVlabs checkpoints (`.pth` + training YAML): parity of the loaded model with diffusers on
//! the committed fixtures (`tools/gen_fixtures.py nvlabs`), load errors that name the keys, and the
//! YAML → config mapping of the released models.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, load};
use sana_model::nvlabs::{load_transformer, NvlabsCheckpoint, NvlabsConfig};
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig, TransformerInput};
use sana_model::weights::read_config;

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("nvlabs").join(case)
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

/// A copy of `case`'s YAML with `from` replaced by `to`, in a fresh temporary file.
fn edited_yaml(case: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(case_dir(case).join("config.yaml")).unwrap();
    assert!(text.contains(from), "{case}/config.yaml has no {from:?}");
    let dir = std::env::temp_dir().join(format!("sana-nvlabs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{case}-{}.yaml",
        to.replace(|c: char| !c.is_alphanumeric(), "_")
    ));
    std::fs::write(&path, text.replace(from, to)).unwrap();
    path
}

fn load_error(case: &str, yaml: &Path) -> String {
    match load_transformer(
        &case_dir(case).join("model.pth"),
        yaml,
        DType::F32,
        &Device::Cpu,
    ) {
        Ok(_) => panic!("{case}: loading with {} should fail", yaml.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
}

#[test]
fn pth_parity_with_diffusers_f32() {
    for (case, layers, sprint) in [("ms", 2, false), ("sprint", 1, true)] {
        let dir = case_dir(case);
        let io = load(&dir.join("io.safetensors"));
        let model = load_transformer(
            &dir.join("model.pth"),
            &dir.join("config.yaml"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{case}: load failed: {e}"));
        let cfg = model.config();
        assert_eq!(cfg.num_layers, layers, "{case}: model.depth");
        assert_eq!(cfg.inner_dim(), 32, "{case}: model.hidden_size");
        assert_eq!(
            cfg.num_cross_attention_heads,
            Some(2),
            "{case}: model.num_heads"
        );
        assert_eq!(cfg.guidance_embeds, sprint, "{case}: model.cfg_embed");
        assert_eq!(cfg.qk_norm.is_some(), sprint, "{case}: model.qk_norm");
        let out = run(&model, &io);
        assert_close(
            case,
            &out,
            &io["output"],
            1e-4,
            "f32 tolerance 1e-4 × max|ref|",
        );
    }
}

#[test]
fn every_tensor_but_the_training_extras_is_used() {
    for case in ["ms", "sprint"] {
        let dir = case_dir(case);
        let cfg = NvlabsConfig::read(&dir.join("config.yaml"))
            .unwrap()
            .transformer_config()
            .unwrap();
        let ckpt = NvlabsCheckpoint::open(&dir.join("model.pth")).unwrap();
        let keys = ckpt.keys();
        for extra in [
            "y_embedder.y_embedding",
            "pos_embed",
            "blocks.0.attn.qkv.weight",
        ] {
            assert!(
                keys.iter().any(|k| k == extra),
                "{case}: fixture lacks {extra}"
            );
        }
        SanaTransformer2DModel::new(&cfg, ckpt.var_builder(DType::F32, &Device::Cpu)).unwrap();
        assert_eq!(ckpt.unused_keys(), Vec::<String>::new(), "{case}");
    }
}

#[test]
fn missing_tensor_names_both_keys() {
    // The ms checkpoint has no q/k norms; a YAML that asks for them must fail at load.
    let yaml = edited_yaml("ms", "qk_norm: false", "qk_norm: true\n  cross_norm: true");
    let err = load_error("ms", &yaml);
    assert_mentions(
        &err,
        &[
            "missing tensor",
            "blocks.0.attn.q_norm.weight",
            "transformer_blocks.0.attn1.norm_q.weight",
        ],
    );
}

#[test]
fn wrong_shape_names_both_keys_and_shapes() {
    // mlp_ratio 3 makes GLUMBConv 2·96 = 192 wide; the checkpoint was trained with 2.5 (160).
    let yaml = edited_yaml("ms", "mlp_ratio: 2.5", "mlp_ratio: 3.0");
    let err = load_error("ms", &yaml);
    assert_mentions(
        &err,
        &[
            "blocks.0.mlp.inverted_conv.conv.weight",
            "transformer_blocks.0.ff.conv_inverted.weight",
            "[160, 32, 1, 1]",
            "[192, 32, 1, 1]",
        ],
    );

    // A chunk of a fused projection is checked against the whole fused tensor.
    let ckpt = NvlabsCheckpoint::open(&case_dir("ms").join("model.pth")).unwrap();
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let err = vb
        .get((33, 32), "transformer_blocks.1.attn1.to_k.weight")
        .unwrap_err()
        .to_string();
    assert_mentions(
        &err,
        &[
            "blocks.1.attn.qkv.weight",
            "[96, 32]",
            "[99, 32]",
            "transformer_blocks.1.attn1.to_k.weight",
        ],
    );
    let err = vb
        .get(31, "transformer_blocks.0.attn2.to_v.bias")
        .unwrap_err()
        .to_string();
    assert_mentions(
        &err,
        &["blocks.0.cross_attn.kv_linear.bias", "[64]", "[62]"],
    );
}

#[test]
fn fused_chunks_are_the_right_rows() {
    let ckpt = NvlabsCheckpoint::open(&case_dir("ms").join("model.pth")).unwrap();
    let all = candle_core::pickle::read_all_with_key(
        case_dir("ms").join("model.pth"),
        Some("state_dict"),
    )
    .unwrap()
    .into_iter()
    .collect::<HashMap<_, _>>();
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    for (name, fused, rows) in [
        (
            "transformer_blocks.1.attn1.to_v.weight",
            "blocks.1.attn.qkv.weight",
            64..96,
        ),
        (
            "transformer_blocks.0.attn2.to_k.weight",
            "blocks.0.cross_attn.kv_linear.weight",
            0..32,
        ),
        (
            "transformer_blocks.0.attn2.to_v.bias",
            "blocks.0.cross_attn.kv_linear.bias",
            32..64,
        ),
    ] {
        let got = if name.ends_with("bias") {
            vb.get(32, name).unwrap()
        } else {
            vb.get((32, 32), name).unwrap()
        };
        let want = all[fused].narrow(0, rows.start, rows.len()).unwrap();
        assert_eq!(
            sana_testing::max_abs_diff(&got, &want).0,
            0.0,
            "{name} is not rows {rows:?} of {fused}"
        );
    }
}

#[test]
fn yaml_that_disagrees_with_the_checkpoint_is_refused() {
    let err = load_error("ms", &edited_yaml("ms", "depth: 2", "depth: 3"));
    assert_mentions(&err, &["model.depth (depth)", "3", "has 2"]);
    let err = load_error(
        "ms",
        &edited_yaml("ms", "hidden_size: 32", "hidden_size: 64"),
    );
    assert_mentions(&err, &["model.hidden_size (width)", "64", "has 32"]);
    let err = load_error(
        "ms",
        &edited_yaml("ms", "caption_channels: 32", "caption_channels: 2304"),
    );
    assert_mentions(&err, &["text_encoder.caption_channels", "2304", "has 32"]);
    // The checkpoint has a caption norm; a YAML without one (y_norm: false) is refused.
    let err = load_error("ms", &edited_yaml("ms", "y_norm: true", "y_norm: false"));
    assert_mentions(
        &err,
        &[
            "text_encoder.y_norm",
            "false",
            "has `attention_y_norm.weight`",
        ],
    );
    // A name NVlabs does not register needs its geometry: without it the fields are listed.
    let err = load_error("ms", &edited_yaml("ms", "  depth: 2\n  num_heads: 2\n", ""));
    assert_mentions(
        &err,
        &[
            "model.model",
            "SanaMS_tiny_D2",
            "model.depth, model.num_heads are missing",
        ],
    );
}

/// An NVlabs YAML as upstream writes it (spec §8), with the fields that vary per model.
fn real_yaml(model: &str, image_size: usize) -> String {
    format!(
        "model:
  model: {model}
  image_size: {image_size}
  mixed_precision: fp16
  fp32_attention: true
  attn_type: linear
  ffn_type: glumbconv
  mlp_acts:
    - silu
    - silu
    - null
  mlp_ratio: 2.5
  use_pe: false
  qk_norm: false
  class_dropout_prob: 0.1
vae:
  vae_type: AutoencoderDC
  vae_pretrained: mit-han-lab/dc-ae-f32c32-sana-1.0
  scale_factor: 0.41407
  vae_latent_dim: 32
  vae_downsample_rate: 32
text_encoder:
  text_encoder_name: gemma-2-2b-it
  y_norm: true
  y_norm_scale_factor: 0.01
  model_max_length: 300
scheduler:
  predict_v: true
  noise_schedule: linear_flow
  flow_shift: 3.0
"
    )
}

#[test]
fn released_yamls_give_the_released_configs() {
    // YAML refuses duplicate keys, so each extra line replaces the template's line of that key.
    let pe = |s: f64| format!("  use_pe: true\n  pe_interpolation: {s}\n");
    let qk = "  qk_norm: true\n  cross_norm: true\n";
    let sprint = "  qk_norm: true\n  cross_norm: true\n  cfg_embed: true\n  cfg_embed_scale: 0.1\n";
    let cases = [
        ("Sana_600M_512px", "SanaMS_600M_P1_D28", 512, String::new()),
        (
            "Sana_600M_1024px",
            "SanaMS_600M_P1_D28",
            1024,
            String::new(),
        ),
        (
            "Sana_1600M_512px",
            "SanaMS_1600M_P1_D20",
            512,
            String::new(),
        ),
        (
            "Sana_1600M_1024px",
            "SanaMS_1600M_P1_D20",
            1024,
            String::new(),
        ),
        ("Sana_1600M_2Kpx_BF16", "SanaMS_1600M_P1_D20", 2048, pe(1.0)),
        ("Sana_1600M_4Kpx_BF16", "SanaMS_1600M_P1_D20", 4096, pe(2.0)),
        (
            "SANA1.5_1.6B_1024px",
            "SanaMS_1600M_P1_D20",
            1024,
            qk.to_string(),
        ),
        (
            "SANA1.5_4.8B_1024px",
            "SanaMS_4800M_P1_D60",
            1024,
            qk.to_string(),
        ),
        (
            "Sana_Sprint_0.6B_1024px",
            "SanaMSCM_600M_P1_D28",
            1024,
            sprint.to_string(),
        ),
        (
            "Sana_Sprint_1.6B_1024px",
            "SanaMSCM_1600M_P1_D20",
            1024,
            sprint.to_string(),
        ),
    ];
    for (released, model, image_size, extra) in cases {
        let mut text = real_yaml(model, image_size);
        for line in extra.lines() {
            let key = line.trim().split(':').next().unwrap();
            let existing = format!("  {key}:");
            text = match text.lines().find(|l| l.starts_with(&existing)) {
                Some(old) => text.replace(old, line),
                None => text.replace("vae:\n", &format!("{line}\nvae:\n")),
            };
        }
        if model.starts_with("SanaMSCM") {
            // The Sprint YAMLs' scheduler (the last section).
            text.push_str(
                "  vis_sampler: scm\n  sigma_data: 0.5\n  timestep_norm_scale_factor: 1000\n",
            );
        }
        let path = PathBuf::from(format!("{released}.yaml"));
        let got = NvlabsConfig::parse(&text, &path)
            .and_then(|c| c.transformer_config())
            .unwrap_or_else(|e| panic!("{released}: {e}\n{text}"));
        let want: SanaTransformerConfig =
            read_config(&fixtures().join(format!("real-configs/transformer/{released}.json")))
                .unwrap();
        assert_eq!(got, want, "{released} from\n{text}");
    }
}

#[test]
fn qk_norm_without_cross_norm_is_refused() {
    let text = real_yaml("SanaMS_1600M_P1_D20", 1024).replace("qk_norm: false", "qk_norm: true");
    let err = NvlabsConfig::parse(&text, Path::new("x.yaml"))
        .unwrap()
        .transformer_config()
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["model.cross_norm", "model.qk_norm"]);
}

/// A text-encoder folder as NVlabs' repos have it (Gemma and its tokenizer side by side), made of
/// the `text_encoder/pipeline` fixture.
fn gemma_folder() -> PathBuf {
    let src = fixtures().join("text_encoder/pipeline");
    let dir = std::env::temp_dir().join(format!("sana-nvlabs-gemma-{}", std::process::id()));
    if !dir.exists() {
        let tmp = dir
            .with_extension(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        std::fs::create_dir_all(&tmp).unwrap();
        for (from, name) in [
            (src.join("text_encoder/config.json"), "config.json"),
            (
                src.join("text_encoder/model.safetensors"),
                "model.safetensors",
            ),
            (src.join("tokenizer/tokenizer.json"), "tokenizer.json"),
        ] {
            std::os::unix::fs::symlink(from.canonicalize().unwrap(), tmp.join(name)).unwrap();
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    dir
}

/// NVlabs checkpoints end to end: the YAML's self-attention head dim (16), no caption norm
/// (`y_norm: false`), its instruction (`chi_prompt`: NVlabs' released one, a custom one, or none),
/// its prompt length (`model_max_length`) and sampler (`vis_sampler`), and a model name NVlabs does
/// not register with its geometry in the YAML — each against diffusers' SanaPipeline built from
/// the same weights and settings, 2/255.
#[test]
fn nvlabs_pipelines_equal_diffusers() {
    use sana_model::pipeline::sampling::Flow;
    use sana_model::pipeline::{GenerateRequest, ItemRequest, LoadOptions, SanaPipeline};
    for (case, heads, head_dim, caption_norm, instruction, max_len, steps) in [
        ("head16", 4, 16, true, false, 40, 20),
        ("no_y_norm", 1, 32, false, true, 300, 20),
        ("custom_chi", 2, 16, true, true, 60, 28),
    ] {
        let dir = fixtures().join("nvlabs/pipelines").join(case);
        let pipe = SanaPipeline::load_nvlabs(
            &dir.join("model.pth"),
            &dir.join("config.yaml"),
            &gemma_folder(),
            &fixtures().join("autoencoder/sana_small"),
            &LoadOptions::new(Device::Cpu),
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        let cfg = pipe.transformer().config();
        assert_eq!(
            (
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.caption_norm
            ),
            (heads, head_dim, caption_norm),
            "{case}: heads from model.linear_head_dim, caption norm from text_encoder.y_norm"
        );
        let d = pipe.defaults();
        assert_eq!(
            (d.complex_human_instruction, d.max_sequence_length, d.steps),
            (instruction, max_len, steps),
            "{case}: instruction from chi_prompt, length from model_max_length, steps by vis_sampler"
        );
        let meta: serde_json::Value = read_config(&dir.join("case.json")).unwrap();
        let t = load(&dir.join("cases.safetensors"));
        let mut req = GenerateRequest::new("");
        req.items = meta["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| ItemRequest {
                prompt: p.as_str().unwrap().to_string(),
                negative_prompt: String::new(),
                num_images: 1,
                seed: 0,
                guidance_scale: 4.5,
                ..ItemRequest::default()
            })
            .collect();
        (req.width, req.height, req.steps) = (64, 64, 4);
        req.use_resolution_binning = false;
        req.complex_human_instruction = d.complex_human_instruction;
        req.max_sequence_length = d.max_sequence_length;
        req.latents = Some(t["latents"].clone());
        let images: Vec<Vec<u8>> = pipe
            .generate(&req, &mut |_| Flow::Continue)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|i| i.rgb8)
            .collect();
        crate::pipeline::assert_pixels(case, &images, &t["images"], 2);
    }
}

/// Every computation-changing YAML value this port does not reproduce is refused, naming the field
/// and the value.
#[test]
fn unknown_values_of_computation_fields_are_refused() {
    let base = std::fs::read_to_string(case_dir("ms").join("config.yaml")).unwrap();
    let with = |from: &str, to: &str| {
        assert!(base.contains(from), "the ms YAML has no {from:?}");
        base.replace(from, to)
    };
    let sched = |line: &str| format!("{base}  {line}\n");
    let cases = [
        (
            with("attn_type: linear", "attn_type: flash"),
            "model.attn_type",
            "flash",
        ),
        (
            with("ffn_type: glumbconv", "ffn_type: mlp"),
            "model.ffn_type",
            "mlp",
        ),
        (
            with(
                "mlp_acts: [silu, silu, null]",
                "mlp_acts: [gelu, silu, null]",
            ),
            "model.mlp_acts",
            "gelu",
        ),
        (
            with(
                "use_pe: false",
                "use_pe: false\n  pos_embed_type: flux_rope",
            ),
            "model.pos_embed_type",
            "flux_rope",
        ),
        (
            with("use_pe: false", "use_pe: false\n  micro_condition: true"),
            "model.micro_condition",
            "true",
        ),
        (
            with("qk_norm: false", "qk_norm: false\n  linear_head_dim: 24"),
            "model.linear_head_dim",
            "24",
        ),
        (
            with("model: SanaMS_tiny_D2", "model: SanaMS_600M_P1_D28"),
            "model.hidden_size",
            "32",
        ),
        (
            with(
                "model: SanaMS_tiny_D2",
                "model: SanaMSLinearFFN_600M_P1_D28",
            ),
            "model.model",
            "SanaMSLinearFFN_600M_P1_D28",
        ),
        (
            sched("vis_sampler: sa-solver"),
            "scheduler.vis_sampler",
            "sa-solver",
        ),
        (sched("vis_sampler: scm"), "scheduler.vis_sampler", "scm"),
        (
            sched("predict_flow_v: false"),
            "scheduler.predict_flow_v",
            "false",
        ),
        (sched("pred_sigma: true"), "scheduler.pred_sigma", "true"),
        (
            sched("noise_schedule: linear"),
            "scheduler.noise_schedule",
            "linear",
        ),
        (
            sched("timestep_norm_scale_factor: 1000"),
            "scheduler.timestep_norm_scale_factor",
            "1000",
        ),
        (
            with("vae_type: AutoencoderDC", "vae_type: sdxl"),
            "vae.vae_type",
            "sdxl",
        ),
    ];
    for (text, field, value) in cases {
        let nv = NvlabsConfig::parse(&text, Path::new("x.yaml")).unwrap();
        let err = nv
            .transformer_config()
            .and_then(|_| nv.scheduler_config().map(|_| ()))
            .map(|_| ())
            .expect_err(field)
            .to_string();
        assert_mentions(&err, &[field, value]);
    }
    // The precisions are checked when loading (they pick the GPU dtypes).
    for (from, to, field) in [
        (
            "mixed_precision: fp16",
            "mixed_precision: fp8",
            "model.mixed_precision",
        ),
        (
            "vae_latent_dim: 8",
            "vae_latent_dim: 8\n  weight_dtype: int8",
            "vae.weight_dtype",
        ),
    ] {
        let yaml = edited_yaml("ms", from, to);
        let err = match sana_model::pipeline::SanaPipeline::load_nvlabs(
            &case_dir("ms").join("model.pth"),
            &yaml,
            &gemma_folder(),
            &fixtures().join("autoencoder/sana_small"),
            &sana_model::pipeline::LoadOptions::new(Device::Cpu),
        ) {
            Ok(_) => panic!("{field}: accepted"),
            Err(e) => e.to_string(),
        };
        assert_mentions(&err, &[field]);
    }
}

/// An NVlabs YAML's `model.pag_applied_layers` are the blocks PAG perturbs when a request names
/// none; PAG stays off unless asked for. Without the key, diffusers' default block 0.
#[test]
fn nvlabs_pag_layers_are_the_pag_default() {
    use sana_model::pipeline::{LoadOptions, SanaPipeline};
    let src = fixtures().join("nvlabs/pipelines/head16");
    let dir = std::env::temp_dir().join(format!("sana-nvlabs-pag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = std::fs::read_to_string(src.join("config.yaml")).unwrap();
    let load = |yaml: &str| {
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        SanaPipeline::load_nvlabs(
            &src.join("model.pth"),
            &dir.join("config.yaml"),
            &gemma_folder(),
            &fixtures().join("autoencoder/sana_small"),
            &LoadOptions::new(Device::Cpu),
        )
        .unwrap()
    };
    let plain = load(&yaml);
    assert_eq!(plain.default_pag_layers(), vec![0]);
    assert!(plain.pag_defaults().is_none());
    let with = load(&yaml.replacen("model:\n", "model:\n  pag_applied_layers: [0]\n", 1));
    let d = with.pag_defaults().expect("the YAML's layers");
    assert_eq!(
        (d.scale, d.layers.clone()),
        (0.0, vec![0]),
        "off unless asked"
    );
}
