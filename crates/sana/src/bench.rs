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
    /// One SanaTransformer2DModel forward of a real config (random weights), f32 on CPU.
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
    /// Runs the reference script and returns its mean milliseconds, or `None` without a Python.
    fn reference_json(&self, part_args: &[String]) -> Result<Option<serde_json::Value>> {
        let Some(python) = &self.reference_python else {
            return Ok(None);
        };
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let out = Command::new(python)
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
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("reference printed {line:?}"))?;
        Ok(Some(v))
    }

    fn reference(&self, part_args: &[String]) -> Result<Option<(f64, String)>> {
        let Some(v) = self.reference_json(part_args)? else {
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
        } => {
            let cfg: SanaTransformerConfig = read_config(config)?;
            let model =
                SanaTransformer2DModel::new(&cfg, random_var_builder(0.02, DType::F32, &dev))?;
            let name = config.file_stem().unwrap_or_default().to_string_lossy();
            for hw in latent {
                let (h, w) = parse_hw(hw)?;
                let x = Tensor::randn(0f32, 1., (*batch, cfg.in_channels, h, w), &dev)?;
                let y = Tensor::randn(0f32, 1., (*batch, *text_len, cfg.caption_channels), &dev)?;
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
                ])?;
                args.report(
                    &format!(
                        "transformer {name} latent {h}x{w} batch {batch} text {text_len} f32 cpu"
                    ),
                    ours,
                    reference,
                );
            }
        }
        Part::TextEncoder(bench) => bench.run(&args)?,
        Part::Pipeline(bench) => bench.run(&args)?,
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

#[derive(Debug, Args)]
struct TextEncoderBench {
    /// A Gemma-2 config.json.
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/text_encoder/gemma-2-2b-it.json"
    )]
    config: PathBuf,
    /// A folder with tokenizer.json (the real Gemma tokenizer cannot be downloaded here; the
    /// fixture's one tokenizes the instruction's words as whole tokens, like Gemma's).
    #[arg(long, default_value = "tests/fixtures/text_encoder/pipeline/tokenizer")]
    tokenizer: PathBuf,
    /// The prompt (12 words).
    #[arg(
        long,
        default_value = "a small fluffy white cat sleeping peacefully on a warm sunny windowsill"
    )]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 300)]
    max_sequence_length: usize,
}

impl TextEncoderBench {
    /// Times ours cold (instruction prefix computed in the call) and warm (prefix cached, prompt
    /// not), then frees the model (~10.5 GB) before the reference builds its own.
    fn run(&self, args: &BenchArgs) -> Result<()> {
        use sana_model::text_encoder::{
            EncodeOptions, Gemma2Config, Gemma2Model, GemmaTokenizer, SanaTextEncoder,
            DEFAULT_COMPLEX_HUMAN_INSTRUCTION,
        };
        let dev = Device::Cpu;
        let cfg: Gemma2Config = read_config(&self.config)?;
        let start = Instant::now();
        let model = Gemma2Model::new(&cfg, random_var_builder(0.02, DType::F32, &dev))?;
        println!(
            "text-encoder: built {} ({} parameters, random f32) in {:.1} s",
            self.config.display(),
            cfg.parameter_count(),
            start.elapsed().as_secs_f64()
        );
        let tokenizer = GemmaTokenizer::from_file(&self.tokenizer.join("tokenizer.json"))?;
        let enc = SanaTextEncoder::new(model, tokenizer).with_cache_capacity(0);
        let (ids, mask) = enc.token_ids(&self.prompt, true, self.max_sequence_length)?;
        let real = mask.iter().filter(|&&m| m == 1).count();
        let n_chi = enc
            .tokenizer()
            .encode(&DEFAULT_COMPLEX_HUMAN_INSTRUCTION.join("\n"))?
            .len();
        println!(
            "text-encoder: prompt {:?}: diffusers runs Gemma over {} + {} tokens; ours over the \
             {} real ones, {} of them (<bos> + instruction) cached after the first call",
            self.prompt,
            ids.len(),
            self.max_sequence_length,
            real,
            n_chi - 1
        );
        let opts = EncodeOptions {
            max_sequence_length: self.max_sequence_length,
            ..EncodeOptions::default()
        };
        let encode = || -> Result<()> {
            enc.encode_prompt(&[&self.prompt], &[&self.negative_prompt], &opts)?;
            Ok(())
        };
        let (cold, _) = time_ms(args.warmup, args.repeat, || {
            enc.clear_caches();
            encode()
        })?;
        let (warm, _) = time_ms(args.warmup, args.repeat, encode)?;
        enc.set_cache_capacity(SanaTextEncoder::DEFAULT_CACHE_CAPACITY);
        let (cached, _) = time_ms(1, args.repeat, encode)?;
        drop(enc);
        let reference = args.reference(&[
            "text-encoder".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--tokenizer".into(),
            self.tokenizer.display().to_string(),
            "--prompt".into(),
            self.prompt.clone(),
            "--negative-prompt".into(),
            self.negative_prompt.clone(),
            "--max-sequence-length".into(),
            self.max_sequence_length.to_string(),
        ])?;
        let name = self
            .config
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        let what = format!("text-encoder {name} prompt+instruction and negative, f32 cpu");
        // Only the uncached call does diffusers' work (diffusers caches nothing); the cached
        // calls are compared with our own uncached one, never with diffusers.
        args.report(
            &format!("{what}, nothing cached (each call computes the instruction too)"),
            cold,
            reference,
        );
        for (label, t) in [
            ("instruction prefix cached (a server's steady state)", warm),
            ("whole prompt cached (a repeated prompt)", cached),
        ] {
            println!(
                "{what}, {label}: ours {t:.1} ms | ours uncached {cold:.1} ms | ratio {:.2} \
                 (diffusers has no cache: no ratio against it)",
                t / cold
            );
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct PipelineBench {
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/transformer/Sana_600M_512px.json"
    )]
    transformer_config: PathBuf,
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
    /// A tokenizer folder (the real Gemma one cannot be downloaded here; the fixture's gives
    /// realistic token counts for English prompts).
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
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Images per run (the same prompt, one batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// cpu or cuda[:N] (the reference runs on the same device).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (the transformer; Gemma and the DC-AE stay bf16 under f16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 4.5)]
    guidance_scale: f32,
    #[arg(
        long,
        default_value = "a cyberpunk cat with a neon sign that says sana on a rainy night street"
    )]
    prompt: String,
}

impl PipelineBench {
    /// Times the reference first (it needs ~14 GB and exits, giving its memory back), then ours.
    fn run(&self, args: &BenchArgs) -> Result<()> {
        use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig};
        use sana_model::pipeline::{GenerateRequest, LoadOptions, PipelineKind, SanaPipeline};
        use sana_model::scheduler::SchedulerConfig;
        use sana_model::text_encoder::{
            Gemma2Config, Gemma2Model, GemmaTokenizer, SanaTextEncoder,
        };

        let reference = args.reference_json(&[
            "pipeline".into(),
            "--transformer-config".into(),
            self.transformer_config.display().to_string(),
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
            "--guidance-scale".into(),
            self.guidance_scale.to_string(),
            "--prompt".into(),
            self.prompt.clone(),
            "--batch".into(),
            self.batch.to_string(),
            "--device".into(),
            self.device.clone(),
            "--dtype".into(),
            self.dtype.clone(),
        ])?;

        let dev = crate::generate::parse_device(&self.device)?;
        let precision = crate::model::parse_precision(&self.dtype)?
            .context("--dtype: give f32, bf16 or f16")?;
        let start = Instant::now();
        let random = |dtype: DType| random_var_builder(0.02, dtype, &dev);
        let tcfg: SanaTransformerConfig = read_config(&self.transformer_config)?;
        let vcfg: AutoencoderDCConfig = read_config(&self.vae_config)?;
        let gcfg: Gemma2Config = read_config(&self.text_encoder_config)?;
        let text = SanaTextEncoder::new(
            Gemma2Model::new(&gcfg, random(precision.text_encoder))?,
            GemmaTokenizer::from_file(&self.tokenizer.join("tokenizer.json"))?,
        );
        let pipe = SanaPipeline::from_parts(
            PipelineKind::Sana,
            text,
            SanaTransformer2DModel::new(&tcfg, random(precision.transformer))?,
            AutoencoderDC::new(&vcfg, random(precision.vae))?,
            SchedulerConfig::from_file(&self.scheduler_config)?,
            &LoadOptions::new(dev.clone()),
        );
        println!(
            "pipeline: built with random {} weights on {} in {:.1} s",
            self.dtype,
            self.device,
            start.elapsed().as_secs_f64()
        );
        let mut req = GenerateRequest::new(&self.prompt);
        req.items[0].guidance_scale = self.guidance_scale;
        req.items = vec![req.items[0].clone(); self.batch.max(1)];
        (req.width, req.height, req.steps) = (self.size, self.size, self.steps);
        let (total, _, times) = time_generate(&pipe, &req, args)?;
        let name = self
            .transformer_config
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        println!(
            "pipeline {name} {0}x{0}, {1} steps, guidance {2}, batch {3}, {4} {5}: {6:.2} images/s \
             (last run's stages):",
            self.size,
            self.steps,
            self.guidance_scale,
            self.batch,
            self.dtype,
            self.device,
            self.batch.max(1) as f64 * 1e3 / total
        );
        if let Some(r) = reference.as_ref().and_then(|v| v["ms_mean"].as_f64()) {
            println!(
                "  diffusers: {:.2} images/s",
                self.batch.max(1) as f64 * 1e3 / r
            );
        }
        print_stages(&times, total, reference.as_ref());
        Ok(())
    }
}

/// `req` through the pipeline `warmup` times untimed, then `repeat` times: mean and fastest
/// milliseconds, and the stages of the last run. Every run starts with the text encoder's caches
/// empty (no cached prompt, no cached instruction prefix), so it does the work diffusers does.
fn time_generate(
    pipe: &sana_model::pipeline::SanaPipeline,
    req: &sana_model::pipeline::GenerateRequest,
    args: &BenchArgs,
) -> Result<(f64, f64, sana_model::pipeline::StageTimes)> {
    let mut times = sana_model::pipeline::StageTimes::default();
    let (mean, fastest) = time_ms(args.warmup, args.repeat, || {
        pipe.text_encoder().clear_caches();
        pipe.generate_timed(
            req,
            &mut |_| sana_model::pipeline::sampling::Flow::Continue,
            Some(&mut times),
        )?;
        Ok(())
    })?;
    Ok((mean, fastest, times))
}

/// Ours beside the reference's stage times (keys of `tools/bench_reference.py`'s JSON), each row
/// the same work on both sides: our caption context (projection and cross-attention keys/values,
/// once per generation) is on no row of its own against diffusers, which computes it inside every
/// step, so the step row carries it amortised over the steps.
fn print_stages(
    times: &sana_model::pipeline::StageTimes,
    total_ms: f64,
    reference: Option<&serde_json::Value>,
) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let n = times.steps.len().max(1) as f64;
    let step_mean = times.steps.iter().map(|d| ms(*d)).sum::<f64>() / n;
    let caption = ms(times.caption);
    let rows = [
        (
            "encode (Gemma: prompt, negative)",
            Some("encode_ms"),
            ms(times.encode),
        ),
        (
            "step + caption work / steps",
            Some("step_ms_mean"),
            step_mean + caption / n,
        ),
        (
            "decode (DC-AE + postprocess)",
            Some("decode_ms"),
            ms(times.decode),
        ),
        ("end to end", Some("ms_mean"), total_ms),
        ("  of which: caption work, once", None, caption),
        ("  of which: step alone (mean)", None, step_mean),
    ];
    for (stage, key, t) in rows {
        match key.and_then(|k| reference.and_then(|v| v[k].as_f64())) {
            Some(r) => println!(
                "  {stage:34} ours {t:10.1} ms | diffusers {r:10.1} ms | ratio {:.2}",
                t / r
            ),
            None => println!("  {stage:34} ours {t:10.1} ms"),
        }
    }
    let steps: Vec<String> = times
        .steps
        .iter()
        .map(|d| format!("{:.1}", ms(*d)))
        .collect();
    println!("  each step (ms): {}", steps.join(" "));
}

#[derive(Debug, Args)]
pub struct ModelBench {
    /// A diffusers folder, a Hub repo id, or sana-tiny-scenes (built in).
    #[arg(long, default_value = sana_scenes::MODEL_ID)]
    model: String,
    /// Image size (square); default: the model's native size.
    #[arg(long)]
    size: Option<usize>,
    /// Default: the model's.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per run (one prompt each, one batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(
        long,
        default_value = "a large red circle on the left on a blue background"
    )]
    prompt: String,
}

impl ModelBench {
    fn run(&self, args: &BenchArgs) -> Result<()> {
        use sana_model::pipeline::GenerateRequest;

        let (resolved, id) = crate::model::ModelSpec::new(&self.model).resolve()?;
        let crate::model::Resolved::Folder(root) = &resolved else {
            bail!("bench model times diffusers folders");
        };
        let pipe = resolved.load(&Device::Cpu, "f32", None)?;
        let d = pipe.defaults();
        let native = pipe.transformer().config().sample_size * pipe.vae_scale_factor();
        let size = self.size.unwrap_or(native);
        let steps = self.steps.unwrap_or(d.steps);
        let reference = args.reference_json(&[
            "model".into(),
            "--model".into(),
            root.display().to_string(),
            "--size".into(),
            size.to_string(),
            "--steps".into(),
            steps.to_string(),
            "--guidance-scale".into(),
            d.guidance_scale.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--prompt".into(),
            self.prompt.clone(),
            "--complex-human-instruction".into(),
            d.complex_human_instruction.to_string(),
        ])?;
        let mut req = GenerateRequest::new(&self.prompt);
        req.items[0].guidance_scale = d.guidance_scale;
        req.items = vec![req.items[0].clone(); self.batch.max(1)];
        (req.width, req.height, req.steps) = (size, size, steps);
        req.complex_human_instruction = d.complex_human_instruction;
        let (total, fastest, times) = time_generate(&pipe, &req, args)?;
        println!(
            "model {id} {size}x{size}, {steps} steps, guidance {}, batch {}, f32 cpu; {} runs, \
             fastest {fastest:.1} ms, {:.1} ms/image (last run's stages):",
            d.guidance_scale,
            self.batch,
            args.repeat.max(1),
            total / self.batch.max(1) as f64
        );
        print_stages(&times, total, reference.as_ref());
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct HttpBench {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Clients sending at once (each waits for its answer before the next request).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// `size` of each request.
    #[arg(long, default_value = "64x64")]
    size: String,
    /// Images per request (`n`).
    #[arg(long, default_value_t = 1)]
    n: u32,
    #[arg(
        long,
        default_value = "a small red square at the top on a white background"
    )]
    prompt: String,
    #[arg(long, env = "SANA_API_KEY")]
    api_key: Option<String>,
}

/// How one request ended.
enum Answer {
    /// 200 with `n` decodable images of the requested size.
    Images,
    /// Another status with a well-formed OpenAI error envelope.
    Refused(u16),
    /// Anything else: transport error, bad JSON, missing or undecodable images.
    Malformed(String),
}

impl HttpBench {
    fn one(&self, agent: &ureq::Agent, k: usize, (w, h): (u32, u32)) -> Answer {
        use base64::Engine as _;
        let body = serde_json::json!({
            "prompt": self.prompt, "size": self.size, "n": self.n,
            "response_format": "b64_json", "seed": k,
        });
        let mut req = agent.post(&format!("{}/v1/images/generations", self.url));
        if let Some(key) = &self.api_key {
            req = req.set("authorization", &format!("Bearer {key}"));
        }
        let (status, text) = match req.send_json(body) {
            Ok(r) => (r.status(), r.into_string()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string()),
            Err(e) => return Answer::Malformed(format!("transport: {e}")),
        };
        let v: serde_json::Value = match text.map(|t| serde_json::from_str(&t)) {
            Ok(Ok(v)) => v,
            _ => return Answer::Malformed(format!("status {status}: body is not JSON")),
        };
        if status != 200 {
            return if v["error"]["message"].is_string() && v["error"]["type"].is_string() {
                Answer::Refused(status)
            } else {
                Answer::Malformed(format!("status {status} without an error envelope: {v}"))
            };
        }
        let Some(data) = v["data"].as_array() else {
            return Answer::Malformed(format!("200 without `data`: {v}"));
        };
        if data.len() != self.n as usize {
            return Answer::Malformed(format!("{} images for n = {}", data.len(), self.n));
        }
        for d in data {
            let decoded = d["b64_json"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|bytes| image::load_from_memory(&bytes).ok());
            match decoded {
                Some(img) if (img.width(), img.height()) == (w, h) => {}
                Some(img) => {
                    return Answer::Malformed(format!(
                        "image is {}x{}, asked {w}x{h}",
                        img.width(),
                        img.height()
                    ))
                }
                None => return Answer::Malformed("undecodable image".into()),
            }
        }
        Answer::Images
    }

    fn run(&self) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        let (w, h) = self
            .size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .with_context(|| format!("--size {:?}: expected WxH", self.size))?;
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(self.requests));
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..self.concurrency.max(1) {
                scope.spawn(|| {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(std::time::Duration::from_secs(600))
                        .build();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= self.requests {
                            break;
                        }
                        let t0 = Instant::now();
                        let answer = self.one(&agent, k, (w, h));
                        let ms = t0.elapsed().as_secs_f64() * 1e3;
                        results
                            .lock()
                            .expect("no panics while held")
                            .push((ms, answer));
                    }
                });
            }
        });
        let wall = start.elapsed().as_secs_f64();
        let results = results.into_inner().expect("no panics while held");
        let mut ok: Vec<f64> = Vec::new();
        let mut refused = std::collections::BTreeMap::<u16, usize>::new();
        let mut malformed = Vec::new();
        for (ms, answer) in &results {
            match answer {
                Answer::Images => ok.push(*ms),
                Answer::Refused(code) => *refused.entry(*code).or_default() += 1,
                Answer::Malformed(why) => malformed.push(why.clone()),
            }
        }
        ok.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            ok.get(((ok.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
        };
        println!(
            "{} requests ({} images each, {}) from {} clients in {wall:.1} s against {}",
            results.len(),
            self.n,
            self.size,
            self.concurrency,
            self.url
        );
        println!(
            "  answered with images: {} ({:.1} images/s, {:.1} requests/s)",
            ok.len(),
            (ok.len() * self.n as usize) as f64 / wall,
            ok.len() as f64 / wall
        );
        if let (Some(p50), Some(p90), Some(p99), Some(max)) =
            (pct(0.5), pct(0.9), pct(0.99), ok.last())
        {
            println!("  latency ms: p50 {p50:.0}, p90 {p90:.0}, p99 {p99:.0}, max {max:.0}");
        }
        println!("  refused with an error envelope: {refused:?}");
        println!("  malformed or lost: {}", malformed.len());
        for why in malformed.iter().take(5) {
            println!("    {why}");
        }
        if results.len() != self.requests || !malformed.is_empty() {
            bail!(
                "{} of {} requests did not get exactly one well-formed answer",
                self.requests - results.len() + malformed.len(),
                self.requests
            );
        }
        Ok(())
    }
}
