//! Flow-DPM-Solver: diffusers `DPMSolverMultistepScheduler`
//! (`schedulers/scheduling_dpmsolver_multistep.py`) in the flow form Sana ships: `dpmsolver++`,
//! `prediction_type = "flow_prediction"`, `use_flow_sigmas = true`; spec §5.1–5.3.
//!
//! Flow parameterisation: α_t = 1 − σ_t, λ = ln α − ln σ, data prediction x₀ = x − σ·v. Orders 1–3
//! (midpoint or heun for order 2), with diffusers' rules for lower orders at the start
//! (`lower_order_nums`) and at the end (`lower_order_final`, `euler_at_final`,
//! `final_sigmas_type = "zero"`).

use candle_core::Tensor;
use serde::Deserialize;

use super::{
    as_f32, check_begin, de_f64, invalid, lincomb2, np_linspace, unsupported, Result,
    ScheduleOptions, Scheduler, SchedulerError,
};

/// `scheduler_config.json` of a `DPMSolverMultistepScheduler`; field names and defaults as the
/// diffusers constructor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DPMSolverMultistepConfig {
    pub num_train_timesteps: usize,
    #[serde(deserialize_with = "de_f64")]
    pub beta_start: f64,
    #[serde(deserialize_with = "de_f64")]
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    #[serde(deserialize_with = "de_f64")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(deserialize_with = "de_f64")]
    pub sample_max_value: f64,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    #[serde(deserialize_with = "de_f64")]
    pub flow_shift: f64,
    pub final_sigmas_type: String,
    #[serde(deserialize_with = "de_f64")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
}

impl Default for DPMSolverMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
        }
    }
}

impl DPMSolverMultistepConfig {
    /// Sana's shipped config (spec §5.1) with the given `flow_shift`.
    pub fn sana(flow_shift: f64) -> Self {
        Self {
            prediction_type: "flow_prediction".into(),
            use_flow_sigmas: true,
            flow_shift,
            ..Self::default()
        }
    }

    /// Refuses what this port does not serve. diffusers' own aliases are kept: `deis` runs as
    /// `dpmsolver++` and `logrho`/`bh1`/`bh2` as `midpoint`.
    pub fn validate(&self) -> Result<()> {
        const FLOW: &str = "Sana's samplers are flow-matching; use the checkpoint's shipped \
            scheduler_config.json (prediction_type \"flow_prediction\", use_flow_sigmas true)";
        if !matches!(self.algorithm_type.as_str(), "dpmsolver++" | "deis") {
            return Err(unsupported(
                "algorithm_type",
                &self.algorithm_type,
                "only \"dpmsolver++\" is implemented",
            ));
        }
        if !matches!(
            self.solver_type.as_str(),
            "midpoint" | "heun" | "logrho" | "bh1" | "bh2"
        ) {
            return Err(unsupported(
                "solver_type",
                &self.solver_type,
                "expected \"midpoint\" or \"heun\"",
            ));
        }
        if self.prediction_type != "flow_prediction" {
            return Err(unsupported("prediction_type", &self.prediction_type, FLOW));
        }
        if !self.use_flow_sigmas {
            return Err(unsupported("use_flow_sigmas", self.use_flow_sigmas, FLOW));
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(unsupported(
                "solver_order",
                self.solver_order,
                "expected 1, 2 or 3",
            ));
        }
        if self.thresholding {
            return Err(unsupported(
                "thresholding",
                self.thresholding,
                "dynamic thresholding is not implemented (and is meant for pixel-space models)",
            ));
        }
        for (field, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
        ] {
            if on {
                return Err(unsupported(
                    field,
                    on,
                    "only flow sigmas (use_flow_sigmas) are implemented",
                ));
            }
        }
        if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return Err(unsupported(
                "final_sigmas_type",
                &self.final_sigmas_type,
                "expected \"zero\" or \"sigma_min\"",
            ));
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "linspace" | "leading" | "trailing"
        ) {
            return Err(unsupported(
                "timestep_spacing",
                &self.timestep_spacing,
                "expected \"linspace\", \"leading\" or \"trailing\"",
            ));
        }
        if self.rescale_betas_zero_snr {
            return Err(unsupported(
                "rescale_betas_zero_snr",
                self.rescale_betas_zero_snr,
                "not implemented",
            ));
        }
        if self.use_dynamic_shifting && self.time_shift_type != "exponential" {
            return Err(unsupported(
                "time_shift_type",
                &self.time_shift_type,
                "diffusers' DPMSolverMultistepScheduler only shifts exponentially",
            ));
        }
        if !(self.flow_shift.is_finite() && self.flow_shift > 0.0) {
            return Err(unsupported(
                "flow_shift",
                self.flow_shift,
                "must be positive",
            ));
        }
        if self.num_train_timesteps == 0 {
            return Err(unsupported("num_train_timesteps", 0, "must be positive"));
        }
        self.first_beta().map(|_| ())
    }

    /// β₀ as the diffusers constructor computes it in f32; only `final_sigmas_type = "sigma_min"`
    /// uses it (flow sigmas ignore the β schedule otherwise).
    fn first_beta(&self) -> Result<f32> {
        if let Some(betas) = &self.trained_betas {
            return betas
                .first()
                .map(|&b| b as f32)
                .ok_or_else(|| unsupported("trained_betas", betas, "must not be empty"));
        }
        match self.beta_schedule.as_str() {
            // torch.linspace(beta_start, beta_end, n, dtype=float32)[0]
            "linear" => Ok(self.beta_start as f32),
            // torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float32)[0] ** 2
            "scaled_linear" => {
                let b = self.beta_start.sqrt() as f32;
                Ok(b * b)
            }
            // betas_for_alpha_bar(n)[0], cosine, in Python floats
            "squaredcos_cap_v2" => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                let t1 = 1.0 / self.num_train_timesteps as f64;
                Ok((1.0 - alpha_bar(t1) / alpha_bar(0.0)).min(0.999) as f32)
            }
            other => Err(unsupported(
                "beta_schedule",
                other,
                "expected \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\"",
            )),
        }
    }
}

/// Flow-DPM-Solver state for one generation.
#[derive(Debug)]
pub struct DPMSolverMultistepScheduler {
    config: DPMSolverMultistepConfig,
    /// Integer timesteps (as f64), one per step.
    timesteps: Vec<f64>,
    /// f32 sigmas (as f64), one per step plus the final one.
    sigmas: Vec<f64>,
    step_index: usize,
    /// The step the schedule began at ([`Scheduler::begin_at`]; 0 for text-to-image).
    begin: usize,
    /// Data predictions x₀ of the last `solver_order` steps, oldest first (diffusers' `model_outputs`).
    model_outputs: Vec<Option<Tensor>>,
}

impl DPMSolverMultistepScheduler {
    /// `set_timesteps(num_steps, mu=options.mu)` on a fresh scheduler.
    pub fn new(
        config: &DPMSolverMultistepConfig,
        num_steps: usize,
        options: &ScheduleOptions,
    ) -> Result<Self> {
        config.validate()?;
        if num_steps == 0 {
            return Err(invalid("num_steps", num_steps, "must be at least 1"));
        }
        if let Some(s) = &options.sigmas {
            return Err(invalid(
                "sigmas",
                s,
                "DPMSolverMultistepScheduler.set_timesteps takes no custom sigmas",
            ));
        }
        if let Some(t) = &options.timesteps {
            return Err(invalid(
                "timesteps",
                t,
                "custom timesteps are not defined with use_flow_sigmas (diffusers fails on them)",
            ));
        }
        if options.max_timesteps.is_some() || options.intermediate_timesteps.is_some() {
            return Err(invalid(
                "max_timesteps/intermediate_timesteps",
                (options.max_timesteps, options.intermediate_timesteps),
                "only SCMScheduler takes TrigFlow angles",
            ));
        }
        let shift = match options.mu {
            Some(mu) if config.use_dynamic_shifting => mu.exp(),
            Some(mu) => {
                return Err(invalid(
                    "mu",
                    mu,
                    "the scheduler config does not set use_dynamic_shifting",
                ))
            }
            None => config.flow_shift,
        };

        // σ̃ = 1 − linspace(1, 1/T, N+1), shifted, reversed, without the trailing 0 (numpy f64).
        let n_train = config.num_train_timesteps as f64;
        let alphas = np_linspace(1.0, 1.0 / n_train, num_steps + 1);
        let shifted: Vec<f64> = alphas
            .iter()
            .rev()
            .take(num_steps)
            .map(|&a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .collect();
        // `.to(torch.int64)` truncates toward zero.
        let timesteps = shifted.iter().map(|&s| (s * n_train).trunc()).collect();
        let sigma_last = match config.final_sigmas_type.as_str() {
            "zero" => 0.0,
            _ => {
                let alpha0 = 1.0f32 - config.first_beta()?;
                ((1.0 - alpha0) / alpha0).sqrt()
            }
        };
        let sigmas = shifted
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(sigma_last))
            .map(f64::from)
            .collect();
        Ok(Self {
            model_outputs: vec![None; config.solver_order],
            config: config.clone(),
            timesteps,
            sigmas,
            step_index: 0,
            begin: 0,
        })
    }

    /// α_t, σ_t and λ_t = ln α_t − ln σ_t of a flow sigma.
    fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
        let alpha = 1.0 - sigma;
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// The first-order (DDIM-like) update x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·x₀.
    fn first_order(&self, x0: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let (sigma_s, sigma_t) = (self.sigmas[i], self.sigmas[i + 1]);
        if sigma_t == 0.0 {
            // λ_t = +∞, e^{−h} = 0: the update is x₀ exactly (diffusers gets the same through infs).
            return Ok(x0.clone());
        }
        let (alpha_t, _, lambda_t) = Self::alpha_sigma_lambda(sigma_t);
        let (_, _, lambda_s) = Self::alpha_sigma_lambda(sigma_s);
        let h = lambda_t - lambda_s;
        lincomb2(sigma_t / sigma_s, sample, -alpha_t * (-h).exp_m1(), x0)
    }

    /// The multistep updates of order 2 and 3, expanded into one linear combination of the sample
    /// and the last data predictions (the same sum as diffusers' D0/D1/D2 form).
    fn multistep(&self, order: usize, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = Self::alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = Self::alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, lambda_s1) = Self::alpha_sigma_lambda(self.sigmas[i - 1]);
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let em1 = (-h).exp_m1(); // e^{−h} − 1
        let d0 = -alpha_t * em1;
        let m = &self.model_outputs;
        let last = |k: usize| {
            m[m.len() - 1 - k]
                .as_ref()
                .expect("multistep update with a missing data prediction; this is a bug")
        };
        let mut x = sample.affine(sigma_t / sigma_s0, 0.0)?;
        // Coefficients of m0, m1, m2 (newest first); a fixed array, so a step allocates no Vec.
        let (coefs, terms) = if order == 2 {
            // x_t = (σ_t/σ_s0)x + d0·D0 + c·D1, D1 = (m0 − m1)/r0
            let c = match self.config.solver_type.as_str() {
                "heun" => alpha_t * (em1 / h + 1.0),
                _ => -0.5 * alpha_t * em1,
            };
            ([d0 + c / r0, -c / r0, 0.0], 2)
        } else {
            let (_, _, lambda_s2) = Self::alpha_sigma_lambda(self.sigmas[i - 2]);
            let r1 = (lambda_s1 - lambda_s2) / h;
            let c1 = alpha_t * (em1 / h + 1.0);
            let c2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
            // D1 = D1_0 + r0/(r0+r1)·Δ, D2 = Δ/(r0+r1), Δ = D1_0 − D1_1,
            // D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1.
            let q = c1 * r0 / (r0 + r1) + c2 / (r0 + r1);
            let coefs = [
                d0 + c1 / r0 + q / r0,
                -c1 / r0 - q * (1.0 / r0 + 1.0 / r1),
                q / r1,
            ];
            (coefs, 3)
        };
        for (k, &c) in coefs[..terms].iter().enumerate() {
            x = (x + last(k).affine(c, 0.0)?)?;
        }
        Ok(x)
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn name(&self) -> &'static str {
        "DPMSolverMultistepScheduler"
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

    /// diffusers' `step`: first order while fewer than one earlier prediction exists or at a
    /// lower-order final step, second order while fewer than two exist or at the second-to-last
    /// step of a short (< 15) schedule with `lower_order_final`, else `solver_order`.
    fn order_at(&self, step: usize) -> usize {
        let c = &self.config;
        let n = self.timesteps.len();
        // Earlier data predictions at hand (diffusers' `lower_order_nums`, which counts from the
        // first step run, not from the start of the schedule).
        let lower_order_nums = step.saturating_sub(self.begin).min(c.solver_order);
        let final_step = step + 1 == n
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == "zero");
        let second_last = step + 2 == n && c.lower_order_final && n < 15;
        if c.solver_order == 1 || lower_order_nums < 1 || final_step {
            1
        } else if c.solver_order == 2 || lower_order_nums < 2 || second_last {
            2
        } else {
            3
        }
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.step_index;
        if i >= self.timesteps.len() {
            return Err(SchedulerError::Finished {
                steps: self.timesteps.len(),
            });
        }
        let sample = as_f32(sample)?;
        // flow_prediction: x₀ = x − σ·v (bit for bit diffusers' f32 expression)
        let x0 = (&sample - as_f32(model_output)?.affine(self.sigmas[i], 0.0)?)?;
        self.model_outputs.rotate_left(1);
        *self
            .model_outputs
            .last_mut()
            .expect("solver_order >= 1; this is a bug") = Some(x0.clone());
        let prev = match self.order_at(i) {
            1 => self.first_order(&x0, &sample)?,
            order => self.multistep(order, &sample)?,
        };
        self.step_index += 1;
        Ok(prev)
    }

    fn pred_original_sample(&self) -> Result<Option<Tensor>> {
        Ok(self.model_outputs.last().cloned().flatten())
    }

    fn begin_at(&mut self, index: usize) -> Result<()> {
        check_begin(self.name(), self.step_index, index, self.timesteps.len())?;
        self.step_index = index;
        self.begin = index;
        Ok(())
    }
}
