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
//! The transformer config, the instruction, the sampler and the generation defaults come from the
//! YAML, read as NVlabs' own code reads it ([`NvlabsConfig`], `config.rs`); the width, depth,
//! latent channels, patch size, caption width and the caption norm are then checked against the
//! checkpoint's own shapes.

mod checkpoint;
mod config;

use std::path::Path;

use candle_core::{DType, Device};

pub use checkpoint::NvlabsCheckpoint;
pub use config::{
    Geometry, ModelSection, NvlabsConfig, SchedulerSection, TextEncoderSection, VaeSection,
    REGISTRY,
};

use crate::transformer::SanaTransformer2DModel;
use crate::Result;

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
