//! The σ schedule of diffusers' flow-matching schedulers (`FlowMatchEulerDiscreteScheduler`,
//! `FlowMatchHeunDiscreteScheduler`): σ runs from 1 (pure noise) towards 0 (the data), the sample
//! is x = (1 − σ)·x₀ + σ·ε, and the model's timestep is σ · `num_train_timesteps`.
//!
//! diffusers shifts the training σ grid once when the scheduler is built and spaces the inference
//! σ between the ends of that shifted grid, then shifts those again: the smallest inference σ is
//! therefore shifted twice. [`FlowSchedule::sigmas`] repeats that, with the grid's ends in float32
//! (torch) and the inference σ in f64 (numpy), as diffusers computes them.

use ndarray::{Array4, Zip};

use super::config::SchedulerConfig;
use super::schedule;
use crate::error::{Error, Result};

/// How σ is shifted towards the noisy end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Shift {
    /// `shift`: σ ↦ s·σ / (1 + (s − 1)·σ).
    Static(f64),
    /// `use_dynamic_shifting` with the pipeline's `mu`, by `time_shift_type`.
    Dynamic { mu: f64, exponential: bool },
}

/// How the inference σ are spaced once shifted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Spacing {
    /// Evenly in timestep between the shifted ends (diffusers' default).
    Uniform,
    /// `use_karras_sigmas`: ρ = 7 spacing between the shifted ends.
    Karras,
    /// `use_exponential_sigmas`: even spacing in log σ between the shifted ends.
    Exponential,
}

/// The keys that decide a flow-matching σ schedule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FlowSchedule {
    pub num_train: usize,
    pub shift: Shift,
    pub shift_terminal: Option<f64>,
    pub spacing: Spacing,
}

impl FlowSchedule {
    /// The schedule of `FlowMatchEulerDiscreteScheduler`'s keys. `sampler` names the sampler in
    /// errors.
    pub(crate) fn from_config(cfg: &SchedulerConfig, sampler: &str) -> Result<Self> {
        let num_train = schedule::num_train_timesteps(cfg, 1000)?;
        let dynamic = cfg.use_dynamic_shifting.unwrap_or(false);
        let exponential = match cfg.time_shift_type.as_deref() {
            None | Some("exponential") => true,
            Some("linear") => false,
            Some(other) => {
                return Err(Error::config(
                    "scheduler.time_shift_type",
                    format!("expected \"exponential\" or \"linear\", got {other:?}"),
                ))
            }
        };
        let shift = match (dynamic, cfg.mu) {
            (true, Some(mu)) => {
                // The linear time shift divides by mu + (1/σ − 1), which must stay positive.
                if !(mu.is_finite() && (exponential || mu > 0.0)) {
                    let want = if exponential { "a finite value" } else { "a finite value > 0" };
                    return Err(Error::config("scheduler.mu", format!("expected {want}, got {mu}")));
                }
                Shift::Dynamic { mu, exponential }
            }
            (true, None) => return Err(Error::config("scheduler.mu", missing_mu(cfg))),
            (false, Some(_)) => {
                return Err(Error::config(
                    "scheduler.mu",
                    "only applies with use_dynamic_shifting = true (diffusers ignores it otherwise)",
                ))
            }
            (false, None) => Shift::Static(static_shift(cfg)?),
        };
        // diffusers tests `if shift_terminal:`, so 0 means "off".
        let shift_terminal = match cfg.shift_terminal {
            None => None,
            Some(0.0) => None,
            Some(v) if v.is_finite() && 0.0 < v && v < 1.0 => Some(v),
            Some(v) => {
                return Err(Error::config("scheduler.shift_terminal", format!("expected a value in (0, 1), got {v}")))
            }
        };
        let flags = [
            ("use_karras_sigmas", cfg.use_karras_sigmas.unwrap_or(false), Spacing::Karras),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas.unwrap_or(false), Spacing::Exponential),
        ];
        let on: Vec<_> = flags.iter().filter(|f| f.1).collect();
        if cfg.use_beta_sigmas.unwrap_or(false) {
            return Err(Error::config(
                "scheduler.use_beta_sigmas",
                format!("true is not supported by the {sampler} sampler (only false)"),
            ));
        }
        let spacing = match on.as_slice() {
            [] => Spacing::Uniform,
            [one] => one.2,
            _ => {
                return Err(Error::config(
                    "scheduler.use_karras_sigmas",
                    "only one of use_karras_sigmas and use_exponential_sigmas can be true",
                ))
            }
        };
        Ok(FlowSchedule { num_train, shift, shift_terminal, spacing })
    }

    /// The schedule of `FlowMatchHeunDiscreteScheduler`, whose only keys are
    /// `num_train_timesteps` and `shift`.
    pub(crate) fn shifted(cfg: &SchedulerConfig) -> Result<Self> {
        Ok(FlowSchedule {
            num_train: schedule::num_train_timesteps(cfg, 1000)?,
            shift: Shift::Static(static_shift(cfg)?),
            shift_terminal: None,
            spacing: Spacing::Uniform,
        })
    }

    /// `set_timesteps`' σ for `steps` steps (descending, without the final 0), float32 as diffusers
    /// stores them.
    pub(crate) fn sigmas(&self, steps: usize) -> Result<Vec<f32>> {
        schedule::check_steps(steps, self.num_train)?;
        let n = self.num_train as f64;
        // The ends of the training grid, float32 as torch builds them; dynamic shifting leaves
        // the grid unshifted.
        let grid_end = |t: f32| -> f64 {
            let s = t / self.num_train as f32;
            match self.shift {
                Shift::Static(shift) => ((shift as f32 * s) / (1.0 + (shift - 1.0) as f32 * s)) as f64,
                Shift::Dynamic { .. } => s as f64,
            }
        };
        let (sigma_max, sigma_min) = (grid_end(self.num_train as f32), grid_end(1.0));
        let mut sigmas: Vec<f64> =
            schedule::linspace(sigma_max * n, sigma_min * n, steps).iter().map(|t| t / n).collect();
        for s in sigmas.iter_mut() {
            *s = match self.shift {
                Shift::Static(shift) => shift * *s / (1.0 + (shift - 1.0) * *s),
                Shift::Dynamic { mu, exponential: true } => mu.exp() / (mu.exp() + (1.0 / *s - 1.0)),
                Shift::Dynamic { mu, exponential: false } => mu / (mu + (1.0 / *s - 1.0)),
            };
        }
        if let Some(terminal) = self.shift_terminal {
            let scale = (1.0 - sigmas[sigmas.len() - 1]) / (1.0 - terminal);
            for s in sigmas.iter_mut() {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
        match self.spacing {
            Spacing::Uniform => {}
            Spacing::Karras => sigmas = schedule::karras_sigmas(lo, hi, steps, 7.0),
            Spacing::Exponential => {
                sigmas = schedule::linspace(hi.ln(), lo.ln(), steps).iter().map(|l| l.exp()).collect()
            }
        }
        if let Some(bad) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::config(
                "scheduler.shift",
                format!("the shifted schedule has sigma = {bad}; check shift, mu and shift_terminal"),
            ));
        }
        Ok(sigmas.iter().map(|&s| s as f32).collect())
    }

    /// diffusers' `timesteps`: σ · `num_train_timesteps`, in float32.
    pub(crate) fn timesteps(&self, sigmas: &[f32]) -> Vec<f64> {
        sigmas.iter().map(|&s| (s * self.num_train as f32) as f64).collect()
    }
}

fn static_shift(cfg: &SchedulerConfig) -> Result<f64> {
    let shift = cfg.shift.unwrap_or(1.0);
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::config("scheduler.shift", format!("expected a finite value > 0, got {shift}")));
    }
    Ok(shift)
}

/// Explains where diffusers' pipelines get `mu` from, with the card's own keys.
fn missing_mu(cfg: &SchedulerConfig) -> String {
    let base_shift = cfg.base_shift.unwrap_or(0.5);
    let max_shift = cfg.max_shift.unwrap_or(1.15);
    let base_len = cfg.base_image_seq_len.unwrap_or(256);
    let max_len = cfg.max_image_seq_len.unwrap_or(4096);
    format!(
        "use_dynamic_shifting = true needs mu; diffusers' FLUX and SD3 pipelines use \
         mu = {base_shift} + ({max_shift} - {base_shift}) * (L - {base_len}) / ({max_len} - {base_len}), \
         L = (latent height / patch size) * (latent width / patch size)"
    )
}

/// `(1 − σ)·init + σ·noise` into `out`: diffusers' `scale_noise`.
pub(crate) fn scale_noise(sigma: f32, init: &Array4<f32>, noise: &Array4<f32>, out: &mut Array4<f32>) {
    Zip::from(out).and(init).and(noise).for_each(|o, &x, &n| *o = sigma * n + (1.0 - sigma) * x);
}

/// x̂₀ = x − σ·v of a velocity `model_output` at the sample `sample`, into `x0`.
pub(crate) fn predict_x0(sigma: f32, model_output: &Array4<f32>, sample: &Array4<f32>, x0: &mut Array4<f32>) {
    Zip::from(x0).and(model_output).and(sample).for_each(|d, &v, &x| *d = x - sigma * v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    #[test]
    fn default_schedule_is_linear_in_sigma() {
        // FlowMatchEulerDiscreteScheduler().set_timesteps(4).sigmas[:-1]
        let s = FlowSchedule::from_config(&cfg(), "flow_euler").unwrap();
        let sigmas = s.sigmas(4).unwrap();
        assert_eq!(sigmas, vec![1.0, 0.667, 0.334, 0.001]);
        assert_eq!(s.timesteps(&sigmas), vec![1000.0, 667.0, 334.0, 1.0]);
    }

    #[test]
    fn static_shift_is_applied_twice_to_the_last_sigma() {
        // FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(2).sigmas[:-1]
        let c = SchedulerConfig { shift: Some(3.0), ..cfg() };
        let sigmas = FlowSchedule::from_config(&c, "flow_euler").unwrap().sigmas(2).unwrap();
        assert_eq!(sigmas[0], 1.0);
        assert!((sigmas[1] - 0.008928571).abs() < 1e-8, "{sigmas:?}");
    }

    #[test]
    fn refuses_bad_and_unsupported_keys() {
        for (c, key) in [
            (SchedulerConfig { use_dynamic_shifting: Some(true), ..cfg() }, "scheduler.mu"),
            (SchedulerConfig { mu: Some(1.0), ..cfg() }, "scheduler.mu"),
            (SchedulerConfig { shift: Some(0.0), ..cfg() }, "scheduler.shift"),
            (SchedulerConfig { shift_terminal: Some(1.0), ..cfg() }, "scheduler.shift_terminal"),
            (SchedulerConfig { use_beta_sigmas: Some(true), ..cfg() }, "scheduler.use_beta_sigmas"),
            (SchedulerConfig { time_shift_type: Some("cubic".into()), ..cfg() }, "scheduler.time_shift_type"),
            (
                SchedulerConfig { use_karras_sigmas: Some(true), use_exponential_sigmas: Some(true), ..cfg() },
                "scheduler.use_karras_sigmas",
            ),
            (
                SchedulerConfig {
                    use_dynamic_shifting: Some(true),
                    time_shift_type: Some("linear".into()),
                    mu: Some(0.0),
                    ..cfg()
                },
                "scheduler.mu",
            ),
        ] {
            let err = FlowSchedule::from_config(&c, "flow_euler").expect_err("should be refused").to_string();
            assert!(err.starts_with(key), "{err}");
        }
        let s = FlowSchedule::from_config(&cfg(), "flow_euler").unwrap();
        assert!(s.sigmas(0).is_err());
    }
}
