//! `sana bench controlnet`: one denoising step with a ControlNet (the ControlNet's blocks, then the
//! transformer with its residuals) of real configs (random weights, f32 on CPU), beside diffusers'
//! SanaControlNetPipeline step (`tools/bench_reference.py controlnet`) in the same run; and our
//! step without the ControlNet, for what it adds. The control image is encoded once per
//! generation (before the loop, `pipeline::control::control_latents`), so a step has no encode.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sana_model::transformer::controlnet::{
    read_controlnet_config, ConditioningScale, SanaControlNetModel,
};
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig};
use sana_model::weights::{random_var_builder, read_config};

use super::{parse_hw, time_ms, BenchArgs};

#[derive(Debug, Args)]
pub struct ControlNetBench {
    /// The transformer config.json.
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/transformer/Sana_600M_1024px.json"
    )]
    config: PathBuf,
    /// The ControlNet config.json.
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/controlnet/Sana_600M_1024px_ControlNet_HED.json"
    )]
    controlnet_config: PathBuf,
    /// Latent grid, HxW (16x16 is 512²).
    #[arg(long, default_value = "16x16")]
    latent: String,
    /// Rows (2 = one image under CFG).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Text tokens per row.
    #[arg(long, default_value_t = 300)]
    text_len: usize,
}

impl ControlNetBench {
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
        let dev = Device::Cpu;
        let cfg: SanaTransformerConfig = read_config(&self.config)?;
        let ccfg = read_controlnet_config(&self.controlnet_config)?;
        let model = SanaTransformer2DModel::new(&cfg, random_var_builder(0.02, DType::F32, &dev))?;
        let controlnet =
            SanaControlNetModel::new(&ccfg, random_var_builder(0.02, DType::F32, &dev))?;
        let (h, w) = parse_hw(&self.latent)?;
        let b = self.batch;
        let x = Tensor::randn(0f32, 1., (b, cfg.in_channels, h, w), &dev)?;
        let cond = Tensor::randn(0f32, 1., (b, cfg.in_channels, h, w), &dev)?;
        let y = Tensor::randn(0f32, 1., (b, self.text_len, cfg.caption_channels), &dev)?;
        let lengths = vec![self.text_len; b];
        let t = Tensor::full(500f32, b, &dev)?;
        // The caption work is per generation in both (ours once; diffusers' inside each forward,
        // so its step includes it, as a real step does).
        let caption = model.prepare_caption_lengths(&y, &lengths)?;
        let control_caption = controlnet.prepare_caption_lengths(&y, &lengths)?;
        let (plain, _) = time_ms(args.warmup, args.repeat, || {
            model.forward_with_caption(&x, &t, None, &caption)?;
            Ok(())
        })?;
        let (ours, _) = time_ms(args.warmup, args.repeat, || {
            let residuals = controlnet.residuals(
                &x,
                &t,
                &cond,
                &control_caption,
                &ConditioningScale::All(1.0),
            )?;
            model.forward_controlled(&x, &t, None, &caption, &residuals)?;
            Ok(())
        })?;
        let reference = args.reference(&[
            "controlnet".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--controlnet-config".into(),
            self.controlnet_config.display().to_string(),
            "--latent".into(),
            h.to_string(),
            w.to_string(),
            "--batch".into(),
            b.to_string(),
            "--text-len".into(),
            self.text_len.to_string(),
        ])?;
        let name = self
            .config
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        println!(
            "controlnet {name}: a step without the ControlNet: ours {plain:.1} ms; with its {} blocks: \
             ours {ours:.1} ms ({:.2}×)",
            ccfg.num_layers,
            ours / plain
        );
        args.report(
            &format!(
                "controlnet step {name} + {} ControlNet blocks, latent {h}x{w}, batch {b}, text {} f32 cpu",
                ccfg.num_layers, self.text_len
            ),
            ours,
            reference,
        );
        Ok(())
    }
}
