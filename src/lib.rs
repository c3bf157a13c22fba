//! edge-diffuse: few-step diffusion sampling on small devices.
//!
//! The flow runs one way: a [model card](card) → a loaded denoiser ([`runtime::Denoiser`], on
//! tract) → a [sampler] loop (the math of one diffusers scheduler per file) → samples, turned
//! into pictures by [`files`]. [`pipeline::Pipeline`] ties them together. The engine under the
//! runtime is private: graph rewrites (`passes`) that swap in our operators (`ops`), which run
//! SIMD kernels per architecture (`kernels`); see docs/architecture.md.
//!
//! ```
//! use std::ops::ControlFlow;
//! use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request};
//!
//! # fn main() -> edge_diffuse::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-student");
//! let mut pipe = Pipeline::load(dir, LoadOptions { threads: 1, ..Default::default() })?;
//! let sneaker = pipe.card().class_label("sneaker")?;
//! let request = Request { seed: 7, num_images: 2, classes: Some(vec![sneaker]), ..Default::default() };
//! let mut steps = 0;
//! let out = pipe.generate(&request, &mut |_step| {
//!     steps += 1;
//!     ControlFlow::Continue(()) // Break(()) cancels
//! })?;
//! assert_eq!(out.samples.shape(), &[2, 1, 32, 32]);
//! assert_eq!(steps, 2 * out.steps);
//! let png = edge_diffuse::files::grid_image(&out.samples, 2, pipe.card().image.value_range);
//! assert_eq!((png.width(), png.height()), (65, 32));
//! # Ok(())
//! # }
//! ```
//!
//! The library never prints and never exits; every failure is an [`Error`] naming the file or
//! field at fault.
#![warn(missing_docs)]

#[cfg(feature = "capi")]
pub mod capi;
pub mod card;
pub mod error;
pub mod files;
mod kernels;
pub mod noise;
mod ops;
mod passes;
pub mod pipeline;
pub mod runtime;
pub mod sampler;
pub mod tokenizer;

pub use card::{ModelCard, PredictionType, SchedulerConfig};
pub use error::{Error, Result};
pub use pipeline::{LoadOptions, Pipeline, Request};
pub use sampler::{NoiseSource, Sampler, SamplerKind, SamplerOptions};
