//! `edge-diffuse profile`: where one model call spends its time, per operator kind and per node,
//! on the plan `sample` would run (same threads, precision and convolution setting).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edge_diffuse::runtime::{Denoiser, Graph, OpProfile, PlanCache, WeightPrecision};
use edge_diffuse::ModelCard;
use ndarray::{ArrayD, IxDyn};

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
    /// The graph of a latent text model to profile: unet (the denoiser), text_encoder (on a
    /// prompt's ids) or decoder (on latents of the card's size).
    #[arg(long, default_value = "unet")]
    pub part: String,
    /// List every node, not only the slowest.
    #[arg(long)]
    pub all_nodes: bool,
    /// The plan file of packed weights: off (weights packed on the heap), auto or a folder
    /// (see `sample --help`); auto profiles the mapped weights the pipeline runs on.
    #[arg(long, default_value = "off", value_name = "auto|off|DIR")]
    pub plan_cache: String,
}

/// Runs `profile` and prints its table.
pub fn run(a: ProfileArgs, model: PathBuf) -> Result<()> {
    if a.threads == 0 {
        anyhow::bail!("--threads: expected at least 1");
    }
    let precision = crate::parse_flag(&a.precision)?;
    let convolution = crate::parse_flag(&a.convolution)?;
    let plan_cache: PlanCache = crate::parse_flag(&a.plan_cache)?;
    let card = ModelCard::load(&model)?;
    match a.part.as_str() {
        "unet" => {}
        "text_encoder" | "decoder" => return other_part(&a, &card, plan_cache),
        other => anyhow::bail!("--part: expected unet, text_encoder or decoder, got {other:?}"),
    }
    let mut denoiser = Denoiser::load_with(&card, a.threads, plan_cache, WeightPrecision::F32)?;
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
    print_report(&report, a.all_nodes);
    Ok(())
}

/// Profiles a latent model's text encoder or decoder, loaded as the pipeline loads it.
fn other_part(a: &ProfileArgs, card: &ModelCard, plan_cache: PlanCache) -> Result<()> {
    let (path, inputs) = if a.part == "text_encoder" {
        let Some(text) = &card.text_encoder else { anyhow::bail!("--part text_encoder: this model has none") };
        let tokenizer = edge_diffuse::tokenizer::ClipTokenizer::from_folder(card.dir.join(&text.tokenizer))?;
        let ids: Vec<f32> = tokenizer.encode("a photo of a red bicycle").ids.iter().map(|&i| i as f32).collect();
        (card.dir.join(&text.onnx), ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids)?)
    } else {
        let Some(decoder) = &card.decoder else { anyhow::bail!("--part decoder: this model has none") };
        let shape = [1, card.image.channels, card.image.height, card.image.width];
        (card.dir.join(&decoder.onnx), ArrayD::from_elem(IxDyn(&shape), 0.3f32))
    };
    let mut graph = Graph::load_with(&path, &[inputs.shape().to_vec()], a.threads, plan_cache, WeightPrecision::F32)?;
    let report = graph.profile_ops(&[inputs], a.runs)?;
    println!("{} {} ({}), {} thread(s)", card.model.name, a.part, path.display(), a.threads);
    print_report(&report, a.all_nodes);
    Ok(())
}

/// Prints `report`'s table and its slowest nodes, or every node with `all_nodes`.
fn print_report(report: &OpProfile, all_nodes: bool) {
    if all_nodes {
        print!("{report:#}");
    } else {
        print!("{report}");
    }
}
