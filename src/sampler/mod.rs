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

use ndarray::Array4;

use crate::error::{Error, Result};

pub mod config;
pub(crate) mod flow_sigmas;
pub mod schedule;
pub(crate) mod sigmas;
pub(crate) mod x0;

pub mod consistency;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod flow_euler;
pub mod flow_heun;
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

    /// Model calls per step: 2 for the Heun samplers, whose `timesteps()` list each inner
    /// timestep twice (diffusers' `scheduler.order`).
    fn order(&self) -> usize {
        1
    }

    /// Writes `init` noised by `noise` (unit variance) to the level of `timesteps()[index]` into
    /// `out`: diffusers' `add_noise` (`scale_noise` for flow matching), where image-to-image
    /// starts.
    fn add_noise(&self, init: &Array4<f32>, noise: &Array4<f32>, index: usize, out: &mut Array4<f32>);

    /// Writes x̂₀, the clean sample that the model's output at `timesteps()[index]` predicts from
    /// `sample` (as [`step`](Sampler::step) gets it, before the step), into `x0`, as the step
    /// itself would compute it (clipped where the step clips). For previews: it does not change
    /// the sampler's state.
    fn predict_x0(&self, model_output: &Array4<f32>, index: usize, sample: &Array4<f32>, x0: &mut Array4<f32>);

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
    /// diffusers `FlowMatchEulerDiscreteScheduler`: Euler on a flow-matching ODE, velocity model.
    FlowEuler,
    /// diffusers `FlowMatchHeunDiscreteScheduler`: second-order Heun on a flow-matching ODE.
    FlowHeun,
}

impl SamplerKind {
    /// All samplers, in documentation order.
    pub const ALL: [SamplerKind; 10] = [
        SamplerKind::Ddim,
        SamplerKind::Ddpm,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Heun,
        SamplerKind::DpmPP2M,
        SamplerKind::Lcm,
        SamplerKind::Consistency,
        SamplerKind::FlowEuler,
        SamplerKind::FlowHeun,
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
            SamplerKind::FlowEuler => "flow_euler",
            SamplerKind::FlowHeun => "flow_heun",
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
    cfg: &config::SchedulerConfig,
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
        SamplerKind::FlowEuler => Box::new(flow_euler::FlowEuler::new(cfg, steps)?),
        SamplerKind::FlowHeun => Box::new(flow_heun::FlowHeun::new(cfg, steps)?),
    })
}

/// Image-to-image at `strength` in (0, 1]: the index of the first timestep of a sampler built
/// for `steps` steps whose [`order`](Sampler::order) is `order`, as diffusers' img2img
/// pipelines truncate the schedule: `init_timestep = min(int(steps · strength), steps)`, start
/// at `(steps − init_timestep) · order`. (LCM instead takes all its steps from the lower part of
/// its grid: [`lcm::Lcm::with_strength`].)
pub fn img2img_start(order: usize, steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let noised = ((steps as f64 * strength) as usize).min(steps);
    if noised == 0 {
        return Err(Error::config(
            "strength",
            format!(
                "{strength} of {steps} steps runs none (steps × strength must be at least 1): \
                 give --strength {} or more, or --steps {} or more",
                1.0 / steps as f64,
                (1.0 / strength).ceil()
            ),
        ));
    }
    Ok((steps - noised) * order)
}

/// Builds `kind` to start at σ = `sigma` (`--init-sigma`): image-to-image from `init + σ·noise`
/// ([`Sampler::add_noise`] at index 0), then `steps` steps down from `sigma`. Only the σ-space
/// samplers take a start σ:
///
/// - on a timestep model, Euler, Euler ancestral, Heun and DPM-Solver++ run Karras sigmas
///   (ρ = 7) from `sigma` down to the smallest training σ, each call's timestep mapped from its
///   σ as diffusers does for `use_karras_sigmas` (DPM-Solver++ keeps its variance-preserving
///   sample, `α_σ·(init + σ·noise)`);
/// - `consistency` runs its own Karras schedule with `sigma_max = sigma` (one step is one
///   denoiser call at `sigma`);
/// - a σ-conditioned model (`sigma_model`) runs the card's Karras schedule with `sigma_max =
///   sigma`.
///
/// `sigma` must lie within the schedule's σ range.
pub fn build_from_sigma(
    kind: SamplerKind,
    cfg: &config::SchedulerConfig,
    steps: usize,
    opts: &SamplerOptions,
    sigma: f64,
    sigma_model: bool,
) -> Result<Box<dyn Sampler>> {
    use SamplerKind::*;
    if !matches!(kind, Euler | EulerAncestral | Heun | DpmPP2M | Consistency) {
        return Err(Error::config(
            "init-sigma",
            format!(
                "{kind} steps on its own timestep schedule and cannot start at a given σ: \
                 use --strength, or one of euler, euler_ancestral, heun, dpmpp_2m, consistency"
            ),
        ));
    }
    if sigma_model || kind == Consistency {
        sigmas::check_start(sigma, cfg.sigma_min.unwrap_or(0.002), cfg.sigma_max.unwrap_or(80.0))?;
        let from = config::SchedulerConfig { sigma_max: Some(sigma), ..cfg.clone() };
        return match sigma_model {
            true => build_for_sigma_model(kind, &from, steps, opts),
            false => build(kind, &from, steps, opts),
        };
    }
    if opts.eta != 0.0 {
        return Err(Error::config("eta", "applies to ddim only"));
    }
    Ok(match kind {
        Euler => Box::new(euler::Euler::starting_at(cfg, steps, sigma)?),
        EulerAncestral => Box::new(euler_ancestral::EulerAncestral::starting_at(cfg, steps, sigma)?),
        Heun => Box::new(heun::Heun::starting_at(cfg, steps, sigma)?),
        _ => Box::new(dpmpp_2m::DpmPP2M::starting_at(cfg, steps, sigma)?),
    })
}

/// `strength` is in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    match strength > 0.0 && strength <= 1.0 {
        true => Ok(()),
        false => Err(Error::config("strength", format!("expected a value in (0, 1], got {strength}"))),
    }
}

/// Builds `kind` to drive a σ-conditioned denoiser D(x; σ) (k-diffusion's convention; the card's
/// `model.inputs.sigma`): its [`timesteps`](Sampler::timesteps) are the σ of each model call,
/// and the model gets the noisy sample unscaled, so the caller skips
/// [`scale_model_input`](Sampler::scale_model_input). Samplers defined on a discrete timestep
/// schedule cannot drive such a model and are an error naming the sampler.
pub fn build_for_sigma_model(
    kind: SamplerKind,
    cfg: &config::SchedulerConfig,
    steps: usize,
    opts: &SamplerOptions,
) -> Result<Box<dyn Sampler>> {
    if opts.eta != 0.0 {
        return Err(Error::config("eta", "applies to ddim only, which cannot drive a σ-conditioned model"));
    }
    Ok(match kind {
        SamplerKind::Euler => Box::new(euler::Euler::for_sigma_model(cfg, steps)?),
        SamplerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::for_sigma_model(cfg, steps)?),
        SamplerKind::Heun => Box::new(heun::Heun::for_sigma_model(cfg, steps)?),
        SamplerKind::DpmPP2M => Box::new(dpmpp_2m::DpmPP2M::for_sigma_model(cfg, steps)?),
        SamplerKind::Consistency => Box::new(consistency::Consistency::for_sigma_model(cfg, steps)?),
        other => {
            return Err(Error::config(
                "sampler",
                format!(
                    "{other} cannot drive a σ-conditioned model (the card's model.inputs.sigma): \
                     use euler, euler_ancestral, heun, dpmpp_2m or consistency"
                ),
            ))
        }
    })
}

#[cfg(test)]
mod predict_x0_tests {
    use super::*;
    use crate::card::PredictionType;

    struct Zeros;
    impl NoiseSource for Zeros {
        fn fill(&mut self, out: &mut Array4<f32>) {
            out.fill(0.0);
        }
    }

    /// A run whose one step lands on σ = 0 (or ᾱ = 1) ends at the x̂₀ of that step, so
    /// `predict_x0` before the step must equal the step's result, for every sampler.
    #[test]
    fn the_last_step_lands_on_the_predicted_x0() {
        let shape = (1, 2, 3, 4);
        let wave = |k: f32| Array4::from_shape_fn(shape, |(_, c, y, x)| ((c * 12 + y * 4 + x) as f32 * k).sin());
        let mut ran = Vec::new();
        for kind in SamplerKind::ALL {
            for prediction in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
                let cfg = config::SchedulerConfig { prediction_type: Some(prediction), ..Default::default() };
                // Some samplers take one prediction type only.
                let Ok(mut s) = build(kind, &cfg, 1, &SamplerOptions::default()) else { continue };
                ran.push(kind);
                let calls = s.timesteps().len();
                let (out, mut x) = (wave(0.7), wave(1.3).mapv(|v| v * s.init_noise_sigma() as f32));
                for k in 0..calls {
                    let mut x0 = Array4::zeros(shape);
                    s.predict_x0(&out, k, &x, &mut x0);
                    s.step(&out, k, &mut x, &mut Zeros);
                    if k + 1 == calls {
                        let err = x.iter().zip(&x0).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(err < 1e-4, "{kind} {prediction:?}: step {x:?} against x̂₀ {x0:?}");
                    }
                }
            }
        }
        ran.dedup();
        assert_eq!(ran, SamplerKind::ALL, "every sampler takes some prediction type");
    }
}
