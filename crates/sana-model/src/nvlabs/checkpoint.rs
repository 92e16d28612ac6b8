//! An NVlabs `.pth` seen under diffusers key names: the key map of diffusers'
//! `scripts/convert_sana_to_diffusers.py` (spec §8), fused projections split on the fly, every
//! lookup checked against the pickle's shape.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::transformer::SanaTransformerConfig;
use crate::{Error, Result};

/// NVlabs tensors that the diffusers model has no place for: the learned null caption (training
/// only), the sin-cos table (recomputed) and the Sprint training head.
const DROPPED: &[&str] = &["y_embedder.y_embedding", "pos_embed", "logvar_linear."];

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

    /// A `VarBuilder` over diffusers names that converts every tensor to `dtype` on `device`
    /// (bf16 on the CPU: see [`crate::weights::var_builder_for`]).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        crate::weights::var_builder_for(Box::new(self.clone()), dtype, device)
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
                "model.model / model.hidden_size (width)",
                cfg.inner_dim(),
                width,
                "dim 0 of x_embedder.proj.weight",
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
                "model.model / model.patch_size (patch size)",
                cfg.patch_size,
                p,
                "dim 2 of x_embedder.proj.weight",
            );
        }
        let has_norm = self.shape("attention_y_norm.weight").is_some();
        if has_norm != cfg.caption_norm {
            return Err(Error::Unsupported {
                field: "text_encoder.y_norm",
                value: cfg.caption_norm.to_string(),
                reason: format!(
                    "the checkpoint {file} {} `attention_y_norm.weight`",
                    if has_norm { "has" } else { "has no" }
                ),
            });
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
                "model.model / model.depth (depth)",
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
}
