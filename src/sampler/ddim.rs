//! PLACEHOLDER: being written.
use ndarray::Array4;

use super::{NoiseSource, Sampler};
use crate::card::SchedulerConfig;
use crate::error::{Error, Result};

/// Placeholder.
pub struct Ddim {
    timesteps: Vec<f64>,
}

impl Ddim {
    /// Placeholder.
    pub fn new(_cfg: &SchedulerConfig, _steps: usize, _eta: f32) -> Result<Self> {
        Err(Error::config("sampler", "not implemented yet"))
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step(&mut self, _m: &Array4<f32>, _i: usize, _s: &mut Array4<f32>, _n: &mut dyn NoiseSource) {}
}
