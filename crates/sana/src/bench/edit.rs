//! `sana bench edit`: image-to-image and inpainting on real configs (random weights), ours beside
//! the Python reference in the same run: SanaPipeline's loop with SD3's image-to-image start and
//! inpainting blend (`tools/bench_reference.py edit`, as the parity fixtures build it), and
//! `SanaSprintImg2ImgPipeline`.
//!
//! What it shows: an edit at strength `s` costs the image encode plus `steps × s` steps (no
//! wasted step), the inpainting blend's share of a step, and SANA-Sprint image-to-image against
//! diffusers' own pipeline.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use sana_model::pipeline::edit::InitImage;
use sana_model::pipeline::{GenerateRequest, StageTimes};
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig};
use sana_model::weights::{random_var_builder, read_config};

use super::pipeline::{print_stages, time_generate};
use super::BenchArgs;

#[derive(Debug, Args)]
pub struct EditBench {
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/transformer/Sana_600M_512px.json"
    )]
    transformer_config: PathBuf,
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/transformer/Sana_Sprint_0.6B_1024px.json"
    )]
    sprint_config: PathBuf,
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/vae/dc-ae-f32c32-sana-1.0.json"
    )]
    vae_config: PathBuf,
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/text_encoder/gemma-2-2b-it.json"
    )]
    text_encoder_config: PathBuf,
    #[arg(long, default_value = "tests/fixtures/text_encoder/pipeline/tokenizer")]
    tokenizer: PathBuf,
    #[arg(
        long,
        default_value = "tests/fixtures/scheduler/configs/sana_dpm_shift3.json"
    )]
    scheduler_config: PathBuf,
    /// Image size (square).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Steps of the full schedule (SanaPipeline).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Strength of the SanaPipeline edits.
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
    /// Strength of the SANA-Sprint edit (its pipeline's example: 2 steps, 0.5 → one step).
    #[arg(long, default_value_t = 0.5)]
    sprint_strength: f64,
    #[arg(
        long,
        default_value = "a cyberpunk cat with a neon sign that says sana on a rainy night street"
    )]
    prompt: String,
}

/// A smooth test picture and a right-half mask at `size`².
fn picture(size: usize, masked: bool) -> InitImage {
    let rgb8 = (0..size * size)
        .flat_map(|i| {
            let (x, y) = (i % size, i / size);
            [(x * 255 / size) as u8, (y * 255 / size) as u8, 96]
        })
        .collect();
    InitImage {
        width: size,
        height: size,
        rgb8,
        mask: masked.then(|| {
            (0..size * size)
                .map(|i| if i % size >= size / 2 { 255 } else { 0 })
                .collect()
        }),
        preserve_unmasked: true,
    }
}

impl EditBench {
    fn reference(&self, args: &BenchArgs) -> Result<Vec<serde_json::Value>> {
        args.reference_json(&[
            "edit".into(),
            "--transformer-config".into(),
            self.transformer_config.display().to_string(),
            "--sprint-config".into(),
            self.sprint_config.display().to_string(),
            "--vae-config".into(),
            self.vae_config.display().to_string(),
            "--text-encoder-config".into(),
            self.text_encoder_config.display().to_string(),
            "--tokenizer".into(),
            self.tokenizer.display().to_string(),
            "--scheduler-config".into(),
            self.scheduler_config.display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--steps".into(),
            self.steps.to_string(),
            "--strength".into(),
            self.strength.to_string(),
            "--sprint-strength".into(),
            self.sprint_strength.to_string(),
            "--prompt".into(),
            self.prompt.clone(),
        ])
    }

    /// Times the reference first (it exits and gives its memory back), then ours.
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
        use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig};
        use sana_model::pipeline::{LoadOptions, PipelineKind, SanaPipeline};
        use sana_model::scheduler::SchedulerConfig;
        use sana_model::text_encoder::{
            Gemma2Config, Gemma2Model, GemmaTokenizer, SanaTextEncoder,
        };

        let reference = self.reference(args)?;
        let pick = |kind: &str| reference.iter().find(|r| r["kind"] == kind);
        let dev = candle_core::Device::Cpu;
        let random = |dtype: DType| random_var_builder(0.02, dtype, &dev);
        let build = |config: &PathBuf,
                     kind: PipelineKind,
                     scheduler: SchedulerConfig|
         -> Result<SanaPipeline> {
            let tcfg: SanaTransformerConfig = read_config(config)?;
            let vcfg: AutoencoderDCConfig = read_config(&self.vae_config)?;
            let gcfg: Gemma2Config = read_config(&self.text_encoder_config)?;
            Ok(SanaPipeline::from_parts(
                kind,
                SanaTextEncoder::new(
                    Gemma2Model::new(&gcfg, random(DType::F32))?,
                    GemmaTokenizer::from_file(&self.tokenizer.join("tokenizer.json"))?,
                ),
                SanaTransformer2DModel::new(&tcfg, random(DType::F32))?,
                AutoencoderDC::new(&vcfg, random(DType::F32))?,
                scheduler,
                &LoadOptions::new(dev.clone()),
            ))
        };
        let request = |steps: usize, strength: Option<f64>, masked: bool, guidance: f32| {
            let mut req = GenerateRequest::new(&self.prompt);
            req.items[0].guidance_scale = guidance;
            req.items[0].init_image = strength.map(|_| picture(self.size, masked));
            (req.width, req.height, req.steps) = (self.size, self.size, steps);
            req.use_resolution_binning = false;
            req.strength = strength;
            req
        };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let mean = |t: &StageTimes| {
            t.steps.iter().map(|d| ms(*d)).sum::<f64>() / t.steps.len().max(1) as f64
        };

        let sana = build(
            &self.transformer_config,
            PipelineKind::Sana,
            SchedulerConfig::from_file(&self.scheduler_config)?,
        )?;
        let (t2i_ms, _, t2i) = time_generate(
            &sana,
            &request(self.steps, None, false, 4.5),
            args.warmup,
            args.repeat,
        )?;
        let (i2i_ms, _, i2i) = time_generate(
            &sana,
            &request(self.steps, Some(self.strength), false, 4.5),
            args.warmup,
            args.repeat,
        )?;
        let (inp_ms, _, inp) = time_generate(
            &sana,
            &request(self.steps, Some(self.strength), true, 4.5),
            args.warmup,
            args.repeat,
        )?;
        drop(sana);
        let run = i2i.steps.len();
        println!(
            "edit {}x{0}, {} steps, strength {}: image-to-image runs {run} of the {} steps",
            self.size, self.steps, self.strength, self.steps
        );
        let predicted = ms(t2i.encode)
            + ms(t2i.caption)
            + ms(i2i.image_encode)
            + run as f64 * mean(&t2i)
            + ms(t2i.decode);
        println!(
            "  text-to-image {t2i_ms:.0} ms; image-to-image {i2i_ms:.0} ms = {:.2} × (text \
             encode + image encode {:.0} ms + {run} text-to-image steps + decode = {predicted:.0} ms)",
            i2i_ms / predicted,
            ms(i2i.image_encode)
        );
        println!("  image-to-image, ours beside the reference loop:");
        print_stages(&i2i, i2i_ms, pick("img2img"));
        println!("  inpainting, ours beside the reference loop:");
        print_stages(&inp, inp_ms, pick("inpaint"));
        println!(
            "  inpainting blend: a step {:.1} ms vs {:.1} ms without a mask (ratio {:.3})",
            mean(&inp),
            mean(&i2i),
            mean(&inp) / mean(&i2i)
        );

        let sprint = build(
            &self.sprint_config,
            PipelineKind::Sprint,
            SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler", "sigma_data": 0.5}"#)
                .context("SCM config")?,
        )?;
        let (sp_ms, _, sp) = time_generate(
            &sprint,
            &request(2, Some(self.sprint_strength), false, 4.5),
            args.warmup,
            args.repeat,
        )?;
        println!(
            "sprint image-to-image {}x{0}, 2 steps, strength {} ({} step run), ours beside \
             SanaSprintImg2ImgPipeline:",
            self.size,
            self.sprint_strength,
            sp.steps.len()
        );
        print_stages(&sp, sp_ms, pick("sprint_img2img"));
        Ok(())
    }
}
