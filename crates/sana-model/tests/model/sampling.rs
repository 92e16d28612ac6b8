//! The denoising loops against diffusers' SanaPipeline / SanaSprintPipeline on tiny random
//! transformers with given embeddings and latents (`tools/gen_fixtures.py sampling`).

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, fixtures, load};
use sana_model::pipeline::sampling::{denoise, denoise_sprint, seeded_noise, Flow, Sampling};
use sana_model::scheduler::{ScheduleOptions, SchedulerConfig};
use sana_model::transformer::SanaTransformer2DModel;
use sana_model::weights::read_config;

struct Case {
    model: SanaTransformer2DModel,
    scheduler: SchedulerConfig,
    io: HashMap<String, Tensor>,
    steps: usize,
    guidance: f32,
    sprint: bool,
}

fn case(name: &str) -> Case {
    let dir: PathBuf = fixtures().join("sampling").join(name);
    let meta: serde_json::Value = read_config(&dir.join("case.json")).unwrap();
    Case {
        model: SanaTransformer2DModel::load(
            &dir.join("transformer"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
        scheduler: SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json")).unwrap(),
        io: load(&dir.join("io.safetensors")),
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance: meta["guidance_scale"].as_f64().unwrap() as f32,
        sprint: meta["pipeline"] == "sprint",
    }
}

/// Runs the case's loop on items `items` of its batch; `stop_after` cancels after that many steps.
fn run(c: &Case, items: std::ops::Range<usize>, stop_after: Option<usize>) -> Option<Tensor> {
    let pick = |k: &str| c.io[k].i(items.clone()).unwrap();
    let b = items.len();
    let cfg = !c.sprint && c.guidance > 1.0;
    let (y, m) = if cfg {
        (
            Tensor::cat(&[pick("negative_prompt_embeds"), pick("prompt_embeds")], 0).unwrap(),
            Tensor::cat(
                &[
                    pick("negative_prompt_attention_mask"),
                    pick("prompt_attention_mask"),
                ],
                0,
            )
            .unwrap(),
        )
    } else {
        (pick("prompt_embeds"), pick("prompt_attention_mask"))
    };
    let caption = c.model.prepare_caption(&y, Some(&m)).unwrap();
    let guidance = vec![c.guidance; b];
    let sampling = Sampling {
        scheduler: &c.scheduler,
        steps: c.steps,
        schedule: ScheduleOptions::default(),
        guidance: &guidance,
        cfg,
        pag: None,
        control: None,
        edit: None,
    };
    let mut noise = |step: usize| Ok(c.io[&format!("noise_{step}")].i(items.clone())?);
    let mut seen = 0;
    let mut on_step = |info: sana_model::pipeline::sampling::StepInfo| {
        seen += 1;
        assert_eq!(info.step, seen);
        assert_eq!(info.steps, c.steps);
        assert!(
            info.predicted.is_some(),
            "every step reports a predicted clean latent"
        );
        if Some(seen) == stop_after {
            Flow::Stop
        } else {
            Flow::Continue
        }
    };
    let latents = pick("latents");
    if c.sprint {
        denoise_sprint(
            &c.model,
            &caption,
            latents,
            &sampling,
            DType::F32,
            &mut noise,
            &mut on_step,
        )
        .unwrap()
    } else {
        denoise(
            &c.model,
            &caption,
            latents,
            &sampling,
            &mut noise,
            &mut on_step,
        )
        .unwrap()
    }
}

#[test]
fn loops_equal_diffusers() {
    for name in ["dpm_cfg", "euler_cfg", "dpm_no_cfg", "sprint"] {
        let c = case(name);
        let b = c.io["latents"].dim(0).unwrap();
        let out = run(&c, 0..b, None).expect("not cancelled");
        assert_close(
            name,
            &out,
            &c.io["output"],
            1e-4,
            "f32 tolerance 1e-4 × max|ref|, whole loop",
        );
    }
}

#[test]
fn an_item_is_the_same_alone_and_in_a_batch() {
    for name in ["dpm_cfg", "sprint"] {
        let c = case(name);
        let both = run(&c, 0..2, None).unwrap();
        for i in 0..2 {
            let alone = run(&c, i..i + 1, None).unwrap();
            let (diff, _) = common::max_abs_diff(&alone, &both.i(i..i + 1).unwrap());
            assert!(
                diff <= 1e-5,
                "{name} item {i}: alone vs batch differ by {diff:e}"
            );
        }
    }
}

#[test]
fn a_stop_ends_the_loop_after_that_step() {
    let c = case("dpm_cfg");
    assert!(run(&c, 0..2, Some(2)).is_none());
}

#[test]
fn seeded_noise_depends_only_on_the_item_seed() {
    let dev = Device::Cpu;
    let a = seeded_noise(&[7, 8, 9], (4, 3, 5), 0, &dev).unwrap();
    let b = seeded_noise(&[9, 7], (4, 3, 5), 0, &dev).unwrap();
    let eq = |x: Tensor, y: Tensor| common::max_abs_diff(&x, &y).0 == 0.0;
    assert!(
        eq(a.i(2).unwrap(), b.i(0).unwrap()),
        "seed 9 gives the same noise wherever it sits"
    );
    assert!(eq(a.i(0).unwrap(), b.i(1).unwrap()));
    assert!(
        !eq(a.i(0).unwrap(), a.i(1).unwrap()),
        "different seeds differ"
    );
    let s1 = seeded_noise(&[7], (4, 3, 5), 1, &dev).unwrap();
    assert!(
        !eq(a.i(0).unwrap(), s1.i(0).unwrap()),
        "streams are independent"
    );
    // Roughly standard normal.
    let big: Vec<f32> = seeded_noise(&[1], (4, 64, 64), 0, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mean = big.iter().sum::<f32>() / big.len() as f32;
    let var = big.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / big.len() as f32;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "mean {mean}, var {var}"
    );
}
