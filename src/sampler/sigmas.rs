//! σ-space schedules shared by the Euler family and DPM-Solver: the training sigmas, their
//! interpolation at inference timesteps, and the σ-space model input.

use ndarray::Array4;

use super::config::{SchedulerConfig, TimestepSpacing};
use super::schedule::{self, Schedule, ScheduleDefaults};
use crate::error::{Error, Result};

/// The schedule of diffusers' σ-space schedulers and its σ_t = √((1 − ᾱ_t)/ᾱ_t) (float32
/// values, as f64).
///
/// With `rescale_betas_zero_snr` the last ᾱ is exactly 0, which would make its σ infinite;
/// diffusers sets it to 2⁻²⁴, so σ_max = √(2²⁴ − 1). torch's float32 sqrt is not correctly rounded
/// and gives 4096 there, one unit in the last place above the correctly rounded 4096 − 2⁻¹². That
/// bit matters: the first step from σ_max cancels terms of size σ_max·|ε| down to a result of a
/// few units, so it moves diffusers' result by up to ~4·10⁻⁴ of its size. Use torch's value.
pub(crate) fn sigma_schedule(cfg: &SchedulerConfig, defaults: &ScheduleDefaults) -> Result<(Schedule, Vec<f64>)> {
    let mut schedule = Schedule::from_config(cfg, defaults)?;
    let zero_snr = cfg.rescale_betas_zero_snr.unwrap_or(false);
    let last = schedule.alphas_cumprod.len() - 1;
    if zero_snr {
        schedule.alphas_cumprod[last] = 2f32.powi(-24);
    }
    let mut sigmas = schedule.sigmas();
    if zero_snr {
        sigmas[last] = 4096.0;
    }
    Ok((schedule, sigmas))
}

/// σ at each (possibly fractional) timestep, by `np.interp` over the training sigmas.
pub(crate) fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f64]) -> Vec<f64> {
    let xp: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
    timesteps.iter().map(|&t| schedule::interp(t, &xp, train_sigmas)).collect()
}

/// `np.log` of the float32 training sigmas, which diffusers keeps in float32.
pub(crate) fn log_sigmas(train_sigmas: &[f64]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| (s as f32).ln()).collect()
}

/// `final_sigmas_type`: true for "zero" (the default), false for "sigma_min".
pub(crate) fn final_sigma_is_zero(cfg: &SchedulerConfig) -> Result<bool> {
    match cfg.final_sigmas_type.as_deref() {
        None | Some("zero") => Ok(true),
        Some("sigma_min") => Ok(false),
        Some(other) => Err(Error::config(
            "scheduler.final_sigmas_type",
            format!("expected \"zero\" or \"sigma_min\", got {other:?}"),
        )),
    }
}

/// Karras sigmas need 0 < σ_min ≤ σ_max (equal for a single step), or the ρ-th roots are not
/// real or the schedule runs backwards.
pub(crate) fn check_karras_range(sigma_min: f64, sigma_max: f64) -> Result<()> {
    if !(sigma_min.is_finite() && sigma_max.is_finite() && 0.0 < sigma_min && sigma_min <= sigma_max) {
        return Err(Error::config(
            "scheduler.sigma_min",
            format!(
                "Karras sigmas need 0 < sigma_min <= sigma_max, got sigma_min = {sigma_min}, sigma_max = {sigma_max}"
            ),
        ));
    }
    Ok(())
}

/// diffusers' `init_noise_sigma` of the Euler family, in float32 as torch computes it: the
/// largest σ, or √(σ² + 1) for `leading` spacing, whose first timestep is not the noisiest one.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// Divides the sample by √(σ² + 1), turning the σ-space sample into the model's input
/// (float32, as torch does it).
pub(crate) fn scale_by_sigma(sample: &mut Array4<f32>, sigma: f32) {
    let scale = (sigma * sigma + 1.0).sqrt();
    sample.mapv_inplace(|x| x / scale);
}

/// The σ of each model call for a σ-conditioned denoiser D(x; σ), then 0: k-diffusion's
/// `get_sigmas_karras`, Karras et al.'s ρ-schedule from the card's `sigma_max` down to its
/// `sigma_min` (defaults 80, 0.002 and ρ = 7, EDM's), in float32 as k-diffusion keeps them.
pub(crate) fn sigma_model_sigmas(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<f32>> {
    if steps == 0 {
        return Err(Error::config("steps", "expected at least 1"));
    }
    let sigma_min = cfg.sigma_min.unwrap_or(0.002);
    let sigma_max = cfg.sigma_max.unwrap_or(80.0);
    check_karras_range(sigma_min, sigma_max)?;
    let rho = cfg.rho.unwrap_or(7.0);
    if !(rho.is_finite() && rho > 0.0) {
        return Err(Error::config("scheduler.rho", format!("expected a finite value > 0, got {rho}")));
    }
    let mut sigmas: Vec<f32> =
        schedule::karras_sigmas(sigma_min, sigma_max, steps, rho).iter().map(|&s| s as f32).collect();
    sigmas.push(0.0);
    Ok(sigmas)
}
/// `init + σ·noise` into `out`: `add_noise` of the σ-space schedulers (the Euler family, Heun,
/// consistency, and DPM-Solver on a σ-conditioned model).
pub(crate) fn add_noise(sigma: f32, init: &Array4<f32>, noise: &Array4<f32>, out: &mut Array4<f32>) {
    ndarray::Zip::from(out).and(init).and(noise).for_each(|o, &x, &n| *o = x + n * sigma);
}

/// `--init-sigma`: the Karras range `(σ_min, top)` of a run that starts at σ = `top` on a
/// timestep model, whose smallest and largest σ are the first and last training sigmas.
pub(crate) fn start_range(train_sigmas: &[f64], top: f64) -> Result<(f64, f64)> {
    let (lo, hi) = (train_sigmas[0], train_sigmas[train_sigmas.len() - 1]);
    check_start(top, lo, hi)?;
    Ok((lo, top))
}

/// `top` lies in `[lo, hi]`, the σ range of the sampler's schedule.
pub(crate) fn check_start(top: f64, lo: f64, hi: f64) -> Result<()> {
    if !(top.is_finite() && top > 0.0) {
        return Err(Error::config("init-sigma", format!("expected a σ > 0, got {top}")));
    }
    if top > hi as f32 as f64 {
        return Err(Error::config("init-sigma", format!("{top} is above the schedule's largest σ, {}", hi as f32)));
    }
    if top < lo {
        return Err(Error::config("init-sigma", format!("{top} is below the schedule's smallest σ, {}", lo as f32)));
    }
    Ok(())
}
