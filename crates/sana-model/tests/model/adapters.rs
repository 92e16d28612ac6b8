//! LoRA adapters and PAG against diffusers + peft (`tools/gen_fixtures.py adapters`): the
//! transformer's output with adapters, end-to-end images of SanaPipeline with adapters and of
//! SanaPAGPipeline, batches that mix adapters, and the load-time errors.

use crate::common;
use crate::pipeline::{assemble_with, assert_pixels, case_in, run};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use common::{fixtures, load};
use sana_model::pipeline::{LoadOptions, LoraChoice, SanaPipeline};
use sana_model::transformer::{LoraRows, RowOptions, SanaTransformer2DModel};
use serde_json::Value;

fn dir() -> PathBuf {
    fixtures().join("adapters")
}

fn adapter_path(name: &str) -> PathBuf {
    dir().join(format!("lora_{name}"))
}

fn transformer() -> SanaTransformer2DModel {
    SanaTransformer2DModel::load(
        &fixtures().join("pipeline/sana/transformer"),
        None,
        DType::F32,
        &common::device(),
    )
    .unwrap()
}

/// The transformer's output for the fixture inputs with `lora` (adapter, scale) on both rows.
fn forward(
    model: &SanaTransformer2DModel,
    t: &std::collections::HashMap<String, Tensor>,
    lora: &[(&str, f32)],
) -> Tensor {
    let adapters = lora
        .iter()
        .map(|(name, scale)| {
            let a = Arc::new(model.load_lora(name, &adapter_path(name)).unwrap());
            (a, vec![*scale; 2])
        })
        .collect();
    let rows = LoraRows::new(adapters, model.config(), model.dtype(), &common::device()).unwrap();
    let mask: Vec<Vec<f32>> = t["encoder_attention_mask"].to_vec2().unwrap();
    let lengths: Vec<usize> = mask
        .iter()
        .map(|r| r.iter().filter(|&&m| m > 0.0).count())
        .collect();
    let caption = model
        .prepare_caption_rows(
            &t["encoder_hidden_states"],
            &lengths,
            RowOptions {
                lora: rows,
                perturbed: None,
            },
        )
        .unwrap();
    model
        .forward_with_caption(&t["hidden_states"], &t["timestep"], None, &caption)
        .unwrap()
}

#[test]
fn transformer_with_adapters_equals_diffusers() {
    let model = transformer();
    let t = load(&dir().join("transformer.safetensors"));
    let cases: [(&str, &[(&str, f32)]); 6] = [
        ("base", &[]),
        ("attn_1", &[("attn", 1.0)]),
        ("attn_half", &[("attn", 0.5)]),
        ("subset_1", &[("subset", 1.0)]),
        ("attn_half_subset_1", &[("attn", 0.5), ("subset", 1.0)]),
        ("old_1", &[("old", 1.0)]),
    ];
    for (case, lora) in cases {
        let got = forward(&model, &t, lora);
        common::assert_close(
            case,
            &got,
            &t[&format!("{case}.output")],
            1e-4,
            "transformer output",
        );
    }
}

/// The `sana` pipeline with the fixture adapters loaded under their names; PAG cases under a
/// SanaPAGPipeline index.
fn pipeline_for(case: &str) -> SanaPipeline {
    let root = if case.starts_with("pag") {
        assemble_with("pag", &dir().join("pag/model_index.json"))
    } else {
        assemble_with("sana", &fixtures().join("pipeline/sana/model_index.json"))
    };
    let mut pipe = SanaPipeline::load(&root, &LoadOptions::new(common::device())).unwrap();
    for name in ["attn", "subset"] {
        pipe.add_lora(name, &adapter_path(name)).unwrap();
    }
    pipe
}

#[test]
fn pipelines_with_adapters_and_pag_equal_diffusers() {
    let meta: Value = sana_model::weights::read_config(&dir().join("cases.json")).unwrap();
    for (case, spec) in meta.as_object().unwrap() {
        let pipe = pipeline_for(case);
        let (mut req, reference) = case_in(&dir(), case);
        let lora: Vec<LoraChoice> = spec["lora"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| LoraChoice {
                name: pair[0].as_str().unwrap().to_string(),
                scale: pair[1].as_f64().unwrap() as f32,
            })
            .collect();
        let layers: Vec<String> = match &spec["pag_applied_layers"] {
            Value::Null => Vec::new(),
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
            other => panic!("{case}: pag_applied_layers {other}"),
        };
        if !layers.is_empty() {
            req.pag_layers = pipe.resolve_pag_layers(&layers).unwrap();
            assert_eq!(
                pipe.pag_defaults().map(|d| d.scale),
                Some(3.0),
                "a SanaPAGPipeline folder"
            );
        }
        for item in &mut req.items {
            item.lora = lora.clone();
            item.pag_scale = spec["pag_scale"].as_f64().unwrap_or(0.0) as f32;
            item.pag_adaptive_scale = spec["pag_adaptive_scale"].as_f64().unwrap_or(0.0) as f32;
        }
        assert_pixels(case, &run(&pipe, &req), &reference, 2);
    }
}

#[test]
fn a_batch_mixing_adapters_gives_each_image_its_own() {
    let pipe = pipeline_for("lora_attn_dpm");
    let (mut req, _) = case_in(&dir(), "lora_attn_half_subset_euler");
    // 256² so every matmul takes the same kernel path whatever the batch (as in
    // `seeds_decide_images_and_batches_do_not`): "the same image" means bit-identical.
    (req.width, req.height, req.steps, req.latents) = (256, 256, 2, None);
    req.items[0].lora = vec![LoraChoice {
        name: "attn".into(),
        scale: 0.7,
    }];
    req.items[0].seed = 3;
    req.items[1].lora = Vec::new();
    req.items[1].seed = 4;
    let batch = run(&pipe, &req);
    for (k, item) in req.items.clone().into_iter().enumerate() {
        let mut alone = req.clone();
        alone.items = vec![item];
        assert!(
            run(&pipe, &alone)[0] == batch[k],
            "item {k} alone vs in the mixed batch"
        );
    }
    // And the adapter does change the image: the same seed without it differs.
    let mut without = req.clone();
    without.items = vec![req.items[0].clone()];
    without.items[0].lora.clear();
    assert!(
        run(&pipe, &without)[0] != batch[0],
        "the adapter changes the image"
    );
}

#[test]
fn a_batch_mixing_pag_scales_gives_each_image_its_own() {
    let pipe = pipeline_for("pag_cfg_dpm");
    let (mut req, _) = case_in(&dir(), "pag_cfg_dpm");
    (req.width, req.height, req.steps, req.latents) = (256, 256, 2, None);
    req.pag_layers = vec![1];
    (req.items[0].pag_scale, req.items[0].seed) = (2.0, 3);
    (
        req.items[1].pag_scale,
        req.items[1].pag_adaptive_scale,
        req.items[1].seed,
    ) = (3.0, 0.002, 4);
    let batch = run(&pipe, &req);
    for (k, item) in req.items.clone().into_iter().enumerate() {
        let mut alone = req.clone();
        alone.items = vec![item];
        assert!(
            run(&pipe, &alone)[0] == batch[k],
            "item {k} alone vs in the batch"
        );
    }
}

/// Writes `tensors` as a LoRA file in a fresh temporary folder.
fn write_lora(tag: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sana-lora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pytorch_lora_weights.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn load_err(model: &SanaTransformer2DModel, path: &Path) -> String {
    match model.load_lora("bad", path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapter_files_are_refused_naming_the_key_and_shapes() {
    let model = transformer();
    let dev = candle_core::Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    // A module the model does not have.
    let err = load_err(
        &model,
        &write_lora(
            "nomodule",
            &[
                (
                    "transformer.transformer_blocks.5.attn1.to_q.lora_A.weight",
                    z(&[4, 32]),
                ),
                (
                    "transformer.transformer_blocks.5.attn1.to_q.lora_B.weight",
                    z(&[32, 4]),
                ),
            ],
        ),
    );
    assert!(
        err.contains("transformer_blocks.5.attn1.to_q") && err.contains("matches no"),
        "{err}"
    );
    // Shapes that disagree: the key, its shape and the model's.
    let err = load_err(
        &model,
        &write_lora(
            "shape",
            &[
                (
                    "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
                    z(&[4, 48]),
                ),
                (
                    "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight",
                    z(&[32, 4]),
                ),
            ],
        ),
    );
    assert!(
        err.contains("transformer_blocks.0.attn1.to_q.lora_A.weight")
            && err.contains("[4, 48]")
            && err.contains("[4, 32]"),
        "{err}"
    );
    // Ranks that disagree between A and B.
    let err = load_err(
        &model,
        &write_lora(
            "rank",
            &[
                ("transformer.proj_out.lora_A.weight", z(&[4, 32])),
                ("transformer.proj_out.lora_B.weight", z(&[8, 2])),
            ],
        ),
    );
    assert!(
        err.contains("proj_out.lora_B.weight") && err.contains("[8, 2]") && err.contains("[8, 4]"),
        "{err}"
    );
    // Half a pair, a key that is not LoRA, DoRA, the depthwise conv.
    let err = load_err(
        &model,
        &write_lora(
            "half",
            &[("transformer.proj_out.lora_A.weight", z(&[4, 32]))],
        ),
    );
    assert!(err.contains("proj_out") && err.contains("lora_B"), "{err}");
    let err = load_err(
        &model,
        &write_lora("notlora", &[("transformer.proj_out.weight", z(&[8, 32]))]),
    );
    assert!(
        err.contains("transformer.proj_out.weight") && err.contains("not a LoRA"),
        "{err}"
    );
    let err = load_err(
        &model,
        &write_lora(
            "dora",
            &[("transformer.proj_out.lora_magnitude_vector", z(&[8]))],
        ),
    );
    assert!(err.contains("DoRA"), "{err}");
    let err = load_err(
        &model,
        &write_lora(
            "depth",
            &[
                (
                    "transformer.transformer_blocks.0.ff.conv_depth.lora_A.weight",
                    z(&[4, 160, 3, 3]),
                ),
                (
                    "transformer.transformer_blocks.0.ff.conv_depth.lora_B.weight",
                    z(&[160, 4, 1, 1]),
                ),
            ],
        ),
    );
    assert!(
        err.contains("conv_depth") && err.contains("depthwise"),
        "{err}"
    );
    // Not a safetensors file.
    let garbage = std::env::temp_dir().join(format!(
        "sana-lora-garbage-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    let err = load_err(&model, &garbage);
    assert!(err.contains("not a safetensors file"), "{err}");
    // No such file, and a folder without the diffusers file name.
    let err = load_err(&model, Path::new("/nonexistent/adapter.safetensors"));
    assert!(err.contains("/nonexistent/adapter.safetensors"), "{err}");
    let empty = std::env::temp_dir().join(format!("sana-lora-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let err = load_err(&model, &empty);
    assert!(err.contains("pytorch_lora_weights.safetensors"), "{err}");
}

#[test]
fn requests_with_unknown_adapters_or_bad_scales_are_refused() {
    let pipe = pipeline_for("lora_attn_dpm");
    let (req, _) = case_in(&dir(), "lora_attn_dpm");
    let refuse = |f: &dyn Fn(&mut sana_model::pipeline::GenerateRequest)| {
        let mut r = req.clone();
        f(&mut r);
        pipe.generate(&r, &mut |_| sana_model::pipeline::sampling::Flow::Continue)
            .expect_err("refused")
            .to_string()
    };
    let err = refuse(&|r| {
        r.items[0].lora = vec![LoraChoice {
            name: "nope".into(),
            scale: 1.0,
        }]
    });
    assert!(err.contains("nope") && err.contains("attn"), "{err}");
    let err = refuse(&|r| {
        r.items[0].lora = vec![LoraChoice {
            name: "attn".into(),
            scale: f32::NAN,
        }]
    });
    assert!(err.contains("lora.scale"), "{err}");
    let err = refuse(&|r| r.items[0].pag_scale = f32::INFINITY);
    assert!(err.contains("pag_scale"), "{err}");
    let err = refuse(&|r| {
        r.items[0].pag_scale = 1.0;
        r.pag_layers = vec![7];
    });
    assert!(err.contains("pag_applied_layers"), "{err}");
    // A duplicate name is refused at load.
    let mut pipe = pipe;
    let err = pipe
        .add_lora("attn", &adapter_path("attn"))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("unique"), "{err}");
}

/// PAG's perturbed rows join as copies of the positive rows at the first perturbed block
/// (`Perturbed::copy_of`): the same output as computing them from the start, and a perturbed
/// block really changes them (the identity attention differs from the attended rows).
#[test]
fn perturbed_rows_joining_late_equal_rows_computed_from_the_start() {
    use sana_model::transformer::Perturbed;
    let model = transformer();
    let t = load(&dir().join("transformer.safetensors"));
    // Rows: [negative, positive, perturbed copy of positive].
    let pick = |name: &str, rows: &[u32]| {
        let idx = Tensor::new(rows, &common::device()).unwrap();
        t[name].index_select(&idx, 0).unwrap()
    };
    let x = pick("hidden_states", &[0, 1, 1]);
    let y = pick("encoder_hidden_states", &[0, 1, 1]);
    let ts = Tensor::new(&[700f32, 700., 700.], &common::device()).unwrap();
    let lengths = [10, 6, 6];
    for block in [0usize, 1] {
        let run = |copy_of: Option<usize>| {
            let lora = LoraRows::new(
                vec![(
                    Arc::new(model.load_lora("attn", &adapter_path("attn")).unwrap()),
                    vec![0.5, 1.0, 1.0],
                )],
                model.config(),
                model.dtype(),
                &common::device(),
            )
            .unwrap();
            let caption = model
                .prepare_caption_rows(
                    &y,
                    &lengths,
                    RowOptions {
                        lora,
                        perturbed: Some(Perturbed {
                            first_row: 2,
                            blocks: vec![block],
                            copy_of,
                        }),
                    },
                )
                .unwrap();
            model.forward_with_caption(&x, &ts, None, &caption).unwrap()
        };
        let (late, early) = (run(Some(1)), run(None));
        common::assert_close(
            &format!("block {block}"),
            &late,
            &early,
            1e-6,
            "joined late",
        );
        let (pos, ptb) = (
            early.narrow(0, 1, 1).unwrap(),
            early.narrow(0, 2, 1).unwrap(),
        );
        let c = sana_testing::compare(&ptb, &pos).unwrap();
        assert!(
            c.relative() > 1e-2,
            "block {block}: the perturbed row equals the positive one"
        );
    }
}
