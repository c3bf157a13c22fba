//! Ancestral Euler sampling, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's
//! `sample_euler_ancestral`; Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
//! Generative Models").
//!
//! Each step goes from σ_from to σ_to by splitting σ_to² into a deterministic part σ_down², reached
//! with an Euler step, and a fresh-noise part σ_up² = σ_to²(σ_from² − σ_to²)/σ_from², which is the
//! DDPM posterior variance expressed in σ-space.
//!
//! Like [`super::euler`], the step follows torch's float32 operations one by one.

use ndarray::{Array4, Zip};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, ScheduleDefaults};
use super::sigmas::{
    init_noise_sigma, interp_sigmas, log_sigmas, scale_by_sigma, sigma_model_sigmas, sigma_schedule, start_range,
};
use super::x0::SigmaSpaceX0;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const DEFAULTS: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Linspace,
};

/// diffusers `EulerAncestralDiscreteScheduler`.
pub struct EulerAncestral {
    prediction: PredictionType,
    /// σ of each model call and the final σ = 0, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    noise: Option<Array4<f32>>,
    /// Driving a σ-conditioned denoiser: k-diffusion draws no noise for the last step (σ = 0).
    sigma_model: bool,
}

impl EulerAncestral {
    /// Sets up ancestral Euler sampling for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = cfg.prediction_type.unwrap_or(PredictionType::Epsilon);
        if prediction == PredictionType::Sample {
            // diffusers raises NotImplementedError for it at the first step.
            return Err(Error::config(
                "scheduler.prediction_type",
                "Sample is not supported by the euler_ancestral sampler (diffusers does not implement it); \
                 expected Epsilon or VPrediction",
            ));
        }
        let (schedule, train_sigmas) = sigma_schedule(cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps: Vec<f64> = schedule::sigma_space_timesteps(spacing, n, steps, cfg.steps_offset.unwrap_or(0))
            .iter()
            .map(|&t| t as f64)
            .collect();
        let mut sigmas = interp_sigmas(&timesteps, &train_sigmas);
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, spacing);
        Ok(EulerAncestral { prediction, sigmas, timesteps, init_noise_sigma, noise: None, sigma_model: false })
    }

    /// Ancestral Euler sampling from σ = `top` (`--init-sigma`): Karras sigmas from `top` down
    /// to the smallest training σ, each call's timestep from its σ as diffusers' Euler schedulers
    /// map them (`_sigma_to_t`).
    pub fn starting_at(cfg: &SchedulerConfig, steps: usize, top: f64) -> Result<Self> {
        let mut s = EulerAncestral::new(cfg, steps)?;
        let (_, train_sigmas) = sigma_schedule(cfg, &DEFAULTS)?;
        let (lo, hi) = start_range(&train_sigmas, top)?;
        let karras = schedule::karras_sigmas(lo, hi, steps, 7.0);
        let log_sigmas = log_sigmas(&train_sigmas);
        s.timesteps = karras.iter().map(|&v| schedule::sigma_to_t(v, &log_sigmas) as f32 as f64).collect();
        s.sigmas = karras.iter().map(|&v| v as f32).chain([0.0]).collect();
        s.init_noise_sigma = top;
        Ok(s)
    }

    /// Ancestral Euler sampling of a σ-conditioned denoiser, as k-diffusion's
    /// `sample_euler_ancestral` (η = 1): the timesteps are the σ of each call. A denoiser that
    /// outputs x̂₀ (`prediction_type = "sample"`) is taken as it is.
    pub fn for_sigma_model(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let sigmas = sigma_model_sigmas(cfg, steps)?;
        Ok(EulerAncestral {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            timesteps: sigmas[..steps].iter().map(|&s| s as f64).collect(),
            init_noise_sigma: sigmas[0] as f64,
            sigmas,
            noise: None,
            sigma_model: true,
        })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &mut Array4<f32>, index: usize) {
        scale_by_sigma(sample, self.sigmas[index]);
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::sigmas::add_noise(self.sigmas[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        SigmaSpaceX0::new(self.prediction, self.sigmas[index]).fill(model_output, sample, x0);
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let sigma = self.sigmas[index];
        let sigma_to = self.sigmas[index + 1];
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        // Rounding could push σ_up² a hair above σ_to²; diffusers would then produce NaN.
        let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
        let dt = sigma_down - sigma;
        let x0 = SigmaSpaceX0::new(self.prediction, sigma);
        // diffusers draws fresh noise at every step, the last one (σ_up = 0) included;
        // k-diffusion does not draw for the last.
        let z = self.noise.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
        if self.sigma_model && sigma_to == 0.0 {
            z.fill(0.0);
        } else {
            noise.fill(z);
        }
        Zip::from(sample).and(model_output).and(&*z).for_each(|x, &m, &z| {
            let derivative = (*x - x0.of(m, *x)) / sigma;
            *x = (*x + derivative * dt) + z * sigma_up;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_and_init_sigma_match_diffusers() {
        // EulerAncestralDiscreteScheduler(timestep_spacing="trailing").set_timesteps(3)
        let cfg = SchedulerConfig { timestep_spacing: Some(TimestepSpacing::Trailing), ..Default::default() };
        let s = EulerAncestral::new(&cfg, 3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
        assert!((s.init_noise_sigma() - 157.4072723388672).abs() < 1e-4);
        // With zero terminal SNR the first σ is √((1 − 2⁻²⁴)/2⁻²⁴) ≈ 4096.
        let cfg = SchedulerConfig { rescale_betas_zero_snr: Some(true), ..cfg };
        let s = EulerAncestral::new(&cfg, 3).unwrap();
        assert!((s.init_noise_sigma() - 4096.0).abs() < 1e-3, "{}", s.init_noise_sigma());
    }

    #[test]
    fn rejects_sample_prediction() {
        let cfg = SchedulerConfig { prediction_type: Some(PredictionType::Sample), ..Default::default() };
        let err = EulerAncestral::new(&cfg, 4).err().expect("rejected").to_string();
        assert!(err.starts_with("scheduler.prediction_type"), "{err}");
    }

    struct Constant(f32, usize);
    impl NoiseSource for Constant {
        fn fill(&mut self, out: &mut Array4<f32>) {
            self.1 += 1;
            out.fill(self.0);
        }
    }

    #[test]
    fn draws_noise_once_per_step() {
        let mut s = EulerAncestral::new(&SchedulerConfig::default(), 3).unwrap();
        let mut x = Array4::<f32>::ones((1, 1, 2, 2));
        let out = Array4::<f32>::zeros((1, 1, 2, 2));
        let mut noise = Constant(0.0, 0);
        for i in 0..3 {
            s.step(&out, i, &mut x, &mut noise);
        }
        assert_eq!(noise.1, 3);
        // A zero ε prediction means x₀ = x: the sample never moves.
        assert!(x.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }
}
