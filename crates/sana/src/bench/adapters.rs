//! `sana bench adapters`: what a LoRA adapter and PAG cost, each against the same forward without
//! them in the same run (a real transformer config, random weights, f32 on CPU):
//! - the DiT forward with a rank-r adapter on every attention projection (every row, and half the
//!   rows as in a batch mixing requests), as a ratio of the plain forward (target ≤ 1.10);
//! - resident memory before and after loading the adapter, against its size and the model's (the
//!   base weights must not be copied);
//! - a PAG step (three rows per image: negative, positive, perturbed) against a CFG step (two),
//!   target ≤ 1.55.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use sana_model::transformer::{
    CaptionContext, LoraRows, Perturbed, RowOptions, SanaTransformer2DModel, SanaTransformerConfig,
};
use sana_model::weights::{random_var_builder, read_config};

use super::{parse_hw, BenchArgs};

#[derive(Debug, Args)]
pub struct AdapterBench {
    /// A transformer config.json.
    #[arg(
        long,
        default_value = "tests/fixtures/real-configs/transformer/Sana_600M_512px.json"
    )]
    config: PathBuf,
    /// Latent grid, HxW (16x16 is 512²).
    #[arg(long, default_value = "16x16")]
    latent: String,
    /// Images; each takes two rows with CFG, three with PAG.
    #[arg(long, default_value_t = 1)]
    images: usize,
    /// Text tokens per row.
    #[arg(long, default_value_t = 300)]
    text_len: usize,
    /// The adapter's rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// PAG's block (NVlabs' choice: 14 for Sana-0.6B, 8 for 1.6B).
    #[arg(long, default_value_t = 14)]
    pag_layer: usize,
    /// Internal: only the memory measurement (the bench runs it in a child process whose
    /// allocator returns freed pages at once).
    #[arg(long, hide = true)]
    memory_only: bool,
}

/// Resident memory of this process (`VmRSS`), bytes.
fn resident_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

/// A random rank-`rank` adapter on every attention projection (attn1 and attn2: to_q, to_k, to_v,
/// to_out.0) of every block, written as diffusers' `save_lora_weights` does.
fn write_adapter(cfg: &SanaTransformerConfig, rank: usize, dev: &Device) -> Result<PathBuf> {
    let d = cfg.inner_dim();
    let (heads, head_dim) = cfg.cross();
    let inner = heads * head_dim;
    let mut tensors = HashMap::new();
    for b in 0..cfg.num_layers {
        for (part, i, o) in [
            ("attn1.to_q", d, d),
            ("attn1.to_k", d, d),
            ("attn1.to_v", d, d),
            ("attn1.to_out.0", d, d),
            ("attn2.to_q", d, inner),
            ("attn2.to_k", d, inner),
            ("attn2.to_v", d, inner),
            ("attn2.to_out.0", inner, d),
        ] {
            let key = format!("transformer.transformer_blocks.{b}.{part}");
            let scale = 1.0 / (i as f64).sqrt();
            tensors.insert(
                format!("{key}.lora_A.weight"),
                (Tensor::randn(0f32, 1., (rank, i), dev)? * scale)?,
            );
            tensors.insert(
                format!("{key}.lora_B.weight"),
                (Tensor::randn(0f32, 1., (o, rank), dev)? * 0.01)?,
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("sana-bench-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pytorch_lora_weights.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(path)
}

impl AdapterBench {
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
        let dev = Device::Cpu;
        let cfg: SanaTransformerConfig = read_config(&self.config)?;
        let name = self
            .config
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        let (h, w) = parse_hw(&self.latent)?;
        let model = SanaTransformer2DModel::new(&cfg, random_var_builder(0.02, DType::F32, &dev))?;
        let file = write_adapter(&cfg, self.rank, &dev)?;
        // 1. Memory: what loading the adapter adds, measured in a child process. This binary keeps
        //    freed pages (see `keep_freed_pages` in main.rs), so a load here could reuse pages
        //    freed before it and show no growth; the child returns freed pages to the OS at once
        //    (MIMALLOC_PURGE_DELAY=0), so its resident memory is what is live.
        if !self.memory_only {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(std::env::args_os().skip(1))
                .arg("--memory-only")
                .env("MIMALLOC_PURGE_DELAY", "0")
                .env("MIMALLOC_ARENA_PURGE_MULT", "0")
                .output()
                .context("running the memory measurement")?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                anyhow::bail!(
                    "the memory measurement failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let before = resident_bytes()?;
        let adapter = Arc::new(model.load_lora("bench", &file)?);
        let after = resident_bytes()?;
        let grew = after.saturating_sub(before) as f64;
        let model_part = match model_params(&self.config, &name) {
            Some(p) => format!(
                ", {:.4}× the model's {:.0} MiB of f32 weights",
                grew / (p * 4) as f64,
                (p * 4) as f64 / 1048576.0
            ),
            None => String::new(),
        };
        if self.memory_only {
            println!(
                "adapters {name}: LoRA rank {} on {} modules, {:.1} MiB: loading it grew resident \
                 memory by {:.1} MiB ({:.2}× the adapter{model_part})",
                self.rank,
                adapter.module_count(),
                adapter.size_bytes() as f64 / 1048576.0,
                grew / 1048576.0,
                grew / adapter.size_bytes() as f64,
            );
            let _ = std::fs::remove_file(&file);
            return Ok(());
        }
        // 2. The forward: CFG rows (2 per image) without, with the adapter on every row, and on
        //    half of them (a batch mixing requests).
        let b = self.images;
        let x = Tensor::randn(0f32, 1., (b, cfg.in_channels, h, w), &dev)?;
        let y = Tensor::randn(0f32, 1., (1, self.text_len, cfg.caption_channels), &dev)?;
        let t_value = if cfg.guidance_embeds { 0.5 } else { 500.0 };
        let forward = |rows: usize, opts: RowOptions| -> Result<(CaptionContext, Tensor, Tensor)> {
            let text = y.repeat((rows, 1, 1))?;
            let caption = model.prepare_caption_rows(&text, &vec![self.text_len; rows], opts)?;
            let x_in = x.repeat((rows / b, 1, 1, 1))?;
            Ok((caption, x_in, Tensor::full(t_value, rows, &dev)?))
        };
        let lora = |scales: Vec<f32>| -> Result<LoraRows> {
            Ok(LoraRows::new(
                vec![(adapter.clone(), scales)],
                &cfg,
                DType::F32,
                &dev,
            )?)
        };
        let rows = 2 * b;
        let mixed_scales: Vec<f32> = (0..rows).map(|r| (r % 2) as f32).collect();
        let variants: Vec<(String, (CaptionContext, Tensor, Tensor))> = vec![
            ("CFG".into(), forward(rows, RowOptions::default())?),
            (
                format!("CFG, LoRA rank {} on every row", self.rank),
                forward(
                    rows,
                    RowOptions {
                        lora: lora(vec![1.0; rows])?,
                        perturbed: None,
                    },
                )?,
            ),
            (
                format!("CFG, LoRA rank {} on half the rows", self.rank),
                forward(
                    rows,
                    RowOptions {
                        lora: lora(mixed_scales)?,
                        perturbed: None,
                    },
                )?,
            ),
            // PAG: one more row per image, its self-attention the identity in one block.
            (
                format!("CFG + PAG on block {}", self.pag_layer),
                forward(
                    3 * b,
                    RowOptions {
                        lora: LoraRows::default(),
                        perturbed: Some(Perturbed {
                            first_row: 2 * b,
                            blocks: vec![self.pag_layer],
                            copy_of: Some(b),
                        }),
                    },
                )?,
            ),
            // PAG on block 0 (diffusers' default): the perturbed rows are computed throughout.
            (
                "CFG + PAG on block 0".into(),
                forward(
                    3 * b,
                    RowOptions {
                        lora: LoraRows::default(),
                        perturbed: Some(Perturbed {
                            first_row: 2 * b,
                            blocks: vec![0],
                            copy_of: Some(b),
                        }),
                    },
                )?,
            ),
        ];
        // Rounds that run every variant once, so that a slow spell of the machine hits them all;
        // each variant's median over the rounds.
        let run = |(caption, x_in, t): &(CaptionContext, Tensor, Tensor)| -> Result<f64> {
            let start = std::time::Instant::now();
            model.forward_with_caption(x_in, t, None, caption)?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        for _ in 0..args.warmup {
            for (_, v) in &variants {
                run(v)?;
            }
        }
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..args.repeat.max(1) {
            for (k, (_, v)) in variants.iter().enumerate() {
                times[k].push(run(v)?);
            }
        }
        let median: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
            .collect();
        for ((label, (_, x_in, _)), ms) in variants.iter().zip(&median) {
            println!(
                "adapters {name}: DiT forward, {label}: latent {h}x{w}, {} rows, text {}: median {ms:.1} ms of {} rounds",
                x_in.dim(0)?,
                self.text_len,
                args.repeat.max(1)
            );
        }
        let (plain, with, mixed, pag, pag0) =
            (median[0], median[1], median[2], median[3], median[4]);
        let verdict = |ratio: f64, target: f64| if ratio <= target { "meets" } else { "MISSES" };
        println!(
            "adapters {name}: LoRA on every row / plain = {:.3} ({} the ≤ 1.10 target); on half the rows / plain = {:.3}",
            with / plain,
            verdict(with / plain, 1.10),
            mixed / plain
        );
        for (block, ms) in [(self.pag_layer, pag), (0, pag0)] {
            println!(
                "adapters {name}: PAG on block {block} + CFG / CFG per step = {:.3} ({} the ≤ 1.55 target)",
                ms / plain,
                verdict(ms / plain, 1.55)
            );
        }
        let _ = std::fs::remove_file(&file);
        Ok(())
    }
}

/// The parameter count of config `name` from `param_counts.json` beside it (the released
/// configs' counts, checked against diffusers by the fixture generator).
fn model_params(config: &std::path::Path, name: &str) -> Option<u64> {
    let counts: HashMap<String, u64> =
        read_config(&config.parent()?.join("param_counts.json")).ok()?;
    counts.get(name).copied()
}
