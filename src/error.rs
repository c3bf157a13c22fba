//! Typed errors of the library. Every message names the file or field at fault and what was
//! expected, so the CLI can print it as one line.

use std::path::PathBuf;

/// Everything that can go wrong between a model directory and an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error (already part of the message, so not chained again).
        error: std::io::Error,
    },
    /// The model card (`model.toml` or `scheduler_config.json`) is not valid.
    #[error("{path}: {message}")]
    Card {
        /// The card file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A configuration value is out of range or unsupported.
    #[error("{field}: {message}")]
    Config {
        /// The field, as `table.key` (e.g. `scheduler.beta_schedule`) or a request field.
        field: String,
        /// What was expected.
        message: String,
    },
    /// The ONNX model could not be loaded, or disagrees with its card.
    #[error("{path}: {message}")]
    Model {
        /// The ONNX file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
    /// `special_tokens_map.json`) is not valid.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The inference engine failed while running the model.
    #[error("running the denoiser: {0}")]
    Inference(String),
    /// The denoiser produced NaN or infinite values.
    #[error("the denoiser output holds {count} non-finite values (NaN or Inf) at step {step} of {total} (timestep {timestep})")]
    NonFinite {
        /// 1-based step number.
        step: usize,
        /// Number of model calls in the run.
        total: usize,
        /// The timestep given to the model.
        timestep: f64,
        /// How many values were not finite.
        count: usize,
    },
    /// A tensor (e.g. a `.npy` file of noise) has the wrong shape or type.
    #[error("{what}: {message}")]
    Tensor {
        /// The tensor or file at fault.
        what: String,
        /// What was expected.
        message: String,
    },
    /// A caller's output buffer cannot hold the result.
    #[error("{what}: holds {got} values, the request needs {needed}")]
    BufferTooSmall {
        /// The buffer at fault (`sample buffer`, `pixel buffer`).
        what: &'static str,
        /// Values the request needs.
        needed: usize,
        /// Values the buffer holds.
        got: usize,
    },
    /// The per-step callback asked to stop.
    #[error("cancelled at step {step}")]
    Cancelled {
        /// The step after which generation stopped (1-based).
        step: usize,
    },
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { field: field.into(), message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), error: source }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
