//! LoRA adapters and perturbed-attention guidance (PAG) at the pipeline level: adapters loaded
//! once and chosen per prompt, PAG layers named as diffusers' `SanaPAGPipeline` takes them, and the
//! per-row options of a generation's forwards.
//!
//! Row layout of a forward: `[negative (CFG only); positive; perturbed (PAG only)]`, one row per
//! image in each group; an image's adapters apply to all of its rows.

use std::path::Path;
use std::sync::Arc;

use super::{GenerateRequest, PipelineKind, SanaPipeline};
use crate::transformer::{LoraAdapter, LoraRows, Perturbed, RowOptions};
use crate::{Error, Result};

/// One adapter a prompt asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    /// The adapter's name (see [`SanaPipeline::add_lora`]).
    pub name: String,
    /// Multiplies the adapter's own `alpha / r` scaling (diffusers' `set_adapters` weight).
    pub scale: f32,
}

/// PAG when a request does not say: for a `SanaPAGPipeline` folder diffusers' call and constructor
/// defaults, `pag_scale = 3.0` on `transformer_blocks.0`; for an NVlabs checkpoint its YAML's
/// `pag_applied_layers` at scale 0 (off unless asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct PagDefaults {
    pub scale: f32,
    pub layers: Vec<usize>,
}

impl SanaPipeline {
    /// Loads a LoRA adapter under `name` (see [`crate::transformer::lora`]): every request may
    /// then choose it by name, with its own scale. Names are unique.
    pub fn add_lora(&mut self, name: &str, path: &Path) -> Result<Arc<LoraAdapter>> {
        if name.is_empty() || self.loras.iter().any(|a| a.name() == name) {
            return Err(Error::Unsupported {
                field: "lora",
                value: name.to_string(),
                reason: "adapter names must be non-empty and unique".into(),
            });
        }
        let adapter = Arc::new(self.transformer.load_lora(name, path)?);
        tracing::info!(
            adapter = name,
            path = %adapter.path().display(),
            modules = adapter.module_count(),
            ranks = ?adapter.ranks(),
            bytes = adapter.size_bytes(),
            "LoRA adapter loaded"
        );
        self.loras.push(adapter.clone());
        Ok(adapter)
    }

    /// The loaded adapters, in load order.
    pub fn loras(&self) -> &[Arc<LoraAdapter>] {
        &self.loras
    }

    /// PAG's defaults: `Some` for `SanaPAGPipeline` folders and NVlabs YAMLs that name blocks.
    pub fn pag_defaults(&self) -> Option<&PagDefaults> {
        self.pag_defaults.as_ref()
    }

    /// The blocks PAG perturbs when a request names none: the defaults', else diffusers' default
    /// `transformer_blocks.0`.
    pub fn default_pag_layers(&self) -> Vec<usize> {
        self.pag_defaults
            .as_ref()
            .map_or_else(|| vec![0], |d| d.layers.clone())
    }

    /// The transformer blocks PAG perturbs for `layers` as diffusers' `pag_applied_layers` takes
    /// them (see [`sana_backend::resolve_pag_layers`]), ascending.
    pub fn resolve_pag_layers(&self, layers: &[String]) -> Result<Vec<usize>> {
        resolve_pag_layers(self.transformer.config().num_layers, layers)
    }

    /// Adapters and PAG rows of `req`'s forwards: `images` rows per group, `cfg` doubling them
    /// with the negative rows first, PAG (`Some(layers)`) adding one perturbed row per image.
    pub(super) fn row_options(
        &self,
        req: &GenerateRequest,
        cfg: bool,
        pag_layers: Option<&[usize]>,
    ) -> Result<RowOptions> {
        let images: usize = req.items.iter().map(|i| i.num_images).sum();
        let groups = 1 + usize::from(cfg) + usize::from(pag_layers.is_some());
        let mut adapters = Vec::new();
        for adapter in &self.loras {
            let per_image: Vec<f32> = req
                .items
                .iter()
                .flat_map(|item| {
                    let scale: f32 = item
                        .lora
                        .iter()
                        .filter(|c| c.name == adapter.name())
                        .map(|c| c.scale)
                        .sum();
                    std::iter::repeat_n(scale, item.num_images)
                })
                .collect();
            if per_image.iter().any(|&s| s != 0.0) {
                adapters.push((adapter.clone(), per_image.repeat(groups)));
            }
        }
        let t = &self.transformer;
        Ok(RowOptions {
            lora: LoraRows::new(adapters, t.config(), t.dtype(), &self.device)?,
            perturbed: pag_layers.map(|layers| Perturbed {
                first_row: images * (groups - 1),
                blocks: layers.to_vec(),
                // The positive rows, just before: same latents, text, timestep and adapters.
                copy_of: Some(images * (groups - 2)),
            }),
        })
    }

    /// Refuses adapter names this pipeline does not hold, repeated names, non-finite scales, and
    /// PAG on SANA-Sprint or with bad settings.
    pub(super) fn check_adapters(&self, req: &GenerateRequest) -> Result<()> {
        for item in &req.items {
            for (k, choice) in item.lora.iter().enumerate() {
                if !self.loras.iter().any(|a| a.name() == choice.name) {
                    let known: Vec<&str> = self.loras.iter().map(|a| a.name()).collect();
                    return Err(Error::Unsupported {
                        field: "lora",
                        value: choice.name.clone(),
                        reason: if known.is_empty() {
                            "no LoRA adapter is loaded".into()
                        } else {
                            format!("unknown adapter; loaded: {}", known.join(", "))
                        },
                    });
                }
                if item.lora[..k].iter().any(|c| c.name == choice.name) {
                    return Err(Error::Unsupported {
                        field: "lora",
                        value: choice.name.clone(),
                        reason: "an adapter may be named once per prompt".into(),
                    });
                }
                if !choice.scale.is_finite() {
                    return Err(Error::Unsupported {
                        field: "lora.scale",
                        value: choice.scale.to_string(),
                        reason: "must be finite".into(),
                    });
                }
            }
            for (field, v) in [
                ("pag_scale", item.pag_scale),
                ("pag_adaptive_scale", item.pag_adaptive_scale),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::Unsupported {
                        field,
                        value: v.to_string(),
                        reason: "must be finite and at least 0".into(),
                    });
                }
            }
        }
        let pag = !req.pag_layers.is_empty() && req.items.iter().any(|i| i.pag_scale > 0.0);
        if pag && self.kind == PipelineKind::Sprint {
            return Err(Error::Unsupported {
                field: "pag_scale",
                value: "> 0".into(),
                reason: "perturbed-attention guidance is not available for SANA-Sprint models"
                    .into(),
            });
        }
        if let Some(&bad) = req
            .pag_layers
            .iter()
            .find(|&&i| i >= self.transformer.config().num_layers)
        {
            return Err(Error::Unsupported {
                field: "pag_applied_layers",
                value: bad.to_string(),
                reason: format!(
                    "the transformer has {} blocks",
                    self.transformer.config().num_layers
                ),
            });
        }
        Ok(())
    }
}

/// See [`SanaPipeline::resolve_pag_layers`] ([`sana_backend::resolve_pag_layers`] as indices).
pub fn resolve_pag_layers(num_layers: usize, layers: &[String]) -> Result<Vec<usize>> {
    sana_backend::resolve_pag_layers(num_layers as u32, layers)
        .map(|set| set.indices().map(|i| i as usize).collect())
        .map_err(|reason| Error::Unsupported {
            field: "pag_applied_layers",
            value: layers.join(", "),
            reason,
        })
}
