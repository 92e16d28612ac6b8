//! `sana bench text-encoder`: Sana prompt encoding of a real Gemma-2 config beside diffusers'
//! `encode_prompt`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use sana_model::weights::{random_var_builder, read_config};

use super::{time_ms, BenchArgs};

#[derive(Debug, Args)]
pub struct TextEncoderBench {
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
    pub fn run(&self, args: &BenchArgs) -> Result<()> {
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
