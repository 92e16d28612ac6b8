//! What `--model` names, resolved once (downloaded, found in the cache, or extracted) and loaded
//! per device: a diffusers folder, a Hub repo id, the embedded demo model, or an original NVlabs
//! `.pth` checkpoint with its YAML and the Gemma and DC-AE repos it was trained with.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use sana_model::nvlabs::NvlabsConfig;
use sana_model::pipeline::{LoadOptions, Precision, SanaPipeline};
use sana_model::source::{resolve, resolve_component, HubOptions, ModelSource};

/// `--model` and the flags that only matter for an NVlabs `.pth`.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    /// The NVlabs training YAML (required with a `.pth`).
    pub model_config: Option<PathBuf>,
    /// Gemma folder or repo id (default: the YAML's `text_encoder_name`).
    pub text_encoder: Option<String>,
    /// DC-AE folder or repo id (default: the YAML's `vae_pretrained`, diffusers format).
    pub vae: Option<String>,
    /// Weight-file variant (`fp16`, `bf16`) to download from the Hub where a model has one.
    pub variant: Option<String>,
    /// With a `.pth`: diffusers' default instruction instead of the YAML's `chi_prompt`.
    pub diffusers_instruction: bool,
}

/// Local files of a pipeline, ready to load on any device.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A diffusers folder.
    Folder(PathBuf),
    /// An NVlabs checkpoint and the folders of its other parts.
    Nvlabs {
        pth: PathBuf,
        yaml: PathBuf,
        text_encoder: PathBuf,
        vae: PathBuf,
        diffusers_instruction: bool,
    },
}

impl ModelSpec {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            model_config: None,
            text_encoder: None,
            vae: None,
            variant: None,
            diffusers_instruction: false,
        }
    }

    /// Resolves the files (downloading or extracting what is missing) and the id the API reports.
    pub fn resolve(&self) -> Result<(Resolved, String)> {
        let spec = self.model.as_str();
        let is_pth = Path::new(spec)
            .extension()
            .is_some_and(|e| e == "pth" || e == "pt");
        if !is_pth
            && (self.model_config.is_some()
                || self.vae.is_some()
                || self.text_encoder.is_some()
                || self.diffusers_instruction)
        {
            bail!("--model-config, --text-encoder, --vae and --diffusers-instruction go with an NVlabs .pth --model; {spec} is not one");
        }
        if spec == sana_scenes::MODEL_ID {
            let root = sana_scenes::materialize().context("the embedded model")?;
            return Ok((Resolved::Folder(root), spec.to_string()));
        }
        let mut hub = HubOptions::from_env();
        hub.variant = self.variant.clone();
        if is_pth {
            let pth = PathBuf::from(spec);
            if !pth.is_file() {
                bail!("--model {spec}: no such file");
            }
            let yaml = self.model_config.clone().with_context(|| {
                format!("--model {spec} is an NVlabs checkpoint: give its training YAML with --model-config")
            })?;
            let nv = NvlabsConfig::read(&yaml)?;
            let part = |given: &Option<String>, default: String, what: &str| -> Result<PathBuf> {
                let name = given.clone().unwrap_or(default);
                resolve_component(&ModelSource::parse(&name)?, &hub)
                    .with_context(|| format!("the {what} {name}"))
            };
            let text_encoder = part(&self.text_encoder, nv.text_encoder_repo(), "text encoder")?;
            let vae = part(&self.vae, nv.vae_repo(), "autoencoder")?;
            let id = pth
                .file_stem()
                .map_or_else(|| spec.to_string(), |s| s.to_string_lossy().into_owned());
            return Ok((
                Resolved::Nvlabs {
                    pth,
                    yaml,
                    text_encoder,
                    vae,
                    diffusers_instruction: self.diffusers_instruction,
                },
                id,
            ));
        }
        let source = ModelSource::parse(spec)?;
        let root = resolve(&source, &hub).with_context(|| format!("--model {spec}"))?;
        let id = match source {
            ModelSource::Hub { repo, .. } => repo,
            ModelSource::Dir(dir) => dir
                .canonicalize()
                .unwrap_or(dir)
                .file_name()
                .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned()),
        };
        Ok((Resolved::Folder(root), id))
    }
}

impl Resolved {
    /// Loads the pipeline on `device` in `dtype` (`auto`: the model's precision policy).
    pub fn load(
        &self,
        device: &Device,
        dtype: &str,
        variant: Option<&str>,
    ) -> Result<SanaPipeline> {
        let mut opts = LoadOptions::new(device.clone());
        opts.precision = parse_precision(dtype)?.or_else(|| cpu_auto_precision(device));
        if device.is_cpu()
            && opts
                .precision
                .is_some_and(|p| [p.transformer, p.text_encoder, p.vae].contains(&DType::BF16))
        {
            tracing::info!(
                "CPU bf16: bf16 weight matrices, f32 activations; matmuls by {}",
                sana_model::ops::cpu_bf16_status()
            );
        }
        opts.variant = variant.map(str::to_string);
        match self {
            Resolved::Folder(root) => SanaPipeline::load(root, &opts)
                .with_context(|| format!("loading {}", root.display())),
            Resolved::Nvlabs {
                pth,
                yaml,
                text_encoder,
                vae,
                diffusers_instruction,
            } => SanaPipeline::load_nvlabs(
                pth,
                yaml,
                text_encoder,
                vae,
                &LoadOptions {
                    diffusers_instruction: *diffusers_instruction,
                    ..opts
                },
            )
            .with_context(|| format!("loading {}", pth.display())),
        }
    }
}

/// `--dtype auto` on the CPU: bf16 for all three models when bf16 matmuls run on the CPU's AMX
/// tiles (oneDNN loaded, an AMX kernel picked), else `None` (the library's f32 policy). Logged
/// either way, with what to set to change it.
pub fn cpu_auto_precision(device: &Device) -> Option<Precision> {
    if !device.is_cpu() {
        return None;
    }
    // Only the kernel is asked for: the probe of the matmul paths runs when bf16 is in use.
    let kernel = sana_model::ops::onednn_kernel();
    if kernel.as_ref().is_ok_and(|k| k.on_amx()) {
        tracing::info!(
            "--dtype auto on this CPU: bf16, its AMX tiles reached (--dtype f32 to opt out)"
        );
        Some(Precision {
            transformer: DType::BF16,
            text_encoder: DType::BF16,
            vae: DType::BF16,
        })
    } else {
        let why = match kernel {
            Ok(k) => format!("{k}, not AMX tiles"),
            Err(reason) => format!("no oneDNN bf16 kernel: {reason}"),
        };
        tracing::info!(
            "--dtype auto on this CPU: f32 ({why}; --dtype bf16 halves the weights' memory, its \
             matmuls by the fastest path a start-up probe finds)"
        );
        None
    }
}

/// `auto` → `None` (the model's policy); `f32`, `bf16`, `f16` for the transformer (Gemma and the
/// DC-AE stay in bf16 under f16: they overflow it).
pub fn parse_precision(s: &str) -> Result<Option<Precision>> {
    let one = |d: DType| Precision {
        transformer: d,
        text_encoder: if d == DType::F16 { DType::BF16 } else { d },
        vae: if d == DType::F16 { DType::BF16 } else { d },
    };
    Ok(match s {
        "auto" => None,
        "f32" => Some(one(DType::F32)),
        "bf16" => Some(one(DType::BF16)),
        "f16" => Some(one(DType::F16)),
        other => bail!("--dtype {other:?}: expected auto, f32, bf16 or f16"),
    })
}
