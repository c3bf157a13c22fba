//! Heun's second-order method on a flow-matching ODE, as diffusers'
//! `FlowMatchHeunDiscreteScheduler`: the model predicts the velocity v = dx/dσ, as for
//! [`super::flow_euler`].
//!
//! Every step but the last costs two model calls: an Euler step to σ_next, then a correction from
//! the start with the mean of the two velocities. Like diffusers' `HeunDiscreteScheduler`,
//! diffusers lists each timestep after the first twice, and so does [`FlowHeun::timesteps`]; the
//! last step, to σ = 0, stays a plain Euler step.
//!
//! diffusers' scheduler takes only `num_train_timesteps` and `shift`. Other flow-matching keys
//! would be ignored by it (and `mu` could not even be passed), so they are refused here rather
//! than silently sampling another schedule than the card describes.

use ndarray::{Array4, Zip};

use super::config::{unsupported, SchedulerConfig};
use super::flow_sigmas::FlowSchedule;
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

const NAME: &str = "flow_heun";

/// diffusers `FlowMatchHeunDiscreteScheduler`.
pub struct FlowHeun {
    /// diffusers' interleaved σ list [σ₀, σ₁, σ₁, σ₂, σ₂, …, 0], one entry per model call plus
    /// the final σ, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// Between the two calls of a step: the first call's slope, its sample and the step size.
    pending: Option<FirstOrder>,
}

struct FirstOrder {
    derivative: Array4<f32>,
    sample: Array4<f32>,
    dt: f32,
}

impl FlowHeun {
    /// Sets up flow-matching Heun sampling for `steps` steps (2·steps − 1 model calls).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        unsupported(NAME, "use_dynamic_shifting", &cfg.use_dynamic_shifting, false)?;
        for (key, set) in [("mu", cfg.mu.is_some()), ("shift_terminal", cfg.shift_terminal.is_some_and(|v| v != 0.0))] {
            if set {
                return Err(Error::config(
                    format!("scheduler.{key}"),
                    format!("is not supported by the {NAME} sampler (FlowMatchHeunDiscreteScheduler has no {key})"),
                ));
            }
        }
        unsupported(NAME, "use_karras_sigmas", &cfg.use_karras_sigmas, false)?;
        unsupported(NAME, "use_exponential_sigmas", &cfg.use_exponential_sigmas, false)?;
        unsupported(NAME, "use_beta_sigmas", &cfg.use_beta_sigmas, false)?;
        unsupported(NAME, "invert_sigmas", &cfg.invert_sigmas, false)?;
        unsupported(NAME, "stochastic_sampling", &cfg.stochastic_sampling, false)?;
        let schedule = FlowSchedule::shifted(cfg)?;
        let sigmas = schedule.sigmas(steps)?;
        let timesteps = schedule.timesteps(&sigmas);

        let mut interleaved = vec![sigmas[0]];
        for &s in &sigmas[1..] {
            interleaved.extend([s; 2]);
        }
        interleaved.push(0.0);
        let mut calls = vec![timesteps[0]];
        for &t in &timesteps[1..] {
            calls.extend([t; 2]);
        }
        Ok(FlowHeun { sigmas: interleaved, timesteps: calls, pending: None })
    }
}

impl Sampler for FlowHeun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
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
        _noise: &mut dyn NoiseSource,
    ) {
        // diffusers goes through the denoised sample, x₀ = x − σ·v, and back, (x − x₀)/σ, rather
        // than using v directly; the float32 roundings of that round trip are kept.
        match self.pending.take() {
            None => {
                let sigma = self.sigmas[index];
                let dt = self.sigmas[index + 1] - sigma;
                let mut derivative = Array4::<f32>::zeros(sample.raw_dim());
                Zip::from(&mut derivative).and(model_output).and(&*sample).for_each(|d, &v, &x| {
                    *d = (x - (x - v * sigma)) / sigma;
                });
                let first = FirstOrder { derivative, sample: sample.clone(), dt };
                Zip::from(&mut *sample).and(&first.derivative).for_each(|x, &d| *x += d * dt);
                self.pending = Some(first);
            }
            Some(first) => {
                // The model was evaluated at the Euler estimate at σ_next, this call's σ.
                let sigma_next = self.sigmas[index];
                Zip::from(&mut *sample).and(model_output).and(&first.derivative).and(&first.sample).for_each(
                    |x, &v, &d1, &x_start| {
                        let d2 = (*x - (*x - v * sigma_next)) / sigma_next;
                        *x = x_start + 0.5 * (d1 + d2) * first.dt;
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
        // FlowMatchHeunDiscreteScheduler(shift=3.0).set_timesteps(3)
        let cfg = SchedulerConfig { shift: Some(3.0), ..Default::default() };
        let h = FlowHeun::new(&cfg, 3).unwrap();
        assert_eq!(h.timesteps(), &[1000.0, 751.12109375, 751.12109375, 8.928571701049805, 8.928571701049805]);
        assert_eq!(h.sigmas, vec![1.0, 0.7511211, 0.7511211, 0.008928572, 0.008928572, 0.0]);
        assert_eq!(h.init_noise_sigma(), 1.0);
    }

    #[test]
    fn refuses_keys_diffusers_heun_lacks() {
        for cfg in [
            SchedulerConfig { use_dynamic_shifting: Some(true), mu: Some(1.0), ..Default::default() },
            SchedulerConfig { use_karras_sigmas: Some(true), ..Default::default() },
            SchedulerConfig { shift_terminal: Some(0.1), ..Default::default() },
            SchedulerConfig { stochastic_sampling: Some(true), ..Default::default() },
            SchedulerConfig { invert_sigmas: Some(true), ..Default::default() },
        ] {
            let err = FlowHeun::new(&cfg, 3).err().expect("refused").to_string();
            assert!(err.starts_with("scheduler."), "{err}");
        }
        assert!(FlowHeun::new(&SchedulerConfig::default(), 0).is_err());
    }
}
