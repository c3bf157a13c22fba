//! Noise schedules: betas, ᾱ (alphas_cumprod), sigmas, timestep spacings, as diffusers computes
//! them. diffusers keeps betas and ᾱ in float32 (`torch.cumprod` accumulates in double on CPU
//! and rounds each entry), so they are stored as f32 here too and every later formula runs in
//! f64 from those values.

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::error::{Error, Result};

/// Each diffusers scheduler has its own defaults for the keys a card may leave out.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleDefaults {
    /// Default `beta_start`.
    pub beta_start: f64,
    /// Default `beta_end`.
    pub beta_end: f64,
    /// Default `beta_schedule`.
    pub beta_schedule: BetaSchedule,
    /// Default `timestep_spacing`.
    pub spacing: TimestepSpacing,
}

/// diffusers' defaults of DDIM, DDPM, Euler, Euler ancestral and DPM-Solver.
pub const DEFAULTS_SD1: ScheduleDefaults = ScheduleDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Leading,
};

/// The discrete training schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// β_t, float32 as in diffusers.
    pub betas: Vec<f32>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f32>,
    /// ᾱ_t = Π α_s.
    pub alphas_cumprod: Vec<f32>,
}

impl Schedule {
    /// Builds the schedule from the config keys `num_train_timesteps`, `beta_start`,
    /// `beta_end`, `beta_schedule`, `trained_betas` and `rescale_betas_zero_snr`.
    pub fn from_config(cfg: &SchedulerConfig, d: &ScheduleDefaults) -> Result<Self> {
        let n = num_train_timesteps(cfg, 1000)?;
        let betas: Vec<f32> = if let Some(tb) = &cfg.trained_betas {
            if tb.len() != n {
                return Err(Error::config(
                    "scheduler.trained_betas",
                    format!("expected num_train_timesteps = {n} values, got {}", tb.len()),
                ));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            let start = cfg.beta_start.unwrap_or(d.beta_start);
            let end = cfg.beta_end.unwrap_or(d.beta_end);
            match cfg.beta_schedule.unwrap_or(d.beta_schedule) {
                BetaSchedule::Linear => linspace_f32(start, end, n),
                BetaSchedule::ScaledLinear => {
                    linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect()
                }
                BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
            }
        };
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0)) {
            return Err(Error::config(
                "scheduler.betas",
                format!("every beta must lie in (0, 1); beta[{i}] = {b} (check beta_start, beta_end, trained_betas)"),
            ));
        }
        let mut betas = betas;
        if cfg.rescale_betas_zero_snr.unwrap_or(false) {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        Ok(Schedule { betas, alphas, alphas_cumprod })
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// ᾱ at an integer timestep, as f64.
    pub fn alpha_prod(&self, t: i64) -> f64 {
        self.alphas_cumprod[t as usize] as f64
    }

    /// σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for every training timestep (float32, as diffusers builds it).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt() as f64).collect()
    }
}

/// `num_train_timesteps`, checked.
pub fn num_train_timesteps(cfg: &SchedulerConfig, default: usize) -> Result<usize> {
    let n = cfg.num_train_timesteps.unwrap_or(default);
    if !(2..=100_000).contains(&n) {
        return Err(Error::config("scheduler.num_train_timesteps", format!("expected 2 to 100000, got {n}")));
    }
    Ok(n)
}

/// Checks the number of inference steps against the training steps.
pub fn check_steps(steps: usize, num_train: usize) -> Result<()> {
    if steps == 0 || steps > num_train {
        return Err(Error::config("steps", format!("expected 1 to num_train_timesteps = {num_train}, got {steps}")));
    }
    Ok(())
}

/// Rejects timesteps that `steps_offset` pushed past the training range.
pub(crate) fn check_range(timesteps: &[i64], n: usize) -> Result<()> {
    if let Some(t) = timesteps.iter().find(|&&t| t < 0 || t >= n as i64) {
        return Err(Error::config(
            "scheduler.steps_offset",
            format!("gives timestep {t}, outside the training range 0..{}", n - 1),
        ));
    }
    Ok(())
}

/// `torch.linspace(start, end, n, dtype=float32)`.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    linspace(start, end, n).into_iter().map(|v| v as f32).collect()
}

/// `np.linspace(start, end, n)` in f64.
pub fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { end } else { start + step * i as f64 }).collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ of Nichol & Dhariwal (2021), max β 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    for v in sqrt_ab.iter_mut() {
        *v -= last;
        *v *= first / (first - last);
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

/// The integer timestep spacing of DDIM, DDPM and LCM-style schedulers (descending).
pub fn discrete_timesteps(spacing: TimestepSpacing, num_train: usize, steps: usize, offset: i64) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            linspace(0.0, (num_train - 1) as f64, steps).iter().rev().map(|v| v.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (num_train / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            arange(num_train as f64, 0.0, -ratio).iter().map(|v| v.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// `np.arange(start, stop, step)` in f64, filled the way numpy fills it: the length is
/// `ceil((stop − start) / step)` and entry i is `start + i·((start + step) − start)`. That last
/// difference can be off from `step` by a rounding, which is enough to change how an entry rounds
/// and, through the length, whether a trailing spacing gains an extra timestep.
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len < 1.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 1 { start + step } else { start + i as f64 * delta }).collect()
}

/// The float32 timesteps of diffusers' sigma-space schedulers (Euler, Euler ancestral, Heun),
/// descending. Unlike [`discrete_timesteps`], `linspace` is not rounded to integers.
pub fn sigma_space_timesteps(spacing: TimestepSpacing, num_train: usize, steps: usize, offset: i64) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => {
            linspace(0.0, (num_train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (num_train / steps) as f64;
            (0..steps).rev().map(|i| (i as f64 * ratio) as f32 + offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            arange(num_train as f64, 0.0, -ratio).iter().map(|t| t.round_ties_even() as f32 - 1.0).collect()
        }
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep at which σ falls, interpolating
/// linearly in log σ between neighbouring training steps. `log_sigmas` is ascending and float32,
/// as diffusers takes `np.log` of float32 sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // diffusers takes the argmax of a running count of `log_sigmas <= log σ`: the last such index,
    // or 0 when there is none, and never the final one so that a neighbour above exists.
    let mut count = 0usize;
    let mut best = (0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        count += usize::from(log_sigma - ls as f64 >= 0.0);
        if count > best.1 {
            best = (i, count);
        }
    }
    let low_idx = best.0.min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[low_idx + 1] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Recovers x₀ from a model output, for discrete (variance-preserving) schedulers.
/// `alpha_prod` is ᾱ_t and `beta_prod` is 1 − ᾱ_t.
#[inline]
pub fn predicted_original(
    kind: PredictionType,
    model_output: f32,
    sample: f32,
    alpha_prod: f64,
    beta_prod: f64,
) -> f64 {
    let (m, x) = (model_output as f64, sample as f64);
    match kind {
        PredictionType::Epsilon => (x - beta_prod.sqrt() * m) / alpha_prod.sqrt(),
        PredictionType::Sample => m,
        PredictionType::VPrediction => alpha_prod.sqrt() * x - beta_prod.sqrt() * m,
    }
}

/// Recovers ε from a model output (DDIM's `pred_epsilon`).
#[inline]
pub fn predicted_epsilon(kind: PredictionType, model_output: f32, sample: f32, alpha_prod: f64, beta_prod: f64) -> f64 {
    let (m, x) = (model_output as f64, sample as f64);
    match kind {
        PredictionType::Epsilon => m,
        PredictionType::Sample => (x - alpha_prod.sqrt() * m) / beta_prod.sqrt(),
        PredictionType::VPrediction => alpha_prod.sqrt() * m + beta_prod.sqrt() * x,
    }
}

/// Karras et al. (2022) sigmas: ρ-spaced between sigma_max and sigma_min (descending).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Vec<f64> {
    let ramp = linspace(0.0, 1.0, n);
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    ramp.iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// `np.interp(x, xp, fp)` for increasing `xp`.
pub fn interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    if x <= xp[0] {
        return fp[0];
    }
    if x >= xp[xp.len() - 1] {
        return fp[fp.len() - 1];
    }
    let j = xp.partition_point(|&v| v <= x);
    let (x0, x1, y0, y1) = (xp[j - 1], xp[j], fp[j - 1], fp[j]);
    y0 + (x - x0) * (y1 - y0) / (x1 - x0)
}

/// `init` noised to timestep `t` of a discrete schedule, `√ᾱ·init + √(1−ᾱ)·noise`, into `out`:
/// diffusers' `add_noise` of DDPM, DDIM and LCM, in float32 as there.
pub(crate) fn add_noise(
    schedule: &Schedule,
    t: i64,
    init: &ndarray::Array4<f32>,
    noise: &ndarray::Array4<f32>,
    out: &mut ndarray::Array4<f32>,
) {
    let a = schedule.alphas_cumprod[t as usize];
    let (keep, mix) = (a.sqrt(), (1.0 - a).sqrt());
    ndarray::Zip::from(out).and(init).and(noise).for_each(|o, &x, &n| *o = keep * x + mix * n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_examples() {
        // Values from diffusers' DDIMScheduler.set_timesteps with 1000 training steps.
        assert_eq!(discrete_timesteps(TimestepSpacing::Leading, 1000, 4, 1), vec![751, 501, 251, 1]);
        assert_eq!(discrete_timesteps(TimestepSpacing::Trailing, 1000, 4, 0), vec![999, 749, 499, 249]);
        assert_eq!(discrete_timesteps(TimestepSpacing::Trailing, 1000, 3, 0), vec![999, 666, 332]);
        assert_eq!(discrete_timesteps(TimestepSpacing::Linspace, 1000, 4, 0), vec![999, 666, 333, 0]);
    }

    #[test]
    fn interp_matches_numpy_rules() {
        let xp = [0.0, 1.0, 3.0];
        let fp = [10.0, 20.0, 40.0];
        assert_eq!(interp(-1.0, &xp, &fp), 10.0);
        assert_eq!(interp(2.0, &xp, &fp), 30.0);
        assert_eq!(interp(5.0, &xp, &fp), 40.0);
    }

    #[test]
    fn cumprod_decreases_and_rejects_bad_betas() {
        let cfg = SchedulerConfig::default();
        let s = Schedule::from_config(&cfg, &DEFAULTS_SD1).unwrap();
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
        let bad = SchedulerConfig { beta_end: Some(1.5), ..Default::default() };
        let err = Schedule::from_config(&bad, &DEFAULTS_SD1).unwrap_err().to_string();
        assert!(err.contains("scheduler.betas"), "{err}");
    }
}
