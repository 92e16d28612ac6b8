//! DC-AE: diffusers `AutoencoderDC` (`diffusers/models/autoencoders/autoencoder_dc.py`, with
//! `SanaMultiscaleLinearAttention` / `SanaMultiscaleAttnProcessor2_0` from `attention_processor.py`
//! and `GLUMBConv` from `transformers/sana_transformer.py`).
//!
//! A 32× (f32c32) autoencoder: an encoder and a decoder of ResBlock and EfficientViTBlock stages
//! joined by DC down/up blocks with parameter-free shortcuts. Every option the released DC-AE family
//! uses is served: strided-conv or pixel-unshuffle down blocks, interpolate or pixel-shuffle up
//! blocks, channel RMSNorm (weight and bias) or BatchNorm (running statistics), stages with zero
//! layers (the f32c32-in/mix variants), the multiscale ReLU linear attention with its quadratic
//! branch for ≤ `attention_head_dim` tokens, and diffusers' tiled decoding. Activations are NCHW.
//!
//! Precision follows the reference: norms in f32 and cast back, the linear-attention branch
//! entirely in f32, the quadratic branch normalised in f32. fp16 is refused (the reference has no
//! clamp and the decoder overflows in fp16); bf16 and f32 are served. On CPU, where candle has no
//! bf16 matmul, convs and matmuls of bf16 tensors run in f32 and round once, as torch does.

use std::path::Path;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::nn::GluConvWeights;
use crate::ops::{depthwise_conv2d, glu_depthwise_conv2d};
use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};

/// A config value that diffusers accepts as one string for every stage or a list with one per stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerStage {
    One(String),
    Many(Vec<String>),
}

impl PerStage {
    fn one(s: &str) -> Self {
        Self::One(s.to_string())
    }

    /// The value of stage `i` (a single string applies to every stage).
    pub fn get(&self, i: usize) -> &str {
        match self {
            Self::One(s) => s,
            Self::Many(v) => v.get(i).map_or("", |s| s.as_str()),
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            Self::One(_) => None,
            Self::Many(v) => Some(v.len()),
        }
    }
}

fn default_in_channels() -> usize {
    3
}
fn default_latent_channels() -> usize {
    32
}
fn default_head_dim() -> usize {
    32
}
fn default_block_type() -> PerStage {
    PerStage::one("ResBlock")
}
fn default_block_out_channels() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
fn default_encoder_layers() -> Vec<usize> {
    vec![2, 2, 2, 3, 3, 3]
}
fn default_decoder_layers() -> Vec<usize> {
    vec![3, 3, 3, 3, 3, 3]
}
fn default_multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
fn default_upsample() -> String {
    "pixel_shuffle".into()
}
fn default_downsample() -> String {
    "pixel_unshuffle".into()
}
fn default_norm() -> PerStage {
    PerStage::one("rms_norm")
}
fn default_act() -> PerStage {
    PerStage::one("silu")
}
fn default_true() -> bool {
    true
}
fn default_relu() -> String {
    "relu".into()
}
fn default_scaling() -> f64 {
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
enum Half {
    Encoder,
    Decoder,
}

impl AutoencoderDCConfig {
    /// Spatial compression, `2^(stages − 1)` (32 for every released DC-AE f32 model).
    pub fn spatial_compression_ratio(&self) -> usize {
        1 << self.encoder_block_out_channels.len().saturating_sub(1)
    }

    fn stage(&self, half: Half, i: usize) -> StageCfg<'_> {
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
struct StageCfg<'a> {
    block_type: &'a str,
    channels: usize,
    layers: usize,
    multiscales: &'a [usize],
    norm: &'a str,
    act: &'a str,
    head_dim: usize,
}

/// `get_activation`: the activations diffusers' DC-AE configs name.
#[derive(Debug, Clone, Copy)]
enum Activation {
    Silu,
    Relu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "relu" => Some(Self::Relu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
            // nn.GELU() is the exact erf form.
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// Whether `x` must be widened to f32 for a matmul or conv: candle's CPU matmul has no bf16.
fn needs_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() != DType::F32
}

/// `a · b` for contiguous operands; bf16 on CPU runs in f32 and rounds once (as torch accumulates).
fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if needs_f32(&a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(a.dtype())
    } else {
        a.matmul(&b)
    }
}

/// `nn.Conv2d` (groups 1, dilation 1): weight `[out, in, k, k]`, optional bias.
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: if bias {
                Some(vb.get(cout, "bias")?)
            } else {
                None
            },
            stride,
            padding: k / 2,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let wide = needs_f32(x);
        let (x, w) = if wide {
            (x.to_dtype(DType::F32)?, self.weight.to_dtype(DType::F32)?)
        } else {
            (x.clone(), self.weight.clone())
        };
        let y = if x.device().is_cpu() && self.stride == 1 && x.dtype() == DType::F32 {
            // candle's CPU conv builds its im2col one value at a time; this one copies rows.
            let bias = match &self.bias {
                Some(b) => b.to_dtype(DType::F32)?,
                None => Tensor::zeros(w.dim(0)?, DType::F32, x.device())?,
            };
            let packed = Tensor::cat(&[w.flatten_from(1)?, bias.unsqueeze(1)?], 1)?;
            x.contiguous()?.apply_op2_no_bwd(
                &packed,
                &CpuConv {
                    k: w.dim(2)?,
                    padding: self.padding,
                },
            )?
        } else {
            let y = x.conv2d(&w, self.padding, self.stride, 1, 1)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?)?,
                None => y,
            }
        };
        if wide {
            y.to_dtype(dtype)
        } else {
            Ok(y)
        }
    }
}

/// Values in one band of [`CpuConv`]'s im2col (16 M f32 = 64 MB; at least one output row), the path
/// of every stride-1 conv but 3×3 with padding 1 (those go to [`winograd_conv3x3`]). Fewer, larger
/// bands are faster (the weights are packed once per band): measured when 3×3 convs still took this
/// path, the 512² decode took 15.0 s at 4 MB bands, 13.5 s at 16 MB, 12.8 s at 64 MB and 256 MB.
const CONV_BAND_VALUES: usize = 16 << 20;

/// Stride-1 k×k convolution with zero padding on CPU in f32: for bands of output rows, an im2col
/// matrix `[Cin·k·k, rows·W]` built from shifted row copies, then one gemm per band that writes
/// the NCHW output in place on top of the bias.
///
/// Operands: x `[B, Cin, H, W]` contiguous, `packed` `[Cout, Cin·k·k + 1]`: the weight rows with
/// the bias as the last column.
struct CpuConv {
    k: usize,
    padding: usize,
}

/// Values in one of [`winograd_conv3x3`]'s two transformed bands (16 × channels × tiles; 16 MB).
const WINOGRAD_BAND_VALUES: usize = 4 << 20;

/// 3×3 stride-1 convolution with padding 1 by Winograd's F(2×2, 3×3): each 4×4 input patch and
/// each 3×3 filter go to a 4×4 transform domain where the convolution is 16 elementwise products
/// summed over input channels — 16 gemms `U[ξ] [Cout, Cin] · V[ξ] [Cin, tiles]` that do 16
/// multiplies per 2×2 outputs instead of 36 — and each output tile comes back by `Aᵀ M A`.
/// Bands of tile rows (at most `band_values` per transformed buffer, at least one tile row) bound
/// the workspace. Same operands as [`CpuConv`]; x is `[b, cin, h, wd]`.
///
/// 512² decode of the real DC-AE: 8.8 s, the banded im2col + gemm it replaces 12.5–13.0 s, diffusers
/// 12.7 s. F(2×2, 3×3)'s transforms only add, subtract and halve, so f32 parity stays ~1e-6.
fn winograd_conv3x3(
    x: &[f32],
    w: &[f32],
    (b, cin, h, wd): (usize, usize, usize, usize),
    cout: usize,
    kk1: usize,
    band_values: usize,
) -> Vec<f32> {
    let kk = cin * 9;
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let plane = h * wd;
    // U[ξ][co][ci] = (G g Gᵀ)[ξ], G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
    // U as [Cout][16][Cin], written in place per output channel; the gemms see U[ξ] with a row
    // stride of 16·Cin.
    let mut u = vec![0f32; 16 * cout * cin];
    u.par_chunks_mut(16 * cin)
        .enumerate()
        .for_each(|(co, dst)| {
            for ci in 0..cin {
                let g = &w[co * kk1 + ci * 9..co * kk1 + ci * 9 + 9];
                // t = G g (4×3), then t Gᵀ (4×4).
                let mut t = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    t[0][c] = g0;
                    t[1][c] = 0.5 * (g0 + g1 + g2);
                    t[2][c] = 0.5 * (g0 - g1 + g2);
                    t[3][c] = g2;
                }
                for (row, tr) in t.iter().enumerate() {
                    let at = |col: usize| (row * 4 + col) * cin + ci;
                    dst[at(0)] = tr[0];
                    dst[at(1)] = 0.5 * (tr[0] + tr[1] + tr[2]);
                    dst[at(2)] = 0.5 * (tr[0] - tr[1] + tr[2]);
                    dst[at(3)] = tr[2];
                }
            }
        });
    let mut out = vec![0f32; b * cout * plane];
    let band_rows = (band_values / (16 * cin.max(cout) * tw).max(1)).clamp(1, th);
    // V as [Cin][16][tiles] and M as [Cout][16][tiles]: each channel's transform reads or writes
    // one contiguous block, and the gemms see V[ξ] and M[ξ] as matrices with a row stride.
    let mut v = vec![0f32; 16 * cin * band_rows * tw];
    let mut m = vec![0f32; 16 * cout * band_rows * tw];
    let threads = rayon::current_num_threads();
    // A padded input row: index j holds column j − 1; tiles read columns 2·tx − 1 ..= 2·tx + 2.
    let wpad = 2 * tw + 2;
    for bi in 0..b {
        let xb = &x[bi * cin * plane..(bi + 1) * cin * plane];
        let ob = &mut out[bi * cout * plane..(bi + 1) * cout * plane];
        for ty0 in (0..th).step_by(band_rows) {
            let nty = band_rows.min(th - ty0);
            let nt = nty * tw;
            // V = Bᵀ d B, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
            v[..16 * cin * nt]
                .par_chunks_mut(16 * nt)
                .enumerate()
                .for_each(|(ci, dst)| {
                    let src = &xb[ci * plane..(ci + 1) * plane];
                    let mut rows = [0f32; 4].map(|_| vec![0f32; wpad]);
                    let mut q = [0f32; 4].map(|_| vec![0f32; wpad]);
                    for tyl in 0..nty {
                        let ty = ty0 + tyl;
                        for (r, row) in rows.iter_mut().enumerate() {
                            let y = (2 * ty + r) as isize - 1;
                            if y < 0 || y >= h as isize {
                                row.fill(0.0);
                            } else {
                                let y = y as usize;
                                row[1..1 + wd].copy_from_slice(&src[y * wd..(y + 1) * wd]);
                            }
                        }
                        for j in 0..wpad {
                            let (d0, d1, d2, d3) = (rows[0][j], rows[1][j], rows[2][j], rows[3][j]);
                            q[0][j] = d0 - d2;
                            q[1][j] = d1 + d2;
                            q[2][j] = d2 - d1;
                            q[3][j] = d1 - d3;
                        }
                        for (r, qr) in q.iter().enumerate() {
                            let base = tyl * tw;
                            for tx in 0..tw {
                                let a = &qr[2 * tx..2 * tx + 4];
                                dst[(r * 4) * nt + base + tx] = a[0] - a[2];
                                dst[(r * 4 + 1) * nt + base + tx] = a[1] + a[2];
                                dst[(r * 4 + 2) * nt + base + tx] = a[2] - a[1];
                                dst[(r * 4 + 3) * nt + base + tx] = a[1] - a[3];
                            }
                        }
                    }
                });
            for xi in 0..16 {
                // M[ξ] [Cout, nt] = U[ξ] [Cout, Cin] · V[ξ] [Cin, nt].
                // SAFETY: U[ξ] (co, ci) is at co·16·cin + ξ·cin + ci < u.len(); V[ξ] (ci, t) at
                // ci·16·nt + ξ·nt + t < 16·cin·nt ≤ v.len(); M[ξ] (co, t) at co·16·nt + ξ·nt + t
                // < 16·cout·nt ≤ m.len().
                unsafe {
                    gemm::gemm(
                        cout,
                        nt,
                        cin,
                        m.as_mut_ptr().add(xi * nt),
                        1,
                        (16 * nt) as isize,
                        false,
                        u.as_ptr().add(xi * cin),
                        1,
                        (16 * cin) as isize,
                        v.as_ptr().add(xi * nt),
                        1,
                        (16 * nt) as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            }
            // Y = Aᵀ M A + bias, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
            let m = &m[..16 * cout * nt];
            ob.par_chunks_mut(plane)
                .zip(m.par_chunks(16 * nt))
                .enumerate()
                .for_each(|(co, (dst, mb))| {
                    let bias = w[co * kk1 + kk];
                    let s = |xi: usize| &mb[xi * nt..(xi + 1) * nt];
                    for tyl in 0..nty {
                        let ty = ty0 + tyl;
                        for i in 0..2 {
                            let yy = 2 * ty + i;
                            if yy >= h {
                                continue;
                            }
                            let row = &mut dst[yy * wd..(yy + 1) * wd];
                            // Row i of Aᵀ M (ξ = 4·row + column): i = 0 is M rows 0 + 1 + 2,
                            // i = 1 is M rows 1 − 2 − 3.
                            let (ra, rb, rc, sign) = if i == 0 {
                                (0, 4, 8, 1.0)
                            } else {
                                (4, 8, 12, -1.0)
                            };
                            let col = |c: usize, t: usize| {
                                s(ra + c)[t] + sign * (s(rb + c)[t] + s(rc + c)[t])
                            };
                            for tx in 0..tw {
                                let t = tyl * tw + tx;
                                let (r0, r1, r2, r3) = (col(0, t), col(1, t), col(2, t), col(3, t));
                                row[2 * tx] = r0 + r1 + r2 + bias;
                                if 2 * tx + 1 < wd {
                                    row[2 * tx + 1] = r1 - r2 - r3 + bias;
                                }
                            }
                        }
                    }
                });
        }
    }
    out
}

impl CustomOp2 for CpuConv {
    fn name(&self) -> &'static str {
        "dcae-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("dcae-conv2d: f32 only")
        };
        if !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("dcae-conv2d: operands must be contiguous")
        }
        let x = &x[xl.start_offset()..];
        let w = &w[wl.start_offset()..];
        let (b, cin, h, wd) = xl.shape().dims4()?;
        let (cout, kk1) = wl.shape().dims2()?;
        let (k, p) = (self.k, self.padding);
        let kk = cin * k * k;
        if kk1 != kk + 1 || h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!(
                "dcae-conv2d: weight {:?} does not fit input {:?}",
                wl.shape(),
                xl.shape()
            )
        }
        let (oh, ow) = (h + 2 * p + 1 - k, wd + 2 * p + 1 - k);
        if k == 3 && p == 1 {
            let out = winograd_conv3x3(x, w, (b, cin, h, wd), cout, kk1, WINOGRAD_BAND_VALUES);
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))));
        }
        let plane = oh * ow;
        let mut out = vec![0f32; b * cout * plane];
        // Bands of at most CONV_BAND_VALUES (64 MB) of im2col, at least one output row.
        let rows = (CONV_BAND_VALUES / (kk * ow).max(1)).clamp(1, oh);
        let mut col = vec![0f32; kk * rows * ow];
        let threads = rayon::current_num_threads();
        for bi in 0..b {
            let xb = &x[bi * cin * h * wd..(bi + 1) * cin * h * wd];
            let ob = &mut out[bi * cout * plane..(bi + 1) * cout * plane];
            // The bias under every output value; the gemm adds onto it.
            ob.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(co, dst)| dst.fill(w[co * kk1 + kk]));
            for y0 in (0..oh).step_by(rows) {
                let nr = rows.min(oh - y0);
                let ncols = nr * ow;
                // Row r = (ci, ky, kx) of the im2col band: input plane ci shifted by (ky, kx).
                col[..kk * ncols]
                    .par_chunks_mut(ncols)
                    .enumerate()
                    .for_each(|(r, dst)| {
                        let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                        let src = &xb[ci * h * wd..(ci + 1) * h * wd];
                        // Valid output columns: 0 ≤ ox + kx − p < W.
                        let lo = p.saturating_sub(kx).min(ow);
                        let hi = (wd + p).saturating_sub(kx).min(ow).max(lo);
                        for yy in 0..nr {
                            let d = &mut dst[yy * ow..(yy + 1) * ow];
                            let iy = (y0 + yy + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                d.fill(0.0);
                                continue;
                            }
                            let s = &src[iy as usize * wd..(iy as usize + 1) * wd];
                            d[..lo].fill(0.0);
                            d[hi..].fill(0.0);
                            d[lo..hi].copy_from_slice(&s[lo + kx - p..hi + kx - p]);
                        }
                    });
                // out[:, y0·W ..][Cout, ncols] += W [Cout, kk] · col [kk, ncols].
                // SAFETY: every pointer/stride pair addresses memory inside its slice: dst rows
                // start at co·plane + y0·ow and span ncols ≤ plane − y0·ow; lhs rows have stride
                // kk1 ≥ kk; rhs is the first kk·ncols values of `col`.
                unsafe {
                    gemm::gemm(
                        cout,
                        ncols,
                        kk,
                        ob.as_mut_ptr().add(y0 * ow),
                        1,
                        plane as isize,
                        true,
                        w.as_ptr(),
                        1,
                        kk1 as isize,
                        col.as_ptr(),
                        1,
                        ncols as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// A 1×1 conv without bias as a matmul per image: weight `[out, in]`, x `[B, in, H, W]`.
fn pointwise(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let cout = w.dim(0)?;
    // [B, in, H·W] per image: [out, in] · [in, H·W] → [out, H·W].
    let x = x.contiguous()?.reshape((b, c, h * wd))?;
    if b == 1 {
        return matmul(w, &x.get(0)?)?.reshape((1, cout, h, wd));
    }
    let outs = (0..b)
        .map(|i| matmul(w, &x.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&outs, 0)?.reshape((b, cout, h, wd))
}

/// [`pointwise`] plus a bias `[1, out, 1, 1]` added before rounding to the input dtype (as a
/// torch conv with bias does).
fn pointwise_bias(w: &Tensor, bias: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let wide = |t: &Tensor| t.to_dtype(DType::F32);
    pointwise(&wide(w)?, &wide(x)?)?
        .broadcast_add(&wide(bias)?)?
        .to_dtype(dtype)
}

/// Channel RMSNorm with weight and bias (diffusers `RMSNorm(C, 1e-5, bias=True)` applied over
/// `movedim(1, -1)`): the normalisation in f32, cast back, then `· w + b` in the model dtype.
#[derive(Debug, Clone)]
struct ChannelRmsNorm {
    weight: Tensor, // [1, C, 1, 1]
    bias: Tensor,   // [1, C, 1, 1]
}

impl ChannelRmsNorm {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?.reshape((1, c, 1, 1))?,
            bias: vb.get(c, "bias")?.reshape((1, c, 1, 1))?,
        })
    }
}

impl ChannelRmsNorm {
    /// `norm(x) + residual`. f32 on CPU is one fused pass ([`CpuRmsNorm`]); other cases are
    /// tensor ops with the reference's rounding points.
    fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let c = x.dim(1)?;
            let params = Tensor::cat(&[self.weight.reshape(c)?, self.bias.reshape(c)?], 0)?
                .to_dtype(DType::F32)?;
            let x = x.contiguous()?;
            return match residual {
                Some(r) => {
                    x.apply_op3_no_bwd(&params, &r.contiguous()?, &CpuRmsNorm { residual: true })
                }
                None => x.apply_op3_no_bwd(&params, &x, &CpuRmsNorm { residual: false }),
            };
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?.recip()?; // [B, 1, H, W]
        let y = xf
            .broadcast_mul(&inv)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for ChannelRmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_add(x, None)
    }
}

/// Channel RMSNorm (eps 1e-5) with weight and bias, plus an optional residual, on CPU in f32:
/// one pass for the per-pixel sums of squares, one writing every channel plane.
/// Operands: x `[B, C, H, W]`, params `[2C]` (weight then bias), residual shaped as x.
struct CpuRmsNorm {
    residual: bool,
}

impl CustomOp3 for CpuRmsNorm {
    fn name(&self) -> &'static str {
        "dcae-channel-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(p), CpuStorage::F32(r)) = (xs, ps, rs) else {
            candle_core::bail!("dcae-channel-rms-norm: f32 only")
        };
        if !xl.is_contiguous()
            || !pl.is_contiguous()
            || !rl.is_contiguous()
            || rl.shape() != xl.shape()
        {
            candle_core::bail!("dcae-channel-rms-norm: contiguous operands of one shape needed")
        }
        let (b, c, h, w) = xl.shape().dims4()?;
        let x = &x[xl.start_offset()..][..b * c * h * w];
        let r = &r[rl.start_offset()..][..b * c * h * w];
        let (wt, bs) = p[pl.start_offset()..][..2 * c].split_at(c);
        let plane = h * w;
        let mut out = vec![0f32; b * c * plane];
        const CHUNK: usize = 4096;
        for bi in 0..b {
            let xb = &x[bi * c * plane..(bi + 1) * c * plane];
            // 1. inv[px] = 1 / √(mean_c x² + eps), pixel chunks in parallel.
            let mut inv = vec![0f32; plane];
            inv.par_chunks_mut(CHUNK).enumerate().for_each(|(k, acc)| {
                let start = k * CHUNK;
                for ci in 0..c {
                    let src = &xb[ci * plane + start..ci * plane + start + acc.len()];
                    for (a, v) in acc.iter_mut().zip(src) {
                        *a += v * v;
                    }
                }
                for a in acc.iter_mut() {
                    *a = 1.0 / (*a / c as f32 + 1e-5).sqrt();
                }
            });
            // 2. out = x · inv · w + b (+ residual), channel planes in parallel.
            let ob = &mut out[bi * c * plane..(bi + 1) * c * plane];
            ob.par_chunks_mut(plane).enumerate().for_each(|(ci, dst)| {
                let src = &xb[ci * plane..(ci + 1) * plane];
                let (wc, bc) = (wt[ci], bs[ci]);
                for ((d, v), s) in dst.iter_mut().zip(src).zip(&inv) {
                    *d = v * s * wc + bc;
                }
                if self.residual {
                    let res = &r[(bi * c + ci) * plane..(bi * c + ci + 1) * plane];
                    for (d, v) in dst.iter_mut().zip(res) {
                        *d += v;
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `nn.BatchNorm2d` in eval mode (eps 1e-5): the stored running statistics, computed in f32.
#[derive(Debug, Clone)]
struct BatchNorm2d {
    scale: Tensor, // [1, C, 1, 1] f32: w / √(var + eps)
    shift: Tensor, // [1, C, 1, 1] f32: b − mean · scale
}

impl BatchNorm2d {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let get = |n: &str| -> candle_core::Result<Tensor> { vb.get(c, n)?.to_dtype(DType::F32) };
        let (w, b, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let scale = (w / (var + 1e-5)?.sqrt()?)?;
        let shift = (b - (mean * &scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(DType::F32)?
            .broadcast_mul(&self.scale)?
            .broadcast_add(&self.shift)?
            .to_dtype(x.dtype())
    }
}

/// `get_normalization(norm_type, C)` as the DC-AE blocks apply it to NCHW maps.
#[derive(Debug, Clone)]
enum Norm {
    Rms(ChannelRmsNorm),
    Batch(BatchNorm2d),
}

impl Norm {
    fn new(kind: &str, c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match kind {
            "batch_norm" => Self::Batch(BatchNorm2d::new(c, vb)?),
            _ => Self::Rms(ChannelRmsNorm::new(c, vb)?),
        })
    }
}

impl Norm {
    /// `norm(x) + residual`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward_add(x, Some(residual)),
            Self::Batch(n) => n.forward(x)? + residual,
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward(x),
            Self::Batch(n) => n.forward(x),
        }
    }
}

/// `ResBlock`: conv3×3 (bias) → act → conv3×3 (no bias) → norm → + input.
#[derive(Debug, Clone)]
struct ResBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    norm: Norm,
    act: Activation,
}

impl ResBlock {
    fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = s.channels;
        Ok(Self {
            conv1: Conv2d::new(c, c, 3, 1, true, vb.pp("conv1"))?,
            conv2: Conv2d::new(c, c, 3, 1, false, vb.pp("conv2"))?,
            norm: Norm::new(s.norm, c, vb.pp("norm"))?,
            act: Activation::parse(s.act).expect("validated; this is a bug"),
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.forward(&self.conv1.forward(x)?)?;
        self.norm.forward_add(&self.conv2.forward(&h)?, x)
    }
}

/// `SanaMultiscaleAttentionProjection`: depthwise k×k then a grouped 1×1 (groups of `head_dim`).
#[derive(Debug, Clone)]
struct MultiscaleProjection {
    proj_in: Tensor,  // [3I, 1, k, k]
    proj_out: Tensor, // [3·heads, d, d]: one d×d matrix per group
    kernel: usize,
}

impl MultiscaleProjection {
    fn new(
        inner: usize,
        heads: usize,
        d: usize,
        kernel: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: vb.get((3 * inner, 1, kernel, kernel), "proj_in.weight")?,
            proj_out: vb.get((3 * inner, d, 1, 1), "proj_out.weight")?.reshape((
                3 * heads,
                d,
                d,
            ))?,
            kernel,
        })
    }

    /// `qkv` `[B, 3I, H, W]` → `[B, 3I, H, W]`.
    fn forward(&self, qkv: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = qkv.dims4()?;
        let (g, d, _) = self.proj_out.dims3()?;
        let agg = depthwise_conv2d(qkv, &self.proj_in, None, self.kernel / 2)?;
        // Grouped 1×1 as a batched matmul: [B, G, d, d] · [B, G, d, H·W].
        let wts = self
            .proj_out
            .unsqueeze(0)?
            .broadcast_as((b, g, d, d))?
            .contiguous()?;
        matmul(&wts, &agg.reshape((b, g, d, h * w))?)?.reshape((b, c, h, w))
    }
}

/// `SanaMultiscaleLinearAttention` with `SanaMultiscaleAttnProcessor2_0` (residual on).
#[derive(Debug, Clone)]
struct SanaMultiscaleLinearAttention {
    /// `to_q`, `to_k`, `to_v` stacked: `[3I, C]` (q rows, then k, then v, as the reference concatenates).
    to_qkv: Tensor,
    multiscale: Vec<MultiscaleProjection>,
    to_out: Tensor, // [C, I·(1 + scales)]
    norm_out: Norm,
    head_dim: usize,
}

impl SanaMultiscaleLinearAttention {
    fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = s.channels;
        let d = s.head_dim;
        let heads = c / d;
        let inner = heads * d;
        let to_qkv = Tensor::cat(
            &[
                vb.get((inner, c), "to_q.weight")?,
                vb.get((inner, c), "to_k.weight")?,
                vb.get((inner, c), "to_v.weight")?,
            ],
            0,
        )?;
        let multiscale = s
            .multiscales
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                MultiscaleProjection::new(
                    inner,
                    heads,
                    d,
                    k,
                    vb.pp(format!("to_qkv_multiscale.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            to_qkv,
            to_out: vb.get((c, inner * (1 + s.multiscales.len())), "to_out.weight")?,
            multiscale,
            norm_out: Norm::new(s.norm, c, vb.pp("norm_out"))?,
            head_dim: d,
        })
    }

    /// Linear branch, all f32: `q, k, v` `[B, G, d, N]` → `[B, G, d, N]`.
    fn linear(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (b, g, d, n) = v.dims4()?;
        // A row of ones under v makes the same matmul yield Σ_n k_n, the normaliser.
        let ones = Tensor::ones((b, g, 1, n), DType::F32, v.device())?;
        let v1 = Tensor::cat(&[v, &ones], 2)?; // [B, G, d+1, N]
        let kt = k.transpose(2, 3)?.contiguous()?; // [B, G, N, d]
        let scores = matmul(&v1, &kt)?; // [B, G, d+1, d]
        let o = matmul(&scores, q)?; // [B, G, d+1, N]
        o.narrow(2, 0, d)?
            .broadcast_div(&(o.narrow(2, d, 1)? + 1e-15)?)
    }

    /// Quadratic branch (≤ d tokens): scores in the input dtype, normalised over keys in f32.
    fn quadratic(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let kt = k.transpose(2, 3)?.contiguous()?; // [B, G, N_key, d]
        let scores = matmul(&kt, q)?.to_dtype(DType::F32)?; // [B, G, N_key, N_query]
        let scores = scores.broadcast_div(&(scores.sum_keepdim(2)? + 1e-15)?)?;
        matmul(v, &scores.to_dtype(v.dtype())?) // [B, G, d, N_query]
    }
}

impl Module for SanaMultiscaleLinearAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (b, _, h, w) = x.dims4()?;
        let n = h * w;
        let d = self.head_dim;
        // 1. q, k, v as one 1×1 conv: [B, 3I, H, W].
        let qkv = pointwise(&self.to_qkv, x)?;
        // 2. Multiscale aggregation, concatenated after the plain qkv: [B, 3I·(1 + scales), H, W].
        let mut parts = vec![qkv.clone()];
        for m in &self.multiscale {
            parts.push(m.forward(&qkv)?);
        }
        let z = Tensor::cat(&parts, 1)?;
        let linear = n > d;
        let z = if linear { z.to_dtype(DType::F32)? } else { z };
        // 3. Consecutive chunks of 3d channels: [B, G, 3d, N]; each is (q | k | v) of d rows.
        let g = z.dim(1)? / (3 * d);
        let z = z.reshape((b, g, 3 * d, n))?;
        let q = z.narrow(2, 0, d)?.relu()?;
        let k = z.narrow(2, d, d)?.relu()?;
        let v = z.narrow(2, 2 * d, d)?.contiguous()?;
        let out = if linear {
            Self::linear(&q, &k, &v)?.to_dtype(dtype)?
        } else {
            Self::quadratic(&q, &k, &v)?
        };
        // 4. [B, G·d, H, W] → to_out (1×1) → norm → + input.
        let out = pointwise(&self.to_out, &out.reshape((b, g * d, h, w))?)?;
        self.norm_out.forward_add(&out, x)
    }
}

/// `GLUMBConv` with `norm_type="rms_norm"` and the residual: 1×1 expand (bias), SiLU, depthwise
/// 3×3 (bias), GLU gate, 1×1 project (no bias), channel RMSNorm, + input.
#[derive(Debug, Clone)]
struct GluMbConv {
    w: GluConvWeights,
    norm: ChannelRmsNorm,
}

impl GluMbConv {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w: GluConvWeights::load(c, 4 * c, vb.clone())?,
            norm: ChannelRmsNorm::new(c, vb.pp("norm"))?,
        })
    }
}

impl Module for GluMbConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gated = if x.dtype() == DType::F32 {
            // 1. 1×1 expansion without its bias: [B, 2Hf, H, W].
            let pre = pointwise(&self.w.inverted_w, x)?;
            // 2. Bias, SiLU, depthwise 3×3 with bias, GLU gate, one fused pass: [B, Hf, H, W].
            glu_depthwise_conv2d(&pre, &self.w.depth_w, &self.w.biases, 1)?
        } else {
            // Half precision rounds after every op, as the reference does (the fused pass rounds
            // once; more precise, but not the reference's numbers).
            let (c2, hidden) = (self.w.biases.dim(1)?, self.w.biases.dim(1)? / 2);
            let bias = |i: usize| self.w.biases.get(i)?.reshape((1, c2, 1, 1));
            let pre = pointwise_bias(&self.w.inverted_w, &bias(0)?, x)?.silu()?;
            let z = depthwise_conv2d(&pre, &self.w.depth_w, Some(&self.w.biases.get(1)?), 1)?;
            // [B, Hf, H, W] value half · SiLU(gate half).
            (z.narrow(1, 0, hidden)? * z.narrow(1, hidden, hidden)?.silu()?)?
        };
        // 3. 1×1 projection, norm, residual.
        let out = pointwise(&self.w.point_w, &gated)?;
        self.norm.forward_add(&out, Some(x))
    }
}

/// `EfficientViTBlock`: multiscale linear attention, then GLUMBConv, each with its residual.
#[derive(Debug, Clone)]
struct EfficientViTBlock {
    attn: SanaMultiscaleLinearAttention,
    conv_out: GluMbConv,
}

impl EfficientViTBlock {
    fn new(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            attn: SanaMultiscaleLinearAttention::new(s, vb.pp("attn"))?,
            conv_out: GluMbConv::new(s.channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for EfficientViTBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_out.forward(&self.attn.forward(x)?)
    }
}

/// Repeats every channel `r` times consecutively (`repeat_interleave(r, dim=1)`).
fn repeat_channels(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    // [B, C, 1, H, W] → [B, C, r, H, W] → [B, C·r, H, W].
    x.unsqueeze(2)?
        .broadcast_as((b, c, r, h, w))?
        .contiguous()?
        .reshape((b, c * r, h, w))
}

/// Averages groups of `g` consecutive channels (`unflatten(1, (-1, g)).mean(2)`).
fn average_channel_groups(x: &Tensor, g: usize) -> candle_core::Result<Tensor> {
    if g == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    // [B, C/g, g, H, W] → mean over g.
    x.reshape((b, c / g, g, h, w))?.mean(2)
}

/// `DCDownBlock2d`: stride-2 conv (or conv + pixel-unshuffle) plus the optional
/// pixel-unshuffle/group-average shortcut.
#[derive(Debug, Clone)]
struct DCDownBlock2d {
    conv: Conv2d,
    pixel_unshuffle: bool,
    shortcut: Option<usize>, // group size
}

impl DCDownBlock2d {
    fn new(
        cin: usize,
        cout: usize,
        pixel_unshuffle: bool,
        shortcut: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (conv_out, stride) = if pixel_unshuffle {
            (cout / 4, 1)
        } else {
            (cout, 2)
        };
        Ok(Self {
            conv: Conv2d::new(cin, conv_out, 3, stride, true, vb.pp("conv"))?,
            pixel_unshuffle,
            shortcut: shortcut.then_some(cin * 4 / cout),
        })
    }
}

impl Module for DCDownBlock2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.conv.forward(x)?;
        if self.pixel_unshuffle {
            y = candle_nn::ops::pixel_unshuffle(&y, 2)?;
        }
        match self.shortcut {
            // [B, 4C, H/2, W/2], then the mean of each group of consecutive channels.
            Some(g) => y + average_channel_groups(&candle_nn::ops::pixel_unshuffle(x, 2)?, g)?,
            None => Ok(y),
        }
    }
}

/// `DCUpBlock2d`: nearest ×2 then conv (or conv + pixel-shuffle) plus the optional
/// repeat-interleave/pixel-shuffle shortcut.
#[derive(Debug, Clone)]
struct DCUpBlock2d {
    conv: Conv2d,
    interpolate: bool,
    shortcut: Option<usize>, // repeats
}

impl DCUpBlock2d {
    fn new(
        cin: usize,
        cout: usize,
        interpolate: bool,
        shortcut: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let conv_out = if interpolate { cout } else { cout * 4 };
        Ok(Self {
            conv: Conv2d::new(cin, conv_out, 3, 1, true, vb.pp("conv"))?,
            interpolate,
            shortcut: shortcut.then_some(cout * 4 / cin),
        })
    }
}

impl Module for DCUpBlock2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let y = if self.interpolate {
            self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
        } else {
            candle_nn::ops::pixel_shuffle(&self.conv.forward(x)?, 2)?
        };
        match self.shortcut {
            Some(r) => y + candle_nn::ops::pixel_shuffle(&repeat_channels(x, r)?, 2)?,
            None => Ok(y),
        }
    }
}

/// One block of a stage.
#[derive(Debug, Clone)]
enum Block {
    Res(ResBlock),
    EfficientViT(Box<EfficientViTBlock>),
    Down(DCDownBlock2d),
    Up(DCUpBlock2d),
}

impl Block {
    fn stage_block(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match s.block_type {
            "ResBlock" => Self::Res(ResBlock::new(s, vb)?),
            _ => Self::EfficientViT(Box::new(EfficientViTBlock::new(s, vb)?)),
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Res(b) => b.forward(x),
            Self::EfficientViT(b) => b.forward(x),
            Self::Down(b) => b.forward(x),
            Self::Up(b) => b.forward(x),
        }
    }
}

/// The encoder's or decoder's first/last layer: a plain conv, or a DC block for a 0-layer stage.
#[derive(Debug, Clone)]
enum Edge {
    Conv(Conv2d),
    Down(DCDownBlock2d),
    Up(DCUpBlock2d),
}

impl Module for Edge {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(x),
            Self::Down(b) => b.forward(x),
            Self::Up(b) => b.forward(x),
        }
    }
}

/// diffusers `Encoder`: image `[B, in, H, W]` → latent `[B, latent, H/32, W/32]` (unscaled).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Edge,
    stages: Vec<Vec<Block>>,
    conv_out: Conv2d,
    out_shortcut: Option<usize>,
}

impl Encoder {
    fn new(cfg: &AutoencoderDCConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.encoder_block_out_channels;
        let n = ch.len();
        let unshuffle = cfg.downsample_block_type == "pixel_unshuffle";
        let conv_in = if cfg.encoder_layers_per_block[0] > 0 {
            Edge::Conv(Conv2d::new(
                cfg.in_channels,
                ch[0],
                3,
                1,
                true,
                vb.pp("conv_in"),
            )?)
        } else {
            Edge::Down(DCDownBlock2d::new(
                cfg.in_channels,
                ch[1],
                unshuffle,
                false,
                vb.pp("conv_in"),
            )?)
        };
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let s = cfg.stage(Half::Encoder, i);
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut blocks = (0..s.layers)
                .map(|j| Block::stage_block(&s, vb.pp(j)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            if i + 1 < n && s.layers > 0 {
                blocks.push(Block::Down(DCDownBlock2d::new(
                    ch[i],
                    ch[i + 1],
                    unshuffle,
                    true,
                    vb.pp(s.layers),
                )?));
            }
            stages.push(blocks);
        }
        Ok(Self {
            conv_in,
            stages,
            conv_out: Conv2d::new(
                ch[n - 1],
                cfg.latent_channels,
                3,
                1,
                true,
                vb.pp("conv_out"),
            )?,
            out_shortcut: cfg
                .encoder_out_shortcut
                .then_some(ch[n - 1] / cfg.latent_channels),
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in self.stages.iter().flatten() {
            h = block.forward(&h)?;
        }
        let out = self.conv_out.forward(&h)?;
        match self.out_shortcut {
            Some(g) => out + average_channel_groups(&h, g)?,
            None => Ok(out),
        }
    }
}

/// diffusers `Decoder`: latent `[B, latent, h, w]` (already divided by `scaling_factor`) →
/// image `[B, in, 32h, 32w]`.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    in_shortcut: Option<usize>,
    /// `up_blocks.{i}`, in execution order (deepest stage first).
    stages: Vec<Vec<Block>>,
    norm_out: ChannelRmsNorm,
    conv_act: Activation,
    conv_out: Edge,
}

impl Decoder {
    fn new(cfg: &AutoencoderDCConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.decoder_block_out_channels;
        let n = ch.len();
        let interpolate = cfg.upsample_block_type == "interpolate";
        let mut stages = Vec::with_capacity(n);
        for i in (0..n).rev() {
            let s = cfg.stage(Half::Decoder, i);
            let vb = vb.pp(format!("up_blocks.{i}"));
            let mut blocks = Vec::with_capacity(s.layers + 1);
            let has_up = i + 1 < n && s.layers > 0;
            if has_up {
                blocks.push(Block::Up(DCUpBlock2d::new(
                    ch[i + 1],
                    ch[i],
                    interpolate,
                    true,
                    vb.pp(0),
                )?));
            }
            for j in 0..s.layers {
                blocks.push(Block::stage_block(&s, vb.pp(j + usize::from(has_up)))?);
            }
            stages.push(blocks);
        }
        let head = if cfg.decoder_layers_per_block[0] > 0 {
            ch[0]
        } else {
            ch[1]
        };
        let conv_out = if cfg.decoder_layers_per_block[0] > 0 {
            Edge::Conv(Conv2d::new(
                head,
                cfg.in_channels,
                3,
                1,
                true,
                vb.pp("conv_out"),
            )?)
        } else {
            Edge::Up(DCUpBlock2d::new(
                head,
                cfg.in_channels,
                interpolate,
                false,
                vb.pp("conv_out"),
            )?)
        };
        Ok(Self {
            conv_in: Conv2d::new(cfg.latent_channels, ch[n - 1], 3, 1, true, vb.pp("conv_in"))?,
            in_shortcut: cfg
                .decoder_in_shortcut
                .then_some(ch[n - 1] / cfg.latent_channels),
            stages,
            norm_out: ChannelRmsNorm::new(head, vb.pp("norm_out"))?,
            conv_act: Activation::parse(&cfg.decoder_conv_act_fn)
                .expect("validated; this is a bug"),
            conv_out,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        if let Some(r) = self.in_shortcut {
            h = (h + repeat_channels(z, r)?)?;
        }
        for block in self.stages.iter().flatten() {
            h = block.forward(&h)?;
        }
        let h = self.conv_act.forward(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// Tiled decoding settings, in image pixels (diffusers `enable_tiling`; defaults as diffusers).
///
/// A latent is cut into tiles of `tile_sample_min / 32` latent pixels every `tile_sample_stride / 32`,
/// each tile is decoded alone, and neighbours are blended over `min − stride` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Self {
            tile_sample_min_height: 512,
            tile_sample_min_width: 512,
            tile_sample_stride_height: 448,
            tile_sample_stride_width: 448,
        }
    }
}

impl Tiling {
    /// 1024-pixel tiles every 896 (the NVlabs setting for 4K; 512 tiles show seams in flat areas).
    pub fn for_4k() -> Self {
        Self {
            tile_sample_min_height: 1024,
            tile_sample_min_width: 1024,
            tile_sample_stride_height: 896,
            tile_sample_stride_width: 896,
        }
    }

    fn check(&self, ratio: usize) -> Result<()> {
        for (field, min, stride) in [
            (
                "tile_sample_min_height",
                self.tile_sample_min_height,
                self.tile_sample_stride_height,
            ),
            (
                "tile_sample_min_width",
                self.tile_sample_min_width,
                self.tile_sample_stride_width,
            ),
        ] {
            if stride < ratio
                || stride > min
                || !min.is_multiple_of(ratio)
                || !stride.is_multiple_of(ratio)
            {
                return Err(Error::Unsupported {
                    field,
                    value: format!("{min} (stride {stride})"),
                    reason: format!(
                        "tile size and stride must be multiples of {ratio} with 0 < stride ≤ size"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Linear blend ramp of diffusers' `blend_v` / `blend_h` along `dim` (2 = rows, 3 = columns):
/// the first `e` lines of `b` become `a_tail[y]·(1 − y/e) + b[y]·(y/e)`, where `a_tail` holds the
/// last `e` lines of the neighbour.
fn blend(a_tail: &Tensor, b: &Tensor, dim: usize, extent: usize) -> candle_core::Result<Tensor> {
    let e = extent.min(a_tail.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let a = a_tail.narrow(dim, a_tail.dim(dim)? - e, e)?;
    let head = b.narrow(dim, 0, e)?;
    // Weights y/e for y in 0..e, as torch computes `y / blend_extent` in double then the product
    // in the tensor dtype.
    let ramp: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let inv: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let wb = Tensor::from_vec(ramp, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let wa = Tensor::from_vec(inv, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let mixed = (a.broadcast_mul(&wa)? + head.broadcast_mul(&wb)?)?;
    let rest = b.narrow(dim, e, b.dim(dim)? - e)?;
    Tensor::cat(&[&mixed, &rest], dim)
}

/// diffusers `AutoencoderDC`.
#[derive(Debug, Clone)]
pub struct AutoencoderDC {
    cfg: AutoencoderDCConfig,
    encoder: Encoder,
    decoder: Decoder,
    dtype: DType,
    device: Device,
}

impl AutoencoderDC {
    /// Builds the model from a `VarBuilder` whose keys are the diffusers names.
    pub fn new(cfg: &AutoencoderDCConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        if vb.dtype() == DType::F16 {
            return Err(Error::Unsupported {
                field: "dtype",
                value: "f16".into(),
                reason: "the DC-AE overflows in fp16 (the reference has no clamp for it); use bf16 or f32"
                    .into(),
            });
        }
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
        })
    }

    /// Loads `config.json` and the weights of a diffusers `vae/` folder.
    ///
    /// `variant` (e.g. `"bf16"`) prefers `diffusion_pytorch_model.<variant>.safetensors` when present.
    pub fn load(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: AutoencoderDCConfig = read_config(&dir.join("config.json"))?;
        cfg.validate()?;
        let ckpt = Checkpoint::open_dir(dir, "diffusion_pytorch_model", variant)?;
        let model = Self::new(&cfg, ckpt.var_builder(dtype, device))?;
        // BatchNorm's step counter is training state, never read at inference.
        let unused: Vec<String> = ckpt
            .unused_keys()
            .into_iter()
            .filter(|k| !k.ends_with(".num_batches_tracked"))
            .collect();
        if !unused.is_empty() {
            tracing::warn!(
                component = "vae",
                count = unused.len(),
                first = %unused.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                "checkpoint tensors not used by the model"
            );
        }
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderDCConfig {
        &self.cfg
    }

    /// The dtype the weights were loaded in (activations run in it too).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn check_input(&self, x: &Tensor, channels: usize, multiple: usize, what: &str) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        if c != channels || h % multiple != 0 || w % multiple != 0 || h == 0 || w == 0 {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "{what} {:?} does not fit the model: want [B, {channels}, H, W] with H and W positive multiples of {multiple}",
                x.dims()
            ))));
        }
        Ok(())
    }

    /// Image `[B, in_channels, H, W]` (values in [−1, 1], H and W multiples of 32) → latent
    /// `[B, latent_channels, H/32, W/32]`, not yet multiplied by `scaling_factor`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("dcae_encode").entered();
        self.check_input(
            x,
            self.cfg.in_channels,
            self.cfg.spatial_compression_ratio(),
            "image",
        )?;
        Ok(self.encoder.forward(&x.to_dtype(self.dtype)?)?)
    }

    /// Latent `[B, latent_channels, h, w]` (already divided by `scaling_factor`) → image
    /// `[B, in_channels, 32h, 32w]`, nominally in [−1, 1] (not clamped), in one pass.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("dcae_decode").entered();
        self.check_input(z, self.cfg.latent_channels, 1, "latent")?;
        Ok(self.decoder.forward(&z.to_dtype(self.dtype)?)?)
    }

    /// diffusers `_decode` with tiling enabled: tiles only when the latent exceeds one tile.
    pub fn decode_with(&self, z: &Tensor, tiling: Option<&Tiling>) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let ratio = self.cfg.spatial_compression_ratio();
        match tiling {
            Some(t)
                if h > t.tile_sample_min_height / ratio || w > t.tile_sample_min_width / ratio =>
            {
                self.tiled_decode(z, t)
            }
            _ => self.decode(z),
        }
    }

    /// diffusers `tiled_decode`: the whole image, assembled from blended tiles.
    pub fn tiled_decode(&self, z: &Tensor, tiling: &Tiling) -> Result<Tensor> {
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        self.tiled_decode_each(z, tiling, |ti, _tj, tile| {
            if rows.len() <= ti {
                rows.push(Vec::new());
            }
            rows[ti].push(tile);
            Ok(())
        })?;
        let rows = rows
            .iter()
            .map(|r| Tensor::cat(r, 3))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 2)?)
    }

    /// diffusers `tiled_decode`, streamed: hands each finished (blended and cropped) tile to
    /// `sink(row, column, tile)` in raster order; tile (i, j) covers image rows from
    /// `i · stride_h` and columns from `j · stride_w`.
    ///
    /// Memory stays bounded by one tile's decode plus the blend margins: diffusers keeps every
    /// decoded tile until the end, but a tile's blend only reads the last `min − stride` rows of
    /// the (already blended) tile above and the last columns of the one to its left, so only those
    /// are kept. The result is the same values.
    pub fn tiled_decode_each(
        &self,
        z: &Tensor,
        tiling: &Tiling,
        mut sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let _span = tracing::trace_span!("dcae_tiled_decode").entered();
        let ratio = self.cfg.spatial_compression_ratio();
        tiling.check(ratio)?;
        self.check_input(z, self.cfg.latent_channels, 1, "latent")?;
        let (_, _, h, w) = z.dims4()?;
        let (min_h, min_w) = (
            tiling.tile_sample_min_height / ratio,
            tiling.tile_sample_min_width / ratio,
        );
        let (stride_h, stride_w) = (
            tiling.tile_sample_stride_height / ratio,
            tiling.tile_sample_stride_width / ratio,
        );
        let blend_h = tiling.tile_sample_min_height - tiling.tile_sample_stride_height;
        let blend_w = tiling.tile_sample_min_width - tiling.tile_sample_stride_width;
        // The last `blend_h` rows of each blended tile of the previous tile row, by column.
        let mut above: Vec<Tensor> = Vec::new();
        for (ti, i) in (0..h).step_by(stride_h).enumerate() {
            let mut current: Vec<Tensor> = Vec::new();
            // The last `blend_w` columns of the blended tile to the left.
            let mut left: Option<Tensor> = None;
            for (tj, j) in (0..w).step_by(stride_w).enumerate() {
                let latent = z
                    .narrow(2, i, min_h.min(h - i))?
                    .narrow(3, j, min_w.min(w - j))?;
                let mut tile = self.decode(&latent)?;
                if ti > 0 {
                    tile = blend(&above[tj], &tile, 2, blend_h)?;
                }
                if let Some(l) = &left {
                    tile = blend(l, &tile, 3, blend_w)?;
                }
                let (th, tw) = (tile.dim(2)?, tile.dim(3)?);
                // Own storage for the kept margins (a view would keep the whole tile alive).
                let own = |t: Tensor| {
                    if t.is_contiguous() {
                        t.copy()
                    } else {
                        t.contiguous()
                    }
                };
                current.push(own(tile.narrow(
                    2,
                    th - blend_h.min(th),
                    blend_h.min(th),
                )?)?);
                left = Some(own(tile.narrow(
                    3,
                    tw - blend_w.min(tw),
                    blend_w.min(tw),
                )?)?);
                let crop = tile
                    .narrow(2, 0, tiling.tile_sample_stride_height.min(th))?
                    .narrow(3, 0, tiling.tile_sample_stride_width.min(tw))?;
                sink(ti, tj, crop)?;
            }
            above = current;
        }
        Ok(())
    }

    /// Estimated peak bytes of activations for an un-tiled decode of a `[batch, latent, h, w]`
    /// latent (weights not included): the largest working set of any block, counted as the maps
    /// alive at once — input, its f32 copy (bf16 on CPU), conv output and im2col, norm
    /// temporaries, shortcut and residual sum — at 4 bytes a value whatever the
    /// dtype (bf16 widens to f32 for norms and CPU convs; an overestimate on GPU errs towards
    /// tiling). The memory test checks it against a measured peak. The pipeline compares it with
    /// its budget to turn tiling on.
    pub fn decode_peak_bytes(&self, batch: usize, h: usize, w: usize) -> usize {
        let cfg = &self.cfg;
        let ch = &cfg.decoder_block_out_channels;
        let n = ch.len();
        // A 3×3 conv's workspace: on CPU the Winograd filters and its two transformed bands (16
        // values per 2×2 tile and channel, at least one tile row: width ≤ px / h), on GPU the
        // im2col matrix of candle's conv.
        let workspace = |cin: usize, px: usize| {
            if self.device.is_cpu() {
                let band = (4 * cin * px).min(WINOGRAD_BAND_VALUES.max(8 * cin * px / h.max(1)));
                16 * cin * cin + 2 * band
            } else {
                9 * cin * px * batch
            }
        };
        let mut peak = 0usize;
        for i in 0..n {
            let scale = 1usize << (n - 1 - i);
            let px = h * w * scale * scale; // per image
            let c = ch[i];
            let layers = cfg.decoder_layers_per_block[i];
            let block = match (layers, cfg.decoder_block_types.get(i)) {
                (0, _) => 0,
                (_, "ResBlock") => batch * px * 8 * c + workspace(c, px),
                // GLUMBConv: the 8C expansion, the 4C gate output, projection, norm, residual.
                _ => batch * px * 16 * c,
            };
            let up = if i + 1 < n && layers > 0 {
                // input (¼ size), upsampled input and its f32 copy, conv output, bias sum,
                // repeated and shuffled shortcut, sum.
                let cin = ch[i + 1];
                batch * px * (cin / 4 + 2 * cin + 5 * c) + workspace(cin, px)
            } else {
                0
            };
            peak = peak.max(block.max(up));
        }
        // Head at full resolution: norm temporaries, activation, conv copy and output.
        let head = if cfg.decoder_layers_per_block[0] > 0 {
            ch[0]
        } else {
            ch[1]
        };
        let full = h * w * (1 << (2 * (n - 1)));
        4 * peak.max(batch * full * (6 * head + 2 * cfg.in_channels) + workspace(head, full))
    }

    /// Whether an un-tiled decode of `[batch, ·, h, w]` is estimated to need more than
    /// `budget_bytes` of activations (see [`Self::decode_peak_bytes`]).
    pub fn decode_exceeds(&self, batch: usize, h: usize, w: usize, budget_bytes: usize) -> bool {
        self.decode_peak_bytes(batch, h, w) > budget_bytes
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::winograd_conv3x3;

    /// Winograd against candle's own conv2d: odd sizes (ragged last tiles), a batch, more output
    /// than input channels and the reverse, one band and one tile row per band.
    #[test]
    fn winograd_equals_conv2d() {
        let dev = Device::Cpu;
        for (b, cin, cout, h, w) in [
            (2, 5, 7, 7, 9),
            (1, 8, 3, 1, 1),
            (1, 3, 4, 10, 6),
            (2, 6, 6, 5, 12),
        ] {
            let x = Tensor::randn(0f32, 1., (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., cout, &dev).unwrap();
            let want = x
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let packed = Tensor::cat(
                &[wt.flatten_from(1).unwrap(), bias.unsqueeze(1).unwrap()],
                1,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tw = w.div_ceil(2);
            for band in [usize::MAX / 64, 1] {
                let got = winograd_conv3x3(&xs, &packed, (b, cin, h, w), cout, cin * 9 + 1, band);
                sana_testing::assert_close_f32(
                    &format!("b {b} cin {cin} cout {cout} {h}x{w} band {band} (tile row {tw})"),
                    &got,
                    &want,
                    1e-5,
                    "f32 tolerance 1e-5 × max|ref|",
                );
            }
        }
    }
}
