//! Euler steps on the probability-flow ODE, as diffusers' `EulerDiscreteScheduler`: Algorithm 2
//! of Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
//! without churn (diffusers' `s_churn = 0`, so the sampler is deterministic).
//!
//! The sample lives in σ-space, x = x₀ + σ·ε, so the model input is scaled by 1/√(σ² + 1) to
//! give the variance-preserving input the model was trained on.
//!
//! The schedule is built in f64 from diffusers' float32 ᾱ, but the step itself repeats torch's
//! float32 operations one by one (here and in Euler ancestral and Heun). With zero terminal SNR
//! the first σ is 4096 and x + (dx/dσ)·Δσ cancels two terms of that size down to a result of a
//! few units, so diffusers' float32 rounding there is up to ~4·10⁻⁴ of the result with 1 to 3
//! steps. Repeating its operations on the same σ gives the same result; an f64 step would be
//! closer to the exact ODE step and miss diffusers' result by that much.

use ndarray::{Array4, Zip};

use super::config::{unsupported, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, ScheduleDefaults};
use super::sigmas::{
    check_karras_range, final_sigma_is_zero, init_noise_sigma, interp_sigmas, log_sigmas, scale_by_sigma,
    sigma_model_sigmas, sigma_schedule, start_range,
};
use super::x0::SigmaSpaceX0;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const NAME: &str = "euler";

const DEFAULTS: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Linspace,
};

/// diffusers `EulerDiscreteScheduler`.
pub struct Euler {
    prediction: PredictionType,
    /// σ of each model call and the σ after the last step, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
}

impl Euler {
    /// Sets up Euler sampling for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        unsupported(NAME, "use_exponential_sigmas", &cfg.use_exponential_sigmas, false)?;
        unsupported(NAME, "use_beta_sigmas", &cfg.use_beta_sigmas, false)?;
        unsupported(NAME, "timestep_type", &cfg.timestep_type, "discrete".to_string())?;
        let log_linear = match cfg.interpolation_type.as_deref() {
            None | Some("linear") => false,
            Some("log_linear") => true,
            Some(other) => {
                return Err(Error::config(
                    "scheduler.interpolation_type",
                    format!("expected \"linear\" or \"log_linear\", got {other:?}"),
                ))
            }
        };
        let (schedule, train_sigmas) = sigma_schedule(cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps32 = schedule::sigma_space_timesteps(spacing, n, steps, cfg.steps_offset.unwrap_or(0));
        let mut timesteps: Vec<f64> = timesteps32.iter().map(|&t| t as f64).collect();

        let mut sigmas: Vec<f64> = if log_linear {
            // diffusers spaces steps + 1 sigmas evenly in log σ from the largest training σ to the
            // smallest (torch.linspace in float32), so the last step ends at the smallest σ, not 0.
            let lo = (train_sigmas[0] as f32).ln();
            let hi = (train_sigmas[n - 1] as f32).ln();
            torch_linspace_f32(hi, lo, steps + 1).iter().map(|v| v.exp() as f64).collect()
        } else {
            interp_sigmas(&timesteps, &train_sigmas)
        };
        if cfg.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = cfg.sigma_max.unwrap_or(sigmas[0]);
            check_karras_range(sigma_min, sigma_max)?;
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps, 7.0);
            let log_sigmas = log_sigmas(&train_sigmas);
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        // final_sigmas_type "sigma_min" ends at the smallest training σ instead of 0.
        sigmas.push(if final_sigma_is_zero(cfg)? { 0.0 } else { train_sigmas[0] });
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let init_noise_sigma = init_noise_sigma(&sigmas, spacing);
        Ok(Euler {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            sigmas,
            timesteps,
            init_noise_sigma,
        })
    }
}

impl Euler {
    /// Euler sampling from σ = `top` (`--init-sigma`): `steps` Karras sigmas from `top` down to
    /// the smallest training σ, as diffusers' `use_karras_sigmas` with `sigma_max = top`.
    pub fn starting_at(cfg: &SchedulerConfig, steps: usize, top: f64) -> Result<Self> {
        let (_, train_sigmas) = sigma_schedule(cfg, &DEFAULTS)?;
        let (lo, hi) = start_range(&train_sigmas, top)?;
        let karras =
            SchedulerConfig { use_karras_sigmas: Some(true), sigma_min: Some(lo), sigma_max: Some(hi), ..cfg.clone() };
        Euler::new(&karras, steps)
    }

    /// Euler sampling of a σ-conditioned denoiser, as k-diffusion's `sample_euler`: the
    /// timesteps are the σ of each call, Karras sigmas from the card's `sigma_max` to `sigma_min`.
    pub fn for_sigma_model(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let sigmas = sigma_model_sigmas(cfg, steps)?;
        Ok(Euler {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            timesteps: sigmas[..steps].iter().map(|&s| s as f64).collect(),
            init_noise_sigma: sigmas[0] as f64,
            sigmas,
        })
    }
}

impl Sampler for Euler {
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
        _noise: &mut dyn NoiseSource,
    ) {
        let sigma = self.sigmas[index];
        let dt = self.sigmas[index + 1] - sigma;
        let x0 = SigmaSpaceX0::new(self.prediction, sigma);
        Zip::from(sample).and(model_output).for_each(|x, &m| {
            let derivative = (*x - x0.of(m, *x)) / sigma;
            *x += derivative * dt;
        });
    }
}

/// `torch.linspace(start, end, n)` in float32: torch fills the first half forwards from `start`
/// and the second half backwards from `end`.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
    }

    #[test]
    fn linspace_timesteps_are_not_rounded() {
        // EulerDiscreteScheduler(num_train_timesteps=1000).set_timesteps(7).timesteps
        let e = Euler::new(&SchedulerConfig::default(), 7).unwrap();
        let want = [999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0];
        assert_eq!(e.timesteps(), &want);
        // init_noise_sigma = max σ = σ at t = 999 of the default linear schedule.
        assert!((e.init_noise_sigma() - 157.4072723388672).abs() < 1e-4, "{}", e.init_noise_sigma());
    }

    #[test]
    fn karras_timesteps_match_diffusers() {
        // EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        //     use_karras_sigmas=True).set_timesteps(5)
        let cfg = SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            use_karras_sigmas: Some(true),
            ..Default::default()
        };
        let e = Euler::new(&cfg, 5).unwrap();
        let want = [999.0, 785.9539794921875, 427.4897766113281, 58.891502380371094, 0.0];
        assert!(close(e.timesteps(), &want, 1e-6), "{:?}", e.timesteps());
        let want_sigmas =
            [14.614646911621094, 4.796544075012207, 1.2741053104400635, 0.2479517161846161, 0.02916753478348255, 0.0];
        let got: Vec<f64> = e.sigmas.iter().map(|&s| s as f64).collect();
        assert!(close(&got, &want_sigmas, 1e-6), "{got:?}");
    }

    #[test]
    fn trailing_follows_numpy_arange() {
        // np.arange(50, 0, -50/29) has 30 entries, so diffusers makes 30 model calls for 29 steps.
        let cfg = SchedulerConfig {
            num_train_timesteps: Some(50),
            timestep_spacing: Some(TimestepSpacing::Trailing),
            ..Default::default()
        };
        let e = Euler::new(&cfg, 29).unwrap();
        assert_eq!(e.timesteps().len(), 30);
        assert_eq!(e.timesteps()[29], -1.0);
    }

    #[test]
    fn leading_offset_and_init_sigma() {
        // EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1).set_timesteps(4)
        let cfg = SchedulerConfig {
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: Some(1),
            ..Default::default()
        };
        let e = Euler::new(&cfg, 4).unwrap();
        assert_eq!(e.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        assert!((e.init_noise_sigma() - 17.5399227142334).abs() < 1e-5, "{}", e.init_noise_sigma());
    }

    #[test]
    fn zero_snr_sigma_max_is_torchs() {
        // diffusers' float32 σ_max with zero terminal SNR is torch.sqrt(2²⁴ − 1) = 4096.
        let cfg = SchedulerConfig {
            rescale_betas_zero_snr: Some(true),
            timestep_spacing: Some(TimestepSpacing::Trailing),
            ..Default::default()
        };
        let e = Euler::new(&cfg, 2).unwrap();
        assert_eq!(e.sigmas[0], 4096.0);
        assert_eq!(e.init_noise_sigma(), 4096.0);
    }

    #[test]
    fn log_linear_ends_at_the_smallest_training_sigma() {
        let cfg = SchedulerConfig { interpolation_type: Some("log_linear".into()), ..Default::default() };
        let e = Euler::new(&cfg, 3).unwrap();
        // diffusers: 4 log-spaced sigmas from σ_max to σ_min, then 0 (unused).
        assert_eq!(e.sigmas.len(), 5);
        assert!((e.sigmas[0] - 157.40726).abs() < 1e-3 && (e.sigmas[3] - 0.0100013).abs() < 1e-7, "{:?}", e.sigmas);
    }

    #[test]
    fn rejects_unimplemented_keys() {
        for cfg in [
            SchedulerConfig { use_exponential_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { use_beta_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { timestep_type: Some("continuous".into()), ..Default::default() },
            SchedulerConfig { final_sigmas_type: Some("one".into()), ..Default::default() },
            SchedulerConfig { interpolation_type: Some("cubic".into()), ..Default::default() },
            SchedulerConfig { use_karras_sigmas: Some(true), sigma_min: Some(-1.0), ..Default::default() },
        ] {
            let err = Euler::new(&cfg, 4).err().expect("should be rejected").to_string();
            assert!(err.starts_with("scheduler."), "{err}");
        }
        assert!(Euler::new(&SchedulerConfig::default(), 0).is_err());
        // A single Karras step is the one spaced σ (linspace puts it at t = 0).
        let cfg = SchedulerConfig { use_karras_sigmas: Some(true), ..Default::default() };
        assert_eq!(Euler::new(&cfg, 1).unwrap().timesteps(), &[0.0]);
        assert!(Euler::new(&SchedulerConfig::default(), 1001).is_err());
        // Defaults spelled out are fine.
        let cfg = SchedulerConfig {
            use_exponential_sigmas: Some(false),
            timestep_type: Some("discrete".into()),
            final_sigmas_type: Some("zero".into()),
            ..Default::default()
        };
        assert!(Euler::new(&cfg, 4).is_ok());
    }
}
