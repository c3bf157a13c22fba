//! Multistep consistency sampling, as diffusers' `CMStochasticIterativeScheduler`: Algorithm 1
//! of Song et al. (2023), "Consistency Models".
//!
//! A consistency model maps a noisy sample at any σ straight to x₀. Each step applies it, then
//! (if more steps follow) re-noises the result to the next, smaller σ of a Karras schedule over
//! the model's training discretisation.

use ndarray::{Array4, Zip};

use super::config::{PredictionType, SchedulerConfig};
use super::schedule::{self, num_train_timesteps};
use super::{NoiseSource, Sampler};
use crate::error::{Error, Result};

/// diffusers `CMStochasticIterativeScheduler`.
pub struct Consistency {
    /// σ of each model call and a final σ_min, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    /// 250·ln σ, in float64 as diffusers keeps them.
    timesteps: Vec<f64>,
    sigma_min: f64,
    sigma_max: f64,
    sigma_data: f64,
    s_noise: f64,
    clip_denoised: bool,
    /// The model outputs the denoised sample itself (`prediction_type = "sample"`): c_skip = 0,
    /// c_out = 1.
    outputs_x0: bool,
    noise: Option<Array4<f32>>,
}

impl Consistency {
    /// Sets up consistency sampling for `steps` steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let n = num_train_timesteps(cfg, 40)?;
        schedule::check_steps(steps, n)?;
        let sigma_min = cfg.sigma_min.unwrap_or(0.002);
        let sigma_max = cfg.sigma_max.unwrap_or(80.0);
        let sigma_data = cfg.sigma_data.unwrap_or(0.5);
        let s_noise = cfg.s_noise.unwrap_or(1.0);
        let rho = cfg.rho.unwrap_or(7.0);
        if !(sigma_min.is_finite() && sigma_max.is_finite() && 0.0 < sigma_min && sigma_min < sigma_max) {
            return Err(Error::config(
                "scheduler.sigma_min",
                format!("expected 0 < sigma_min < sigma_max, got sigma_min = {sigma_min}, sigma_max = {sigma_max}"),
            ));
        }
        for (key, value) in [("sigma_data", sigma_data), ("rho", rho)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::config(
                    format!("scheduler.{key}"),
                    format!("expected a finite value > 0, got {value}"),
                ));
            }
        }
        if !(s_noise.is_finite() && s_noise >= 0.0) {
            return Err(Error::config("scheduler.s_noise", format!("expected a finite value >= 0, got {s_noise}")));
        }

        // diffusers picks `steps` of the N training points with leading spacing and takes their
        // Karras sigmas, ramp = t / (N − 1), from σ_max down.
        let ratio = n / steps;
        let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let ramp = (i * ratio) as f64 / (n - 1) as f64;
                (max_inv + ramp * (min_inv - max_inv)).powf(rho)
            })
            .collect();
        let timesteps = sigmas.iter().map(|&s| 1000.0 * 0.25 * (s + 1e-44).ln()).collect();
        sigmas.push(sigma_min);
        Ok(Consistency {
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            timesteps,
            sigma_min,
            sigma_max,
            sigma_data,
            s_noise,
            clip_denoised: cfg.clip_denoised.unwrap_or(true),
            outputs_x0: cfg.prediction_type == Some(PredictionType::Sample),
            noise: None,
        })
    }

    /// Consistency sampling of a σ-conditioned denoiser D(x; σ) with its preconditioning in the
    /// graph: the same σ schedule, with σ itself as each call's timestep. A model that outputs
    /// c_skip and c_out at σ: the boundary-condition scalings, c_skip = 1 and c_out = 0 at
    /// σ = σ_min so that the model is the identity there.
    fn scalings(&self, sigma: f64) -> (f64, f64) {
        let (sd, smin) = (self.sigma_data, self.sigma_min);
        match self.outputs_x0 {
            true => (0.0, 1.0),
            false => (
                sd * sd / ((sigma - smin) * (sigma - smin) + sd * sd),
                (sigma - smin) * sd / (sigma * sigma + sd * sd).sqrt(),
            ),
        }
    }

    /// x̂₀ (`prediction_type = "sample"`) is taken as the denoised sample.
    pub fn for_sigma_model(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if matches!(cfg.prediction_type, Some(PredictionType::Epsilon | PredictionType::VPrediction)) {
            return Err(Error::config(
                "scheduler.prediction_type",
                "the consistency sampler takes a σ-conditioned model that outputs the denoised sample: \
                 expected \"sample\" (or no prediction_type: the consistency model's raw output)",
            ));
        }
        let mut c = Consistency::new(cfg, steps)?;
        c.timesteps = c.sigmas[..steps].iter().map(|&s| s as f64).collect();
        Ok(c)
    }
}

impl Sampler for Consistency {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigma_max
    }

    /// EDM's c_in = 1/√(σ² + σ_data²).
    fn scale_model_input(&self, sample: &mut Array4<f32>, index: usize) {
        let sigma = self.sigmas[index] as f64;
        let scale = (sigma * sigma + self.sigma_data * self.sigma_data).sqrt();
        sample.mapv_inplace(|x| (x as f64 / scale) as f32);
    }

    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>) {
        super::sigmas::add_noise(self.sigmas[index], init, noise, out);
    }

    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        let (c_skip, c_out) = self.scalings(self.sigmas[index] as f64);
        let clip = self.clip_denoised;
        Zip::from(x0).and(model_output).and(sample).for_each(|d, &m, &x| {
            let v = c_out * m as f64 + c_skip * x as f64;
            *d = if clip { v.clamp(-1.0, 1.0) } else { v } as f32;
        });
    }

    fn step(
        &mut self,
        model_output: &Array4<f32>,
        index: usize,
        sample: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
    ) {
        let sigma = self.sigmas[index] as f64;
        let sigma_next = self.sigmas[index + 1] as f64;
        let smin = self.sigma_min;
        // The boundary-condition scalings: c_skip = 1 and c_out = 0 at σ = σ_min, so the model
        // is the identity there.
        let (c_skip, c_out) = self.scalings(sigma);
        let sigma_hat = sigma_next.clamp(smin, self.sigma_max);
        let noise_scale = self.s_noise * (sigma_hat * sigma_hat - smin * smin).max(0.0).sqrt();
        let clip = self.clip_denoised;
        let denoise = move |m: f32, x: f32| {
            let d = c_out * m as f64 + c_skip * x as f64;
            if clip {
                d.clamp(-1.0, 1.0)
            } else {
                d
            }
        };
        // diffusers draws noise at every step, the last included, unless there is only one step.
        if self.timesteps.len() > 1 {
            let z = self.noise.get_or_insert_with(|| Array4::zeros(sample.raw_dim()));
            noise.fill(z);
            Zip::from(sample).and(model_output).and(&*z).for_each(|x, &m, &z| {
                *x = (denoise(m, *x) + z as f64 * noise_scale) as f32;
            });
        } else {
            Zip::from(sample).and(model_output).for_each(|x, &m| *x = denoise(m, *x) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_match_diffusers() {
        // CMStochasticIterativeScheduler().set_timesteps(num_inference_steps=3).timesteps
        let c = Consistency::new(&SchedulerConfig::default(), 3).unwrap();
        let want = [1095.5066586684702, 568.6287304457778, -188.76678568058682];
        assert!(c.timesteps().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9), "{:?}", c.timesteps());
        assert_eq!(c.init_noise_sigma(), 80.0);
        assert_eq!(*c.sigmas.last().unwrap(), 0.002f32);
    }

    #[test]
    fn rejects_bad_values() {
        for cfg in [
            SchedulerConfig { sigma_min: Some(0.0), ..Default::default() },
            SchedulerConfig { sigma_min: Some(100.0), ..Default::default() },
            SchedulerConfig { sigma_data: Some(-0.5), ..Default::default() },
            SchedulerConfig { rho: Some(0.0), ..Default::default() },
            SchedulerConfig { s_noise: Some(f64::NAN), ..Default::default() },
        ] {
            let err = Consistency::new(&cfg, 2).err().expect("should be rejected").to_string();
            assert!(err.starts_with("scheduler."), "{err}");
        }
        // 40 training timesteps by default.
        assert!(Consistency::new(&SchedulerConfig::default(), 40).is_ok());
        assert!(Consistency::new(&SchedulerConfig::default(), 41).is_err());
    }

    struct Ones(usize);
    impl NoiseSource for Ones {
        fn fill(&mut self, out: &mut Array4<f32>) {
            self.0 += 1;
            out.fill(1.0);
        }
    }

    #[test]
    fn one_step_draws_no_noise_and_clips() {
        let mut c = Consistency::new(&SchedulerConfig::default(), 1).unwrap();
        let mut x = Array4::<f32>::from_elem((1, 1, 1, 2), 80.0);
        let out = Array4::<f32>::from_elem((1, 1, 1, 2), 5.0);
        let mut noise = Ones(0);
        c.step(&out, 0, &mut x, &mut noise);
        assert_eq!(noise.0, 0);
        assert!(x.iter().all(|&v| v == 1.0), "{x:?}");
        let mut c = Consistency::new(&SchedulerConfig::default(), 2).unwrap();
        c.step(&out, 0, &mut x, &mut noise);
        c.step(&out, 1, &mut x, &mut noise);
        assert_eq!(noise.0, 2);
    }
}
