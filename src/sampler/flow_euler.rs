//! Euler steps on a flow-matching ODE, as diffusers' `FlowMatchEulerDiscreteScheduler` (used by
//! Stable Diffusion 3 and FLUX).
//!
//! The model predicts the velocity v = dx/dσ of the straight path x = (1 − σ)·x₀ + σ·ε, so one
//! step is x ← x + (σ_next − σ)·v. The sample starts as plain noise (σ = 1) and goes into the model
//! unscaled: diffusers' flow schedulers have no `init_noise_sigma` or `scale_model_input`, and
//! their pipelines use neither.
//!
//! With `stochastic_sampling` each step instead predicts x₀ = x − σ·v and re-noises it to σ_next
//! with a fresh draw, x ← (1 − σ_next)·x₀ + σ_next·ε.

use ndarray::{Array4, Zip};

use super::config::{unsupported, SchedulerConfig};
use super::flow_sigmas::FlowSchedule;
use super::{NoiseSource, Sampler};
use crate::error::Result;

const NAME: &str = "flow_euler";

/// diffusers `FlowMatchEulerDiscreteScheduler`.
pub struct FlowEuler {
    /// σ of each model call and the final 0, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    stochastic: bool,
}

impl FlowEuler {
    /// Sets up flow-matching Euler sampling for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        unsupported(NAME, "invert_sigmas", &cfg.invert_sigmas, false)?;
        let schedule = FlowSchedule::from_config(cfg, NAME)?;
        let mut sigmas = schedule.sigmas(steps)?;
        let timesteps = schedule.timesteps(&sigmas);
        sigmas.push(0.0);
        Ok(FlowEuler { sigmas, timesteps, stochastic: cfg.stochastic_sampling.unwrap_or(false) })
    }
}

impl Sampler for FlowEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::flow_sigmas::scale_noise(self.sigmas[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        super::flow_sigmas::predict_x0(self.sigmas[index], model_output, sample, x0);
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
        if self.stochastic {
            let mut eps = Array4::<f32>::zeros(sample.raw_dim());
            noise.fill(&mut eps);
            Zip::from(sample).and(model_output).and(&eps).for_each(|x, &v, &e| {
                let x0 = *x - sigma * v;
                *x = (1.0 - sigma_next) * x0 + sigma_next * e;
            });
        } else {
            let dt = sigma_next - sigma;
            Zip::from(sample).and(model_output).for_each(|x, &v| *x += dt * v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers() {
        // FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(2)
        let cfg = SchedulerConfig { shift: Some(3.0), ..Default::default() };
        let e = FlowEuler::new(&cfg, 2).unwrap();
        assert_eq!(e.timesteps(), &[1000.0, 8.928571701049805]);
        assert_eq!(e.sigmas, vec![1.0, 0.008928572, 0.0]);
        assert_eq!(e.init_noise_sigma(), 1.0);
    }

    #[test]
    fn refuses_inverted_sigmas() {
        let cfg = SchedulerConfig { invert_sigmas: Some(true), ..Default::default() };
        let err = FlowEuler::new(&cfg, 2).err().expect("refused").to_string();
        assert!(err.starts_with("scheduler.invert_sigmas"), "{err}");
    }
}
