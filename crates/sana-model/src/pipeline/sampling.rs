//! The denoising loops of diffusers' `SanaPipeline` (flow matching with classifier-free guidance)
//! and `SanaSprintPipeline` (TrigFlow consistency sampling with an embedded guidance), driven by a
//! [`Scheduler`](crate::scheduler::Scheduler), plus per-item seeded noise.
//!
//! The caption work is done once per generation ([`SanaTransformer2DModel::prepare_caption`]); each
//! step runs [`SanaTransformer2DModel::forward_with_caption`]. Sample math is f32, as in diffusers.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::edit::{blend, EditStart};
use crate::scheduler::{SCMScheduler, ScheduleOptions, Scheduler, SchedulerConfig};
use crate::transformer::controlnet::{ConditioningScale, SanaControlNetModel};
use crate::transformer::{CaptionContext, SanaTransformer2DModel};
use crate::{Error, Result};

/// Standard normal noise `[seeds.len(), c, h, w]` (f32), item `i` drawn from `seeds[i]` alone, so an
/// image never depends on its batchmates. `stream` separates independent draws of one seed (0 for
/// the initial latents, `1 + step` for a sampler step's noise). ChaCha12 and `rand_distr`'s ziggurat
/// normals: the same values on every platform and run.
pub fn seeded_noise(
    seeds: &[u64],
    (c, h, w): (usize, usize, usize),
    stream: u64,
    device: &Device,
) -> Result<Tensor> {
    let per_item = c * h * w;
    let mut values = Vec::with_capacity(seeds.len() * per_item);
    for &seed in seeds {
        let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        values.extend(
            rand_distr::StandardNormal
                .sample_iter(&mut rng)
                .take(per_item)
                .map(|v: f32| v),
        );
    }
    Ok(Tensor::from_vec(values, (seeds.len(), c, h, w), device)?)
}

/// What a step reports to the caller.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Steps done so far (1-based after the step).
    pub step: usize,
    /// Steps in total.
    pub steps: usize,
    /// The clean-image prediction of this step (latent space, f32, `[B, C, h, w]`): a cheap
    /// preview source.
    pub predicted: Option<&'a Tensor>,
}

/// Whether to go on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Run the next step.
    Continue,
    /// Stop now: the generation is cancelled.
    Stop,
}

/// The settings of one denoising loop.
#[derive(Debug, Clone)]
pub struct Sampling<'a> {
    /// The sampler config (`scheduler/scheduler_config.json`).
    pub scheduler: &'a SchedulerConfig,
    /// Number of steps.
    pub steps: usize,
    /// Extra `set_timesteps` arguments (custom sigmas/timesteps, Sprint angles).
    pub schedule: ScheduleOptions,
    /// Guidance per image (`[B]`). SanaPipeline: classifier-free guidance, on when `cfg`;
    /// Sprint: the embedded guidance value before `guidance_embeds_scale`.
    pub guidance: &'a [f32],
    /// Classifier-free guidance: the caption context holds `[negative; positive]` (2B rows).
    pub cfg: bool,
    /// Perturbed-attention guidance: the caption context ends with B perturbed rows.
    pub pag: Option<PagGuidance>,
    /// ControlNet: its residuals are added to the transformer's blocks at every step.
    pub control: Option<Control<'a>>,
    /// Image-to-image or inpainting: where the loop starts and what it keeps.
    pub edit: Option<EditStart<'a>>,
}

/// A ControlNet's part of a generation: it runs on the rows before PAG's perturbed ones
/// (`[negative; positive]` with CFG), which take the positive rows' residuals.
#[derive(Debug, Clone)]
pub struct Control<'a> {
    pub model: &'a SanaControlNetModel,
    /// Its caption work for those rows.
    pub caption: &'a CaptionContext,
    /// The control latents of those rows, f32.
    pub latents: &'a Tensor,
    /// The conditioning scale, one or per row.
    pub scale: ConditioningScale,
}

/// PAG's scales per image (diffusers' `_get_pag_scale`, per image here).
#[derive(Debug, Clone, PartialEq)]
pub struct PagGuidance {
    /// `pag_scale` per image.
    pub scales: Vec<f32>,
    /// `pag_adaptive_scale` per image (0 = constant scale).
    pub adaptive: Vec<f32>,
}

impl PagGuidance {
    /// The scale of each image at scheduler timestep `t`: `max(0, scale − adaptive·(1000 − t))`
    /// in f32, or `scale` when `adaptive` is 0.
    pub fn at(&self, t: f64) -> Vec<f32> {
        self.scales
            .iter()
            .zip(&self.adaptive)
            .map(|(&s, &a)| {
                if a == 0.0 {
                    s
                } else {
                    (s - a * (1000.0 - t as f32)).max(0.0)
                }
            })
            .collect()
    }
}

/// The edit's first step and starting sample: `noise` (the loop's initial draw) mixed with the
/// image latents at the first step's noise level, in the space the loop samples in (`scale`:
/// σ_d for Sprint, 1 for the flow loops).
fn start(
    sched: &mut dyn Scheduler,
    edit: &EditStart,
    noise: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    sched.begin_at(edit.begin)?;
    let noise = (noise.to_dtype(DType::F32)? * scale)?;
    if edit.pure_noise {
        return Ok(noise);
    }
    Ok(sched.noise_to(&(edit.image_latents * scale)?, &noise, edit.begin)?)
}

/// After step `k` (absolute): the kept region of inpainted rows back to the image latents noised
/// to the next step's level with the initial noise, or clean after the last step.
fn keep_unmasked(
    sched: &dyn Scheduler,
    edit: &EditStart,
    noise: &Tensor,
    x: Tensor,
    k: usize,
    scale: f64,
) -> Result<Tensor> {
    let Some(mask) = edit.mask else {
        return Ok(x);
    };
    let z = (edit.image_latents * scale)?;
    let kept = if k + 1 < sched.num_steps() {
        sched.noise_to(&z, &(noise.to_dtype(DType::F32)? * scale)?, k + 1)?
    } else {
        z
    };
    blend(&kept, &x, mask)
}

/// Runs SanaPipeline's loop from `latents` (`[B, C, h, w]`, f32) → final latents (f32), or `None`
/// when `on_step` stopped it. `noise(step)` supplies standard normal noise for samplers that take
/// it at a step (see [`crate::scheduler::Scheduler::needs_noise`]).
pub fn denoise(
    model: &SanaTransformer2DModel,
    caption: &CaptionContext,
    latents: Tensor,
    sampling: &Sampling,
    noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    on_step: &mut dyn FnMut(StepInfo) -> Flow,
) -> Result<Option<Tensor>> {
    let cfg = model.config();
    let (b, c, _, _) = latents.dims4()?;
    check_guidance(sampling.guidance, b)?;
    if let Some(pag) = &sampling.pag {
        check_guidance(&pag.scales, b)?;
        check_guidance(&pag.adaptive, b)?;
    }
    let mut sched = sampling
        .scheduler
        .build(sampling.steps, &sampling.schedule)?;
    let device = latents.device().clone();
    // [B, 1, 1, 1] so each item gets its own guidance scale.
    let g = Tensor::from_slice(sampling.guidance, (b, 1, 1, 1), &device)?;
    let mut x = match &sampling.edit {
        Some(edit) => start(sched.as_mut(), edit, &latents, 1.0)?,
        None => latents.to_dtype(DType::F32)?,
    };
    let begin = sched.step_index();
    let timesteps = sched.timesteps()[begin..].to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let k = begin + i;
        let _span = tracing::debug_span!("denoise_step", step = k).entered();
        let groups = 1 + usize::from(sampling.cfg) + usize::from(sampling.pag.is_some());
        let rows = groups * b;
        let x_in = if groups > 1 {
            Tensor::cat(&vec![&x; groups], 0)?
        } else {
            x.clone()
        };
        // The DPM scheduler's timesteps are integers; the model sees them × timestep_scale in f32.
        let ts = Tensor::full((t * cfg.timestep_scale) as f32, rows, &device)?;
        let mut v = match &sampling.control {
            None => model.forward_with_caption(&x_in, &ts, None, caption)?,
            Some(control) => {
                let f = control.latents.dim(0)?;
                let mut residuals = control.model.residuals(
                    &x_in.narrow(0, 0, f)?,
                    &ts.narrow(0, 0, f)?,
                    control.latents,
                    control.caption,
                    &control.scale,
                )?;
                if rows > f {
                    // PAG's perturbed rows: the positive rows' residuals.
                    for r in residuals.iter_mut() {
                        *r = Tensor::cat(&[&*r, &r.narrow(0, f - b, rows - f)?], 0)?;
                    }
                }
                model.forward_controlled(&x_in, &ts, None, caption, &residuals)?
            }
        }
        .to_dtype(DType::F32)?;
        // [negative; positive; perturbed] → v_u + g·(v_c − v_u) + pag_t·(v_c − v_p), in that order.
        let v_text = v.narrow(0, usize::from(sampling.cfg) * b, b)?;
        let mut guided = if sampling.cfg {
            let v_uncond = v.narrow(0, 0, b)?;
            (&v_uncond + (&v_text - &v_uncond)?.broadcast_mul(&g)?)?
        } else {
            v_text.clone()
        };
        if let Some(pag) = &sampling.pag {
            let v_ptb = v.narrow(0, rows - b, b)?;
            let s = Tensor::from_vec(pag.at(t), (b, 1, 1, 1), &device)?;
            guided = (guided + (&v_text - v_ptb)?.broadcast_mul(&s)?)?;
        }
        v = guided;
        if cfg.out_channels() == 2 * c {
            // Learned-sigma models predict [velocity, variance]: keep the velocity.
            v = v.narrow(1, 0, c)?;
        }
        let step_noise = if sched.needs_noise() {
            Some(noise(k)?)
        } else {
            None
        };
        x = sched.step(&v, &x, step_noise.as_ref())?;
        if let Some(edit) = &sampling.edit {
            x = keep_unmasked(sched.as_ref(), edit, &latents, x, k, 1.0)?;
        }
        let predicted = sched.pred_original_sample()?;
        if on_step(StepInfo {
            step: i + 1,
            steps: timesteps.len(),
            predicted: predicted.as_ref(),
        }) == Flow::Stop
        {
            return Ok(None);
        }
    }
    Ok(Some(x))
}

/// Runs SanaSprintPipeline's loop: `latents` is standard normal noise `[B, C, h, w]`; returns the
/// final clean latents (`denoised / σ_d`), or `None` when stopped. The sampler must be SCM; with 2
/// steps and no custom angles the schedule passes through 1.3 as the pipeline's default.
/// `guidance_dtype` is the text-encoder dtype: diffusers rounds the guidance to it before scaling.
pub fn denoise_sprint(
    model: &SanaTransformer2DModel,
    caption: &CaptionContext,
    latents: Tensor,
    sampling: &Sampling,
    guidance_dtype: DType,
    noise: &mut dyn FnMut(usize) -> Result<Tensor>,
    on_step: &mut dyn FnMut(StepInfo) -> Flow,
) -> Result<Option<Tensor>> {
    let cfg = model.config();
    let (b, _, _, _) = latents.dims4()?;
    check_guidance(sampling.guidance, b)?;
    if sampling.pag.is_some() {
        return Err(Error::Unsupported {
            field: "pag_scale",
            value: "> 0".into(),
            reason: "perturbed-attention guidance is not available for SANA-Sprint models".into(),
        });
    }
    let sigma_data = match sampling.scheduler {
        SchedulerConfig::SCMScheduler(c) => c.sigma_data,
        _ => {
            return Err(Error::Unsupported {
                field: "_class_name",
                value: "not SCMScheduler".into(),
                reason: "SANA-Sprint models sample with SCMScheduler".into(),
            })
        }
    };
    // SanaSprintPipeline's default schedule: 2 steps go through the intermediate angle 1.3.
    let mut schedule = sampling.schedule.clone();
    if sampling.steps == 2
        && schedule.timesteps.is_none()
        && schedule.intermediate_timesteps.is_none()
    {
        schedule.intermediate_timesteps = Some(SCMScheduler::DEFAULT_INTERMEDIATE_TIMESTEPS);
    }
    let mut sched = sampling.scheduler.build(sampling.steps, &schedule)?;
    let device = latents.device().clone();
    // guidance → text-encoder dtype → × guidance_embeds_scale (in that dtype, as diffusers).
    let guidance = (Tensor::from_slice(sampling.guidance, b, &device)?
        .to_dtype(guidance_dtype)?
        * cfg.guidance_embeds_scale)?
        .to_dtype(DType::F32)?;
    let mut x = match &sampling.edit {
        // SanaSprintImg2ImgPipeline: cos θ·(z·σ_d) + sin θ·(ε·σ_d) at the first angle run.
        Some(edit) => start(
            sched.as_mut(),
            &EditStart {
                pure_noise: false,
                ..edit.clone()
            },
            &latents,
            sigma_data,
        )?,
        None => (latents.to_dtype(DType::F32)? * sigma_data)?,
    };
    let begin = sched.step_index();
    let angles = sched.timesteps()[begin..].to_vec();
    let mut denoised = None;
    for (i, &theta) in angles.iter().enumerate() {
        let k = begin + i;
        let _span = tracing::debug_span!("sprint_step", step = k).entered();
        // Flow time s = sin θ / (cos θ + sin θ), in f32 like the reference.
        let th = theta as f32;
        let s = th.sin() / (th.cos() + th.sin());
        let norm = (s * s + (1.0 - s) * (1.0 - s)).sqrt();
        let x_in = ((&x / sigma_data)? * norm as f64)?;
        let ts = Tensor::full(s, b, &device)?;
        let f = model
            .forward_with_caption(&x_in, &ts, Some(&guidance), caption)?
            .to_dtype(DType::F32)?;
        let f = (((&x_in * (1.0 - 2.0 * s) as f64)?
            + (f * (1.0 - 2.0 * s + 2.0 * s * s) as f64)?)?
            / norm as f64)?;
        let f = (f * sigma_data)?;
        let step_noise = if sched.needs_noise() {
            Some(noise(k)?)
        } else {
            None
        };
        x = sched.step(&f, &x, step_noise.as_ref())?;
        if let Some(edit) = &sampling.edit {
            x = keep_unmasked(sched.as_ref(), edit, &latents, x, k, sigma_data)?;
        }
        denoised = sched.pred_original_sample()?;
        let preview = match &denoised {
            Some(d) => Some((d / sigma_data)?),
            None => None,
        };
        if on_step(StepInfo {
            step: i + 1,
            steps: angles.len(),
            predicted: preview.as_ref(),
        }) == Flow::Stop
        {
            return Ok(None);
        }
    }
    let denoised = denoised.ok_or_else(|| {
        Error::Candle(candle_core::Error::Msg(
            "Sprint sampling needs at least one step".into(),
        ))
    })?;
    let out = (denoised / sigma_data)?;
    // The output is the last clean prediction, not the sample: inpainting keeps the image there.
    Ok(Some(
        match sampling.edit.as_ref().and_then(|e| e.mask.map(|m| (e, m))) {
            Some((edit, mask)) => blend(edit.image_latents, &out, mask)?,
            None => out,
        },
    ))
}

fn check_guidance(guidance: &[f32], batch: usize) -> Result<()> {
    if guidance.len() != batch {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "{} guidance values for a batch of {batch} images",
            guidance.len()
        ))));
    }
    Ok(())
}
