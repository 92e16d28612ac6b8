//! Engine configuration and the batch limits derived from it and the model.

use std::time::Duration;

use sana_backend::{BatchKey, ModelInfo};

use crate::error::StartError;

/// How the engine runs. The server's CLI fills this (every field has a flag and env variable);
/// [`Default`] gives values fit for one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// One worker thread per entry, each owning a backend built for that device
    /// (`cuda:0`, `cuda:1`, `cpu`, …).
    pub devices: Vec<String>,
    /// Requests admitted at once (queued or running); past it `submit` answers `Overloaded`.
    pub max_concurrent_requests: usize,
    /// Images per batch; the model's [`ModelInfo::max_batch_images`] caps it further.
    pub max_batch_images: usize,
    /// Latent tokens per batch (`(h/32)·(w/32)` per image, doubled with CFG). `None`: no limit
    /// beyond the image count (`max_batch_images` images at the largest size with CFG).
    pub max_batch_latent_tokens: Option<usize>,
    /// Largest `n` (images per request). Must fit one batch.
    pub max_n: u32,
    /// Largest step count a request may ask for.
    pub max_steps: u32,
    /// Longest prompt (and negative prompt), in characters.
    pub max_prompt_chars: usize,
    /// Most preview images a request may ask for (OpenAI `partial_images`: 0–3).
    pub max_previews: u32,
    /// Time from admission to the last image after which a request fails with `Timeout`.
    pub request_timeout: Duration,
    /// How long a busy worker may show no progress (no finished step, no batch start) before the
    /// watchdog answers its requests `WorkerHung` and replaces it. It must exceed the slowest
    /// step, text encoding or decode of the largest batch. `None`: no watchdog.
    pub watchdog_timeout: Option<Duration>,
    /// Steps of the warm-up generation each worker runs at start (and after a rebuild) at the
    /// largest batch; `0` skips the warm-up.
    pub warmup_steps: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            devices: vec!["cuda:0".to_owned()],
            max_concurrent_requests: 512,
            max_batch_images: 8,
            max_batch_latent_tokens: None,
            max_n: 4,
            max_steps: 100,
            max_prompt_chars: 8192,
            max_previews: 3,
            request_timeout: Duration::from_secs(300),
            watchdog_timeout: Some(Duration::from_secs(300)),
            warmup_steps: 2,
        }
    }
}

/// The budget of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most images in one batch.
    pub max_images: usize,
    /// Most latent tokens in one batch.
    pub max_latent_tokens: usize,
}

impl BatchLimits {
    /// Derives the limits from the configuration and the model, checking they are consistent.
    pub fn new(config: &EngineConfig, info: &ModelInfo) -> Result<Self, StartError> {
        let invalid = |msg: String| Err(StartError::InvalidConfig(msg));
        if config.devices.is_empty() {
            return invalid("no device given; pass at least one, e.g. `--devices cuda:0`".into());
        }
        if config.max_concurrent_requests == 0 {
            return invalid("--max-concurrent-requests must be at least 1".into());
        }
        if info.max_batch_images == 0 || config.max_batch_images == 0 {
            return invalid(format!(
                "--max-batch-images is {} and the model allows {}; both must be at least 1",
                config.max_batch_images, info.max_batch_images
            ));
        }
        let max_images = config.max_batch_images.min(info.max_batch_images);
        if config.max_n == 0 || config.max_n as usize > max_images {
            return invalid(format!(
                "--max-n is {} but a batch holds at most {max_images} images (--max-batch-images {}, \
                 model limit {}); a request's images are never split, so lower --max-n or raise \
                 --max-batch-images",
                config.max_n, config.max_batch_images, info.max_batch_images
            ));
        }
        if config.max_steps == 0 {
            return invalid("--max-steps must be at least 1".into());
        }
        let largest = BatchKey {
            width: info.max_width,
            height: info.max_height,
            steps: 1,
            sampler: info.default_sampler,
            cfg: true,
            strength_permille: None,
            pag_layers: None,
            controlnet: None,
        }
        .latent_tokens_per_image();
        let max_latent_tokens = match config.max_batch_latent_tokens {
            Some(tokens) if tokens < largest => {
                return invalid(format!(
                    "--max-batch-latent-tokens is {tokens} but one {}x{} image with guidance needs \
                     {largest}; raise it to at least {largest}",
                    info.max_width, info.max_height
                ))
            }
            Some(tokens) => tokens,
            None => largest * max_images,
        };
        Ok(Self {
            max_images,
            max_latent_tokens,
        })
    }
}
