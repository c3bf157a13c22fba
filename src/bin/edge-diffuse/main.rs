//! `edge-diffuse`: the command line over the library. Prints and exits; the library never does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edge_diffuse::pipeline::{LoadOptions, Pipeline};
use edge_diffuse::ModelCard;

mod bench;
mod compare;
mod interrupt;
mod memory;
mod profile;
mod sample;

#[derive(Parser)]
#[command(name = "edge-diffuse", version, about = "Few-step diffusion sampling on small devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a model directory.
    Sample(Box<sample::SampleArgs>),
    /// Measure load time, step latency, images/s and peak memory of a model.
    Bench(bench::BenchArgs),
    /// Time one model call per operator kind and per node (where a call's time goes).
    Profile(profile::ProfileArgs),
    /// Describe a model: card, ONNX inputs and outputs, parameters, defaults.
    Info {
        /// Model directory (holding model.toml); default: the bundled model.
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(args) => sample::run(*args),
        Command::Info { model } => info(model),
        Command::Profile(args) => {
            let model = args.model.clone().unwrap_or_else(default_model);
            profile::run(args, model)
        }
        Command::Bench(args) => {
            let model = args.model.clone().unwrap_or_else(default_model);
            bench::run(args, model)
        }
    };
    if let Err(e) = result {
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}

/// The bundled default model: `./models/fmnist-student`, else the one in the source tree.
fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGE_DIFFUSE_MODEL") {
        return PathBuf::from(p);
    }
    let local = Path::new("models/fmnist-student");
    if local.join("model.toml").is_file() {
        return local.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-student")
}

/// Parses a flag's value with the library's parser, whose error starts with the field name.
fn parse_flag<T: std::str::FromStr<Err = edge_diffuse::Error>>(value: &str) -> Result<T> {
    value.parse().map_err(|e: edge_diffuse::Error| anyhow::anyhow!("--{e}"))
}

fn info(model: Option<PathBuf>) -> Result<()> {
    let model = model.unwrap_or_else(default_model);
    let card = ModelCard::load(&model)?;
    let t0 = Instant::now();
    let pipe =
        Pipeline::load(&model, LoadOptions::default()).with_context(|| format!("loading {}", model.display()))?;
    let load = t0.elapsed();
    let d = pipe.denoiser();
    // Written, not println!: a closed pipe (`info | head -1`) is an error, not a panic.
    let mut out = std::io::stdout().lock();
    writeln!(out, "model       {} ({})", card.model.name, card.dir.display())?;
    writeln!(out, "onnx        {}", card.onnx_path().display())?;
    writeln!(out, "parameters  {}", d.params())?;
    writeln!(
        out,
        "image       {} x {} x {}, values in {:?}",
        card.image.channels, card.image.height, card.image.width, card.image.value_range
    )?;
    for i in d.inputs() {
        writeln!(out, "input       {} {}", i.name, i.fact)?;
    }
    for o in d.outputs() {
        writeln!(out, "output      {} {}", o.name, o.fact)?;
    }
    let ti = d.timestep_input();
    let time = match card.model.inputs.time() {
        edge_diffuse::card::TimeInput::Timestep(_) => "timestep",
        edge_diffuse::card::TimeInput::Sigma(_) => "sigma",
    };
    writeln!(out, "{time:<12}{:?} {:?}", ti.datum_type, ti.shape)?;
    for c in d.conditioning_inputs() {
        let section = &card.model.conditioning[&c.name];
        writeln!(
            out,
            "conditioning {} (input {:?}, {:?}, per image {:?}): default {}, null {}",
            c.name,
            c.input,
            c.datum_type,
            c.dims,
            section.default.as_ref().map_or("none".to_string(), |v| format!("{v:?}")),
            section.null.as_ref().map_or("none".to_string(), |v| format!("{v:?}")),
        )?;
    }
    if let Some(c) = &card.classes {
        writeln!(out, "classes     {} (null class: {:?})", c.names.join(", "), c.null)?;
    }
    writeln!(out, "scheduler   {}", card.scheduler.set_keys().join(", "))?;
    let df = &card.defaults;
    writeln!(
        out,
        "defaults    sampler {} steps {} guidance {} eta {}",
        df.sampler.as_deref().unwrap_or("ddim"),
        df.steps.unwrap_or(4),
        df.guidance.unwrap_or(1.0),
        df.eta.unwrap_or(0.0)
    )?;
    if let Some(t) = &card.text_encoder {
        writeln!(
            out,
            "text        {} (tokenizer {})",
            card.dir.join(&t.onnx).display(),
            card.dir.join(&t.tokenizer).display()
        )?;
    }
    if let Some(dec) = &card.decoder {
        let [c, h, w] = pipe.output_shape();
        writeln!(
            out,
            "decoder     {} -> {c} x {h} x {w} (latents / {} + {})",
            card.dir.join(&dec.onnx).display(),
            dec.scaling_factor,
            dec.shift_factor
        )?;
    }
    writeln!(out, "load        {:.3} s to a runnable plan ({} threads)", load.as_secs_f64(), d.threads())?;
    writeln!(out, "winograd    {} of the 3x3 convolutions", d.winograd_convolutions())?;
    writeln!(out, "group norm  {} fused", d.fused_group_norms())?;
    if let Some(derived) = &card.derived {
        writeln!(
            out,
            "\nthe card derived from the folder (a model.toml beside model_index.json overrides any key):\n"
        )?;
        write!(out, "{derived}")?;
    }
    Ok(())
}
