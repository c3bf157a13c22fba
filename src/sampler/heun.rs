//! Heun's second-order method on the probability-flow ODE, as diffusers' `HeunDiscreteScheduler`
//! (Algorithm 1 of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
//! Generative Models").
//!
//! Every step but the last costs two model calls: an Euler step to σ_next, then a correction that
//! averages the slopes at σ and σ_next. diffusers therefore lists each timestep after the first
//! twice, and so does [`Heun::timesteps`]; the last step, to σ = 0, stays a plain Euler step.
//!
//! Like [`super::euler`], the step follows torch's float32 operations one by one.

use ndarray::{Array4, Zip};

use super::config::{unsupported, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, ScheduleDefaults};
use super::sigmas::{
    check_karras_range, init_noise_sigma, interp_sigmas, log_sigmas, scale_by_sigma, sigma_model_sigmas,
    sigma_schedule, start_range,
};
use super::x0::SigmaSpaceX0;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const NAME: &str = "heun";

const DEFAULTS: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Linspace,
};

/// diffusers `HeunDiscreteScheduler`.
pub struct Heun {
    prediction: PredictionType,
    clip: Option<f64>,
    /// diffusers' interleaved σ list [σ₀, σ₁, σ₁, σ₂, σ₂, …, 0], one entry per model call plus
    /// the final σ, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    /// Between the two calls of a step: the first call's slope, its sample and the step size.
    pending: Option<FirstOrder>,
}

struct FirstOrder {
    derivative: Array4<f32>,
    sample: Array4<f32>,
    dt: f32,
}

impl Heun {
    /// Sets up Heun sampling for `steps` steps (2·steps − 1 model calls).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Heun::build(cfg, steps, None)
    }

    /// Heun sampling from σ = `top` (`--init-sigma`): Karras sigmas from `top` down to the
    /// smallest training σ, as diffusers' `use_karras_sigmas` with that `sigma_min` and
    /// `sigma_max` in its config.
    pub fn starting_at(cfg: &SchedulerConfig, steps: usize, top: f64) -> Result<Self> {
        Heun::build(cfg, steps, Some(top))
    }

    fn build(cfg: &SchedulerConfig, steps: usize, top: Option<f64>) -> Result<Self> {
        unsupported(NAME, "use_exponential_sigmas", &cfg.use_exponential_sigmas, false)?;
        unsupported(NAME, "use_beta_sigmas", &cfg.use_beta_sigmas, false)?;
        // HeunDiscreteScheduler has no `rescale_betas_zero_snr` key; diffusers ignores it, and so
        // must the shared schedule builder.
        let schedule_cfg = SchedulerConfig { rescale_betas_zero_snr: None, ..cfg.clone() };
        let (schedule, train_sigmas) = sigma_schedule(&schedule_cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let clip = match cfg.clip_sample.unwrap_or(false) {
            false => None,
            true => {
                let range = cfg.clip_sample_range.unwrap_or(1.0);
                if !(range.is_finite() && range > 0.0) {
                    return Err(Error::config(
                        "scheduler.clip_sample_range",
                        format!("expected a finite value > 0, got {range}"),
                    ));
                }
                Some(range)
            }
        };

        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let mut timesteps: Vec<f64> = schedule::sigma_space_timesteps(spacing, n, steps, cfg.steps_offset.unwrap_or(0))
            .iter()
            .map(|&t| t as f64)
            .collect();
        let mut sigmas = interp_sigmas(&timesteps, &train_sigmas);
        if cfg.use_karras_sigmas.unwrap_or(false) || top.is_some() {
            // HeunDiscreteScheduler has no sigma_min / sigma_max keys: the range is that of the
            // spaced sigmas, unless the run starts at a given σ.
            let (sigma_min, sigma_max) = match top {
                Some(top) => start_range(&train_sigmas, top)?,
                None => (sigmas[sigmas.len() - 1], sigmas[0]),
            };
            check_karras_range(sigma_min, sigma_max)?;
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps, 7.0);
            let log_sigmas = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas)).collect();
        }
        sigmas.push(0.0);

        let mut interleaved = vec![sigmas[0] as f32];
        for &s in &sigmas[1..sigmas.len() - 1] {
            interleaved.extend([s as f32; 2]);
        }
        interleaved.push(0.0);
        let mut calls = vec![timesteps[0] as f32 as f64];
        for &t in &timesteps[1..] {
            calls.extend([t as f32 as f64; 2]);
        }
        let init_noise_sigma = init_noise_sigma(&interleaved, spacing);
        Ok(Heun {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip,
            sigmas: interleaved,
            timesteps: calls,
            init_noise_sigma,
            pending: None,
        })
    }
}

impl Heun {
    /// Heun sampling of a σ-conditioned denoiser, as k-diffusion's `sample_heun` (the last
    /// step, to σ = 0, is an Euler step): the timesteps are the σ of each call.
    pub fn for_sigma_model(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let sigmas = sigma_model_sigmas(cfg, steps)?;
        // [σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0], as diffusers interleaves its sigmas.
        let mut interleaved = vec![sigmas[0]];
        for &s in &sigmas[1..steps] {
            interleaved.extend([s, s]);
        }
        interleaved.push(0.0);
        Ok(Heun {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip: None,
            timesteps: interleaved[..interleaved.len() - 1].iter().map(|&s| s as f64).collect(),
            init_noise_sigma: sigmas[0] as f64,
            sigmas: interleaved,
            pending: None,
        })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &mut Array4<f32>, index: usize) {
        scale_by_sigma(sample, self.sigmas[index]);
    }

    fn order(&self) -> usize {
        2
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::sigmas::add_noise(self.sigmas[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        let to_x0 = SigmaSpaceX0::new(self.prediction, self.sigmas[index]);
        let clip = self.clip.map(|r| r as f32);
        Zip::from(x0).and(model_output).and(sample).for_each(|d, &m, &x| {
            let v = to_x0.of(m, x);
            *d = clip.map_or(v, |r| v.clamp(-r, r));
        });
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        _noise: &mut dyn NoiseSource,
    ) {
        let clip = self.clip.map(|r| r as f32);
        let clipped = move |x0: f32| match clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        match self.pending.take() {
            None => {
                let sigma = self.sigmas[index];
                let dt = self.sigmas[index + 1] - sigma;
                let x0 = SigmaSpaceX0::new(self.prediction, sigma);
                let mut derivative = Array4::<f32>::zeros(sample.raw_dim());
                Zip::from(&mut derivative).and(model_output).and(&*sample).for_each(|d, &m, &x| {
                    *d = (x - clipped(x0.of(m, x))) / sigma;
                });
                let first = FirstOrder { derivative, sample: sample.clone(), dt };
                Zip::from(&mut *sample).and(&first.derivative).for_each(|x, &d| *x += d * dt);
                self.pending = Some(first);
            }
            Some(first) => {
                // The model was evaluated at the Euler estimate at σ_next, this call's σ.
                let sigma_next = self.sigmas[index];
                let x0 = SigmaSpaceX0::new(self.prediction, sigma_next);
                Zip::from(&mut *sample).and(model_output).and(&first.derivative).and(&first.sample).for_each(
                    |x, &m, &d1, &x_start| {
                        let d2 = (*x - clipped(x0.of(m, *x))) / sigma_next;
                        *x = x_start + (d1 + d2) / 2.0 * first.dt;
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_are_interleaved_like_diffusers() {
        // HeunDiscreteScheduler().set_timesteps(3).timesteps
        let h = Heun::new(&SchedulerConfig::default(), 3).unwrap();
        assert_eq!(h.timesteps(), &[999.0, 499.5, 499.5, 0.0, 0.0]);
        assert_eq!(h.sigmas.len(), 6);
        assert_eq!(h.sigmas[1], h.sigmas[2]);
        assert_eq!(h.sigmas[5], 0.0);
        assert!((h.init_noise_sigma() - 25.146116256713867).abs() < 1e-5, "{}", h.init_noise_sigma());
    }

    #[test]
    fn karras_timesteps_match_diffusers() {
        // HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(3).timesteps
        let cfg = SchedulerConfig { use_karras_sigmas: Some(true), ..Default::default() };
        let h = Heun::new(&cfg, 3).unwrap();
        let want = [999.0, 448.7012023925781, 448.7012023925781, 0.0, 0.0];
        assert!(h.timesteps().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3), "{:?}", h.timesteps());
    }

    #[test]
    fn single_karras_step() {
        // HeunDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="trailing").set_timesteps(1)
        let cfg = SchedulerConfig {
            use_karras_sigmas: Some(true),
            timestep_spacing: Some(TimestepSpacing::Trailing),
            ..Default::default()
        };
        let h = Heun::new(&cfg, 1).unwrap();
        assert_eq!(h.timesteps(), &[999.0]);
        assert_eq!(h.sigmas, vec![25.146116f32, 0.0]);
    }

    #[test]
    fn rejects_unimplemented_keys_and_ignores_foreign_ones() {
        let cfg = SchedulerConfig { use_exponential_sigmas: Some(true), ..Default::default() };
        assert!(Heun::new(&cfg, 3).is_err());
        let cfg = SchedulerConfig { use_beta_sigmas: Some(true), ..Default::default() };
        assert!(Heun::new(&cfg, 3).is_err());
        // Keys HeunDiscreteScheduler does not have are ignored, as diffusers ignores them.
        let cfg = SchedulerConfig { rescale_betas_zero_snr: Some(true), ..Default::default() };
        let a = Heun::new(&cfg, 3).unwrap();
        let b = Heun::new(&SchedulerConfig::default(), 3).unwrap();
        assert_eq!(a.sigmas, b.sigmas);
    }
}
