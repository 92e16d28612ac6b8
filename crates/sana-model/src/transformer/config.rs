//! `SanaTransformerConfig`: the keys of a diffusers `transformer/config.json`, their defaults,
//! validation and the parameter count.

use serde::Deserialize;

use crate::{Error, Result};

pub(super) fn default_in_channels() -> usize {
    32
}
pub(super) fn default_heads() -> usize {
    70
}
pub(super) fn default_head_dim() -> usize {
    32
}
pub(super) fn default_layers() -> usize {
    20
}
pub(super) fn default_cross_heads() -> Option<usize> {
    Some(20)
}
pub(super) fn default_cross_head_dim() -> Option<usize> {
    Some(112)
}
pub(super) fn default_cross_dim() -> Option<usize> {
    Some(2240)
}
pub(super) fn default_caption_channels() -> usize {
    2304
}
pub(super) fn default_mlp_ratio() -> f64 {
    2.5
}
pub(super) fn default_sample_size() -> usize {
    32
}
pub(super) fn default_patch_size() -> usize {
    1
}
pub(super) fn default_norm_eps() -> f64 {
    1e-6
}
pub(super) fn default_guidance_scale() -> f64 {
    0.1
}
pub(super) fn default_one() -> f64 {
    1.0
}

/// `transformer/config.json`. Field names are the diffusers keys; defaults are diffusers'
/// constructor defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SanaTransformerConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "out_channels_default")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_cross_heads")]
    pub num_cross_attention_heads: Option<usize>,
    #[serde(default = "default_cross_head_dim")]
    pub cross_attention_head_dim: Option<usize>,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_caption_channels")]
    pub caption_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// `None` (or absent) ⇒ no position embedding; a number ⇒ 2-D sin-cos embedding.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Not used inside the model: the Sprint pipeline multiplies the guidance by it.
    #[serde(default = "default_guidance_scale")]
    pub guidance_embeds_scale: f64,
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// Not used inside the model: `SanaPipeline` multiplies timesteps by it.
    #[serde(default = "default_one")]
    pub timestep_scale: f64,
    /// Not a diffusers key (diffusers always has it): the RMSNorm on the projected caption
    /// (`caption_norm`, NVlabs' `attention_y_norm`). NVlabs models trained with
    /// `text_encoder.y_norm: false` have none.
    #[serde(skip, default = "default_true")]
    pub caption_norm: bool,
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn out_channels_default() -> Option<usize> {
    Some(32)
}

impl SanaTransformerConfig {
    /// Inner width D = heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels or in_channels`, as diffusers).
    pub fn out_channels(&self) -> usize {
        match self.out_channels {
            Some(0) | None => self.in_channels,
            Some(c) => c,
        }
    }

    /// Mix-FFN hidden width, `int(mlp_ratio · D)` as Python truncates it.
    pub fn ffn_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }

    /// Cross-attention heads and head width (validated to be set by `validate`).
    pub fn cross(&self) -> (usize, usize) {
        (
            self.num_cross_attention_heads.unwrap_or(0),
            self.cross_attention_head_dim.unwrap_or(0),
        )
    }

    /// Refuses configs this implementation cannot serve, naming the field.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |field: &'static str, value: String, reason: &str| {
            Err(Error::Unsupported {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        let d = self.inner_dim();
        if d == 0 {
            return unsupported(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "the model width num_attention_heads × attention_head_dim must be positive",
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(other) => {
                return unsupported(
                    "qk_norm",
                    format!("{other:?}"),
                    "only null and \"rms_norm_across_heads\" are supported",
                )
            }
        }
        match self.cross_attention_dim {
            Some(c) if c == d => {}
            other => {
                return unsupported(
                    "cross_attention_dim",
                    format!("{other:?}"),
                    &format!("must equal the model width {d}: captions are projected to it"),
                )
            }
        }
        match (
            self.num_cross_attention_heads,
            self.cross_attention_head_dim,
        ) {
            (Some(h), Some(hd)) if h > 0 && hd > 0 => {}
            (h, hd) => {
                return unsupported(
                    "num_cross_attention_heads",
                    format!("{h:?} (cross_attention_head_dim {hd:?})"),
                    "cross-attention needs positive head count and head dim",
                )
            }
        }
        if self.patch_size == 0 {
            return unsupported("patch_size", "0".into(), "must be at least 1");
        }
        if self.ffn_hidden() == 0 {
            return unsupported(
                "mlp_ratio",
                self.mlp_ratio.to_string(),
                "gives an empty Mix-FFN",
            );
        }
        if let Some(s) = self.interpolation_scale {
            if !(s.is_finite() && s > 0.0) {
                return unsupported("interpolation_scale", s.to_string(), "must be positive");
            }
            if !d.is_multiple_of(4) {
                return unsupported(
                    "interpolation_scale",
                    s.to_string(),
                    &format!("a 2-D sin-cos embedding needs the width {d} to be a multiple of 4"),
                );
            }
            if self.sample_size / self.patch_size == 0 {
                return unsupported(
                    "sample_size",
                    self.sample_size.to_string(),
                    "position embedding needs sample_size ≥ patch_size",
                );
            }
        }
        Ok(())
    }

    /// Number of parameters the model has for this config (what the checkpoint must contain).
    pub fn parameter_count(&self) -> usize {
        let d = self.inner_dim();
        let (ch, chd) = self.cross();
        let cross = ch * chd;
        let hf = self.ffn_hidden();
        let p = self.patch_size;
        let lin = |i: usize, o: usize, bias: bool| i * o + if bias { o } else { 0 };
        let mut n = self.in_channels * p * p * d + d; // patch_embed
        let t_mlp = lin(256, d, true) + lin(d, d, true);
        n += t_mlp * if self.guidance_embeds { 2 } else { 1 } + lin(d, 6 * d, true);
        n += lin(self.caption_channels, d, true) + lin(d, d, true); // caption projection
        if self.caption_norm {
            n += d;
        }
        let mut block = 6 * d;
        block += 3 * lin(d, d, self.attention_bias) + lin(d, d, true);
        block += lin(d, cross, true) + 2 * lin(d, cross, true) + lin(cross, d, true);
        block += lin(d, 2 * hf, true) + 2 * hf * 9 + 2 * hf + lin(hf, d, false);
        if self.qk_norm.is_some() {
            block += 2 * d + 2 * cross;
        }
        if self.norm_elementwise_affine {
            block += 2 * d;
        }
        n += self.num_layers * block;
        n + 2 * d + lin(d, p * p * self.out_channels(), true)
    }
}
