//! Samplers: one small file each, each the math of one diffusers scheduler.
//!
//! Every sampler follows diffusers' standard loop, which [`crate::pipeline`] runs:
//!
//! ```text
//! x = noise · init_noise_sigma
//! for (i, t) in timesteps:
//!     x_in = scale_model_input(x, i)
//!     out  = model(x_in, t)
//!     x    = step(out, i, x)
//! ```
//!
//! `timesteps()` is diffusers' `scheduler.timesteps` (Heun lists each inner step twice, as
//! diffusers does), so one entry is one model call.

use ndarray::{Array4, ArrayViewMut2, Axis};

use crate::card::SchedulerConfig;
use crate::error::{Error, Result};

pub mod consistency;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;

/// A source of standard-normal noise for stochastic samplers.
pub trait NoiseSource {
    /// Fills `out` with independent N(0, 1) draws.
    fn fill(&mut self, out: &mut Array4<f32>);
}

/// One diffusers scheduler, set up for a fixed number of inference steps.
pub trait Sampler: Send {
    /// The timesteps given to the model, one per model call, in order.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the starting noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the model input in place (`scale_model_input`); most samplers leave it as is.
    fn scale_model_input(&self, _sample: &mut Array4<f32>, _index: usize) {}

    /// Advances `sample` by one model call (`step`), given the model's output at `timesteps()[index]`.
    fn step(&mut self, model_output: &Array4<f32>, index: usize, sample: &mut Array4<f32>, noise: &mut dyn NoiseSource);
}

/// The samplers edge-diffuse implements, by their CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// diffusers `DDIMScheduler` (Song et al. 2021), with eta.
    Ddim,
    /// diffusers `DDPMScheduler`, ancestral sampling (Ho et al. 2020).
    Ddpm,
    /// diffusers `EulerDiscreteScheduler`: Euler on the probability-flow ODE (Karras et al. 2022).
    Euler,
    /// diffusers `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers `HeunDiscreteScheduler`: second-order Heun on the probability-flow ODE.
    Heun,
    /// diffusers `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`.
    DpmPP2M,
    /// diffusers `LCMScheduler`: multistep latent consistency sampling (Luo et al. 2023).
    Lcm,
    /// diffusers `CMStochasticIterativeScheduler`: consistency-model multistep sampling (Song et al. 2023).
    Consistency,
}

impl SamplerKind {
    /// All samplers, in documentation order.
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::Ddim,
        SamplerKind::Ddpm,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Heun,
        SamplerKind::DpmPP2M,
        SamplerKind::Lcm,
        SamplerKind::Consistency,
    ];

    /// The CLI and card name.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_ancestral",
            SamplerKind::Heun => "heun",
            SamplerKind::DpmPP2M => "dpmpp_2m",
            SamplerKind::Lcm => "lcm",
            SamplerKind::Consistency => "consistency",
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SamplerKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<_> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
            Error::config("sampler", format!("unknown sampler {s:?}; expected one of {}", names.join(", ")))
        })
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-run options that diffusers passes to `step` rather than keeping in the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    /// DDIM's η: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise.
    pub eta: f32,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions { eta: 0.0 }
    }
}

/// Sets up a sampler of `kind` for `steps` inference steps.
pub fn build(
    kind: SamplerKind,
    cfg: &SchedulerConfig,
    steps: usize,
    opts: &SamplerOptions,
) -> Result<Box<dyn Sampler>> {
    if !opts.eta.is_finite() || opts.eta < 0.0 {
        return Err(Error::config("eta", format!("expected a finite value >= 0, got {}", opts.eta)));
    }
    Ok(match kind {
        SamplerKind::Ddim => Box::new(ddim::Ddim::new(cfg, steps, opts.eta)?),
        SamplerKind::Ddpm => Box::new(ddpm::Ddpm::new(cfg, steps)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(cfg, steps)?),
        SamplerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(cfg, steps)?),
        SamplerKind::Heun => Box::new(heun::Heun::new(cfg, steps)?),
        SamplerKind::DpmPP2M => Box::new(dpmpp_2m::DpmPP2M::new(cfg, steps)?),
        SamplerKind::Lcm => Box::new(lcm::Lcm::new(cfg, steps)?),
        SamplerKind::Consistency => Box::new(consistency::Consistency::new(cfg, steps)?),
    })
}

/// Rejects a config key that this sampler does not implement when it is set to anything but
/// diffusers' default, so a card never silently samples differently from diffusers.
pub(crate) fn unsupported<T: PartialEq + std::fmt::Debug>(
    sampler: &str,
    key: &str,
    value: &Option<T>,
    default: T,
) -> Result<()> {
    match value {
        Some(v) if *v != default => Err(Error::config(
            format!("scheduler.{key}"),
            format!("{v:?} is not supported by the {sampler} sampler (only {default:?})"),
        )),
        _ => Ok(()),
    }
}

/// The x₀ post-processing shared by DDIM, DDPM, LCM and DPM-Solver: dynamic thresholding
/// (Saharia et al. 2022) or clipping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct X0Clip {
    pub thresholding: Option<(f64, f64)>,
    pub clip: Option<f64>,
}

impl X0Clip {
    pub fn from_config(cfg: &SchedulerConfig, clip_default: bool) -> Self {
        let thresholding = cfg
            .thresholding
            .unwrap_or(false)
            .then(|| (cfg.dynamic_thresholding_ratio.unwrap_or(0.995), cfg.sample_max_value.unwrap_or(1.0)));
        let clip = cfg.clip_sample.unwrap_or(clip_default).then(|| cfg.clip_sample_range.unwrap_or(1.0));
        X0Clip { thresholding, clip }
    }

    /// Writes x̂₀ for `model_output` at ᾱ = `alpha_prod` into `x0`, then clips or thresholds it.
    pub fn predict_x0(
        &self,
        prediction: crate::card::PredictionType,
        model_output: &Array4<f32>,
        sample: &Array4<f32>,
        alpha_prod: f64,
        x0: &mut Array4<f32>,
    ) {
        let beta_prod = 1.0 - alpha_prod;
        ndarray::Zip::from(&mut *x0).and(model_output).and(sample).for_each(|x0, &m, &x| {
            *x0 = crate::schedule::predicted_original(prediction, m, x, alpha_prod, beta_prod) as f32;
        });
        self.apply(x0);
    }

    pub fn apply(&self, x0: &mut Array4<f32>) {
        if let Some((ratio, max)) = self.thresholding {
            let b = x0.shape()[0];
            let n = x0.len() / b;
            let mut flat: ArrayViewMut2<f32> = x0.view_mut().into_shape_with_order((b, n)).expect("contiguous");
            for mut row in flat.axis_iter_mut(Axis(0)) {
                let mut abs: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                let s = quantile(&mut abs, ratio).clamp(1.0, max) as f32;
                row.mapv_inplace(|v| v.clamp(-s, s) / s);
            }
        } else if let Some(r) = self.clip {
            let r = r as f32;
            x0.mapv_inplace(|v| v.clamp(-r, r));
        }
    }
}

/// `torch.quantile` with linear interpolation.
fn quantile(values: &mut [f32], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    values[lo] as f64 + (values[hi] as f64 - values[lo] as f64) * frac
}
