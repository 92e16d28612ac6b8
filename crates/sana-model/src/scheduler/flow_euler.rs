//! Flow-matching Euler: diffusers `FlowMatchEulerDiscreteScheduler`
//! (`schedulers/scheduling_flow_match_euler_discrete.py`); spec §5.4.
//!
//! x ← x + (σ_{i+1} − σ_i)·v. With a static `shift` the schedule is shifted twice, as in diffusers:
//! the constructor shifts its σ_min, and `set_timesteps` shifts the linspace between σ_max and that
//! shifted σ_min again (so the last sigma is shift(shift(1/T)), ≈ 0.00893 for shift 3).

use std::ops::{Add, Div, Mul, Sub};

use candle_core::Tensor;
use serde::Deserialize;

use super::{
    as_f32, check_begin, de_f64, invalid, lincomb2, np_linspace, unsupported, Result,
    ScheduleOptions, Scheduler, SchedulerError,
};

/// `scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`; field names and defaults as the
/// diffusers constructor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerDiscreteConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "de_f64")]
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: String,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".into(),
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteConfig {
    /// Refuses what this port does not serve.
    pub fn validate(&self) -> Result<()> {
        for (field, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ] {
            if on {
                return Err(unsupported(
                    field,
                    on,
                    "only the shifted linear flow schedule is implemented",
                ));
            }
        }
        if self.invert_sigmas {
            return Err(unsupported(
                "invert_sigmas",
                self.invert_sigmas,
                "inverted (image-to-noise) schedules are not implemented",
            ));
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(unsupported(
                "time_shift_type",
                &self.time_shift_type,
                "expected \"exponential\" or \"linear\"",
            ));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(unsupported("shift", self.shift, "must be positive"));
        }
        if let Some(st) = self.shift_terminal {
            if !(st.is_finite() && st < 1.0) {
                return Err(unsupported("shift_terminal", st, "must be below 1"));
            }
        }
        if self.num_train_timesteps == 0 {
            return Err(unsupported("num_train_timesteps", 0, "must be positive"));
        }
        Ok(())
    }

    /// `shift_terminal`, treating 0 like diffusers' falsy check (no stretching).
    fn shift_terminal(&self) -> Option<f64> {
        self.shift_terminal.filter(|&st| st != 0.0)
    }
}

/// The float arithmetic diffusers runs the schedule in: numpy f64 for the default schedule, f32
/// for custom lists (numpy casts Python scalars to the array's f32).
trait Real:
    Copy + PartialEq + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn of(x: f64) -> Self;
    fn to_f32(self) -> f32;
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// `set_timesteps`' shifting and terminal stretch of unshifted sigmas, in `R`'s precision.
fn shift_sigmas<R: Real>(
    cfg: &FlowMatchEulerDiscreteConfig,
    mu: Option<f64>,
    sigmas: &mut [R],
) -> Result<()> {
    let one = R::of(1.0);
    for s in sigmas.iter_mut() {
        *s = match (cfg.use_dynamic_shifting, mu) {
            // time_shift(mu, 1.0, t): (1/t − 1) ** 1.0 is exact.
            (true, Some(mu)) if cfg.time_shift_type == "linear" => {
                R::of(mu) / (R::of(mu) + (one / *s - one))
            }
            (true, Some(mu)) => R::of(mu.exp()) / (R::of(mu.exp()) + (one / *s - one)),
            _ => R::of(cfg.shift) * *s / (one + R::of(cfg.shift - 1.0) * *s),
        };
    }
    if let (Some(st), Some(&last)) = (cfg.shift_terminal(), sigmas.last()) {
        let scale = (one - last) / R::of(1.0 - st);
        if scale == R::of(0.0) {
            return Err(invalid(
                "shift_terminal",
                st,
                "cannot stretch a schedule whose last sigma is 1 (diffusers divides 0 by 0 here); \
                 use more steps",
            ));
        }
        for s in sigmas.iter_mut() {
            *s = one - (one - *s) / scale;
        }
    }
    Ok(())
}

/// Flow-matching Euler state for one generation.
#[derive(Debug)]
pub struct FlowMatchEulerDiscreteScheduler {
    stochastic: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
    /// (sample, model output, σ) of the last step, for the x₀ preview.
    last: Option<(Tensor, Tensor, f64)>,
}

impl FlowMatchEulerDiscreteScheduler {
    /// `set_timesteps(num_steps, sigmas=…, timesteps=…, mu=…)` on a fresh scheduler.
    pub fn new(
        config: &FlowMatchEulerDiscreteConfig,
        num_steps: usize,
        options: &ScheduleOptions,
    ) -> Result<Self> {
        config.validate()?;
        if num_steps == 0 {
            return Err(invalid("num_steps", num_steps, "must be at least 1"));
        }
        if options.max_timesteps.is_some() || options.intermediate_timesteps.is_some() {
            return Err(invalid(
                "max_timesteps/intermediate_timesteps",
                (options.max_timesteps, options.intermediate_timesteps),
                "only SCMScheduler takes TrigFlow angles",
            ));
        }
        match (config.use_dynamic_shifting, options.mu) {
            (true, None) => {
                return Err(invalid(
                    "mu",
                    None::<f64>,
                    "`mu` must be given when the config sets use_dynamic_shifting",
                ))
            }
            (false, Some(mu)) => {
                return Err(invalid(
                    "mu",
                    mu,
                    "the config does not set use_dynamic_shifting, so the schedule would ignore it",
                ))
            }
            _ => {}
        }
        for (field, list) in [
            ("sigmas", &options.sigmas),
            ("timesteps", &options.timesteps),
        ] {
            if let Some(list) = list {
                if list.len() != num_steps {
                    return Err(invalid(
                        field,
                        list,
                        &format!("must hold one value per step ({num_steps})"),
                    ));
                }
            }
        }
        let n_train = config.num_train_timesteps as f64;

        // Custom lists are cast to f32 first and shifted in f32, as numpy does with them.
        let given_timesteps: Option<Vec<f32>> = options
            .timesteps
            .as_ref()
            .map(|t| t.iter().map(|&x| x as f32).collect());
        let sigmas_f32: Vec<f32> = match (&options.sigmas, &given_timesteps) {
            (Some(s), _) => {
                let mut s: Vec<f32> = s.iter().map(|&x| x as f32).collect();
                shift_sigmas(config, options.mu, &mut s)?;
                s
            }
            (None, Some(t)) => {
                let mut s: Vec<f32> = t.iter().map(|&x| x / n_train as f32).collect();
                shift_sigmas(config, options.mu, &mut s)?;
                s
            }
            (None, None) => {
                // The constructor's σ_max, σ_min (torch f32; shifted once unless dynamic).
                let sig = |t: f32| {
                    let s = t / n_train as f32;
                    if config.use_dynamic_shifting {
                        s
                    } else {
                        (config.shift as f32 * s) / (1.0 + (config.shift - 1.0) as f32 * s)
                    }
                };
                let (sigma_max, sigma_min) = (f64::from(sig(n_train as f32)), f64::from(sig(1.0)));
                let mut s: Vec<f64> =
                    np_linspace(sigma_max * n_train, sigma_min * n_train, num_steps)
                        .into_iter()
                        .map(|t| t / n_train)
                        .collect();
                shift_sigmas(config, options.mu, &mut s)?;
                s.into_iter().map(Real::to_f32).collect()
            }
        };
        let timesteps = match given_timesteps {
            Some(t) => t.into_iter().map(f64::from).collect(),
            None => sigmas_f32
                .iter()
                .map(|&s| f64::from(s * n_train as f32))
                .collect(),
        };
        let sigmas = sigmas_f32
            .into_iter()
            .map(f64::from)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(Self {
            stochastic: config.stochastic_sampling,
            timesteps,
            sigmas,
            step_index: 0,
            last: None,
        })
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn name(&self) -> &'static str {
        "FlowMatchEulerDiscreteScheduler"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn order_at(&self, _step: usize) -> usize {
        1
    }

    fn needs_noise(&self) -> bool {
        self.stochastic && self.step_index < self.timesteps.len()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.step_index;
        if i >= self.timesteps.len() {
            return Err(SchedulerError::Finished {
                steps: self.timesteps.len(),
            });
        }
        let (sample, v) = (as_f32(sample)?, as_f32(model_output)?);
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let prev = if self.stochastic {
            let noise = noise.ok_or(SchedulerError::NoiseRequired {
                scheduler: "FlowMatchEulerDiscreteScheduler",
                step: i,
            })?;
            // x₀ = x − σ·v; x ← (1 − σ_next)·x₀ + σ_next·ε
            let x0 = (&sample - v.affine(sigma, 0.0)?)?;
            lincomb2(
                f64::from(1.0 - sigma_next as f32),
                &x0,
                sigma_next,
                &as_f32(noise)?,
            )?
        } else {
            // dt in f32, as diffusers subtracts the f32 sigmas.
            let dt = sigma_next as f32 - sigma as f32;
            (&sample + v.affine(f64::from(dt), 0.0)?)?
        };
        self.last = Some((sample, v, sigma));
        self.step_index += 1;
        Ok(prev)
    }

    fn pred_original_sample(&self) -> Result<Option<Tensor>> {
        // Computed on demand, so a generation without previews pays nothing for it.
        self.last
            .as_ref()
            .map(|(x, v, sigma)| Ok((x - v.affine(*sigma, 0.0)?)?))
            .transpose()
    }

    fn begin_at(&mut self, index: usize) -> Result<()> {
        check_begin(self.name(), self.step_index, index, self.timesteps.len())?;
        self.step_index = index;
        Ok(())
    }
}
