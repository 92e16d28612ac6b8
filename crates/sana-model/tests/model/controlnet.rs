//! ControlNet against diffusers (`tools/gen_fixtures.py controlnet`): SanaControlNetModel's block
//! residuals, the transformer with them, SanaControlNetPipeline end to end, batches mixing control
//! images, the released configs' parameter counts, and refusals.

use crate::common;
use crate::pipeline::{assemble_with, assert_pixels, case_in, run};

use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::{fixtures, load};
use sana_model::pipeline::edit::InitImage;
use sana_model::pipeline::{GenerateRequest, LoadOptions, SanaPipeline};
use sana_model::transformer::controlnet::{
    read_controlnet_config, ConditioningScale, SanaControlNetModel,
};
use sana_model::transformer::SanaTransformer2DModel;

fn dir() -> PathBuf {
    fixtures().join("controlnet")
}

fn controlnet() -> SanaControlNetModel {
    SanaControlNetModel::load(
        &dir().join("controlnet"),
        None,
        DType::F32,
        &common::device(),
    )
    .unwrap()
}

#[test]
fn controlnet_residuals_and_the_controlled_transformer_equal_diffusers() {
    let model = controlnet();
    let t = load(&dir().join("residuals.safetensors"));
    let lengths = [10usize, 6];
    let caption = model
        .prepare_caption_lengths(&t["encoder_hidden_states"], &lengths)
        .unwrap();
    let mut at_one = Vec::new();
    for scale in ["1.0", "0.4"] {
        let s: f32 = scale.parse().unwrap();
        for scales in [
            ConditioningScale::All(s),
            ConditioningScale::Rows(Tensor::new(&[s, s], &common::device()).unwrap()),
        ] {
            let residuals = model
                .residuals(
                    &t["hidden_states"],
                    &t["timestep"],
                    &t["controlnet_cond"],
                    &caption,
                    &scales,
                )
                .unwrap();
            assert_eq!(residuals.len(), 1);
            for (i, r) in residuals.iter().enumerate() {
                common::assert_close(
                    &format!("scale {scale} block {i}"),
                    r,
                    &t[&format!("scale_{scale}.{i}")],
                    1e-4,
                    "ControlNet residual",
                );
            }
            if scale == "1.0" {
                at_one = residuals;
            }
        }
    }
    let transformer = SanaTransformer2DModel::load(
        &fixtures().join("pipeline/sana/transformer"),
        None,
        DType::F32,
        &common::device(),
    )
    .unwrap();
    let caption = transformer
        .prepare_caption_lengths(&t["encoder_hidden_states"], &lengths)
        .unwrap();
    let out = transformer
        .forward_controlled(&t["hidden_states"], &t["timestep"], None, &caption, &at_one)
        .unwrap();
    common::assert_close(
        "controlled",
        &out,
        &t["transformer.output"],
        1e-4,
        "transformer output",
    );
}

fn control_image() -> InitImage {
    let img = image::open(dir().join("control.png")).unwrap().to_rgb8();
    InitImage {
        width: img.width() as usize,
        height: img.height() as usize,
        rgb8: img.into_raw(),
        mask: None,
        preserve_unmasked: false,
    }
}

/// The `sana` pipeline with the fixture ControlNet as `hed`.
fn pipeline() -> SanaPipeline {
    let root = assemble_with("sana", &fixtures().join("pipeline/sana/model_index.json"));
    let mut pipe = SanaPipeline::load(&root, &LoadOptions::new(common::device())).unwrap();
    pipe.add_controlnet("hed", &dir().join("controlnet"))
        .unwrap();
    pipe
}

fn request(case: &str) -> (GenerateRequest, Tensor) {
    let (mut req, reference) = case_in(&dir(), case);
    let meta: serde_json::Value =
        sana_model::weights::read_config(&dir().join("cases.json")).unwrap();
    let scale = meta[case]["controlnet_conditioning_scale"]
        .as_f64()
        .unwrap() as f32;
    req.controlnet = Some("hed".into());
    for item in &mut req.items {
        item.control_image = Some(control_image());
        item.controlnet_scale = Some(scale);
    }
    (req, reference)
}

#[test]
fn controlnet_pipeline_equals_diffusers() {
    let pipe = pipeline();
    let meta: serde_json::Value =
        sana_model::weights::read_config(&dir().join("cases.json")).unwrap();
    for case in meta.as_object().unwrap().keys() {
        let (req, reference) = request(case);
        assert_pixels(case, &run(&pipe, &req), &reference, 2);
    }
}

/// A `SanaControlNetPipeline` folder (`controlnet/` beside the other parts) loads its ControlNet
/// as `controlnet`, which a request may leave unnamed.
#[test]
fn a_controlnet_pipeline_folder_brings_its_controlnet() {
    let root = assemble_with("controlnet", &dir().join("model_index.json"));
    let link = root.join("controlnet");
    if !link.exists() {
        std::os::unix::fs::symlink(dir().join("controlnet").canonicalize().unwrap(), &link)
            .unwrap();
    }
    let pipe = SanaPipeline::load(&root, &LoadOptions::new(common::device())).unwrap();
    assert_eq!(pipe.controlnets().len(), 1);
    assert_eq!(pipe.controlnets()[0].0, "controlnet");
    let (mut req, reference) = request("dpm_cfg_scale_1");
    req.controlnet = None;
    assert_pixels("folder", &run(&pipe, &req), &reference, 2);
}

#[test]
fn a_batch_of_different_control_images_gives_each_its_own() {
    let pipe = pipeline();
    let (mut req, _) = request("dpm_cfg_scale_1");
    // 256² so that the matmuls take one kernel path whatever the batch: bit-identical.
    (req.width, req.height, req.steps, req.latents) = (256, 256, 2, None);
    let big = |flip: bool| {
        let c = control_image();
        let img = image::RgbImage::from_raw(c.width as u32, c.height as u32, c.rgb8).unwrap();
        let mut img = image::imageops::resize(&img, 256, 256, image::imageops::FilterType::Nearest);
        if flip {
            image::imageops::flip_horizontal_in_place(&mut img);
        }
        InitImage {
            width: 256,
            height: 256,
            rgb8: img.into_raw(),
            mask: None,
            preserve_unmasked: false,
        }
    };
    req.items[0].control_image = Some(big(false));
    req.items[1].control_image = Some(big(true));
    (req.items[0].seed, req.items[1].seed) = (3, 3);
    req.items[1].prompt = req.items[0].prompt.clone();
    req.items[1].controlnet_scale = Some(0.4);
    let batch = run(&pipe, &req);
    assert!(
        batch[0] != batch[1],
        "different control images and scales, different images"
    );
    for (k, item) in req.items.clone().into_iter().enumerate() {
        let mut alone = req.clone();
        alone.items = vec![item];
        assert!(
            run(&pipe, &alone)[0] == batch[k],
            "item {k} alone vs in the batch"
        );
    }
}

#[test]
fn control_requests_without_a_controlnet_or_with_bad_input_are_refused() {
    let pipe = pipeline();
    let (req, _) = request("dpm_cfg_scale_1");
    let refuse = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = req.clone();
        f(&mut r);
        pipe.generate(&r, &mut |_| sana_model::pipeline::sampling::Flow::Continue)
            .expect_err("refused")
            .to_string()
    };
    let err = refuse(&|r| r.controlnet = Some("depth".into()));
    assert!(err.contains("depth") && err.contains("hed"), "{err}");
    let err = refuse(&|r| r.items[1].control_image = None);
    assert!(err.contains("control_image"), "{err}");
    let err = refuse(&|r| r.items[0].controlnet_scale = Some(f32::NAN));
    assert!(err.contains("controlnet_conditioning_scale"), "{err}");
    let err = refuse(&|r| {
        let mut small = control_image();
        small.width = 32;
        small.rgb8.truncate(32 * small.height * 3);
        r.items[0].control_image = Some(small);
    });
    assert!(
        err.contains("control_image") && err.contains("96x64"),
        "{err}"
    );
    // Without any ControlNet loaded, a control image is refused.
    let root = assemble_with("sana", &fixtures().join("pipeline/sana/model_index.json"));
    let bare = SanaPipeline::load(&root, &LoadOptions::new(common::device())).unwrap();
    let mut r = req.clone();
    r.controlnet = None;
    let err = bare
        .generate(&r, &mut |_| sana_model::pipeline::sampling::Flow::Continue)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("control_image") && err.contains("ControlNet"),
        "{err}"
    );
    // A ControlNet that does not fit the transformer.
    let mut pipe = bare;
    let err = pipe
        .add_controlnet("x", &fixtures().join("pipeline/sana"))
        .expect_err("not a ControlNet")
        .to_string();
    assert!(err.contains("controlnet/config.json"), "{err}");
}

/// Hands out zeros of every shape asked for (broadcast, so nothing is allocated) and counts the
/// parameters.
struct Counting(std::sync::atomic::AtomicUsize);

impl SimpleBackend for Counting {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .fetch_add(s.elem_count(), std::sync::atomic::Ordering::Relaxed);
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the shape is needed")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[test]
fn released_controlnet_configs_build_with_their_parameter_counts() {
    let real = fixtures().join("real-configs/controlnet");
    let counts: std::collections::HashMap<String, usize> =
        sana_model::weights::read_config(&real.join("param_counts.json")).unwrap();
    // Counted by diffusers on the meta device; the 0.6B one also equals the fp16 checkpoint of the
    // community conversion on the Hub (ishan24/Sana_600M_1024px_ControlNetPlus_diffusers,
    // 337 549 360 bytes = 2 × 168 765 696 + a 17 968-byte header).
    assert_eq!(counts["Sana_600M_1024px_ControlNet_HED"], 168_765_696);
    assert_eq!(counts["Sana_1600M_1024px_BF16_ControlNet_HED"], 631_576_960);
    for (name, want) in counts {
        let cfg = read_controlnet_config(&real.join(format!("{name}.json"))).unwrap();
        assert_eq!(cfg.num_layers, 7, "{name}");
        let backend = std::sync::Arc::new(Counting(Default::default()));
        let vb = VarBuilder::from_backend(
            Box::new(CountingRef(backend.clone())),
            DType::BF16,
            Device::Cpu,
        );
        SanaControlNetModel::new(&cfg, vb).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = backend.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(got, want, "{name}: parameters built");
    }
}

/// [`Counting`] shared, so the test reads the count after the build.
struct CountingRef(std::sync::Arc<Counting>);

impl SimpleBackend for CountingRef {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
