//! Image-to-image and inpainting against the references of `tools/fixtures/edits.py`: diffusers'
//! `SanaPipeline` loop with SD3's img2img start and inpainting blend (DPM-Solver and flow Euler),
//! and `SanaSprintImg2ImgPipeline`; plus strength 1 = text-to-image and the paste-back.

use candle_core::{IndexOp, Tensor};
use sana_model::pipeline::edit::{InitImage, FEATHER_PX};
use sana_model::pipeline::sampling::Flow;
use sana_model::pipeline::{GenerateRequest, ItemRequest, SanaPipeline};
use sana_model::scheduler::SchedulerConfig;
use sana_model::weights::read_config;
use serde_json::Value;

use crate::common::{fixtures, load};
use crate::pipeline::{assert_pixels, pipeline, run};

/// The request of `case` (each prompt with its images, the case's image and mask, no paste-back:
/// diffusers returns the decoded image), the reference images, and the input image.
fn case(name: &str) -> (String, GenerateRequest, Tensor, Vec<u8>) {
    let dir = fixtures().join("edits");
    let meta: Value = read_config(&dir.join("cases.json")).unwrap();
    let c = &meta[name];
    let t = load(&dir.join("cases.safetensors"));
    let (h, w) = (
        c["height"].as_u64().unwrap() as usize,
        c["width"].as_u64().unwrap() as usize,
    );
    let image: Vec<u8> = t[&format!("{name}.image")]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mask: Option<Vec<u8>> = t
        .get(&format!("{name}.mask"))
        .map(|m| m.flatten_all().unwrap().to_vec1().unwrap());
    let init = InitImage {
        width: w,
        height: h,
        rgb8: image.clone(),
        mask,
        preserve_unmasked: false,
    };
    let mut req = GenerateRequest::new("");
    req.items = c["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ItemRequest {
            prompt: p.as_str().unwrap().to_string(),
            negative_prompt: String::new(),
            num_images: c["num_images_per_prompt"].as_u64().unwrap() as usize,
            seed: 0,
            guidance_scale: c["guidance_scale"].as_f64().unwrap() as f32,
            init_image: Some(init.clone()),
            ..ItemRequest::default()
        })
        .collect();
    (req.height, req.width) = (h, w);
    req.steps = c["steps"].as_u64().unwrap() as usize;
    req.use_resolution_binning = false;
    req.strength = Some(c["strength"].as_f64().unwrap());
    req.latents = Some(t[&format!("{name}.noise")].clone());
    if c["scheduler"] == "euler" {
        req.scheduler = Some(
            SchedulerConfig::from_json(
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#,
            )
            .unwrap(),
        );
    }
    let pipe = c["pipeline"].as_str().unwrap().to_string();
    (pipe, req, t[&format!("{name}.images")].clone(), image)
}

#[test]
fn edits_equal_diffusers() {
    let mut pipes: std::collections::HashMap<String, SanaPipeline> = Default::default();
    for name in [
        "sana_img2img_dpm",
        "sana_inpaint_dpm_full",
        "sana_inpaint_euler",
        "sprint_img2img",
    ] {
        let (pipe_name, req, reference, _) = case(name);
        let pipe = pipes
            .entry(pipe_name.clone())
            .or_insert_with(|| pipeline(&pipe_name));
        assert_pixels(name, &run(pipe, &req), &reference, 2);
    }
}

/// Strength 1 starts a flow sampler from the noise alone: image-to-image is text-to-image from the
/// same noise, bit for bit.
#[test]
fn strength_one_is_text_to_image() {
    let pipe = pipeline("sana");
    let (_, mut edit, _, _) = case("sana_img2img_dpm");
    edit.strength = Some(1.0);
    let mut plain = edit.clone();
    plain.strength = None;
    for item in &mut plain.items {
        item.init_image = None;
    }
    assert_eq!(run(&pipe, &edit), run(&pipe, &plain));
}

/// The edit must depend on the image: another input gives other pixels at strength 0.6.
#[test]
fn the_image_matters() {
    let pipe = pipeline("sana");
    let (_, req, _, _) = case("sana_img2img_dpm");
    let mut other = req.clone();
    for item in &mut other.items {
        let init = item.init_image.as_mut().unwrap();
        init.rgb8.iter_mut().for_each(|v| *v = 255 - *v);
    }
    let (a, b) = (run(&pipe, &req), run(&pipe, &other));
    let c = sana_testing::compare_u8(&a[0], &b[0]).unwrap();
    assert!(
        c.max_abs_diff > 20.0,
        "inverting the input changed at most {}/255",
        c.max_abs_diff
    );
}

/// With the paste-back on, inpainting keeps every unmasked pixel farther than the feather from
/// the mask exactly, and the masked pixels are the decoded ones.
#[test]
fn paste_back_keeps_the_unmasked_pixels() {
    let pipe = pipeline("sana");
    let (_, mut req, reference, image) = case("sana_inpaint_dpm_full");
    for item in &mut req.items {
        item.init_image.as_mut().unwrap().preserve_unmasked = true;
    }
    let mask = req.items[0]
        .init_image
        .as_ref()
        .unwrap()
        .mask
        .clone()
        .unwrap();
    let (w, h) = (req.width, req.height);
    let out = run(&pipe, &req);
    let mut far = 0;
    for (k, img) in out.iter().enumerate() {
        let decoded: Vec<u8> = reference
            .i(k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for y in 0..h {
            for x in 0..w {
                let near = (y.saturating_sub(FEATHER_PX)..(y + FEATHER_PX + 1).min(h)).any(|yy| {
                    (x.saturating_sub(FEATHER_PX)..(x + FEATHER_PX + 1).min(w))
                        .any(|xx| mask[yy * w + xx] >= 128)
                });
                let p = 3 * (y * w + x);
                if mask[y * w + x] >= 128 {
                    for c in 0..3 {
                        assert!(
                            img[p + c].abs_diff(decoded[p + c]) <= 2,
                            "image {k} ({x}, {y}) is in the mask: the decoded pixel"
                        );
                    }
                } else if !near {
                    far += 1;
                    assert_eq!(
                        &img[p..p + 3],
                        &image[p..p + 3],
                        "image {k} ({x}, {y}) is beyond the feather: the original pixel"
                    );
                }
            }
        }
    }
    assert!(
        far > 1000,
        "the fixture's mask leaves too few far pixels ({far})"
    );
}

#[test]
fn bad_edits_are_refused_with_the_field() {
    let pipe = pipeline("sana");
    let (_, req, _, _) = case("sana_img2img_dpm");
    let field = |r: &GenerateRequest| match pipe.generate(r, &mut |_| Flow::Continue) {
        Err(sana_model::Error::Unsupported { field, .. }) => field,
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|o| o.map(|v| v.len()))
        ),
    };
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let mut bad = req.clone();
        bad.strength = Some(strength);
        assert_eq!(field(&bad), "strength", "strength {strength}");
    }
    let mut no_strength = req.clone();
    no_strength.strength = None;
    assert_eq!(field(&no_strength), "strength");
    let mut missing = req.clone();
    missing.items[1].init_image = None;
    assert_eq!(field(&missing), "image");
    let mut small = req.clone();
    let init = small.items[0].init_image.as_mut().unwrap();
    init.rgb8.truncate(10);
    assert_eq!(field(&small), "image");
    let mut mask = req.clone();
    mask.items[0].init_image.as_mut().unwrap().mask = Some(vec![0; 3]);
    assert_eq!(field(&mask), "mask");
    let mut size = req.clone();
    size.width = 128;
    assert_eq!(field(&size), "image");
}

/// The inpainting blend on every sampler (DPM-Solver, flow Euler, SCM): a mask that repaints
/// everything is image-to-image exactly, and one that keeps everything returns the image's own
/// latents, i.e. its round trip through the autoencoder.
#[test]
fn all_or_nothing_masks_reduce_to_image_to_image_and_the_round_trip() {
    use sana_model::pipeline::edit::image_tensor;
    for name in ["sana_img2img_dpm", "sana_inpaint_euler", "sprint_img2img"] {
        let (pipe_name, mut req, _, _) = case(name);
        let pipe = pipeline(&pipe_name);
        req.items.truncate(1);
        req.items[0].num_images = 1;
        req.latents = req.latents.map(|l| l.narrow(0, 0, 1).unwrap());
        let with_mask = |fill: u8| {
            let mut r = req.clone();
            let init = r.items[0].init_image.as_mut().unwrap();
            init.mask = Some(vec![fill; init.width * init.height]);
            init.preserve_unmasked = false;
            r
        };
        let mut plain = req.clone();
        plain.items[0].init_image.as_mut().unwrap().mask = None;
        assert_eq!(
            run(&pipe, &with_mask(255)),
            run(&pipe, &plain),
            "{name}: a full mask is image-to-image"
        );
        let init = req.items[0].init_image.as_ref().unwrap();
        let x = image_tensor(init, (req.width, req.height), pipe.device()).unwrap();
        let z = (pipe.vae().encode(&x).unwrap() * pipe.vae().config().scaling_factor).unwrap();
        let round_trip = pipe.decode_to_rgb8(&z, req.height, req.width).unwrap();
        let kept = run(&pipe, &with_mask(0));
        let c = sana_testing::assert_pixels_close(
            &format!("{name}: an empty mask keeps the image's latents"),
            &kept[0],
            &round_trip[0],
            1,
        );
        println!(
            "{name}: empty mask vs round trip: max {}/255",
            c.max_abs_diff
        );
    }
}
