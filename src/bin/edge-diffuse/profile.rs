//! `edge-diffuse profile`: where one model call spends its time, per operator kind and per node,
//! on the plan `sample` would run (same threads, precision and convolution setting).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edge_diffuse::runtime::Denoiser;
use edge_diffuse::ModelCard;

#[derive(Args)]
pub struct ProfileArgs {
    /// Model directory (holding model.toml); default: the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Timed calls (after as many untimed ones, and a warm-up).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Images per call: 2 profiles a guided step run as one batch-2 call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Threads for the model (default: 1, so that node times add up to the call).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Arithmetic precision: f32 or f16 (see `sample --help`).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// 3×3 convolutions: winograd or im2col (see `sample --help`).
    #[arg(long, default_value = "winograd")]
    pub convolution: String,
}

/// Runs `profile` and prints its table.
pub fn run(a: ProfileArgs, model: PathBuf) -> Result<()> {
    if a.threads == 0 {
        anyhow::bail!("--threads: expected at least 1");
    }
    let precision = crate::parse_flag(&a.precision)?;
    let convolution = crate::parse_flag(&a.convolution)?;
    let card = ModelCard::load(&model)?;
    let mut denoiser = Denoiser::load(&card, a.threads)?;
    denoiser.set_precision(precision);
    denoiser.set_convolution(convolution);
    // A text model's UNet may leave its token count open: its tokenizer's length fixes it, as
    // the pipeline's text encoder does.
    if let (Some(text), Some([None, Some(dim)])) = (&card.text_encoder, denoiser.context_shape()) {
        let tokenizer = edge_diffuse::tokenizer::ClipTokenizer::from_folder(card.dir.join(&text.tokenizer))?;
        denoiser.set_context_shape(tokenizer.max_length(), dim)?;
    }
    let report = denoiser.profile_ops(a.batch, a.runs)?;
    println!("{} ({}), {} thread(s)", card.model.name, card.onnx_path().display(), denoiser.threads());
    print!("{report}");
    Ok(())
}
