//! The embedded model end to end on the CPU: its accuracy on 100 held-out prompts as read by the
//! pixel checker, and parity with diffusers' `SanaPipeline` on the same folder and latents.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sana_model::pipeline::{GenerateRequest, ItemRequest, LoadOptions, Precision, SanaPipeline};
use sana_scenes::{check, heldout, Tally};

fn pipeline() -> SanaPipeline {
    pipeline_in(DType::F32)
}

/// The embedded model with all three models in `dtype` on the CPU.
fn pipeline_in(dtype: DType) -> SanaPipeline {
    let root = sana_scenes::materialize().unwrap();
    let mut opts = LoadOptions::new(Device::Cpu);
    opts.precision = Some(Precision {
        transformer: dtype,
        text_encoder: dtype,
        vae: dtype,
    });
    SanaPipeline::load(&root, &opts).unwrap()
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
            ..ItemRequest::default()
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
    held_out_tally_in(DType::F32)
}

/// [`held_out_tally`] with the models in `dtype`.
fn held_out_tally_in(dtype: DType) -> Tally {
    let pipe = pipeline_in(dtype);
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
        "sana-tiny-scenes {dtype:?}, 100 held-out prompts, {} steps, guidance {}: {tally} \
         ({:.0} ms/image)",
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

/// bf16 on the CPU (bf16 weights and matmuls, f32 where numerics need it) scores as f32 does:
/// each category within 2 points, by the paths this CPU chose and by the least accurate the
/// probe can choose (activations rounded to bf16 in the DiT's blocks, split elsewhere).
#[test]
fn held_out_scores_in_bf16_stay_within_2_points_of_f32() {
    use sana_model::ops::{with_cpu_bf16_paths, CpuBf16Path as Path};
    let status = sana_model::ops::cpu_bf16_status();
    eprintln!("CPU bf16 matmuls: {status}");
    let f32 = held_out_tally_in(DType::F32);
    let mut paths = vec![(status.exact, status.blocks)];
    if status.onednn.is_ok() && !paths.contains(&(Path::Split, Path::Rounded)) {
        paths.push((Path::Split, Path::Rounded));
    }
    for (exact, blocks) in paths {
        let bf16 = with_cpu_bf16_paths(exact, blocks, || held_out_tally_in(DType::BF16));
        for (what, a, b) in [
            ("background", f32.background_pct(), bf16.background_pct()),
            ("color", f32.color_pct(), bf16.color_pct()),
            ("position", f32.position_pct(), bf16.position_pct()),
            ("shape", f32.shape_pct(), bf16.shape_pct()),
            ("size", f32.size_pct(), bf16.size_pct()),
        ] {
            assert!(
                (a - b).abs() <= 2.0 && b.is_finite(),
                "{what}: f32 {a:.1}% vs bf16 {b:.1}% with {blocks} in the DiT's blocks, \
                 {exact} elsewhere (f32 {f32}; bf16 {bf16})"
            );
        }
    }
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

/// The two ground-truth renders of one large object on the left (`tools/scenes/world.py`), with
/// their scenes.
fn left_object_renders() -> Vec<(sana_scenes::Scene, Vec<u8>)> {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scenes");
    let scenes: Vec<sana_scenes::Scene> =
        serde_json::from_slice(&std::fs::read(fx.join("rendered.json")).unwrap()).unwrap();
    let bytes = std::fs::read(fx.join("rendered.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images: Vec<Vec<u8>> = st
        .tensor("images")
        .unwrap()
        .data()
        .chunks(64 * 64 * 3)
        .map(<[u8]>::to_vec)
        .collect();
    let picked: Vec<_> = scenes
        .into_iter()
        .zip(images)
        .filter(|(s, _)| {
            s.objects.len() == 1 && s.objects[0].position == "left" && s.objects[0].size == "large"
        })
        .collect();
    assert_eq!(picked.len(), 2, "the render fixture's left-object scenes");
    picked
}

/// Inpainting on the embedded model: a render of one object on the left, its right half masked,
/// edited with a caption that adds a second object on the right. The checker must find the new
/// object (its colour) on the right, and the left half beyond the feather must be the original
/// within 2/255, for at least 8 of the 10 tries (2 renders × 5 seeds).
#[test]
fn inpainting_adds_an_object_on_the_right() {
    use sana_model::pipeline::edit::{InitImage, FEATHER_PX};
    let pipe = pipeline();
    let mask: Vec<u8> = (0..64 * 64)
        .map(|i| if i % 64 >= 32 { 255 } else { 0 })
        .collect();
    let mut passed = 0;
    let mut tries = 0;
    for (scene, image) in left_object_renders() {
        let o = &scene.objects[0];
        let new_color = if o.color == "yellow" || scene.background == "yellow" {
            "white"
        } else {
            "yellow"
        };
        let prompt = format!(
            "a large {} {} on the left and a large {new_color} circle on the right, {} background",
            o.color, o.shape, scene.background
        );
        for seed in 0..5u64 {
            tries += 1;
            let mut req = request(&pipe, &[(prompt.clone(), seed)]);
            req.strength = Some(1.0);
            req.items[0].init_image = Some(InitImage {
                width: 64,
                height: 64,
                rgb8: image.clone(),
                mask: Some(mask.clone()),
                preserve_unmasked: true,
            });
            let out = pipe
                .generate(&req, &mut |_| {
                    sana_model::pipeline::sampling::Flow::Continue
                })
                .unwrap()
                .unwrap()
                .remove(0);
            let found = check(&out.rgb8, 64, 64);
            let added = found
                .objects
                .iter()
                .any(|f| f.object.position == "right" && f.object.color == new_color);
            // Columns left of the mask by more than the feather: the original pixels.
            let left: Vec<usize> = (0..64 * 64)
                .filter(|i| i % 64 + FEATHER_PX < 32)
                .flat_map(|i| 3 * i..3 * i + 3)
                .collect();
            let kept = left.iter().all(|&k| out.rgb8[k].abs_diff(image[k]) <= 2);
            println!(
                "{prompt:?} seed {seed}: found {:?}; new object on the right: {added}; left half \
                 kept: {kept}",
                found.objects.iter().map(|f| &f.object).collect::<Vec<_>>()
            );
            passed += usize::from(added && kept);
        }
    }
    println!("inpainting: {passed} of {tries} tries add the object and keep the left half");
    assert!(passed >= 8, "{passed} of {tries} tries succeeded (need 8)");
}

/// Image-to-image at a strength near 0 (one step of 50) returns the input within the
/// autoencoder's round-trip error: the output is no farther from the input than the round trip
/// through the autoencoder is, plus the one step's share.
#[test]
fn a_weak_edit_returns_the_input() {
    use sana_model::pipeline::edit::InitImage;
    let pipe = pipeline();
    for (scene, image) in left_object_renders() {
        let mut req = request(&pipe, &[(String::new(), 1)]);
        (req.steps, req.strength) = (50, Some(0.02));
        req.items[0].init_image = Some(InitImage {
            width: 64,
            height: 64,
            rgb8: image.clone(),
            mask: None,
            preserve_unmasked: false,
        });
        let out = pipe
            .generate(&req, &mut |_| {
                sana_model::pipeline::sampling::Flow::Continue
            })
            .unwrap()
            .unwrap()
            .remove(0);
        // The round trip: encode, decode.
        let vae = pipe.vae();
        let pixels: Vec<f32> = image
            .iter()
            .map(|&v| 2.0 * f32::from(v) / 255.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(pixels, (64, 64, 3), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let decoded = vae.decode(&vae.encode(&x).unwrap()).unwrap();
        let round_trip = sana_model::image::to_rgb8(&decoded).unwrap().remove(0);
        let rms = |a: &[u8], b: &[u8]| {
            (a.iter()
                .zip(b)
                .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
                .sum::<f64>()
                / a.len() as f64)
                .sqrt()
        };
        let (edit_err, ae_err) = (rms(&out.rgb8, &image), rms(&round_trip, &image));
        println!(
            "{scene:?}: rms |edit − input| {edit_err:.2}/255, |round trip − input| {ae_err:.2}/255"
        );
        assert!(
            edit_err <= 1.25 * ae_err + 1.0,
            "a one-step edit moved the image by {edit_err:.2} rms, the round trip by {ae_err:.2}"
        );
        let found = check(&out.rgb8, 64, 64);
        assert_eq!(found.background, scene.background, "the scene survives");
    }
}
