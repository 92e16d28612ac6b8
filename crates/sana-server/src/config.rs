//! `sana serve` configuration: one clap struct ([`ServeArgs`], every flag also an environment
//! variable) validated at start-up into one [`ServerConfig`]. API keys never show in `Debug`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use sana_engine::EngineConfig;
use sha2::{Digest, Sha256};

/// Flags of `sana serve`. Each flag is also read from the environment variable shown in `--help`
/// (`SANA_<FLAG>`), so `docker run --env-file` configures a server without a command line.
///
/// The `sana` binary embeds this as its `serve` subcommand; [`ServerConfig::try_from`] checks it.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(
    name = "sana serve",
    about = "Serve Sana over an OpenAI-compatible HTTP API"
)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SANA_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "SANA_PORT", default_value_t = 8080)]
    pub port: u16,

    /// The model to load: a diffusers-format checkpoint directory, a Hugging Face model id, an
    /// NVlabs `.pth` checkpoint (with `--model-config`), or
    /// `sana-tiny-scenes`, the small demo model built into the binary (the default). Read by the
    /// binary that builds the backend; the server reports the backend's own model id.
    #[arg(long, env = "SANA_MODEL", default_value = "sana-tiny-scenes")]
    pub model: String,

    /// The training YAML of an NVlabs `.pth` `--model`.
    #[arg(long, env = "SANA_MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,

    /// With a `.pth` `--model`: the Gemma folder or repo id (default: the YAML's text encoder,
    /// `Efficient-Large-Model/gemma-2-2b-it`).
    #[arg(long, env = "SANA_TEXT_ENCODER")]
    pub text_encoder: Option<String>,

    /// With a `.pth` `--model`: the DC-AE folder or repo id (default: the YAML's
    /// `vae_pretrained`, diffusers format).
    #[arg(long, env = "SANA_VAE")]
    pub vae: Option<String>,

    /// With a `.pth` `--model`: prepend diffusers' default complex human instruction instead of
    /// the YAML's `text_encoder.chi_prompt` (NVlabs' inference uses the YAML's, or none without
    /// one; the two texts differ in quoting).
    #[arg(long, env = "SANA_DIFFUSERS_INSTRUCTION")]
    pub diffusers_instruction: bool,

    /// Weights dtype: `auto` (on CPU bf16 when its AMX tiles are reached through oneDNN, else f32;
    /// on CUDA bf16, or f16 for fp16-trained checkpoints),
    /// `f32`, `bf16` or `f16`. Read by the binary that builds the backend.
    #[arg(long, env = "SANA_DTYPE", default_value = "auto",
          value_parser = ["auto", "f32", "bf16", "f16"])]
    pub dtype: String,

    /// Weight-file variant to load where a folder has one (`fp16`, `bf16`: `*.fp16.safetensors`),
    /// e.g. to download half the bytes of an fp16-trained checkpoint.
    #[arg(long, env = "SANA_VARIANT")]
    pub variant: Option<String>,

    /// A LoRA adapter to load at start-up, `NAME=PATH`: a diffusers `pytorch_lora_weights.safetensors`
    /// (as `save_lora_weights` writes it), the folder holding it, or a Hub repo id. Repeat the
    /// flag (or separate with `,` in `SANA_LORA`) for several. Requests choose adapters by name
    /// and scale (`lora`); `GET /v1/models` lists them. Read by the binary that builds the
    /// backend.
    #[arg(
        long = "lora",
        env = "SANA_LORA",
        value_delimiter = ',',
        value_name = "NAME=PATH"
    )]
    pub lora: Vec<String>,

    /// A ControlNet to load at start-up, `NAME=PATH`: a diffusers `SanaControlNetModel` folder (or
    /// a `SanaControlNetPipeline` folder holding one in `controlnet/`), or a Hub repo id. Repeat
    /// (or separate with `,` in `SANA_CONTROLNET`) for several. Requests send a `control_image`
    /// and choose one by name (`controlnet`; optional when one is loaded). Read by the binary that
    /// builds the backend.
    #[arg(
        long = "controlnet",
        env = "SANA_CONTROLNET",
        value_delimiter = ',',
        value_name = "NAME=PATH"
    )]
    pub controlnet: Vec<String>,

    /// Steps of requests that leave `num_inference_steps` out. Unset: the model's (20; 2 for
    /// SANA-Sprint).
    #[arg(long, env = "SANA_DEFAULT_STEPS")]
    pub default_steps: Option<u32>,

    /// Guidance of requests that leave `guidance_scale` out. Unset: the model's (4.5).
    #[arg(long, env = "SANA_DEFAULT_GUIDANCE_SCALE")]
    pub default_guidance_scale: Option<f32>,

    /// An env file of these settings (`SANA_MODEL=...`, one per line, `#` comments; see
    /// `configs/`). Flags and environment variables win over it.
    #[arg(long, env = "SANA_CONFIG")]
    pub config: Option<PathBuf>,

    /// The name clients use in `model` and see in `/v1/models`; the loaded model's id when unset.
    /// Requests may name either.
    #[arg(long, env = "SANA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Devices to run on, one worker each (comma-separated: `cuda:0,cuda:1`, or `cpu`). `auto`:
    /// the first GPU when the binary has CUDA and one is present, else the CPU.
    #[arg(
        long,
        env = "SANA_DEVICES",
        value_delimiter = ',',
        default_value = "auto"
    )]
    pub devices: Vec<String>,

    /// Requests admitted at once (queued or running). Past it the server answers 429 with
    /// `Retry-After`, so a load balancer or client backs off instead of queueing without bound.
    #[arg(long, env = "SANA_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Most images in one batch (the model may cap it lower).
    #[arg(long, env = "SANA_MAX_BATCH_IMAGES", default_value_t = 8)]
    pub max_batch_images: usize,

    /// Most latent tokens in one batch (`(h/32)·(w/32)` per image, doubled with guidance); bounds
    /// activation memory. Unset: `--max-batch-images` images at the largest size.
    #[arg(long, env = "SANA_MAX_BATCH_LATENT_TOKENS")]
    pub max_batch_latent_tokens: Option<usize>,

    /// Largest `n` (images per request); a request's images always share one batch.
    #[arg(long, env = "SANA_MAX_N", default_value_t = 4)]
    pub max_n: u32,

    /// Largest `num_inference_steps` a request may ask for.
    #[arg(long, env = "SANA_MAX_STEPS", default_value_t = 100)]
    pub max_steps: u32,

    /// Longest `prompt` and `negative_prompt`, in characters.
    #[arg(long, env = "SANA_MAX_PROMPT_CHARS", default_value_t = 8192)]
    pub max_prompt_chars: usize,

    /// Denoising steps of the warm-up batch each worker runs at start (0 skips it). Warming up at
    /// the largest batch makes an out-of-memory happen at boot, not on the first user.
    #[arg(long, env = "SANA_WARMUP_STEPS", default_value_t = 2)]
    pub warmup_steps: u32,

    /// Longest time a request may take, from arrival to its last image (`300`, `90s`, `5m`).
    /// Past it the request is cancelled and answered 504.
    #[arg(long, env = "SANA_REQUEST_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// How long a busy worker may make no progress (no finished denoising step, text encoding or
    /// decode) before its requests are answered 503 and a new worker replaces it (`0`: never).
    /// Must exceed the slowest step of the largest batch on this device.
    #[arg(long, env = "SANA_WATCHDOG_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub watchdog_timeout: Duration,

    /// Longest time a client may take to send a request's headers; slower connections are
    /// closed (a slow-header client cannot hold a connection open).
    #[arg(long, env = "SANA_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long shutdown (SIGINT/SIGTERM) waits for in-flight requests before cancelling them.
    #[arg(long, env = "SANA_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Largest request body in bytes; larger bodies are answered 413.
    #[arg(long, env = "SANA_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Largest body of an image upload (`/v1/images/edits`, multipart) in bytes; larger bodies
    /// are answered 413.
    #[arg(long, env = "SANA_MAX_UPLOAD_BYTES", default_value_t = 32 << 20)]
    pub max_upload_bytes: usize,

    /// API keys clients must send as `Authorization: Bearer <key>` on every route but `/health`
    /// (comma-separated, or repeat the flag). No keys and no key file: no authentication.
    #[arg(
        long = "api-key",
        env = "SANA_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<ApiKey>,

    /// A file of API keys, one per line; blank lines and lines starting with `#` are skipped.
    /// Adds to `--api-key`.
    #[arg(long, env = "SANA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Image generations each API key may start per minute (a token bucket holding a minute's
    /// worth); past it the server answers 429 with `Retry-After`. Without keys, all clients share
    /// one bucket. Unset: no rate limit.
    #[arg(long, env = "SANA_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// Base URL of `response_format: "url"` links, e.g. `https://sana.example.com` (behind a
    /// proxy). Unset: `http://` plus the request's `Host` header.
    #[arg(long, env = "SANA_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// How long an image stays downloadable after a `response_format: "url"` generation.
    #[arg(long, env = "SANA_URL_TTL", default_value = "1h", value_parser = parse_duration)]
    pub url_ttl: Duration,

    /// Memory for `url` images, in bytes; when full, the oldest images go first.
    #[arg(long, env = "SANA_URL_STORE_BYTES", default_value_t = 512 << 20)]
    pub url_store_bytes: usize,

    /// Origins allowed to call the API from a browser (comma-separated, or `*` for any). Unset:
    /// no CORS headers, so browsers refuse cross-origin calls.
    #[arg(long = "cors-origin", env = "SANA_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Do not serve the web playground at `/` (the API is unchanged; `/` answers 404).
    #[arg(long, env = "SANA_NO_PLAYGROUND")]
    pub no_playground: bool,
}

/// Reads an env file of `sana serve` settings: `KEY=VALUE` lines (optionally `export KEY=VALUE`,
/// values optionally in single or double quotes), blank lines and `#` comments skipped. Every key
/// must be one of the server's environment variables; an unknown one is refused by name (a typo
/// would otherwise be silently ignored).
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    use clap::CommandFactory;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let known: Vec<String> = ServeArgs::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or_else(|| {
            format!(
                "{}:{}: expected KEY=VALUE, got {line:?}",
                path.display(),
                n + 1
            )
        })?;
        let key = key.trim();
        if key == "SANA_CONFIG" || !known.iter().any(|k| k == key) {
            return Err(format!(
                "{}:{}: unknown setting {key}; known: {}",
                path.display(),
                n + 1,
                known
                    .iter()
                    .filter(|k| *k != "SANA_CONFIG")
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let value = value.trim();
        let value = ["\"", "'"]
            .iter()
            .find_map(|q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
            .unwrap_or(value);
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// [`ServeArgs`] from an env file alone (what a preset in `configs/` means without other flags or
/// environment), for checking presets.
pub fn args_from_env_file(path: &Path) -> Result<ServeArgs, String> {
    use clap::CommandFactory;
    let pairs = read_env_file(path)?;
    let cmd = ServeArgs::command();
    let mut argv = vec!["sana serve".to_string()];
    for (key, value) in pairs {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == key.as_str()))
            .expect("read_env_file checked the key");
        let long = arg.get_long().expect("every setting has a long flag");
        argv.push(format!("--{long}={value}"));
    }
    ServeArgs::try_parse_from(argv).map_err(|e| format!("{}: {e}", path.display()))
}

/// An API key as given on the command line or in the key file. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl From<String> for ApiKey {
    fn from(key: String) -> Self {
        Self(key)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The API keys the server accepts, kept as SHA-256 digests so that checking a presented key
/// takes the same time whatever its length and content (see [`ApiKeys::find`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// The digests of `keys`.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            digests: keys.into_iter().map(digest).collect(),
        }
    }

    /// Whether authentication is on.
    pub fn is_enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// These keys and `other`'s.
    pub fn merged(&self, other: &ApiKeys) -> ApiKeys {
        let mut digests = self.digests.clone();
        digests.extend_from_slice(&other.digests);
        ApiKeys { digests }
    }

    /// The id of the key `presented` matches (see [`KeyId`]), in constant time.
    pub fn identify(&self, presented: &str) -> Option<KeyId> {
        self.find(presented)
            .map(|index| KeyId::of(&self.digests[index]))
    }

    /// The index of the key `presented` matches, comparing against every key in constant time
    /// (no early exit), so timing tells nothing about which key or how much of it matched.
    pub fn find(&self, presented: &str) -> Option<usize> {
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, key) in self.digests.iter().enumerate() {
            let matches = key.ct_eq(&presented);
            index = u64::conditional_select(&index, &(i as u64), matches);
            found |= matches;
        }
        bool::from(found).then_some(index as usize)
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} key(s), <redacted>)", self.digests.len())
    }
}

/// A key's public name: the first 8 hex digits of its SHA-256 (`printf %s "$KEY" | sha256sum |
/// cut -c1-8`), in metrics and logs where the key itself must never appear. Stable across key
/// file reloads, so rate limits and metrics follow the key, not its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(u32);

impl KeyId {
    fn of(digest: &[u8; 32]) -> Self {
        Self(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The keys of a key file: one per line, trimmed; blank lines and `#` comments skipped. A file
/// without a key is an error (it would turn authentication off).
pub fn read_key_file(path: &Path) -> Result<ApiKeys, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError(format!(
            "--api-key-file {}: cannot read it: {err}",
            path.display()
        ))
    })?;
    let keys = ApiKeys::new(
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#')),
    );
    if keys.is_empty() {
        return Err(ConfigError(format!(
            "--api-key-file {} holds no key; put one key per line",
            path.display()
        )));
    }
    Ok(keys)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Who may call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers (the default).
    Off,
    /// Any origin (`--cors-origin '*'`).
    Any,
    /// These origins exactly.
    Origins(Vec<String>),
}

/// The validated configuration of a server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The model to load (for the binary that builds the backend).
    pub model: String,
    /// The name clients see and may use in `model`; the backend's model id when `None`.
    pub served_model_name: Option<String>,
    /// How the engine runs.
    pub engine: EngineConfig,
    /// Accepted API keys at start (`--api-key` and the key file); empty means no
    /// authentication.
    pub api_keys: ApiKeys,
    /// The keys of `--api-key`, which a reload of the key file keeps.
    pub flag_keys: ApiKeys,
    /// `--api-key-file`, read again on SIGHUP.
    pub api_key_file: Option<PathBuf>,
    /// Generations per minute per key.
    pub rate_limit: Option<u32>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest image-upload body in bytes.
    pub max_upload_bytes: usize,
    /// Longest time a request may take.
    pub request_timeout: Duration,
    /// Longest time a client may take to send its headers.
    pub header_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Base URL of image links, without a trailing `/`.
    pub public_url: Option<String>,
    /// Lifetime of `url` images.
    pub url_ttl: Duration,
    /// Memory for `url` images, in bytes.
    pub url_store_bytes: usize,
    /// Browser access.
    pub cors: Cors,
    /// Serve the web playground at `/`.
    pub playground: bool,
}

/// A flag value the server cannot start with; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl TryFrom<ServeArgs> for ServerConfig {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let invalid = |msg: String| Err(ConfigError(msg));
        let mut keys: Vec<String> = Vec::new();
        for (i, ApiKey(key)) in args.api_keys.iter().enumerate() {
            if key.trim().is_empty() {
                return invalid(format!(
                    "--api-key number {} is empty; remove it or give a key",
                    i + 1
                ));
            }
            keys.push(key.trim().to_owned());
        }
        let flag_keys = ApiKeys::new(keys.iter().map(String::as_str));
        let api_keys = match &args.api_key_file {
            Some(path) => flag_keys.merged(&read_key_file(path)?),
            None => flag_keys.clone(),
        };
        if args.rate_limit == Some(0) {
            return invalid(
                "--rate-limit is 0, which would refuse every request; give at least 1 or leave \
                 it unset for no limit"
                    .into(),
            );
        }
        if args.max_upload_bytes < args.max_body_bytes {
            return invalid(format!(
                "--max-upload-bytes ({}) is below --max-body-bytes ({}); an upload carries an \
                 image besides its fields",
                args.max_upload_bytes, args.max_body_bytes
            ));
        }
        if args.max_body_bytes < 1024 {
            return invalid(format!(
                "--max-body-bytes is {}; a request needs room for its prompt, give at least 1024",
                args.max_body_bytes
            ));
        }
        for (flag, value) in [
            ("--request-timeout", args.request_timeout),
            ("--header-timeout", args.header_timeout),
            ("--url-ttl", args.url_ttl),
        ] {
            if value.is_zero() {
                return invalid(format!("{flag} is 0; give a positive duration like `60s`"));
            }
        }
        let public_url = match args.public_url {
            None => None,
            Some(url) => {
                let url = url.trim_end_matches('/').to_owned();
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.len() <= "https://".len()
                {
                    return invalid(format!(
                        "--public-url is `{url}`; give an absolute http(s) URL such as \
                         `https://sana.example.com`"
                    ));
                }
                Some(url)
            }
        };
        let cors = if args.cors_origins.is_empty() {
            Cors::Off
        } else if args.cors_origins.iter().any(|origin| origin == "*") {
            Cors::Any
        } else {
            for origin in &args.cors_origins {
                if !(origin.starts_with("http://") || origin.starts_with("https://"))
                    || origin.ends_with('/')
                {
                    return invalid(format!(
                        "--cors-origin `{origin}` is not an origin; give scheme and host without \
                         a path, e.g. `https://app.example.com`, or `*` for any"
                    ));
                }
            }
            Cors::Origins(args.cors_origins)
        };
        if args
            .served_model_name
            .as_deref()
            .is_some_and(|name| name.trim().is_empty())
        {
            return invalid("--served-model-name is empty; give a name or leave it unset".into());
        }
        if let Some(steps) = args.default_steps {
            if steps == 0 || steps > args.max_steps {
                return invalid(format!(
                    "--default-steps {steps} must be between 1 and --max-steps ({})",
                    args.max_steps
                ));
            }
        }
        if let Some(g) = args.default_guidance_scale {
            if !(0.0..=sana_engine::MAX_GUIDANCE_SCALE).contains(&g) {
                return invalid(format!(
                    "--default-guidance-scale {g} must be a number from 0 to {}",
                    sana_engine::MAX_GUIDANCE_SCALE
                ));
            }
        }
        Ok(Self {
            addr: SocketAddr::new(args.host, args.port),
            model: args.model,
            served_model_name: args.served_model_name,
            engine: EngineConfig {
                devices: args.devices,
                max_concurrent_requests: args.max_concurrent_requests,
                max_batch_images: args.max_batch_images,
                max_batch_latent_tokens: args.max_batch_latent_tokens,
                max_n: args.max_n,
                max_steps: args.max_steps,
                max_prompt_chars: args.max_prompt_chars,
                max_previews: MAX_PARTIAL_IMAGES,
                request_timeout: args.request_timeout,
                watchdog_timeout: (!args.watchdog_timeout.is_zero())
                    .then_some(args.watchdog_timeout),
                warmup_steps: args.warmup_steps,
            },
            api_keys,
            flag_keys,
            api_key_file: args.api_key_file,
            rate_limit: args.rate_limit,
            max_body_bytes: args.max_body_bytes,
            max_upload_bytes: args.max_upload_bytes,
            request_timeout: args.request_timeout,
            header_timeout: args.header_timeout,
            shutdown_grace: args.shutdown_grace,
            public_url,
            url_ttl: args.url_ttl,
            url_store_bytes: args.url_store_bytes,
            cors,
            playground: !args.no_playground,
        })
    }
}

/// OpenAI's limit on `partial_images`.
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// Parses `300`, `300s`, `500ms`, `5m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a duration; write a whole number with an optional unit: 500ms, 90s, 5m, 1h")
    })?;
    let seconds = |factor: u64| {
        value
            .checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{text}` is too long a duration"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(value)),
        "" | "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        other => Err(format!(
            "`{other}` in `{text}` is not a duration unit; use ms, s, m or h"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["sana serve", "--model", "fake/sana"];
        argv.extend_from_slice(extra);
        ServeArgs::try_parse_from(argv).expect("the flags parse")
    }

    fn config(extra: &[&str]) -> Result<ServerConfig, ConfigError> {
        ServerConfig::try_from(parse(extra))
    }

    #[test]
    fn defaults_make_a_server_on_8080_without_auth_or_cors() {
        let config = config(&[]).expect("the defaults are valid");
        assert_eq!(config.addr, "0.0.0.0:8080".parse().expect("an address"));
        assert!(!config.api_keys.is_enabled());
        assert_eq!(config.cors, Cors::Off);
        assert_eq!(config.url_ttl, Duration::from_secs(3600));
        assert_eq!(config.request_timeout, Duration::from_secs(300));
        assert_eq!(config.engine.request_timeout, config.request_timeout);
        assert_eq!(config.engine.max_previews, 3);
        assert_eq!(config.rate_limit, None);
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5d")
            .expect_err("no days")
            .contains("ms, s, m or h"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn keys_come_from_flags_and_a_file_and_never_show_in_debug() {
        let dir = std::env::temp_dir().join(format!("sana-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let file = dir.join("keys");
        std::fs::write(&file, "# ops\nsk-file-1\n\n  sk-file-2  \n").expect("write keys");
        let config = config(&[
            "--api-key",
            "sk-flag-1,sk-flag-2",
            "--api-key-file",
            file.to_str().expect("utf-8 path"),
        ])
        .expect("valid keys");
        assert_eq!(config.api_keys.len(), 4);
        assert_eq!(config.api_keys.find("sk-flag-1"), Some(0));
        assert_eq!(config.api_keys.find("sk-flag-2"), Some(1));
        assert_eq!(config.api_keys.find("sk-file-1"), Some(2));
        assert_eq!(
            config.api_keys.find("sk-file-2"),
            Some(3),
            "lines are trimmed"
        );
        assert_eq!(config.api_keys.find("sk-flag"), None, "no prefix match");
        assert_eq!(config.api_keys.find(""), None);
        let debug = format!("{config:?} {:?}", parse(&["--api-key", "sk-flag-1"]));
        assert!(!debug.contains("sk-"), "a key leaked into Debug: {debug}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--rate-limit", "0"], "--rate-limit"),
            (&["--max-body-bytes", "10"], "--max-body-bytes"),
            (&["--public-url", "sana.example.com"], "--public-url"),
            (&["--cors-origin", "app.example.com"], "--cors-origin"),
            (&["--api-key-file", "/nonexistent/keys"], "--api-key-file"),
            (&["--api-key", " "], "--api-key"),
            (&["--url-ttl", "0s"], "--url-ttl"),
            (&["--served-model-name", ""], "--served-model-name"),
        ];
        for (flags, flag) in cases {
            let err = config(flags).expect_err("an invalid value");
            assert!(err.to_string().contains(flag), "{flags:?}: {err}");
        }
    }

    #[test]
    fn public_url_and_cors_are_normalised() {
        let config = config(&[
            "--public-url",
            "https://sana.example.com/",
            "--cors-origin",
            "https://a.example.com,https://b.example.com",
        ])
        .expect("valid");
        assert_eq!(
            config.public_url.as_deref(),
            Some("https://sana.example.com")
        );
        assert_eq!(
            config.cors,
            Cors::Origins(vec![
                "https://a.example.com".into(),
                "https://b.example.com".into()
            ])
        );
        assert_eq!(
            ServerConfig::try_from(parse(&["--cors-origin", "*"]))
                .expect("valid")
                .cors,
            Cors::Any
        );
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        use clap::CommandFactory;
        let command = ServeArgs::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no environment variable"));
            assert!(
                env.to_str().is_some_and(|env| env.starts_with("SANA_")),
                "--{id} reads {env:?}, outside the SANA_ prefix"
            );
        }
    }
}
