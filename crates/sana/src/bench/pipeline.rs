//! `sana bench pipeline` (real configs, random weights) and `sana bench model` (a model folder):
//! prompt to image with the time of each stage, beside diffusers' `SanaPipeline`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use sana_model::transformer::{SanaTransformer2DModel, SanaTransformerConfig};
use sana_model::weights::{random_var_builder, read_config};

use super::{time_ms, BenchArgs};

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
    /// Image sizes (square), comma-separated: one row each (with each batch).
    #[arg(long = "size", value_delimiter = ',', default_value = "512")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Steps of each untimed warm-up run (default: --steps).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Images per run (the same prompt, one batch), comma-separated: one row each.
    #[arg(long = "batch", value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// cpu or cuda[:N] (the reference runs on the same device).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (the transformer; Gemma and the DC-AE stay bf16 under f16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The reference's dtypes, comma-separated (default: --dtype): each runs in its own process,
    /// and its time and peak resident memory are printed beside ours (e.g. ours in bf16 against
    /// diffusers in f32 and in bf16).
    #[arg(long = "reference-dtype", value_delimiter = ',')]
    reference_dtypes: Vec<String>,
    #[arg(long, default_value_t = 4.5)]
    guidance_scale: f32,
    #[arg(
        long,
        default_value = "a cyberpunk cat with a neon sign that says sana on a rainy night street"
    )]
    prompt: String,
    /// Also append one JSON object per row (ours; the reference's too when it ran) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Seconds since the Unix epoch: rows carry their start and end so that a GPU-memory sampler
/// running beside the benchmark (scripts/gpu-check.sh) can attribute its samples to rows.
fn epoch_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl PipelineBench {
    /// The rows, smallest work first: each size with each batch.
    fn rows(&self) -> Vec<(usize, usize)> {
        let mut rows: Vec<(usize, usize)> = self
            .sizes
            .iter()
            .flat_map(|&s| self.batches.iter().map(move |&b| (s, b.max(1))))
            .collect();
        rows.sort_by_key(|&(s, b)| (s * s * b, s));
        rows
    }

    /// Times the reference first (it needs ~14 GB on CPU and exits, giving its memory back),
    /// then ours, row by row.
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let warmup_steps = self.warmup_steps.unwrap_or(self.steps);
        let reference_dtypes = if self.reference_dtypes.is_empty() {
            vec![self.dtype.clone()]
        } else {
            self.reference_dtypes.clone()
        };
        let mut reference = Vec::new();
        for dtype in &reference_dtypes {
            reference.extend(self.reference_rows(args, dtype, &list, warmup_steps)?);
        }
        self.run_ours(args, &reference, warmup_steps)
    }

    /// The reference's rows in `dtype` (one process).
    fn reference_rows(
        &self,
        args: &BenchArgs,
        dtype: &str,
        list: &dyn Fn(&[usize]) -> String,
        warmup_steps: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let mut rows = args.reference_json(&[
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
            list(&self.sizes),
            "--steps".into(),
            self.steps.to_string(),
            "--warmup-steps".into(),
            warmup_steps.to_string(),
            "--guidance-scale".into(),
            self.guidance_scale.to_string(),
            "--prompt".into(),
            self.prompt.clone(),
            "--batch".into(),
            list(&self.batches),
            "--device".into(),
            self.device.clone(),
            "--dtype".into(),
            dtype.to_string(),
        ])?;
        for r in &mut rows {
            r["dtype"] = dtype.into();
        }
        Ok(rows)
    }

    /// Builds ours and times each row, printed beside the reference rows of the same size and
    /// batch.
    fn run_ours(
        &self,
        args: &BenchArgs,
        reference: &[serde_json::Value],
        warmup_steps: usize,
    ) -> Result<()> {
        use sana_model::autoencoder::{AutoencoderDC, AutoencoderDCConfig};
        use sana_model::pipeline::{GenerateRequest, LoadOptions, PipelineKind, SanaPipeline};
        use sana_model::scheduler::SchedulerConfig;
        use sana_model::text_encoder::{
            Gemma2Config, Gemma2Model, GemmaTokenizer, SanaTextEncoder,
        };

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
        dev.synchronize()?;
        println!(
            "pipeline: built with random {} weights on {} in {:.1} s",
            self.dtype,
            self.device,
            start.elapsed().as_secs_f64()
        );
        if dev.is_cpu() && self.dtype == "bf16" {
            println!("CPU bf16 matmuls: {}", sana_model::ops::cpu_bf16_status());
        }
        let name = self
            .transformer_config
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut json = match &self.json {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--json {}", path.display()))?,
            ),
            None => None,
        };
        for (size, batch) in self.rows() {
            let mut req = GenerateRequest::new(&self.prompt);
            req.items[0].guidance_scale = self.guidance_scale;
            req.items = vec![req.items[0].clone(); batch];
            (req.width, req.height, req.steps) = (size, size, warmup_steps);
            // Each size as asked, whatever the config's native one (diffusers is called alike).
            req.use_resolution_binning = false;
            for _ in 0..args.warmup {
                pipe.text_encoder().clear_caches();
                pipe.generate(&req, &mut |_| {
                    sana_model::pipeline::sampling::Flow::Continue
                })?;
            }
            req.steps = self.steps;
            let t_start = epoch_s();
            let (total, _, times) = time_generate(&pipe, &req, 0, args.repeat)?;
            let t_end = epoch_s();
            let same_row = |r: &&serde_json::Value| {
                r["size"].as_u64() == Some(size as u64) && r["batch"].as_u64() == Some(batch as u64)
            };
            let rows_here: Vec<&serde_json::Value> = reference.iter().filter(same_row).collect();
            // The stage table compares like with like: the reference in our dtype, else the first.
            let reference = rows_here
                .iter()
                .find(|r| r["dtype"].as_str() == Some(self.dtype.as_str()))
                .or(rows_here.first())
                .copied();
            println!(
                "pipeline {name} {size}x{size}, {} steps, guidance {}, batch {batch}, {} {}: \
                 {:.2} images/s (last run's stages):",
                self.steps,
                self.guidance_scale,
                self.dtype,
                self.device,
                batch as f64 * 1e3 / total
            );
            for r in &rows_here {
                if let Some(ms) = r["ms_mean"].as_f64() {
                    println!(
                        "  diffusers {}: {:.2} images/s (ours / diffusers time: {:.2})",
                        r["dtype"].as_str().unwrap_or("?"),
                        batch as f64 * 1e3 / ms,
                        total / ms
                    );
                }
            }
            if reference.is_some_and(|r| r["dtype"].as_str() != Some(self.dtype.as_str())) {
                println!("  (stages below: against diffusers in another dtype)");
            }
            print_stages(&times, total, reference);
            // Peak resident memory of this process so far (the reference ran in its own).
            let peak_mib = peak_resident_mib();
            if let Some(peak) = peak_mib {
                print!("  peak resident memory: ours {} {peak:.0} MiB", self.dtype);
                for r in &rows_here {
                    if let Some(theirs) = r["peak_rss_mb"].as_f64() {
                        print!(
                            " | diffusers {} {theirs:.0} MiB (ours / theirs {:.2})",
                            r["dtype"].as_str().unwrap_or("?"),
                            peak / theirs
                        );
                    }
                }
                println!();
            }
            if let Some(file) = json.as_mut() {
                use std::io::Write as _;
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                let steps = times.steps.len().max(1) as f64;
                let row = serde_json::json!({
                    "impl": "ours", "model": name, "size": size, "batch": batch,
                    "steps": self.steps, "device": self.device, "dtype": self.dtype,
                    "encode_ms": ms(times.encode), "caption_ms": ms(times.caption),
                    "step_ms_mean": times.steps.iter().map(|d| ms(*d)).sum::<f64>() / steps,
                    "decode_ms": ms(times.decode), "ms_mean": total,
                    "images_per_s": batch as f64 * 1e3 / total,
                    "peak_rss_mb": peak_mib,
                    "t_start": t_start, "t_end": t_end,
                });
                writeln!(file, "{row}")?;
                for r in &rows_here {
                    writeln!(file, "{r}")?;
                }
            }
        }
        Ok(())
    }
}

/// The process's peak resident set (`VmHWM`) in MiB; `None` off Linux.
pub(super) fn peak_resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `req` through the pipeline `warmup` times untimed, then `repeat` times: mean and fastest
/// milliseconds, and the stages of the last run. Every run starts with the text encoder's caches
/// empty (no cached prompt, no cached instruction prefix), so it does the work diffusers does.
pub(super) fn time_generate(
    pipe: &sana_model::pipeline::SanaPipeline,
    req: &sana_model::pipeline::GenerateRequest,
    warmup: usize,
    repeat: usize,
) -> Result<(f64, f64, sana_model::pipeline::StageTimes)> {
    let mut times = sana_model::pipeline::StageTimes::default();
    let (mean, fastest) = time_ms(warmup, repeat, || {
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
pub(super) fn print_stages(
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
            "image encode (DC-AE encoder)",
            Some("image_encode_ms"),
            ms(times.image_encode),
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
        if key == Some("image_encode_ms") && times.image_encode.is_zero() {
            continue;
        }
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
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
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
        let (total, fastest, times) = time_generate(&pipe, &req, args.warmup, args.repeat)?;
        println!(
            "model {id} {size}x{size}, {steps} steps, guidance {}, batch {}, f32 cpu; {} runs, \
             fastest {fastest:.1} ms, {:.1} ms/image (last run's stages):",
            d.guidance_scale,
            self.batch,
            args.repeat.max(1),
            total / self.batch.max(1) as f64
        );
        print_stages(&times, total, reference.first());
        Ok(())
    }
}
