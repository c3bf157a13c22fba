//! x̂₀, the denoised sample a step predicts from the model output: clipped or thresholded
//! (DDIM, DDPM, LCM, DPM-Solver), or computed in σ-space (the Euler family).

use ndarray::{Array4, ArrayViewMut2, Axis};

use super::config::{PredictionType, SchedulerConfig};
use super::schedule;

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
        prediction: PredictionType,
        model_output: &Array4<f32>,
        sample: &Array4<f32>,
        alpha_prod: f64,
        x0: &mut Array4<f32>,
    ) {
        let beta_prod = 1.0 - alpha_prod;
        ndarray::Zip::from(&mut *x0).and(model_output).and(sample).for_each(|x0, &m, &x| {
            *x0 = schedule::predicted_original(prediction, m, x, alpha_prod, beta_prod) as f32;
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

/// x₀ from a model output in σ-space (x = x₀ + σ·ε), in float32 with torch's order of
/// operations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigmaSpaceX0 {
    prediction: PredictionType,
    sigma: f32,
    /// −σ/√(σ² + 1) and σ² + 1, the v-prediction coefficients.
    v_out: f32,
    v_in: f32,
}

impl SigmaSpaceX0 {
    pub(crate) fn new(prediction: PredictionType, sigma: f32) -> Self {
        let v_in = sigma * sigma + 1.0;
        SigmaSpaceX0 { prediction, sigma, v_out: -sigma / v_in.sqrt(), v_in }
    }

    /// x̂₀ of every value of `model_output` at the sample `sample`, into `x0`.
    pub(crate) fn fill(&self, model_output: &Array4<f32>, sample: &Array4<f32>, x0: &mut Array4<f32>) {
        ndarray::Zip::from(x0).and(model_output).and(sample).for_each(|d, &m, &x| *d = self.of(m, x));
    }

    #[inline]
    pub(crate) fn of(&self, m: f32, x: f32) -> f32 {
        match self.prediction {
            PredictionType::Epsilon => x - self.sigma * m,
            // v is defined on the scaled input x/√(σ²+1); this is diffusers' rearrangement.
            PredictionType::VPrediction => m * self.v_out + x / self.v_in,
            PredictionType::Sample => m,
        }
    }
}
