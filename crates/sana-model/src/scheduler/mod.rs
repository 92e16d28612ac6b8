//! Samplers for Sana: Flow-DPM-Solver, flow-matching Euler and SANA-Sprint's SCM.
//!
//! Reference: diffusers 0.42 `schedulers/scheduling_dpmsolver_multistep.py`
//! (`DPMSolverMultistepScheduler`), `scheduling_flow_match_euler_discrete.py`
//! (`FlowMatchEulerDiscreteScheduler`) and `scheduling_scm.py` (`SCMScheduler`); spec §5.
//!
//! A checkpoint's `scheduler/scheduler_config.json` is read into a [`SchedulerConfig`] (dispatch on
//! `_class_name`, unknown keys ignored, defaults as in diffusers). Settings this port does not serve
//! are refused at load with a [`SchedulerError::Unsupported`] naming the field and value, rather than
//! sampling something else silently. `config.build(steps, &options)` then plays the part of
//! diffusers' `set_timesteps` and returns a fresh `Box<dyn Scheduler>` for one generation, which the
//! pipeline drives step by step:
//!
//! ```text
//! let mut sched = config.build(20, &ScheduleOptions::default())?;
//! for &t in sched.timesteps().to_vec().iter() {
//!     let v = transformer(x, t × timestep_scale);          // CFG-combined, f32
//!     x = sched.step(&v, &x, noise_if(sched.needs_noise()))?;
//! }
//! ```
//!
//! Schedules (timesteps, sigmas) are computed on the host once per build, in the same float
//! precision and operation order as diffusers (numpy f64 or torch f32, whichever the reference
//! uses), so integer timesteps match exactly and float values bit for bit, or within one f32 ulp
//! where torch's own f32 `sqrt`/`linspace` are not correctly rounded. The
//! sample math runs in f32 on the tensors' own device; the scalar coefficients of each update are
//! computed on the host in f64 from the f32 sigmas, so a step never syncs the device and allocates
//! nothing but the tensors of the latent update.
//!
//! Step indices start at 0 for a fresh schedule (diffusers' `set_begin_index(0)`). diffusers
//! instead looks the first timestep up in the schedule, which is the same index 0 unless the first
//! timestep repeats (DPM-Solver's truncated timesteps at e.g. 1000 steps with shift 6, where
//! diffusers skips the first step and then fails at the last).

mod dpm_solver;
mod flow_euler;
mod scm;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Deserializer};

pub use dpm_solver::{DPMSolverMultistepConfig, DPMSolverMultistepScheduler};
pub use flow_euler::{FlowMatchEulerDiscreteConfig, FlowMatchEulerDiscreteScheduler};
pub use scm::{SCMConfig, SCMScheduler};

/// Errors of the samplers: refused configs, invalid schedule requests and tensor failures.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config is not JSON or a field has the wrong type.
    #[error("invalid scheduler config: {0}")]
    Parse(String),
    /// `_class_name` names a scheduler this port does not implement.
    #[error(
        "unsupported scheduler config: `_class_name` = {0}: expected one of \
         \"DPMSolverMultistepScheduler\", \"FlowMatchEulerDiscreteScheduler\", \"SCMScheduler\""
    )]
    UnknownClass(String),
    /// A config setting this port does not serve.
    #[error("unsupported scheduler config: `{field}` = {value}: {reason}")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A schedule request (`build` arguments) the scheduler does not accept.
    #[error("invalid schedule request: `{field}` = {value}: {reason}")]
    InvalidRequest {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// `step` was called after the last step of the schedule.
    #[error(
        "the schedule has finished all its {steps} steps; build a fresh scheduler per generation"
    )]
    Finished { steps: usize },
    /// The step draws fresh noise and the caller supplied none.
    #[error("step {step} of {scheduler} needs `noise` (standard normal, shaped like the sample)")]
    NoiseRequired {
        scheduler: &'static str,
        step: usize,
    },
    /// A tensor operation failed (device, shape or dtype mismatch).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of the samplers.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;

/// A sampler for one generation, created by [`SchedulerConfig::build`] and driven step by step.
///
/// The pipeline calls [`Scheduler::step`] once per entry of [`Scheduler::timesteps`], in order.
pub trait Scheduler: Send + std::fmt::Debug {
    /// The diffusers class this sampler reproduces.
    fn name(&self) -> &'static str;

    /// One timestep per step, as diffusers' `scheduler.timesteps` after `set_timesteps`
    /// (DPM-Solver: integers; flow Euler: floats in [0, 1000]; SCM: TrigFlow angles in radians,
    /// without the final 0). The transformer's timestep is derived from it by the pipeline.
    fn timesteps(&self) -> &[f64];

    /// The noise levels, one per step plus the final one (length `num_steps() + 1`), as diffusers'
    /// `scheduler.sigmas` (f32 values). For SCM these are the TrigFlow angles including the final 0.
    fn sigmas(&self) -> &[f64];

    /// Number of steps of this schedule.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Index of the next step to run (0 for a fresh schedule, `num_steps()` when done).
    fn step_index(&self) -> usize;

    /// Timestep of the next step, `None` when the schedule is done.
    fn current_timestep(&self) -> Option<f64> {
        self.timesteps().get(self.step_index()).copied()
    }

    /// Order of the update that step `step` uses (1 for first-order methods; DPM-Solver drops to
    /// lower orders at the start and at the end of a schedule exactly where diffusers does).
    fn order_at(&self, step: usize) -> usize;

    /// Whether the next [`Scheduler::step`] needs `noise`.
    fn needs_noise(&self) -> bool;

    /// Advances the sample by one step and returns the new sample (f32).
    ///
    /// `model_output` is the (guidance-combined) transformer output for `sample` at
    /// [`Scheduler::current_timestep`]. `noise` is standard normal noise shaped like `sample`, drawn
    /// by the caller per batch item from the item's own seed; only steps for which
    /// [`Scheduler::needs_noise`] is true read it.
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// The clean-sample prediction x₀ of the last completed step (for previews), `None` before the
    /// first step.
    fn pred_original_sample(&self) -> Result<Option<Tensor>>;

    /// Starts a fresh schedule at step `index` instead of 0 (diffusers' `set_begin_index` before
    /// the first step): image-to-image runs the last `num_steps() − index` steps. A multistep solver
    /// ramps its order up again from there, as diffusers' does (its history starts empty), while
    /// the end-of-schedule rules still count the whole schedule.
    fn begin_at(&mut self, index: usize) -> Result<()>;

    /// `x0` noised to the level at schedule index `index` (`sigmas()[index]`) with `noise`, as the
    /// sampler's forward process defines it: the flow samplers `(1 − σ)·x0 + σ·noise` (diffusers'
    /// `FlowMatchEulerDiscreteScheduler.scale_noise`, `DPMSolverMultistepScheduler.add_noise` with
    /// flow sigmas), SCM `cos θ·x0 + sin θ·noise` (its TrigFlow interpolation; both operands are
    /// then in the σ_d-scaled space the Sprint loop runs in). f32.
    fn noise_to(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas().get(index).ok_or_else(|| {
            invalid(
                "index",
                index,
                &format!("the schedule has {} noise levels", self.sigmas().len()),
            )
        })?;
        lincomb2(1.0 - sigma, &as_f32(x0)?, sigma, &as_f32(noise)?)
    }
}

/// Checks a begin index against a fresh schedule of `steps` steps.
fn check_begin(name: &'static str, step_index: usize, index: usize, steps: usize) -> Result<()> {
    if step_index != 0 {
        return Err(invalid(
            "begin_index",
            index,
            &format!("{name}: the schedule has already run {step_index} steps"),
        ));
    }
    if index >= steps {
        return Err(invalid(
            "begin_index",
            index,
            &format!("{name}: must leave at least one of the {steps} steps to run"),
        ));
    }
    Ok(())
}

/// Arguments of diffusers' `set_timesteps` beyond the number of steps. Each scheduler refuses the
/// ones its diffusers counterpart does not accept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleOptions {
    /// Custom noise levels, one per step (flow Euler only; shifted like the default ones).
    pub sigmas: Option<Vec<f64>>,
    /// Custom timesteps: flow Euler one per step, used as given; SCM the angles of all steps plus
    /// the final one (`steps + 1` values). DPM-Solver with flow sigmas does not accept them (diffusers
    /// fails on them too).
    pub timesteps: Option<Vec<f64>>,
    /// `mu` of dynamic shifting; required when the config sets `use_dynamic_shifting`.
    pub mu: Option<f64>,
    /// SCM: the first angle (`max_timesteps`, default [`SCMScheduler::DEFAULT_MAX_TIMESTEPS`]).
    pub max_timesteps: Option<f64>,
    /// SCM: the middle angle of a 2-step schedule (`intermediate_timesteps`; SANA-Sprint's pipeline
    /// passes [`SCMScheduler::DEFAULT_INTERMEDIATE_TIMESTEPS`] for 2 steps). Only valid with 2 steps.
    pub intermediate_timesteps: Option<f64>,
}

/// A diffusers `scheduler/scheduler_config.json`, by `_class_name`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "_class_name")]
pub enum SchedulerConfig {
    /// Flow-DPM-Solver (Sana's default).
    DPMSolverMultistepScheduler(DPMSolverMultistepConfig),
    /// Flow-matching Euler.
    FlowMatchEulerDiscreteScheduler(FlowMatchEulerDiscreteConfig),
    /// SANA-Sprint's TrigFlow consistency sampler.
    SCMScheduler(SCMConfig),
}

impl SchedulerConfig {
    /// Reads and validates `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates a scheduler config. Accepts Python's `-Infinity`/`Infinity`/`NaN`
    /// literals, which diffusers writes (e.g. `"lambda_min_clipped": -Infinity` in Sana's configs).
    pub fn from_json(text: &str) -> Result<Self> {
        let strict = python_json_to_strict(text);
        let value: serde_json::Value =
            serde_json::from_str(&strict).map_err(|e| SchedulerError::Parse(e.to_string()))?;
        let class = match value.get("_class_name") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(SchedulerError::UnknownClass(other.to_string())),
            None => return Err(SchedulerError::UnknownClass("(missing)".into())),
        };
        fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
            serde_json::from_value(v).map_err(|e| SchedulerError::Parse(e.to_string()))
        }
        let config = match class.as_str() {
            "DPMSolverMultistepScheduler" => Self::DPMSolverMultistepScheduler(parse(value)?),
            "FlowMatchEulerDiscreteScheduler" => {
                Self::FlowMatchEulerDiscreteScheduler(parse(value)?)
            }
            "SCMScheduler" => Self::SCMScheduler(parse(value)?),
            _ => return Err(SchedulerError::UnknownClass(format!("{class:?}"))),
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings this port does not serve, naming the field and its value.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::DPMSolverMultistepScheduler(c) => c.validate(),
            Self::FlowMatchEulerDiscreteScheduler(c) => c.validate(),
            Self::SCMScheduler(c) => c.validate(),
        }
    }

    /// The diffusers class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::DPMSolverMultistepScheduler(_) => "DPMSolverMultistepScheduler",
            Self::FlowMatchEulerDiscreteScheduler(_) => "FlowMatchEulerDiscreteScheduler",
            Self::SCMScheduler(_) => "SCMScheduler",
        }
    }

    /// A fresh sampler for one generation of `num_steps` steps (diffusers' `set_timesteps`).
    pub fn build(&self, num_steps: usize, options: &ScheduleOptions) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Self::DPMSolverMultistepScheduler(c) => {
                Box::new(DPMSolverMultistepScheduler::new(c, num_steps, options)?)
            }
            Self::FlowMatchEulerDiscreteScheduler(c) => {
                Box::new(FlowMatchEulerDiscreteScheduler::new(c, num_steps, options)?)
            }
            Self::SCMScheduler(c) => Box::new(SCMScheduler::new(c, num_steps, options)?),
        })
    }
}

/// Rewrites Python's non-standard JSON literals (`-Infinity`, `Infinity`, `NaN`) outside strings
/// into strings, which [`de_f64`] reads back as floats.
fn python_json_to_strict(text: &str) -> Cow<'_, str> {
    const LITERALS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !LITERALS.iter().any(|l| text.contains(l)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(lit) = LITERALS.iter().find(|l| rest.starts_with(**l)) {
            out.push('"');
            out.push_str(lit);
            out.push('"');
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// Reads a float written as a JSON number or as one of Python's special literals.
fn de_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Str(String),
    }
    match F::deserialize(d)? {
        F::Num(x) => Ok(x),
        F::Str(s) => match s.as_str() {
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "Infinity" => Ok(f64::INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got {s:?}"
            ))),
        },
    }
}

/// `Unsupported` error for a config field.
fn unsupported(field: &'static str, value: impl std::fmt::Debug, reason: &str) -> SchedulerError {
    SchedulerError::Unsupported {
        field,
        value: format!("{value:?}"),
        reason: reason.to_string(),
    }
}

/// `InvalidRequest` error for a `build` argument.
fn invalid(field: &'static str, value: impl std::fmt::Debug, reason: &str) -> SchedulerError {
    SchedulerError::InvalidRequest {
        field,
        value: format!("{value:?}"),
        reason: reason.to_string(),
    }
}

/// `numpy.linspace(start, stop, num)` in f64, bit for bit (`i·step + start`, last = stop).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// Samples and model outputs are computed in f32; a no-op (shared storage) when already f32.
fn as_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(candle_core::DType::F32)?)
}

/// `a·x + b·y` in f32 (two scaled copies and one sum: the minimum with candle's ops).
fn lincomb2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}
