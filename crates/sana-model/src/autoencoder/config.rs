//! `AutoencoderDCConfig`: the keys of a diffusers DC-AE `config.json`, their defaults and validation.

use candle_core::Tensor;
use serde::Deserialize;

use crate::{Error, Result};

/// A config value that diffusers accepts as one string for every stage or a list with one per stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerStage {
    One(String),
    Many(Vec<String>),
}

impl PerStage {
    pub(super) fn one(s: &str) -> Self {
        Self::One(s.to_string())
    }

    /// The value of stage `i` (a single string applies to every stage).
    pub fn get(&self, i: usize) -> &str {
        match self {
            Self::One(s) => s,
            Self::Many(v) => v.get(i).map_or("", |s| s.as_str()),
        }
    }

    pub(super) fn len(&self) -> Option<usize> {
        match self {
            Self::One(_) => None,
            Self::Many(v) => Some(v.len()),
        }
    }
}

pub(super) fn default_in_channels() -> usize {
    3
}
pub(super) fn default_latent_channels() -> usize {
    32
}
pub(super) fn default_head_dim() -> usize {
    32
}
pub(super) fn default_block_type() -> PerStage {
    PerStage::one("ResBlock")
}
pub(super) fn default_block_out_channels() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
pub(super) fn default_encoder_layers() -> Vec<usize> {
    vec![2, 2, 2, 3, 3, 3]
}
pub(super) fn default_decoder_layers() -> Vec<usize> {
    vec![3, 3, 3, 3, 3, 3]
}
pub(super) fn default_multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
pub(super) fn default_upsample() -> String {
    "pixel_shuffle".into()
}
pub(super) fn default_downsample() -> String {
    "pixel_unshuffle".into()
}
pub(super) fn default_norm() -> PerStage {
    PerStage::one("rms_norm")
}
pub(super) fn default_act() -> PerStage {
    PerStage::one("silu")
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_relu() -> String {
    "relu".into()
}
pub(super) fn default_scaling() -> f64 {
    1.0
}

/// `vae/config.json`. Field names are the diffusers keys; defaults are diffusers' constructor
/// defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AutoencoderDCConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_block_type")]
    pub encoder_block_types: PerStage,
    #[serde(default = "default_block_type")]
    pub decoder_block_types: PerStage,
    #[serde(default = "default_block_out_channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_encoder_layers")]
    pub encoder_layers_per_block: Vec<usize>,
    #[serde(default = "default_decoder_layers")]
    pub decoder_layers_per_block: Vec<usize>,
    #[serde(default = "default_multiscales")]
    pub encoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "default_multiscales")]
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    /// `"interpolate"` (nearest ×2, then conv); anything else is conv then pixel-shuffle.
    #[serde(default = "default_upsample")]
    pub upsample_block_type: String,
    /// `"pixel_unshuffle"` (conv, then pixel-unshuffle); anything else is a stride-2 conv.
    #[serde(default = "default_downsample")]
    pub downsample_block_type: String,
    #[serde(default = "default_norm")]
    pub decoder_norm_types: PerStage,
    #[serde(default = "default_act")]
    pub decoder_act_fns: PerStage,
    #[serde(default = "default_true")]
    pub encoder_out_shortcut: bool,
    #[serde(default = "default_true")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "default_relu")]
    pub decoder_conv_act_fn: String,
    /// Not used inside the model: latents are `encode(x) · scaling_factor`, and the pipeline
    /// divides by it before `decode`.
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
}

impl Default for AutoencoderDCConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default; this is a bug")
    }
}

/// Which half of the model a stage belongs to (the two halves read different config lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Half {
    Encoder,
    Decoder,
}

impl AutoencoderDCConfig {
    /// Spatial compression, `2^(stages − 1)` (32 for every released DC-AE f32 model).
    pub fn spatial_compression_ratio(&self) -> usize {
        1 << self.encoder_block_out_channels.len().saturating_sub(1)
    }

    pub(super) fn stage(&self, half: Half, i: usize) -> StageCfg<'_> {
        match half {
            Half::Encoder => StageCfg {
                block_type: self.encoder_block_types.get(i),
                channels: self.encoder_block_out_channels[i],
                layers: self.encoder_layers_per_block[i],
                multiscales: &self.encoder_qkv_multiscales[i],
                norm: "rms_norm",
                act: "silu",
                head_dim: self.attention_head_dim,
            },
            Half::Decoder => StageCfg {
                block_type: self.decoder_block_types.get(i),
                channels: self.decoder_block_out_channels[i],
                layers: self.decoder_layers_per_block[i],
                multiscales: &self.decoder_qkv_multiscales[i],
                norm: self.decoder_norm_types.get(i),
                act: self.decoder_act_fns.get(i),
                head_dim: self.attention_head_dim,
            },
        }
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
        if self.in_channels == 0 || self.latent_channels == 0 || self.attention_head_dim == 0 {
            return unsupported(
                "latent_channels",
                format!(
                    "{} (in_channels {}, attention_head_dim {})",
                    self.latent_channels, self.in_channels, self.attention_head_dim
                ),
                "in_channels, latent_channels and attention_head_dim must be positive",
            );
        }
        for half in [Half::Encoder, Half::Decoder] {
            let (channels, layers, multiscales, types) = match half {
                Half::Encoder => (
                    &self.encoder_block_out_channels,
                    &self.encoder_layers_per_block,
                    &self.encoder_qkv_multiscales,
                    &self.encoder_block_types,
                ),
                Half::Decoder => (
                    &self.decoder_block_out_channels,
                    &self.decoder_layers_per_block,
                    &self.decoder_qkv_multiscales,
                    &self.decoder_block_types,
                ),
            };
            let n = channels.len();
            let field = |name: &'static str| -> &'static str {
                match (half, name) {
                    (Half::Encoder, "layers") => "encoder_layers_per_block",
                    (Half::Encoder, "multiscales") => "encoder_qkv_multiscales",
                    (Half::Encoder, "types") => "encoder_block_types",
                    (Half::Encoder, _) => "encoder_block_out_channels",
                    (Half::Decoder, "layers") => "decoder_layers_per_block",
                    (Half::Decoder, "multiscales") => "decoder_qkv_multiscales",
                    (Half::Decoder, "types") => "decoder_block_types",
                    (Half::Decoder, _) => "decoder_block_out_channels",
                }
            };
            if n < 2 {
                return unsupported(
                    field("channels"),
                    format!("{channels:?}"),
                    "needs at least two stages",
                );
            }
            if n != self.encoder_block_out_channels.len() {
                return unsupported(
                    field("channels"),
                    format!("{channels:?}"),
                    "encoder and decoder must have the same number of stages",
                );
            }
            if channels.contains(&0) {
                return unsupported(
                    field("channels"),
                    format!("{channels:?}"),
                    "every stage needs channels",
                );
            }
            if layers.len() != n {
                return unsupported(
                    field("layers"),
                    format!("{layers:?}"),
                    &format!("needs one entry per stage ({n})"),
                );
            }
            if multiscales.len() != n {
                return unsupported(
                    field("multiscales"),
                    format!("{multiscales:?}"),
                    &format!("needs one entry per stage ({n})"),
                );
            }
            if types.len().is_some_and(|l| l != n) {
                return unsupported(
                    field("types"),
                    format!("{types:?}"),
                    &format!("needs one entry per stage ({n})"),
                );
            }
            if layers[1..].contains(&0) {
                return unsupported(
                    field("layers"),
                    format!("{layers:?}"),
                    "only the first stage may have 0 layers",
                );
            }
            if multiscales.iter().flatten().any(|&k| k.is_multiple_of(2)) {
                return unsupported(
                    field("multiscales"),
                    format!("{multiscales:?}"),
                    "aggregation kernels must be odd (same-size padding)",
                );
            }
            for i in 0..n {
                let s = self.stage(half, i);
                match s.block_type {
                    "ResBlock" => {}
                    "EfficientViTBlock" => {
                        if s.channels < s.head_dim {
                            return unsupported(
                                field("channels"),
                                format!("{channels:?}"),
                                &format!(
                                    "an EfficientViTBlock stage needs at least attention_head_dim ({}) channels",
                                    s.head_dim
                                ),
                            );
                        }
                    }
                    other => {
                        return unsupported(
                            field("types"),
                            format!("{other:?}"),
                            "only \"ResBlock\" and \"EfficientViTBlock\" exist",
                        )
                    }
                }
                if !matches!(s.norm, "rms_norm" | "batch_norm") {
                    return unsupported(
                        "decoder_norm_types",
                        format!("{:?}", s.norm),
                        "only \"rms_norm\" and \"batch_norm\" are supported",
                    );
                }
                if Activation::parse(s.act).is_none() {
                    return unsupported(
                        "decoder_act_fns",
                        format!("{:?}", s.act),
                        "supported activations: silu, swish, relu, gelu",
                    );
                }
                // Shortcut group sizes must be whole numbers of channels.
                if i + 1 < n && layers[i] > 0 {
                    let (small, big) = (channels[i], channels[i + 1]);
                    // Down: group size 4·small/big; up: repeats 4·small/big.
                    let ok = (small * 4).is_multiple_of(big)
                        && (half == Half::Decoder
                            || self.downsample_block_type != "pixel_unshuffle"
                            || big.is_multiple_of(4));
                    if !ok {
                        return unsupported(
                            field("channels"),
                            format!("{channels:?}"),
                            &format!(
                                "stages {i} and {} do not give a whole shortcut group",
                                i + 1
                            ),
                        );
                    }
                }
            }
        }
        let deepest = |v: &Vec<usize>| v[v.len() - 1];
        if self.encoder_out_shortcut
            && !deepest(&self.encoder_block_out_channels).is_multiple_of(self.latent_channels)
        {
            return unsupported(
                "encoder_out_shortcut",
                "true".into(),
                "the deepest encoder width must be a multiple of latent_channels",
            );
        }
        if self.decoder_in_shortcut
            && !deepest(&self.decoder_block_out_channels).is_multiple_of(self.latent_channels)
        {
            return unsupported(
                "decoder_in_shortcut",
                "true".into(),
                "the deepest decoder width must be a multiple of latent_channels",
            );
        }
        if Activation::parse(&self.decoder_conv_act_fn).is_none() {
            return unsupported(
                "decoder_conv_act_fn",
                format!("{:?}", self.decoder_conv_act_fn),
                "supported activations: silu, swish, relu, gelu",
            );
        }
        if self.downsample_block_type == "pixel_unshuffle"
            && self.encoder_layers_per_block[0] == 0
            && !self.encoder_block_out_channels[1].is_multiple_of(4)
        {
            return unsupported(
                "downsample_block_type",
                "\"pixel_unshuffle\"".into(),
                "the first pixel-unshuffle conv needs encoder_block_out_channels[1] divisible by 4",
            );
        }
        Ok(())
    }

    /// Number of parameters the model has for this config (what the checkpoint must contain).
    pub fn parameter_count(&self) -> usize {
        let conv =
            |i: usize, o: usize, k: usize, bias: bool| i * o * k * k + if bias { o } else { 0 };
        // RMSNorm and BatchNorm both have a weight and a bias (running statistics are buffers).
        let norm = |c: usize| 2 * c;
        let block = |s: &StageCfg| -> usize {
            let c = s.channels;
            match s.block_type {
                "ResBlock" => conv(c, c, 3, true) + conv(c, c, 3, false) + norm(c),
                _ => {
                    let heads = c / s.head_dim;
                    let inner = heads * s.head_dim;
                    let k = s.multiscales.len();
                    let mut n = 3 * c * inner;
                    for &ks in s.multiscales {
                        n += 3 * inner * ks * ks + 3 * inner * s.head_dim;
                    }
                    n += inner * (1 + k) * c + norm(c);
                    let hidden = 4 * c;
                    n + conv(c, 2 * hidden, 1, true)
                        + 2 * hidden * 9
                        + 2 * hidden
                        + hidden * c
                        + 2 * c
                }
            }
        };
        let stages = self.encoder_block_out_channels.len();
        let ps_down = self.downsample_block_type == "pixel_unshuffle";
        let ps_up = self.upsample_block_type != "interpolate";
        // Encoder.
        let ch = &self.encoder_block_out_channels;
        let layers = &self.encoder_layers_per_block;
        let mut n = if layers[0] > 0 {
            conv(self.in_channels, ch[0], 3, true)
        } else {
            conv(
                self.in_channels,
                if ps_down { ch[1] / 4 } else { ch[1] },
                3,
                true,
            )
        };
        for i in 0..stages {
            let s = self.stage(Half::Encoder, i);
            n += s.layers * block(&s);
            if i + 1 < stages && s.layers > 0 {
                n += conv(
                    ch[i],
                    if ps_down { ch[i + 1] / 4 } else { ch[i + 1] },
                    3,
                    true,
                );
            }
        }
        n += conv(ch[stages - 1], self.latent_channels, 3, true);
        // Decoder.
        let ch = &self.decoder_block_out_channels;
        let layers = &self.decoder_layers_per_block;
        n += conv(self.latent_channels, ch[stages - 1], 3, true);
        for i in 0..stages {
            let s = self.stage(Half::Decoder, i);
            n += s.layers * block(&s);
            if i + 1 < stages && s.layers > 0 {
                n += conv(ch[i + 1], if ps_up { ch[i] * 4 } else { ch[i] }, 3, true);
            }
        }
        let head = if layers[0] > 0 { ch[0] } else { ch[1] };
        n += 2 * head;
        n + conv(
            head,
            if ps_up && layers[0] == 0 {
                self.in_channels * 4
            } else {
                self.in_channels
            },
            3,
            true,
        )
    }
}

/// One stage's settings, read from the encoder or decoder lists.
pub(super) struct StageCfg<'a> {
    pub(super) block_type: &'a str,
    pub(super) channels: usize,
    pub(super) layers: usize,
    pub(super) multiscales: &'a [usize],
    pub(super) norm: &'a str,
    pub(super) act: &'a str,
    pub(super) head_dim: usize,
}

/// `get_activation`: the activations diffusers' DC-AE configs name.
#[derive(Debug, Clone, Copy)]
pub(super) enum Activation {
    Silu,
    Relu,
    Gelu,
}

impl Activation {
    pub(super) fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "relu" => Some(Self::Relu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    pub(super) fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
            // nn.GELU() is the exact erf form.
            Self::Gelu => x.gelu_erf(),
        }
    }
}
