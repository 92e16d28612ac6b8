//! The embedded model end to end on the CPU: its accuracy on 100 held-out prompts as read by the
//! pixel checker, and parity with diffusers' `SanaPipeline` on the same folder and latents.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sana_model::pipeline::{GenerateRequest, ItemRequest, LoadOptions, SanaPipeline};
use sana_scenes::{check, heldout, Tally};

fn pipeline() -> SanaPipeline {
    let root = sana_scenes::materialize().unwrap();
    SanaPipeline::load(&root, &LoadOptions::new(Device::Cpu)).unwrap()
}

/// A request at the model's defaults (as `sana generate` and the server build it).
fn request(pipe: &SanaPipeline, prompts: &[(String, u64)]) -> GenerateRequest {
    let d = pipe.defaults();
    let mut req = GenerateRequest::new("");
    req.items = prompts
        .iter()
        .map(|(prompt, seed)| ItemRequest {
            prompt: prompt.clone(),
            negative_prompt: String::new(),
            num_images: 1,
            seed: *seed,
            guidance_scale: d.guidance_scale,
        })
        .collect();
    req.steps = d.steps;
    req.complex_human_instruction = d.complex_human_instruction;
    req.width = 64;
    req.height = 64;
    req
}

/// The checker's tally over the 100 held-out prompts at the model's defaults (prompt `i` with seed
/// `i`, ten per batch), printed with the time per image.
fn held_out_tally() -> Tally {
    let pipe = pipeline();
    let d = pipe.defaults();
    assert_eq!((d.steps, d.guidance_scale), (6, 4.5));
    assert!(!d.complex_human_instruction);
    let heldout = heldout();
    assert_eq!(heldout.len(), 100);
    let mut tally = Tally::default();
    let start = std::time::Instant::now();
    for (chunk_index, chunk) in heldout.chunks(10).enumerate() {
        let prompts: Vec<(String, u64)> = chunk
            .iter()
            .enumerate()
            .map(|(j, h)| (h.prompt.clone(), (chunk_index * 10 + j) as u64))
            .collect();
        let images = pipe
            .generate(&request(&pipe, &prompts), &mut |_| {
                sana_model::pipeline::sampling::Flow::Continue
            })
            .unwrap()
            .unwrap();
        for (h, img) in chunk.iter().zip(&images) {
            assert_eq!((img.width, img.height), (64, 64));
            tally.add(&h.scene, &check(&img.rgb8, 64, 64));
        }
    }
    println!(
        "sana-tiny-scenes, 100 held-out prompts, {} steps, guidance {}: {tally} ({:.0} ms/image)",
        d.steps,
        d.guidance_scale,
        start.elapsed().as_secs_f64() * 10.0
    );
    tally
}

/// The target of the embedded-model issue, at the model's defaults. Size is not part of the
/// target; it is held where the model is (97-99%) so that a regression shows.
#[test]
fn held_out_accuracy_meets_the_target() {
    let t = held_out_tally();
    assert!(t.background_pct() >= 95.0, "{t}");
    assert!(t.color_pct() >= 90.0, "{t}");
    assert!(t.position_pct() >= 90.0, "{t}");
    assert!(t.shape_pct() >= 80.0, "{t}");
    assert!(t.size_pct() >= 90.0, "{t}");
}

#[test]
fn matches_diffusers_on_the_same_latents() {
    let pipe = pipeline();
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scenes");
    let tensors =
        candle_core::safetensors::load(fx.join("diffusers.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("diffusers.json")).unwrap()).unwrap();
    let prompts: Vec<(String, u64)> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p.as_str().unwrap().to_string(), 0))
        .collect();
    let mut req = request(&pipe, &prompts);
    req.latents = Some(tensors["latents"].clone());
    let images = pipe
        .generate(&req, &mut |_| {
            sana_model::pipeline::sampling::Flow::Continue
        })
        .unwrap()
        .unwrap();
    let expected: Tensor = tensors["images"].clone();
    let expected = expected.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let ours: Vec<u8> = images.iter().flat_map(|i| i.rgb8.clone()).collect();
    let c = sana_testing::assert_pixels_close("embedded vs diffusers", &ours, &expected, 2);
    println!(
        "max |ours − diffusers| = {}/255; {} of {} values differ",
        c.max_abs_diff, c.differing, c.len
    );
}
