//! Sampler parity with diffusers 0.42 (`DPMSolverMultistepScheduler`,
//! `FlowMatchEulerDiscreteScheduler`, `SCMScheduler`), against the reference numbers that
//! `tools/fixtures/scheduler.py` writes to `tests/fixtures/scheduler/`.
//!
//! * Schedules: integer timesteps exactly, float timesteps and sigmas ≤ 1e-6 relative and within 1 f32
//!   ulp (the port computes them in diffusers' precision and order: all but a handful are bit for bit;
//!   the rest are where torch's f32 sqrt or vectorised linspace rounds differently).
//! * Loops: a full sampling loop driven by a stand-in velocity `v = sin(x)·c − 0.5·x` (c = f32(t)/1000,
//!   or the angle for SCM) with diffusers' noise, f32 ≤ 1e-5 × max|ref|, plus the solver order diffusers
//!   used at every step.

use crate::common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use sana_model::scheduler::{
    DPMSolverMultistepConfig, SCMScheduler, ScheduleOptions, Scheduler, SchedulerConfig,
    SchedulerError,
};
use serde::Deserialize;

const SCHEDULE_RTOL: f64 = 1e-6;
/// f32 sampling loop vs diffusers' f32 loop.
const LOOP_RTOL: f32 = 1e-5;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Options {
    sigmas: Option<Vec<f64>>,
    timesteps: Option<Vec<f64>>,
    mu: Option<f64>,
    max_timesteps: Option<f64>,
    intermediate_timesteps: Option<f64>,
}

impl From<&Options> for ScheduleOptions {
    fn from(o: &Options) -> Self {
        ScheduleOptions {
            sigmas: o.sigmas.clone(),
            timesteps: o.timesteps.clone(),
            mu: o.mu,
            max_timesteps: o.max_timesteps,
            intermediate_timesteps: o.intermediate_timesteps,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Schedule {
    timesteps: Vec<serde_json::Number>,
    sigmas: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct Group {
    name: String,
    config: serde_json::Value,
    options: Options,
    by_steps: BTreeMap<String, Schedule>,
}

#[derive(Debug, Deserialize)]
struct LoopCase {
    name: String,
    config: serde_json::Value,
    steps: usize,
    options: Options,
    orders: Vec<usize>,
    /// How many noise tensors diffusers drew (SCM also draws one for the final step, unused).
    noise_draws: usize,
    #[serde(default)]
    x0_is_sample: bool,
}

fn dir() -> std::path::PathBuf {
    common::fixtures().join("scheduler")
}

fn read_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad fixture {}: {e}", path.display()))
}

fn config(value: &serde_json::Value) -> SchedulerConfig {
    SchedulerConfig::from_json(&value.to_string())
        .unwrap_or_else(|e| panic!("config {value} refused: {e}"))
}

fn sana(flow_shift: f64) -> SchedulerConfig {
    SchedulerConfig::DPMSolverMultistepScheduler(DPMSolverMultistepConfig::sana(flow_shift))
}

fn assert_rel(case: &str, what: &str, got: &[f64], want: &[f64]) {
    sana_testing::assert_each_relative_f64(&format!("{case}: {what}"), got, want, SCHEDULE_RTOL);
}

#[test]
fn schedules_match_diffusers() {
    let groups: Vec<Group> = read_json("schedules.json");
    let (mut compared, mut bit_exact) = (0usize, 0usize);
    let mut covered: HashMap<&str, usize> = HashMap::new();
    for g in &groups {
        let cfg = config(&g.config);
        *covered.entry(cfg.class_name()).or_default() += g.by_steps.len();
        for (steps, want) in &g.by_steps {
            let case = format!("{} steps={steps}", g.name);
            let steps: usize = steps.parse().unwrap();
            let sched = cfg
                .build(steps, &(&g.options).into())
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(
                sched.num_steps(),
                want.timesteps.len(),
                "{case}: number of steps"
            );
            assert_eq!(
                sched.step_index(),
                0,
                "{case}: a fresh schedule starts at step 0"
            );
            for (i, (&got, t)) in sched.timesteps().iter().zip(&want.timesteps).enumerate() {
                if let Some(t) = t.as_i64() {
                    // Integer timesteps (DPM-Solver's truncated ones) must match exactly.
                    assert_eq!(
                        got, t as f64,
                        "{case}: timestep[{i}] (integers match exactly)"
                    );
                }
            }
            let want_t: Vec<f64> = want.timesteps.iter().map(|t| t.as_f64().unwrap()).collect();
            assert_rel(&case, "timesteps", sched.timesteps(), &want_t);
            assert_rel(&case, "sigmas", sched.sigmas(), &want.sigmas);
            // torch's own f32 sqrt and vectorised linspace are not always correctly rounded; the
            // port mirrors every operation, so it is never more than 1 ulp away.
            let as_f32 =
                |v: &mut dyn Iterator<Item = &f64>| v.map(|&x| x as f32).collect::<Vec<_>>();
            let got = as_f32(&mut sched.timesteps().iter().chain(sched.sigmas()));
            let wanted = as_f32(&mut want_t.iter().chain(&want.sigmas));
            compared += got.len();
            bit_exact += sana_testing::assert_within_ulps_f32(&case, &got, &wanted, 1);
        }
    }
    eprintln!("schedules: {compared} values compared, {bit_exact} bit-exact as f32");
    // Every scheduler with every steps count: 7 counts × groups (see the generator).
    for class in [
        "DPMSolverMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "SCMScheduler",
    ] {
        assert!(
            covered.get(class).copied().unwrap_or(0) >= 14,
            "fixture covers too few {class} schedules: {covered:?}"
        );
    }
}

#[test]
fn schedule_groups_cover_every_steps_count_and_shift() {
    let groups: Vec<Group> = read_json("schedules.json");
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    for shift in ["1", "3", "6"] {
        for final_sigmas in ["zero", "sigma_min"] {
            for spacing in ["linspace", "leading", "trailing"] {
                let name = format!("dpm_shift{shift}_{final_sigmas}_{spacing}");
                let g = groups
                    .iter()
                    .find(|g| g.name == name)
                    .unwrap_or_else(|| panic!("missing group {name}"));
                let steps: Vec<&str> = g.by_steps.keys().map(String::as_str).collect();
                for n in ["1", "2", "3", "5", "20", "50", "100"] {
                    assert!(steps.contains(&n), "{name} lacks {n} steps");
                }
            }
        }
        assert!(names.contains(&format!("euler_shift{shift}").as_str()));
        assert!(names.contains(&format!("euler_shift{shift}_terminal").as_str()));
    }
}

/// The spec's independently verified schedules (spec §5.2, §5.4).
#[test]
fn sana_schedules_match_the_spec() {
    let s = sana(3.0).build(20, &ScheduleOptions::default()).unwrap();
    let want = [
        999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499, 428, 345,
        249, 136,
    ];
    assert_eq!(s.timesteps(), want.map(f64::from).as_slice());
    let sigmas = [
        0.999666, 0.982419, 0.963941, 0.944094, 0.922722, 0.899640, 0.874635, 0.847457, 0.817810,
        0.785340, 0.749625, 0.710152, 0.666296, 0.617284, 0.562148, 0.499667, 0.428265, 0.345888,
        0.249792, 0.136240, 0.0,
    ];
    for (i, (&got, want)) in s.sigmas().iter().zip(sigmas).enumerate() {
        assert!((got - want).abs() < 1e-6, "sigma[{i}] = {got}, spec {want}");
    }
    let s6 = sana(6.0).build(20, &ScheduleOptions::default()).unwrap();
    let want6 = [
        999, 991, 981, 971, 959, 947, 933, 917, 899, 879, 856, 830, 799, 763, 719, 666, 599, 513,
        399, 239,
    ];
    assert_eq!(s6.timesteps(), want6.map(f64::from).as_slice());

    // Flow Euler's double shift: σ_0 = 1, σ_19 = shift(shift(0.001)) ≈ 0.008929.
    let euler = SchedulerConfig::from_json(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#,
    )
    .unwrap()
    .build(20, &ScheduleOptions::default())
    .unwrap();
    assert_eq!(euler.sigmas()[0], 1.0);
    assert!(
        (euler.sigmas()[19] - 0.008929).abs() < 1e-6,
        "{}",
        euler.sigmas()[19]
    );
    assert_eq!(euler.timesteps()[0], 1000.0);

    // Sprint's default 2-step schedule.
    let scm = SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler"}"#)
        .unwrap()
        .build(
            2,
            &ScheduleOptions {
                intermediate_timesteps: Some(1.3),
                ..Default::default()
            },
        )
        .unwrap();
    let max = SCMScheduler::DEFAULT_MAX_TIMESTEPS as f32;
    assert_eq!(scm.timesteps(), [f64::from(max), f64::from(1.3f32)]);
    assert_eq!(scm.sigmas()[2], 0.0);
}

/// The stand-in velocity `sin(x)·c − 0.5·x`, as the generator computes it.
fn standin(x: &Tensor, c: f32) -> Tensor {
    (x.sin().unwrap().affine(f64::from(c), 0.0).unwrap() - x.affine(0.5, 0.0).unwrap()).unwrap()
}

/// The stand-in's `c` for the step at timestep `t`: f32(t)/1000, or the angle itself for SCM.
fn standin_c(sched: &dyn Scheduler, t: f64) -> f32 {
    if sched.name() == "SCMScheduler" {
        t as f32
    } else {
        t as f32 / 1000.0
    }
}

#[test]
fn sampling_loops_match_diffusers() {
    let cases: Vec<LoopCase> = read_json("loops.json");
    let tensors = common::load(&dir().join("loops.safetensors"));
    let get = |k: &str| {
        tensors
            .get(k)
            .unwrap_or_else(|| panic!("fixture lacks tensor {k}"))
            .clone()
    };
    let x_init = get("x_init");
    let mut per_class: BTreeMap<&str, (usize, f32)> = BTreeMap::new();
    for case in &cases {
        let name = case.name.as_str();
        let cfg = config(&case.config);
        let mut sched = cfg
            .build(case.steps, &(&case.options).into())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            sched.pred_original_sample().unwrap().is_none(),
            "{name}: no x0 before a step"
        );
        let mut x = x_init.clone();
        let mut noise_used = 0;
        let timesteps = sched.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            assert_eq!(sched.current_timestep(), Some(t), "{name}: step {i}");
            if cfg.class_name() == "DPMSolverMultistepScheduler" {
                assert_eq!(
                    sched.order_at(i),
                    case.orders[i],
                    "{name}: solver order of step {i} (diffusers used {:?})",
                    case.orders
                );
            }
            let v = standin(&x, standin_c(sched.as_ref(), t));
            let noise = sched.needs_noise().then(|| get(&format!("noise.{i}")));
            noise_used += usize::from(noise.is_some());
            x = sched
                .step(&v, &x, noise.as_ref())
                .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
            assert_eq!(x.dtype(), DType::F32);
        }
        let unused_final_draw = usize::from(cfg.class_name() == "SCMScheduler");
        assert_eq!(
            noise_used + unused_final_draw,
            case.noise_draws,
            "{name}: steps that read noise"
        );
        let want = get(&format!("{name}.sample"));
        let (diff, scale) = common::max_abs_diff(&x, &want);
        assert!(scale > 0.0, "{name}: reference is all zeros");
        assert!(
            diff <= LOOP_RTOL * scale,
            "{name}: final sample off by {diff:.3e} > {LOOP_RTOL:e} × max|ref| {scale:.3e} (f32)"
        );
        let x0 = sched
            .pred_original_sample()
            .unwrap()
            .expect("x0 after a step");
        if case.x0_is_sample {
            assert_eq!(
                common::max_abs_diff(&x0, &x).0,
                0.0,
                "{name}: last x0 is the sample"
            );
        } else {
            common::assert_close(
                name,
                &x0,
                &get(&format!("{name}.x0")),
                LOOP_RTOL,
                "x0 (f32)",
            );
        }
        assert!(
            matches!(
                sched.step(&x, &x, Some(&x)),
                Err(SchedulerError::Finished { .. })
            ),
            "{name}: stepping past the end must fail"
        );
        let e = per_class.entry(cfg.class_name()).or_default();
        e.0 += 1;
        e.1 = e.1.max(diff / scale);
    }
    eprintln!("loops (count, worst error / max|ref|): {per_class:?}");
    assert!(
        per_class.values().all(|(n, _)| *n >= 9),
        "too few loops: {per_class:?}"
    );
}

/// An f32 [2, 4, 5, 6] latent that is not the fixture's, so the checks below are independent of it.
fn latent(seed: u64) -> Tensor {
    let v: Vec<f32> = (0..240)
        .map(|i| ((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    Tensor::from_vec(v, (2, 4, 5, 6), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b).0
}

#[test]
fn dpm_solver_orders_at_start_and_end() {
    let orders = |cfg: SchedulerConfig, steps: usize| -> Vec<usize> {
        let s = cfg.build(steps, &ScheduleOptions::default()).unwrap();
        (0..steps).map(|i| s.order_at(i)).collect()
    };
    let dpm = |order: usize, extra: &str| {
        SchedulerConfig::from_json(&format!(
            r#"{{"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
                "use_flow_sigmas": true, "flow_shift": 3.0, "solver_order": {order}{extra}}}"#
        ))
        .unwrap()
    };
    // Sana's default: first step and (final sigma 0) last step first order, the rest second.
    let o = orders(sana(3.0), 20);
    assert_eq!((o[0], o[1], o[18], o[19]), (1, 2, 2, 1), "{o:?}");
    assert_eq!(orders(sana(3.0), 1), [1]);
    assert_eq!(orders(sana(3.0), 2), [1, 1]);
    // Order 3 warms up 1, 2, 3; a short schedule (< 15 steps) also steps down 2, 1 at the end.
    assert_eq!(orders(dpm(3, ""), 5), [1, 2, 3, 2, 1]);
    assert_eq!(orders(dpm(3, ""), 3), [1, 2, 1]);
    let o = orders(dpm(3, ""), 15);
    assert_eq!((o[0], o[1], o[2], o[13], o[14]), (1, 2, 3, 3, 1), "{o:?}");
    // final sigma_min: only lower_order_final (< 15 steps) or euler_at_final lower the last steps.
    let sm = r#", "final_sigmas_type": "sigma_min""#;
    assert_eq!(orders(dpm(3, sm), 14)[12..], [2, 1]);
    assert_eq!(orders(dpm(3, sm), 15)[13..], [3, 3]);
    let no_lof = format!(r#"{sm}, "lower_order_final": false"#);
    assert_eq!(orders(dpm(3, &no_lof), 5), [1, 2, 3, 3, 3]);
    let euler_final = format!(r#"{no_lof}, "euler_at_final": true"#);
    assert_eq!(orders(dpm(3, &euler_final), 20)[18..], [3, 1]);
    assert_eq!(orders(dpm(1, ""), 5), [1; 5]);
}

#[test]
fn dpm_solver_first_and_last_steps_are_first_order_updates() {
    // The first step of Sana's default solver equals the closed-form first-order update, computed
    // here independently: x₁ = (σ₁/σ₀)·x − α₁(e^{−h} − 1)·(x − σ₀v), h = λ₁ − λ₀, λ = ln(1−σ) − ln σ.
    let steps = 3;
    let mut s = sana(3.0).build(steps, &ScheduleOptions::default()).unwrap();
    let (s0, s1) = (s.sigmas()[0], s.sigmas()[1]);
    let lambda = |sig: f64| (1.0 - sig).ln() - sig.ln();
    let h = lambda(s1) - lambda(s0);
    let x = latent(1);
    let v = standin(&x, 0.999);
    let x0 = (&x - v.affine(s0, 0.0).unwrap()).unwrap();
    let want = (x.affine(s1 / s0, 0.0).unwrap()
        + x0.affine(-(1.0 - s1) * ((-h).exp() - 1.0), 0.0).unwrap())
    .unwrap();
    let x1 = s.step(&v, &x, None).unwrap();
    let (diff, scale) = common::max_abs_diff(&x1, &want);
    assert!(diff <= 1e-6 * scale, "first step is not first order");
    assert!(
        max_diff(&s.pred_original_sample().unwrap().unwrap(), &x0) == 0.0,
        "x0 preview of step 0"
    );
    // Second step: second order differs from what a first-order update would give.
    let v1 = standin(&x1, 0.5);
    let x2 = s.step(&v1, &x1, None).unwrap();
    let (s2, x0_1) = (s.sigmas()[2], (&x1 - v1.affine(s1, 0.0).unwrap()).unwrap());
    let h = lambda(s2) - lambda(s1);
    let first = (x1.affine(s2 / s1, 0.0).unwrap()
        + x0_1.affine(-(1.0 - s2) * ((-h).exp() - 1.0), 0.0).unwrap())
    .unwrap();
    assert!(
        max_diff(&x2, &first) > 1e-4,
        "step 1 must use the second-order update"
    );
    // The last step to σ = 0 is first order and lands exactly on its x₀.
    let v2 = standin(&x2, 0.25);
    let x3 = s.step(&v2, &x2, None).unwrap();
    let x0_2 = (&x2 - v2.affine(s.sigmas()[2], 0.0).unwrap()).unwrap();
    assert_eq!(max_diff(&x3, &x0_2), 0.0, "last step returns x0 exactly");
}

#[test]
fn scm_step_needs_noise_until_the_last_step() {
    let cfg = SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler"}"#).unwrap();
    let mut s = cfg.build(2, &ScheduleOptions::default()).unwrap();
    let x = latent(2);
    assert!(s.needs_noise());
    assert!(
        matches!(
            s.step(&x, &x, None),
            Err(SchedulerError::NoiseRequired { step: 0, .. })
        ),
        "missing noise must be refused"
    );
    assert_eq!(s.step_index(), 0, "a refused step leaves the state alone");
    // x0 = cos(s)·x − sin(s)·F; next = cos(t)·x0 + sin(t)·σ_d·ε, by hand.
    let (f, noise) = (latent(3), latent(4));
    let (a0, a1) = (s.sigmas()[0] as f32, s.sigmas()[1] as f32);
    let x1 = s.step(&f, &x, Some(&noise)).unwrap();
    let x0 = (x.affine(a0.cos().into(), 0.0).unwrap() - f.affine(a0.sin().into(), 0.0).unwrap())
        .unwrap();
    let want = (x0.affine(a1.cos().into(), 0.0).unwrap()
        + noise.affine(f64::from(a1.sin()) * 0.5, 0.0).unwrap())
    .unwrap();
    assert!(max_diff(&x1, &want) < 1e-5);
    assert!(!s.needs_noise(), "the step to angle 0 draws no noise");
    let x2 = s.step(&f, &x1, None).unwrap();
    assert_eq!(
        max_diff(&x2, &s.pred_original_sample().unwrap().unwrap()),
        0.0
    );
}

#[test]
fn each_build_is_a_fresh_generation() {
    let cfg = sana(3.0);
    let x = latent(5);
    let run = |s: &mut Box<dyn Scheduler>| {
        let mut x = x.clone();
        for &t in s.timesteps().to_vec().iter() {
            let v = standin(&x, t as f32 / 1000.0);
            x = s.step(&v, &x, None).unwrap();
        }
        x
    };
    let mut a = cfg.build(5, &ScheduleOptions::default()).unwrap();
    let first = run(&mut a);
    let mut b = cfg.build(5, &ScheduleOptions::default()).unwrap();
    assert_eq!(b.step_index(), 0);
    assert_eq!(
        max_diff(&run(&mut b), &first),
        0.0,
        "history must not leak between builds"
    );
}

#[test]
fn shipped_configs_load() {
    let load = |name: &str| {
        SchedulerConfig::from_file(dir().join("configs").join(format!("{name}.json")))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    // Written by diffusers itself, with `"lambda_min_clipped": -Infinity`.
    match load("sana_dpm_shift3") {
        SchedulerConfig::DPMSolverMultistepScheduler(c) => {
            assert_eq!(c, DPMSolverMultistepConfig::sana(3.0));
            assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        }
        other => panic!("{other:?}"),
    }
    match load("sana_4k_dpm_shift6") {
        SchedulerConfig::DPMSolverMultistepScheduler(c) => assert_eq!(c.flow_shift, 6.0),
        other => panic!("{other:?}"),
    }
    match load("flow_euler_shift3") {
        SchedulerConfig::FlowMatchEulerDiscreteScheduler(c) => assert_eq!(c.shift, 3.0),
        other => panic!("{other:?}"),
    }
    match load("sprint_scm") {
        SchedulerConfig::SCMScheduler(c) => assert_eq!(c.sigma_data, 0.5),
        other => panic!("{other:?}"),
    }
    // Integers where diffusers writes floats are read as floats.
    match SchedulerConfig::from_json(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3}"#,
    )
    .unwrap()
    {
        SchedulerConfig::FlowMatchEulerDiscreteScheduler(c) => assert_eq!(c.shift, 3.0),
        other => panic!("{other:?}"),
    }
    // Python literals inside strings are left alone; unknown keys are ignored.
    let c = SchedulerConfig::from_json(
        r#"{"_class_name": "SCMScheduler", "note": "NaN and -Infinity", "extra": [NaN, Infinity]}"#,
    );
    assert!(c.is_ok(), "{c:?}");
    let err =
        SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler", "prediction_type": "NaN"}"#)
            .unwrap_err()
            .to_string();
    assert!(err.contains(r#"`prediction_type` = "NaN""#), "{err}");
}

#[test]
fn unsupported_configs_are_refused_naming_field_and_value() {
    const DPM: &str = r#""_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": true"#;
    const EULER: &str = r#""_class_name": "FlowMatchEulerDiscreteScheduler""#;
    let cases = [
        (
            format!(r#"{{{DPM}, "algorithm_type": "sde-dpmsolver++"}}"#),
            r#"`algorithm_type` = "sde-dpmsolver++""#,
        ),
        (
            format!(r#"{{{DPM}, "algorithm_type": "dpmsolver"}}"#),
            r#"`algorithm_type` = "dpmsolver""#,
        ),
        (
            format!(r#"{{{DPM}, "thresholding": true}}"#),
            "`thresholding` = true",
        ),
        (
            format!(r#"{{{DPM}, "prediction_type": "epsilon"}}"#),
            r#"`prediction_type` = "epsilon""#,
        ),
        (
            format!(r#"{{{DPM}, "prediction_type": "v_prediction"}}"#),
            r#"`prediction_type` = "v_prediction""#,
        ),
        (
            format!(r#"{{{DPM}, "use_flow_sigmas": false}}"#),
            "`use_flow_sigmas` = false",
        ),
        (
            format!(r#"{{{DPM}, "use_karras_sigmas": true}}"#),
            "`use_karras_sigmas` = true",
        ),
        (
            format!(r#"{{{DPM}, "use_exponential_sigmas": true}}"#),
            "`use_exponential_sigmas` = true",
        ),
        (
            format!(r#"{{{DPM}, "use_beta_sigmas": true}}"#),
            "`use_beta_sigmas` = true",
        ),
        (
            format!(r#"{{{DPM}, "use_lu_lambdas": true}}"#),
            "`use_lu_lambdas` = true",
        ),
        (
            format!(r#"{{{DPM}, "solver_order": 4}}"#),
            "`solver_order` = 4",
        ),
        (
            format!(r#"{{{DPM}, "solver_type": "rk4"}}"#),
            r#"`solver_type` = "rk4""#,
        ),
        (
            format!(r#"{{{DPM}, "final_sigmas_type": "denoise_to_zero"}}"#),
            r#"`final_sigmas_type` = "denoise_to_zero""#,
        ),
        (
            format!(r#"{{{DPM}, "timestep_spacing": "karras"}}"#),
            r#"`timestep_spacing` = "karras""#,
        ),
        (
            format!(r#"{{{DPM}, "rescale_betas_zero_snr": true}}"#),
            "`rescale_betas_zero_snr` = true",
        ),
        (
            format!(r#"{{{DPM}, "beta_schedule": "sigmoid"}}"#),
            r#"`beta_schedule` = "sigmoid""#,
        ),
        (
            format!(r#"{{{DPM}, "flow_shift": 0.0}}"#),
            "`flow_shift` = 0.0",
        ),
        (
            format!(r#"{{{EULER}, "use_karras_sigmas": true}}"#),
            "`use_karras_sigmas` = true",
        ),
        (
            format!(r#"{{{EULER}, "use_beta_sigmas": true}}"#),
            "`use_beta_sigmas` = true",
        ),
        (
            format!(r#"{{{EULER}, "invert_sigmas": true}}"#),
            "`invert_sigmas` = true",
        ),
        (
            format!(r#"{{{EULER}, "time_shift_type": "cubic"}}"#),
            r#"`time_shift_type` = "cubic""#,
        ),
        (
            r#"{"_class_name": "SCMScheduler", "prediction_type": "v_prediction"}"#.to_string(),
            r#"`prediction_type` = "v_prediction""#,
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler"}"#.to_string(),
            r#"`_class_name` = "EulerDiscreteScheduler""#,
        ),
        (
            r#"{"num_train_timesteps": 1000}"#.to_string(),
            "`_class_name` = (missing)",
        ),
    ];
    for (json, want) in &cases {
        let err = match SchedulerConfig::from_json(json) {
            Ok(c) => panic!("accepted {json}: {c:?}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "refusal of {json} should name {want}; got: {msg}"
        );
        assert!(msg.starts_with("unsupported scheduler config"), "{msg}");
    }
    assert!(matches!(
        SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler", "sigma_data": "half"}"#),
        Err(SchedulerError::Parse(_))
    ));
}

#[test]
fn invalid_schedule_requests_are_refused() {
    let euler = |extra: &str| {
        SchedulerConfig::from_json(&format!(
            r#"{{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0{extra}}}"#
        ))
        .unwrap()
    };
    let scm = SchedulerConfig::from_json(r#"{"_class_name": "SCMScheduler"}"#).unwrap();
    let opts = |f: fn(&mut ScheduleOptions)| {
        let mut o = ScheduleOptions::default();
        f(&mut o);
        o
    };
    let cases: Vec<(SchedulerConfig, usize, ScheduleOptions, &str)> = vec![
        (sana(3.0), 0, ScheduleOptions::default(), "`num_steps` = 0"),
        (
            sana(3.0),
            3,
            opts(|o| o.timesteps = Some(vec![999.0, 500.0, 10.0])),
            "`timesteps` = [999.0, 500.0, 10.0]",
        ),
        (
            sana(3.0),
            3,
            opts(|o| o.sigmas = Some(vec![0.9, 0.5, 0.1])),
            "`sigmas`",
        ),
        (sana(3.0), 3, opts(|o| o.mu = Some(1.0)), "`mu` = 1.0"),
        (
            euler(r#", "use_dynamic_shifting": true"#),
            3,
            ScheduleOptions::default(),
            "`mu` = None",
        ),
        (
            euler(""),
            3,
            opts(|o| o.sigmas = Some(vec![1.0, 0.5])),
            "`sigmas` = [1.0, 0.5]: must hold one value per step (3)",
        ),
        (
            euler(r#", "shift_terminal": 0.05"#),
            1,
            ScheduleOptions::default(),
            "`shift_terminal`",
        ),
        (
            scm.clone(),
            3,
            opts(|o| o.intermediate_timesteps = Some(1.3)),
            "`intermediate_timesteps` = 1.3",
        ),
        (
            scm.clone(),
            2,
            opts(|o| o.timesteps = Some(vec![1.5, 0.0])),
            "`timesteps` = [1.5, 0.0]",
        ),
        (
            scm.clone(),
            1,
            opts(|o| {
                o.timesteps = Some(vec![1.5, 0.0]);
                o.max_timesteps = Some(1.5)
            }),
            "`max_timesteps/intermediate_timesteps`",
        ),
        (scm, 1001, ScheduleOptions::default(), "`num_steps` = 1001"),
    ];
    for (cfg, steps, options, want) in cases {
        let msg = match cfg.build(steps, &options) {
            Ok(s) => panic!("accepted {steps} steps with {options:?}: {s:?}"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(want), "expected {want:?} in: {msg}");
    }
}
