//! Original NVlabs Sana checkpoints: a `.pth` (`torch.save({"state_dict": …})`) under the key names of
//! the NVlabs code (github.com/NVlabs/Sana, `diffusion/model/nets/sana_multi_scale.py`), with the
//! training YAML that names the model.
//!
//! Nothing is converted on disk: [`NvlabsCheckpoint`] is a `VarBuilder` backend that serves the
//! diffusers names [`SanaTransformer2DModel::new`] asks for by reading the NVlabs tensor each maps to
//! (the map of diffusers' `scripts/convert_sana_to_diffusers.py`, `reference/sana-spec.md` §8). The
//! fused NVlabs projections are split on the fly: `attn.qkv` [3D, D] gives `attn1.to_q/to_k/to_v`,
//! `cross_attn.kv_linear` [2D, D] gives `attn2.to_k/to_v`. Tensors are read lazily, one at a time,
//! and every lookup is checked against the pickle's shape first, so a missing tensor or a wrong
//! shape fails while the model is being built, naming both keys and both shapes.
//!
//! The transformer config comes from the YAML ([`NvlabsConfig`]): `model.model` (e.g.
//! `SanaMS_1600M_P1_D20`) gives the width and cross-attention heads by model size (spec §1), the
//! patch size (`_P{p}_`) and the depth (`_D{n}`); `model.image_size`, `use_pe`, `pe_interpolation`,
//! `qk_norm`/`cross_norm`, `cfg_embed`, `cfg_embed_scale`, `mlp_ratio`, `vae.vae_latent_dim`,
//! `vae.vae_downsample_rate` and `text_encoder.caption_channels` the rest. Two keys that NVlabs
//! YAMLs do not have, `model.hidden_size` and `model.num_heads` (the cross-attention heads, as the
//! NVlabs constructor names them), override the size table, so a tiny test model can be described.
//! The width, depth, latent channels, patch size and caption width are then checked against the
//! checkpoint's own shapes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::transformer::{SanaTransformer2DModel, SanaTransformerConfig};
use crate::{Error, Result};

/// The linear-attention head dim of every NVlabs Sana model (`LiteLA` heads = width / 32).
const LINEAR_HEAD_DIM: usize = 32;

/// NVlabs tensors that the diffusers model has no place for: the learned null caption (training
/// only), the sin-cos table (recomputed) and the Sprint training head.
const DROPPED: &[&str] = &["y_embedder.y_embedding", "pos_embed", "logvar_linear."];

/// The parts of an NVlabs training YAML that shape the transformer (unknown keys are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NvlabsConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub vae: VaeSection,
    #[serde(default)]
    pub text_encoder: TextEncoderSection,
    #[serde(default)]
    pub scheduler: SchedulerSection,
}

/// `scheduler:` of the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerSection {
    /// The flow shift of the DPM-Solver sampler (3.0 for 512–2K and SANA-1.5, 6.0 for 4K).
    #[serde(default = "default_flow_shift")]
    pub flow_shift: f64,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            flow_shift: default_flow_shift(),
        }
    }
}

fn default_flow_shift() -> f64 {
    3.0
}

/// `model:` of the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelSection {
    /// E.g. `SanaMS_1600M_P1_D20`, `SanaSprint_600M_P1_D28`.
    pub model: String,
    pub image_size: usize,
    #[serde(default)]
    pub use_pe: bool,
    #[serde(default = "default_one")]
    pub pe_interpolation: f64,
    /// RMSNorm on the self-attention q and k.
    #[serde(default)]
    pub qk_norm: bool,
    /// RMSNorm on the cross-attention q and k.
    #[serde(default)]
    pub cross_norm: bool,
    /// Guidance embedder (Sprint).
    #[serde(default)]
    pub cfg_embed: bool,
    #[serde(default = "default_cfg_embed_scale")]
    pub cfg_embed_scale: f64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// `fp16` or `bf16`: the precision it was trained in (picks the GPU dtype).
    #[serde(default)]
    pub mixed_precision: Option<String>,
    /// Not an NVlabs key: overrides the width of the size table.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// Not an NVlabs key: overrides the cross-attention heads of the size table.
    #[serde(default)]
    pub num_heads: Option<usize>,
}

/// `vae:` of the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeSection {
    #[serde(default = "default_32")]
    pub vae_latent_dim: usize,
    #[serde(default = "default_32")]
    pub vae_downsample_rate: usize,
    /// The DC-AE repo, e.g. `mit-han-lab/dc-ae-f32c32-sana-1.0` (its `-diffusers` twin is loaded).
    #[serde(default)]
    pub vae_pretrained: Option<String>,
}

impl Default for VaeSection {
    fn default() -> Self {
        Self {
            vae_latent_dim: 32,
            vae_downsample_rate: 32,
            vae_pretrained: None,
        }
    }
}

/// `text_encoder:` of the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextEncoderSection {
    /// Gemma-2-2B's hidden size unless given.
    #[serde(default = "default_caption_channels")]
    pub caption_channels: usize,
    /// E.g. `gemma-2-2b-it` (NVlabs loads it from `Efficient-Large-Model/gemma-2-2b-it`).
    #[serde(default)]
    pub text_encoder_name: Option<String>,
}

impl Default for TextEncoderSection {
    fn default() -> Self {
        Self {
            caption_channels: default_caption_channels(),
            text_encoder_name: None,
        }
    }
}

fn default_one() -> f64 {
    1.0
}
fn default_cfg_embed_scale() -> f64 {
    0.1
}
fn default_mlp_ratio() -> f64 {
    2.5
}
fn default_32() -> usize {
    32
}
fn default_caption_channels() -> usize {
    2304
}

/// What a model name such as `SanaMS_1600M_P1_D20` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelName {
    width: usize,
    cross_heads: usize,
    patch: usize,
    depth: usize,
}

const FAMILIES: &[&str] = &["SanaMS", "SanaMS1.5", "SanaSprint"];

fn parse_model_name(name: &str) -> Result<ModelName> {
    let refuse = |reason: String| Error::Unsupported {
        field: "model.model",
        value: format!("{name:?}"),
        reason,
    };
    let expected = "expected <family>_<size>M_P<patch>_D<depth> with family SanaMS, SanaMS1.5 or \
                    SanaSprint and size 600, 1600 or 4800, e.g. SanaMS_1600M_P1_D20";
    let parts: Vec<&str> = name.split('_').collect();
    let [family, size, patch, depth] = parts[..] else {
        return Err(refuse(expected.to_string()));
    };
    if !FAMILIES.contains(&family) {
        return Err(refuse(format!("unknown family {family:?}; {expected}")));
    }
    // Width (= 32 × linear heads) and cross-attention heads by size, spec §1.
    let (width, cross_heads) = match size {
        "600M" => (1152, 16),
        "1600M" | "4800M" => (2240, 20),
        _ => return Err(refuse(format!("unknown size {size:?}; {expected}"))),
    };
    let number = |part: &str, prefix: char| {
        part.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| refuse(format!("cannot read {part:?}; {expected}")))
    };
    Ok(ModelName {
        width,
        cross_heads,
        patch: number(patch, 'P')?,
        depth: number(depth, 'D')?,
    })
}

impl NvlabsConfig {
    /// The Hub repo of the text encoder and tokenizer this model was trained with: a bare name
    /// such as `gemma-2-2b-it` is NVlabs' `Efficient-Large-Model/<name>`; default Gemma-2-2B-IT.
    pub fn text_encoder_repo(&self) -> String {
        match self.text_encoder.text_encoder_name.as_deref() {
            Some(name) if name.contains('/') => name.to_string(),
            Some(name) => format!("Efficient-Large-Model/{name}"),
            None => "Efficient-Large-Model/gemma-2-2b-it".to_string(),
        }
    }

    /// The diffusers-format DC-AE repo: `vae.vae_pretrained` with `-diffusers` appended where the
    /// YAML names the original (default: `mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers`).
    pub fn vae_repo(&self) -> String {
        let name = self
            .vae
            .vae_pretrained
            .as_deref()
            .unwrap_or("mit-han-lab/dc-ae-f32c32-sana-1.0");
        if name.ends_with("-diffusers") {
            name.to_string()
        } else {
            format!("{name}-diffusers")
        }
    }

    /// The sampler the NVlabs code uses for this model: SCM for Sprint (`cfg_embed`), else the
    /// flow DPM-Solver++ with the YAML's shift.
    pub fn scheduler_config(&self) -> Result<crate::scheduler::SchedulerConfig> {
        let json = if self.model.cfg_embed {
            r#"{"_class_name": "SCMScheduler", "sigma_data": 0.5, "prediction_type": "trigflow"}"#
                .to_string()
        } else {
            format!(
                r#"{{"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
                   "use_flow_sigmas": true, "flow_shift": {}, "algorithm_type": "dpmsolver++",
                   "solver_order": 2, "final_sigmas_type": "zero", "lower_order_final": true}}"#,
                self.scheduler.flow_shift
            )
        };
        Ok(crate::scheduler::SchedulerConfig::from_json(&json)?)
    }

    /// Parses the YAML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        serde_norway::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a YAML config file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The diffusers transformer config this YAML describes (not yet checked against weights).
    pub fn transformer_config(&self) -> Result<SanaTransformerConfig> {
        let m = &self.model;
        let name = parse_model_name(&m.model)?;
        let width = m.hidden_size.unwrap_or(name.width);
        let cross_heads = m.num_heads.unwrap_or(name.cross_heads);
        if width == 0 || !width.is_multiple_of(LINEAR_HEAD_DIM) {
            return Err(Error::Unsupported {
                field: "model.hidden_size",
                value: width.to_string(),
                reason: format!("the width must be a positive multiple of the linear-attention head dim {LINEAR_HEAD_DIM}"),
            });
        }
        if cross_heads == 0 || !width.is_multiple_of(cross_heads) {
            return Err(Error::Unsupported {
                field: "model.num_heads",
                value: cross_heads.to_string(),
                reason: format!("the cross-attention heads must divide the width {width}"),
            });
        }
        if m.qk_norm != m.cross_norm {
            return Err(Error::Unsupported {
                field: "model.cross_norm",
                value: m.cross_norm.to_string(),
                reason: format!(
                    "must equal model.qk_norm ({}): one switch normalizes both attentions here, as in diffusers",
                    m.qk_norm
                ),
            });
        }
        let rate = self.vae.vae_downsample_rate;
        if rate == 0 || !m.image_size.is_multiple_of(rate * name.patch) {
            return Err(Error::Unsupported {
                field: "model.image_size",
                value: m.image_size.to_string(),
                reason: format!(
                    "must be a multiple of vae.vae_downsample_rate ({rate}) × the patch size ({})",
                    name.patch
                ),
            });
        }
        let cfg = SanaTransformerConfig {
            in_channels: self.vae.vae_latent_dim,
            out_channels: Some(self.vae.vae_latent_dim),
            num_attention_heads: width / LINEAR_HEAD_DIM,
            attention_head_dim: LINEAR_HEAD_DIM,
            num_layers: name.depth,
            num_cross_attention_heads: Some(cross_heads),
            cross_attention_head_dim: Some(width / cross_heads),
            cross_attention_dim: Some(width),
            caption_channels: self.text_encoder.caption_channels,
            mlp_ratio: m.mlp_ratio,
            dropout: 0.0,
            attention_bias: false,
            sample_size: m.image_size / rate,
            patch_size: name.patch,
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: m.use_pe.then_some(m.pe_interpolation),
            guidance_embeds: m.cfg_embed,
            guidance_embeds_scale: m.cfg_embed_scale,
            qk_norm: m.qk_norm.then(|| "rms_norm_across_heads".to_string()),
            timestep_scale: 1.0,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Which part of an NVlabs tensor a diffusers tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Whole,
    /// Chunk `index` of `of` equal chunks along dim 0 (the fused q/k/v and k/v projections).
    Chunk {
        index: usize,
        of: usize,
    },
}

/// Global diffusers prefixes → NVlabs prefixes (spec §8).
const GLOBAL: &[(&str, &str)] = &[
    ("patch_embed.proj.", "x_embedder.proj."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    (
        "time_embed.emb.timestep_embedder.linear_1.",
        "t_embedder.mlp.0.",
    ),
    (
        "time_embed.emb.timestep_embedder.linear_2.",
        "t_embedder.mlp.2.",
    ),
    (
        "time_embed.timestep_embedder.linear_1.",
        "t_embedder.mlp.0.",
    ),
    (
        "time_embed.timestep_embedder.linear_2.",
        "t_embedder.mlp.2.",
    ),
    (
        "time_embed.guidance_embedder.linear_1.",
        "cfg_embedder.mlp.0.",
    ),
    (
        "time_embed.guidance_embedder.linear_2.",
        "cfg_embedder.mlp.2.",
    ),
    ("time_embed.linear.", "t_block.1."),
    ("caption_norm.", "attention_y_norm."),
    ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
];

/// Per-block diffusers prefixes (after `transformer_blocks.{i}.`) → NVlabs (after `blocks.{i}.`).
const BLOCK: &[(&str, &str, Part)] = &[
    ("scale_shift_table", "scale_shift_table", Part::Whole),
    ("attn1.to_q.", "attn.qkv.", Part::Chunk { index: 0, of: 3 }),
    ("attn1.to_k.", "attn.qkv.", Part::Chunk { index: 1, of: 3 }),
    ("attn1.to_v.", "attn.qkv.", Part::Chunk { index: 2, of: 3 }),
    ("attn1.norm_q.", "attn.q_norm.", Part::Whole),
    ("attn1.norm_k.", "attn.k_norm.", Part::Whole),
    ("attn1.to_out.0.", "attn.proj.", Part::Whole),
    ("ff.conv_inverted.", "mlp.inverted_conv.conv.", Part::Whole),
    ("ff.conv_depth.", "mlp.depth_conv.conv.", Part::Whole),
    ("ff.conv_point.", "mlp.point_conv.conv.", Part::Whole),
    ("attn2.to_q.", "cross_attn.q_linear.", Part::Whole),
    (
        "attn2.to_k.",
        "cross_attn.kv_linear.",
        Part::Chunk { index: 0, of: 2 },
    ),
    (
        "attn2.to_v.",
        "cross_attn.kv_linear.",
        Part::Chunk { index: 1, of: 2 },
    ),
    ("attn2.norm_q.", "cross_attn.q_norm.", Part::Whole),
    ("attn2.norm_k.", "cross_attn.k_norm.", Part::Whole),
    ("attn2.to_out.0.", "cross_attn.proj.", Part::Whole),
];

/// The NVlabs tensor (and part of it) that holds the diffusers tensor `name`.
fn nvlabs_key(name: &str) -> Option<(String, Part)> {
    if let Some(rest) = name.strip_prefix("transformer_blocks.") {
        let (i, rest) = rest.split_once('.')?;
        i.parse::<usize>().ok()?;
        return BLOCK.iter().find_map(|&(d, n, part)| {
            let tail = rest.strip_prefix(d)?;
            Some((format!("blocks.{i}.{n}{tail}"), part))
        });
    }
    GLOBAL.iter().find_map(|&(d, n)| {
        let tail = name.strip_prefix(d)?;
        Some((format!("{n}{tail}"), Part::Whole))
    })
}

struct Inner {
    pth: PthTensors,
    path: PathBuf,
    used: Mutex<BTreeSet<String>>,
}

/// An NVlabs `.pth` checkpoint seen under diffusers key names (see the module docs).
///
/// Cloning is cheap (shared).
#[derive(Clone)]
pub struct NvlabsCheckpoint(Arc<Inner>);

impl NvlabsCheckpoint {
    /// Reads the tensor index of `path`'s `state_dict` (the data stays on disk until asked for).
    pub fn open(path: &Path) -> Result<Self> {
        let pth = PthTensors::new(path, Some("state_dict")).map_err(|e| {
            Error::Weights(format!(
                "cannot read the state_dict of NVlabs checkpoint {}: {e}",
                path.display()
            ))
        })?;
        Ok(Self(Arc::new(Inner {
            pth,
            path: path.to_path_buf(),
            used: Mutex::new(BTreeSet::new()),
        })))
    }

    /// A `VarBuilder` over diffusers names that converts every tensor to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every NVlabs tensor name in the checkpoint, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.0.pth.tensor_infos().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// NVlabs names that no module read, other than the ones diffusers drops too, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self
            .0
            .used
            .lock()
            .expect("weights mutex poisoned; this is a bug");
        self.keys()
            .into_iter()
            .filter(|k| !used.contains(k) && !DROPPED.iter().any(|d| k.starts_with(d)))
            .collect()
    }

    /// Shape of the NVlabs tensor `name`, if present.
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.0.pth.tensor_infos().get(name).map(|t| t.layout.dims())
    }

    /// Checks what the checkpoint's shapes say against `cfg` (derived from the YAML), so that a
    /// wrong model name or override fails with the YAML key to fix rather than a tensor name.
    pub fn check_config(&self, cfg: &SanaTransformerConfig) -> Result<()> {
        let file = self.0.path.display();
        let key = "x_embedder.proj.weight";
        let Some(&[width, channels, p, _]) = self.shape(key) else {
            return Err(Error::Weights(format!(
                "NVlabs checkpoint {file}: no 4-D `{key}` (is this a Sana transformer checkpoint?)"
            )));
        };
        let mismatch = |field: &'static str, yaml: usize, ckpt: usize, seen: &str| {
            Err(Error::Unsupported {
                field,
                value: yaml.to_string(),
                reason: format!("the checkpoint {file} has {ckpt} ({seen})"),
            })
        };
        if width != cfg.inner_dim() {
            return mismatch(
                "model.model (width)",
                cfg.inner_dim(),
                width,
                "dim 0 of x_embedder.proj.weight; set model.hidden_size to override",
            );
        }
        if channels != cfg.in_channels {
            return mismatch(
                "vae.vae_latent_dim",
                cfg.in_channels,
                channels,
                "dim 1 of x_embedder.proj.weight",
            );
        }
        if p != cfg.patch_size {
            return mismatch(
                "model.model (patch size _P<p>_)",
                cfg.patch_size,
                p,
                "dim 2 of x_embedder.proj.weight",
            );
        }
        if let Some(&[_, caption]) = self.shape("y_embedder.y_proj.fc1.weight") {
            if caption != cfg.caption_channels {
                return mismatch(
                    "text_encoder.caption_channels",
                    cfg.caption_channels,
                    caption,
                    "dim 1 of y_embedder.y_proj.fc1.weight",
                );
            }
        }
        let blocks: BTreeSet<usize> = self
            .0
            .pth
            .tensor_infos()
            .keys()
            .filter_map(|k| k.strip_prefix("blocks.")?.split_once('.')?.0.parse().ok())
            .collect();
        if blocks.len() != cfg.num_layers || blocks.last().is_some_and(|&i| i + 1 != blocks.len()) {
            return mismatch(
                "model.model (depth _D<n>)",
                cfg.num_layers,
                blocks.len(),
                &match blocks.last() {
                    Some(last) => format!("blocks.<i> tensors with i up to {last}"),
                    None => "no blocks.<i> tensors".to_string(),
                },
            );
        }
        Ok(())
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((src, part)) = nvlabs_key(name) else {
            candle_core::bail!("no NVlabs tensor maps to the diffusers key `{name}`")
        };
        let Some(t) = self.0.pth.get(&src)? else {
            candle_core::bail!(
                "NVlabs checkpoint {}: missing tensor `{src}` (for `{name}`)",
                self.0.path.display()
            )
        };
        let t = match part {
            Part::Whole => t,
            Part::Chunk { index, of } => {
                let size = t.dim(0)? / of;
                t.narrow(0, index * size, size)?.contiguous()?
            }
        };
        let t = t.to_device(dev)?.to_dtype(dtype)?;
        self.0
            .used
            .lock()
            .expect("weights mutex poisoned; this is a bug")
            .insert(src);
        Ok(t)
    }
}

impl SimpleBackend for NvlabsCheckpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((src, part)) = nvlabs_key(name) else {
            candle_core::bail!("no NVlabs tensor maps to the diffusers key `{name}`")
        };
        let mut want = s.dims().to_vec();
        if let (Part::Chunk { of, .. }, Some(d0)) = (part, want.first_mut()) {
            *d0 *= of;
        }
        match self.shape(&src) {
            None => candle_core::bail!(
                "NVlabs checkpoint {}: missing tensor `{src}` (for `{name}`; the model expects shape {want:?})",
                self.0.path.display()
            ),
            Some(got) if got != want.as_slice() => candle_core::bail!(
                "NVlabs checkpoint {}: tensor `{src}` has shape {got:?} but the model expects {want:?} \
                 (for `{name}` of shape {:?})",
                self.0.path.display(),
                s.dims()
            ),
            Some(_) => self.load(name, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        nvlabs_key(name).is_some_and(|(src, _)| self.shape(&src).is_some())
    }
}

/// Loads the transformer of an NVlabs checkpoint: the config from `yaml`, checked against the
/// checkpoint's shapes, and the weights from `pth`'s `state_dict` in `dtype` on `device`.
///
/// The config is [`SanaTransformer2DModel::config`] of the result.
pub fn load_transformer(
    pth: &Path,
    yaml: &Path,
    dtype: DType,
    device: &Device,
) -> Result<SanaTransformer2DModel> {
    let cfg = NvlabsConfig::read(yaml)?.transformer_config()?;
    let ckpt = NvlabsCheckpoint::open(pth)?;
    ckpt.check_config(&cfg)?;
    let model = SanaTransformer2DModel::new(&cfg, ckpt.var_builder(dtype, device))?;
    let unused = ckpt.unused_keys();
    if !unused.is_empty() {
        tracing::warn!(
            checkpoint = %pth.display(),
            count = unused.len(),
            first = %unused.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            "NVlabs checkpoint tensors not used by the model"
        );
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projections_map_to_their_chunk() {
        let chunk = |index, of| Part::Chunk { index, of };
        let cases = [
            (
                "transformer_blocks.3.attn1.to_q.weight",
                "blocks.3.attn.qkv.weight",
                chunk(0, 3),
            ),
            (
                "transformer_blocks.3.attn1.to_v.bias",
                "blocks.3.attn.qkv.bias",
                chunk(2, 3),
            ),
            (
                "transformer_blocks.12.attn2.to_k.bias",
                "blocks.12.cross_attn.kv_linear.bias",
                chunk(0, 2),
            ),
            (
                "transformer_blocks.0.attn2.to_v.weight",
                "blocks.0.cross_attn.kv_linear.weight",
                chunk(1, 2),
            ),
            (
                "transformer_blocks.0.ff.conv_point.weight",
                "blocks.0.mlp.point_conv.conv.weight",
                Part::Whole,
            ),
            (
                "transformer_blocks.1.scale_shift_table",
                "blocks.1.scale_shift_table",
                Part::Whole,
            ),
            (
                "scale_shift_table",
                "final_layer.scale_shift_table",
                Part::Whole,
            ),
            (
                "time_embed.emb.timestep_embedder.linear_2.bias",
                "t_embedder.mlp.2.bias",
                Part::Whole,
            ),
            (
                "time_embed.guidance_embedder.linear_1.weight",
                "cfg_embedder.mlp.0.weight",
                Part::Whole,
            ),
        ];
        for (diffusers, nvlabs, part) in cases {
            assert_eq!(
                nvlabs_key(diffusers),
                Some((nvlabs.to_string(), part)),
                "{diffusers}"
            );
        }
        assert_eq!(nvlabs_key("transformer_blocks.x.attn1.to_q.weight"), None);
        assert_eq!(nvlabs_key("pos_embed"), None);
    }

    #[test]
    fn model_names() {
        let n = parse_model_name("SanaMS1.5_4800M_P1_D60").unwrap();
        assert_eq!(
            n,
            ModelName {
                width: 2240,
                cross_heads: 20,
                patch: 1,
                depth: 60
            }
        );
        assert_eq!(parse_model_name("SanaSprint_600M_P2_D28").unwrap().patch, 2);
        for bad in [
            "SanaMS_700M_P1_D28",
            "PixArtMS_600M_P1_D28",
            "SanaMS_600M_P1",
            "SanaMS_600M_P1_D0",
        ] {
            let err = parse_model_name(bad).unwrap_err().to_string();
            assert!(
                err.contains("model.model") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }
}
