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
    /// First image to generate: resumes an interrupted run (same flags otherwise), keeping the
    /// numbering of --separate files and each image's noise.
    #[arg(long, default_value_t = 0)]
    start_index: usize,
    /// Class by name or label; comma-separated to cycle over images; "all" cycles through every class.
    #[arg(long)]
    class: Option<String>,
    /// Classifier-free guidance scale (1 = off; default: the card's).
    #[arg(long)]
    guidance: Option<f32>,
    /// DDIM eta (default 0).
    #[arg(long)]
    eta: Option<f32>,
    /// Threads for the model (default: available cores; more than the cores are not started).
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
    /// Output PNG: one grid of all images, or numbered files with --separate; "-" is standard
    /// output. Devices and FIFOs are written in place, symlinks followed, files replaced
    /// atomically.
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
    /// Also write the final samples, float32 [batch,C,H,W], before they become pixels ("-":
    /// standard output).
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
    let stdout = Path::new("-");
    if a.separate && a.out == stdout {
        bail!("--out -: --separate writes numbered files, which standard output cannot hold");
    }
    if a.out == stdout && a.save_tensor.as_deref() == Some(stdout) {
        bail!("--save-tensor -: --out already writes to standard output");
    }
    match a.separate {
        true => files::check_output(&numbered(&a.out, a.start_index))?,
        false => files::check_output(&a.out)?,
    }
    if let Some(p) = &a.save_tensor {
        files::check_output(p)?;
    }
    let noise = a.noise.as_deref().map(files::read_npy4).transpose()?;
    let precision = parse_flag(&a.precision)?;
    let convolution = parse_flag(&a.convolution)?;
    let mut opts = LoadOptions { guidance_batching, precision, convolution, ..Default::default() };
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads: expected at least 1");
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        if t > cores {
            eprintln!("notice: --threads {t}: this machine runs {cores} threads at once, so {cores} are used");
        }
        opts.threads = t;
    }
    let total = noise.as_ref().map_or(a.num_images, |n| n.shape()[0]);
    if a.start_index >= total {
        bail!("--start-index {}: expected less than the number of images, {total}", a.start_index);
    }
    let interrupt = interrupt::install();
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&model, opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let classes = a.class.as_deref().map(|c| parse_classes(pipe.card(), c)).transpose()?;
    let count = total - a.start_index;
    let req = Request {
        seed: a.seed,
        num_images: count,
        first_image: a.start_index,
        sampler,
        steps: a.steps,
        classes,
        guidance: a.guidance,
        eta: a.eta,
        noise: noise.map(|n| n.slice_move(ndarray::s![a.start_index.., .., .., ..])),
        context: None,
    };
    let card = pipe.card();
    let shape = [card.image.channels, card.image.height, card.image.width];
    let range = card.image.value_range;
    let mut grid = match a.separate {
        true => None,
        false => {
            let cols = a.cols.unwrap_or_else(|| (count as f64).sqrt().ceil() as usize);
            Some(files::Grid::new(count, shape, cols, range)?)
        }
    };
    let mut tensor = match &a.save_tensor {
        Some(p) => Some(files::NpyWriter::create(p, [count, shape[0], shape[1], shape[2]])?),
        None => None,
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
    let mut done = 0;
    let mut write_error = None;
    let run = pipe.generate_each(
        &req,
        &mut |s| {
            if let Some(b) = &bar {
                b.set_length((s.total * count) as u64);
                b.inc(1);
                b.set_message(format!(
                    "image {} step {}/{} {:.1} ms",
                    s.image + 1,
                    s.step,
                    s.total,
                    s.elapsed.as_secs_f64() * 1e3
                ));
            }
            match interrupt.signal() {
                Some(_) => ControlFlow::Break(()),
                None => ControlFlow::Continue(()),
            }
        },
        &mut |index, image| {
            let written = (|| {
                if let Some(t) = &mut tensor {
                    t.push(image)?;
                }
                match &mut grid {
                    Some(g) => g.place(index - a.start_index, image),
                    None => {
                        let mut one = files::Grid::new(1, shape, 1, range)?;
                        one.place(0, image);
                        files::write_png(&numbered(&a.out, index), &one.image())?;
                    }
                }
                Ok::<_, edge_diffuse::Error>(())
            })();
            match written {
                Ok(()) => {
                    done += 1;
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = write_error {
        // Dropping `tensor` removes its temporary file: an earlier file of that name stays.
        return Err(e.into());
    }
    let info = match run {
        Ok(info) => info,
        Err(edge_diffuse::Error::Cancelled { .. }) => {
            let signal = interrupt.signal().expect("only a signal cancels");
            let kept = tensor.map(files::NpyWriter::finish_partial).transpose()?;
            interrupted(&a, signal, done, count, kept);
        }
        // Name the user's file rather than the library's "noise".
        Err(edge_diffuse::Error::Tensor { what, message }) if what == "noise" && a.noise.is_some() => {
            bail!("{}: {message}", a.noise.as_ref().expect("checked").display())
        }
        Err(e) => return Err(e.into()),
    };
    let gen_s = t1.elapsed().as_secs_f64();
    if let Some(t) = tensor {
        t.finish()?;
    }
    let written = match grid {
        Some(g) => {
            files::write_png(&a.out, &g.image())?;
            shown(&a.out)
        }
        None => files_range(&a.out, a.start_index, total),
    };
    if !a.quiet {
        let calls = count * info.timesteps;
        eprintln!(
            "{count} image(s) x {} steps of {} (guidance {}): load {load_s:.2} s, sampling {gen_s:.2} s ({:.1} ms per model step) -> {written}",
            info.steps,
            info.sampler,
            info.guidance,
            gen_s * 1e3 / calls.max(1) as f64,
        );
    }
    Ok(())
}

/// `out-INDEX.png` for `--out out.png`: the file of one image with `--separate`.
fn numbered(out: &Path, index: usize) -> PathBuf {
    PathBuf::from(format!("{}-{index}.png", out.with_extension("").display()))
}

/// The files of images `first..end` with `--separate`, for messages.
fn files_range(out: &Path, first: usize, end: usize) -> String {
    match end.saturating_sub(first) {
        0 => "no files".to_string(),
        1 => numbered(out, first).display().to_string(),
        _ => format!("{} ... {}", numbered(out, first).display(), numbered(out, end - 1).display()),
    }
}

/// A path for messages (`-` is standard output).
fn shown(p: &Path) -> String {
    match p == Path::new("-") {
        true => "standard output".to_string(),
        false => p.display().to_string(),
    }
}

/// Ends a run stopped by a signal: says what was kept and how to resume, and exits 128 + the
/// signal's number, as a shell reports a process that the signal ended.
fn interrupted(a: &SampleArgs, signal: interrupt::Signal, done: usize, count: usize, kept: Option<usize>) -> ! {
    let end = a.start_index + done;
    let mut line = match a.separate {
        true => format!("{done} of {count} images written ({})", files_range(&a.out, a.start_index, end)),
        false => format!("{done} of {count} images done; the grid ({}) is written only when all are", shown(&a.out)),
    };
    if let (Some(p), Some(k)) = (&a.save_tensor, kept) {
        line.push_str(&format!("; {} holds {k} images", shown(p)));
    }
    if done < count {
        line.push_str(&format!("; resume with the same flags and --start-index {end}"));
        if a.save_tensor.is_some() {
            line.push_str(" (and another --save-tensor path)");
        }
    }
    eprintln!("interrupted by {}: {line}", signal.name());
    std::process::exit(signal.exit_code());
}

/// SIGINT and SIGTERM stop a run at the next step boundary; a second one ends the process at
/// once, as it would without this.
mod interrupt {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// The signal that stopped the run.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Signal {
        Interrupt,
        Terminate,
    }

    impl Signal {
        pub fn name(self) -> &'static str {
            match self {
                Signal::Interrupt => "SIGINT",
                Signal::Terminate => "SIGTERM",
            }
        }

        /// 128 + the signal's number.
        pub fn exit_code(self) -> i32 {
            match self {
                Signal::Interrupt => 130,
                Signal::Terminate => 143,
            }
        }
    }

    /// Set by the handlers: 0 until a signal, then that signal's exit code.
    pub struct Flag(Arc<AtomicUsize>);

    impl Flag {
        pub fn signal(&self) -> Option<Signal> {
            match self.0.load(Ordering::Relaxed) {
                130 => Some(Signal::Interrupt),
                143 => Some(Signal::Terminate),
                _ => None,
            }
        }
    }

    #[cfg(unix)]
    pub fn install() -> Flag {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let code = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        for (sig, exit) in [(SIGINT, 130), (SIGTERM, 143)] {
            // The default action (the end of the process) once `seen` is set, i.e. at a second
            // signal: registered first, so that the first signal still finds `seen` false.
            let installed = flag::register_conditional_default(sig, Arc::clone(&seen))
                .and_then(|_| flag::register(sig, Arc::clone(&seen)))
                .and_then(|_| flag::register_usize(sig, Arc::clone(&code), exit));
            // Without handlers, a signal ends the process as it always did.
            drop(installed);
        }
        Flag(code)
    }

    #[cfg(not(unix))]
    pub fn install() -> Flag {
        Flag(Arc::new(AtomicUsize::new(0)))
    }
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
