//! The NVlabs training/inference YAML (`configs/sana_config/...`), read as NVlabs' own code reads
//! it (`diffusion/utils/config.py`: the dataclass defaults; `app/sana_pipeline.py`: what
//! inference does with each field). Every field that changes the computation is honoured or
//! refused with its name and value; the README's table lists them all. Fields that only matter for
//! training (`data`, `train`, dropout, `logvar`, posterior sampling, …) are ignored.

use std::path::Path;

use serde::Deserialize;

use crate::transformer::SanaTransformerConfig;
use crate::{Error, Result};

/// The parts of an NVlabs YAML that shape inference (other sections and keys are ignored).
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

/// `model:` (NVlabs `ModelConfig`; defaults as there).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelSection {
    /// A registered NVlabs model name (`SanaMS_1600M_P1_D20`, `SanaMSCM_600M_P1_D28`, …, see
    /// [`REGISTRY`]), or any name together with `hidden_size`, `depth`, `num_heads` and
    /// `patch_size`.
    pub model: String,
    pub image_size: usize,
    #[serde(default)]
    pub use_pe: bool,
    #[serde(default = "one")]
    pub pe_interpolation: f64,
    /// Only `sincos` exists for image models.
    #[serde(default = "sincos")]
    pub pos_embed_type: String,
    /// RMSNorm on the self-attention q and k.
    #[serde(default)]
    pub qk_norm: bool,
    /// RMSNorm on the cross-attention q and k.
    #[serde(default)]
    pub cross_norm: bool,
    /// Self-attention heads are `width / linear_head_dim` (LiteLA).
    #[serde(default = "thirty_two")]
    pub linear_head_dim: usize,
    #[serde(default = "linear")]
    pub attn_type: String,
    #[serde(default = "glumbconv")]
    pub ffn_type: String,
    #[serde(default = "default_mlp_acts")]
    pub mlp_acts: Vec<Option<String>>,
    #[serde(default = "two_and_a_half")]
    pub mlp_ratio: f64,
    /// Size-conditioning embedders (not in any released model).
    #[serde(default)]
    pub micro_condition: bool,
    /// Guidance embedder (SANA-Sprint).
    #[serde(default)]
    pub cfg_embed: bool,
    #[serde(default = "one")]
    pub cfg_embed_scale: f64,
    /// `fp16`, `bf16` or `fp32`: the precision it was trained in (picks the GPU dtype).
    #[serde(default)]
    pub mixed_precision: Option<String>,
    /// Blocks where perturbed-attention guidance applies (0-based).
    #[serde(default)]
    pub pag_applied_layers: Option<Vec<usize>>,
    /// Not NVlabs keys: the geometry of a model whose name is not registered.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub depth: Option<usize>,
    /// The cross-attention heads (NVlabs' constructor calls them `num_heads`).
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default)]
    pub patch_size: Option<usize>,
}

/// `vae:` (NVlabs `AEConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeSection {
    #[serde(default = "dc_ae")]
    pub vae_type: String,
    /// The DC-AE repo, e.g. `mit-han-lab/dc-ae-f32c32-sana-1.0` (its `-diffusers` twin is loaded).
    #[serde(default)]
    pub vae_pretrained: Option<String>,
    #[serde(default = "thirty_two")]
    pub vae_latent_dim: usize,
    #[serde(default = "thirty_two")]
    pub vae_downsample_rate: usize,
    /// `float32`, `bfloat16`, `float16`: the DC-AE's precision on a GPU.
    #[serde(default)]
    pub weight_dtype: Option<String>,
}

/// `text_encoder:` (NVlabs `TextEncoderConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextEncoderSection {
    #[serde(default = "gemma")]
    pub text_encoder_name: String,
    #[serde(default = "caption_channels")]
    pub caption_channels: usize,
    /// The RMSNorm on the projected caption (`attention_y_norm`); NVlabs' default is on.
    #[serde(default = "yes")]
    pub y_norm: bool,
    /// Tokens kept per prompt (diffusers' `max_sequence_length`).
    #[serde(default = "three_hundred")]
    pub model_max_length: usize,
    /// The complex human instruction, one line per entry, joined with `\n` in front of every
    /// prompt; none (NVlabs' default) means plain prompts.
    #[serde(default)]
    pub chi_prompt: Vec<String>,
}

/// `scheduler:` (NVlabs `SchedulerConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerSection {
    /// NVlabs' default is 1.0; the released YAMLs set 3.0, 4.0 or 6.0.
    #[serde(default = "one")]
    pub flow_shift: f64,
    /// `flow_dpm-solver` (default), `flow_euler`, or `scm` (SANA-Sprint).
    #[serde(default = "flow_dpm_solver")]
    pub vis_sampler: String,
    /// SANA-Sprint's σ_d.
    #[serde(default = "one")]
    pub sigma_data: f64,
    /// SANA-Sprint's timestep normalisation (1000); plain models 1.
    #[serde(default = "one")]
    pub timestep_norm_scale_factor: f64,
    #[serde(default = "yes")]
    pub predict_flow_v: bool,
    #[serde(default)]
    pub pred_sigma: bool,
    #[serde(default = "linear_flow")]
    pub noise_schedule: String,
}

fn one() -> f64 {
    1.0
}
fn two_and_a_half() -> f64 {
    2.5
}
fn thirty_two() -> usize {
    32
}
fn three_hundred() -> usize {
    300
}
fn caption_channels() -> usize {
    2304
}
fn yes() -> bool {
    true
}
fn sincos() -> String {
    "sincos".into()
}
fn linear() -> String {
    "linear".into()
}
fn glumbconv() -> String {
    "glumbconv".into()
}
fn dc_ae() -> String {
    "dc-ae".into()
}
fn gemma() -> String {
    "gemma-2-2b-it".into()
}
fn flow_dpm_solver() -> String {
    "flow_dpm-solver".into()
}
fn linear_flow() -> String {
    "linear_flow".into()
}
fn default_mlp_acts() -> Vec<Option<String>> {
    vec![Some("silu".into()), Some("silu".into()), None]
}

impl Default for VaeSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("every field has a default; this is a bug")
    }
}

impl Default for TextEncoderSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("every field has a default; this is a bug")
    }
}

impl Default for SchedulerSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("every field has a default; this is a bug")
    }
}

/// The geometry of a model: width, depth, cross-attention heads and patch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub width: usize,
    pub depth: usize,
    pub cross_heads: usize,
    pub patch: usize,
}

/// The registered NVlabs model names (`sana_multi_scale.py`, `sana_multi_scale_cm.py`) and
/// their geometry. `SanaMS` alone is the class with its defaults. `SanaMSCM_*` are SANA-Sprint.
pub const REGISTRY: &[(&str, Geometry)] = &[
    ("SanaMS", g(1152, 28, 16, 2)),
    ("SanaMS_600M_P1_D28", g(1152, 28, 16, 1)),
    ("SanaMS_600M_P2_D28", g(1152, 28, 16, 2)),
    ("SanaMS_600M_P4_D28", g(1152, 28, 16, 4)),
    ("SanaMS_1600M_P1_D20", g(2240, 20, 20, 1)),
    ("SanaMS_1600M_P2_D20", g(2240, 20, 20, 2)),
    ("SanaMS_2400M_P1_D30", g(2240, 30, 20, 1)),
    ("SanaMS_3200M_P1_D40", g(2240, 40, 20, 1)),
    ("SanaMS_4800M_P1_D60", g(2240, 60, 20, 1)),
    ("SanaMSCM_600M_P1_D28", g(1152, 28, 16, 1)),
    ("SanaMSCM_1600M_P1_D20", g(2240, 20, 20, 1)),
    ("SanaMSCM_2400M_P1_D30", g(2240, 30, 20, 1)),
];

const fn g(width: usize, depth: usize, cross_heads: usize, patch: usize) -> Geometry {
    Geometry {
        width,
        depth,
        cross_heads,
        patch,
    }
}

fn refuse(field: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl ModelSection {
    /// The geometry: from [`REGISTRY`] for a registered name (explicit fields must then agree
    /// with it), else from `hidden_size`, `depth`, `num_heads` and `patch_size`, all required.
    pub fn geometry(&self) -> Result<Geometry> {
        let explicit = [
            ("model.hidden_size", self.hidden_size),
            ("model.depth", self.depth),
            ("model.num_heads", self.num_heads),
            ("model.patch_size", self.patch_size),
        ];
        if self.model.starts_with("SanaMSLinearFFN") {
            return Err(refuse(
                "model.model",
                &self.model,
                "the SanaMSLinearFFN models (a linear FFN instead of GLUMBConv) have no diffusers \
                 counterpart and are not served",
            ));
        }
        match REGISTRY.iter().find(|(name, _)| *name == self.model) {
            Some(&(_, g)) => {
                let table = [g.width, g.depth, g.cross_heads, g.patch];
                for ((field, value), want) in explicit.iter().zip(table) {
                    if let Some(v) = value.filter(|&v| v != want) {
                        return Err(refuse(
                            field,
                            v,
                            format!(
                                "{} is registered with {want}; drop the field or rename the model",
                                self.model
                            ),
                        ));
                    }
                }
                Ok(g)
            }
            None => {
                let missing: Vec<&str> = explicit
                    .iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(f, _)| *f)
                    .collect();
                if !missing.is_empty() {
                    let known: Vec<&str> = REGISTRY.iter().map(|(n, _)| *n).collect();
                    return Err(refuse(
                        "model.model",
                        format!("{:?}", self.model),
                        format!(
                            "not a registered NVlabs model ({}); a model of another name needs its \
                             geometry in the YAML, and {} missing",
                            known.join(", "),
                            missing.join(", ") + if missing.len() == 1 { " is" } else { " are" }
                        ),
                    ));
                }
                let [w, d, h, p] = explicit.map(|(_, v)| v.unwrap_or(0));
                for (field, v) in explicit {
                    if v == Some(0) {
                        return Err(refuse(field, 0, "must be positive"));
                    }
                }
                Ok(g(w, d, h, p))
            }
        }
    }

    /// Whether this is a SANA-Sprint (consistency) model.
    pub fn is_sprint(&self) -> bool {
        self.cfg_embed
    }
}

impl NvlabsConfig {
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

    /// The Hub repo of the text encoder and tokenizer: a bare name such as `gemma-2-2b-it` is
    /// NVlabs' `Efficient-Large-Model/<name>`.
    pub fn text_encoder_repo(&self) -> String {
        let name = &self.text_encoder.text_encoder_name;
        if name.contains('/') {
            name.clone()
        } else {
            format!("Efficient-Large-Model/{name}")
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

    /// The instruction NVlabs' inference puts in front of every prompt (`None`: plain prompts).
    pub fn instruction(&self) -> Option<Vec<String>> {
        let lines = &self.text_encoder.chi_prompt;
        (!lines.is_empty()).then(|| lines.clone())
    }

    /// The sampler NVlabs' inference uses: `scheduler.vis_sampler` with the YAML's shift (and σ_d
    /// for SCM), and its step count (`scripts/inference.py`: 20 for flow DPM-Solver, 28 for flow
    /// Euler; SANA-Sprint's pipeline 2).
    pub fn scheduler_config(&self) -> Result<(crate::scheduler::SchedulerConfig, usize)> {
        let s = &self.scheduler;
        let sprint = self.model.is_sprint();
        let (json, steps) = match (s.vis_sampler.as_str(), sprint) {
            ("scm", true) => (
                format!(
                    r#"{{"_class_name": "SCMScheduler", "sigma_data": {}, "prediction_type": "trigflow"}}"#,
                    s.sigma_data
                ),
                2,
            ),
            ("flow_dpm-solver", false) => (
                format!(
                    r#"{{"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
                       "use_flow_sigmas": true, "flow_shift": {}, "algorithm_type": "dpmsolver++",
                       "solver_order": 2, "final_sigmas_type": "zero", "lower_order_final": true}}"#,
                    s.flow_shift
                ),
                20,
            ),
            ("flow_euler", false) => (
                format!(
                    r#"{{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": {}}}"#,
                    s.flow_shift
                ),
                28,
            ),
            (other, true) => {
                return Err(refuse(
                    "scheduler.vis_sampler",
                    other,
                    "a SANA-Sprint model (model.cfg_embed) samples with `scm`",
                ))
            }
            (other, false) => {
                return Err(refuse(
                    "scheduler.vis_sampler",
                    other,
                    "served: flow_dpm-solver, flow_euler (and scm for SANA-Sprint models)",
                ))
            }
        };
        Ok((crate::scheduler::SchedulerConfig::from_json(&json)?, steps))
    }

    /// Refuses every computation-changing value this port does not reproduce.
    fn check_supported(&self) -> Result<()> {
        let m = &self.model;
        let s = &self.scheduler;
        let check = |ok: bool, field: &'static str, value: String, reason: &str| {
            if ok {
                Ok(())
            } else {
                Err(refuse(field, value, reason))
            }
        };
        check(
            m.attn_type == "linear",
            "model.attn_type",
            m.attn_type.clone(),
            "Sana's self-attention is `linear` (LiteLA)",
        )?;
        check(
            m.ffn_type == "glumbconv",
            "model.ffn_type",
            m.ffn_type.clone(),
            "Sana's FFN is `glumbconv`",
        )?;
        check(
            m.mlp_acts == default_mlp_acts(),
            "model.mlp_acts",
            format!("{:?}", m.mlp_acts),
            "GLUMBConv's activations are [silu, silu, null]",
        )?;
        check(
            m.pos_embed_type == "sincos",
            "model.pos_embed_type",
            m.pos_embed_type.clone(),
            "image models use `sincos`",
        )?;
        check(
            !m.micro_condition,
            "model.micro_condition",
            "true".into(),
            "size conditioning is not served",
        )?;
        check(
            m.qk_norm == m.cross_norm,
            "model.cross_norm",
            m.cross_norm.to_string(),
            "must equal model.qk_norm: one switch normalizes both attentions here, as in diffusers",
        )?;
        check(
            s.predict_flow_v,
            "scheduler.predict_flow_v",
            "false".into(),
            "the models predict the flow velocity",
        )?;
        check(
            !s.pred_sigma,
            "scheduler.pred_sigma",
            "true".into(),
            "learned-sigma outputs are not served",
        )?;
        check(
            s.noise_schedule == "linear_flow",
            "scheduler.noise_schedule",
            s.noise_schedule.clone(),
            "Sana trains with `linear_flow`",
        )?;
        let norm = if m.is_sprint() { 1000.0 } else { 1.0 };
        check(
            s.timestep_norm_scale_factor == norm,
            "scheduler.timestep_norm_scale_factor",
            s.timestep_norm_scale_factor.to_string(),
            if m.is_sprint() {
                "SANA-Sprint models normalise their timesteps by 1000"
            } else {
                "plain Sana models take integer timesteps (1)"
            },
        )?;
        check(
            matches!(self.vae.vae_type.as_str(), "dc-ae" | "AutoencoderDC"),
            "vae.vae_type",
            self.vae.vae_type.clone(),
            "the DC-AE (`dc-ae` or `AutoencoderDC`) is the autoencoder served",
        )?;
        check(
            self.text_encoder.model_max_length > 0,
            "text_encoder.model_max_length",
            "0".into(),
            "must be positive",
        )?;
        Ok(())
    }

    /// The diffusers transformer config this YAML describes (not yet checked against weights).
    pub fn transformer_config(&self) -> Result<SanaTransformerConfig> {
        self.check_supported()?;
        let m = &self.model;
        let geo = m.geometry()?;
        let hd = m.linear_head_dim;
        if hd == 0 || !geo.width.is_multiple_of(hd) {
            return Err(refuse(
                "model.linear_head_dim",
                hd,
                format!(
                    "must divide the width {} (self-attention heads = width / head dim)",
                    geo.width
                ),
            ));
        }
        if !geo.width.is_multiple_of(geo.cross_heads) {
            return Err(refuse(
                "model.num_heads",
                geo.cross_heads,
                format!(
                    "the cross-attention heads must divide the width {}",
                    geo.width
                ),
            ));
        }
        let rate = self.vae.vae_downsample_rate;
        if rate == 0 || !m.image_size.is_multiple_of(rate * geo.patch) {
            return Err(refuse(
                "model.image_size",
                m.image_size,
                format!(
                    "must be a multiple of vae.vae_downsample_rate ({rate}) × the patch size ({})",
                    geo.patch
                ),
            ));
        }
        let cfg = SanaTransformerConfig {
            in_channels: self.vae.vae_latent_dim,
            out_channels: Some(self.vae.vae_latent_dim),
            num_attention_heads: geo.width / hd,
            attention_head_dim: hd,
            num_layers: geo.depth,
            num_cross_attention_heads: Some(geo.cross_heads),
            cross_attention_head_dim: Some(geo.width / geo.cross_heads),
            cross_attention_dim: Some(geo.width),
            caption_channels: self.text_encoder.caption_channels,
            mlp_ratio: m.mlp_ratio,
            dropout: 0.0,
            attention_bias: false,
            sample_size: m.image_size / rate,
            patch_size: geo.patch,
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: m.use_pe.then_some(m.pe_interpolation),
            guidance_embeds: m.cfg_embed,
            // Only read with a guidance embedder; diffusers' default otherwise.
            guidance_embeds_scale: if m.cfg_embed { m.cfg_embed_scale } else { 0.1 },
            qk_norm: m.qk_norm.then(|| "rms_norm_across_heads".to_string()),
            timestep_scale: 1.0,
            caption_norm: self.text_encoder.y_norm,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
