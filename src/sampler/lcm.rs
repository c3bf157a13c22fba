//! Multistep latent consistency sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.
//!
//! The model's x̂₀ goes through the consistency boundary condition
//! f(x, t) = c_skip(t)·x + c_out(t)·x̂₀ (σ_data = 0.5, t scaled by `timestep_scaling`), and
//! between steps fresh noise brings the estimate back to the next timestep's noise level.
//! Timesteps are taken from the `original_inference_steps`-point DDIM grid the model was
//! distilled on.

use ndarray::{Array4, Zip};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, Schedule, ScheduleDefaults};
use super::x0::X0Clip;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const DEFAULTS: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::ScaledLinear,
    spacing: TimestepSpacing::Leading,
};

/// diffusers fixes σ_data at 0.5 in `get_scalings_for_boundary_condition_discrete`.
const SIGMA_DATA: f64 = 0.5;

/// diffusers `LCMScheduler`.
pub struct Lcm {
    schedule: Schedule,
    prediction: PredictionType,
    clip: X0Clip,
    final_alpha_cumprod: f64,
    timestep_scaling: f64,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    denoised: Option<Array4<f32>>,
}

impl Lcm {
    /// Sets up LCM sampling for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_strength(cfg, steps, 1.0)
    }

    /// For image-to-image at `strength` in (0, 1], as diffusers' LCM img2img pipeline sets the
    /// scheduler (`set_timesteps(steps, strength=…)`): the `steps` timesteps are taken from the
    /// lowest `strength` part of the distillation grid, and every one of them runs.
    pub fn with_strength(cfg: &SchedulerConfig, steps: usize, strength: f64) -> Result<Self> {
        let schedule = Schedule::from_config(cfg, &DEFAULTS)?;
        let n = schedule.len();
        schedule::check_steps(steps, n)?;
        let original = cfg.original_inference_steps.unwrap_or(50);
        if original == 0 || original > n {
            return Err(Error::config(
                "scheduler.original_inference_steps",
                format!("expected 1 to num_train_timesteps = {n}, got {original}"),
            ));
        }
        if steps > original {
            return Err(Error::config(
                "steps",
                format!("the lcm sampler takes at most original_inference_steps = {original} steps, got {steps}"),
            ));
        }
        // int(original_steps * strength), in Python's float64.
        let grid = (original as f64 * strength) as usize;
        if grid < steps {
            return Err(Error::config(
                "strength",
                format!(
                    "the lcm sampler takes its {steps} steps from the lowest strength × original_inference_steps = {grid} \
                     of its {original} timesteps: give --strength of at least {} or fewer --steps",
                    steps as f64 / original as f64
                ),
            ));
        }
        let k = (n / original) as i64;
        // The distillation grid k-1, 2k-1, ..., grid·k-1, walked from the top.
        let origin: Vec<i64> = (1..=grid as i64).rev().map(|i| i * k - 1).collect();
        // np.floor(np.linspace(0, grid, steps, endpoint=False)), float rounding included.
        let stride = grid as f64 / steps as f64;
        let int_timesteps: Vec<i64> = (0..steps).map(|i| origin[(i as f64 * stride).floor() as usize]).collect();
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] as f64 };
        Ok(Lcm {
            prediction: cfg.prediction_type.unwrap_or(PredictionType::Epsilon),
            clip: X0Clip::from_config(cfg, false),
            final_alpha_cumprod,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            schedule,
            denoised: None,
        })
    }

    /// (c_skip, c_out) of the consistency boundary condition at timestep `t`.
    pub fn boundary_scalings(&self, t: i64) -> (f64, f64) {
        let s = t as f64 * self.timestep_scaling;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        (d2 / (s * s + d2), s / (s * s + d2).sqrt())
    }
}

impl Sampler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::schedule::add_noise(&self.schedule, self.int_timesteps[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        let t = self.int_timesteps[index];
        let a_t = self.schedule.alpha_prod(t);
        self.clip.predict_x0(self.prediction, model_output, sample, a_t, x0);
        // LCM's estimate is the boundary-conditioned one it re-noises.
        let (c_skip, c_out) = self.boundary_scalings(t);
        Zip::from(x0).and(sample).for_each(|d, &x| *d = (c_out * *d as f64 + c_skip * x as f64) as f32);
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let t = self.int_timesteps[index];
        let last = index + 1 == self.int_timesteps.len();
        let prev_t = if last { t } else { self.int_timesteps[index + 1] };
        let a_t = self.schedule.alpha_prod(t);
        let a_prev = if prev_t >= 0 { self.schedule.alpha_prod(prev_t) } else { self.final_alpha_cumprod };
        let (c_skip, c_out) = self.boundary_scalings(t);

        let mut x0 = Array4::<f32>::zeros(sample.raw_dim());
        self.clip.predict_x0(self.prediction, model_output, sample, a_t, &mut x0);
        // diffusers rounds `denoised` to float32 before re-noising; so does this.
        let denoised = self.denoised.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
        Zip::from(&mut *denoised)
            .and(&x0)
            .and(&*sample)
            .for_each(|d, &x0, &x| *d = (c_out * x0 as f64 + c_skip * x as f64) as f32);
        if last {
            sample.assign(denoised);
        } else {
            // The fresh noise goes straight into `sample`, then the denoised estimate is mixed in.
            noise.fill(sample);
            let (sa, sb) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
            Zip::from(&mut *sample).and(&*denoised).for_each(|x, &d| *x = (sa * d as f64 + sb * *x as f64) as f32);
        }
    }
}
