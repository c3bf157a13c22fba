//! edge-diffuse: few-step diffusion sampling on small devices.
#![warn(missing_docs)]

pub mod card;
pub mod denoiser;
pub mod error;
pub mod files;
pub mod noise;
pub mod pipeline;
pub mod sampler;
pub mod schedule;

pub use card::{ModelCard, PredictionType, SchedulerConfig};
pub use error::{Error, Result};
pub use sampler::{NoiseSource, Sampler, SamplerKind, SamplerOptions};
