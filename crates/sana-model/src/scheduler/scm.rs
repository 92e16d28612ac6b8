//! SANA-Sprint's TrigFlow consistency sampler: diffusers `SCMScheduler`
//! (`schedulers/scheduling_scm.py`); spec §5.5 and §6.4.
//!
//! Timesteps are angles θ from `max_timesteps` (≈ π/2, pure noise) down to 0. A step from angle s to
//! t predicts x₀ = cos(s)·x − sin(s)·F and re-noises it: x ← cos(t)·x₀ + sin(t)·σ_d·ε with fresh
//! standard normal noise ε (none needed at t = 0, where the result is x₀).

use candle_core::Tensor;
use serde::Deserialize;

use super::{
    as_f32, check_begin, de_f64, invalid, lincomb2, unsupported, Result, ScheduleOptions,
    Scheduler, SchedulerError,
};

/// `scheduler_config.json` of an `SCMScheduler`; field names and defaults as the diffusers
/// constructor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SCMConfig {
    pub num_train_timesteps: usize,
    pub prediction_type: String,
    #[serde(deserialize_with = "de_f64")]
    pub sigma_data: f64,
}

impl Default for SCMConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            prediction_type: "trigflow".into(),
            sigma_data: 0.5,
        }
    }
}

impl SCMConfig {
    /// Refuses what this port does not serve.
    pub fn validate(&self) -> Result<()> {
        if self.prediction_type != "trigflow" {
            return Err(unsupported(
                "prediction_type",
                &self.prediction_type,
                "SCMScheduler only defines \"trigflow\"",
            ));
        }
        if !(self.sigma_data.is_finite() && self.sigma_data > 0.0) {
            return Err(unsupported(
                "sigma_data",
                self.sigma_data,
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// SCM state for one generation.
#[derive(Debug)]
pub struct SCMScheduler {
    sigma_data: f64,
    /// f32 angles of all steps plus the final one.
    angles: Vec<f64>,
    step_index: usize,
    pred_x0: Option<Tensor>,
}

impl SCMScheduler {
    /// diffusers' default first angle (`max_timesteps`): its rounded literal, not π/2, since the
    /// schedule must match bit for bit.
    #[allow(clippy::approx_constant)]
    pub const DEFAULT_MAX_TIMESTEPS: f64 = 1.57080;
    /// SANA-Sprint's default middle angle of a 2-step schedule (`intermediate_timesteps`).
    pub const DEFAULT_INTERMEDIATE_TIMESTEPS: f64 = 1.3;

    /// `set_timesteps(num_steps, timesteps, max_timesteps, intermediate_timesteps)` on a fresh
    /// scheduler: custom angles (`steps + 1` values, the final one included), or
    /// `[max, intermediate, 0]` for 2 steps with an intermediate angle, or
    /// `torch.linspace(max, 0, steps + 1)` in f32.
    pub fn new(config: &SCMConfig, num_steps: usize, options: &ScheduleOptions) -> Result<Self> {
        config.validate()?;
        if num_steps == 0 || num_steps > config.num_train_timesteps {
            return Err(invalid(
                "num_steps",
                num_steps,
                &format!("must be 1 to {}", config.num_train_timesteps),
            ));
        }
        if let Some(s) = &options.sigmas {
            return Err(invalid(
                "sigmas",
                s,
                "SCMScheduler takes angles as `timesteps`, not sigmas",
            ));
        }
        if let Some(mu) = options.mu {
            return Err(invalid("mu", mu, "SCMScheduler has no dynamic shifting"));
        }
        if let Some(inter) = options.intermediate_timesteps {
            if num_steps != 2 {
                return Err(invalid(
                    "intermediate_timesteps",
                    inter,
                    &format!("only defined for 2 steps, not {num_steps}; leave it unset"),
                ));
            }
        }
        let angles: Vec<f32> = match &options.timesteps {
            Some(t) => {
                if t.len() != num_steps + 1 {
                    return Err(invalid(
                        "timesteps",
                        t,
                        &format!(
                            "must hold steps + 1 = {} angles, the final one included",
                            num_steps + 1
                        ),
                    ));
                }
                if options.max_timesteps.is_some() || options.intermediate_timesteps.is_some() {
                    return Err(invalid(
                        "max_timesteps/intermediate_timesteps",
                        (options.max_timesteps, options.intermediate_timesteps),
                        "leave them unset with custom timesteps",
                    ));
                }
                t.iter().map(|&x| x as f32).collect()
            }
            None => {
                let max = options.max_timesteps.unwrap_or(Self::DEFAULT_MAX_TIMESTEPS) as f32;
                match options.intermediate_timesteps {
                    Some(inter) => vec![max, inter as f32, 0.0],
                    None => torch_linspace_f32(max, 0.0, num_steps + 1),
                }
            }
        };
        Ok(Self {
            sigma_data: config.sigma_data,
            angles: angles.into_iter().map(f64::from).collect(),
            step_index: 0,
            pred_x0: None,
        })
    }

    /// σ_d of the config: the pipeline scales the initial noise and model input by it.
    pub fn sigma_data(&self) -> f64 {
        self.sigma_data
    }
}

/// `torch.linspace(start, end, steps)` for f32 on the CPU: the first half counts up from
/// `start`, the second half down from `end`.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

impl Scheduler for SCMScheduler {
    fn name(&self) -> &'static str {
        "SCMScheduler"
    }

    fn timesteps(&self) -> &[f64] {
        &self.angles[..self.angles.len() - 1]
    }

    fn sigmas(&self) -> &[f64] {
        &self.angles
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn order_at(&self, _step: usize) -> usize {
        1
    }

    fn needs_noise(&self) -> bool {
        self.angles
            .get(self.step_index + 1)
            .is_some_and(|&t| (t as f32).sin() != 0.0)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.step_index;
        if i + 1 >= self.angles.len() {
            return Err(SchedulerError::Finished {
                steps: self.angles.len() - 1,
            });
        }
        let (s, t) = (self.angles[i] as f32, self.angles[i + 1] as f32);
        // x₀ = cos(s)·x − sin(s)·F (trigflow), with torch's f32 cos/sin of the f32 angle.
        let x0 = lincomb2(
            f64::from(s.cos()),
            &as_f32(sample)?,
            -f64::from(s.sin()),
            &as_f32(model_output)?,
        )?;
        let prev = if t.sin() == 0.0 {
            // cos(0)·x₀ + 0·ε is x₀: the last step needs no noise.
            x0.clone()
        } else {
            let noise = noise.ok_or(SchedulerError::NoiseRequired {
                scheduler: "SCMScheduler",
                step: i,
            })?;
            let scale = f64::from(t.sin()) * self.sigma_data;
            lincomb2(f64::from(t.cos()), &x0, scale, &as_f32(noise)?)?
        };
        self.pred_x0 = Some(x0);
        self.step_index += 1;
        Ok(prev)
    }

    fn pred_original_sample(&self) -> Result<Option<Tensor>> {
        Ok(self.pred_x0.clone())
    }

    fn begin_at(&mut self, index: usize) -> Result<()> {
        check_begin(self.name(), self.step_index, index, self.angles.len() - 1)?;
        self.step_index = index;
        Ok(())
    }

    /// TrigFlow: `cos θ·x0 + sin θ·noise` with torch's f32 cos/sin of the f32 angle.
    fn noise_to(&self, x0: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let theta = *self.angles.get(index).ok_or_else(|| {
            invalid(
                "index",
                index,
                &format!("the schedule has {} angles", self.angles.len()),
            )
        })? as f32;
        lincomb2(
            f64::from(theta.cos()),
            &as_f32(x0)?,
            f64::from(theta.sin()),
            &as_f32(noise)?,
        )
    }
}
