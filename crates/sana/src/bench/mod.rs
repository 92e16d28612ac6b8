//! `sana bench`: times our implementation of a part and, in the same run, the Python reference
//! (`tools/bench_reference.py`, diffusers/torch) on the same config and shapes, then prints the
//! ratio ours / reference. Weights are random: the cost of a forward does not depend on them.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig};
use sana_model::ops::depthwise_conv2d;
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig, TransformerInput};
use sana_model::weights::{random_var_builder, read_config};

mod adapters;
mod controlnet;
mod edit;
mod http;
mod pipeline;
mod text_encoder;

use adapters::AdapterBench;
use controlnet::ControlNetBench;
use edit::EditBench;
use http::HttpBench;
use pipeline::{ModelBench, PipelineBench};
use text_encoder::TextEncoderBench;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    part: Part,
    /// Timed runs after the warm-up.
    #[arg(long, default_value_t = 3, global = true)]
    repeat: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1, global = true)]
    warmup: usize,
    /// Python with torch and diffusers for the reference timing; without it only ours is timed.
    #[arg(long, env = "SANA_REFERENCE_PYTHON", global = true)]
    reference_python: Option<PathBuf>,
    /// The reference timing script.
    #[arg(long, default_value = "tools/bench_reference.py", global = true)]
    reference_script: PathBuf,
    /// CPU threads for the reference (ours uses rayon's default, one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Part {
    /// One SanaTransformer2DModel forward of a real config (random weights) on CPU, f32 and/or bf16.
    Transformer {
        /// A transformer config.json.
        #[arg(long)]
        config: PathBuf,
        /// Latent grid sizes to time, as HxW (e.g. 16x16 for 512², 32x32 for 1024²).
        #[arg(long, value_delimiter = ',', default_value = "16x16,32x32")]
        latent: Vec<String>,
        /// Batch (2 = one prompt under classifier-free guidance).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Text tokens (all unmasked).
        #[arg(long, default_value_t = 300)]
        text_len: usize,
        /// Weight dtypes, comma-separated (f32, bf16): one row each, and bf16 against f32 when
        /// both are timed; the reference runs in the same dtype (`torch_dtype`).
        #[arg(long = "dtype", value_delimiter = ',', default_value = "f32")]
        dtypes: Vec<String>,
    },
    /// The depthwise convolution op at a Mix-FFN shape (default: Sana-1.6B at 1024², C = 11200).
    Depthwise {
        #[arg(long, default_value_t = 11200)]
        channels: usize,
        #[arg(long, default_value = "32x32")]
        size: String,
        #[arg(long, default_value_t = 3)]
        kernel: usize,
    },
    /// One AutoencoderDC decode of a real config (random weights), f32 on CPU.
    Vae {
        /// An AutoencoderDC config.json.
        #[arg(
            long,
            default_value = "tests/fixtures/real-configs/vae/dc-ae-f32c32-sana-1.0.json"
        )]
        config: PathBuf,
        /// Latent grid sizes to time, as HxW (16x16 decodes 512²).
        #[arg(long, value_delimiter = ',', default_value = "16x16")]
        latent: Vec<String>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Sana prompt encoding (Gemma-2 + instruction + empty negative prompt) of a real Gemma
    /// config (random weights), f32 on CPU, cold and with the instruction prefix cached.
    TextEncoder(TextEncoderBench),
    /// The whole SanaPipeline (prompt → image) of real configs (random weights), f32 on CPU, with
    /// the time of each stage.
    Pipeline(PipelineBench),
    /// Image-to-image and inpainting of real configs (random weights), f32 on CPU: what an edit
    /// costs against text-to-image, beside diffusers (SanaPipeline's loop with SD3's edit steps,
    /// and SanaSprintImg2ImgPipeline).
    Edit(EditBench),
    /// LoRA and PAG: the DiT forward with a rank-r adapter on every attention projection and a
    /// PAG step, each against the plain forward in the same run, and the resident memory an
    /// adapter adds.
    Adapters(AdapterBench),
    /// One denoising step with a ControlNet of real configs (random weights) beside diffusers'
    /// SanaControlNetPipeline step, and without the ControlNet.
    Controlnet(ControlNetBench),
    /// A load test of a running `sana serve`: many clients posting generations at once; checks
    /// every answer and reports images/s and latency percentiles.
    Http(HttpBench),
    /// A model folder end to end (default: the embedded sana-tiny-scenes) at its default steps,
    /// guidance and size, beside diffusers' `SanaPipeline.from_pretrained` on the same folder.
    Model(ModelBench),
}

fn parse_hw(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once('x')
        .with_context(|| format!("expected HxW, got {s:?}"))?;
    Ok((h.trim().parse()?, w.trim().parse()?))
}

/// Mean and minimum milliseconds of `repeat` runs after `warmup`.
fn time_ms(warmup: usize, repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    Ok((mean, times.iter().cloned().fold(f64::INFINITY, f64::min)))
}

impl BenchArgs {
    /// Runs the reference script and returns the JSON object of each line it printed (one per
    /// row), or nothing without a Python.
    fn reference_json(&self, part_args: &[String]) -> Result<Vec<serde_json::Value>> {
        let Some(python) = &self.reference_python else {
            return Ok(Vec::new());
        };
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let mut command = Command::new(python);
        // The reference runs with the user's environment, not the thread settings `sana` chose
        // for itself.
        for key in crate::DEFAULTED_ENV.get().into_iter().flatten() {
            command.env_remove(key);
        }
        crate::memory::allow_huge_pages_in_child(&mut command);
        let out = command
            .arg(&self.reference_script)
            .args(part_args)
            .args(["--warmup", &self.warmup.to_string()])
            .args(["--repeat", &self.repeat.to_string()])
            .args(["--threads", &threads.to_string()])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!(
                "reference failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line.trim())
                    .with_context(|| format!("reference printed {line:?}"))
            })
            .collect()
    }

    fn reference(&self, part_args: &[String]) -> Result<Option<(f64, String)>> {
        let Some(v) = self.reference_json(part_args)?.into_iter().next() else {
            return Ok(None);
        };
        let ms = v["ms_mean"]
            .as_f64()
            .context("reference JSON lacks ms_mean")?;
        let label = format!(
            "{} (torch {}, {} threads)",
            v["impl"].as_str().unwrap_or("?"),
            v["torch"].as_str().unwrap_or("?"),
            v["threads"]
        );
        Ok(Some((ms, label)))
    }

    fn report(&self, what: &str, ours_ms: f64, reference: Option<(f64, String)>) {
        match reference {
            Some((ref_ms, label)) => println!(
                "{what}: ours {ours_ms:.1} ms | {label} {ref_ms:.1} ms | ratio ours/reference {:.2}",
                ours_ms / ref_ms
            ),
            None => println!("{what}: ours {ours_ms:.1} ms (no --reference-python: no baseline)"),
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let dev = Device::Cpu;
    match &args.part {
        Part::Transformer {
            config,
            latent,
            batch,
            text_len,
            dtypes,
        } => {
            let cfg: SanaTransformerConfig = read_config(config)?;
            let name = config.file_stem().unwrap_or_default().to_string_lossy();
            if dtypes.iter().any(|d| d == "bf16") {
                println!("CPU bf16 matmuls: {}", sana_model::ops::cpu_bf16_status());
            }
            for hw in latent {
                let (h, w) = parse_hw(hw)?;
                // ours (ms) per dtype, for the bf16 / f32 line
                let mut ours_by_dtype = Vec::new();
                for dtype_name in dtypes {
                    let dtype = match dtype_name.as_str() {
                        "f32" => DType::F32,
                        "bf16" => DType::BF16,
                        other => bail!("--dtype {other:?}: f32 or bf16"),
                    };
                    let model =
                        SanaTransformer2DModel::new(&cfg, random_var_builder(0.02, dtype, &dev))?;
                    let x = Tensor::randn(0f32, 1., (*batch, cfg.in_channels, h, w), &dev)?;
                    let y =
                        Tensor::randn(0f32, 1., (*batch, *text_len, cfg.caption_channels), &dev)?
                            .to_dtype(dtype)?;
                    let mask = Tensor::ones((*batch, *text_len), DType::F32, &dev)?;
                    let t_value = if cfg.guidance_embeds { 0.5 } else { 500.0 };
                    let t = Tensor::full(t_value, *batch, &dev)?;
                    let g = Tensor::full(0.45f32, *batch, &dev)?;
                    let input = TransformerInput {
                        hidden_states: &x,
                        encoder_hidden_states: &y,
                        encoder_attention_mask: Some(&mask),
                        timestep: &t,
                        guidance: cfg.guidance_embeds.then_some(&g),
                    };
                    let (ours, _) = time_ms(args.warmup, args.repeat, || {
                        model.forward(&input)?;
                        Ok(())
                    })?;
                    drop(model);
                    let reference = args.reference(&[
                        "transformer".into(),
                        "--config".into(),
                        config.display().to_string(),
                        "--latent".into(),
                        h.to_string(),
                        w.to_string(),
                        "--batch".into(),
                        batch.to_string(),
                        "--text-len".into(),
                        text_len.to_string(),
                        "--dtype".into(),
                        dtype_name.clone(),
                    ])?;
                    args.report(
                        &format!(
                            "transformer {name} latent {h}x{w} batch {batch} text {text_len} \
                             {dtype_name} cpu"
                        ),
                        ours,
                        reference,
                    );
                    ours_by_dtype.push((dtype_name.as_str(), ours));
                }
                if let (Some((_, f32_ms)), Some((_, bf16_ms))) = (
                    ours_by_dtype.iter().find(|(d, _)| *d == "f32"),
                    ours_by_dtype.iter().find(|(d, _)| *d == "bf16"),
                ) {
                    println!(
                        "transformer {name} latent {h}x{w}: ours bf16 / ours f32 = {:.2} \
                         (speed-up {:.2}×)",
                        bf16_ms / f32_ms,
                        f32_ms / bf16_ms
                    );
                }
            }
        }
        Part::TextEncoder(bench) => bench.run(&args)?,
        Part::Pipeline(bench) => bench.run(&args)?,
        Part::Edit(bench) => bench.run(&args)?,
        Part::Adapters(bench) => bench.run(&args)?,
        Part::Controlnet(bench) => bench.run(&args)?,
        Part::Model(bench) => bench.run(&args)?,
        Part::Http(bench) => bench.run()?,
        Part::Vae {
            config,
            latent,
            batch,
        } => {
            let cfg: AutoencoderDCConfig = read_config(config)?;
            let model = AutoencoderDC::new(&cfg, random_var_builder(0.02, DType::F32, &dev))?;
            let name = config.file_stem().unwrap_or_default().to_string_lossy();
            for hw in latent {
                let (h, w) = parse_hw(hw)?;
                let z = Tensor::randn(0f32, 1., (*batch, cfg.latent_channels, h, w), &dev)?;
                let (ours, _) = time_ms(args.warmup, args.repeat, || {
                    model.decode(&z)?;
                    Ok(())
                })?;
                let reference = args.reference(&[
                    "vae".into(),
                    "--config".into(),
                    config.display().to_string(),
                    "--latent".into(),
                    h.to_string(),
                    w.to_string(),
                    "--batch".into(),
                    batch.to_string(),
                ])?;
                let ratio = cfg.spatial_compression_ratio();
                args.report(
                    &format!(
                        "vae decode {name} latent {h}x{w} ({}x{} px) batch {batch} f32 cpu",
                        h * ratio,
                        w * ratio
                    ),
                    ours,
                    reference,
                );
            }
        }
        Part::Depthwise {
            channels,
            size,
            kernel,
        } => {
            let (h, w) = parse_hw(size)?;
            let x = Tensor::randn(0f32, 1., (1, *channels, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (*channels, 1, *kernel, *kernel), &dev)?;
            let b = Tensor::randn(0f32, 1., *channels, &dev)?;
            let (ours, _) = time_ms(args.warmup, args.repeat, || {
                depthwise_conv2d(&x, &wt, Some(&b), kernel / 2)?;
                Ok(())
            })?;
            let reference = args.reference(&[
                "depthwise".into(),
                "--channels".into(),
                channels.to_string(),
                "--size".into(),
                h.to_string(),
                w.to_string(),
                "--kernel".into(),
                kernel.to_string(),
            ])?;
            args.report(
                &format!("depthwise {kernel}x{kernel} C={channels} {h}x{w} f32 cpu"),
                ours,
                reference,
            );
        }
    }
    Ok(())
}
