//! ControlNet at the pipeline level, as diffusers' `SanaControlNetPipeline` does it: ControlNets
//! loaded once by name, a control image per prompt resized to the generation size (Lanczos,
//! like `image_processor.preprocess`), through the DC-AE encoder once per generation, times the
//! scaling factor, duplicated for CFG's negative rows, and the ControlNet's residuals added to
//! the transformer's blocks at every step with each prompt's conditioning scale.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::edit::{image_tensor, InitImage};
use super::{GenerateRequest, PipelineKind, SanaPipeline};
use crate::transformer::controlnet::SanaControlNetModel;
use crate::{Error, Result};

/// The folder of a ControlNet: `path` itself when it holds a `SanaControlNetModel` `config.json`,
/// else its `controlnet/` (a `SanaControlNetPipeline` folder).
pub fn controlnet_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    if path.join("controlnet/config.json").is_file() {
        return Ok(path.join("controlnet"));
    }
    Err(Error::Weights(format!(
        "{}: not a SanaControlNetModel folder (no config.json) nor a SanaControlNetPipeline folder \
         (no controlnet/config.json)",
        path.display()
    )))
}

/// The largest conditioning scale a request may give (in magnitude).
pub const MAX_CONDITIONING_SCALE: f32 = 100.0;

impl SanaPipeline {
    /// Loads a ControlNet under `name` (see [`controlnet_dir`]), in the transformer's dtype on
    /// its device; it must match the transformer's width, caption and latent channels.
    pub fn add_controlnet(&mut self, name: &str, path: &Path) -> Result<Arc<SanaControlNetModel>> {
        if name.is_empty() || self.controlnets.iter().any(|(n, _)| n == name) {
            return Err(Error::Unsupported {
                field: "controlnet",
                value: name.to_string(),
                reason: "ControlNet names must be non-empty and unique".into(),
            });
        }
        if self.kind == PipelineKind::Sprint {
            return Err(Error::Unsupported {
                field: "controlnet",
                value: name.to_string(),
                reason: "ControlNet is not available for SANA-Sprint models".into(),
            });
        }
        let dir = controlnet_dir(path)?;
        let t = self.transformer.config();
        let model = SanaControlNetModel::load(&dir, None, self.transformer.dtype(), &self.device)?;
        let c = model.config();
        let fits = c.inner_dim() == t.inner_dim()
            && c.caption_channels == t.caption_channels
            && c.in_channels == t.in_channels
            && c.patch_size == t.patch_size
            && c.num_layers < t.num_layers;
        if !fits {
            return Err(Error::Weights(format!(
                "{}: this ControlNet (width {}, {} blocks, caption {}, latent channels {}, patch {}) \
                 does not fit the transformer (width {}, {} blocks, caption {}, latent channels {}, \
                 patch {})",
                dir.display(),
                c.inner_dim(),
                c.num_layers,
                c.caption_channels,
                c.in_channels,
                c.patch_size,
                t.inner_dim(),
                t.num_layers,
                t.caption_channels,
                t.in_channels,
                t.patch_size
            )));
        }
        let blocks = c.num_layers;
        let model = Arc::new(model);
        tracing::info!(controlnet = name, path = %dir.display(), blocks, "ControlNet loaded");
        self.controlnets.push((name.to_string(), model.clone()));
        Ok(model)
    }

    /// The loaded ControlNets by name, in load order.
    pub fn controlnets(&self) -> &[(String, Arc<SanaControlNetModel>)] {
        &self.controlnets
    }

    /// The ControlNet a request names, after checking its control images and scales; `None`
    /// without ControlNet.
    pub(super) fn check_control(
        &self,
        req: &GenerateRequest,
    ) -> Result<Option<Arc<SanaControlNetModel>>> {
        let with_image = req
            .items
            .iter()
            .filter(|i| i.control_image.is_some())
            .count();
        // A request may leave the name out when exactly one ControlNet is loaded.
        let only = (self.controlnets.len() == 1).then(|| &self.controlnets[0].0);
        let Some(name) = req.controlnet.as_ref().or(only.filter(|_| with_image > 0)) else {
            if with_image > 0 {
                return Err(Error::Unsupported {
                    field: "control_image",
                    value: format!("{with_image} control images"),
                    reason: "a control image needs a ControlNet (`controlnet`)".into(),
                });
            }
            return Ok(None);
        };
        let Some((_, model)) = self.controlnets.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = self.controlnets.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::Unsupported {
                field: "controlnet",
                value: name.clone(),
                reason: if known.is_empty() {
                    "no ControlNet is loaded".into()
                } else {
                    format!("unknown ControlNet; loaded: {}", known.join(", "))
                },
            });
        };
        if self.kind == PipelineKind::Sprint {
            return Err(Error::Unsupported {
                field: "controlnet",
                value: name.clone(),
                reason: "ControlNet is not available for SANA-Sprint models".into(),
            });
        }
        if with_image != req.items.len() {
            return Err(Error::Unsupported {
                field: "control_image",
                value: format!("{with_image} of {} prompts", req.items.len()),
                reason: "every prompt of a ControlNet generation needs its control image".into(),
            });
        }
        for item in &req.items {
            let image = item.control_image.as_ref().expect("counted above");
            image.validate()?;
            if (image.width, image.height) != (req.width, req.height) {
                return Err(Error::Unsupported {
                    field: "control_image",
                    value: format!("{}x{}", image.width, image.height),
                    reason: format!(
                        "the control image must have the request's size, {}x{} (resize it first)",
                        req.width, req.height
                    ),
                });
            }
            let s = item.controlnet_scale.unwrap_or(1.0);
            if !(s.is_finite() && s.abs() <= MAX_CONDITIONING_SCALE) {
                return Err(Error::Unsupported {
                    field: "controlnet_conditioning_scale",
                    value: s.to_string(),
                    reason: format!(
                        "must be finite, at most {MAX_CONDITIONING_SCALE} in magnitude"
                    ),
                });
            }
        }
        Ok(Some(model.clone()))
    }

    /// The control latents of every image, `[images, C, h, w]` f32: each prompt's control image
    /// resized to the generation `size`, encoded once, times the scaling factor.
    pub(super) fn control_latents(
        &self,
        req: &GenerateRequest,
        size: (usize, usize),
        rows: &[u32],
    ) -> Result<Tensor> {
        let images = req
            .items
            .iter()
            .map(|i| {
                let image: &InitImage = i.control_image.as_ref().expect("checked by check_control");
                image_tensor(image, size, &self.device)
            })
            .collect::<Result<Vec<_>>>()?;
        let encoded = self
            .vae
            .encode(&Tensor::cat(&images, 0)?.to_dtype(self.vae.dtype())?)?;
        let rows = Tensor::new(rows, &self.device)?;
        Ok(
            (encoded.to_dtype(DType::F32)? * self.vae.config().scaling_factor)?
                .index_select(&rows, 0)?,
        )
    }
}
