//! `edge-diffuse sample`: generate images and stream them to their outputs.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use edge_diffuse::files;
use edge_diffuse::pipeline::{GuidanceBatching, LoadOptions, Pipeline, PreviewDecoder, Request};
use edge_diffuse::runtime::PlanFile;
use edge_diffuse::{ModelCard, SamplerKind};
use ndarray::ArrayD;

use crate::{default_model, interrupt, parse_flag};

#[derive(Args)]
pub struct SampleArgs {
    /// Model directory (holding model.toml); default: the bundled fmnist-student.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sampler: ddim, ddpm, euler, euler_ancestral, heun, dpmpp_2m, lcm, consistency, flow_euler, flow_heun (default: the card's).
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
    /// A conditioning input's values (the card's [model.conditioning.NAME]): NAME=V[,V...],
    /// cycled over the images as --class is, or NAME=@FILE.npy (float32); repeat for each input.
    #[arg(long = "cond", value_name = "NAME=VALUES")]
    cond: Vec<String>,
    /// The prompt, for a model with a text encoder (an ONNX Stable Diffusion folder).
    #[arg(long)]
    prompt: Option<String>,
    /// What guidance steers away from (used when --guidance is above 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image width in pixels (default: the model's); a latent model's must be a multiple of 8.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (default: the model's); a latent model's must be a multiple of 8.
    #[arg(long)]
    height: Option<usize>,
    /// A decoder folder (model.onnx + config.json) in place of the model's VAE decoder, e.g. a
    /// TAESD-class tiny decoder: faster, in less memory.
    #[arg(long, value_name = "DIR")]
    decoder: Option<PathBuf>,
    /// Decode in overlapping windows, blended, so the decoder's memory is one window's: auto
    /// (when the image exceeds the tile size), on, or off. "--vae-tiling" alone is on.
    #[arg(long, value_name = "WHEN", default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    vae_tiling: String,
    /// Side of a decoding window in pixels (default: the VAE's training size, its sample_size).
    #[arg(long, value_name = "PIXELS")]
    vae_tile: Option<usize>,
    /// With --width/--height above the model's size: denoise the canvas in windows of the
    /// model's size overlapping by at least this many pixels, blended at every step
    /// (MultiDiffusion), instead of running the model at the canvas size.
    #[arg(long, value_name = "PIXELS")]
    tile_overlap: Option<usize>,
    /// Image-to-image: the image to start from, a PNG of the model's size (its values mapped
    /// through the card's value_range) or a float32 .npy [batch, C, H, W] in the model's space
    /// (a latent model's latents; one for all images or one per image).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Resize a --init image of another size to the model's (Lanczos), instead of refusing it.
    #[arg(long)]
    resize_init: bool,
    /// How much of the schedule image-to-image runs, in (0, 1] (default 0.8; 1 with --mask): the last
    /// int(steps × strength) steps, from the image noised to that level.
    #[arg(long)]
    strength: Option<f64>,
    /// Image-to-image from this noise level instead of a --strength, for the σ-space samplers
    /// (euler, euler_ancestral, heun, dpmpp_2m, consistency) and σ-conditioned models: the init
    /// plus SIGMA × the noise, then --steps steps of Karras sigmas from SIGMA down (a 1-step
    /// consistency run is one call at SIGMA).
    #[arg(long, value_name = "SIGMA")]
    init_sigma: Option<f64>,
    /// Inpainting, with --init: a mask image of the output's size, white where to draw anew and
    /// black where to keep the init (grey values split at the middle).
    #[arg(long, value_name = "FILE.png")]
    mask: Option<PathBuf>,
    /// Every N steps, and at the last, write the image the model predicts at that step (x̂₀) to
    /// --preview: a live view of a slow run, to cancel a bad seed early.
    #[arg(long, value_name = "N")]
    preview_every: Option<usize>,
    /// The preview PNG, replaced at every preview (default: --out with "-preview" before
    /// ".png").
    #[arg(long, value_name = "FILE.png")]
    preview: Option<PathBuf>,
    /// Write a strip of the image the model predicts at every step (x̂₀): one row per image, one
    /// column per step, the last column the result.
    #[arg(long, value_name = "FILE.png")]
    trajectory: Option<PathBuf>,
    /// What decodes a latent model's previews: a decoder folder, e.g. a TAESD-class tiny
    /// decoder, or `linear`, the card's latent-to-RGB map (rough, and nearly free; ./linear for a
    /// folder of that name). Default: --decoder, else the model's VAE.
    #[arg(long, value_name = "DIR|linear")]
    preview_decoder: Option<PathBuf>,
    /// Where the plan file of packed weights goes: `auto` (beside the ONNX file when its folder
    /// is writable, else $XDG_CACHE_HOME/edge-diffuse), `off` (pack on the heap at every load),
    /// or a folder. The first load writes it; later loads map it, and the kernels read their
    /// weights through the map (file-backed memory that the OS can drop and read again).
    #[arg(long, default_value = "auto", value_name = "auto|off|DIR")]
    plan_cache: String,
    /// The precision of the packed weights, on the heap and in the plan file: f16 halves their
    /// bytes (its own plan file); the kernels widen them to f32 a few panels at a time.
    #[arg(long, default_value = "f32", value_name = "f32|f16")]
    weights: String,
    /// Lock the first MIB mebibytes of the denoiser's plan file in memory (mlock), so that they
    /// are never dropped and read again: for a model larger than the memory it may use. Needs
    /// RLIMIT_MEMLOCK (`ulimit -l`) of at least that, or CAP_IPC_LOCK.
    #[arg(long, value_name = "MIB")]
    lock_weights: Option<u64>,
    /// Cross-attention conditioning (encoder_hidden_states), float32 .npy [1, tokens, dim].
    #[arg(long, value_name = "FILE.npy")]
    context: Option<PathBuf>,
    /// Starting noise, float32 [batch,C,H,W] of unit variance (sets the number of images).
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Also write the final samples, float32 [batch,C,H,W], before they become pixels (a latent
    /// model's final latents, before decoding; "-": standard output).
    #[arg(long)]
    save_tensor: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `sample`.
pub fn run(a: SampleArgs) -> Result<()> {
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
    if a.preview_every == Some(0) {
        bail!("--preview-every: expected at least 1 step");
    }
    if a.preview_every.is_none() && a.preview.is_some() {
        bail!("--preview: give --preview-every N to write previews");
    }
    if a.preview_every.is_none() && a.trajectory.is_none() && a.preview_decoder.is_some() {
        bail!("--preview-decoder: give --preview-every N or --trajectory FILE to decode previews");
    }
    if let Some(p) = &a.trajectory {
        if p == stdout && a.out == stdout {
            bail!("--trajectory -: --out already writes to standard output");
        }
        files::check_output(p)?;
    }
    let preview_path = match (&a.preview, a.preview_every) {
        (_, None) => None,
        (Some(p), _) => Some(p.clone()),
        (None, _) if a.out == stdout => bail!("--preview-every: with --out -, name the preview file with --preview"),
        (None, _) => Some(PathBuf::from(format!("{}-preview.png", a.out.with_extension("").display()))),
    };
    if let Some(p) = &preview_path {
        if p == stdout {
            bail!("--preview -: previews are replaced file by file, which standard output cannot do");
        }
        files::check_output(p)?;
    }
    let noise = a.noise.as_deref().map(files::read_npy4).transpose()?;
    if a.strength.is_some() && a.init.is_none() {
        bail!("--strength: applies to image-to-image: give --init FILE");
    }
    if a.init_sigma.is_some() && a.init.is_none() {
        bail!("--init-sigma: applies to image-to-image: give --init FILE");
    }
    if a.init_sigma.is_some() && a.strength.is_some() {
        bail!("--init-sigma: give --strength or --init-sigma, not both");
    }
    if a.mask.is_some() && a.init.is_none() {
        bail!("--mask: inpainting needs the image to keep parts of: give --init FILE");
    }
    let init_npy = match &a.init {
        Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) => Some(files::read_npy4(p)?),
        _ => None,
    };
    let conditioning = parse_conditioning(&a.cond)?;
    let context = a.context.as_deref().map(files::read_npy).transpose()?;
    let precision = parse_flag(&a.precision)?;
    let convolution = parse_flag(&a.convolution)?;
    let decoder_tiling = parse_flag(&a.vae_tiling)?;
    let mut opts = LoadOptions {
        guidance_batching,
        precision,
        convolution,
        decoder: a.decoder.clone(),
        decoder_tiling,
        decoder_tile: a.vae_tile,
        preview_decoder: preview_decoder(a.preview_decoder.as_deref()),
        tile_overlap: a.tile_overlap,
        plan_cache: parse_flag(&a.plan_cache)?,
        weights: parse_flag(&a.weights)?,
        lock_weights: lock_bytes(a.lock_weights)?,
        ..Default::default()
    };
    match (a.width, a.height) {
        (Some(w), Some(h)) => opts.size = Some([w, h]),
        (None, None) => {}
        _ => bail!("--width and --height: give both, or neither for the model's size"),
    }
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
    let several = init_npy.as_ref().map(|i| i.shape()[0]).filter(|&b| b > 1);
    let total = noise.as_ref().map(|n| n.shape()[0]).or(several).unwrap_or(a.num_images);
    if a.start_index >= total {
        bail!("--start-index {}: expected less than the number of images, {total}", a.start_index);
    }
    let interrupt = interrupt::install();
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&model, opts).map_err(|e| match e {
        // Name the flag that set the field.
        edge_diffuse::Error::Config { field, message }
            if matches!(
                field.as_str(),
                "width" | "height" | "decoder" | "vae-tile" | "preview-decoder" | "tile-overlap" | "lock-weights"
            ) =>
        {
            anyhow::anyhow!("--{field}: {message}")
        }
        e => e.into(),
    })?;
    let load_s = t0.elapsed().as_secs_f64();
    plan_notices(&pipe);
    lock_notice(&pipe, a.lock_weights);
    for (flag, text) in [("--prompt", &a.prompt), ("--negative-prompt", &a.negative_prompt)] {
        if let Some(tokens) = text.as_deref().and_then(|t| pipe.tokenize(t)) {
            if tokens.truncated {
                eprintln!(
                    "warning: {flag} is longer than the text encoder's {} tokens; the rest is cut off, as diffusers does",
                    tokens.ids.len()
                );
            }
        }
    }
    let classes = a.class.as_deref().map(|c| parse_classes(pipe.card(), c)).transpose()?;
    let mut init_pixels = None;
    let init = match (&a.init, init_npy) {
        (_, Some(npy)) => Some(npy),
        (Some(p), None) => {
            if pipe.card().decoder.is_some() && !pipe.encodes_images() {
                bail!(
                    "--init {}: this latent model has no VAE encoder (vae_encoder/ in its folder, or an [encoder] \
                     in its card): give the init as latents, a float32 .npy [batch, C, H, W]",
                    p.display()
                );
            }
            let pixels = files::read_image(p, pipe.output_shape(), pipe.value_range(), a.resize_init)?;
            let latents = pipe.encode(&pixels)?;
            init_pixels = Some(pixels);
            Some(latents)
        }
        (None, None) => None,
    };
    let mut masked_init = None;
    let mask = match &a.mask {
        Some(p) => {
            let [_, h, w] = pipe.output_shape();
            let pixels = files::read_mask(p, [h, w])?;
            // An inpainting latent model takes the masked image's own encoding.
            if pipe.card().model.inpainting && pipe.card().decoder.is_some() {
                let Some(image) = &init_pixels else {
                    bail!(
                        "--init {}: this inpainting model encodes the masked image: give the init as an image",
                        a.init.as_ref().expect("--mask needs --init").display()
                    );
                };
                masked_init = Some(pipe.masked_init(image, &pixels)?);
            }
            Some(pipe.mask_from_image(&pixels)?)
        }
        None => None,
    };
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
        context,
        conditioning,
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        // The trajectory needs every step's prediction; the preview file takes every N-th.
        preview_every: if a.trajectory.is_some() { 1 } else { a.preview_every.unwrap_or(0) },
        init: init.map(|i| match i.shape()[0] {
            // One per image: this run's part of them.
            1 => i,
            _ => i.slice_move(ndarray::s![a.start_index.., .., .., ..]),
        }),
        strength: a.strength,
        init_sigma: a.init_sigma,
        mask,
        masked_init,
    };
    let card = pipe.card();
    let latent = [card.image.channels, card.image.height, card.image.width];
    let shape = pipe.output_shape();
    let range = pipe.value_range();
    let mut grid = match a.separate {
        true => None,
        false => {
            let cols = a.cols.unwrap_or_else(|| (count as f64).sqrt().ceil() as usize);
            Some(files::Grid::new(count, shape, cols, range)?)
        }
    };
    let mut tensor = match &a.save_tensor {
        Some(p) => Some(files::NpyWriter::create(p, [count, latent[0], latent[1], latent[2]])?),
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
    let mut preview_failed = false;
    // The trajectory strip, made at the first step (when the number of steps is known).
    let strip: std::cell::RefCell<Option<files::Grid>> = Default::default();
    let strip_error = std::cell::RefCell::new(None);
    let run = pipe.generate_each(
        &req,
        &mut |s| {
            if let (Some(image), Some(_)) = (s.preview, &a.trajectory) {
                let mut strip = strip.borrow_mut();
                if strip.is_none() {
                    match files::Grid::new(count * (s.total + 1), shape, s.total + 1, range) {
                        Ok(g) => *strip = Some(g),
                        Err(e) => {
                            *strip_error.borrow_mut() = Some(e);
                            return ControlFlow::Break(());
                        }
                    }
                }
                let row = s.image - a.start_index;
                strip.as_mut().expect("made above").place(row * (s.total + 1) + s.step - 1, image);
            }
            let every = a.preview_every.unwrap_or(usize::MAX);
            let due = s.step.is_multiple_of(every) || s.step == s.total;
            if let (Some(image), Some(path), false, true) = (s.preview, &preview_path, preview_failed, due) {
                // A preview that cannot be written is no reason to lose the run: say so once.
                let written = files::Grid::new(1, shape, 1, range).and_then(|mut one| {
                    one.place(0, image);
                    files::write_png(path, &one.image())
                });
                if let Err(e) = written {
                    if !std::mem::replace(&mut preview_failed, true) {
                        eprintln!("warning: --preview: {e}; no more previews are written");
                    }
                }
            }
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
        &mut |finished| {
            let (index, image) = (finished.index, finished.image);
            if let Some(strip) = strip.borrow_mut().as_mut() {
                let cols = strip.size_in_images().1;
                strip.place((index - a.start_index) * cols + cols - 1, image);
            }
            let written = (|| {
                if let Some(t) = &mut tensor {
                    t.push(finished.sample)?;
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
    if let Some(e) = strip_error.into_inner() {
        return Err(anyhow::anyhow!("--trajectory: {e}"));
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
        Err(edge_diffuse::Error::Tensor { what, message }) if what == "init" && a.init.is_some() => {
            bail!("{}: {message}", a.init.as_ref().expect("checked").display())
        }
        // Name the flag rather than the library's request field.
        Err(edge_diffuse::Error::Tensor { what, message }) if what.starts_with("conditioning ") => {
            bail!("--cond {}: {message}", &what["conditioning ".len()..])
        }
        // Name the flag: the library's field is `prompt`, `negative-prompt`, `strength` or
        // `init-sigma`.
        Err(edge_diffuse::Error::Config { field, message })
            if field.ends_with("prompt") || field == "strength" || field == "init-sigma" =>
        {
            bail!("--{field}: {message}")
        }
        Err(edge_diffuse::Error::Config { field, message }) if field.starts_with("conditioning") => {
            bail!("--cond{}: {message}", &field["conditioning".len()..])
        }
        Err(edge_diffuse::Error::Tensor { what, message }) if what == "context" && a.context.is_some() => {
            bail!("{}: {message}", a.context.as_ref().expect("checked").display())
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
    if let (Some(path), Some(g)) = (&a.trajectory, strip.into_inner()) {
        files::write_png(path, &g.image())?;
    }
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

fn parse_classes(card: &ModelCard, spec: &str) -> Result<Vec<i64>> {
    if spec == "all" {
        let Some(c) = &card.classes else { bail!("class: this model is not class-conditional") };
        return Ok((0..c.names.len() as i64).collect());
    }
    spec.split(',').map(|s| Ok(card.class_label(s.trim())?)).collect()
}

/// `--cond NAME=V[,V...]` and `--cond NAME=@FILE.npy`, by name.
fn parse_conditioning(flags: &[String]) -> Result<BTreeMap<String, ArrayD<f32>>> {
    let mut values = BTreeMap::new();
    for flag in flags {
        let Some((name, value)) = flag.split_once('=').filter(|(n, _)| !n.trim().is_empty()) else {
            bail!("--cond {flag:?}: expected NAME=V[,V...] or NAME=@FILE.npy");
        };
        let name = name.trim();
        let array = match value.strip_prefix('@') {
            Some(path) => files::read_npy(Path::new(path))?,
            None => {
                let numbers = value
                    .split(',')
                    .map(|v| match v.trim().parse::<f32>() {
                        Ok(x) if x.is_finite() => Ok(x),
                        Ok(x) => bail!("--cond {name}: {x} is not a finite number"),
                        Err(_) => bail!("--cond {name}: {:?} is not a number", v.trim()),
                    })
                    .collect::<Result<Vec<f32>>>()?;
                ArrayD::from_shape_vec(vec![numbers.len()], numbers).expect("one-dimensional")
            }
        };
        if values.insert(name.to_string(), array).is_some() {
            bail!("--cond {name}: given twice");
        }
    }
    Ok(values)
}

/// `--preview-decoder DIR|linear`.
/// One `note:` line per plan file that was rebuilt or could not be written.
pub(crate) fn plan_notices(pipe: &Pipeline) {
    for (part, file) in pipe.plan_files() {
        if let Some(notice) = file.notice() {
            eprintln!("note: {part}: {notice}");
        }
    }
}

/// `--lock-weights MIB` in bytes.
pub(crate) fn lock_bytes(mib: Option<u64>) -> Result<Option<u64>> {
    mib.map(|m| m.checked_mul(1 << 20).context("--lock-weights: too many mebibytes")).transpose()
}

/// A `note:` line when `--lock-weights` asked for a lock and none was taken.
pub(crate) fn lock_notice(pipe: &Pipeline, mib: Option<u64>) {
    if mib.is_none_or(|m| m == 0) || pipe.denoiser().locked_weights() > 0 {
        return;
    }
    let why = match pipe.denoiser().plan_file() {
        PlanFile::Written { mapped: false, .. } => {
            "this load wrote the plan file and keeps the weights on the heap; later loads lock it"
        }
        PlanFile::Unneeded => "the denoiser has no packed weights",
        _ => "the weights are on the heap, with no plan file to lock",
    };
    eprintln!("note: --lock-weights: nothing locked: {why}");
}

pub(crate) fn preview_decoder(flag: Option<&std::path::Path>) -> PreviewDecoder {
    match flag {
        None => PreviewDecoder::Model,
        Some(p) if p.as_os_str() == "linear" => PreviewDecoder::Linear,
        Some(p) => PreviewDecoder::Folder(p.to_path_buf()),
    }
}
