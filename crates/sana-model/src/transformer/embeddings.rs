//! Timestep (and guidance) embeddings with adaLN-single's projection, and the 2-D sin-cos position
//! embedding of the 2K/4K models.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::config::SanaTransformerConfig;
use super::lora::{site, LoraRows};
use crate::nn::{linear, Linear};

/// The frequencies of the sinusoidal timestep features (`Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`): `f_k = exp(−ln(10000)·k/128)` in f32, `[1, 128]`, made once at load.
pub(super) fn timestep_freqs(device: &Device) -> candle_core::Result<Tensor> {
    const HALF: usize = 128;
    let freqs: Vec<f32> = (0..HALF)
        .map(|k| (-(10000f32.ln()) * k as f32 / HALF as f32).exp())
        .collect();
    Tensor::from_vec(freqs, (1, HALF), device)
}

/// Sinusoidal timestep features `[cos(t·f) ++ sin(t·f)]` in f32, `[B, 256]`.
pub(super) fn timestep_features(t: &Tensor, freqs: &Tensor) -> candle_core::Result<Tensor> {
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(freqs)?; // [B, 128]
    Tensor::cat(&[args.cos()?, args.sin()?], 1) // [B, 256]
}

/// `TimestepEmbedding`: linear_1 → SiLU → linear_2.
#[derive(Debug, Clone)]
pub(super) struct TimestepEmbedding {
    pub(super) linear_1: Linear,
    pub(super) linear_2: Linear,
    /// [`timestep_freqs`] on the model's device.
    pub(super) freqs: Tensor,
}

impl TimestepEmbedding {
    pub(super) fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(256, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
            freqs: timestep_freqs(vb.device())?,
        })
    }

    /// `t`: `[1]` float value of row `row` → `[1, D]` in `dtype`; `sites`: the LoRA sites of
    /// `linear_1` and `linear_2`.
    pub(super) fn forward(
        &self,
        t: &Tensor,
        dtype: DType,
        (lora, row): (&LoraRows, usize),
        sites: (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let feat = timestep_features(t, &self.freqs)?.to_dtype(dtype)?;
        let h = lora
            .apply_row(sites.0, row, &feat, self.linear_1.forward(&feat)?)?
            .silu()?;
        lora.apply_row(sites.1, row, &h, self.linear_2.forward(&h)?)
    }
}

/// `AdaLayerNormSingle` (plain models) or `SanaCombinedTimestepGuidanceEmbeddings` (Sprint).
#[derive(Debug, Clone)]
pub(super) struct TimeEmbed {
    pub(super) timestep_embedder: TimestepEmbedding,
    pub(super) guidance_embedder: Option<TimestepEmbedding>,
    pub(super) linear: Linear,
}

impl TimeEmbed {
    pub(super) fn new(cfg: &SanaTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let (timestep_embedder, guidance_embedder) = if cfg.guidance_embeds {
            (
                TimestepEmbedding::new(d, vb.pp("timestep_embedder"))?,
                Some(TimestepEmbedding::new(d, vb.pp("guidance_embedder"))?),
            )
        } else {
            (
                TimestepEmbedding::new(d, vb.pp("emb.timestep_embedder"))?,
                None,
            )
        };
        Ok(Self {
            timestep_embedder,
            guidance_embedder,
            linear: linear(d, 6 * d, vb.pp("linear"))?,
        })
    }

    /// Returns (`t6` `[B, 6D]` for the blocks, `embedded_timestep` `[B, D]` for the final layer).
    ///
    /// Row by row: a matmul's result for a row may depend on how many rows it is given (the
    /// kernels differ for tiny ones), and a row's embedding must not depend on its batchmates.
    pub(super) fn forward(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
        lora: &LoraRows,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rows = (0..t.dim(0)?)
            .map(|i| {
                self.forward_row(
                    &t.narrow(0, i, 1)?,
                    guidance.map(|g| g.narrow(0, i, 1)).transpose()?.as_ref(),
                    dtype,
                    (lora, i),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (t6, e): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().unzip();
        Ok((Tensor::cat(&t6, 0)?, Tensor::cat(&e, 0)?))
    }

    fn forward_row(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        dtype: DType,
        lora: (&LoraRows, usize),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut e =
            self.timestep_embedder
                .forward(t, dtype, lora, (site::TIMESTEP_1, site::TIMESTEP_2))?;
        match (&self.guidance_embedder, guidance) {
            (Some(g_emb), Some(g)) => {
                e = (e + g_emb.forward(g, dtype, lora, (site::GUIDANCE_1, site::GUIDANCE_2))?)?
            }
            (Some(_), None) => {
                candle_core::bail!("this model has a guidance embedding: pass a guidance value")
            }
            (None, Some(_)) => {
                candle_core::bail!("this model has no guidance embedding: guidance must be None")
            }
            (None, None) => {}
        }
        let s = e.silu()?;
        let t6 = lora
            .0
            .apply_row(site::TIME_LINEAR, lora.1, &s, self.linear.forward(&s)?)?;
        Ok((t6, e))
    }
}

/// 2-D sin-cos position embedding, diffusers `get_2d_sincos_pos_embed`, `[h·w, dim]` in f32.
///
/// Grid coordinates are f32 as torch computes them (`arange / (n / base) / scale`), the
/// frequencies and products f64. The first half of each vector encodes the column, the second
/// half the row.
pub fn sincos_pos_embed(dim: usize, h: usize, w: usize, base: usize, scale: f64) -> Vec<f32> {
    let coords = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| (i as f32 / (n as f64 / base as f64) as f32 / scale as f32) as f64)
            .collect()
    };
    let (rows, cols) = (coords(h), coords(w));
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(h * w * dim);
    for &r in &rows {
        for &c in &cols {
            for pos in [c, r] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}
