//! [`sana_backend::Backend`] for the candle pipeline: what the engine's device workers run.

use candle_core::{DType, IndexOp, Tensor};
use sana_backend::{
    Backend, BackendError, Batch, Control, Image, LoraInfo, ModelInfo, Preview,
    Progress as StepProgress, Sampler,
};

use crate::pipeline::edit::InitImage;
use crate::pipeline::sampling::Flow;
use crate::pipeline::{GenerateRequest, ItemRequest, LoraChoice, PipelineKind, SanaPipeline};
use crate::scheduler::SchedulerConfig;
use crate::Error;

/// A loaded [`SanaPipeline`] behind the engine's backend seam.
pub struct SanaBackend {
    pipe: SanaPipeline,
    info: ModelInfo,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

impl SanaBackend {
    /// `model_id`: how the API names the model; `max_batch_images`: most images per forward.
    pub fn new(pipe: SanaPipeline, model_id: &str, max_batch_images: usize) -> Self {
        let multiple = (pipe.vae_scale_factor() * pipe.transformer().config().patch_size) as u32;
        let native = (pipe.transformer().config().sample_size * pipe.vae_scale_factor()) as u32;
        let max = (2 * native).min(native.max(4096));
        let default_sampler = match pipe.scheduler() {
            SchedulerConfig::DPMSolverMultistepScheduler(_) => Sampler::DpmSolverMultistep,
            SchedulerConfig::FlowMatchEulerDiscreteScheduler(_) => Sampler::FlowMatchEuler,
            SchedulerConfig::SCMScheduler(_) => Sampler::Scm,
        };
        let samplers = match pipe.kind() {
            PipelineKind::Sana => vec![Sampler::DpmSolverMultistep, Sampler::FlowMatchEuler],
            PipelineKind::Sprint => vec![Sampler::Scm],
        };
        let defaults = pipe.defaults();
        let device = match pipe.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        let info = ModelInfo {
            model_id: model_id.to_string(),
            dtype: dtype_name(pipe.precision().transformer).to_string(),
            device,
            min_width: multiple,
            min_height: multiple,
            max_width: max,
            max_height: max,
            size_multiple: multiple,
            default_width: native,
            default_height: native,
            default_steps: defaults.steps as u32,
            default_guidance_scale: defaults.guidance_scale,
            default_sampler,
            samplers,
            max_batch_images: max_batch_images.max(1),
            loras: pipe
                .loras()
                .iter()
                .map(|a| LoraInfo {
                    name: a.name().to_string(),
                    source: a.path().display().to_string(),
                    modules: a.module_count() as u32,
                    ranks: a.ranks().iter().map(|&r| r as u32).collect(),
                })
                .collect(),
            transformer_layers: pipe.transformer().config().num_layers as u32,
            pag_supported: pipe.kind() == PipelineKind::Sana,
            default_pag_scale: pipe.pag_defaults().map_or(0.0, |d| d.scale),
            controlnets: pipe.controlnets().iter().map(|(n, _)| n.clone()).collect(),
            default_pag_layers: pipe
                .default_pag_layers()
                .into_iter()
                .map(|i| i as u32)
                .collect(),
        };
        Self { pipe, info }
    }

    /// The pipeline's sampler for a requested one: the folder's config when it is that sampler,
    /// else the same flow shift under the other solver.
    fn scheduler_for(&self, sampler: Sampler) -> Result<Option<SchedulerConfig>, BackendError> {
        let own = self.pipe.scheduler();
        let shift = match own {
            SchedulerConfig::DPMSolverMultistepScheduler(c) => c.flow_shift,
            SchedulerConfig::FlowMatchEulerDiscreteScheduler(c) => c.shift,
            SchedulerConfig::SCMScheduler(_) => 1.0,
        };
        let json = match (sampler, own) {
            (Sampler::DpmSolverMultistep, SchedulerConfig::DPMSolverMultistepScheduler(_))
            | (Sampler::FlowMatchEuler, SchedulerConfig::FlowMatchEulerDiscreteScheduler(_))
            | (Sampler::Scm, SchedulerConfig::SCMScheduler(_)) => return Ok(None),
            (Sampler::DpmSolverMultistep, _) if self.pipe.kind() == PipelineKind::Sana => format!(
                r#"{{"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
                   "use_flow_sigmas": true, "flow_shift": {shift}, "algorithm_type": "dpmsolver++",
                   "solver_order": 2, "final_sigmas_type": "zero", "lower_order_final": true}}"#
            ),
            (Sampler::FlowMatchEuler, _) if self.pipe.kind() == PipelineKind::Sana => {
                format!(r#"{{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": {shift}}}"#)
            }
            (other, _) => {
                return Err(BackendError::InvalidInput(format!(
                    "sampler `{other}` is not available for this model; use one of: {}",
                    self.info
                        .samplers
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        SchedulerConfig::from_json(&json)
            .map(Some)
            .map_err(|e| BackendError::Model(e.to_string()))
    }

    /// RGB8 previews of the requested images from a step's predicted clean latents.
    fn previews(
        &self,
        batch: &Batch,
        step: u32,
        steps: u32,
        predicted: &Tensor,
    ) -> Result<Vec<Preview>, Error> {
        let mut out = Vec::new();
        let mut row = 0usize;
        for (item_index, item) in batch.items.iter().enumerate() {
            if item.wants_preview(step, steps) {
                let rows = predicted.i(row..row + item.n as usize)?;
                let (h, w) = (batch.key.height as usize, batch.key.width as usize);
                for (j, rgb8) in self
                    .pipe
                    .decode_to_rgb8(&rows, h, w)?
                    .into_iter()
                    .enumerate()
                {
                    out.push(Preview {
                        item: item_index,
                        image_index: j as u32,
                        image: Image::new(batch.key.width, batch.key.height, rgb8)
                            .map_err(|e| Error::Weights(e.to_string()))?,
                    });
                }
            }
            row += item.n as usize;
        }
        Ok(out)
    }
}

/// Sorts a pipeline error by what a retry can do: the client's input (400), out of memory or a
/// model that cannot run as loaded (500, a retry fails the same way), or anything else (a device
/// fault, perhaps passing).
fn backend_error(e: Error) -> BackendError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    match e {
        Error::Unsupported { .. } => BackendError::InvalidInput(text),
        _ if lower.contains("out of memory") || lower.contains("out_of_memory") => {
            BackendError::OutOfMemory(text)
        }
        Error::Config { .. }
        | Error::NoWeights { .. }
        | Error::Weights(_)
        | Error::Scheduler(_) => BackendError::Model(text),
        Error::Candle(_)
            if [
                "shape mismatch",
                "dtype mismatch",
                "unexpected rank",
                "unexpected number of dims",
                "cannot find tensor",
            ]
            .iter()
            .any(|pattern| lower.contains(pattern)) =>
        {
            BackendError::Model(text)
        }
        _ => BackendError::Internal(text),
    }
}

impl Backend for SanaBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn health(&self) -> Result<(), BackendError> {
        Tensor::ones(4, DType::F32, self.pipe.device())
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f32>())
            .map_err(|e| BackendError::Internal(format!("device check failed: {e}")))
            .and_then(|v| {
                (v == 4.0)
                    .then_some(())
                    .ok_or_else(|| BackendError::Internal(format!("device check returned {v}")))
            })
    }

    fn generate(
        &mut self,
        batch: &Batch,
        progress: &mut dyn FnMut(StepProgress) -> Control,
    ) -> Result<Vec<Image>, BackendError> {
        let key = batch.key;
        let mut req = GenerateRequest::new("");
        req.items = batch
            .items
            .iter()
            .map(|it| ItemRequest {
                prompt: it.prompt.clone(),
                negative_prompt: it.negative_prompt.clone().unwrap_or_default(),
                num_images: it.n as usize,
                seed: it.seed,
                guidance_scale: it.guidance_scale,
                init_image: it.edit.as_ref().map(|e| InitImage {
                    width: e.image.width as usize,
                    height: e.image.height as usize,
                    rgb8: e.image.rgb8.clone(),
                    mask: e.mask.clone(),
                    preserve_unmasked: e.preserve_unmasked,
                }),
                lora: it
                    .lora
                    .iter()
                    .map(|c| LoraChoice {
                        name: c.name.clone(),
                        scale: c.scale,
                    })
                    .collect(),
                pag_scale: it.pag_scale,
                pag_adaptive_scale: it.pag_adaptive_scale,
                control_image: it.control.as_ref().map(|c| InitImage {
                    width: c.image.width as usize,
                    height: c.image.height as usize,
                    rgb8: c.image.rgb8.clone(),
                    mask: None,
                    preserve_unmasked: false,
                }),
                controlnet_scale: it.control.as_ref().map(|c| c.scale),
            })
            .collect();
        req.controlnet = match key.controlnet {
            None => None,
            Some(i) => Some(
                self.pipe
                    .controlnets()
                    .get(usize::from(i))
                    .map(|(name, _)| name.clone())
                    .ok_or_else(|| {
                        BackendError::InvalidInput(format!("no ControlNet number {i} is loaded"))
                    })?,
            ),
        };
        req.pag_layers = key
            .pag_layers
            .map(|set| set.indices().map(|i| i as usize).collect())
            .unwrap_or_default();
        req.width = key.width as usize;
        req.height = key.height as usize;
        req.steps = key.steps as usize;
        req.strength = key.strength_permille.map(|p| f64::from(p) / 1000.0);
        req.scheduler = self.scheduler_for(key.sampler)?;
        req.complex_human_instruction = self.pipe.defaults().complex_human_instruction;
        req.max_sequence_length = self.pipe.defaults().max_sequence_length;
        let mut failure = None;
        let result = self.pipe.generate(&req, &mut |p| {
            let (step, steps) = (p.step as u32, p.steps as u32);
            let previews = match p.predicted {
                Some(pred) if batch.items.iter().any(|it| it.wants_preview(step, steps)) => {
                    match self.previews(batch, step, steps, pred) {
                        Ok(v) => v,
                        Err(e) => {
                            failure = Some(e);
                            return Flow::Stop;
                        }
                    }
                }
                _ => Vec::new(),
            };
            match progress(StepProgress {
                step,
                steps,
                previews,
            }) {
                Control::Continue => Flow::Continue,
                Control::Stop => Flow::Stop,
            }
        });
        if let Some(e) = failure {
            return Err(backend_error(e));
        }
        let images = result
            .map_err(backend_error)?
            .ok_or(BackendError::Cancelled)?;
        images
            .into_iter()
            .map(|img| Image::new(img.width as u32, img.height as u32, img.rgb8))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_errors_are_sorted_by_what_a_retry_can_do() {
        let oom = Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert!(matches!(backend_error(oom), BackendError::OutOfMemory(_)));
        let a = Tensor::zeros(2, DType::F32, &candle_core::Device::Cpu).expect("a tensor");
        let b = Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu).expect("a tensor");
        let mismatch = Error::Candle((&a + &b).expect_err("shapes differ"));
        assert!(
            matches!(backend_error(mismatch), BackendError::Model(_)),
            "a shape mismatch is the model's"
        );
        let weights = Error::Weights("missing tensor `x`".into());
        assert!(matches!(backend_error(weights), BackendError::Model(_)));
        let unsupported = Error::Unsupported {
            field: "sampler",
            value: "x".into(),
            reason: "no".into(),
        };
        assert!(matches!(
            backend_error(unsupported),
            BackendError::InvalidInput(_)
        ));
        let device = Error::Candle(candle_core::Error::Msg("CUDA_ERROR_LAUNCH_FAILED".into()));
        assert!(matches!(backend_error(device), BackendError::Internal(_)));
    }
}
