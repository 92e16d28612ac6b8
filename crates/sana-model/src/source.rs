//! Where a model's files come from: a local folder in the diffusers layout, or a Hugging Face Hub
//! repo id resolved through the standard Hub cache (downloaded when missing, unless offline).
//!
//! The cache layout is the Python one (`models--Org--Name/refs/<revision>` holding a commit hash,
//! `snapshots/<hash>/<path>`), so a cache filled by `huggingface-cli` or diffusers is reused as is.
//! Only the files a pipeline needs are fetched: `model_index.json`, the scheduler and tokenizer
//! configs, and each model's config with the weights of one variant.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder in the diffusers layout (`model_index.json`, `transformer/`, `vae/`, …).
    Dir(PathBuf),
    /// `org/name[@revision]` on the Hugging Face Hub (revision defaults to `main`).
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// An existing directory is a local folder; otherwise `org/name[@revision]` is a Hub repo id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return Err(bad_source(spec, "the revision after '@' is empty")),
            None => (spec, "main"),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match repo.split_once('/') {
            Some((org, name)) if valid_part(org) && valid_part(name) => Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            }),
            _ => Err(bad_source(
                spec,
                "not an existing directory and not a Hub repo id of the form org/name[@revision]",
            )),
        }
    }
}

fn bad_source(spec: &str, why: &str) -> Error {
    Error::Unsupported {
        field: "model",
        value: format!("{spec:?}"),
        reason: why.to_string(),
    }
}

/// How Hub repos are resolved. [`HubOptions::from_env`] reads the usual Hugging Face variables.
#[derive(Clone)]
pub struct HubOptions {
    /// The cache root (`…/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`): only what the cache holds.
    pub offline: bool,
    /// Access token for gated or private repos (`HF_TOKEN`).
    pub token: Option<String>,
    /// Weights variant to prefer (`fp16`, `bf16`); the default files when a model has none.
    pub variant: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("variant", &self.variant)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub` or
    /// `~/.cache/huggingface/hub` (Python's order); `HF_HUB_OFFLINE`; `HF_TOKEN` (else the token
    /// file `huggingface-cli login` writes).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = || {
            var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
        };
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home().join(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Self {
            cache_dir,
            offline,
            token,
            variant: None,
            progress: true,
        }
    }
}

/// The local folder (diffusers layout) holding `source`'s files, downloading what is missing.
pub fn resolve(source: &ModelSource, opts: &HubOptions) -> Result<PathBuf> {
    match source {
        ModelSource::Dir(dir) => Ok(dir.clone()),
        ModelSource::Hub { repo, revision } => {
            if let Some(dir) = cached_snapshot(&opts.cache_dir, repo, revision) {
                if opts.offline || snapshot_complete(&dir, opts.variant.as_deref()) {
                    return Ok(dir);
                }
            }
            if opts.offline {
                return Err(Error::Weights(format!(
                    "{repo}@{revision} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set: \
                     download it once online, or point --model at a local folder",
                    opts.cache_dir.display()
                )));
            }
            download(repo, revision, opts)
        }
    }
}

/// `snapshots/<hash>` of a cached repo, when `refs/<revision>` (or the revision as a commit hash)
/// names a snapshot that holds `model_index.json`.
pub fn cached_snapshot(cache_dir: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    cached_snapshot_with(cache_dir, repo, revision, "model_index.json")
}

/// `snapshots/<hash>` of a cached repo whose revision resolves to a snapshot holding `marker`.
fn cached_snapshot_with(
    cache_dir: &Path,
    repo: &str,
    revision: &str,
    marker: &str,
) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let hash = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = repo_dir.join("snapshots").join(hash);
    dir.join(marker).is_file().then_some(dir)
}

/// The local folder of a single-model repo (a `transformers` or `diffusers` model with
/// `config.json` and its weights at the top level, plus a tokenizer where it has one: e.g.
/// `Efficient-Large-Model/gemma-2-2b-it`, `mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`),
/// downloading what is missing. The parts of an NVlabs `.pth` pipeline come from such repos.
pub fn resolve_component(source: &ModelSource, opts: &HubOptions) -> Result<PathBuf> {
    match source {
        ModelSource::Dir(dir) => Ok(dir.clone()),
        ModelSource::Hub { repo, revision } => {
            if let Some(dir) = cached_snapshot_with(&opts.cache_dir, repo, revision, "config.json")
            {
                let complete = ["model", "diffusion_pytorch_model"].iter().any(|stem| {
                    crate::weights::find_weight_files(&dir, stem, opts.variant.as_deref()).is_ok()
                });
                if opts.offline || complete {
                    return Ok(dir);
                }
            }
            if opts.offline {
                return Err(Error::Weights(format!(
                    "{repo}@{revision} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                    opts.cache_dir.display()
                )));
            }
            download_with(repo, revision, opts, needed_component_files, "config.json")
        }
    }
}

/// The file name diffusers' `save_lora_weights` writes, and `load_lora_weights` reads from a repo.
pub const LORA_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// A LoRA adapter argument: an existing file or folder as is, else a Hub repo id
/// (`org/name[@revision]`) whose `pytorch_lora_weights.safetensors` is taken from the cache or
/// downloaded.
pub fn resolve_lora(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match ModelSource::parse(spec).map_err(|_| Error::Unsupported {
        field: "lora",
        value: format!("{spec:?}"),
        reason: "not an existing file or folder and not a Hub repo id of the form \
                 org/name[@revision]"
            .into(),
    })? {
        ModelSource::Dir(dir) => Ok(dir),
        ModelSource::Hub { repo, revision } => {
            if let Some(dir) =
                cached_snapshot_with(&opts.cache_dir, &repo, &revision, LORA_WEIGHT_NAME)
            {
                return Ok(dir.join(LORA_WEIGHT_NAME));
            }
            if opts.offline {
                return Err(Error::Weights(format!(
                    "{repo}@{revision} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                    opts.cache_dir.display()
                )));
            }
            let pick = |listing: &[String], _: Option<&str>| -> Vec<String> {
                listing
                    .iter()
                    .filter(|f| *f == LORA_WEIGHT_NAME)
                    .cloned()
                    .collect()
            };
            Ok(
                download_with(&repo, &revision, opts, pick, LORA_WEIGHT_NAME)?
                    .join(LORA_WEIGHT_NAME),
            )
        }
    }
}

/// The files of a single-model repo that loading it needs: `config.json`, the tokenizer files
/// present, and the safetensors weights of `variant` (else the default ones).
pub fn needed_component_files(listing: &[String], variant: Option<&str>) -> Vec<String> {
    let top: Vec<&str> = listing
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .collect();
    let mut out: Vec<String> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .filter(|f| top.contains(f))
    .map(|f| f.to_string())
    .collect();
    let weights = ["diffusion_pytorch_model", "model"]
        .iter()
        .find_map(|stem| {
            variant
                .and_then(|v| weight_set(&top, stem, Some(v)))
                .or_else(|| weight_set(&top, stem, None))
        });
    out.extend(weights.unwrap_or_default());
    out
}

/// Whether a snapshot folder already holds every file [`needed_files`] would pick from it.
fn snapshot_complete(dir: &Path, variant: Option<&str>) -> bool {
    let Ok(index) = std::fs::read_to_string(dir.join("model_index.json")) else {
        return false;
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&index) else {
        return false;
    };
    let components = index
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !k.starts_with('_'))
                .cloned()
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    components.iter().all(|c| {
        let sub = dir.join(c);
        match c.as_str() {
            "tokenizer" => sub.join("tokenizer.json").is_file(),
            "scheduler" => sub.join("scheduler_config.json").is_file(),
            _ => {
                sub.join("config.json").is_file()
                    && ["diffusion_pytorch_model", "model"]
                        .iter()
                        .any(|stem| crate::weights::find_weight_files(&sub, stem, variant).is_ok())
            }
        }
    })
}

/// The files of a diffusers pipeline repo (its full listing) that a pipeline needs, with the
/// weights of `variant` where a model has them and the default weights otherwise. Other formats
/// (`.bin`, `.pth`, `.onnx`, quantised variants) and documentation are left out.
pub fn needed_files(listing: &[String], variant: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut components: Vec<&str> = listing
        .iter()
        .filter_map(|f| f.split_once('/').map(|(dir, _)| dir))
        .collect();
    components.sort_unstable();
    components.dedup();
    if listing.iter().any(|f| f == "model_index.json") {
        out.push("model_index.json".into());
    }
    for comp in components {
        let files: Vec<&str> = listing
            .iter()
            .filter_map(|f| f.strip_prefix(comp).and_then(|r| r.strip_prefix('/')))
            .filter(|f| !f.contains('/'))
            .collect();
        let mut keep = |f: &str| out.push(format!("{comp}/{f}"));
        match comp {
            "scheduler" => files
                .iter()
                .filter(|f| f.ends_with(".json"))
                .for_each(|f| keep(f)),
            "tokenizer" => files
                .iter()
                .filter(|f| {
                    matches!(
                        **f,
                        "tokenizer.json" | "tokenizer_config.json" | "special_tokens_map.json"
                    )
                })
                .for_each(|f| keep(f)),
            _ => {
                if files.contains(&"config.json") {
                    keep("config.json");
                }
                let weights = ["diffusion_pytorch_model", "model"]
                    .iter()
                    .find_map(|stem| {
                        variant
                            .and_then(|v| weight_set(&files, stem, Some(v)))
                            .or_else(|| weight_set(&files, stem, None))
                    });
                for f in weights.unwrap_or_default() {
                    keep(&f);
                }
            }
        }
    }
    out
}

/// The safetensors files (and index) of `stem` for `variant` among a folder's file names.
fn weight_set(files: &[&str], stem: &str, variant: Option<&str>) -> Option<Vec<String>> {
    let (single, index, shard_prefix) = match variant {
        Some(v) => (
            format!("{stem}.{v}.safetensors"),
            format!("{stem}.safetensors.index.{v}.json"),
            format!("{stem}.{v}-"),
        ),
        None => (
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
            format!("{stem}-"),
        ),
    };
    if files.contains(&single.as_str()) {
        return Some(vec![single]);
    }
    if !files.contains(&index.as_str()) {
        return None;
    }
    let mut set = vec![index];
    set.extend(
        files
            .iter()
            .filter(|f| {
                f.starts_with(&shard_prefix) && f.ends_with(".safetensors") && f.contains("-of-")
            })
            .map(|f| f.to_string()),
    );
    Some(set)
}

fn download(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf> {
    download_with(repo, revision, opts, needed_files, "model_index.json")
}

/// Downloads the files `pick` chooses from the repo's listing; `marker` must be among them (the
/// folder holding it is the result).
#[cfg(feature = "hub")]
fn download_with(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
    pick: fn(&[String], Option<&str>) -> Vec<String>,
    marker: &str,
) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let hub_err = |what: &str, e: hf_hub::api::sync::ApiError| {
        Error::Weights(format!("Hugging Face Hub: {what} {repo}@{revision}: {e}"))
    };
    let api = ApiBuilder::new()
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| hub_err("cannot set up a client for", e))?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = api_repo.info().map_err(|e| hub_err("cannot list", e))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let files = pick(&listing, opts.variant.as_deref());
    if !files.iter().any(|f| f == marker) {
        return Err(Error::Weights(format!(
            "{repo}@{revision} has no {marker}: not a {} repo",
            match marker {
                "model_index.json" => "diffusers pipeline",
                LORA_WEIGHT_NAME => "diffusers LoRA",
                _ => "model",
            }
        )));
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(Error::Weights(format!(
            "{repo}@{revision} has no safetensors weights (other formats are not read)"
        )));
    }
    let mut root = None;
    for f in &files {
        tracing::info!(repo, file = %f, "fetching");
        let path = api_repo
            .get(f)
            .map_err(|e| hub_err(&format!("cannot fetch {f} of"), e))?;
        if f == marker {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::Weights(format!("{repo}@{revision}: {marker} not fetched")))
}

#[cfg(not(feature = "hub"))]
fn download_with(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
    _pick: fn(&[String], Option<&str>) -> Vec<String>,
    _marker: &str,
) -> Result<PathBuf> {
    Err(Error::Weights(format!(
        "{repo}@{revision} is not in the Hugging Face cache {} and this build has no Hub client \
         (cargo feature `hub`): download it with another tool or point --model at a local folder",
        opts.cache_dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        let tmp = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(tmp.to_str().unwrap()).unwrap(),
            ModelSource::Dir(tmp.clone())
        );
        assert_eq!(
            ModelSource::parse("Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers").unwrap(),
            ModelSource::Hub {
                repo: "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse("org/name@refs-pr-3").unwrap(),
            ModelSource::Hub {
                repo: "org/name".into(),
                revision: "refs-pr-3".into()
            }
        );
        for bad in [
            "no-slash",
            "a/b/c",
            "org/",
            "/abs/missing/dir",
            "org/name@",
            "../x/y",
        ] {
            let err = ModelSource::parse(bad).unwrap_err().to_string();
            assert!(err.contains("model") && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn component_files_of_a_gemma_and_a_dc_ae_repo() {
        let gemma: Vec<String> = [
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "sub/config.json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            needed_component_files(&gemma, None),
            [
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let dcae: Vec<String> = [
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bf16.safetensors",
            "model.pth",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            needed_component_files(&dcae, Some("bf16")),
            ["config.json", "diffusion_pytorch_model.bf16.safetensors"]
        );
        assert_eq!(
            needed_component_files(&dcae, Some("fp16")),
            ["config.json", "diffusion_pytorch_model.safetensors"]
        );
    }

    fn sana_listing() -> Vec<String> {
        [
            "README.md",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer.model",
            "tokenizer/tokenizer_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "transformer/diffusion_pytorch_model.bf16.safetensors",
            "transformer/diffusion_pytorch_model.int4.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.bf16.safetensors",
            "assets/sample.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn needed_files_pick_one_variant_per_model() {
        let bf16 = needed_files(&sana_listing(), Some("bf16"));
        assert_eq!(
            bf16,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors.index.json",
                "text_encoder/model-00001-of-00002.safetensors",
                "text_encoder/model-00002-of-00002.safetensors",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer.json",
                "tokenizer/tokenizer_config.json",
                "transformer/config.json",
                "transformer/diffusion_pytorch_model.bf16.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.bf16.safetensors",
            ]
        );
        let default = needed_files(&sana_listing(), None);
        assert!(default
            .contains(&"transformer/diffusion_pytorch_model.safetensors.index.json".to_string()));
        assert!(default.contains(
            &"transformer/diffusion_pytorch_model-00002-of-00002.safetensors".to_string()
        ));
        assert!(!default
            .iter()
            .any(|f| f.contains("bf16") || f.contains("int4") || f.contains("assets")));
        assert!(default.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
    }

    /// A fabricated cache: `models--org--name/refs/main` → hash → `snapshots/<hash>/`.
    fn fake_cache(tag: &str) -> (PathBuf, PathBuf) {
        let cache = std::env::temp_dir().join(format!("sana-hub-{tag}-{}", std::process::id()));
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.join("models--org--tiny");
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(snap.join("transformer")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), hash).unwrap();
        std::fs::write(
            snap.join("model_index.json"),
            r#"{"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}"#,
        )
        .unwrap();
        std::fs::write(snap.join("transformer/config.json"), "{}").unwrap();
        (cache, snap)
    }

    fn offline(cache: &Path) -> HubOptions {
        HubOptions {
            cache_dir: cache.to_path_buf(),
            offline: true,
            token: Some("secret".into()),
            variant: None,
            progress: false,
        }
    }

    #[test]
    fn offline_resolution_uses_the_cache_layout() {
        let (cache, snap) = fake_cache("resolve");
        let opts = offline(&cache);
        let main = ModelSource::parse("org/tiny").unwrap();
        assert_eq!(resolve(&main, &opts).unwrap(), snap);
        let by_hash =
            ModelSource::parse("org/tiny@0123456789abcdef0123456789abcdef01234567").unwrap();
        assert_eq!(resolve(&by_hash, &opts).unwrap(), snap);
        let err = resolve(&ModelSource::parse("org/other").unwrap(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("org/other"),
            "{err}"
        );
        let err = resolve(&ModelSource::parse("org/tiny@v2").unwrap(), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("org/tiny@v2"), "{err}");
        assert!(
            !format!("{opts:?}").contains("secret"),
            "the token is redacted in logs"
        );
        // The snapshot has a transformer config but no weights: not complete for an online run.
        assert!(!snapshot_complete(&snap, None));
    }

    #[test]
    fn lora_adapters_resolve_from_paths_and_the_hub_cache() {
        let (cache, snap) = fake_cache("lora");
        let opts = offline(&cache);
        // A repo without the LoRA file is not a LoRA repo, even when cached.
        let err = resolve_lora("org/tiny", &opts).unwrap_err().to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("org/tiny"),
            "{err}"
        );
        std::fs::write(snap.join(LORA_WEIGHT_NAME), b"x").unwrap();
        assert_eq!(
            resolve_lora("org/tiny", &opts).unwrap(),
            snap.join(LORA_WEIGHT_NAME)
        );
        // Local paths are taken as they are, file or folder.
        let file = snap.join(LORA_WEIGHT_NAME);
        let spec = file.display().to_string();
        assert_eq!(resolve_lora(&spec, &opts).unwrap(), file);
        let err = resolve_lora("not a/valid repo", &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora") && err.contains("org/name"), "{err}");
    }
}
