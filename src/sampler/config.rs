//! The `[scheduler]` table of a model card: diffusers' `scheduler_config.json` keys, with the
//! same names and meanings. A key left out takes diffusers' default *for the sampler in use*,
//! which is why every field is optional and each sampler resolves its own defaults.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// diffusers scheduler configuration keys. `None` means "diffusers' default for this sampler".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub variance_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub flow_shift: Option<f64>,
    pub lambda_min_clipped: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    pub time_shift_type: Option<String>,
    pub shift: Option<f64>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<usize>,
    pub max_image_seq_len: Option<usize>,
    pub shift_terminal: Option<f64>,
    pub invert_sigmas: Option<bool>,
    pub stochastic_sampling: Option<bool>,
    /// Not a diffusers config key but the `mu` that diffusers' pipelines pass to
    /// `set_timesteps` with `use_dynamic_shifting`; a card fixes it, as it fixes the image size.
    pub mu: Option<f64>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    pub sigma_data: Option<f64>,
    pub s_noise: Option<f64>,
    pub rho: Option<f64>,
    pub clip_denoised: Option<bool>,
    /// PNDM's key, kept in the scheduler configs of SD 1.x/2.x and SD-Turbo whatever their
    /// class; read and ignored (no sampler here runs PNDM's Runge-Kutta warm-up).
    pub skip_prk_steps: Option<bool>,
    /// diffusers bookkeeping in `scheduler_config.json`; read and ignored.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// diffusers bookkeeping in `scheduler_config.json`; read and ignored.
    #[serde(rename = "_diffusers_version")]
    pub diffusers_version: Option<String>,
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// `prediction_type`: what the denoiser outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// v = α·ε − σ·x₀ (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// `timestep_spacing`: how inference timesteps are picked from the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl SchedulerConfig {
    /// The keys that are set, as `key = value` strings in diffusers' spelling.
    pub fn set_keys(&self) -> Vec<String> {
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| format!("{k} = {v}")).collect()
    }
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
