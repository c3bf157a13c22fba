//! DPM-Solver++(2M), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"` and `solver_type = "midpoint"`: Lu et al. (2022),
//! "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models".
//!
//! The solver works on the data prediction x₀ in log-SNR time λ = log(α/σ). Order 1 is DDIM;
//! order 2 reuses the previous step's x₀ for a second-order correction, so it still costs one
//! model call per step. The first step is first order, and so is the last when it lands on σ = 0.

use ndarray::{Array4, Zip};

use super::config::{unsupported, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, ScheduleDefaults};
use super::sigmas::{
    check_karras_range, final_sigma_is_zero, interp_sigmas, log_sigmas, sigma_model_sigmas, sigma_schedule, start_range,
};
use super::x0::SigmaSpaceX0;
use super::x0::X0Clip;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const NAME: &str = "dpmpp_2m";

const DEFAULTS: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Linspace,
};

/// diffusers `DPMSolverMultistepScheduler` (DPM-Solver++, midpoint, order 1 or 2).
pub struct DpmPP2M {
    prediction: PredictionType,
    /// Dynamic thresholding of x₀ (diffusers' `thresholding`); this scheduler never clips.
    thresholding: X0Clip,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    /// `final_sigmas_type = "zero"`: the last step lands on σ = 0, i.e. on x₀.
    final_sigma_zero: bool,
    /// σ of each model call and the final σ (0, or the smallest training σ), float32 as
    /// diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// The previous step's x₀ (diffusers' `model_outputs[-2]` after the shift).
    prev_x0: Option<Array4<f32>>,
    /// How many steps have run, capped at `order` (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
    /// Driving a σ-conditioned denoiser: the sample is in σ-space (x₀ + σ·ε, k-diffusion's
    /// `sample_dpmpp_2m`) rather than diffusers' variance-preserving x.
    sigma_model: bool,
}

impl DpmPP2M {
    /// Sets up DPM-Solver++ for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        DpmPP2M::build(cfg, steps, None)
    }

    /// DPM-Solver++ from σ = `top` (`--init-sigma`): Karras sigmas from `top` down to the
    /// smallest training σ, as diffusers' `use_karras_sigmas` with that `sigma_min` and
    /// `sigma_max` in its config.
    pub fn starting_at(cfg: &SchedulerConfig, steps: usize, top: f64) -> Result<Self> {
        DpmPP2M::build(cfg, steps, Some(top))
    }

    fn build(cfg: &SchedulerConfig, steps: usize, top: Option<f64>) -> Result<Self> {
        check_keys(cfg)?;
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=2).contains(&order) {
            return Err(Error::config(
                "scheduler.solver_order",
                format!("{order} is not supported by the {NAME} sampler (only 1 or 2)"),
            ));
        }
        let (schedule, train_sigmas) = sigma_schedule(cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;

        // Timesteps whose λ falls below lambda_min_clipped are cut off the top of the range
        // (for cosine schedules, whose last steps are numerically unstable).
        let lambda_min = cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        if lambda_min.is_nan() {
            return Err(Error::config("scheduler.lambda_min_clipped", "expected a number, got NaN"));
        }
        let clipped = schedule
            .alphas_cumprod
            .iter()
            .filter(|&&a| a.sqrt().ln() - (1.0 - a).sqrt().ln() < lambda_min as f32)
            .count();
        let last = n - clipped;
        if last == 0 {
            return Err(Error::config(
                "scheduler.lambda_min_clipped",
                format!("{lambda_min} clips away every timestep"),
            ));
        }
        let offset = cfg.steps_offset.unwrap_or(0);
        let mut timesteps: Vec<i64> = match cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing) {
            TimestepSpacing::Linspace => {
                let points = schedule::linspace(0.0, last as f64 - 1.0, steps + 1);
                points[1..].iter().rev().map(|v| v.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (last / (steps + 1)) as i64;
                (1..=steps as i64).rev().map(|i| i * ratio + offset).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                schedule::arange(last as f64, 0.0, -ratio).iter().map(|v| v.round_ties_even() as i64 - 1).collect()
            }
        };
        let mut sigmas: Vec<f64> = if cfg.use_karras_sigmas.unwrap_or(false) || top.is_some() {
            // DPMSolverMultistepScheduler has no sigma_min / sigma_max keys: the Karras range is
            // the whole training range, unless the run starts at a given σ.
            let (sigma_min, sigma_max) = match top {
                Some(top) => start_range(&train_sigmas, top)?,
                None => (train_sigmas[0], train_sigmas[n - 1]),
            };
            check_karras_range(sigma_min, sigma_max)?;
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps, 7.0);
            let log_sigmas = log_sigmas(&train_sigmas);
            let cosine = cfg.beta_schedule == Some(BetaSchedule::SquaredcosCapV2);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    // diffusers rounds, except for the cosine schedule, where the cast to int64
                    // truncates.
                    if cosine {
                        t as i64
                    } else {
                        t.round_ties_even() as i64
                    }
                })
                .collect();
            sigmas
        } else {
            let t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
            interp_sigmas(&t, &train_sigmas)
        };
        // diffusers finds its starting step by looking the first timestep up, and takes the second
        // match when there are two; it would then skip the first step.
        if timesteps.iter().filter(|&&t| t == timesteps[0]).count() > 1 {
            return Err(Error::config(
                "steps",
                format!("{steps} steps give a repeated first timestep {}; use fewer steps", timesteps[0]),
            ));
        }
        let final_sigma_zero = final_sigma_is_zero(cfg)?;
        // "sigma_min" ends at the smallest training σ instead of 0.
        sigmas.push(if final_sigma_zero { 0.0 } else { train_sigmas[0] });

        let mut thresholding = X0Clip::from_config(cfg, false);
        thresholding.clip = None;
        if let Some((ratio, max)) = thresholding.thresholding {
            if !((0.0..=1.0).contains(&ratio) && max.is_finite() && max >= 1.0) {
                return Err(Error::config(
                    "scheduler.dynamic_thresholding_ratio",
                    format!("thresholding needs a ratio in [0, 1] and sample_max_value >= 1, got {ratio} and {max}"),
                ));
            }
        }
        Ok(DpmPP2M {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            thresholding,
            order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            prev_x0: None,
            lower_order_nums: 0,
            sigma_model: false,
        })
    }

    /// DPM-Solver++(2M) for a σ-conditioned denoiser, as k-diffusion's `sample_dpmpp_2m`: the
    /// timesteps are the σ of each call (Karras sigmas from the card's `sigma_max` to
    /// `sigma_min`), the first step and the last (to σ = 0) are first order.
    pub fn for_sigma_model(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let sigmas = sigma_model_sigmas(cfg, steps)?;
        Ok(DpmPP2M {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            thresholding: X0Clip::from_config(&SchedulerConfig::default(), false),
            order: 2,
            lower_order_final: true,
            euler_at_final: false,
            final_sigma_zero: true,
            timesteps: sigmas[..steps].iter().map(|&s| s as f64).collect(),
            sigmas,
            prev_x0: None,
            lower_order_nums: 0,
            sigma_model: true,
        })
    }

    /// One step in σ-space: x̂₀ from the model, then x ← (σₜ/σₛ)·x − (e^{−h} − 1)·D with
    /// h = ln σₛ − ln σₜ, D the second-order blend of this x̂₀ and the previous one.
    fn sigma_model_step(&mut self, model_output: &Array4<f32>, index: usize, sample: &mut Array4<f32>) {
        let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
        let to_x0 = SigmaSpaceX0::new(self.prediction, sigma);
        let mut x0 = Array4::<f32>::zeros(sample.raw_dim());
        Zip::from(&mut x0).and(model_output).and(&*sample).for_each(|d, &m, &x| *d = to_x0.of(m, x));
        let (s, t) = (sigma as f64, sigma_next as f64);
        if t == 0.0 {
            sample.assign(&x0);
        } else {
            let h = s.ln() - t.ln();
            let (ratio, phi) = (t / s, (-h).exp_m1());
            match (&self.prev_x0, index) {
                (Some(prev), i) if i > 0 => {
                    let h_last = (self.sigmas[i - 1] as f64).ln() - s.ln();
                    let r = h_last / h;
                    let (a, b) = (1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r));
                    Zip::from(&mut *sample).and(&x0).and(prev).for_each(|x, &m0, &m1| {
                        *x = (ratio * *x as f64 - phi * (a * m0 as f64 - b * m1 as f64)) as f32;
                    });
                }
                _ => Zip::from(&mut *sample)
                    .and(&x0)
                    .for_each(|x, &m0| *x = (ratio * *x as f64 - phi * m0 as f64) as f32),
            }
        }
        self.prev_x0 = Some(x0);
    }
}

/// Keys of `DPMSolverMultistepScheduler` that select something other than DPM-Solver++(2M).
fn check_keys(cfg: &SchedulerConfig) -> Result<()> {
    match cfg.algorithm_type.as_deref() {
        None | Some("dpmsolver++") => {}
        Some(other) => {
            return Err(Error::config(
                "scheduler.algorithm_type",
                format!("{other:?} is not supported by the {NAME} sampler (only \"dpmsolver++\")"),
            ))
        }
    }
    // diffusers maps the UniPC / DEIS solver types "logrho", "bh1" and "bh2" onto "midpoint".
    match cfg.solver_type.as_deref() {
        None | Some("midpoint" | "logrho" | "bh1" | "bh2") => {}
        Some(other) => {
            return Err(Error::config(
                "scheduler.solver_type",
                format!("{other:?} is not supported by the {NAME} sampler (only \"midpoint\")"),
            ))
        }
    }
    if let Some(v) = &cfg.variance_type {
        return Err(Error::config(
            "scheduler.variance_type",
            format!("{v:?} is not supported by the {NAME} sampler (the model must predict without variance)"),
        ));
    }
    unsupported(NAME, "use_exponential_sigmas", &cfg.use_exponential_sigmas, false)?;
    unsupported(NAME, "use_beta_sigmas", &cfg.use_beta_sigmas, false)?;
    unsupported(NAME, "use_lu_lambdas", &cfg.use_lu_lambdas, false)?;
    unsupported(NAME, "use_flow_sigmas", &cfg.use_flow_sigmas, false)?;
    unsupported(NAME, "use_dynamic_shifting", &cfg.use_dynamic_shifting, false)?;
    Ok(())
}

/// α_t, σ_t and λ_t = log α_t − log σ_t of the VP process at σ-space noise level σ.
fn alpha_sigma_lambda(sigma: f32) -> (f64, f64, f64) {
    let sigma = sigma as f64;
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha_t;
    (alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln())
}

impl Sampler for DpmPP2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// 1 in diffusers' variance-preserving x; σ_max in σ-space.
    fn init_noise_sigma(&self) -> f64 {
        match self.sigma_model {
            true => self.sigmas[0] as f64,
            false => 1.0,
        }
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        let sigma = self.sigmas[index];
        if self.sigma_model {
            return super::sigmas::add_noise(sigma, init, noise, out);
        }
        // diffusers' _sigma_to_alpha_sigma_t, on float32 σ.
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        Zip::from(out).and(init).and(noise).for_each(|o, &x, &n| *o = alpha * x + sigma_t * n);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        if self.sigma_model {
            return SigmaSpaceX0::new(self.prediction, self.sigmas[index]).fill(model_output, sample, x0);
        }
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[index]);
        let prediction = self.prediction;
        Zip::from(&mut *x0).and(model_output).and(sample).for_each(|d, &m, &x| {
            let (m, x) = (m as f64, x as f64);
            *d = match prediction {
                PredictionType::Epsilon => (x - sigma * m) / alpha,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha * x - sigma * m,
            } as f32;
        });
        self.thresholding.apply(x0);
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        _noise: &mut dyn NoiseSource,
    ) {
        if self.sigma_model {
            return self.sigma_model_step(model_output, index, sample);
        }
        // The last step is first order when it lands on σ = 0, and on request otherwise: a
        // second-order correction there is unstable with few steps.
        let calls = self.timesteps.len();
        let lower_order_final = index + 1 == calls
            && (self.euler_at_final || (self.lower_order_final && calls < 15) || self.final_sigma_zero);

        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[index]);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[index + 1]);
        let mut x0 = Array4::<f32>::zeros(sample.raw_dim());
        let prediction = self.prediction;
        Zip::from(&mut x0).and(model_output).and(&*sample).for_each(|x0, &m, &x| {
            let (m, x) = (m as f64, x as f64);
            *x0 = match prediction {
                PredictionType::Epsilon => (x - sigma_s0 * m) / alpha_s0,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha_s0 * x - sigma_s0 * m,
            } as f32;
        });
        self.thresholding.apply(&mut x0);

        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        // α_t(e^{−h} − 1); at σ_t = 0, h = ∞ and this is −1, so x_t = x₀.
        let phi = alpha_t * ((-h).exp() - 1.0);
        match self.prev_x0.as_ref() {
            Some(prev) if self.order == 2 && self.lower_order_nums >= 1 && !lower_order_final => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                Zip::from(&mut *sample).and(&x0).and(prev).for_each(|x, &m0, &m1| {
                    let (m0, m1) = (m0 as f64, m1 as f64);
                    let d1 = (1.0 / r0) * (m0 - m1);
                    *x = (ratio * *x as f64 - phi * m0 - 0.5 * phi * d1) as f32;
                });
            }
            _ => {
                Zip::from(&mut *sample).and(&x0).for_each(|x, &m0| {
                    *x = (ratio * *x as f64 - phi * m0 as f64) as f32;
                });
            }
        }
        if self.order == 2 {
            self.prev_x0 = Some(x0);
        }
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers() {
        // DPMSolverMultistepScheduler().set_timesteps(n).timesteps for each spacing.
        let d = DpmPP2M::new(&SchedulerConfig::default(), 5).unwrap();
        assert_eq!(d.timesteps(), &[999.0, 799.0, 599.0, 400.0, 200.0]);
        let cfg = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: Some(1),
            ..Default::default()
        };
        assert_eq!(DpmPP2M::new(&cfg, 4).unwrap().timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        let cfg = SchedulerConfig { timestep_spacing: Some(TimestepSpacing::Trailing), ..Default::default() };
        assert_eq!(DpmPP2M::new(&cfg, 3).unwrap().timesteps(), &[999.0, 666.0, 332.0]);
        let cfg = SchedulerConfig { use_karras_sigmas: Some(true), ..Default::default() };
        assert_eq!(DpmPP2M::new(&cfg, 4).unwrap().timesteps(), &[999.0, 775.0, 301.0, 0.0]);
    }

    #[test]
    fn lambda_min_clipped_shortens_the_range() {
        // DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
        //     .set_timesteps(4).timesteps
        let cfg = SchedulerConfig {
            beta_schedule: Some(BetaSchedule::SquaredcosCapV2),
            lambda_min_clipped: Some(-5.1),
            ..Default::default()
        };
        assert_eq!(DpmPP2M::new(&cfg, 4).unwrap().timesteps(), &[995.0, 746.0, 498.0, 249.0]);
    }

    #[test]
    fn rejects_a_repeated_first_timestep() {
        // With the cosine schedule diffusers truncates the Karras timesteps, and from 4 steps on
        // they start [998, 998, ...]; diffusers then starts at the second entry and fails at the end.
        let cfg = SchedulerConfig {
            beta_schedule: Some(BetaSchedule::SquaredcosCapV2),
            use_karras_sigmas: Some(true),
            ..Default::default()
        };
        assert_eq!(DpmPP2M::new(&cfg, 3).unwrap().timesteps(), &[998.0, 997.0, 0.0]);
        let err = DpmPP2M::new(&cfg, 4).err().expect("rejected").to_string();
        assert!(err.starts_with("steps:"), "{err}");
    }

    #[test]
    fn rejects_other_solvers() {
        for cfg in [
            SchedulerConfig { algorithm_type: Some("sde-dpmsolver++".into()), ..Default::default() },
            SchedulerConfig { algorithm_type: Some("dpmsolver".into()), ..Default::default() },
            SchedulerConfig { algorithm_type: Some("deis".into()), ..Default::default() },
            SchedulerConfig { solver_type: Some("heun".into()), ..Default::default() },
            SchedulerConfig { solver_order: Some(3), ..Default::default() },
            SchedulerConfig { solver_order: Some(0), ..Default::default() },
            SchedulerConfig { use_lu_lambdas: Some(true), ..Default::default() },
            SchedulerConfig { use_exponential_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { use_beta_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { use_flow_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { final_sigmas_type: Some("one".into()), ..Default::default() },
            SchedulerConfig { variance_type: Some("learned_range".into()), ..Default::default() },
        ] {
            let err = DpmPP2M::new(&cfg, 4).err().expect("should be rejected").to_string();
            assert!(err.starts_with("scheduler."), "{err}");
        }
        // diffusers' aliases of "midpoint" are accepted.
        let cfg = SchedulerConfig { solver_type: Some("bh2".into()), ..Default::default() };
        assert!(DpmPP2M::new(&cfg, 4).is_ok());
    }

    struct NoNoise;
    impl NoiseSource for NoNoise {
        fn fill(&mut self, _out: &mut Array4<f32>) {
            panic!("DPM-Solver++ is deterministic");
        }
    }

    #[test]
    fn sample_prediction_of_a_constant_lands_on_it() {
        // If the model always predicts x₀ = c, every update is a convex mix with c, and the last
        // step (to σ = 0) returns exactly c.
        let cfg = SchedulerConfig { prediction_type: Some(PredictionType::Sample), ..Default::default() };
        let mut d = DpmPP2M::new(&cfg, 5).unwrap();
        let mut x = Array4::<f32>::from_elem((1, 1, 2, 2), 3.0);
        let c = Array4::<f32>::from_elem((1, 1, 2, 2), 0.25);
        for i in 0..5 {
            d.step(&c, i, &mut x, &mut NoNoise);
        }
        assert!(x.iter().all(|&v| (v - 0.25).abs() < 1e-6), "{x:?}");
    }
}
