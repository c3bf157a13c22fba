//! edge-diffuse: few-step diffusion sampling on small devices.
//!
//! The flow runs one way: a [model card](card) → a loaded [denoiser] (tract) → a
//! [sampler] loop (the math of one diffusers scheduler per file) → samples, turned into
//! pictures by [`files`]. [`pipeline::Pipeline`] ties them together.
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
mod conv;
pub mod denoiser;
pub mod error;
pub mod files;
#[cfg(target_arch = "x86_64")]
mod gemm;
// Public only for `examples/profile_ops.rs`, which profiles the plan the runtime builds.
#[doc(hidden)]
pub mod groupnorm;
pub mod noise;
pub mod pipeline;
// Public only for `examples/profile_ops.rs`, which profiles the plan the runtime builds.
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
pub mod pointwise;
pub mod sampler;
// Public only for `examples/profile_ops.rs`, which profiles the plan the runtime builds.
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
pub mod softmax;
// Public only for `examples/profile_ops.rs`, which profiles the plan the runtime builds.
#[doc(hidden)]
pub mod winograd;

pub use card::{ModelCard, PredictionType, SchedulerConfig};
pub use error::{Error, Result};
pub use pipeline::{LoadOptions, Pipeline, Request};
pub use sampler::{NoiseSource, Sampler, SamplerKind, SamplerOptions};
