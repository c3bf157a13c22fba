//! `edge-diffuse`: the command line over the library. Prints and exits; the library never does.

use std::io::IsTerminal;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_diffuse::files;
use edge_diffuse::pipeline::{GuidanceBatching, LoadOptions, Pipeline, Request};
use edge_diffuse::{ModelCard, SamplerKind};

mod cli_bench;

#[derive(Parser)]
#[command(name = "edge-diffuse", version, about = "Few-step diffusion sampling on small devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a model directory.
    Sample(Box<SampleArgs>),
    /// Measure load time, step latency, images/s and peak memory of a model.
    Bench(cli_bench::BenchArgs),
    /// Describe a model: card, ONNX inputs and outputs, parameters, defaults.
    Info {
        /// Model directory (holding model.toml); default: the bundled model.
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SampleArgs {
    /// Model directory (holding model.toml); default: the bundled fmnist-student.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sampler: ddim, ddpm, euler, euler_ancestral, heun, dpmpp_2m, lcm, consistency (default: the card's).
    #[arg(long)]
    sampler: Option<String>,
    /// Number of steps (default: the card's).
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Class by name or label; comma-separated to cycle over images; "all" cycles through every class.
    #[arg(long)]
    class: Option<String>,
    /// Classifier-free guidance scale (1 = off; default: the card's).
    #[arg(long)]
    guidance: Option<f32>,
    /// DDIM eta (default 0).
    #[arg(long)]
    eta: Option<f32>,
    /// Threads for the model (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Guided steps: auto (concurrent with 2+ threads, else two-calls), two-calls (one after
    /// the other), concurrent (both branches at once, half the threads each) or batched (one
    /// batch-2 call).
    #[arg(long, default_value = "auto")]
    guidance_batching: String,
    /// Arithmetic precision: f32, or f16 for CPUs with fp16 arithmetic (ARMv8.2+: Pi 5, Jetson Orin).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Convolutions: winograd (3×3 by F(2×2,3×3) and, on x86-64, 1×1 on our kernel; float32
    /// only) or im2col (tract's own).
    #[arg(long, default_value = "winograd")]
    convolution: String,
    /// Output PNG: one grid of all images, or numbered files with --separate.
    #[arg(long, default_value = "sample.png")]
    out: PathBuf,
    /// Write one PNG per image (out-0.png, out-1.png, ...) instead of a grid.
    #[arg(long)]
    separate: bool,
    /// Grid columns (default: about the square root of the number of images).
    #[arg(long)]
    cols: Option<usize>,
    /// Starting noise, float32 [batch,C,H,W] of unit variance (sets the number of images).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Also write the final samples, float32 [batch,C,H,W], before they become pixels.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(args) => sample(*args),
        Command::Info { model } => info(model),
        Command::Bench(args) => {
            let model = args.model.clone().unwrap_or_else(default_model);
            cli_bench::run(args, model)
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

fn parse_classes(card: &ModelCard, spec: &str) -> Result<Vec<i64>> {
    if spec == "all" {
        let Some(c) = &card.classes else { bail!("class: this model is not class-conditional") };
        return Ok((0..c.names.len() as i64).collect());
    }
    spec.split(',').map(|s| Ok(card.class_label(s.trim())?)).collect()
}

/// Parses a flag's value with the library's parser, whose error starts with the field name.
fn parse_flag<T: std::str::FromStr<Err = edge_diffuse::Error>>(value: &str) -> Result<T> {
    value.parse().map_err(|e: edge_diffuse::Error| anyhow::anyhow!("--{e}"))
}

fn sample(a: SampleArgs) -> Result<()> {
    let model = a.model.clone().unwrap_or_else(default_model);
    let sampler = a.sampler.as_deref().map(str::parse::<SamplerKind>).transpose()?;
    let guidance_batching: GuidanceBatching = parse_flag(&a.guidance_batching)?;
    if a.num_images == 0 {
        bail!("--num-images: expected at least 1");
    }
    for p in [Some(&a.out), a.save_tensor.as_ref()].into_iter().flatten() {
        check_output_path(p)?;
    }
    let noise = a.noise.as_deref().map(files::read_npy4).transpose()?;
    let precision = parse_flag(&a.precision)?;
    let convolution = parse_flag(&a.convolution)?;
    let mut opts = LoadOptions { guidance_batching, precision, convolution, ..Default::default() };
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads: expected at least 1");
        }
        opts.threads = t;
    }
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&model, opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let classes = a.class.as_deref().map(|c| parse_classes(pipe.card(), c)).transpose()?;
    let req = Request {
        seed: a.seed,
        num_images: a.num_images,
        sampler,
        steps: a.steps,
        classes,
        guidance: a.guidance,
        eta: a.eta,
        noise,
        context: None,
    };
    let show = !a.quiet && std::io::stderr().is_terminal();
    let bar = show.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").expect("valid template"),
        );
        b
    });
    let t1 = Instant::now();
    let gen = pipe.generate(&req, &mut |s| {
        if let Some(b) = &bar {
            b.set_length((s.total * a.num_images.max(1)) as u64);
            b.inc(1);
            b.set_message(format!(
                "image {} step {}/{} {:.1} ms",
                s.image + 1,
                s.step,
                s.total,
                s.elapsed.as_secs_f64() * 1e3
            ));
        }
        ControlFlow::Continue(())
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // Name the user's file rather than the library's "noise".
    let gen = gen.map_err(|e| match (e, &a.noise) {
        (edge_diffuse::Error::Tensor { what, message }, Some(p)) if what == "noise" => {
            anyhow::anyhow!("{}: {message}", p.display())
        }
        (e, _) => e.into(),
    })?;
    let gen_s = t1.elapsed().as_secs_f64();
    let range = pipe.card().image.value_range;
    let n = gen.samples.shape()[0];
    if let Some(p) = &a.save_tensor {
        files::write_npy(p, &gen.samples)?;
    }
    let written = if a.separate {
        let stem = a.out.with_extension("");
        let mut names = Vec::new();
        for i in 0..n {
            let p = PathBuf::from(format!("{}-{i}.png", stem.display()));
            let one = gen.samples.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
            files::write_png(&p, &files::grid_image(&one, 1, range))?;
            names.push(p.display().to_string());
        }
        names.join(", ")
    } else {
        let cols = a.cols.unwrap_or_else(|| (n as f64).sqrt().ceil() as usize);
        files::write_png(&a.out, &files::grid_image(&gen.samples, cols, range))?;
        a.out.display().to_string()
    };
    if !a.quiet {
        let calls = n * gen.timesteps;
        eprintln!(
            "{n} image(s) x {} steps of {} (guidance {}): load {load_s:.2} s, sampling {gen_s:.2} s ({:.1} ms per model step) -> {written}",
            gen.steps,
            gen.sampler,
            gen.guidance,
            gen_s * 1e3 / calls.max(1) as f64,
        );
    }
    Ok(())
}

/// Fails early, before any work, on an output path that cannot be written.
fn check_output_path(p: &Path) -> Result<()> {
    if p.is_dir() {
        bail!("{}: is a directory, expected a file path", p.display());
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{}: folder {} does not exist", p.display(), parent.display());
    }
    Ok(())
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
    writeln!(out, "timestep    {:?} {:?}", ti.datum_type, ti.shape)?;
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
    writeln!(out, "load        {:.3} s to a runnable plan ({} threads)", load.as_secs_f64(), d.threads())?;
    writeln!(out, "winograd    {} of the 3x3 convolutions", d.winograd_convolutions())?;
    writeln!(out, "group norm  {} fused", d.fused_group_norms())?;
    Ok(())
}
