//! DDPM ancestral sampling (Ho, Jain & Abbeel 2020), as diffusers' `DDPMScheduler`.
//!
//! Each step samples the posterior q(x_{t'} | x_t, x̂₀) between consecutive inference
//! timesteps t > t', with the "fixed_small" (posterior) or "fixed_large" (β) variance.

use ndarray::{Array4, Zip};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, check_range, Schedule, DEFAULTS_SD1};
use super::x0::X0Clip;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

/// diffusers `DDPMScheduler`.
pub struct Ddpm {
    schedule: Schedule,
    prediction: PredictionType,
    clip: X0Clip,
    variance: Variance,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    x0: Option<Array4<f32>>,
    noise: Option<Array4<f32>>,
}

impl Ddpm {
    /// Sets up DDPM for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let variance = match cfg.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            other => {
                return Err(Error::config(
                    "scheduler.variance_type",
                    format!(
                        "{other:?} is not supported by the ddpm sampler (fixed_small, fixed_small_log or fixed_large)"
                    ),
                ))
            }
        };
        let schedule = Schedule::from_config(cfg, &DEFAULTS_SD1)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let int_timesteps = schedule::discrete_timesteps(spacing, n, steps, cfg.steps_offset.unwrap_or(0));
        check_range(&int_timesteps, n)?;
        Ok(Ddpm {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip: X0Clip::from_config(cfg, true),
            variance,
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            schedule,
            x0: None,
            noise: None,
        })
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::schedule::add_noise(&self.schedule, self.int_timesteps[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        let a_t = self.schedule.alpha_prod(self.int_timesteps[index]);
        self.clip.predict_x0(self.prediction, model_output, sample, a_t, x0);
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let t = self.int_timesteps[index];
        let a_t = self.schedule.alpha_prod(t);
        let a_prev = match self.int_timesteps.get(index + 1) {
            Some(&p) => self.schedule.alpha_prod(p),
            None => 1.0,
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;

        let x0 = self.x0.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
        self.clip.predict_x0(self.prediction, model_output, sample, a_t, x0);
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_x = cur_alpha.sqrt() * b_prev / b_t;
        Zip::from(&mut *sample).and(&*x0).for_each(|x, &x0| *x = (c_x0 * x0 as f64 + c_x * *x as f64) as f32);

        if t > 0 {
            let posterior = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.variance {
                Variance::Small | Variance::SmallLog => posterior.sqrt(),
                Variance::Large => cur_beta.sqrt(),
            };
            // diffusers' fixed_small_log multiplies by exp(log(var)/2) without a further root.
            let std = if self.variance == Variance::SmallLog { posterior.sqrt() } else { std };
            let buf = self.noise.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
            noise.fill(buf);
            Zip::from(&mut *sample).and(&*buf).for_each(|x, &z| *x += (std * z as f64) as f32);
        }
    }
}
