//! `edge-diffuse bench`: load time, per-step latency and memory of one model, as a table or JSON.
//! Part of the CLI (it prints); the library only reports per-step timings through its callback.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use crate::memory::{major_faults, status_mib, PeakAnon};
use anyhow::Result;
use clap::Args;
use edge_diffuse::pipeline::{LoadOptions, Pipeline, Request};
use edge_diffuse::runtime::PlanFile;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory (holding model.toml); default: the bundled model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Steps per image (default: the card's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sampler (default: the card's).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Classifier-free guidance scale (default: the card's); 1 turns guidance off.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Threads for the model (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Images generated (one request each) after a warm-up image.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guided steps: auto, two-calls, concurrent or batched (see `sample --help`).
    #[arg(long, default_value = "auto")]
    pub guidance_batching: String,
    /// Arithmetic precision: f32 or f16 (see `sample --help`).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// 3×3 convolutions: winograd or im2col (see `sample --help`).
    #[arg(long, default_value = "winograd")]
    pub convolution: String,
    /// The prompt, for a model with a text encoder (each run adds its number to it, so that
    /// every run encodes its prompt).
    #[arg(long, default_value = "a photo of a red bicycle")]
    pub prompt: String,
    /// Time image-to-image: each run starts from a mid-grey image (through the VAE encoder for a
    /// latent model) at this strength, so it runs int(steps × strength) steps.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Ask for a preview (the step's x̂₀, decoded for a latent model) every N steps: the report
    /// gives its cost per preview, also as a share of the median step (which excludes it).
    #[arg(long, value_name = "N")]
    pub preview_every: Option<usize>,
    /// What decodes a latent model's previews: a decoder folder or `linear` (see `sample
    /// --help`).
    #[arg(long, value_name = "DIR|linear")]
    pub preview_decoder: Option<PathBuf>,
    /// The plan file of packed weights: auto (beside the model, else the cache folder), off,
    /// or a folder (see `sample --help`).
    #[arg(long, default_value = "auto", value_name = "auto|off|DIR")]
    pub plan_cache: String,
    /// The precision of the packed weights: f32 or f16 (see `sample --help`).
    #[arg(long, default_value = "f32", value_name = "f32|f16")]
    pub weights: String,
    /// Lock the first MIB mebibytes of the denoiser's plan file in memory (mlock), so that they
    /// are never dropped and read again: for a model larger than the memory it may use. Needs
    /// RLIMIT_MEMLOCK (`ulimit -l`) of at least that, or CAP_IPC_LOCK.
    #[arg(long, value_name = "MIB")]
    pub lock_weights: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure every path this CPU runs, interleaved, and print their ratios: tract's im2col
    /// convolutions and ours, f32 and (where the CPU has f16 arithmetic) f16, at 1 thread and
    /// at --threads (default: every core); 3 rounds of --runs images per path after a warm-up.
    #[arg(long, conflicts_with_all = ["precision", "convolution", "strength", "preview_every", "guidance_batching"])]
    pub compare: bool,
}

pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The denoiser's plan file: what became of it, its path, and the milliseconds it took to write
/// when this load wrote it (`plan_build_ms`; the packing itself is part of `load_s`).
fn plan_file_report(pipe: &Pipeline) -> serde_json::Value {
    let files = pipe.plan_files();
    let (_, file) = files[0];
    match file {
        PlanFile::Off => serde_json::json!({ "status": "off" }),
        PlanFile::Unneeded => serde_json::json!({ "status": "unneeded" }),
        PlanFile::Mapped { path, left_out, saved_graph } => serde_json::json!({
            "status": "mapped", "path": path, "initializers_left_out": left_out, "saved_graph": saved_graph
        }),
        PlanFile::Written { path, ms, stale, mapped } => serde_json::json!({
            "status": "written", "path": path, "plan_build_ms": ms, "stale": stale, "mapped": mapped
        }),
        PlanFile::Unwritten(why) => serde_json::json!({ "status": "unwritten", "reason": why }),
    }
}

pub(crate) fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name").or_else(|| l.strip_prefix("Model")))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub fn run(a: BenchArgs, model: PathBuf) -> Result<()> {
    anyhow::ensure!(a.runs >= 1, "--runs: expected at least 1");
    if a.threads == Some(0) {
        anyhow::bail!("--threads: expected at least 1");
    }
    if a.compare {
        return crate::compare::run(&a, &model);
    }
    let precision = crate::parse_flag(&a.precision)?;
    let guidance_batching = crate::parse_flag(&a.guidance_batching)?;
    let batching_label = a.guidance_batching.clone();
    let convolution = crate::parse_flag(&a.convolution)?;
    let preview_decoder = crate::sample::preview_decoder(a.preview_decoder.as_deref());
    let plan_cache = crate::parse_flag(&a.plan_cache)?;
    let weights = crate::parse_flag(&a.weights)?;
    let mut opts = LoadOptions {
        precision,
        guidance_batching,
        convolution,
        preview_decoder,
        plan_cache,
        weights,
        lock_weights: crate::sample::lock_bytes(a.lock_weights)?,
        ..Default::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let sampler = a.sampler.as_deref().map(str::parse::<edge_diffuse::sampler::SamplerKind>).transpose()?;
    let peak_anon = PeakAnon::start();
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&model, opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = (status_mib("RssAnon"), status_mib("RssFile"), major_faults());
    crate::sample::plan_notices(&pipe);
    crate::sample::lock_notice(&pipe, a.lock_weights);
    let mut steps_ms: Vec<f64> = Vec::new();
    let mut first_step_ms = None;
    let mut image_s = Vec::new();
    let mut steps_used = 0;
    let mut used = (String::new(), 1.0);
    let (mut text_ms, mut decode_ms, mut preview_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut previews = 0usize;
    let prompted = pipe.takes_text();
    // A class-conditional model is measured on a real class, so guidance runs as it would.
    let classes = pipe.card().classes.as_ref().map(|_| vec![0]);
    let init = match a.strength {
        Some(_) => {
            let [c, h, w] = pipe.output_shape();
            let [lo, hi] = pipe.value_range();
            Some(pipe.encode(&ndarray::Array4::from_elem((1, c, h, w), (lo + hi) / 2.0))?)
        }
        None => None,
    };
    for i in 0..=a.runs {
        let req = Request {
            seed: i as u64,
            num_images: 1,
            sampler,
            steps: a.steps,
            guidance: a.guidance,
            classes: classes.clone(),
            prompt: prompted.then(|| format!("{} {i}", a.prompt)),
            init: init.clone(),
            strength: a.strength,
            preview_every: a.preview_every.unwrap_or(0),
            ..Default::default()
        };
        let mut times = Vec::new();
        let t = Instant::now();
        let mut shown = 0usize;
        let gen = pipe.generate(&req, &mut |s| {
            times.push(s.elapsed.as_secs_f64() * 1e3);
            shown += usize::from(s.preview.is_some());
            ControlFlow::Continue(())
        })?;
        let elapsed = t.elapsed().as_secs_f64();
        steps_used = gen.steps;
        used = (gen.sampler.to_string(), gen.guidance);
        if i == 0 {
            first_step_ms = times.first().copied();
        } else {
            steps_ms.extend(times);
            image_s.push(elapsed);
            text_ms.push(gen.stages.text_encoder.as_secs_f64() * 1e3);
            decode_ms.push(gen.stages.decoder.as_secs_f64() * 1e3);
            if shown > 0 {
                preview_ms.push(gen.stages.previews.as_secs_f64() * 1e3 / shown as f64);
                previews += shown;
            }
        }
    }
    steps_ms.sort_by(f64::total_cmp);
    image_s.sort_by(f64::total_cmp);
    let per_image = percentile(&image_s, 0.5);
    text_ms.sort_by(f64::total_cmp);
    decode_ms.sort_by(f64::total_cmp);
    let card = pipe.card();
    let mut report = serde_json::json!({
        "model": card.model.name,
        "sampler": used.0,
        "steps": steps_used,
        "guidance": used.1,
        "threads": pipe.denoiser().threads(),
        "guidance_batching": batching_label,
        "precision": pipe.denoiser().precision().to_string(),
        "convolution": pipe.denoiser().convolution().to_string(),
        "weights": a.weights,
        "winograd_convolutions": pipe.denoiser().winograd_convolutions(),
        "fused_group_norms": pipe.denoiser().fused_group_norms(),
        "cpu": cpu_model(),
        "load_s": load_s,
        "first_step_ms": first_step_ms,
        "step_ms_median": percentile(&steps_ms, 0.5),
        "step_ms_p90": percentile(&steps_ms, 0.9),
        "image_s_median": per_image,
        "images_per_s": 1.0 / per_image,
        "peak_rss_mib": status_mib("VmHWM"),
        "rss_anon_after_load_mib": after_load.0,
        "rss_file_after_load_mib": after_load.1,
        "peak_rss_anon_mib": peak_anon.peak_mib(),
        "major_faults_at_load": after_load.2,
        "major_faults": major_faults(),
        "plan_file": plan_file_report(&pipe),
        "runs": a.runs,
    });
    if let Some(s) = a.strength {
        report["strength"] = s.into();
        report["timesteps"] = (steps_ms.len() / a.runs).into();
    }
    if let Some(n) = a.preview_every {
        preview_ms.sort_by(f64::total_cmp);
        let per_preview = percentile(&preview_ms, 0.5);
        report["preview_every"] = n.into();
        report["previews"] = previews.into();
        report["preview_ms_median"] = per_preview.into();
        report["preview_share_of_step"] = (per_preview / percentile(&steps_ms, 0.5)).into();
    }
    if prompted {
        report["text_encoder_ms_median"] = percentile(&text_ms, 0.5).into();
    }
    if card.decoder.is_some() {
        report["decoder_ms_median"] = percentile(&decode_ms, 0.5).into();
    }
    // Written, not println!: a closed pipe (`bench --json | head`) is an error, not a panic.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{report}")?;
    } else {
        for (k, v) in report.as_object().expect("object") {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or(f64::NAN)),
                other => other.to_string(),
            };
            writeln!(out, "{k:<16} {text}")?;
        }
    }
    Ok(())
}
