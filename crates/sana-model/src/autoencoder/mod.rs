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

//!
//! Files follow diffusers' split: `config` (the `config.json` keys), `blocks` (convolutions, norms,
//! ResBlock, the multiscale linear attention, GLUMBConv, EfficientViTBlock), `encoder_decoder` (the DC
//! down/up blocks and the two halves), `tiling` (tiled decoding and the memory estimate that turns
//! it on), and this file (the model). The CPU convolution algorithms are in [`crate::ops`].

mod blocks;
mod config;
mod encoder_decoder;
mod tiling;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::{AutoencoderDCConfig, PerStage};
pub use tiling::Tiling;

use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};
use encoder_decoder::{Decoder, Encoder};

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
}
