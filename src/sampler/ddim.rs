//! DDIM (Song, Meng & Ermon 2021), as diffusers' `DDIMScheduler`.
//!
//! With η = 0 the step is the deterministic DDIM update; η > 0 adds noise of standard deviation
//! η·σ_t, and η = 1 recovers DDPM's posterior variance.

use ndarray::{Array4, Zip};

use super::config::{unsupported, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, check_range, Schedule, ScheduleDefaults, DEFAULTS_SD1};
use super::x0::X0Clip;
use super::{NoiseSource, Sampler};
use crate::error::Result;

const DEFAULTS: ScheduleDefaults = DEFAULTS_SD1;

/// diffusers `DDIMScheduler`.
pub struct Ddim {
    schedule: Schedule,
    prediction: PredictionType,
    clip: X0Clip,
    final_alpha_cumprod: f64,
    /// diffusers steps back by `num_train_timesteps / steps` whatever the spacing.
    step_ratio: i64,
    eta: f64,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    noise: Option<Array4<f32>>,
}

impl Ddim {
    /// Sets up DDIM for `steps` steps with noise scale `eta`.
    pub fn new(cfg: &SchedulerConfig, steps: usize, eta: f32) -> Result<Self> {
        unsupported("ddim", "variance_type", &cfg.variance_type, "fixed_small".to_string())?;
        let schedule = Schedule::from_config(cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let int_timesteps = schedule::discrete_timesteps(spacing, n, steps, cfg.steps_offset.unwrap_or(0));
        check_range(&int_timesteps, n)?;
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] as f64 };
        Ok(Ddim {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip: X0Clip::from_config(cfg, true),
            final_alpha_cumprod,
            step_ratio: (n / steps) as i64,
            eta: eta as f64,
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            schedule,
            noise: None,
        })
    }
}

impl Sampler for Ddim {
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
        let prev_t = t - self.step_ratio;
        let a_t = self.schedule.alpha_prod(t);
        let a_prev = if prev_t >= 0 { self.schedule.alpha_prod(prev_t) } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();

        let mut x0 = Array4::<f32>::zeros(sample.raw_dim());
        self.clip.predict_x0(self.prediction, model_output, sample, a_t, &mut x0);
        let direction = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let prediction = self.prediction;
        Zip::from(&mut *sample).and(model_output).and(&x0).for_each(|x, &m, &x0| {
            let eps = schedule::predicted_epsilon(prediction, m, *x, a_t, b_t);
            *x = (a_prev.sqrt() * x0 as f64 + direction * eps) as f32;
        });
        if self.eta > 0.0 {
            let buf = self.noise.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
            noise.fill(buf);
            Zip::from(&mut *sample).and(&*buf).for_each(|x, &z| *x += (std_dev * z as f64) as f32);
        }
    }
}
