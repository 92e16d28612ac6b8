//! End to end against diffusers' SanaPipeline / SanaSprintPipeline on tiny random pipelines: prompts
//! to uint8 images with the reference's initial latents (`tools/gen_fixtures.py pipeline`), plus the
//! pipeline's own guarantees (seeds, batch invariance, cancellation) and the engine backend.

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixtures, load};
use sana_backend::{Backend, Batch, BatchItem, BatchKey, Control, Sampler};
use sana_model::backend::SanaBackend;
use sana_model::pipeline::sampling::Flow;
use sana_model::pipeline::{GenerateRequest, ItemRequest, LoadOptions, Precision, SanaPipeline};
use sana_model::scheduler::SchedulerConfig;
use sana_model::weights::read_config;
use serde_json::Value;

/// A diffusers folder for `name`: its own transformer, scheduler and model_index.json, plus the
/// tokenizer, Gemma and DC-AE the other fixtures already hold (symlinked, not stored twice).
fn assemble(name: &str) -> PathBuf {
    let own = fixtures().join("pipeline").join(name);
    assemble_with(name, &own.join("model_index.json"))
}

/// [`assemble`] of `sana`'s parts under another `model_index.json` (e.g. a SanaPAGPipeline's).
pub(crate) fn assemble_with(name: &str, index: &std::path::Path) -> PathBuf {
    let root = fixtures();
    let dir = std::env::temp_dir().join(format!("sana-pipeline-{name}-{}", std::process::id()));
    if dir.exists() {
        return dir;
    }
    let tmp = dir.with_extension(
        format!("partial-{:?}", std::thread::current().id()).replace(['(', ')'], ""),
    );
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // `sana` and `sprint` have their own parts; other names (pag, controlnet) reuse `sana`'s.
    let own = root
        .join("pipeline")
        .join(if name == "sprint" { "sprint" } else { "sana" });
    let links: [(PathBuf, &str); 6] = [
        (index.to_path_buf(), "model_index.json"),
        (own.join("transformer"), "transformer"),
        (own.join("scheduler"), "scheduler"),
        (
            root.join("text_encoder/pipeline/text_encoder"),
            "text_encoder",
        ),
        (root.join("text_encoder/pipeline/tokenizer"), "tokenizer"),
        (root.join("autoencoder/sana_small"), "vae"),
    ];
    for (src, dst) in links {
        std::os::unix::fs::symlink(src.canonicalize().unwrap(), tmp.join(dst)).unwrap();
    }
    // Another test thread may have finished first; either copy is complete.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

pub(crate) fn pipeline(name: &str) -> SanaPipeline {
    SanaPipeline::load(&assemble(name), &LoadOptions::new(common::device())).unwrap()
}

/// The request diffusers was called with for `case` of pipeline `name`, and the reference images.
fn case(name: &str, case: &str) -> (GenerateRequest, Tensor) {
    case_in(&fixtures().join("pipeline").join(name), case)
}

/// [`case`] from the `cases.json` / `cases.safetensors` in `dir`.
pub(crate) fn case_in(dir: &std::path::Path, case: &str) -> (GenerateRequest, Tensor) {
    let meta: Value = read_config(&dir.join("cases.json")).unwrap();
    let c = &meta[case];
    let t = load(&dir.join("cases.safetensors"));
    let n = c["num_images_per_prompt"].as_u64().unwrap() as usize;
    let mut req = GenerateRequest::new("");
    req.items = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ItemRequest {
            prompt: p.as_str().unwrap().to_string(),
            negative_prompt: c["negative_prompt"].as_str().unwrap_or("").to_string(),
            num_images: n,
            seed: 0,
            guidance_scale: c["guidance_scale"].as_f64().unwrap() as f32,
            ..ItemRequest::default()
        })
        .collect();
    req.height = c["height"].as_u64().unwrap() as usize;
    req.width = c["width"].as_u64().unwrap() as usize;
    req.steps = c["num_inference_steps"].as_u64().unwrap() as usize;
    req.use_resolution_binning = c["use_resolution_binning"].as_bool().unwrap_or(true);
    // diffusers' default is the instruction; the case switches it off with an explicit null.
    req.complex_human_instruction = !c
        .as_object()
        .unwrap()
        .contains_key("complex_human_instruction");
    req.latents = Some(t[&format!("{case}.latents")].clone());
    if c["scheduler"] == "FlowMatchEulerDiscreteScheduler" {
        req.scheduler = Some(
            SchedulerConfig::from_json(
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#,
            )
            .unwrap(),
        );
    }
    (req, t[&format!("{case}.images")].clone())
}

pub(crate) fn run(pipe: &SanaPipeline, req: &GenerateRequest) -> Vec<Vec<u8>> {
    pipe.generate(req, &mut |_| Flow::Continue)
        .unwrap()
        .expect("not cancelled")
        .into_iter()
        .map(|i| i.rgb8)
        .collect()
}

/// Every pixel of `ours` within `tol` of the reference `[B, H, W, 3]` u8.
pub(crate) fn assert_pixels(label: &str, ours: &[Vec<u8>], reference: &Tensor, tol: u8) {
    let b = reference.dim(0).unwrap();
    assert_eq!(ours.len(), b, "{label}: image count");
    let mut worst = 0u8;
    let mut off = 0usize;
    for (i, img) in ours.iter().enumerate() {
        let want: Vec<u8> = reference
            .i(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let c = sana_testing::compare_u8(img, &want)
            .unwrap_or_else(|e| panic!("{label}: image {i}: {e}"));
        let img_worst = c.max_abs_diff as u8;
        off += c.differing;
        eprintln!("{label}: image {i}: max pixel difference {img_worst}/255");
        worst = worst.max(img_worst);
    }
    let total = ours.iter().map(Vec::len).sum::<usize>();
    eprintln!("{label}: max pixel difference {worst}/255, {off} of {total} values differ");
    assert!(
        worst <= tol,
        "{label}: a pixel is {worst}/255 off the reference (tolerance {tol}/255)"
    );
}

#[test]
fn sana_pipeline_equals_diffusers() {
    let pipe = pipeline("sana");
    for name in ["dpm_binning_instruction", "euler_exact_size_no_instruction"] {
        let (req, reference) = case("sana", name);
        assert_pixels(name, &run(&pipe, &req), &reference, 2);
    }
}

#[test]
fn sprint_pipeline_equals_diffusers() {
    let pipe = pipeline("sprint");
    let (req, reference) = case("sprint", "scm_one_step");
    assert_pixels("scm_one_step", &run(&pipe, &req), &reference, 2);
}

/// The tiny pipelines with every model in bf16 on the CPU (bf16 weights, bf16 matmuls through
/// oneDNN where it runs, f32 norms, softmax, linear-attention sums and sampler): within 8/255 of
/// diffusers in f32 on the same latents, by the paths this CPU chose and by the least accurate
/// the probe can choose (activations rounded to bf16 in the DiT's blocks, split elsewhere).
#[test]
fn pipelines_in_bf16_on_cpu_stay_within_8_of_the_f32_reference() {
    use sana_model::ops::{with_cpu_bf16_paths, CpuBf16Path as Path};
    let status = sana_model::ops::cpu_bf16_status();
    eprintln!("CPU bf16 matmuls: {status}");
    let cases: [(&str, &[&str]); 2] = [
        (
            "sana",
            &["dpm_binning_instruction", "euler_exact_size_no_instruction"],
        ),
        ("sprint", &["scm_one_step"]),
    ];
    let mut paths = vec![(status.exact, status.blocks)];
    if status.onednn.is_ok() && !paths.contains(&(Path::Split, Path::Rounded)) {
        paths.push((Path::Split, Path::Rounded));
    }
    for (name, names) in cases {
        let mut opts = LoadOptions::new(Device::Cpu);
        opts.precision = Some(Precision {
            transformer: DType::BF16,
            text_encoder: DType::BF16,
            vae: DType::BF16,
        });
        let pipe = SanaPipeline::load(&assemble(name), &opts).unwrap();
        for case_name in names {
            let (req, reference) = case(name, case_name);
            for &(exact, blocks) in &paths {
                let images = with_cpu_bf16_paths(exact, blocks, || run(&pipe, &req));
                assert_pixels(
                    &format!("{name} {case_name} bf16 ({blocks} in the blocks, {exact} elsewhere)"),
                    &images,
                    &reference,
                    8,
                );
            }
        }
    }
}

#[test]
fn seeds_decide_images_and_batches_do_not() {
    let pipe = pipeline("sana");
    let (mut req, _) = case("sana", "euler_exact_size_no_instruction");
    // 256² (64 latent tokens per image): big enough that every matmul takes the same kernel path
    // whatever the batch size, so "identical" means bit-identical. (At a handful of tokens the
    // matmul library's small-matrix kernels may round a row differently.)
    (req.width, req.height) = (256, 256);
    req.latents = None;
    req.steps = 2;
    req.items[0].seed = 7;
    req.items[1].seed = 1000;
    let batch = run(&pipe, &req);
    assert_eq!(batch, run(&pipe, &req), "same seeds, same images");
    assert_ne!(batch[0], batch[1], "image 1 of an item uses seed + 1");
    // Each item alone (other prompt length, other batch size) gives the same images.
    for (k, item) in req.items.clone().into_iter().enumerate() {
        let mut alone = req.clone();
        alone.items = vec![item];
        let imgs = run(&pipe, &alone);
        assert_eq!(
            imgs[..],
            batch[2 * k..2 * k + 2],
            "item {k} alone vs in the batch"
        );
    }
    // A single-image request with seed s + 1 equals image 1 of the item with seed s.
    let mut one = req.clone();
    one.items = vec![ItemRequest {
        num_images: 1,
        seed: 8,
        ..req.items[0].clone()
    }];
    assert_eq!(run(&pipe, &one)[0], batch[1]);
}

#[test]
fn cancellation_stops_between_steps() {
    let pipe = pipeline("sana");
    let (mut req, _) = case("sana", "euler_exact_size_no_instruction");
    req.steps = 4;
    let mut seen = 0;
    let out = pipe
        .generate(&req, &mut |p| {
            seen = p.step;
            if p.step == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    assert!(out.is_none());
    assert_eq!(seen, 2, "no step runs after a stop");
}

#[test]
fn bad_requests_are_refused_with_the_field() {
    let pipe = pipeline("sana");
    let (req, _) = case("sana", "euler_exact_size_no_instruction");
    let mut odd = req.clone();
    (odd.width, odd.use_resolution_binning) = (100, false);
    let err = pipe
        .generate(&odd, &mut |_| Flow::Continue)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("size") && err.contains("32"), "{err}");
    let mut wrong = req.clone();
    wrong.latents = Some(Tensor::zeros((1, 8, 2, 3), DType::F32, &Device::Cpu).unwrap());
    let err = pipe
        .generate(&wrong, &mut |_| Flow::Continue)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("latents"), "{err}");
}

fn backend_batch(steps: u32, sampler: Sampler) -> Batch {
    Batch {
        key: BatchKey {
            width: 64,
            height: 96,
            steps,
            sampler,
            cfg: true,
            strength_permille: None,
            pag_layers: None,
            controlnet: None,
        },
        items: vec![
            BatchItem {
                prompt: "a red circle".into(),
                negative_prompt: None,
                n: 2,
                seed: 5,
                guidance_scale: 4.5,
                previews: 1,
                edit: None,
                ..Default::default()
            },
            BatchItem {
                prompt: "a blue square on the left".into(),
                negative_prompt: Some("blurry".into()),
                n: 1,
                seed: 9,
                guidance_scale: 2.0,
                previews: 0,
                edit: None,
                ..Default::default()
            },
        ],
    }
}

#[test]
fn backend_serves_batches_with_previews() {
    let mut backend = SanaBackend::new(pipeline("sana"), "tiny", 8);
    let info = backend.info();
    assert_eq!(
        (info.size_multiple, info.default_width, info.dtype.as_str()),
        (32, 512, "f32")
    );
    assert_eq!(
        info.samplers,
        [Sampler::DpmSolverMultistep, Sampler::FlowMatchEuler]
    );
    backend.health().unwrap();
    for sampler in [Sampler::DpmSolverMultistep, Sampler::FlowMatchEuler] {
        let batch = backend_batch(3, sampler);
        let mut previews = 0;
        let mut steps = Vec::new();
        let images = backend
            .generate(&batch, &mut |p| {
                steps.push(p.step);
                for pv in &p.previews {
                    assert_eq!(pv.item, 0, "only item 0 asked for previews");
                    assert_eq!((pv.image.width, pv.image.height), (64, 96));
                    previews += 1;
                }
                Control::Continue
            })
            .unwrap();
        assert_eq!(images.len(), 3);
        assert!(images
            .iter()
            .all(|i| (i.width, i.height) == (64, 96) && i.rgb8.len() == 64 * 96 * 3));
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(
            previews, 2,
            "{sampler}: one preview for each of item 0's two images"
        );
    }
    let err = backend
        .generate(&backend_batch(2, Sampler::Scm), &mut |_| Control::Continue)
        .unwrap_err();
    assert!(
        matches!(err, sana_backend::BackendError::InvalidInput(_)),
        "{err}"
    );
    let err = backend
        .generate(&backend_batch(3, Sampler::DpmSolverMultistep), &mut |_| {
            Control::Stop
        })
        .unwrap_err();
    assert_eq!(err, sana_backend::BackendError::Cancelled);
}
